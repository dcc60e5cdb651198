"""Saved-for-backward memory and wall time of one GDSO and one RISD step (the demo's tiny models and data).

    python -m benchmarks.trainer_step [--repeats 5] [--output results.json]

``model`` is what the VLM's layers save, ``head`` everything else a step saves (score distribution,
cross-entropy, policy log-probs, distillation loss): the part the fused ops decide. Wall time is the median of
``--repeats`` steps after one warm-up step, on whatever device ``--device`` names.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.saved_memory import SavedBytes
from zreward.experiments.demo import DemoConfig
from zreward.experiments.tiny_models import STUDENT_CONFIG, TEACHER_CONFIG, tiny_scorer
from zreward.training.gdso import GDSOConfig, GDSOTrainer
from zreward.training.risd import RISDTrainer, TeacherCache


def measure(trainer, model: torch.nn.Module, repeats: int) -> dict:
    trainer.step()  # warm-up: kernels specialised, optimizer state allocated
    # Every submodule but the LM head is labelled: the scorer runs parts of the model directly (vision tower,
    # decoder layers over a shared prefix), so a hook on the top module alone would miss them.
    body = {f"model:{name}": module for name, module in model.named_modules() if name and "lm_head" not in name}
    saved = SavedBytes(model.parameters(), body)
    with saved:
        trainer.step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - started)
    by_component = saved.by_component
    return {"saved_model_bytes": sum(v for k, v in by_component.items() if k.startswith("model:")),
            "saved_head_bytes": by_component.get("other", 0),
            "step_ms": round(1e3 * statistics.median(times), 1)}


def run(repeats: int, device: str, seed: int = 0) -> dict:
    demo = DemoConfig()
    torch.manual_seed(seed)
    data = replace(demo, seed=seed).data()
    dev = torch.device(device)
    teacher = tiny_scorer(seed, TEACHER_CONFIG, dev)
    student = tiny_scorer(seed + 1, STUDENT_CONFIG, dev)
    # One update per batch so that one forward/backward is measured (the demo makes two).
    gdso_config = GDSOConfig(**{**demo.gdso.__dict__, "updates_per_batch": 1})
    results = {"gdso": measure(GDSOTrainer(teacher, data, data.pairs(), gdso_config), teacher.model, repeats)}
    cache = TeacherCache.build(teacher, data, num_samples=1, max_new_tokens=demo.risd.teacher_max_new_tokens)
    results["risd"] = measure(RISDTrainer(student, data, cache, demo.risd), student.model, repeats)
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
            "steps": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    result = run(args.repeats, args.device)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

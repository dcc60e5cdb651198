"""Two CPU ranks on gloo: parameters stay identical after steps, data is sharded, checkpoints resume."""
import gc
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from zreward.experiments.synthetic import SyntheticPreferences
from zreward.training.checkpoint import load_checkpoint, save_checkpoint
from zreward.training.distributed import (DistContext, all_gather_tensors, all_reduce_mean, fsdp_mesh_device,
                                          init_distributed, shard_indices, shutdown_distributed, unwrap_model,
                                          wrap_model)

WORLD = 2
DATA = torch.randn(18, 5, generator=torch.Generator().manual_seed(7))
TRAIN_DATA = SyntheticPreferences(3, 2, 32, seed=0)


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(5, 5) for _ in range(2))
        self.out = torch.nn.Linear(5, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x).squeeze(-1)


def _join(rank: int, out_dir: str) -> DistContext:
    """Join this test's two-rank gloo group, as a rank that torchrun started would.

    The ranks meet through a file in the test's own directory. They used to meet on a port probed free in the
    parent (bind to 0, close) that rank 0 rebinds only seconds later, after the spawned ranks import torch; any
    process on the machine can take it in between. Given a port that another two-rank job was using, our rank 1
    joined that job's TCPStore, our rank 0 failed with EADDRINUSE and the other job hung (reproduced here).
    Besides the CPU, the port was all these ranks shared with other jobs on the machine; this removes it, and one
    compute thread per rank keeps two ranks within a 2-core CI machine. (The FSDP2 case's occasional SIGABRT at
    rank exit had another cause: see ``shutdown_distributed``.)
    """
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    return init_distributed(device="cpu", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}")


def _worker(rank, out_dir, strategy):
    ctx = _join(rank, out_dir)
    try:
        _train_and_report(rank, out_dir, strategy, ctx)
    finally:  # the models are out of scope here, as shutdown_distributed needs
        shutdown_distributed()


def _train_and_report(rank, out_dir, strategy, ctx):
    torch.manual_seed(0)  # same init on every rank; DDP also broadcasts rank 0's
    model = wrap_model(Blocks(), ctx, strategy=strategy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    seen = []
    torch.manual_seed(100 + rank)  # per-rank streams differ, as under torchrun
    for epoch in range(2):
        indices = shard_indices(len(DATA), ctx, seed=1, epoch=epoch)
        seen.append(indices)
        for start in range(0, len(indices), 3):
            batch = DATA[indices[start:start + 3]]
            loss = (model(batch) - batch.sum(-1)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mean_loss = all_reduce_mean(loss)
    gathered = all_gather_tensors(torch.tensor([float(rank)]))
    save_checkpoint(os.path.join(out_dir, "ckpt"), model, optimizer, {"epoch": 2})
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in unwrap_model(model).state_dict().items()}
    save_file({k: v.detach().contiguous() for k, v in full.items()}, os.path.join(out_dir, f"params{rank}.st"))
    after_draw = torch.rand(1).item()

    fresh = wrap_model(Blocks(), ctx, strategy=strategy)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.05)
    state = load_checkpoint(os.path.join(out_dir, "ckpt"), fresh, fresh_opt)
    resumed_draw = torch.rand(1).item()  # this rank's own stream is restored
    reloaded = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                for k, v in unwrap_model(fresh).state_dict().items()}
    report = {"seen": seen, "mean_loss": mean_loss.item(), "gathered": gathered.tolist(), "state": state,
              "draws": [after_draw, resumed_draw],
              "reload_equal": all(torch.equal(reloaded[k], full[k]) for k in full)}
    with open(os.path.join(out_dir, f"report{rank}.json"), "w") as f:
        json.dump(report, f)


def _fsdp2_runs_on_cpu() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("strategy", [
    "ddp",
    pytest.param("fsdp2", marks=pytest.mark.skipif(not _fsdp2_runs_on_cpu(), reason="no FSDP2 in this torch")),
])
def test_two_ranks_stay_in_sync(tmp_path, strategy):
    mp.spawn(_worker, args=(str(tmp_path), strategy), nprocs=WORLD, join=True)
    params = [load_file(tmp_path / f"params{r}.st") for r in range(WORLD)]
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(WORLD)]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name
    initial = Blocks.__new__(Blocks)
    torch.manual_seed(0)
    initial.__init__()
    assert not torch.equal(initial.out.weight, params[0]["out.weight"]), "training must have moved the weights"
    for epoch in range(2):
        shards = [set(r["seen"][epoch]) for r in reports]
        assert not shards[0] & shards[1], "ranks must see disjoint examples"
        assert len(shards[0] | shards[1]) == len(DATA)
    assert reports[0]["seen"][0] != reports[0]["seen"][1], "each epoch reshuffles"
    assert reports[0]["mean_loss"] == pytest.approx(reports[1]["mean_loss"])
    assert reports[0]["gathered"] == [0.0, 1.0]
    for report in reports:
        assert report["state"] == {"epoch": 2}
        assert report["reload_equal"]
        assert report["draws"][0] == report["draws"][1]
    assert reports[0]["draws"][0] != reports[1]["draws"][0]


def test_single_process_fallbacks():
    ctx = init_distributed(device="cpu")
    assert ctx == DistContext() and ctx.is_main and not ctx.distributed
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model
    assert unwrap_model(model) is model
    assert shard_indices(5, ctx, seed=0, epoch=0, shuffle=False) == [0, 1, 2, 3, 4]
    assert sorted(shard_indices(5, ctx, seed=0, epoch=1)) == [0, 1, 2, 3, 4]
    x = torch.arange(3.0)
    assert torch.equal(all_reduce_mean(x), x) and torch.equal(all_gather_tensors(x), x)
    with pytest.raises(ValueError, match="strategy"):
        wrap_model(model, ctx, strategy="zero3")


def test_shutdown_frees_reference_cycles_while_the_group_lives(tmp_path):
    """What FSDP2's state does to its process group, in one process: a group reachable only from a reference cycle
    must be freed before the group is destroyed, not during interpreter exit (a SIGABRT there)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    freed_while_initialized = []

    class HoldsGroup:
        def __del__(self):
            freed_while_initialized.append(dist.is_initialized())

    gc.disable()  # no automatic collection between here and the shutdown
    try:
        holder = HoldsGroup()
        holder.cycle = holder
        del holder
        shutdown_distributed()
    finally:
        gc.enable()
    assert freed_while_initialized == [True]
    assert not dist.is_initialized()


@pytest.mark.parametrize("device,backend", [
    ("cpu", "gloo"), ("cpu", "cpu:gloo,cuda:nccl"),
    ("cuda:1", "nccl"), ("cuda:0", "cpu:gloo,cuda:nccl"),  # the CUDA decision needs no GPU to check
])
def test_fsdp_mesh_is_on_the_model_device(device, backend):
    assert fsdp_mesh_device(torch.device(device), backend) == torch.device(device)


@pytest.mark.parametrize("device,backend,match", [
    ("cpu", "nccl", "serves cpu"), ("cuda:0", "gloo", "serves cuda"), ("cuda", "nccl", "index"),
])
def test_fsdp_mesh_device_that_cannot_work_is_an_error(device, backend, match):
    with pytest.raises(ValueError, match=match):
        fsdp_mesh_device(torch.device(device), backend)


def test_uneven_shards_are_cut_to_equal_length():
    shards = [shard_indices(7, DistContext(rank=r, world_size=2), seed=0, epoch=0) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3


def _risd(rank, ctx):
    from zreward.experiments.tiny_models import tiny_scorer
    from zreward.training.risd import RISDConfig, RISDTrainer, TeacherCache

    probs = torch.softmax(torch.randn(len(TRAIN_DATA), 1, 9, generator=torch.Generator().manual_seed(0)), -1)
    cache = TeacherCache(probs, ("realism",), TRAIN_DATA.prompts(range(len(TRAIN_DATA))), {}, torch.linspace(1, 5, 9))
    student = tiny_scorer(rank, {"layer_types": ["full_attention"] * 2})  # rank 0's weights win
    return RISDTrainer(student, TRAIN_DATA, cache, RISDConfig(batch_size=1, lr=1e-2), ctx=ctx), len(TRAIN_DATA)


def _gdso(rank, ctx):
    from zreward.experiments.tiny_models import tiny_scorer
    from zreward.training.gdso import GDSOConfig, GDSOTrainer

    teacher = tiny_scorer(rank, {"layer_types": ["full_attention"] * 2})  # rank 0's weights win
    config = GDSOConfig(group_size=2, pairs_per_batch=1, max_new_tokens=2, lr=1e-2, beta=0.0)
    trainer = GDSOTrainer(teacher, TRAIN_DATA, TRAIN_DATA.pairs(), config, ctx=ctx)
    return trainer, len(trainer.batches)


def _refl(rank, ctx):
    from test_refl import PROMPTS, contrast_reward, tiny_config

    from zreward.refl import ReFLTrainer, build_adapter

    torch.manual_seed(rank)  # the LoRA init is seeded by the config; anything else rank 0 broadcasts
    config = tiny_config(prompts=PROMPTS + ["a yellow kite"], batch_size=1)
    trainer = ReFLTrainer(build_adapter(config), contrast_reward, config, ctx=ctx)
    return trainer, len(trainer.prompts)


TRAINERS = {"gdso": _gdso, "risd": _risd, "refl": _refl}


def _trainer_worker(rank, out_dir, kind):
    ctx = _join(rank, out_dir)
    try:
        _train_two_steps(rank, out_dir, kind, ctx)
    finally:  # the models are out of scope here, as shutdown_distributed needs
        shutdown_distributed()


def _train_two_steps(rank, out_dir, kind, ctx):
    trainer, num_items = TRAINERS[kind](rank, ctx)
    seen = []
    for _ in range(2):
        seen.append(trainer._next_indices(num_items, 1)[0])  # the item (batch, prompt) this step will draw
        trainer.state["position"] -= 1
        trainer.step()
    save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()},
              os.path.join(out_dir, f"rank{rank}.st"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "history": trainer.history}, f)


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_trainer_on_two_ranks(tmp_path, kind):
    if kind == "refl":
        pytest.importorskip("diffusers")
    mp.spawn(_trainer_worker, args=(str(tmp_path), kind), nprocs=WORLD, join=True)
    params = [load_file(tmp_path / f"rank{r}.st") for r in range(WORLD)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert params[0], "the trained parameters were saved"
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), f"{name} differs between ranks: gradients not averaged"
    assert set(reports[0]["seen"]).isdisjoint(reports[1]["seen"]), "ranks must train on different data"
    for a, b in zip(reports[0]["history"], reports[1]["history"]):  # ReFL's noise (and grad_start) is per rank
        assert a["loss"] == b["loss"], "the logged loss is rank-averaged"


def _gdso_worker(rank, out_dir, strategy):
    ctx = _join(rank, out_dir)
    try:
        _gdso_step(rank, out_dir, strategy, ctx)
    finally:
        shutdown_distributed()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _gdso_step(rank, out_dir, strategy, ctx):
    from zreward.experiments.tiny_models import tiny_scorer
    from zreward.training.distributed import broadcast_parameters, wrap_scorer_model
    from zreward.training.gdso import GDSOConfig, GDSOTrainer

    def build():
        scorer = tiny_scorer(rank, {"layer_types": ["full_attention"] * 2})  # rank 0's weights win
        broadcast_parameters(scorer.model)
        scorer.model = wrap_scorer_model(scorer.model, ctx, strategy)
        return scorer

    teacher = build()
    reference = build().model if strategy == "fsdp2" else None  # a sharded policy cannot be deep-copied
    config = GDSOConfig(group_size=2, pairs_per_batch=1, max_new_tokens=3, lr=1e-2, beta=0.05, max_grad_norm=0.5)
    trainer = GDSOTrainer(teacher, TRAIN_DATA, TRAIN_DATA.pairs(), config, ctx=ctx, reference=reference)
    torch.manual_seed(1 + rank)
    metrics = trainer.step()
    grads = {name: _full(p.grad) for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.refresh_reference()  # pi_ref <- pi_theta: into the sharded reference's shards under FSDP2
    copied = all(torch.equal(_full(r), _full(p)) for r, p in zip(trainer.reference.parameters(),
                                                                 trainer.model.parameters()))
    if rank == 0:
        save_file(grads, os.path.join(out_dir, "grads.st"))
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump({"metrics": metrics, "reference_copied": copied}, f)


@pytest.mark.slow
@pytest.mark.skipif(not _fsdp2_runs_on_cpu(), reason="no FSDP2 in this torch")
def test_gdso_gradients_on_fsdp2_match_whole_replicas(tmp_path):
    """One GDSO step on two ranks gives the same clipped gradient with the teacher sharded by FSDP2 as with whole
    replicas: the sharded gradients (already averaged by FSDP2's reduce-scatter) are not all-reduced again, the
    whole LM head's are, and the clip norm adds both; the reference policy is refreshed into its shards. (~1 min:
    two two-rank spawns.)"""
    for strategy in ("ddp", "fsdp2"):
        (tmp_path / strategy).mkdir()
        mp.spawn(_gdso_worker, args=(str(tmp_path / strategy), strategy), nprocs=WORLD, join=True)
    whole = load_file(tmp_path / "ddp" / "grads.st")
    sharded = load_file(tmp_path / "fsdp2" / "grads.st")
    assert whole.keys() == sharded.keys() and "lm_head.weight" in whole
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)
    reports = [json.loads((tmp_path / s / "report.json").read_text()) for s in ("ddp", "fsdp2")]
    assert reports[0]["metrics"]["grad_norm"] > 0.5, "the clip must be active for the test to cover it"
    assert reports[1]["metrics"]["grad_norm"] == pytest.approx(reports[0]["metrics"]["grad_norm"], rel=1e-5)
    assert reports[1]["metrics"]["loss"] == pytest.approx(reports[0]["metrics"]["loss"], rel=1e-5)
    assert reports[0]["reference_copied"] and reports[1]["reference_copied"]


def _risd_worker(rank, out_dir, strategy):
    ctx = _join(rank, out_dir)
    try:
        _risd_step(rank, out_dir, strategy, ctx)
    finally:
        shutdown_distributed()


def _risd_step(rank, out_dir, strategy, ctx):
    from zreward.experiments.tiny_models import tiny_scorer
    from zreward.training.distributed import broadcast_parameters, wrap_scorer_model
    from zreward.training.risd import RISDConfig, RISDTrainer, TeacherCache

    student = tiny_scorer(rank, {})  # a linear-attention and a full-attention layer; rank 0's weights win
    student.model.model.language_model.layers[0].gradient_checkpointing = True  # recomputed under FSDP2 too
    broadcast_parameters(student.model)
    student.model = wrap_scorer_model(student.model, ctx, strategy)
    probs = torch.softmax(torch.randn(len(TRAIN_DATA), 2, 9, generator=torch.Generator().manual_seed(0)), -1)
    cache = TeacherCache(probs, ("realism", "aesthetics"), TRAIN_DATA.prompts(range(len(TRAIN_DATA))), {},
                         torch.linspace(1, 5, 9))
    trainer = RISDTrainer(student, TRAIN_DATA, cache, RISDConfig(batch_size=2, lr=1e-2, max_grad_norm=0.05), ctx=ctx)
    metrics = trainer.step()
    grads = {name: _full(p.grad) for name, p in trainer.model.named_parameters() if p.grad is not None}
    if rank == 0:
        save_file(grads, os.path.join(out_dir, "grads.st"))
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump({"metrics": metrics}, f)


@pytest.mark.slow
@pytest.mark.skipif(not _fsdp2_runs_on_cpu(), reason="no FSDP2 in this torch")
def test_risd_gradients_on_fsdp2_match_whole_replicas(tmp_path):
    """One RISD step on two ranks gives the same clipped gradient with the student sharded by FSDP2 as with whole
    replicas: shared-prefix scoring runs each decoder layer once for the prefix and once per dimension through its
    FSDP2 entry (a gated-delta and an attention layer, one of them recomputed in backward). (~1 min.)"""
    for strategy in ("ddp", "fsdp2"):
        (tmp_path / strategy).mkdir()
        mp.spawn(_risd_worker, args=(str(tmp_path / strategy), strategy), nprocs=WORLD, join=True)
    whole = load_file(tmp_path / "ddp" / "grads.st")
    sharded = load_file(tmp_path / "fsdp2" / "grads.st")
    assert whole.keys() == sharded.keys() and "model.language_model.layers.0.linear_attn.A_log" in whole
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)
    reports = [json.loads((tmp_path / s / "report.json").read_text())["metrics"] for s in ("ddp", "fsdp2")]
    assert reports[0]["grad_norm"] > 0.05, "the clip must be active for the test to cover it"
    assert reports[1]["grad_norm"] == pytest.approx(reports[0]["grad_norm"], rel=1e-5)

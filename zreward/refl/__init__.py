"""ReFL (paper Sec. 5.1, Eq. 20): backpropagate the student's multi-dimensional reward into a diffusers
flow-matching generator through the last K denoising steps, with per-step gradient checkpointing.

    adapter = ZImageAdapter(pipe)                              # or ADAPTERS[name]; SD3/Flux: same protocol
    reward_fn = student_reward_fn(scorer, DIMENSIONS)          # images [B,3,H,W] in [0,1], prompts -> [B, D]
    trainer = ReFLTrainer(adapter, reward_fn, ReFLConfig(...)) # LoRA (peft) or full fine-tuning
    trainer.step(); trainer.validate(); trainer.save(path)  # or trainer.train(...), as GDSO/RISD

``zreward refl --config run.toml`` runs it from the command line (:mod:`zreward.refl.cli`). The names below
load on first use, so registering the subcommand does not import torch or diffusers.
"""
import importlib

from zreward.refl.cli import add_parser

_EXPORTS = {
    "adapters": ("ADAPTERS", "FlowMatchAdapter", "ZImageAdapter", "euler_step", "require_diffusers"),
    "aggregation": ("AGGREGATORS", "get_aggregator", "minimum", "register_aggregator", "soft_min", "weighted_mean"),
    "cli": ("plot_reward_curves", "train"),
    "config": ("ReFLConfig",),
    "models": ("build_adapter", "frozen_scorer", "student_reward_fn"),
    "sampling": ("check_grad_steps", "denoise", "pick_grad_start", "sample_images"),
    "trainer": ("ReFLTrainer", "TrainableParameters", "prepare_generator"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["add_parser", *sorted(_MODULE_OF)]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'zreward.refl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"zreward.refl.{_MODULE_OF[name]}"), name)

"""Z-Reward training layer, one folder per stage of the paper:

* ``zreward.scoring`` - score vocabulary, rubric, Qwen-VL image processing and :class:`RewardScorer` (Sec. 3);
* ``zreward.training`` - :class:`TrainerBase`, :class:`GDSOTrainer` (Algorithm 1), :class:`RISDTrainer` and
  :class:`TeacherCache` (Algorithm 2), safetensors checkpoints, torch.distributed helpers (Sec. 4);
* ``zreward.train`` - ``zreward train teacher|student``: :func:`train_teacher` / :func:`train_student` from an
  annotation file and a local model folder to a model folder, configured by :class:`TeacherConfig` /
  :class:`StudentConfig`;
* ``zreward.refl`` - :class:`ReFLTrainer`: the student reward backpropagated into a diffusers generator (Sec. 5.1);
* ``zreward.deploy`` - model folders, ``zreward score`` / ``rank`` / ``serve``, adapters for RL trainers;
* ``zreward.experiments`` - synthetic data, tiny models, ``zreward demo`` and ``zreward ablate``;
* ``zreward.data``, ``zreward.metrics``, ``zreward.evaluate``, ``zreward.cli`` at the top.

The names below import from here (``from zreward import RewardScorer, GDSOTrainer``); each loads its module on
first use, so ``import zreward`` (and ``zreward --help``) does not import transformers or diffusers.
"""
import importlib

_EXPORTS = {
    "zreward.scoring.vocab": ("ScoreVocab",),
    "zreward.scoring.rubric": ("DIMENSIONS", "ANSWER_PREFIX"),
    "zreward.scoring.scorer": ("RewardScorer", "Rollouts", "ScoringProcessor"),
    "zreward.training.base": ("TrainerBase",),
    "zreward.training.gdso": ("GDSOConfig", "GDSOTrainer"),
    "zreward.training.risd": ("RISDConfig", "RISDTrainer", "TeacherCache"),
    "zreward.training.checkpoint": ("save_checkpoint", "load_checkpoint", "latest_checkpoint"),
    "zreward.training.distributed": ("DistContext", "init_distributed", "shutdown_distributed", "wrap_model"),
    "zreward.train.config": ("TeacherConfig", "StudentConfig"),
    "zreward.train.run": ("train_teacher", "train_student"),
    "zreward.refl.config": ("ReFLConfig",),
    "zreward.refl.trainer": ("ReFLTrainer",),
    "zreward.deploy.model_folder": ("save_model_folder", "load_model_folder"),
    "zreward.deploy.adapters": ("RewardClient",),
    "zreward.data": ("Annotation", "load_annotations"),
    "zreward.metrics": ("plcc", "srcc", "hpa", "margin_hpa", "gsb", "reward_metrics"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'zreward' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))

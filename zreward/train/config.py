"""Run configurations of ``zreward train teacher`` and ``zreward train student``: flat dataclasses read from TOML or
JSON, with unknown keys and values of the wrong type errors that name the key and the file.

:class:`TeacherConfig` is a :class:`~zreward.training.gdso.GDSOConfig` and :class:`StudentConfig` a
:class:`~zreward.training.risd.RISDConfig`, each with the keys of a run (model folder, data, LoRA, scale-out,
outputs) added: every trainer hyperparameter is a key of the file as the trainer defines it, and the config is
what the trainer gets. Every key is documented by the comment beside its field, where it is defined
(:func:`field_docs` reads them; ``zreward train teacher --print-config`` prints them as a TOML template).
"""
from __future__ import annotations

import io
import inspect
import json
import tokenize
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from zreward.engines import ENGINES
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import ATTN_IMPLEMENTATIONS
from zreward.scoring.vocab import DEFAULT_SCORE_TEXTS, DEFAULT_VALUES
from zreward.training.gdso import GDSOConfig
from zreward.training.risd import RISDConfig

DTYPES = ("bfloat16", "float32")
STRATEGIES = ("ddp", "fsdp2")
FINAL_MODELS = ("best", "last")
# Qwen3.5 / Qwen3-VL language-model projections: attention, MLP and the gated delta net's input/output ones.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "in_proj_qkv", "in_proj_z", "out_proj")


@dataclass
class RunConfig:
    """The keys every ``zreward train`` run has (model folder, data, fine-tuning, scale-out, outputs)."""

    base_model: str = ""  # local transformers folder (Qwen3.5 or Qwen3-VL: weights, tokenizer, image processor)
    data: str = ""  # annotation JSONL (zreward.data): trains on its "train" split, evaluates on its "val" split
    output_dir: str = ""  # checkpoints, log.jsonl, curves.png and the final model folder go here
    dtype: str = "bfloat16"  # weights and compute: "bfloat16" or "float32" (LoRA adapters stay float32)
    attn_implementation: str = "sdpa"  # "sdpa", "eager" or "flash_attention_2" (needs flash-attn)
    gradient_checkpointing: bool = True  # recompute each decoder layer in backward instead of storing it
    lora_rank: int = 64  # LoRA rank (peft) on the language model; 0: full fine-tuning of every weight
    lora_alpha: float = 128.0  # LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # projections
    #   of the language model that get adapters (the vision tower is never adapted)
    score_texts: list[str] = field(default_factory=lambda: list(DEFAULT_SCORE_TEXTS))  # the score tokens, each
    #   one token of base_model's tokenizer (checked before training)
    score_values: list[float] = field(default_factory=lambda: list(DEFAULT_VALUES))  # the score of each text,
    #   increasing; every annotated score must lie in their range
    image_size: list[int] | None = None  # [height, width] every image is resized to when read (antialiased
    #   bicubic); unset: images are used at their own size, which must then be one size for the whole file
    strategy: str = "ddp"  # several ranks: "ddp" (whole model on every rank) or "fsdp2" (blocks sharded)
    engine: str = "hf"  # samples the teacher's reasoning: "hf" (transformers generate) or "vllm"
    engine_memory_fraction: float = 0.5  # engine = "vllm": share of the GPU's memory the engine may take
    engine_max_model_len: int = 0  # engine = "vllm": longest sequence the engine serves (its KV cache is sized
    #   for it); 0: the model's own context length
    engine_enforce_eager: bool = False  # engine = "vllm": no CUDA graphs or compilation (a faster start)
    device: str | None = None  # "cuda" (each rank its cuda:LOCAL_RANK), "cpu"; unset: cuda when available
    eval_every: int = 50  # steps between evaluations on the val split (and before the first step); 0: never
    eval_batch_size: int = 8  # val images per forward pass (per rank)
    save_every: int = 100  # steps between checkpoints (one is always written at the end)
    final_model: str = "best"  # model folder written at the end: "best" (highest val HPA) or "last"


@dataclass
class TeacherConfig(RunConfig, GDSOConfig):
    """``zreward train teacher``: GDSO (Algorithm 1) on the same-prompt pairs of the train split."""

    min_gap: float = 0.0  # a training pair's ground-truth scores must differ by more than this
    max_new_tokens: int = 1024  # reasoning tokens sampled per output at most (the paper's average about 750)
    eval_samples: int = 2  # reasoning rollouts per val image; their expected scores (Eq. 6) are averaged
    output_dir: str = "zreward-teacher"
    strategy: str = "fsdp2"


@dataclass
class StudentConfig(RunConfig, RISDConfig):
    """``zreward train student``: RISD (Algorithm 2): the teacher's distributions cached once, then distilled."""

    teacher_model: str = ""  # model folder of the teacher (what zreward train teacher wrote)
    teacher_cache_dir: str | None = None  # where the teacher's distributions are cached (unset:
    #   <output_dir>/teacher_cache); reused while the teacher, the train images and the teacher_* keys are unchanged
    teacher_batch_size: int = 8  # images per teacher rollout batch while building the cache
    teacher_dtype: str | None = None  # the teacher's weights while building the cache: "bfloat16" or "float32";
    #   unset: dtype
    dimensions: list[str] = field(default_factory=lambda: list(DIMENSIONS))  # dimensions the student learns:
    #   every train image is scored by the teacher on each
    teacher_max_new_tokens: int = 1024  # teacher reasoning tokens per rollout at most
    output_dir: str = "zreward-student"


RESUMABLE_KEYS = {"steps", "iterations", "steps_per_iteration", "eval_every", "save_every", "output_dir"}


def load_config(cls, path):
    """A ``cls`` (:class:`TeacherConfig` or :class:`StudentConfig`) from a ``.toml`` or ``.json`` file; a key the
    class lacks, a value of the wrong type or a missing required key is a ``ValueError`` naming it and the file."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"config must be a .toml or .json file, got {path}")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the config ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a table of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown} for {cls.__name__} "
                         f"(zreward train {role(cls)} --print-config lists every key)")
    config = cls(**data)
    check_config(config, source=str(path))
    return config


def role(cls) -> str:
    return "teacher" if issubclass(cls, TeacherConfig) else "student"


def check_config(config, source: str = "config") -> None:
    """``ValueError`` naming ``source`` and the key for a value of the wrong type or out of range."""
    problems = [f"{name}: {problem}" for name, problem in _type_problems(config)]
    if not problems:
        problems = _value_problems(config)
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def _type_problems(config) -> list[tuple[str, str]]:
    hints = typing.get_type_hints(type(config))
    return [(f.name, f"expected {_type_name(hints[f.name])}, got {getattr(config, f.name)!r}")
            for f in fields(config) if not _matches(getattr(config, f.name), hints[f.name])]


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return "none" if annotation is type(None) else annotation.__name__


def _value_problems(config) -> list[str]:
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(bool(config.base_model), "base_model is required (a local transformers model folder)")
    need(bool(config.data), "data is required (an annotation JSONL file)")
    need(bool(config.output_dir), "output_dir must not be empty")
    for name, choices in (("dtype", DTYPES), ("attn_implementation", ATTN_IMPLEMENTATIONS),
                          ("strategy", STRATEGIES), ("engine", ENGINES), ("final_model", FINAL_MODELS)):
        need(getattr(config, name) in choices, f"{name} must be one of {choices}, got {getattr(config, name)!r}")
    need(config.lora_rank >= 0, f"lora_rank must be >= 0 (0: full fine-tuning), got {config.lora_rank}")
    need(config.lora_rank == 0 or bool(config.lora_target_modules), "lora_target_modules must not be empty")
    need(0 <= config.lora_dropout < 1, f"lora_dropout must lie in [0, 1), got {config.lora_dropout}")
    need(len(config.score_texts) == len(config.score_values) >= 2,
         "score_texts and score_values must have the same length, at least 2")
    need(all(b > a for a, b in zip(config.score_values, config.score_values[1:])),
         f"score_values must increase, got {config.score_values}")
    need(config.image_size is None or (len(config.image_size) == 2 and min(config.image_size) >= 1),
         f"image_size must be [height, width] of positive ints, got {config.image_size}")
    need(0 < config.engine_memory_fraction < 1,
         f"engine_memory_fraction must lie in (0, 1), got {config.engine_memory_fraction}")
    need(config.engine_max_model_len >= 0, f"engine_max_model_len must be >= 0, got {config.engine_max_model_len}")
    for name in ("eval_every", "save_every"):
        need(getattr(config, name) >= 0, f"{name} must be >= 0, got {getattr(config, name)}")
    need(config.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {config.eval_batch_size}")
    if isinstance(config, TeacherConfig):
        from zr_kernels.group_advantages import SCALES
        from zreward.training.gdso import AGGREGATIONS, POLICY_BACKENDS, REWARD_SOURCES

        for name, choices in (("aggregation", AGGREGATIONS), ("reward_source", REWARD_SOURCES),
                              ("advantage_scale", SCALES), ("policy_backend", POLICY_BACKENDS)):
            need(getattr(config, name) in choices, f"{name} must be one of {choices}, got {getattr(config, name)!r}")
        need(config.min_gap >= 0, f"min_gap must be >= 0, got {config.min_gap}")
        need(config.eval_samples >= 1, f"eval_samples must be >= 1, got {config.eval_samples}")
        for name in ("group_size", "pairs_per_batch", "max_new_tokens", "iterations", "steps_per_iteration",
                     "updates_per_batch"):
            need(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    else:
        need(bool(config.teacher_model), "teacher_model is required (the teacher's model folder)")
        unknown = [d for d in config.dimensions if d not in DIMENSIONS]
        need(bool(config.dimensions) and not unknown and len(set(config.dimensions)) == len(config.dimensions),
             f"dimensions must be distinct names from {DIMENSIONS}, got {config.dimensions}")
        for name in ("steps", "batch_size", "teacher_samples", "teacher_max_new_tokens", "teacher_batch_size"):
            need(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
        need(config.teacher_dtype in (None, *DTYPES),
             f"teacher_dtype must be one of {DTYPES} (or unset), got {config.teacher_dtype!r}")
    return problems


def changed_keys(saved: dict, config) -> list[str]:
    """Keys whose value in ``config`` differs from the run's saved ``config.json`` (``saved``), besides those a
    resumed run may change (step counts and intervals)."""
    now = asdict(config)
    return sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k))


def field_docs(cls) -> dict[str, str]:
    """``{key: doc}`` for every field of the dataclass ``cls``: the comment beside the field where it is defined
    (the nearest class in the MRO that declares it), continued by comment lines that follow it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" in vars(klass):
            docs.update(_class_comments(klass))
    return {f.name: docs.get(f.name, "") for f in fields(cls)}


def _class_comments(klass) -> dict[str, str]:
    source = inspect.getsource(klass)
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    docs = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        own = vars(klass).get("__annotations__", {})
        if ":" not in line or not name.isidentifier() or name not in own or number not in comments:
            continue
        parts = [comments[number]]
        following = number + 1
        while following <= len(lines) and lines[following - 1].strip().startswith("#") and following in comments:
            parts.append(comments[following])
            following += 1
        docs[name] = " ".join(parts)
    return docs


def config_template(cls) -> str:
    """Every key of ``cls`` with its default and its documentation, as a TOML file to start a config from: the
    run's keys, then those of the role, then the trainer's."""
    docs = field_docs(cls)
    out = [f"# zreward train {role(cls)}: {cls.__doc__.splitlines()[0].split(': ', 1)[-1]}",
           "# Keys left out keep the default shown. Required: " +
           ", ".join(k for k in ("base_model", "data", "teacher_model") if k in docs) + "."]
    trainer = next(k for k in cls.__mro__[1:] if k is not RunConfig and "__dataclass_fields__" in vars(k))
    groups = (("every zreward train run", RunConfig), (f"zreward train {role(cls)}", cls),
              (f"{trainer.__name__} ({trainer.__module__})", trainer))
    for title, klass in groups:
        out.append(f"\n# ---- {title} ----")
        for f in fields(cls):
            if _owner(cls, f.name) is not klass:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            out.append(f"\n# {docs[f.name]}")
            out.append(f"{f.name} = {_toml_value(default)}" if default is not None else f"# {f.name} = (unset)")
    return "\n".join(out) + "\n"


def _owner(cls, name: str):
    """The most basic class of ``cls``'s MRO that declares the field ``name`` (RunConfig, the trainer's config, or
    ``cls`` itself for its own keys)."""
    return [k for k in cls.__mro__ if name in vars(k).get("__annotations__", {})][-1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)

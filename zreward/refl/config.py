"""ReFL run configuration: a flat dataclass read from JSON or TOML (``tomllib``); unknown keys are errors."""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from zreward.refl.adapters import ADAPTERS
from zreward.refl.aggregation import get_aggregator
from zreward.refl.sampling import check_grad_steps
from zreward.scoring.rubric import DIMENSIONS

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ReFLConfig:
    # models: tiny random-weight components built from configs, or pretrained paths
    tiny: bool = False  # a tiny random-weight Z-Image generator (and, without scorer_path, a random student)
    pipeline: str = "z-image"
    model_path: str | None = None  # diffusers pipeline directory or hub id (read from the local cache)
    scorer_path: str | None = None  # student reward model folder (e.g. `zreward demo`'s <output-dir>/student)
    dtype: str = "bfloat16"
    device: str | None = None  # None: cuda when available
    # prompts: inline lists or text files with one prompt per line
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    val_prompts: list[str] = field(default_factory=list)
    val_prompts_file: str | None = None
    # reward (Eq. 20)
    dimensions: list[str] = field(default_factory=lambda: list(DIMENSIONS))
    aggregation: str = "weighted_mean"
    aggregation_weights: list[float] | None = None
    soft_min_temperature: float = 0.5
    # sampling
    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 8
    grad_steps: int = 1  # K: the gradient flows through the last K denoising steps
    random_start: bool = True  # start the gradient at a random step of the last-K window
    guidance_scale: float = 0.0
    max_sequence_length: int = 512
    gradient_checkpointing: bool = True  # per denoising step and for the VAE decode
    transformer_checkpointing: bool = False  # additionally per transformer block (diffusers' own)
    # optimisation
    lora_rank: int = 64  # 0: train every transformer parameter
    lora_alpha: float = 64.0
    batch_size: int = 1
    max_steps: int = 1000
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # outputs
    output_dir: str = "refl-out"
    val_every: int = 50
    save_every: int = 200

    def __post_init__(self):
        if self.pipeline not in ADAPTERS:
            raise ValueError(f"pipeline must be one of {tuple(ADAPTERS)}, got {self.pipeline!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.tiny and not (self.model_path and self.scorer_path):
            raise ValueError("model_path and scorer_path are required unless tiny = true")
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown or not self.dimensions:
            raise ValueError(f"dimensions must be a non-empty subset of {DIMENSIONS}, got {self.dimensions}")
        get_aggregator(self.aggregation)
        if self.aggregation_weights is not None and len(self.aggregation_weights) != len(self.dimensions):
            raise ValueError(f"aggregation_weights needs one weight per dimension ({len(self.dimensions)}), "
                             f"got {len(self.aggregation_weights)}")
        check_grad_steps(self.grad_steps, self.num_inference_steps)
        for name in ("height", "width", "num_inference_steps", "batch_size", "max_steps", "val_every",
                     "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if not self.train_prompts():
            raise ValueError("no training prompts: set prompts or prompts_file")

    @classmethod
    def from_file(cls, path) -> "ReFLConfig":
        path = Path(path)
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"config must be a .json or .toml file, got {path.name}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} in {path}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def train_prompts(self) -> list[str]:
        return self.prompts + _read_lines(self.prompts_file)

    def validation_prompts(self) -> list[str]:
        return (self.val_prompts + _read_lines(self.val_prompts_file)) or self.train_prompts()

    def aggregation_kwargs(self) -> dict:
        return {"temperature": self.soft_min_temperature} if self.aggregation == "soft_min" else {}


def _read_lines(path: str | None) -> list[str]:
    if not path:
        return []
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]

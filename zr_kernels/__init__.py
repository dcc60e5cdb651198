"""Fused score-distribution ops for Z-Reward (Triton kernels, a CUDA extension, PyTorch references)."""
from zr_kernels import reference
from zr_kernels._backend import BACKEND_ENV_VAR, trace_backends
from zr_kernels._types import PairGap, ScoreDist
from zr_kernels.group_advantages import group_advantages
from zr_kernels.score_distribution import score_distribution

__all__ = [
    "BACKEND_ENV_VAR",
    "PairGap",
    "ScoreDist",
    "group_advantages",
    "reference",
    "score_distribution",
    "trace_backends",
]

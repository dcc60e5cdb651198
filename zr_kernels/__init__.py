"""Fused score-distribution ops for Z-Reward (Triton kernels, a CUDA extension, PyTorch references)."""
from zr_kernels import reference
from zr_kernels._backend import BACKEND_ENV_VAR, cuda_extension_available, interpreter_enabled, trace_backends
from zr_kernels._types import PairGap, ScoreDist
from zr_kernels.group_advantages import group_advantages
from zr_kernels.linear_score import ScoreHead, linear_score
from zr_kernels.pairwise_gap import PairwiseGapLoss, gdso_rewards, pairwise_gap
from zr_kernels.score_distribution import score_distribution
from zr_kernels.slice_kl import SliceKLLoss, slice_kl

__all__ = [
    "BACKEND_ENV_VAR",
    "PairGap",
    "PairwiseGapLoss",
    "ScoreDist",
    "ScoreHead",
    "SliceKLLoss",
    "cuda_extension_available",
    "gdso_rewards",
    "group_advantages",
    "interpreter_enabled",
    "linear_score",
    "pairwise_gap",
    "reference",
    "score_distribution",
    "slice_kl",
    "trace_backends",
]

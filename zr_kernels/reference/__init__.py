"""Pure-PyTorch twins of every fused op, with the same signatures (minus ``backend``).

They are the ground truth for the tests and the eager / ``torch.compile`` baselines of the benchmarks.
"""
from zr_kernels.reference.group_advantages import group_advantages
from zr_kernels.reference.linear_score import linear_score
from zr_kernels.reference.pairwise_gap import gdso_rewards, pairwise_gap
from zr_kernels.reference.score_distribution import score_distribution
from zr_kernels.reference.slice_kl import slice_kl

__all__ = ["gdso_rewards", "group_advantages", "linear_score", "pairwise_gap", "score_distribution", "slice_kl"]

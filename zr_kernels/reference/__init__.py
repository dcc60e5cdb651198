"""Pure-PyTorch twins of every fused op, with the same signatures (minus ``backend``).

They are the ground truth for the tests and the eager / ``torch.compile`` baselines of the benchmarks.
"""
from zr_kernels.reference.group_advantages import group_advantages
from zr_kernels.reference.score_distribution import score_distribution

__all__ = ["group_advantages", "score_distribution"]

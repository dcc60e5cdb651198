"""pairwise_gap (Eq. 11 loss + Eq. 10 rewards, fwd+bwd) and gdso_rewards (Eq. 13, forward only).

Inputs are ``[P, G]`` expected scores; the eager reference materialises the ``[P, G, G]`` difference tensor
that the fused kernel never forms, so the gap grows with ``G``. These ops are small and launch-bound, so no
GB/s is reported.
"""
from __future__ import annotations

import zr_kernels
from benchmarks.harness import Case, Config, compile_provider, eager_provider, no_liger, randn, triton_provider
from zr_kernels import reference

OP = "pairwise_gap"
SCORE_MIN, SCORE_MAX = 1.0, 5.0


def _gap_triton(mu_w, mu_l, gap):
    return zr_kernels.pairwise_gap(mu_w, mu_l, gap, SCORE_MAX - SCORE_MIN, backend="triton")


def _gap_eager(mu_w, mu_l, gap):
    return reference.pairwise_gap(mu_w, mu_l, gap, SCORE_MAX - SCORE_MIN)


def _rewards_triton(mu_w, mu_l, s_w, s_l):
    return zr_kernels.gdso_rewards(mu_w, mu_l, s_w, s_l, SCORE_MIN, SCORE_MAX, 0.5, 0.5, backend="triton")


def _rewards_eager(mu_w, mu_l, s_w, s_l):
    return reference.gdso_rewards(mu_w, mu_l, s_w, s_l, SCORE_MIN, SCORE_MAX, 0.5, 0.5)


def _scores(pairs: int, group_size: int, config: Config, requires_grad: bool):
    def score(*shape):
        return (randn(*shape, config=config) + 3.0).clamp(SCORE_MIN, SCORE_MAX).requires_grad_(requires_grad)

    return score(pairs, group_size), score(pairs, group_size)


def _gap_case(pairs: int, group_size: int, config: Config, headline: bool) -> Case:
    def make_inputs():
        mu_w, mu_l = _scores(pairs, group_size, config, requires_grad=True)
        return {"mu_w": mu_w, "mu_l": mu_l, "gap": randn(pairs, config=config)}

    return Case(
        op=OP, label=f"P={pairs} G={group_size} fp32", make_inputs=make_inputs,
        providers=[
            triton_provider(_gap_triton, config),
            eager_provider(_gap_eager),
            compile_provider(_gap_eager, config),
            no_liger("no pairwise-gap loss"),
        ],
        grad=("mu_w", "mu_l"), series=f"pairwise_gap G={group_size}", x=pairs, x_name="P (pairs)",
        headline=headline,
        params={"P": pairs, "G": group_size, "dtype": "fp32"},
    )


def _rewards_case(pairs: int, group_size: int, config: Config) -> Case:
    def make_inputs():
        mu_w, mu_l = _scores(pairs, group_size, config, requires_grad=False)
        s_w, s_l = _scores(pairs, 1, config, requires_grad=False)
        return {"mu_w": mu_w, "mu_l": mu_l, "s_w": s_w[:, 0], "s_l": s_l[:, 0]}

    return Case(
        op="gdso_rewards", label=f"gdso_rewards P={pairs} G={group_size} fp32", make_inputs=make_inputs,
        providers=[
            triton_provider(_rewards_triton, config),
            eager_provider(_rewards_eager),
            compile_provider(_rewards_eager, config),
            no_liger("no GDSO reward op"),
        ],
        series=f"gdso_rewards G={group_size}", x=pairs, x_name="P (pairs)",
        params={"P": pairs, "G": group_size, "dtype": "fp32"},
    )


def cases(config: Config) -> list:
    if config.smoke:
        return [_gap_case(7, 4, config, headline=False), _gap_case(33, 8, config, headline=True),
                _rewards_case(33, 8, config)]
    gap_cases = [_gap_case(pairs, group, config, headline=(pairs, group) == (4096, 16))
                 for group in (4, 8, 16) for pairs in (256, 1024, 4096)]
    return gap_cases + [_rewards_case(pairs, 16, config) for pairs in (256, 1024, 4096)]

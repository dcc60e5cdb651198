"""Memory per rank of a training step, estimated from the model's architecture (``zreward train ... --dry-run``).

:func:`estimate_memory` takes a model built on the meta device (parameters in their training dtype, the trainable
ones marked by ``requires_grad``, LoRA applied or not) and returns a :class:`MemoryEstimate` in bytes per rank::

    total = weights + gradients + optimizer + activations + engine

With ``P`` the parameter bytes, ``T`` the trainable parameter bytes, ``W`` the number of ranks:

* **weights** - ``"none"`` / ``"ddp"``: ``P`` (every rank holds a replica). ``"fsdp2"``, as
  :func:`~zreward.training.distributed.wrap_scorer_model` shards (each decoder layer and vision block of the inner
  model one unit, the inner model the root; the LM head, whose score rows the scorer reads directly, and anything
  tied to it whole on every rank): ``(P - P_whole) / W`` + the root's parameters in full (embeddings, final norm,
  vision patch embedding and merger: FSDP2 keeps the root unsharded from forward to the end of backward) + two
  units unsharded (the one computing and the one prefetched) + ``P_whole``.
* **gradients** - ``"none"``: ``T``; ``"ddp"``: ``2 T`` (the ``.grad`` tensors and DDP's flat all-reduce buckets);
  ``"fsdp2"``: ``(T - T_whole) / W`` + the root's trainable bytes + one unit's trainable bytes (unsharded before
  their reduce-scatter; the root's only at the end of backward, so adding them to the activations' peak is an upper
  bound) + ``T_whole``.
* **optimizer** - AdamW's ``exp_avg`` and ``exp_avg_sq`` per trainable parameter, in the parameter's dtype as
  ``torch.optim.AdamW`` allocates them (``optimizer_dtype`` overrides it, e.g. fp32 moments): ``2 x`` trainable
  elements ``x`` state bytes, ``/ W`` under FSDP2 except for the whole parameters' moments.
* **activations** - what autograd keeps for backward in one step over ``batch_size`` sequences of ``seq_len``
  tokens (``N = batch_size x seq_len``), with ``b`` the bytes of the activation dtype (the embeddings' dtype) and
  ``f = 4`` (the fp32 intermediates of norms and of the linear attention). Per token and decoder layer:

  - both RMSNorms: ``2 x 2 f H`` (the fp32 input and the fp32 normalised output of each);
  - MLP: ``b (H + 4 I)`` (its input, gate, act(gate), up and their product);
  - full attention (``A = heads x head_dim``, ``Kv = kv_heads x head_dim``): ``b (H + 3 A + 2 A_kv)`` (input,
    query, output and the o_proj input; ``A_kv = A`` when grouped-query heads are repeated for SDPA, as
    transformers does with a padding mask) + ``f (2 A + 2 Kv + heads)`` (the q/k norms in fp32, the log-sum-exp),
    + ``2 b A`` for Qwen3.5's output gate (sigmoid(gate) and the gated product); plus the ``[seq_len, seq_len]``
    fp32 attention mask per sequence, once for all layers;
  - Gated DeltaNet linear attention, transformers' chunked path (chunk ``c = 64``; ``K = key_heads x key_dim``,
    ``V = value_heads x value_dim``, ``Kr = value_heads x key_dim``, ``h`` value heads): ``b (H + 2 (2K + V) + 3 V
    + h)`` (projection input, the convolution's input and output, z, the gated norm and out_proj inputs) +
    ``f (7 Kr + 6 V + 5 h c + h key_dim value_dim / c)`` (fp32 queries, keys and values through the chunked delta
    rule, its ``c x c`` intra-chunk matrices and one recurrent state per chunk);

  the vision tower, per patch (``image_tokens x merge^2`` patches per sequence) and block: ``b (9 Hv + 2 Iv)``
  (two LayerNorms, qkv, rotary q/k, attention, proj, MLP) plus ``4 b Hv`` per patch for the merger; the final
  norm ``2 f H + b H`` per token; and the fp32 logits of the policy term's chunked log-probs, ``3 x chunk x V_vocab
  x f`` (the logits, their log-softmax and its gradient in backward).

  With ``gradient_checkpointing`` every layer and block keeps only its input (``b H`` per token, ``b Hv`` per
  patch), and backward recomputes one at a time: the stored inputs + the largest layer's (or block's) activations.
  Backward also holds the activation gradients of the part it runs through: per token ``b (2 H + 3 I)`` in the
  MLP, or ``3 f h c`` in the linear attention's chunk matrices, whichever is larger.

  GDSO's rollouts carry their image each, so ``batch_size`` is the number of rollout rows (2 x pairs x G) and the
  vision tower runs once per row. The linear-attention terms are those of transformers' own chunked PyTorch path;
  fused kernels (flash-linear-attention) keep fewer fp32 intermediates, and the estimate is an upper bound there.
  Not counted: ``generate``'s cache while sampling (before the step, and freed with it: full-attention KV and
  recurrent states, far below the step's activations at the paper's lengths).
* **engine** - a colocated vLLM engine takes ``engine_memory_fraction`` of the device (its
  ``gpu_memory_utilization``): weights, KV cache and all.

tests/test_memory.py checks the activation terms per layer against the tensors autograd saves, and the total
against the peak measured on a tiny model's GDSO step; docs/training-memory.md has the figures for the paper's
Qwen3.5-27B teacher and 9B student.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zreward.training.distributed import STRATEGIES, fsdp_units

FP32 = 4
LINEAR_ATTENTION_CHUNK = 64  # transformers' torch_chunk_gated_delta_rule
GIB = 2 ** 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of each part of a training step (:func:`estimate_memory`); ``terms`` says how each was
    formed, for :meth:`table`."""

    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    engine: int
    device_memory: int | None
    terms: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.engine

    @property
    def fits(self) -> bool | None:
        """Whether the total fits the device (None when its memory is unknown)."""
        return None if self.device_memory is None else self.total <= self.device_memory

    def table(self) -> str:
        """Printable rows: each part in GiB with the terms it was formed from, the total and the verdict."""
        rows = [("parameters", f"{self.total_params / 1e9:.3f} B",
                 f"{self.trainable_params / 1e9:.4f} B trainable ({100 * self.trainable_params / max(self.total_params, 1):.2f} %)")]
        for name in ("weights", "gradients", "optimizer", "activations", "engine"):
            rows.append((name, f"{getattr(self, name) / GIB:.2f} GiB", self.terms.get(name, "")))
        rows.append(("total", f"{self.total / GIB:.2f} GiB", "per rank"))
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(("device", f"{self.device_memory / GIB:.2f} GiB", verdict))
        width = max(len(r[0]) for r in rows)
        size = max(len(r[1]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value:>{size}}  {how}".rstrip() for name, value, how in rows)


def estimate_memory(model: torch.nn.Module, *, world_size: int, strategy: str, batch_size: int, seq_len: int,
                    gradient_checkpointing: bool, engine_memory_fraction: float = 0.0,
                    device_memory: int | None = None, image_tokens: int = 0, logprob_chunk: int = 256,
                    optimizer_dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Memory per rank of one training step of ``model`` (see the module docstring for the formula).

    ``batch_size`` sequences of ``seq_len`` tokens per rank, of which ``image_tokens`` are image placeholders
    (the vision tower then sees ``image_tokens x spatial_merge_size^2`` patches per sequence); ``logprob_chunk``
    positions of full-vocabulary logits at a time in GDSO's policy term (0 for a loss on the score tokens alone,
    as RISD's); ``engine_memory_fraction`` of
    ``device_memory`` for a colocated vLLM engine; ``optimizer_dtype`` for AdamW's moments (default: each
    parameter's own dtype, as ``torch.optim.AdamW``).
    """
    _check_int("world_size", world_size, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("image_tokens", image_tokens, 0)
    _check_int("logprob_chunk", logprob_chunk, 0)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be a bool, got {type(gradient_checkpointing).__name__}")
    if not 0.0 <= engine_memory_fraction < 1.0:
        raise ValueError(f"engine_memory_fraction must be in [0, 1), got {engine_memory_fraction!r}")
    if device_memory is not None:
        _check_int("device_memory", device_memory, 1)
    if engine_memory_fraction > 0 and device_memory is None:
        raise ValueError("engine_memory_fraction needs device_memory (the engine takes a fraction of the device)")
    if image_tokens > seq_len:
        raise ValueError(f"image_tokens ({image_tokens}) must not exceed seq_len ({seq_len})")

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = _unique_parameters(model)
    total_params = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    param_bytes = sum(_nbytes(p) for p in params)
    trainable_bytes = sum(_nbytes(p) for p in trainable)
    state_bytes = _state_bytes(trainable, optimizer_dtype)
    terms = {}

    if strategy == "fsdp2" and world_size > 1:
        # As wrap_scorer_model shards: the inner model is the root unit, its blocks the units; what lies outside it
        # (the LM head) and what it shares with the outside (tied embeddings) stays whole on every rank.
        inner = base.model
        inside = {id(module) for module in inner.modules()}
        outside = {id(p) for module in model.modules() if id(module) not in inside
                   for p in module.parameters(recurse=False)}
        whole = [p for p in params if id(p) in outside]
        units = fsdp_units(inner)
        in_units = {id(p) for unit in units for p in unit.parameters()}
        root = [p for p in params if id(p) not in in_units and id(p) not in outside]
        whole_bytes, whole_trainable = _bytes(whole), _bytes(p for p in whole if p.requires_grad)
        whole_state = _state_bytes([p for p in whole if p.requires_grad], optimizer_dtype)
        root_bytes, root_trainable = _bytes(root), _bytes(p for p in root if p.requires_grad)
        unit_bytes = max((_bytes(unit.parameters()) for unit in units), default=0)
        unit_trainable = max((_bytes(p for p in unit.parameters() if p.requires_grad) for unit in units), default=0)
        weights = _ceil_div(param_bytes - whole_bytes, world_size) + root_bytes + 2 * unit_bytes + whole_bytes
        gradients = (_ceil_div(trainable_bytes - whole_trainable, world_size) + root_trainable + unit_trainable
                     + whole_trainable)
        optimizer = _ceil_div(state_bytes - whole_state, world_size) + whole_state
        terms["weights"] = (f"{_g(param_bytes - whole_bytes)} / {world_size} + root {_g(root_bytes)} + 2 units x "
                            f"{_g(unit_bytes)} + whole {_g(whole_bytes)}")
        terms["gradients"] = (f"{_g(trainable_bytes - whole_trainable)} / {world_size} + root {_g(root_trainable)} "
                              f"+ 1 unit {_g(unit_trainable)} + whole {_g(whole_trainable)}")
        terms["optimizer"] = (f"AdamW 2 moments {_g(state_bytes - whole_state)} / {world_size} + whole "
                              f"{_g(whole_state)}")
    else:
        weights, optimizer = param_bytes, state_bytes
        gradients = (2 if strategy == "ddp" and world_size > 1 else 1) * trainable_bytes
        terms["weights"] = f"{_g(param_bytes)} replicated"
        terms["gradients"] = (f"2 x {_g(trainable_bytes)} (grads + DDP buckets)" if gradients != trainable_bytes
                              else f"{_g(trainable_bytes)}")
        terms["optimizer"] = f"AdamW 2 moments {_g(state_bytes)}"

    activations, terms["activations"] = _activations(base, batch_size, seq_len, image_tokens, logprob_chunk,
                                                     gradient_checkpointing)
    engine = int(engine_memory_fraction * device_memory) if engine_memory_fraction > 0 else 0
    terms["engine"] = f"{engine_memory_fraction:g} x device" if engine else "none colocated"
    return MemoryEstimate(total_params, trainable_params, weights, gradients, optimizer, activations, engine,
                          device_memory, terms)


def _activations(model, batch_size: int, seq_len: int, image_tokens: int, logprob_chunk: int,
                 checkpointing: bool) -> tuple[int, str]:
    """Activation bytes of one step (module docstring) and how they add up."""
    hidden = model.config.get_text_config().hidden_size
    b = model.get_input_embeddings().weight.element_size()
    tokens = batch_size * seq_len
    decoder = list(model.model.language_model.layers)
    per_layer = [tokens * _decoder_layer_bytes(layer, hidden, b, seq_len) for layer in decoder]
    stored = [tokens * b * hidden] * len(decoder)  # what a checkpointed layer keeps: its input
    vision = getattr(model.config, "vision_config", None)
    merger = 0
    if vision is not None and image_tokens:
        patches = batch_size * image_tokens * vision.spatial_merge_size ** 2
        per_layer += [patches * b * (9 * vision.hidden_size + 2 * vision.intermediate_size)] * vision.depth
        stored += [patches * b * vision.hidden_size] * vision.depth
        merger = patches * 4 * b * vision.hidden_size
    if checkpointing:
        body = sum(stored) + max(per_layer)
        how = f"checkpointed: inputs {_g(sum(stored))} + one layer {_g(max(per_layer))}"
    else:
        body = sum(per_layer)
        how = f"{len(per_layer)} layers and blocks {_g(body)}"
    backward = tokens * max(_backward_bytes(layer, hidden, b) for layer in decoder)
    mask = batch_size * seq_len * seq_len * FP32 if any(hasattr(layer, "self_attn") for layer in decoder) else 0
    final_norm = tokens * (2 * FP32 * hidden + b * hidden)
    logits = 3 * logprob_chunk * model.get_output_embeddings().weight.shape[0] * FP32
    how += f" + backward {_g(backward)} + mask {_g(mask)} + logits {_g(logits)}"
    return body + backward + mask + final_norm + merger + logits, f"{batch_size} x {seq_len} tokens: {how}"


def _backward_bytes(layer, hidden: int, b: int) -> int:
    """Activation gradients alive at once per token while backward runs through ``layer``: the MLP's (incoming
    gradient, residual, gate, up and product gradients) or the linear attention's fp32 chunk matrices."""
    mlp = b * (2 * hidden + 3 * layer.mlp.gate_proj.out_features)
    if hasattr(layer, "linear_attn"):
        return max(mlp, 3 * FP32 * layer.linear_attn.num_v_heads * LINEAR_ATTENTION_CHUNK)
    return mlp


def _decoder_layer_bytes(layer, hidden: int, b: int, seq_len: int) -> int:
    """Activation bytes per token that one decoder layer keeps for backward, in sequences of ``seq_len`` tokens
    (the linear attention's fp32 chunk path runs on them padded to a multiple of the chunk)."""
    mlp = layer.mlp
    per = 2 * 2 * FP32 * hidden + b * (hidden + 4 * mlp.gate_proj.out_features)
    if hasattr(layer, "linear_attn"):
        attn = layer.linear_attn
        heads, key_dim, value_dim = attn.num_v_heads, attn.head_k_dim, attn.head_v_dim
        keys, values = attn.key_dim, attn.value_dim
        chunk = LINEAR_ATTENTION_CHUNK
        padded = _ceil_div(seq_len, chunk) * chunk
        per += b * (hidden + 2 * (2 * keys + values) + 3 * values + heads)
        per += _ceil_div(padded * FP32 * (7 * heads * key_dim + 6 * values + 5 * heads * chunk
                                          + heads * key_dim * value_dim // chunk), seq_len)
    else:
        attn = layer.self_attn
        head_dim = attn.head_dim
        heads = attn.o_proj.in_features // head_dim
        kv_heads = attn.k_proj.out_features // head_dim
        width, kv_width = heads * head_dim, kv_heads * head_dim
        read_kv = width if kv_heads != heads else kv_width  # repeated to every query head for SDPA
        per += b * (hidden + 3 * width + 2 * read_kv) + FP32 * (2 * width + 2 * kv_width + heads)
        if attn.q_proj.out_features == 2 * width:  # Qwen3.5's gated output: sigmoid(gate) and the product
            per += 2 * b * width
    return per


def _decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.model.language_model.layers)


def _unique_parameters(model) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _bytes(tensors) -> int:
    return sum(_nbytes(p) for p in tensors)


def _state_bytes(trainable, optimizer_dtype) -> int:
    """AdamW's two moments of the ``trainable`` parameters, in their dtype or ``optimizer_dtype``."""
    return sum(2 * p.numel() * (p.element_size() if optimizer_dtype is None else
                                torch.empty((), dtype=optimizer_dtype).element_size()) for p in trainable)


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _g(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def paper_model_config(name: str):
    """A transformers ``Qwen3_5Config`` of the paper's models: ``"qwen3.5-27b"`` (the teacher) or
    ``"qwen3.5-9b"`` (the student), for :func:`estimate_memory` on a meta-device model.

    Sizes from the ``config.json`` of Qwen/Qwen3.5-27B and Qwen/Qwen3.5-9B on the Hugging Face Hub and their
    model cards ("Hidden Layout: 16 x (3 x (Gated DeltaNet -> FFN) -> 1 x (Gated Attention -> FFN))" for 27B,
    8 x for 9B; Gated DeltaNet 16 QK / 48 (27B) or 32 (9B) V heads of dim 128; Gated Attention 24 (27B) or 16 (9B)
    Q heads and 4 KV heads of dim 256; FFN 17408 / 12288; token embedding and LM output 248320, untied; the vision
    encoder of 27 blocks, hidden 1152, MLP 4304, 16 heads, patch 16, merge 2, projecting to the text width).
    The multi-token-prediction layer of the checkpoints is not part of transformers' model and is left out.
    """
    from transformers import Qwen3_5Config

    sizes = {
        "qwen3.5-27b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
                            num_attention_heads=24, linear_num_value_heads=48),
        "qwen3.5-9b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                           num_attention_heads=16, linear_num_value_heads=32),
    }
    if name not in sizes:
        raise ValueError(f"name must be one of {sorted(sizes)}, got {name!r}")
    size = sizes[name]
    text = dict(size, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320, tie_word_embeddings=False,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (size["num_hidden_layers"] // 4),
                rope_parameters={"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  out_hidden_size=size["hidden_size"])
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)

"""Many prompts per image through a Qwen-VL model, with the work they have in common done once.

The student prompts of one image (one per rubric dimension) are the same tokens up to the first
dimension-specific one: the chat header and the image placeholders come first. :func:`shared_prefix_hidden`

1. runs the vision tower once per image and writes its features over the placeholders of that image's prefix
   (as the model's own forward does; Qwen3-VL's deepstack features are added after the first layers likewise);
2. runs the common prefix once per image through the language model, keeping each layer's state at its end:
   the keys/values of a full-attention layer, the causal-conv inputs and the recurrent state of a Qwen3.5
   gated-delta-net (linear-attention) layer;
3. runs the prompt-specific suffixes from those states, one batch per prompt kind (dimension).

The states stay in the autograd graph, so gradients reach the pixels (and every weight) through the prefix.
The layers' own modules compute everything (norms, projections, attention, MLP); this file supplies what
transformers' cache-based continuation would, for three reasons: its caches write states in place, which
autograd rejects once the same state was saved for backward; their interface differs between transformers
5.17 and 5.23; and a linear-attention layer must be able to use the PyTorch gated delta rule where fla cannot run
the backward (``zreward.scoring.gated_delta``), while transformers fixes that choice at import time.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from zreward.scoring.gated_delta import gated_delta_rule

# What this file reads of a Qwen3.5 gated-delta-net layer (the same in transformers 5.17 to 5.23).
DELTA_NET_PARTS = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "conv1d", "A_log", "dt_bias", "norm",
                   "out_proj", "key_dim", "value_dim", "head_k_dim", "head_v_dim", "activation")


@dataclass
class Split:
    """Rows cut into one shared ``prefix [B, P]`` per image and suffixes. Row ``n`` belongs to image
    ``n // rows_per_image``; the suffixes are grouped by ``j = n % rows_per_image`` (the dimension): group ``j`` is
    ``suffixes[j] [B, S_j]`` (right-padded, one row per image) with ``lasts[j] [B]`` the last real positions."""

    prefix: torch.Tensor
    suffixes: list[torch.Tensor]
    lasts: list[torch.Tensor]


def split_rows(rows: list[list[int]], rows_per_image: int, pad_token_id: int, image_token_id: int) -> Split:
    """The longest prefix that the rows of every image share (one length for all images, leaving every row at
    least one suffix token), and the suffixes. The image placeholders must all lie in the prefix."""
    if rows_per_image < 1 or not rows or len(rows) % rows_per_image:
        raise ValueError(f"rows ({len(rows)}) must be a positive multiple of rows_per_image ({rows_per_image})")
    length = min(len(r) for r in rows) - 1
    for start in range(0, len(rows), rows_per_image):
        first, others = rows[start], rows[start + 1:start + rows_per_image]
        length = min([length] + [next((i for i, (a, b) in enumerate(zip(first, r)) if a != b), length)
                                 for r in others])
    for i, row in enumerate(rows):
        if image_token_id in row[length:]:
            raise ValueError(f"row {i} has image placeholders after the first prompt-specific token: the image must "
                             "come before the text that differs between an image's prompts")
    prefix = torch.tensor([rows[s][:length] for s in range(0, len(rows), rows_per_image)], dtype=torch.int64)
    suffixes, lasts = [], []
    for j in range(rows_per_image):
        group = [row[length:] for row in rows[j::rows_per_image]]
        suffix = torch.full((len(group), max(map(len, group))), pad_token_id, dtype=torch.int64)
        for i, tokens in enumerate(group):
            suffix[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        suffixes.append(suffix)
        lasts.append(torch.tensor([len(tokens) - 1 for tokens in group], dtype=torch.int64))
    return Split(prefix, suffixes, lasts)


@dataclass
class DeltaState:
    """A gated-delta-net layer's state after a prefix: its last ``kernel - 1`` causal-conv inputs and the
    recurrent state ``[N, HV, dk, dv]``."""

    conv: torch.Tensor
    recurrent: torch.Tensor


class PrefixKeyValues:
    """Stands in for a transformers ``Cache`` inside the attention modules, whose one call on it is
    ``update(keys, values, layer_idx, ...)``: in a prefix pass it records each layer's keys/values; in a
    suffix pass it puts the prefix ones (``given``) in front. It never writes in place."""

    def __init__(self, given: dict | None = None):
        self.given = given or {}
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx in self.given:
            old_keys, old_values = self.given[layer_idx]
            keys, values = torch.cat([old_keys, keys], -2), torch.cat([old_values, values], -2)
        self.seen[layer_idx] = (keys, values)
        return keys, values


def _delta_net(layer, x: torch.Tensor, state: DeltaState | None) -> tuple[torch.Tensor, DeltaState]:
    """A Qwen3.5 ``GatedDeltaNet`` on ``x [N, S, D]`` continuing from ``state`` (None: from the start)."""
    batch, length, _ = x.shape
    qkv = layer.in_proj_qkv(x).transpose(1, 2)  # [N, channels, S]
    kernel = layer.conv1d.weight.shape[-1]
    if state is not None:  # the conv sees the prefix's last inputs as its left context
        qkv = torch.cat([state.conv, qkv], -1)
    conv = F.conv1d(qkv.to(layer.conv1d.weight.dtype), layer.conv1d.weight, layer.conv1d.bias,
                    padding=kernel - 1, groups=qkv.shape[1])[..., :qkv.shape[-1]][..., -length:]
    conv = ACT2FN[layer.activation](conv).to(x.dtype).transpose(1, 2)
    q, k, v = torch.split(conv, [layer.key_dim, layer.key_dim, layer.value_dim], -1)
    q = q.reshape(batch, length, -1, layer.head_k_dim)
    k = k.reshape(batch, length, -1, layer.head_k_dim)
    v = v.reshape(batch, length, -1, layer.head_v_dim)
    beta = layer.in_proj_b(x).sigmoid()
    g = -layer.A_log.float().exp() * F.softplus(layer.in_proj_a(x).float() + layer.dt_bias)  # fp32: fp16 A
    out, recurrent = gated_delta_rule(q, k, v, g, beta, None if state is None else state.recurrent)
    gate = layer.in_proj_z(x).reshape(-1, layer.head_v_dim)
    out = layer.norm(out.reshape(-1, layer.head_v_dim), gate).reshape(batch, length, -1)
    conv_state = F.pad(qkv, (kernel - 1, 0))[..., -(kernel - 1):] if kernel > 1 else qkv[..., :0]
    return layer.out_proj(out), DeltaState(conv_state, recurrent)


def _attention_mask(attention, queries: torch.Tensor, past: int) -> torch.Tensor | None:
    """Causal mask for ``queries [N, S, D]`` after ``past`` prefix positions: additive ``[1, 1, S, past + S]``, or
    None where the kernel's own causal mask is right: flash attention aligns it to the last key, sdpa's
    ``is_causal`` to the first (right only without a prefix; it keeps sdpa on its fused kernels)."""
    implementation = attention.config._attn_implementation
    if "flash" in implementation or (implementation == "sdpa" and past == 0):
        return None
    length = queries.shape[1]
    keys = torch.arange(past + length, device=queries.device)
    blocked = keys[None, :] > past + torch.arange(length, device=queries.device)[:, None]
    mask = torch.zeros(blocked.shape, dtype=queries.dtype, device=queries.device)
    return mask.masked_fill(blocked, torch.finfo(queries.dtype).min)[None, None]


@cache
def _cache_keyword(attention_class) -> str:
    """transformers 5.24 renamed the attention's ``past_key_values`` argument ``cache`` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(attention_class.forward).parameters else "past_key_values"


def _decoder_layer(layer, hidden, cos_sin, mask, state, key_values):
    """One decoder layer: token mixer (from ``state`` for a gated delta net, from ``key_values`` for attention) and
    MLP, each pre-normed with a residual. Returns the hidden states and the layer's state at the end."""
    mixer_in = layer.input_layernorm(hidden)
    if getattr(layer, "linear_attn", None) is not None:
        mixed, state = _delta_net(layer.linear_attn, mixer_in, state)
    else:
        cache_arg = {_cache_keyword(type(layer.self_attn)): key_values}
        mixed, _ = layer.self_attn(hidden_states=mixer_in, position_embeddings=cos_sin, attention_mask=mask,
                                   **cache_arg)
        state = key_values.seen[layer.self_attn.layer_idx]
    hidden = hidden + mixed
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), state


FSDP_ENTRY = "shared_prefix_layer"  # the decoder-layer method FSDP2 gathers a sharded layer's weights around


def _run_layer(layer, *args):
    """:func:`_decoder_layer`, entered through the layer's FSDP2 hooks when it is a sharded unit
    (:func:`register_fsdp_entries`): this file calls the layer's parts, never its ``forward``."""
    entry = getattr(layer, FSDP_ENTRY, None)
    return entry(*args) if entry is not None else _decoder_layer(layer, *args)


def register_fsdp_entries(model) -> None:
    """Give each FSDP2-sharded decoder layer of the Qwen-VL ``model`` an entry that FSDP2 treats as a forward, so
    that shared-prefix scoring gathers its weights before it runs and reduce-scatters its gradients after."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    for layer in model.model.language_model.layers:
        if isinstance(layer, FSDPModule):
            setattr(layer, FSDP_ENTRY, types.MethodType(_decoder_layer, layer))
            register_fsdp_forward_method(layer, FSDP_ENTRY)


def _layers(language_model, hidden, positions, states: dict, past: int, deepstack=(), image_mask=None):
    """All decoder layers from ``states`` (empty: from the start). Returns the final-norm hidden states and the
    layers' states at the end."""
    cos_sin = language_model.rotary_emb(hidden, positions)
    key_values = PrefixKeyValues({i: s for i, s in states.items() if isinstance(s, tuple)})
    attention = next((layer.self_attn for layer in language_model.layers if hasattr(layer, "self_attn")), None)
    mask = None if attention is None else _attention_mask(attention, hidden, past)
    new_states = {}
    for i, layer in enumerate(language_model.layers):
        args = (layer, hidden, cos_sin, mask, states.get(i), key_values)
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            # As transformers' GradientCheckpointingLayer does after model.gradient_checkpointing_enable().
            hidden, new_states[i] = checkpoint(_run_layer, *args, use_reentrant=False)
        else:
            hidden, new_states[i] = _run_layer(*args)
        if i < len(deepstack):  # Qwen3-VL: the vision tower's intermediate features join the image positions
            hidden = hidden + torch.zeros_like(hidden).masked_scatter(image_mask[..., None], deepstack[i])
    return language_model.norm(hidden), new_states


def check_supported(model) -> None:
    """TypeError unless every linear-attention layer of ``model`` is a Qwen3.5-style gated delta net."""
    for i, layer in enumerate(model.model.language_model.layers):
        delta_net = getattr(layer, "linear_attn", None)
        missing = [p for p in DELTA_NET_PARTS if delta_net is not None and not hasattr(delta_net, p)]
        if missing:
            raise TypeError(f"layer {i}'s linear attention ({type(delta_net).__name__}) lacks {missing}: "
                            "shared-prefix scoring knows Qwen3.5's gated delta net only")


def shared_prefix_hidden(model, split: Split, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """Final-norm hidden state ``[N, D]`` at the last token of each row of ``split`` (no LM head).

    ``model``: a Qwen-VL ``...ForConditionalGeneration``; ``pixel_values`` / ``image_grid_thw``: one image per
    prefix row, as the image processor gives them.
    """
    inner = model.model
    language_model = inner.language_model
    device = pixel_values.device
    prefix = split.prefix.to(device)
    embed = inner.get_input_embeddings()
    # the vision features first: under FSDP2 this call gathers the inner model's own weights (the embeddings)
    vision = inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    hidden = embed(prefix)
    features = torch.cat(vision.pooler_output).to(hidden.dtype)
    image_mask = prefix == model.config.image_token_id
    if int(image_mask.sum()) != features.shape[0]:
        raise ValueError(f"the prefixes hold {int(image_mask.sum())} image placeholders for {features.shape[0]} "
                         "image features")
    hidden = hidden.masked_scatter(image_mask[..., None], features)
    # transformers 5.17 gives each deepstack level as one tensor, 5.23 as a tuple of per-image tensors.
    deepstack = [(f if isinstance(f, torch.Tensor) else torch.cat(f)).to(hidden.dtype)
                 for f in (getattr(vision, "deepstack_features", None) or ())]
    positions, _ = inner.get_rope_index(prefix, mm_token_type_ids=image_mask.int(), image_grid_thw=image_grid_thw)
    _, states = _layers(language_model, hidden, positions, {}, 0, deepstack, image_mask)

    # Text after the image continues the multimodal RoPE positions one past the prefix's largest, on all axes. One
    # suffix pass per group (dimension): its rows align with the prefix rows, so the states need no repeating, and
    # the rows of a group (same rubric, different prompts) differ little in length: little padding.
    start = positions.amax(dim=(0, 2)) + 1
    last_hidden = []
    for suffix, last in zip(split.suffixes, split.lasts):
        suffix = suffix.to(device)
        suffix_positions = (start[:, None] + torch.arange(suffix.shape[1], device=device)).expand(3, -1, -1)
        hidden, _ = _layers(language_model, embed(suffix), suffix_positions, states, prefix.shape[1])
        last_hidden.append(hidden[torch.arange(hidden.shape[0], device=device), last.to(device)])
    return torch.stack(last_hidden, 1).flatten(0, 1)  # row b * rows_per_image + j

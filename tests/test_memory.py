"""The memory estimate of ``--dry-run``: activation terms against the tensors autograd saves, the total against a
measured peak, and the paper's Qwen3.5-27B / 9B on 8 x 80 GiB against hand-computed parameter counts."""
import warnings
from collections import defaultdict

import pytest
import torch

from zreward.experiments.tiny_models import tiny_qwen35
from zreward.training.memory import (GIB, MemoryEstimate, _decoder_layer_bytes, estimate_memory,
                                     paper_model_config)

TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            linear_key_head_dim=16, linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4)


def _saved_bytes_per_layer(text_model, input_ids, attention_mask) -> dict:
    """Bytes of the distinct storages autograd saves in each decoder layer's forward (parameters excluded)."""
    current = [None]
    handles = []
    for i, layer in enumerate(text_model.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    params = {p.untyped_storage().data_ptr() for p in text_model.parameters()}
    seen, saved = set(), defaultdict(int)

    def pack(tensor):
        storage = tensor.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in seen | params and storage.nbytes():
            seen.add(storage.data_ptr())
            saved[current[0]] += storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            text_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [TINY, dict(TINY, num_key_value_heads=4, linear_key_head_dim=32,
                                              linear_value_head_dim=16, linear_num_key_heads=4)])
def test_layer_activations_match_what_autograd_saves(dtype, sizes):
    """Each decoder layer's term (linear and full attention, GQA or not) within 10 % of the bytes its forward
    saves, in a padded batch whose length is not a multiple of the linear attention's chunk."""
    model, _ = tiny_qwen35(seed=0, **sizes)
    text = model.to(dtype).train().model.language_model
    batch, length = 2, 96
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 70:] = 0
    saved = _saved_bytes_per_layer(text, torch.randint(10, 300, (batch, length)), mask)
    b = torch.empty((), dtype=dtype).element_size()
    for i, layer in enumerate(text.layers):
        estimate = batch * length * _decoder_layer_bytes(layer, text.config.hidden_size, b, length)
        if hasattr(layer, "self_attn"):
            estimate += batch * length * length * 4  # the attention mask, counted once per model
        assert estimate == pytest.approx(saved[i], rel=0.10), layer.block_type


@pytest.fixture(scope="module")
def tiny_gdso_step():
    """A tiny teacher (one linear- and one full-attention layer, a vision tower) with prepared GDSO rollouts."""
    from zreward.experiments.synthetic import SyntheticPreferences
    from zreward.scoring.scorer import RewardScorer
    from zreward.scoring.vocab import ScoreVocab
    from zreward.training.gdso import GDSOConfig, GDSOTrainer

    model, processor = tiny_qwen35(seed=0, vision_config=dict(hidden_size=48, intermediate_size=96, depth=2), **TINY)
    scorer = RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))
    data = SyntheticPreferences(3, 2, 64, seed=0)
    pairs = [p for p in data.pairs() if p.dimension == "alignment"][:1]
    trainer = GDSOTrainer(scorer, data, pairs, GDSOConfig(group_size=1, pairs_per_batch=1, max_new_tokens=8,
                                                          beta=0.0, logprob_chunk=64))
    order = [pairs[0].winner, pairs[0].loser]
    torch.manual_seed(0)
    rollouts = scorer.teacher_rollouts(data.images(order), data.prompts(order), "alignment", 1, 8, min_new_tokens=8)
    batch = trainer.prepare_batch(rollouts, torch.tensor([pairs[0].score_w]), torch.tensor([pairs[0].score_l]))
    return trainer, batch, int((rollouts.input_ids[0] == scorer.image_token_id).sum())


@pytest.mark.slow  # MemTracker intercepts every op of the step: 10-20 s on a 2-core machine
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_is_close_to_the_measured_peak_of_a_gdso_step(tiny_gdso_step, checkpointing):
    """The peak of one GDSO step (forward, backward, AdamW step; the moments exist from a first step) as
    torch's MemTracker counts it: every live tensor storage, by category, independent of the allocator's caching
    (which a process-level figure such as ru_maxrss would include, and never lower). The estimate is within
    0.8x-1.3x of it."""
    from torch.distributed._tools.mem_tracker import MemTracker

    trainer, batch, image_tokens = tiny_gdso_step
    if checkpointing:
        trainer.model.gradient_checkpointing_enable()
    else:
        trainer.model.gradient_checkpointing_disable()
    trainer.model.train()
    trainer._apply(trainer.loss_from_rollouts(batch).loss)
    trainer.optimizer.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracker's notes on modules called outside their parent
        with tracker:
            trainer.loss_from_rollouts(batch).loss.backward()
            trainer.optimizer.step()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    rows, length = batch.rollouts.input_ids.shape
    estimate = estimate_memory(trainer.model, world_size=1, strategy="none", batch_size=rows, seq_len=length,
                               gradient_checkpointing=checkpointing, image_tokens=image_tokens, logprob_chunk=64)
    print(f"\nestimate {estimate.total} B, measured peak {measured} B: {estimate.total / measured:.3f}x")
    assert 0.8 <= estimate.total / measured <= 1.3, (estimate.total, measured)


def _meta_model(name: str):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(paper_model_config(name), dtype=torch.bfloat16)


def _hand_counts(hidden, intermediate, layers, heads, value_heads, rank=16):
    """Parameters of a Qwen3.5 dense model written out from its published sizes (vocab 248320 untied; full
    attention with the output gate, 4 KV heads of 256; Gated DeltaNet with 16 key heads of 128 and value heads of
    128, conv 4; 3 linear- for 1 full-attention layer; vision: 27 blocks of 1152 / 4304, patch 16 x 16 x 2 frames,
    2304 position embeddings, 2 x 2 merger), and LoRA of ``rank`` on every projection of the language model
    (``rank x (in + out)`` each). Returns (total, root under FSDP2, (full, linear) layer, LoRA per (full, linear)
    layer); the LM head (``vocab x hidden``) is the rest of the total."""
    vocab, head_dim, keys, values = 248320, 256, 16 * 128, value_heads * 128
    common = 3 * hidden * intermediate + 2 * hidden
    full = hidden * 2 * heads * head_dim + 2 * hidden * 4 * head_dim + heads * head_dim * hidden + 2 * head_dim
    linear = (hidden * (2 * keys + values) + hidden * values + 2 * hidden * value_heads + (2 * keys + values) * 4
              + 2 * value_heads + 128 + values * hidden)
    vh, vi = 1152, 4304
    block = 2 * 2 * vh + 3 * vh * vh + 3 * vh + vh * vh + vh + 2 * vh * vi + vi + vh
    merger = 2 * vh + (4 * vh) ** 2 + 4 * vh + 4 * vh * hidden + hidden
    root = vocab * hidden + hidden + vh * 3 * 2 * 16 * 16 + vh + 2304 * vh + merger  # the LM head is not in it
    total = root + vocab * hidden + layers // 4 * (full + common) + 3 * layers // 4 * (linear + common) + 27 * block
    lora_mlp = 2 * (hidden + intermediate) + (intermediate + hidden)
    lora_full = (hidden + 2 * heads * head_dim) + 2 * (hidden + 4 * head_dim) + (heads * head_dim + hidden)
    lora_linear = (hidden + 2 * keys + values) + (hidden + values) + (values + hidden)
    return total, root, (full + common, linear + common), (rank * (lora_full + lora_mlp),
                                                            rank * (lora_linear + lora_mlp))


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj_qkv|in_proj_z|out_proj)"
PAPER = {"qwen3.5-27b": (5120, 17408, 64, 24, 48), "qwen3.5-9b": (4096, 12288, 32, 16, 32)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_models_on_eight_80_gib_devices(name):
    """FSDP2 over 8 ranks, bf16, full fine-tuning and LoRA (rank 16): the parameter counts and the sharded weights,
    gradients and AdamW moments against hand-computed figures; the activations of 8 sequences of 2048 tokens (1024
    of them image tokens) per rank with and without gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    total, root, layers, lora_layers = _hand_counts(*PAPER[name])
    model = _meta_model(name)
    settings = dict(world_size=8, strategy="fsdp2", batch_size=8, seq_len=2048, image_tokens=1024,
                    device_memory=80 * GIB)
    full = estimate_memory(model, gradient_checkpointing=True, **settings)
    assert full.total_params == full.trainable_params == total
    # bf16: 2 bytes a parameter; the root is gathered for the whole step, two units (decoder layers) at a time, and
    # the LM head is whole on every rank (with its gradient and moments)
    head = PAPER[name][0] * 248320
    assert full.weights == -(-2 * (total - head) // 8) + 2 * root + 2 * 2 * max(layers) + 2 * head
    assert full.gradients == -(-2 * (total - head) // 8) + 2 * root + 2 * max(layers) + 2 * head
    assert full.optimizer == -(-2 * 2 * (total - head) // 8) + 2 * 2 * head  # two bf16 moments per parameter
    plain = estimate_memory(model, gradient_checkpointing=False, **settings)
    assert plain.activations > 5 * full.activations and not plain.fits

    with torch.device("meta"):
        lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    num_layers = PAPER[name][2]
    lora_params = num_layers // 4 * lora_layers[0] + 3 * num_layers // 4 * lora_layers[1]
    adapted = estimate_memory(lora, gradient_checkpointing=True, **settings)
    assert adapted.trainable_params == lora_params and adapted.total_params == total + lora_params
    # peft keeps the adapters in fp32 on a bf16 model: 4-byte weights, gradients and moments
    largest = max(2 * layer + 4 * adapter for layer, adapter in zip(layers, lora_layers))
    assert adapted.weights == -(-(2 * (total - head) + 4 * lora_params) // 8) + 2 * root + 2 * largest + 2 * head
    assert adapted.gradients == -(-4 * lora_params // 8) + 4 * max(lora_layers)
    assert adapted.optimizer == -(-2 * 4 * lora_params // 8)
    assert adapted.activations == full.activations
    assert full.fits and adapted.fits and adapted.total < full.total
    print(f"\n{name}, full fine-tuning:\n{full.table()}\n{name}, LoRA r=16:\n{adapted.table()}")


def test_strategies_and_the_engine_share():
    model, _ = tiny_qwen35(seed=0, **TINY)
    params = sum(p.numel() for p in model.parameters())
    common = dict(batch_size=2, seq_len=32, gradient_checkpointing=False)
    alone = estimate_memory(model, world_size=1, strategy="none", **common)
    ddp = estimate_memory(model, world_size=4, strategy="ddp", **common)
    assert alone.weights == ddp.weights == 4 * params and alone.optimizer == ddp.optimizer == 8 * params
    assert alone.gradients == 4 * params and ddp.gradients == 8 * params  # grads + DDP's buckets
    shared = estimate_memory(model, world_size=4, strategy="fsdp2", engine_memory_fraction=0.25,
                             device_memory=GIB, **common)
    head = model.get_output_embeddings().weight.numel()  # whole on every rank under FSDP2 (tied or not)
    assert shared.optimizer == -(-8 * (params - head) // 4) + 8 * head and shared.engine == GIB // 4
    assert shared.total == shared.weights + shared.gradients + shared.optimizer + shared.activations + GIB // 4
    table = shared.table()
    for row in ("parameters", "weights", "gradients", "optimizer", "activations", "engine", "total", "device"):
        assert row in table
    assert "fits" in table and shared.fits
    assert MemoryEstimate(1, 1, 1, 1, 1, 1, 0, None).fits is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), "world_size"),
    (dict(strategy="zero3"), "strategy"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=-1), "seq_len"),
    (dict(image_tokens=64), "image_tokens"),
    (dict(engine_memory_fraction=0.5), "device_memory"),
    (dict(engine_memory_fraction=1.5, device_memory=GIB), "engine_memory_fraction"),
])
def test_bad_arguments_are_named(kwargs, match):
    model, _ = tiny_qwen35(seed=0)
    args = dict(world_size=1, strategy="none", batch_size=1, seq_len=32, gradient_checkpointing=False)
    with pytest.raises(ValueError, match=match):
        estimate_memory(model, **{**args, **kwargs})
    with pytest.raises(ValueError, match="name"):
        paper_model_config("qwen3.5-4b")

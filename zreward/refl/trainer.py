"""ReFL trainer (paper Sec. 5.1, Eq. 20): maximise the aggregated student reward of the generator's samples.

One step: pick the first gradient step in the last-K window, sample images (:mod:`zreward.refl.sampling`),
score them for every dimension in one batched call of ``reward_fn(images, prompts) -> [B, D]``, aggregate to
``R [B]`` and descend on ``-mean(R)`` (rank-averaged under torch.distributed). Only the generator's LoRA (or all of its) parameters train; the VAE, the
text encoder and the reward model are frozen and only pass the gradient on.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from zreward.refl.adapters import FlowMatchAdapter
from zreward.refl.aggregation import get_aggregator
from zreward.refl.config import ReFLConfig
from zreward.refl.sampling import pick_grad_start, sample_images
from zreward.training.base import TrainerBase
from zreward.training.distributed import DistContext, all_reduce_mean

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def prepare_generator(adapter: FlowMatchAdapter, lora_rank: int, lora_alpha: float,
                      transformer_checkpointing: bool = False, seed: int = 0) -> list[nn.Parameter]:
    """Freeze everything but the generator's trainable parameters and return those.

    ``lora_rank > 0`` adds a peft LoRA adapter on the attention projections (kept in fp32 whatever the base
    dtype, so that AdamW updates are not rounded away), initialised from ``seed`` whatever the global RNG state;
    ``lora_rank = 0`` trains every generator parameter.
    """
    for module in adapter.frozen:
        module.requires_grad_(False).eval()
    generator = adapter.generator
    if lora_rank > 0:
        from peft import LoraConfig

        generator.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=True,
                                             target_modules=list(adapter.lora_target_modules)))
        for name, param in generator.named_parameters():
            param.requires_grad_("lora_" in name)
            if param.requires_grad:
                param.data = param.data.float()
    else:
        generator.requires_grad_(True)
    if transformer_checkpointing:
        generator.enable_gradient_checkpointing()
    return [p for p in generator.parameters() if p.requires_grad]


class TrainableParameters(nn.Module):
    """The trainable parameters of ``module`` under their own names (``.`` -> ``::``), sharing storage.

    Checkpoints go through this view so that a LoRA run saves megabytes of adapter weights (and their optimizer
    state), not the whole transformer.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        for name, param in module.named_parameters():
            if param.requires_grad:
                self.register_parameter(name.replace(".", "::"), param)


class ReFLTrainer(TrainerBase):
    """Eq. 20 on a flow-matching generator, on :class:`~zreward.training.base.TrainerBase` (``lr``, ``step()``,
    ``train()``, ``save()``/``load()``, the checkpoint format and exact resume of GDSO and RISD).

    Under ``torch.distributed`` (``ctx`` from ``init_distributed``) each rank draws its ``batch_size`` prompts
    from its own shard of the training prompts and its own noise; gradients are averaged over ranks, so the
    effective batch is ``world_size x batch_size``. Validation runs the same prompts and noise on every rank.
    """

    def __init__(self, adapter: FlowMatchAdapter, reward_fn: RewardFn, config: ReFLConfig,
                 ctx: DistContext | None = None):
        self.adapter, self.reward_fn = adapter, reward_fn
        self.aggregate = partial(get_aggregator(config.aggregation), weights=config.aggregation_weights,
                                 **config.aggregation_kwargs())
        self.params = prepare_generator(adapter, config.lora_rank, config.lora_alpha,
                                        config.transformer_checkpointing, config.seed)
        self.trainable = TrainableParameters(adapter.generator)
        super().__init__(self.trainable, config, ctx)
        self.prompts = config.train_prompts()

    def default_steps(self) -> int:
        return self.config.max_steps

    def _sample(self, prompts: Sequence[str], grad_start: int, generator: torch.Generator) -> torch.Tensor:
        c = self.config
        return sample_images(self.adapter, prompts, height=c.height, width=c.width,
                             num_inference_steps=c.num_inference_steps, grad_start=grad_start, generator=generator,
                             gradient_checkpointing=c.gradient_checkpointing)

    def _rewards(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        rewards = self.reward_fn(images, prompts)
        expected = (len(prompts), len(self.config.dimensions))
        if tuple(rewards.shape) != expected:
            raise ValueError(f"reward_fn must return [batch, dimensions] = {expected}, got {tuple(rewards.shape)}")
        return rewards.float()

    def loss(self, prompts: Sequence[str], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(-mean_b R(p_b, I_b), per-dimension rewards [B, D] detached, first gradient step)``."""
        c = self.config
        grad_start = pick_grad_start(c.num_inference_steps, c.grad_steps, c.random_start, generator)
        rewards = self._rewards(self._sample(prompts, grad_start, generator), prompts)
        return -self.aggregate(rewards).mean(), rewards.detach(), grad_start

    def step(self) -> dict:
        """One optimiser step on this rank's next ``batch_size`` training prompts; the noise depends only on
        ``(seed, step, rank)`` and the prompt order is part of the checkpoint, so a resumed run continues
        exactly."""
        c = self.config
        batch = [self.prompts[i] for i in self._next_indices(len(self.prompts), c.batch_size)]
        generator = torch.Generator().manual_seed((c.seed * 1_000_003 + self.step_count) * 1_009 + self.ctx.rank)
        loss, rewards, grad_start = self.loss(batch, generator)
        grad_norm = self._apply(loss)
        self.state["step"] += 1
        means = all_reduce_mean(rewards.mean(0)).tolist()
        metrics = {"step": self.step_count, "loss": float(all_reduce_mean(loss.detach())), "grad_norm": grad_norm,
                   "grad_start": grad_start, "rewards": dict(zip(c.dimensions, means))}
        self.history.append(metrics)
        return metrics

    def extra_records(self, finished: bool) -> list[dict]:
        """Validation rewards at step 0, every ``val_every`` steps and at the end."""
        if self.step_count == 0 or self.step_count % self.config.val_every == 0 or finished:
            return [{"split": "val", "step": self.step_count, "rewards": self.validate()}]
        return []

    @torch.no_grad()
    def validate(self, prompts: Sequence[str] | None = None) -> dict[str, float]:
        """Mean reward per dimension (and ``"aggregate"``) over ``prompts`` (default: the validation prompts),
        sampled from the same noise at every call so that curves compare like with like."""
        c = self.config
        prompts = list(prompts if prompts is not None else c.validation_prompts())
        generator = torch.Generator().manual_seed(c.seed)
        rewards = torch.cat([
            self._rewards(self._sample(chunk, c.num_inference_steps, generator), chunk)
            for chunk in (prompts[i:i + c.batch_size] for i in range(0, len(prompts), c.batch_size))])
        result = dict(zip(c.dimensions, rewards.mean(0).tolist()))
        result["aggregate"] = self.aggregate(rewards).mean().item()
        return result

    def save(self, path) -> Path:
        """Checkpoint of the trainable weights (the LoRA adapter alone in a LoRA run) in the trainers' common
        layout, plus, for LoRA, the adapter in the pipeline's own LoRA format under ``<path>/lora``."""
        path = super().save(path)
        if self.config.lora_rank > 0 and self.ctx.is_main:
            self.adapter.save_lora(path / "lora")
        return path

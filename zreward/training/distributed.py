"""Scale-out through ``torch.distributed``: process-group setup from the ``torchrun`` environment, model
wrapping (DDP, or FSDP2 ``fully_shard``), deterministic data sharding and small collectives.

Every helper degrades to a no-op in a single process, so trainers call them unconditionally::

    ctx = init_distributed()                      # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    model = wrap_model(model, ctx, strategy="ddp")
    for index in shard_indices(len(data), ctx, seed=0, epoch=epoch): ...
"""
from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp2", "none")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None, backend: str | None = None,
                     init_method: str | None = None) -> DistContext:
    """Join the process group described by the ``torchrun`` environment variables (if any).

    ``device``: ``"cuda"`` (each rank takes ``cuda:<LOCAL_RANK>``), ``"cpu"``, or None for CUDA when
    available. ``backend`` defaults to NCCL for CUDA and gloo for CPU. ``init_method``: where the ranks meet;
    None is torchrun's ``MASTER_ADDR``/``MASTER_PORT``, ``"file:///path"`` a file all ranks can reach (no port).
    Without ``WORLD_SIZE`` > 1 in the environment (and no group already initialised) this returns a
    single-process context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if world_size == 1:
        return DistContext(device=device)
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), init_method=init_method,
                            rank=int(os.environ.get("RANK", "-1")), world_size=world_size)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown_distributed() -> None:
    """Destroy the process group; call it once the wrapped models are out of scope (after the training function
    returns, not beside a live model in the same frame).

    Garbage is collected first because FSDP2-wrapped modules hold the process group in reference cycles. A group
    freed only during interpreter exit tears down gloo's worker threads with the interpreter, and the rank dies
    with SIGABRT ("terminate called without an active exception") after its work is done: 1 in 7 to 1 in 20
    two-rank CPU runs here, none in 100 with the collection.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, ctx: DistContext, strategy: str = "ddp",
               root: torch.nn.Module | None = None, entry_methods: tuple[str, ...] = ()) -> torch.nn.Module:
    """Put ``model`` on ``ctx.device`` and wrap it for data parallelism.

    ``"ddp"``: ``DistributedDataParallel`` (gradients all-reduced in backward). ``"fsdp2"``: ``fully_shard``
    applied to every decoder/vision block under ``root`` that has parameters of its own, then to ``root``
    (default: ``model``); parameters become sharded DTensors; use :mod:`zreward.training.checkpoint`, which saves
    full state dicts. ``"none"``, or a single process: the model unchanged.

    ``root`` is the submodule every computation enters through its ``forward`` or one of its ``entry_methods``:
    FSDP2 gathers a unit's parameters only there. What lies outside ``root`` and any parameter ``root`` shares
    with it (tied embeddings) stays whole on every rank, and :func:`all_reduce_gradients` averages those
    gradients (FSDP2 averages the sharded ones itself). Under FSDP2 the model is also marked as FSDP-managed for
    transformers' ``generate``, which then keeps every rank stepping until all have finished (``synced_gpus``): a
    rank that stopped sampling early would otherwise leave the others waiting in a parameter all-gather.
    :func:`wrap_scorer_model` picks these for a reward scorer's model.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    root = model if root is None else root
    if not any(module is root for module in model.modules()):
        raise ValueError("root must be model or one of its submodules")
    model = model.to(ctx.device)
    if not ctx.distributed or strategy == "none":
        return model
    if strategy == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # find_unused_parameters: the score head reads only K rows of the LM head, and GDSO's reasoning
        # tokens or RISD's prompts may leave whole branches (vision tower, KL reference) out of a step
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # One mesh for every unit, on the model's own device. Without one, fully_shard builds a mesh on the machine's
    # accelerator whenever it has one, so CPU ranks on gloo on a one-GPU machine each claimed cuda:<LOCAL_RANK>.
    mesh_device = fsdp_mesh_device(ctx.device, dist.get_backend())
    if mesh_device.type == "cuda":
        torch.cuda.set_device(mesh_device)  # FSDP2 keeps its shards on the current CUDA device
    mesh = init_device_mesh(mesh_device.type, (ctx.world_size,))
    for block in fsdp_units(root):
        fully_shard(block, mesh=mesh)
    inside = {id(module) for module in root.modules()}
    outside = {id(p) for module in model.modules() if id(module) not in inside for p in module.parameters(False)}
    shared = {p for p in root.parameters() if id(p) in outside}
    fully_shard(root, mesh=mesh, ignored_params=shared or None)
    for method in entry_methods:
        register_fsdp_forward_method(root, method)
        # The patch wraps the bound method, so its signature lost the first real argument (pixel_values);
        # transformers' generate picks an encoder's arguments by that signature.
        getattr(root, method).__func__.__signature__ = inspect.signature(getattr(type(root), method))
    for module in model.modules():
        if hasattr(module, "generate"):
            module._is_fsdp_managed_module = True  # transformers' generate: synced_gpus
    return model


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``wrap_model(strategy="fsdp2")`` shards one by one before the root: the outermost repeated
    blocks (the children of the outermost ModuleLists: decoder layers, vision blocks)."""
    blocks: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        inside_block = any(name.startswith(block + ".") for block, _ in blocks)
        if isinstance(module, torch.nn.ModuleList) and not inside_block:
            blocks.extend((f"{name}.{i}", block) for i, block in enumerate(module))
    return [block for _, block in blocks]


def wrap_scorer_model(model: torch.nn.Module, ctx: DistContext, strategy: str = "ddp") -> torch.nn.Module:
    """Place a :class:`~zreward.scoring.scorer.RewardScorer`'s Qwen-VL model (peft-wrapped or not) for data
    parallel training by :class:`~zreward.training.base.TrainerBase`.

    ``"ddp"`` (and ``"none"``): the whole model on every rank, unwrapped: the trainers average the gradients
    themselves (:func:`all_reduce_gradients`), because the scorer calls the model's parts rather than its
    ``forward``, which the DDP wrapper needs to see. ``"fsdp2"``: decoder and vision blocks sharded, with the
    inner model (``model.model``: embeddings, vision tower, final norm) as the root unit, entered through its
    ``forward`` or ``get_image_features`` (which ``generate`` calls on its own), and each decoder layer also
    through the entry that shared-prefix student scoring calls (``zreward.scoring.shared_prefix``); the LM head,
    whose score rows the scorer reads directly, stays whole on every rank. Make the ranks' weights equal first
    (:func:`broadcast_parameters`).
    """
    if strategy != "fsdp2":
        return wrap_model(model, ctx, "none")
    from zreward.scoring.shared_prefix import register_fsdp_entries

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model = wrap_model(model, ctx, "fsdp2", root=base.model, entry_methods=("get_image_features",))
    register_fsdp_entries(base)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# The devices each single c10d backend serves for FSDP2's collectives (a mixed one reads "cpu:gloo,cuda:nccl").
_BACKEND_DEVICES = {"gloo": {"cpu"}, "nccl": {"cuda"}}


def fsdp_mesh_device(device: torch.device, backend: str) -> torch.device:
    """The device FSDP2's mesh is built for: the device the model is on (``ctx.device``), which the process
    group's ``backend`` must serve. CPU → ``cpu``; CUDA → this rank's own ``cuda:<LOCAL_RANK>``, one per rank."""
    backend = backend.lower()
    served = ({entry.split(":")[0] for entry in backend.split(",")} if ":" in backend
              else _BACKEND_DEVICES.get(backend, {device.type}))  # another backend: trust the caller
    if device.type not in served:
        raise ValueError(f"FSDP2 on {device.type} needs a process group that serves {device.type}, got backend "
                         f"{backend!r} (gloo serves cpu, nccl serves cuda)")
    if device.type == "cuda" and device.index is None:
        raise ValueError("FSDP2 on CUDA needs this rank's device with its index (cuda:<LOCAL_RANK>, as "
                         "init_distributed sets it), got 'cuda'")
    return device


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 modules are their own wrapper)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard_indices(num_items: int, ctx: DistContext, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """This rank's share of one epoch over ``num_items`` examples.

    The permutation depends only on ``(seed, epoch)``, so every rank agrees on it and a resumed run replays
    the same order; it is cut to a multiple of ``world_size`` (every rank does the same number of steps)
    and dealt round-robin: rank r gets positions r, r + W, r + 2W, ...
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_items, generator=generator).tolist()
    else:
        order = list(range(num_items))
    usable = num_items - num_items % ctx.world_size
    return order[ctx.rank:usable:ctx.world_size]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; the input is left alone). Identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value.detach().clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_tensors(value: torch.Tensor) -> torch.Tensor:
    """Concatenate ``value`` (same shape on every rank) over ranks along dim 0, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value.detach().clone()
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value.detach().contiguous())
    return torch.cat(parts)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does at construction).

    FSDP2's sharded parameters (DTensors) hold a different shard on each rank and are left alone: make the ranks
    agree before sharding (call this before :func:`wrap_model`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not is_sharded(tensor):
                dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Average the gradients of the trainable parameters over ranks in one flat all-reduce.

    The trainers use this instead of the DDP wrapper because they call into the model's submodules (hidden
    states, the LM head's score rows) rather than through ``forward``, which DDP needs to see. A parameter
    without a gradient on this rank counts as zero, so ranks that took different branches stay consistent.
    FSDP2's sharded parameters are skipped: their backward already reduce-scattered the rank average into each
    rank's shard (all-reducing those shards would add up different slices of the parameter).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and not is_sharded(p)]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that may mix FSDP2 shards (DTensors) and whole tensors;
    returns the total norm before clipping.

    Without a sharded gradient it is ``clip_grad_norm_`` itself. With one, the squared norm is each rank's sum over
    its shards, summed over ranks, plus the sum over the whole (replicated, already averaged) gradients, which
    every rank has in full; every gradient is then scaled by ``min(1, max_norm / (norm + 1e-6))`` as torch does.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    device = next(g.to_local() for g in grads if is_sharded(g)).device
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    whole = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if is_sharded(g):
            sharded += g.to_local().float().pow(2).sum()
        else:
            whole += g.float().pow(2).sum().to(device)
    dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    total = (sharded + whole).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = g.to_local() if is_sharded(g) else g
        local.mul_(scale.to(local.device))
    return total

"""Training checkpoints: safetensors for every tensor, JSON for everything else, nothing pickled.

A checkpoint is one directory::

    model.safetensors        full (unsharded) model state, tied weights stored once
    optimizer.safetensors    optimizer state tensors, keyed ``state/<param name>/<field>``
    rng-rank<R>.safetensors  torch CPU (and CUDA) generator states of rank R
    meta.json                optimizer param groups and scalar state, python/numpy RNG states per rank,
                             tied-weight aliases and the caller's ``state`` (step counters, data order, config)

It is written into a sibling temp directory and moved into place with ``os.replace``, so a crash never
leaves a half-written checkpoint under the final name. Every file gets the mode the process umask gives a new
file (0644 under umask 022), safetensors files included (:func:`honour_umask`). Model and optimizer states go through
``torch.distributed.checkpoint.state_dict`` with full state dicts, so the same files load into a plain,
DDP-wrapped or FSDP2-sharded model. Loading never unpickles: ``safetensors`` + ``json`` only.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

CHECKPOINT_PREFIX = "step-"


def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    state: dict[str, Any] | None = None,
                    extra_models: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write ``model``, ``optimizer``, every rank's RNG state and the JSON-serialisable ``state`` to ``path``;
    each of ``extra_models`` (e.g. GDSO's frozen reference policy; plain or sharded as the model may be) goes to
    ``<name>.safetensors``.

    Collective under ``torch.distributed``: every rank must call it (rank 0 writes the shared files,
    each rank its own RNG file).
    """
    path = Path(path)
    rank, world_size = _rank_and_world()
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    torch_rng, python_numpy_rng = _capture_rng()
    save_safetensors(torch_rng, tmp / f"rng-rank{rank}.safetensors")
    rng_states = _gather_objects(python_numpy_rng, world_size)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        model_state, optim_state = get_state_dict(model, [], options=options)[0], None
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
    extra_states = {name: get_state_dict(extra, [], options=options)[0] for name, extra in (extra_models or {}).items()}
    if rank == 0:
        model_tensors, aliases = _dedupe_tied(model_state)
        save_safetensors(model_tensors, tmp / "model.safetensors")
        meta = {"world_size": world_size, "rng": rng_states, "aliases": aliases, "state": state or {}}
        for name, extra_state in extra_states.items():
            extra_tensors, meta.setdefault("extra_aliases", {})[name] = _dedupe_tied(extra_state)
            save_safetensors(extra_tensors, tmp / f"{name}.safetensors")
        if optim_state is not None:
            optim_tensors, meta["optimizer"] = _split_optimizer_state(optim_state)
            save_safetensors(optim_tensors, tmp / "optimizer.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        move_into_place(tmp, path)
    _barrier()
    return path


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, extra_models: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``model`` / ``optimizer`` (in place), restore this rank's
    RNG states, and return the saved ``state`` dict. Raises ``ValueError`` when the world size changed and
    ``restore_rng`` is set (per-rank random streams cannot be remapped)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    rank, world_size = _rank_and_world()
    model_state = load_file(path / "model.safetensors")
    for alias, source in meta["aliases"].items():
        model_state[alias] = model_state[source]
    options = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=model_state, optim_state_dict={}, options=options)
    else:
        optim_state = _join_optimizer_state(load_file(path / "optimizer.safetensors"), meta["optimizer"])
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
    for name, extra in (extra_models or {}).items():
        tensors = load_file(path / f"{name}.safetensors")
        for alias, source in meta["extra_aliases"][name].items():
            tensors[alias] = tensors[source]
        set_state_dict(extra, [], model_state_dict=tensors, optim_state_dict={}, options=options)
    if restore_rng:
        if meta["world_size"] != world_size:
            raise ValueError(f"checkpoint was written by {meta['world_size']} rank(s), this run has {world_size}; "
                             "pass restore_rng=False to resume with fresh random streams")
        _restore_rng(load_file(path / f"rng-rank{rank}.safetensors"), meta["rng"][rank])
    return meta["state"]


def latest_checkpoint(root) -> Path | None:
    """The ``step-<N>`` directory under ``root`` with the largest N (complete ones only), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return max(steps)[1] if steps else None


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing a folder there."""
    if path.exists():  # os.replace cannot replace a non-empty directory: move the old one aside first
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, Any] | None = None) -> None:
    """``safetensors`` file (plus a JSON sidecar ``<path>.json`` when ``metadata`` is given), each written to a
    temp file and moved into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
    if metadata is not None:
        write_json_atomic(metadata, path.with_name(path.name + ".json"))


def save_safetensors(tensors: dict[str, torch.Tensor], path) -> None:
    """``safetensors.torch.save_file`` with the file's mode from the process umask (:func:`honour_umask`)."""
    save_file(tensors, path)
    honour_umask(path)


def honour_umask(path) -> None:
    """Give the file ``path`` the mode a newly created file gets in this process: 0644 under umask 022.

    safetensors (and so transformers' ``save_pretrained``) writes a private temp file (0600) and renames it over
    the target, so its files would stay unreadable to every other user (a service reading a model folder that a
    training job wrote) while the JSON next to them is not.
    """
    os.chmod(path, 0o666 & ~_process_umask())


def _process_umask() -> int:
    """The umask, read without changing it where Linux shows it (``os.umask`` can only read it by setting it,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # the strictest value while it is briefly replaced
    os.umask(umask)
    return umask


def write_json_atomic(obj: Any, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, words, gauss = states["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): store each storage once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def _split_optimizer_state(optim_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, fields in optim_state["state"].items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param}/{field}"] = value.detach().contiguous()
            else:
                scalars.setdefault(param, {})[field] = value
    return tensors, {"param_groups": optim_state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {param: dict(fields) for param, fields in meta["scalars"].items()}
    for key, value in tensors.items():
        _, param, field = key.split("/", 2)  # parameter names are dotted, never slashed
        state.setdefault(param, {})[field] = value
    # JSON turned tuple hyperparameters (Adam's betas) into lists; "params" is the only real list
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


"""Checkpoints: exact resume (model, optimizer, RNG streams, data order), atomic writes, no pickle."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zreward.training.checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
from zreward.training.distributed import DistContext, shard_indices

DATA = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.drop = torch.nn.Dropout(0.3)  # consumes the torch RNG every step
        self.head = torch.nn.Linear(8, 6, bias=False)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.embed(x))))


def make_run():
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))


def train(model, optimizer, state, steps):
    """Steps draw from every RNG a trainer uses: torch (dropout), python and numpy (augmentation), data order."""
    for _ in range(steps):
        order = shard_indices(len(DATA), DistContext(), seed=3, epoch=state["epoch"])
        batch = DATA[order[state["position"]:state["position"] + 4]]
        batch = batch * random.uniform(0.9, 1.1) + float(np.random.normal(0, 0.01))
        loss = (model(batch) - batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] += 1
        state["position"] += 4
        if state["position"] >= len(order):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
    return state


def seed_all():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)


def fresh_state():
    return {"step": 0, "epoch": 0, "position": 0}


@pytest.mark.parametrize("steps_before", [2, 6])  # 6 crosses an epoch boundary (24 items / 4 per step)
def test_resume_is_bit_exact(tmp_path, steps_before):
    seed_all()
    model, optimizer = make_run()
    straight = train(model, optimizer, fresh_state(), steps_before + 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    seed_all()
    model, optimizer = make_run()
    state = train(model, optimizer, fresh_state(), steps_before)
    save_checkpoint(tmp_path / checkpoint_name(state["step"]), model, optimizer, state)
    torch.manual_seed(123)  # disturb every stream: the checkpoint must restore them
    random.seed(123)
    np.random.seed(123)

    model, optimizer = make_run()
    resumed_state = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer)
    assert resumed_state == state
    resumed = train(model, optimizer, resumed_state, 2)
    assert resumed == straight
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_files_are_safetensors_and_json(tmp_path):
    model, optimizer = make_run()
    train(model, optimizer, fresh_state(), 1)
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 1})
    names = sorted(p.name for p in path.iterdir())
    assert names == ["meta.json", "model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["state"] == {"step": 1}
    assert meta["optimizer"]["param_groups"][0]["betas"] == [0.8, 0.95]
    optim = load_file(path / "optimizer.safetensors")
    assert "state/embed.weight/exp_avg" in optim
    assert not list(tmp_path.glob(".*")), "temp directories must be gone after the atomic move"


def test_overwrite_and_latest(tmp_path):
    model, optimizer = make_run()
    assert latest_checkpoint(tmp_path) is None
    for step in (3, 10, 7):
        save_checkpoint(tmp_path / checkpoint_name(step), model, optimizer, {"step": step})
    (tmp_path / ".step-00000099.tmp").mkdir()  # an interrupted write is never picked up
    assert latest_checkpoint(tmp_path).name == checkpoint_name(10)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_checkpoint(tmp_path / checkpoint_name(10), model, optimizer, {"step": 10, "again": True})
    fresh, _ = make_run()
    assert load_checkpoint(tmp_path / checkpoint_name(10), fresh)["again"] is True
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_tied_weights_stored_once(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path / "ckpt", model)
    assert list(load_file(tmp_path / "ckpt" / "model.safetensors")) == ["0.weight"]
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    load_checkpoint(tmp_path / "ckpt", fresh)
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_every_file_gets_the_mode_of_the_umask(tmp_path, umask):
    # safetensors writes a private temp file and renames it: without the chmod these would be 0600 under any umask
    model, optimizer = make_run()
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 0}, extra_models={"reference": Net()})
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in path.iterdir()}
    assert len(modes) == 5 and modes == dict.fromkeys(modes, oct(0o666 & ~umask))

"""Optimizer state in one safetensors file: exact round trips, nothing unpickled, damaged files refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher import param_groups
from launcher.checkpoint import statefile


def trained_optimizer() -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = param_groups.to_torch(param_groups.make_groups(model, "matrices", [], 0.1))  # as the launcher's
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    return optimizer


def test_an_optimizer_state_round_trips_exactly(tmp_path: Path):
    state = trained_optimizer().state_dict()
    statefile.save(state, tmp_path / "optimizer.safetensors")
    back = statefile.load(tmp_path / "optimizer.safetensors")
    assert back["param_groups"] == state["param_groups"]  # tuples (betas) and plain values as they were
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert sorted(back["state"]) == sorted(state["state"])  # integer keys stay integers
    for i, entry in state["state"].items():
        assert entry.keys() == back["state"][i].keys()
        for name, value in entry.items():
            assert torch.equal(back["state"][i][name], value), (i, name)


def test_a_loaded_state_drives_an_optimizer_like_the_saved_one(tmp_path: Path):
    optimizer = trained_optimizer()
    statefile.save(optimizer.state_dict(), tmp_path / "o.safetensors")
    params = [p.detach().clone().requires_grad_() for g in optimizer.param_groups for p in g["params"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    twin = torch.optim.AdamW([{"params": params[sum(sizes[:i]) : sum(sizes[: i + 1])]} for i in range(len(sizes))])
    twin.load_state_dict(statefile.load(tmp_path / "o.safetensors"))
    for a, b in zip([p for g in optimizer.param_groups for p in g["params"]], params, strict=True):
        a.grad = torch.ones_like(a)
        b.grad = torch.ones_like(b)
    optimizer.step()
    twin.step()
    mine = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(sizes) == 2 and all(torch.equal(a, b) for a, b in zip(mine, params, strict=True))


def test_tensors_sharing_memory_and_nested_values_are_kept(tmp_path: Path):
    shared = torch.arange(6.0)
    state = {"a": shared, "b": shared, "c": [1, 2.5, None, "x", (True, shared[2:])], 3: {"nested": torch.ones(2)}}
    statefile.save(state, tmp_path / "s.safetensors")
    back = statefile.load(tmp_path / "s.safetensors")
    assert torch.equal(back["a"], shared) and torch.equal(back["b"], shared)
    assert back["c"][:4] == [1, 2.5, None, "x"] and back["c"][4][0] is True
    assert torch.equal(back["c"][4][1], shared[2:]) and torch.equal(back[3]["nested"], torch.ones(2))


def test_a_loaded_tensor_does_not_hold_on_to_the_file(tmp_path: Path):
    file = tmp_path / "s.safetensors"
    statefile.save({"x": torch.arange(4.0)}, file)
    back = statefile.load(file)
    file.unlink()
    back["x"].add_(1)  # memory of its own: writable, and the deleted file's space is free
    assert back["x"].tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_a_damaged_or_foreign_file_is_refused_in_one_message(tmp_path: Path, content: bytes):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(statefile.Unreadable, match=r"bad\.safetensors is not a state file the launcher wrote"):
        statefile.load(tmp_path / "bad.safetensors")


def test_a_safetensors_file_without_the_structure_is_refused(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"x": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(statefile.Unreadable, match="KeyError"):
        statefile.load(tmp_path / "plain.safetensors")


def test_values_that_cannot_be_stored_are_named(tmp_path: Path):
    with pytest.raises(TypeError, match="state/0: a value of type object cannot be stored"):
        statefile.save({"state": [object()]}, tmp_path / "x.safetensors")

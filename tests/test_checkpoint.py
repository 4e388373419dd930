"""Sharded checkpoints (chapter 9): :mod:`moe_ref.checkpoint`, saved and loaded at different world sizes.

The saves and loads inside process groups run in the session's expert-parallel runs (``ep_workers.all_runs``,
shared with ``test_expert_parallel.py``): a chain W = 1 -> 2 -> 4 -> 1, a same-size round trip at W = 2 and a
save from a 2x2 ("dp", "ep") mesh. Every layer there has its own seed, so every expert has its own weights and a
loader starts from other weights than the saver's. The plain-layer loads and the bad input run here, in one
process. The files are read here with a few lines of JSON, independently of the loader.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

if str(Path(__file__).parent) not in sys.path:  # spawned children inherit sys.path, and import ep_workers
    sys.path.insert(0, str(Path(__file__).parent))

import ep_workers  # noqa: E402
from moe_ref.checkpoint import DENSE_FILE, INDEX, expert_file, load_sharded, read_index, save_sharded  # noqa: E402
from moe_ref.moe import MoE  # noqa: E402

E = ep_workers.EXPERTS
#: label of each save -> (the run that saved it, its directory, the expert-parallel world size of the files)
SAVES = {"save1": (1, "w1", 1), "save2": (2, "w2", 2), "save4": (4, "w4", 4), "save_mesh": (4, "mesh", 2)}
#: label of each round trip -> (the run that loaded it, the save it loaded)
LOADS = {"1to2": (2, "save1"), "2to2": (2, "save2"), "2to4": (4, "save2"), "4to1": ("1b", "save4")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return ep_workers.all_runs(tmp_path_factory)


def job(runs, run, label) -> list[dict]:
    """Every rank's result of checkpoint job ``label`` in run ``run``."""
    per_rank = []
    for rank, results in enumerate(runs[run]):
        assert "error" not in results["checkpoint"], f"run {run}, rank {rank}:\n{results['checkpoint']['error']}"
        r = results["checkpoint"][label]
        assert "error" not in r, f"{label} in run {run} raised on rank {rank}:\n{r['error']}"
        per_rank.append(r)
    return per_rank


def saved(runs, label) -> dict:
    """The saver's output (the same on every rank: each rank ran the same input) and the digests of every
    tensor the ranks held together."""
    per_rank = job(runs, SAVES[label][0], label)
    for r in per_rank[1:]:
        assert np.array_equal(r["out"], per_rank[0]["out"])
    digests = {}
    for r in per_rank:
        for name, d in r["digests"].items():
            assert digests.setdefault(name, d) == d, f"{label}: ranks hold different {name}"
    return dict(out=per_rank[0]["out"], bias=per_rank[0]["bias"], load=per_rank[0]["load"], digests=digests)


SAVER_SEEDS = {"save1": 101, "save2": 102, "save4": 103, "save_mesh": 104}
#: A layer's output is not bitwise the same at every world size (an expert's matmul sees another number of rows),
#: so the saver's own output is matched within float32 rounding; the exact checks are the tensors' bytes, and the
#: output of a layer built with the saver's weights *at the loader's world size*.
CROSS_SIZE_ATOL = 1e-6


def check_loaded(loaded: dict, source: dict, where: str) -> None:
    for name, d in loaded["digests"].items():
        assert d == source["digests"][name], f"{where}: {name} is not the saved tensor"
    assert np.array_equal(loaded["bias"], source["bias"]) and np.array_equal(loaded["load"], source["load"]), where
    assert not np.array_equal(loaded["before"], loaded["expected"]), f"{where}: the loader already had the weights"
    assert np.array_equal(loaded["out"], loaded["expected"]), \
        f"{where}: outputs differ by {np.abs(loaded['out'] - loaded['expected']).max():.3g}"
    err = np.abs(loaded["out"] - source["out"]).max()
    assert err <= CROSS_SIZE_ATOL, f"{where}: the output differs from the saver's by {err:.3g}"


@pytest.mark.parametrize("label", list(LOADS))
def test_round_trip_across_world_sizes(runs, label):
    run, save = LOADS[label]
    source = saved(runs, save)
    per_rank = job(runs, run, label)
    held = set()
    for rank, loaded in enumerate(per_rank):
        check_loaded(loaded, source, f"{label}, rank {rank}")
        held |= set(loaded["digests"])
    assert held == set(source["digests"]), f"{label}: the ranks together hold {sorted(held ^ set(source['digests']))}"


def test_a_rank_that_cannot_load_stops_every_rank(runs):
    """W = 4 loads a W = 2 checkpoint whose second expert shard is truncated: ranks 2 and 3 need it and cannot
    load; ranks 0 and 1 could, but the ranks agree first, so every rank raises and none changes its layer."""
    for rank, r in enumerate(job(runs, 4, "damaged")):
        assert r["raised"] is not None and r["raised"][0] == "ValueError", f"rank {rank}: {r['raised']}"
        expected = "cannot be read" if rank >= 2 else "failed on another rank"
        assert expected in r["raised"][1], f"rank {rank}: {r['raised'][1]}"
        assert r["unchanged"], f"rank {rank} changed its layer"


@pytest.mark.parametrize("label", list(SAVES))
def test_load_into_plain_moe(runs, label):
    source = saved(runs, label)
    layer = ep_workers.ckpt_layer(300, None)
    before = ep_workers._ckpt_output(layer)
    load_sharded(layer, runs["root"] / SAVES[label][1])
    expected = ep_workers._ckpt_output(ep_workers.ckpt_layer(SAVER_SEEDS[label], None))
    check_loaded(dict(ep_workers._ckpt_state(layer), before=before, expected=expected), source,
                 f"{label} -> plain MoE")
    assert set(ep_workers._ckpt_state(layer)["digests"]) == set(source["digests"])


def _header(path: Path) -> dict:
    """A safetensors file's header: 8 bytes of little-endian length, then that much JSON (no pickle)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])


@pytest.mark.parametrize("label", list(SAVES))
def test_files_are_safetensors_one_tensor_per_expert(runs, label):
    _, directory, W = SAVES[label]
    directory = runs["root"] / directory
    expected = {INDEX, DENSE_FILE} | {expert_file(r, W) for r in range(W)}
    assert {p.name for p in directory.iterdir()} == expected
    assert all(p.suffix in (".json", ".safetensors") for p in directory.iterdir())
    index = json.loads((directory / INDEX).read_text())
    assert index["metadata"]["world_size"] == W
    for r in range(W):
        names = set(_header(directory / expert_file(r, W))) - {"__metadata__"}
        mine = range(r * E // W, (r + 1) * E // W)
        assert names == {f"experts.{e}.{w}" for e in mine for w in ("w_in", "w_up", "w_out")}, (label, r)
        for name in names:
            assert index["weight_map"][name] == expert_file(r, W)
    dense = set(_header(directory / DENSE_FILE)) - {"__metadata__"}
    assert "router.expert_bias" in dense and "shared.w_in.weight" in dense
    assert not any(name.startswith("experts.") for name in dense)


def test_no_pickle_is_read_or_written(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "dump", "dumps"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch, "save", refuse)
    source, target = ep_workers.ckpt_layer(1, None), ep_workers.ckpt_layer(2, None)
    save_sharded(source, tmp_path)
    load_sharded(target, tmp_path)
    for name, t in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], t), name


# -- bad input -------------------------------------------------------------------------------------------------

SHARD = expert_file(1, 2)  # experts 4..7 of the W=2 checkpoint


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def _edit(path: Path, name: str, value=None) -> None:
    """Rewrite a safetensors file with tensor ``name`` replaced by ``value`` (removed if None)."""
    tensors = load_file(str(path))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(path))


def _edit_index(directory: Path, fn) -> None:
    index = json.loads((directory / INDEX).read_text())
    fn(index)
    (directory / INDEX).write_text(json.dumps(index))


def _save_other(directory: Path, **changes) -> None:
    options = dict(ep_workers.CKPT_OPTIONS, **changes)
    save_sharded(MoE(ep_workers.D_MODEL, options.pop("d_hidden", ep_workers.D_HIDDEN), E, options.pop("k", 2),
                     **options), directory)


# name -> (what to do to the checkpoint directory, or None; options of the loading layer; what the message names)
BAD = {
    "missing_index": (lambda d: (d / INDEX).unlink(), {}, [INDEX, "does not exist"]),
    "malformed_index": (lambda d: (d / INDEX).write_text("{not json"), {}, [INDEX, "JSON"]),
    "foreign_index": (lambda d: (d / INDEX).write_text('{"metadata": {}, "weight_map": {}}'), {}, [INDEX]),
    "missing_shard": (lambda d: (d / SHARD).unlink(), {}, [SHARD, "missing"]),
    "truncated_shard": (lambda d: _truncate(d / SHARD), {}, [SHARD, "truncated"]),
    "truncated_dense": (lambda d: _truncate(d / DENSE_FILE), {}, [DENSE_FILE]),
    "tensor_not_in_index": (lambda d: _edit_index(d, lambda i: i["weight_map"].pop("experts.5.w_out")), {},
                            [INDEX, "experts.5.w_out"]),
    "tensor_not_in_file": (lambda d: _edit(d / SHARD, "experts.5.w_out"), {}, [SHARD, "experts.5.w_out"]),
    "expert_of_another_shape": (lambda d: _edit(d / SHARD, "experts.6.w_in", torch.zeros(16, 24)), {},
                                ["experts.6.w_in", "(16, 24)"]),
    "dense_of_another_shape": (lambda d: _edit(d / DENSE_FILE, "router.gate.weight", torch.zeros(4, 16)), {},
                               ["router.gate.weight", "(4, 16)"]),
    "saved_with_another_d_hidden": (lambda d: _save_other(d, d_hidden=24), {}, [INDEX, "d_hidden=24"]),
    "loaded_with_another_k": (None, dict(k=3), [INDEX, "k=2"]),
    "loaded_with_another_router": (None, dict(router="softmax"), [INDEX, "router"]),
    "loaded_without_shared_experts": (None, dict(shared=None), [INDEX, "shared"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_raises_and_leaves_the_layer_unchanged(runs, tmp_path, case):
    directory = tmp_path / "checkpoint"
    shutil.copytree(runs["root"] / "w2", directory)
    damage, options, words = BAD[case]
    if damage is not None:
        damage(directory)
    options = dict(ep_workers.CKPT_OPTIONS, **options)
    torch.manual_seed(5)
    layer = MoE(ep_workers.D_MODEL, ep_workers.D_HIDDEN, E, options.pop("k", 2), **options)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_sharded(layer, directory)
    for word in words:
        assert word in str(info.value), f"{case}: {word!r} not in the message {info.value}"
    after = layer.state_dict()
    assert set(after) == set(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{case}: the failed load changed {name}"


def test_read_index_and_type_errors(runs, tmp_path):
    index = read_index(runs["root"] / "w4")
    assert index["metadata"]["config"]["num_experts"] == E
    with pytest.raises(ValueError, match="does not exist"):
        read_index(tmp_path)
    with pytest.raises(TypeError, match="MoE"):
        save_sharded(nn.Linear(2, 2), tmp_path)
    with pytest.raises(TypeError, match="MoE"):
        load_sharded(nn.Linear(2, 2), runs["root"] / "w4")

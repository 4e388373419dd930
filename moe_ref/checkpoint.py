"""Chapter 9: checkpoints of MoE layers in safetensors, one file per expert shard, loadable at any world size.

A checkpoint is a directory:

* ``dense.safetensors``: everything that is not a routed expert (router, shared experts, buffers), written by
  rank 0;
* ``experts-RRRRR-of-WWWWW.safetensors``: the experts of expert-parallel rank ``R`` of ``W``, *one tensor per
  expert* (``experts.{e}.w_in``, ``experts.{e}.w_up``, ``experts.{e}.w_out``, ``e`` the global index), written
  by that rank (the first replica, under expert data parallelism);
* ``model.safetensors.index.json``: the ``weight_map`` from every tensor name to its file (the layout of
  ``transformers``' sharded checkpoints) and the layer's configuration, written last.

Because every expert is stored under its global index, a loader at any world size reads exactly its own
experts (:func:`load_sharded` opens the files lazily and reads only those tensors), and a plain
:class:`~moe_ref.moe.MoE` reads them all. The format is safetensors: no pickle is read or written. A load
checks everything (files present and whole, every tensor there with the right shape, the same configuration)
before it changes the layer, so a failed load leaves the layer as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .moe import MoE

#: The index file's name, as in ``transformers``.
INDEX = "model.safetensors.index.json"
#: The format tag in the index.
FORMAT = "moe_ref.sharded_moe/1"
DENSE_FILE = "dense.safetensors"
_STACKED = ("experts.w_in", "experts.w_up", "experts.w_out")


def _layout(layer: MoE) -> tuple[int, int, int, int]:
    """``(W, r, first expert, local experts)`` of a layer (``(1, 0, 0, E)`` for a plain MoE)."""
    ep = getattr(layer, "ep", None)
    if ep is None:
        return 1, 0, 0, layer.num_experts
    return ep.size, ep.rank, layer.first_expert, layer.num_local_experts


def config_of(layer: MoE) -> dict:
    """The configuration a checkpoint records, as JSON-friendly values (what a loader must match)."""
    return dict(d_model=layer.d_model, d_hidden=layer.d_hidden, num_experts=layer.num_experts, k=layer.k,
                activation=layer.activation, router=repr(layer.router_config),
                shared=repr(layer.shared_config), residual=repr(layer.residual_config))


def expert_file(rank: int, world_size: int) -> str:
    """The file name of expert shard ``rank`` of ``world_size``."""
    return f"experts-{rank:05d}-of-{world_size:05d}.safetensors"


def _expert_name(e: int, stacked: str) -> str:
    return f"experts.{e}.{stacked.split('.')[1]}"


def save_sharded(layer: MoE, directory: str | os.PathLike) -> Path:
    """Save ``layer`` (a plain or expert-parallel :class:`~moe_ref.moe.MoE`) to ``directory``; returns its path.

    Every rank of an expert-parallel layer calls it; it returns on each once the whole checkpoint is written.
    Files are written under a temporary name and renamed, so a crash never leaves a half-written file under
    the final name.
    """
    if not isinstance(layer, MoE):
        raise TypeError(f"layer must be an MoE, got {type(layer).__name__}")
    directory = Path(directory)
    W, rank, first, local = _layout(layer)
    ep = getattr(layer, "ep", None)
    state = {name: t.detach().cpu().contiguous() for name, t in layer.state_dict().items()}
    writes_experts = ep is None or ep.replicate is None or torch.distributed.get_rank(ep.replicate) == 0
    writes_dense = ep is None or torch.distributed.get_rank(ep.dense) == 0
    directory.mkdir(parents=True, exist_ok=True)
    if writes_experts:
        shard = {_expert_name(first + j, name): state[name][j].clone() for name in _STACKED if name in state
                 for j in range(local)}
        _write(shard, directory / expert_file(rank, W))
    if writes_dense:
        _write({name: t for name, t in state.items() if name not in _STACKED}, directory / DENSE_FILE)
    _barrier(ep, "checkpoint save")
    if writes_dense:
        weight_map = {name: DENSE_FILE for name in state if name not in _STACKED}
        per_rank = layer.num_experts // W
        for name in _STACKED:
            if name in state:
                weight_map.update({_expert_name(e, name): expert_file(e // per_rank, W)
                                   for e in range(layer.num_experts)})
        index = {"metadata": {"format": FORMAT, "config": config_of(layer), "world_size": W},
                 "weight_map": weight_map}
        tmp = directory / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, directory / INDEX)
    _barrier(ep, "checkpoint index")
    return directory


def _write(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _barrier(ep, what: str) -> None:
    if ep is not None:
        ep.all_reduce(torch.zeros(1, device=ep.comm_device()), ep.dense, what)


def read_index(directory: str | os.PathLike) -> dict:
    """The checkpoint's index, checked; a ``ValueError`` naming the file if it is missing or malformed."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: not a checkpoint written by save_sharded") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(index, dict) or index.get("metadata", {}).get("format") != FORMAT \
            or not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"{path} is not a {FORMAT} index")
    return index


def check_config(index: dict, layer: MoE, directory: Path) -> None:
    """A ``ValueError`` naming every differing field unless the index records ``layer``'s configuration."""
    saved, mine = index["metadata"].get("config") or {}, config_of(layer)
    if saved != mine:
        differ = sorted(key for key in set(mine) | set(saved) if saved.get(key) != mine.get(key))
        raise ValueError(f"{directory / INDEX} holds another configuration: "
                         + ", ".join(f"{key}={saved.get(key)!r} (layer: {mine.get(key)!r})" for key in differ))


def load_sharded(layer: MoE, directory: str | os.PathLike) -> MoE:
    """Load a :func:`save_sharded` checkpoint into ``layer``, whatever world size wrote it; returns ``layer``.

    A plain :class:`~moe_ref.moe.MoE` reads every expert; an expert-parallel layer only its own. Raises a
    ``ValueError`` naming the problem (missing or truncated file, missing tensor, wrong shape, another
    configuration) before anything in ``layer`` changes. The ranks of an expert-parallel layer agree first
    (one all-reduce of a flag): if any rank cannot load, every rank raises and no rank changes its layer.
    """
    if not isinstance(layer, MoE):
        raise TypeError(f"layer must be an MoE, got {type(layer).__name__}")
    ep = getattr(layer, "ep", None)
    try:
        new_state = _checked_state(layer, Path(directory))
    except ValueError:
        _agree(ep, failed=True)
        raise
    if not _agree(ep, failed=False):
        raise ValueError(f"loading {directory} failed on another rank (see its error); this rank's layer is "
                         f"unchanged")
    layer.load_state_dict(new_state)
    return layer


def _agree(ep, *, failed: bool) -> bool:
    """Whether every rank of an expert-parallel layer can load (``True`` for a plain layer that can)."""
    if ep is None:
        return not failed
    flag = torch.tensor([int(failed)], device=ep.comm_device())
    return int(ep.all_reduce(flag, ep.dense, "checkpoint load agreement")) == 0


def _checked_state(layer: MoE, directory: Path) -> dict:
    """The state dict ``layer`` would load from ``directory``, every file, tensor and shape checked."""
    index = read_index(directory)
    check_config(index, layer, directory)
    _, _, first, local = _layout(layer)
    current = layer.state_dict()
    wanted = {name: name for name in current if name not in _STACKED}
    for name in _STACKED:
        if name in current:
            wanted.update({_expert_name(first + j, name): (name, j) for j in range(local)})
    by_file: dict[str, list[str]] = {}
    for tensor_name in wanted:
        if tensor_name not in index["weight_map"]:
            raise ValueError(f"{directory / INDEX} has no tensor {tensor_name!r}")
        by_file.setdefault(index["weight_map"][tensor_name], []).append(tensor_name)
    loaded: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        loaded.update(_read(directory / file, names))
    state = {}
    for tensor_name, target in wanted.items():
        t = loaded[tensor_name]
        name, j = (target, None) if isinstance(target, str) else target
        expected = current[name].shape if j is None else current[name].shape[1:]
        if t.shape != expected:
            raise ValueError(f"tensor {tensor_name!r} in {directory} has shape {tuple(t.shape)}, the layer needs "
                             f"{tuple(expected)}")
        state[tensor_name] = t
    new_state = {name: state[name] for name in current if name not in _STACKED}
    for name in _STACKED:
        if name in current:
            new_state[name] = torch.stack([state[_expert_name(first + j, name)] for j in range(local)])
    return new_state


def _read(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read ``names`` from one safetensors file; a ``ValueError`` naming the file if it is missing or damaged."""
    if not path.exists():
        raise ValueError(f"checkpoint file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            absent = [n for n in names if n not in present]
            if absent:
                raise ValueError(f"checkpoint file {path} lacks tensor(s) {absent}")
            return {n: f.get_tensor(n) for n in names}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"checkpoint file {path} cannot be read (truncated or not safetensors): {e}") from None

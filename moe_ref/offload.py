"""Chapter 12: offloading experts. The routed experts live on disk; a small cache of them lives in memory.

An MoE's memory is its *total* parameters, its compute only its *active* ones. When the experts do not fit,
keep them in a file and bring in only the experts the router picks :cite:p:`eliseev2023offloading`:

1. **disk**: each layer is a :func:`~moe_ref.checkpoint.save_sharded` checkpoint (one tensor per expert,
   ``experts.{e}.w_in`` ...), read with ``safetensors.safe_open``, which memory-maps the file and copies out
   only the tensors asked for. No pickle is read or written.
2. **cache**: :class:`ExpertCache` holds at most ``cache_size`` experts of *one layer* (a per-layer budget, as
   in Mixtral-offloading: every token passes every layer once, so a shared cache would only move memory to the
   layers whose experts were touched last, and a per-layer size makes memory predictable). Eviction is least
   recently used (``"lru"``), or the baselines ``"fifo"`` and ``"random"``. It counts hits, misses, loads,
   evictions and bytes read.
3. **compute**: :class:`OffloadedMoE` routes, then for each touched expert, in increasing order, fetches it
   (a hit or a load) and runs it on its tokens with plain matmuls, exactly as ``MoE(impl="naive")`` does, so
   the output is bit-identical to the in-memory layer's ``"naive"`` path (and within float rounding of
   ``"grouped"``).

**Prefetching.** The residual stream changes little from one layer to the next, so the next layer's router
applied to the *current* hidden state predicts its experts :cite:p:`eliseev2023offloading`.
:meth:`OffloadedMoE.prefetch` runs this layer's router on such a guess and loads the predicted experts
ahead; :func:`offload_model` wires it between the blocks of a :class:`~moe_ref.book.model.TinyTransformer`.
Here the loads are synchronous: a real system overlaps them with the current layer's compute.

Inference only: the experts read from disk are plain tensors, not parameters, and the rest of the layer is
frozen. A forward with gradients enabled on an input or parameter that needs them raises a ``RuntimeError``;
run under ``torch.no_grad()`` or ``torch.inference_mode()``.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import _checks
from .activations import activation_fn
from .capacity import CapacityRecord
from .checkpoint import INDEX, _expert_name, _read, check_config, read_index, save_sharded
from .dispatch import computed_mask, loop_over_experts
from .experts import _matmul  # Experts.expert's matmul, so the result is bit-identical
from .ffn import ffn_forward
from .moe import MoE
from .routing import Routing
from .shared import add_dense_paths

POLICIES = ("lru", "fifo", "random")
"""Eviction policies of :class:`ExpertCache`."""

_WEIGHTS = ("w_in", "w_up", "w_out")


# --------------------------------------------------------------------------------------------------- disk


class ExpertStore:
    """The routed experts of one MoE layer on disk: a :func:`~moe_ref.checkpoint.save_sharded` directory.

    Checks at construction, without reading any weights, that the index is there and holds ``layer``'s
    configuration, and that every expert's tensors are in their file with the right shape. :meth:`load` reads
    one expert (and checks it again: a file may change after construction).

    Args:
        directory: the checkpoint directory.
        layer: the :class:`~moe_ref.moe.MoE` whose configuration the files must have.
    """

    def __init__(self, directory: str | os.PathLike, layer: MoE):
        if not isinstance(layer, MoE):
            raise TypeError(f"layer must be an MoE, got {type(layer).__name__}")
        self.directory = Path(directory)
        index = read_index(self.directory)
        check_config(index, layer, self.directory)
        self.num_experts = layer.num_experts
        experts = layer.experts
        self.names = [w for w in _WEIGHTS if getattr(experts, w) is not None]
        self.shapes = {w: tuple(getattr(experts, w).shape[1:]) for w in self.names}
        self.dtype = experts.w_in.dtype
        self.files: dict[int, Path] = {}
        for e in range(self.num_experts):
            files = {index["weight_map"].get(_expert_name(e, "experts." + w)) for w in self.names}
            if None in files:
                raise ValueError(f"{self.directory / INDEX} has no entry for some tensor of expert {e}")
            if len(files) != 1:
                raise ValueError(f"{self.directory / INDEX} splits expert {e} over several files {sorted(files)}")
            self.files[e] = self.directory / files.pop()
        self._check_headers()

    def _check_headers(self) -> None:
        """Every expert file present, whole (safetensors checks its header against the file's length), and
        holding every expert's tensors with the right shape and dtype. Reads headers only."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[int]] = {}
        for e, path in self.files.items():
            by_file.setdefault(path, []).append(e)
        for path, experts in by_file.items():
            if not path.exists():
                raise ValueError(f"expert file {path} is missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    present = set(f.keys())
                    for e in experts:
                        for w in self.names:
                            name = _expert_name(e, "experts." + w)
                            if name not in present:
                                raise ValueError(f"expert file {path} lacks tensor {name!r}")
                            shape = tuple(f.get_slice(name).get_shape())
                            if shape != self.shapes[w]:
                                raise ValueError(f"expert file {path}: tensor {name!r} has shape {shape}, the "
                                                 f"layer needs {self.shapes[w]}")
            except (SafetensorError, OSError, RuntimeError) as error:
                raise ValueError(f"expert file {path} cannot be read (truncated or not safetensors): "
                                 f"{error}") from None

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(size * torch.Size(s).numel() for s in self.shapes.values())

    def load(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s weights ``{"w_in": [d_model, d_hidden], ("w_up": ...,) "w_out": [d_hidden, d_model]}``.

        Raises a ``ValueError`` naming the file and what is wrong (missing, truncated, a tensor absent or of
        another shape or dtype); nothing is kept from a failed load.
        """
        path = self.files[e]
        names = [_expert_name(e, "experts." + w) for w in self.names]
        tensors = _read(path, names)  # ValueError naming the file when missing, truncated or lacking a tensor
        out = {}
        for w, name in zip(self.names, names):
            t = tensors[name]
            if tuple(t.shape) != self.shapes[w]:
                raise ValueError(f"expert file {path}: tensor {name!r} has shape {tuple(t.shape)}, the layer "
                                 f"needs {self.shapes[w]}")
            if t.dtype != self.dtype:
                raise ValueError(f"expert file {path}: tensor {name!r} has dtype {t.dtype}, the layer needs "
                                 f"{self.dtype}")
            out[w] = t
        return out


def save_experts(layer: MoE, directory: str | os.PathLike) -> Path:
    """Write ``layer`` to ``directory`` with :func:`~moe_ref.checkpoint.save_sharded` (one tensor per expert)."""
    return save_sharded(layer, directory)


# -------------------------------------------------------------------------------------------------- cache


@dataclass
class CacheStats:
    """Counters of one :class:`ExpertCache` (and of the predictions of :meth:`OffloadedMoE.prefetch`).

    Attributes:
        requests: experts the forward passes asked for (one per touched expert per forward).
        hits: requests found in memory (whether a forward or a prefetch brought them in).
        misses: requests that had to be loaded (``requests - hits``).
        loads: experts read from disk, by forwards and prefetches.
        prefetch_loads: of ``loads``, those a prefetch made.
        evictions: experts dropped from memory to make room.
        bytes_read: bytes of expert weights read from disk.
        load_seconds: time spent reading them.
        predicted: experts a prefetch predicted for a forward that then ran.
        predicted_right: of those, the ones the forward touched.
        touched_after_prediction: experts touched by forwards that had a prediction.
    """

    requests: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    prefetch_loads: int = 0
    evictions: int = 0
    bytes_read: int = 0
    load_seconds: float = 0.0
    predicted: int = 0
    predicted_right: int = 0
    touched_after_prediction: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / requests`` (0 before any request)."""
        return self.hits / self.requests if self.requests else 0.0

    @property
    def prediction_recall(self) -> float:
        """Fraction of the experts touched after a prediction that the prediction named."""
        return self.predicted_right / self.touched_after_prediction if self.touched_after_prediction else 0.0

    @property
    def prediction_precision(self) -> float:
        """Fraction of the predicted experts that the forward touched."""
        return self.predicted_right / self.predicted if self.predicted else 0.0

    def add(self, other: "CacheStats") -> "CacheStats":
        """The sum of two records (for totals over layers)."""
        return CacheStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict:
        return dict(asdict(self), hit_rate=self.hit_rate, prediction_recall=self.prediction_recall)


def check_cache_size(cache_size, num_experts: int) -> int:
    """``cache_size`` if it is an int with ``1 <= cache_size <= num_experts``; a clear error otherwise."""
    _checks.positive_int("cache_size", cache_size)
    if cache_size > num_experts:
        raise ValueError(f"cache_size must be <= num_experts={num_experts} (experts of one layer), got {cache_size}")
    return cache_size


class ExpertCache:
    """At most ``cache_size`` experts of one layer in memory, filled on demand by ``load(e)``.

    Args:
        load: ``load(e) -> value`` (the weights), called on a miss; ``None`` for a dry run that keeps only
            the bookkeeping (for simulating traces).
        cache_size: ``1 <= cache_size <= num_experts``.
        num_experts: ``E``.
        policy: ``"lru"`` (evict the least recently *used*), ``"fifo"`` (the least recently *loaded*) or
            ``"random"`` (a uniformly random resident expert, from ``random.Random(seed)``).
        expert_bytes: bytes one load reads, for the ``stats``.
        seed: of the ``"random"`` policy.

    A load that raises leaves the cache as it was: the eviction happens only after the new expert is read.
    """

    def __init__(self, load: Callable[[int], object] | None, cache_size: int, num_experts: int, *,
                 policy: str = "lru", expert_bytes: int = 0, seed: int = 0):
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.cache_size = check_cache_size(cache_size, num_experts)
        self.policy = _checks.choice("policy", policy, POLICIES)
        self._load = load
        self.expert_bytes = _checks.positive_int("expert_bytes", expert_bytes, minimum=0)
        self._rng = random.Random(seed)
        self._resident: OrderedDict[int, object] = OrderedDict()  # oldest first
        self.stats = CacheStats()

    @property
    def resident(self) -> list[int]:
        """The experts in memory, the next to evict first (for ``"random"``: in load order)."""
        return list(self._resident)

    def __contains__(self, e: int) -> bool:
        return e in self._resident

    def _bring_in(self, e: int, *, prefetch: bool):
        start = time.perf_counter()
        value = None if self._load is None else self._load(e)  # may raise: nothing has changed yet
        self.stats.load_seconds += time.perf_counter() - start
        if len(self._resident) >= self.cache_size:
            victim = (self._rng.choice(list(self._resident)) if self.policy == "random"
                      else next(iter(self._resident)))
            del self._resident[victim]
            self.stats.evictions += 1
        self._resident[e] = value
        self.stats.loads += 1
        self.stats.prefetch_loads += int(prefetch)
        self.stats.bytes_read += self.expert_bytes
        return value

    def get(self, e: int):
        """Expert ``e``'s value, loading it on a miss (evicting one if full); counted as a request."""
        self.stats.requests += 1
        if e in self._resident:
            self.stats.hits += 1
            if self.policy == "lru":
                self._resident.move_to_end(e)
            return self._resident[e]
        self.stats.misses += 1
        return self._bring_in(e, prefetch=False)

    def prefetch(self, e: int) -> None:
        """Bring ``e`` in ahead of need (not a request); a resident ``e`` becomes the most recently used."""
        if e in self._resident:
            if self.policy == "lru":
                self._resident.move_to_end(e)
            return
        self._bring_in(e, prefetch=True)

    def clear(self) -> None:
        """Empty the cache (the counters stay)."""
        self._resident.clear()


def uniform_hit_rate(cache_size: int, num_experts: int, k: int) -> float:
    """Expected hit rate when each token picks ``k`` distinct experts uniformly at random.

    Assumes the cache holds a uniformly random ``C``-subset of the ``E`` experts before each token. The token's
    experts are fetched one after the other, and the ``j``-th (``j = 0 .. k-1``) finds the ``j`` fetched before
    it in memory plus ``C - j`` of the other ``E - j`` experts: it hits with probability
    ``max(C - j, 0) / (E - j)``. The hit rate is the mean over ``j``; for ``k = 1`` it is ``C / E``. An LRU cache
    fed uniform routing matches it to about 0.02 for ``C >= k`` (it fetches in increasing order, so its content
    is not exactly uniform); for ``C < k`` the formula overestimates.
    """
    check_cache_size(cache_size, num_experts)
    _checks.positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts={num_experts}, got {k}")
    return sum(max(cache_size - j, 0) / (num_experts - j) for j in range(k)) / k


def simulate(trace, cache_size: int, num_experts: int, *, policy: str = "lru", seed: int = 0,
             predictions=None, count_from: int = 0) -> CacheStats:
    """Replay a routing ``trace`` through a dry-run :class:`ExpertCache` and return its counters.

    Args:
        trace: one entry per forward of the layer: the experts it touched (any iterable of ints), fetched in
            increasing order as :class:`OffloadedMoE` does.
        predictions: optional, aligned with ``trace``: the experts prefetched before each forward (``None``
            or empty for no prefetch), in the order they are loaded; each is cut to its last ``cache_size``.
        count_from: entries before this one warm the cache up but are not counted (e.g. the prompt).
    """
    cache = ExpertCache(None, cache_size, num_experts, policy=policy, seed=seed)
    for i, touched in enumerate(trace):
        if i == count_from:
            cache.stats = CacheStats()
        if predictions is not None and predictions[i]:
            for e in list(predictions[i])[-cache_size:]:
                cache.prefetch(int(e))
        for e in sorted({int(e) for e in touched}):
            cache.get(e)
    return cache.stats


# ------------------------------------------------------------------------------------------------- layer


class OffloadedMoE(nn.Module):
    """An inference-only copy of a trained :class:`~moe_ref.moe.MoE` whose routed experts stay on disk.

    ``[..., d_model] -> [..., d_model]``, the same function as ``layer`` (bit-identical to its ``"naive"``
    implementation). The router and the dense paths (shared experts, residual MoE) are copied and frozen;
    the routed experts are read from ``directory`` (written by :func:`save_experts`) into an
    :class:`ExpertCache` of ``cache_size`` experts. ``layer`` itself is not kept.

    Args:
        layer: the trained layer (its configuration must match the files).
        directory: the layer's :func:`save_experts` directory.
        cache_size: experts held in memory, ``1 <= cache_size <= E``.
        policy: eviction policy (:data:`POLICIES`).
        seed: of the ``"random"`` policy.

    Attributes:
        cache: the :class:`ExpertCache`; ``cache.stats`` has the counters.
        last_touched: the experts the last forward touched, increasing.
    """

    def __init__(self, layer: MoE, directory: str | os.PathLike, cache_size: int, *, policy: str = "lru",
                 seed: int = 0):
        super().__init__()
        self.store = ExpertStore(directory, layer)
        self.d_model, self.d_hidden = layer.d_model, layer.d_hidden
        self.num_experts, self.k = layer.num_experts, layer.k
        self.router_config, self.capacity_config = layer.router_config, layer.capacity_config
        self.activation = layer.activation
        self.act, _ = activation_fn(layer.activation)
        self.jitter_experts = layer.router_config.jitter_experts
        self.router = copy.deepcopy(layer.router)
        parts = {name: getattr(layer, name) for name in ("shared", "shared_gate", "residual_mlp", "residual_coef")}
        for name, part in parts.items():
            setattr(self, name, None if part is None else copy.deepcopy(part))
        self.requires_grad_(False)
        self.eval()
        self.cache = ExpertCache(self.store.load, cache_size, self.num_experts, policy=policy,
                                 expert_bytes=self.store.expert_bytes(), seed=seed)
        self.last_touched: list[int] = []
        self.last_routing: Routing | None = None
        self._prediction: list[int] | None = None

    _capacity = MoE._capacity  # the same capacity rule as the layer it copies

    def train(self, mode: bool = True) -> "OffloadedMoE":
        """Stays in eval mode: the layer is inference-only (a router's training-time noise never runs)."""
        return super().train(False)

    def _check_no_grad(self, x: torch.Tensor) -> None:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise RuntimeError("OffloadedMoE is inference-only: its experts are read from disk and get no "
                               "gradient. Run it under torch.no_grad() or torch.inference_mode()")

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[Routing, torch.Tensor | None]:
        """``x`` ``[..., d_model]`` -> (the routing of its flat tokens, the capacity record or ``None``)."""
        mask = _checks.token_mask(token_mask, x.shape[:-1], x.device)
        x_flat = x.reshape(-1, self.d_model)
        routing = self.router(self.router.jitter(x_flat), mask)
        return routing, self._capacity(routing, x.shape)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[..., d_model]`` in the experts' dtype; ``token_mask`` as for :class:`~moe_ref.moe.MoE`.

        Returns ``[..., d_model]``; the routed experts touched are fetched through the cache one at a time,
        in increasing order, each computed right after its fetch (so even ``cache_size=1`` works).
        """
        _checks.float_tensor("x", x, last_dim=self.d_model)
        self._check_no_grad(x)
        if x.dtype != self.store.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the offloaded experts are {self.store.dtype}")
        x_flat = x.reshape(-1, self.d_model)
        routing, capacity = self.route(x, token_mask)
        x_in = self.router.jitter(x_flat) if self.jitter_experts else x_flat
        out = self._routed(x_in, routing, capacity)
        out = add_dense_paths(x_flat, out, shared=self.shared, shared_gate=self.shared_gate,
                              residual_mlp=self.residual_mlp, residual_coef=self.residual_coef)
        self.last_routing = routing.detach()
        return out.reshape(x.shape).to(x.dtype, copy=True)

    def _routed(self, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None) -> torch.Tensor:
        """:func:`~moe_ref.dispatch.routed_naive`, over the touched experts only. ``[T, d] -> [T, d]`` float32."""
        mask = computed_mask(routing, capacity)
        chosen = routing.expert_indices if mask is None else routing.expert_indices[mask]
        touched = torch.unique(chosen).tolist()  # sorted: the naive loop's order
        self._score_prediction(touched)
        self.last_touched = touched

        def run_expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            w = self.cache.get(e)  # fetched right before use, so even cache_size=1 works
            return ffn_forward(rows, self.act, w["w_in"], w.get("w_up"), w["w_out"], _matmul)

        return loop_over_experts(run_expert, x, routing, capacity, touched)

    def _score_prediction(self, touched: list[int]) -> None:
        if self._prediction is None:
            return
        s, predicted = self.cache.stats, set(self._prediction)
        s.predicted += len(predicted)
        s.predicted_right += len(predicted & set(touched))
        s.touched_after_prediction += len(touched)
        self._prediction = None

    def predict(self, x: torch.Tensor) -> list[int]:
        """The experts this layer's router picks for ``x`` ``[..., d_model]``, most wanted last, at most
        ``cache_size`` of them (ranked by how many tokens pick each, then by summed combine weight)."""
        _checks.float_tensor("x", x, last_dim=self.d_model)
        with torch.no_grad():
            routing, capacity = self.route(x)
        mask = computed_mask(routing, capacity)
        weights = routing.combine_weights if mask is None else routing.combine_weights * mask
        picks = torch.zeros(self.num_experts, dtype=torch.int64)
        mass = torch.zeros(self.num_experts, dtype=torch.float64)
        flat = routing.expert_indices.reshape(-1).cpu()
        valid = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
        picks.index_add_(0, flat[valid], torch.ones_like(flat[valid]))
        mass.index_add_(0, flat[valid], weights.reshape(-1).cpu()[valid].double())
        chosen = [e for e in range(self.num_experts) if picks[e] > 0]
        chosen.sort(key=lambda e: (int(picks[e]), float(mass[e])))
        return chosen[-self.cache.cache_size:]

    def prefetch(self, x: torch.Tensor) -> list[int]:
        """Predict this layer's experts from ``x`` (a guess at its input, e.g. the previous layer's hidden
        state through this layer's norm) and load them ahead; returns the prediction, scored against the
        next forward in ``cache.stats``."""
        predicted = self.predict(x)
        for e in predicted:
            self.cache.prefetch(e)
        self._prediction = predicted
        return predicted

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"cache_size={self.cache.cache_size}, policy={self.cache.policy!r}, "
                f"directory={str(self.store.directory)!r}")


# ------------------------------------------------------------------------------------------------- model


def _moe_blocks(model: nn.Module) -> list[int]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model must be a TinyTransformer (with .blocks), got {type(model).__name__}")
    return [i for i, block in enumerate(blocks) if isinstance(block.ffn, MoE)]


def save_model_experts(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write every MoE layer of a :class:`~moe_ref.book.model.TinyTransformer` to ``directory/layer{i}``."""
    directory = Path(directory)
    layers = _moe_blocks(model)
    if not layers:
        raise ValueError("model has no MoE layer to offload")
    for i in layers:
        save_experts(model.blocks[i].ffn, directory / f"layer{i}")
    return directory


def offload_model(model: nn.Module, directory: str | os.PathLike, cache_size: int, *, policy: str = "lru",
                  prefetch: bool = False, seed: int = 0) -> nn.Module:
    """An inference copy of ``model`` whose MoE layers are :class:`OffloadedMoE` reading ``directory``.

    ``directory`` is what :func:`save_model_experts` wrote for ``model``. The copy holds no routed expert in
    memory beyond its caches; ``model`` is left as it was. With ``prefetch``, before block ``i``'s FFN runs, the
    next MoE block's router is applied to block ``i``'s residual stream through that block's own norm
    (``ln2``), and the predicted experts are loaded: a look-ahead of one layer, skipping that block's
    attention (the residual stream changes little across one block).
    """
    layers = _moe_blocks(model)
    if not layers:
        raise ValueError("model has no MoE layer to offload")
    directory = Path(directory)
    ffns = {i: model.blocks[i].ffn for i in layers}
    try:  # copy everything but the MoE layers (their experts are what stays on disk)
        for i in layers:
            model.blocks[i].ffn = nn.Identity()
        clone = copy.deepcopy(model)
    finally:
        for i, ffn in ffns.items():
            model.blocks[i].ffn = ffn
    for i in layers:
        clone.blocks[i].ffn = OffloadedMoE(ffns[i], directory / f"layer{i}", cache_size, policy=policy, seed=seed + i)
    clone.requires_grad_(False)
    clone.eval()
    clone.prefetch_handles = []
    if prefetch:
        for i, j in zip(layers, layers[1:]):
            nxt = clone.blocks[j]

            def hook(_module, args, nxt=nxt):
                nxt.ffn.prefetch(nxt.ln2(args[0]))

            clone.prefetch_handles.append(clone.blocks[i].ln2.register_forward_pre_hook(hook))
    return clone


def offloaded_layers(model: nn.Module) -> list[OffloadedMoE]:
    """The :class:`OffloadedMoE` layers of a model, in order."""
    return [m for m in model.modules() if isinstance(m, OffloadedMoE)]


def total_stats(model: nn.Module) -> CacheStats:
    """The counters of every offloaded layer of ``model``, summed."""
    total = CacheStats()
    for layer in offloaded_layers(model):
        total = total.add(layer.cache.stats)
    return total


# ------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, after_prompt: Callable[[], None] | None = None) -> tuple[torch.Tensor, float]:
    """Batch-1 generation with :mod:`moe_ref.decode`'s key-value cache, timed, for measuring a decode's experts.

    The prompt runs through the model once, then each new token runs through every block alone, attending to
    the cached keys and values, so each MoE layer sees one token per step, as in real decoding.

    Args:
        model: a :class:`~moe_ref.book.model.TinyTransformer` (in-memory or offloaded), no dropout.
        prompt: ``[1, P]`` int64 token ids, ``P + new_tokens <= block_size``.
        new_tokens: tokens to generate.
        temperature: 0 for greedy, else sampling from ``softmax(logits / temperature)``.
        seed: of the sampling.
        after_prompt: called once the prompt has run (e.g. to snapshot counters), before the timed decode.

    Returns:
        ``(tokens [1, P + new_tokens], seconds of the decode steps, without the prompt)``.
    """
    from .decode import KVCache, forward_cached, sample

    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must be a [1, P] tensor of token ids, got {getattr(prompt, 'shape', prompt)}")
    _checks.positive_int("new_tokens", new_tokens)
    temperature = _checks.finite_float("temperature", temperature, minimum=0.0)
    config = model.config
    if prompt.shape[1] + new_tokens > config.block_size:
        raise ValueError(f"prompt length + new_tokens must be <= block_size={config.block_size}, got "
                         f"{prompt.shape[1]} + {new_tokens}")
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(model, 1)
    was_training = model.training
    model.eval()

    def next_token(idx: torch.Tensor) -> torch.Tensor:
        logits = forward_cached(model, idx, cache)[:, -1]  # [1, vocab]
        return sample(logits, temperature=temperature, generator=generator)

    try:
        tokens = [prompt]
        nxt = next_token(prompt)
        if after_prompt is not None:
            after_prompt()
        start = time.perf_counter()
        for n in range(new_tokens):
            tokens.append(nxt)
            if n + 1 < new_tokens:
                nxt = next_token(nxt)
        return torch.cat(tokens, 1), time.perf_counter() - start
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ measurements
# The chapter's experiment: `python -m moe_ref.offload --out chapters/data/offload.json`. It imports the book's
# model and training loop lazily, so the layer above does not depend on them.

MEASURE = dict(block_size=128, d_model=64, n_layers=2, n_heads=4, d_hidden=64, activation="relu",
               num_experts=8, k=2, steps=400, batch_size=16, lr=6e-3, warmup=30, prompt_tokens=16,
               new_tokens=112, temperature=0.8, live_sizes=[1, 2, 4, 8])
"""The measured model (chapter 1's transformer, 2 MoE layers of 8 experts, top-2), its training and decoding."""


def tiny_moe_model(seed: int, settings: dict = MEASURE):
    """The measured model, initialised from ``seed``: every FFN an MoE layer of ``num_experts`` experts."""
    from .book.model import ModelConfig, TinyTransformer
    from .losses import AuxLossConfig

    s = settings
    config = ModelConfig(block_size=s["block_size"], d_model=s["d_model"], n_layers=s["n_layers"],
                         n_heads=s["n_heads"], d_hidden=s["d_hidden"], activation=s["activation"])
    torch.manual_seed(seed)
    return TinyTransformer(config, lambda i: MoE(s["d_model"], s["d_hidden"], s["num_experts"], s["k"],
                                                 activation=s["activation"], init_std=0.02,
                                                 aux_losses=AuxLossConfig(balance_coef=0.01)))


def train_tiny_moe(seed: int, corpus, settings: dict = MEASURE):
    """Train :func:`tiny_moe_model` (``seed``) on ``corpus``; returns ``(model in eval mode, val loss)``."""
    from .book.train import TrainConfig, train

    s = settings
    model = tiny_moe_model(seed, s)
    history = train(model, corpus, TrainConfig(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                                               warmup=s["warmup"], eval_every=s["steps"], eval_batches=2,
                                               seed=seed), progress=False)
    return model.eval(), history.val_loss[-1]


def prompts_of(corpus, length: int, seed: int) -> list[torch.Tensor]:
    """One validation prompt ``[1, length]`` per domain, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for domain in corpus.domains:
        tokens = corpus.val[domain]
        start = int(torch.randint(len(tokens) - length, (1,), generator=g))
        out.append(tokens[start:start + length].long().unsqueeze(0))
    return out


def record_trace(model, directory, prompt: torch.Tensor, new_tokens: int, *, temperature: float, seed: int):
    """Decode once through an offloaded copy of ``model`` (all experts cached, prefetch on) and record, for
    each MoE layer, the experts each forward touched and the experts predicted for it beforehand.

    Returns ``(tokens, traces, predictions)``: ``traces[l][i]`` the experts of forward ``i`` of layer ``l``
    (forward 0 is the prompt), ``predictions[l][i]`` the prediction before it (empty for the first layer).
    """
    num_experts = max(m.num_experts for m in model.modules() if isinstance(m, MoE))
    off = offload_model(model, directory, num_experts, prefetch=True)
    layers = offloaded_layers(off)
    traces, predictions = [[] for _ in layers], [[] for _ in layers]
    for l, layer in enumerate(layers):
        def before(module, _args, l=l):
            predictions[l].append(list(module._prediction or []))

        def after(module, _args, _out, l=l):
            traces[l].append(list(module.last_touched))

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
    tokens, _ = generate(off, prompt, new_tokens, temperature=temperature, seed=seed)
    return tokens, traces, predictions


def _decode_run(model, directory, prompt, settings, cache_size: int | None, prefetch: bool, seed: int):
    """Tokens/s of one decode (``cache_size=None``: the in-memory model) and, offloaded, the decode's counters."""
    target = model if cache_size is None else offload_model(model, directory, cache_size, prefetch=prefetch)

    def reset():
        for layer in offloaded_layers(target):
            layer.cache.stats = CacheStats()

    tokens, seconds = generate(target, prompt, settings["new_tokens"], temperature=settings["temperature"],
                               seed=seed, after_prompt=reset)
    return tokens, seconds, [layer.cache.stats for layer in offloaded_layers(target)]


def measure_model(model, directory, prompts, settings: dict = MEASURE, *, seed: int = 0,
                  live_sizes=None) -> dict:
    """Hit rates against cache size (every size, three policies, LRU with prefetch) replayed from decode
    traces, and live decodes (tokens/s, and the live counters, which must equal the replayed ones).

    ``directory`` holds ``model``'s experts (:func:`save_model_experts`). Returns a JSON-friendly dict.
    """
    E, k = settings["num_experts"], settings["k"]
    live_sizes = settings["live_sizes"] if live_sizes is None else live_sizes
    traces = []
    for i, prompt in enumerate(prompts):
        tokens, trace, predicted = record_trace(model, directory, prompt, settings["new_tokens"],
                                                temperature=settings["temperature"], seed=seed + i)
        traces.append((tokens, trace, predicted))
    sizes = list(range(1, E + 1))
    replay: dict[str, list[float]] = {}
    for name, policy, ahead in [("lru", "lru", False), ("fifo", "fifo", False), ("random", "random", False),
                                ("lru+prefetch", "lru", True)]:
        rates = []
        for C in sizes:
            total = CacheStats()
            for _, trace, predicted in traces:
                for l, (layer_trace, layer_pred) in enumerate(zip(trace, predicted)):
                    total = total.add(simulate(layer_trace, C, E, policy=policy, seed=seed + l, count_from=1,
                                               predictions=layer_pred if ahead else None))
            rates.append(total.hit_rate)
        replay[name] = rates
    recall = CacheStats()
    for _, trace, predicted in traces:
        for layer_trace, layer_pred in zip(trace[1:], predicted[1:]):
            for touched, guess in zip(layer_trace[1:], layer_pred[1:]):
                recall.predicted += len(guess)
                recall.predicted_right += len(set(guess) & set(touched))
                recall.touched_after_prediction += len(touched)
    live = []
    for C, ahead in [(None, False)] + [(C, a) for C in live_sizes for a in (False, True)]:
        seconds, total = 0.0, CacheStats()
        for i, prompt in enumerate(prompts):
            tokens, s, stats = _decode_run(model, directory, prompt, settings, C, ahead, seed + i)
            if not torch.equal(tokens, traces[i][0]):
                raise AssertionError("an offloaded decode produced other tokens than the in-memory model")
            seconds += s
            for st in stats:
                total = total.add(st)
        row = {"cache_size": C, "prefetch": ahead, "tokens_per_second": len(prompts) * settings["new_tokens"] / seconds,
               "hit_rate": total.hit_rate if C else None, "bytes_read_per_token":
               total.bytes_read / (len(prompts) * settings["new_tokens"]), "load_seconds": total.load_seconds}
        if C is not None:
            expected = replay["lru+prefetch" if ahead else "lru"][C - 1]
            if abs(total.hit_rate - expected) > 1e-12:
                raise AssertionError(f"live hit rate {total.hit_rate} differs from the replayed {expected}")
        live.append(row)
    tokens = len(prompts) * settings["new_tokens"]
    return {"cache_sizes": sizes, "hit_rate": replay, "prediction_recall": recall.prediction_recall,
            "prediction_precision": recall.prediction_precision, "live": live, "decoded_tokens": tokens,
            "expert_bytes": offloaded_layers(offload_model(model, directory, 1))[0].store.expert_bytes(),
            "uniform": [uniform_hit_rate(C, E, k) for C in sizes]}


def run_experiment(seeds: int = 3, settings: dict = MEASURE, *, workdir=None, log=print) -> dict:
    """Train ``seeds`` models and measure each (:func:`measure_model`); the result file's content."""
    import tempfile

    from .book.data import build_corpus
    from .experiments.results import SCHEMA

    corpus = build_corpus(400_000)
    runs = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for seed in range(seeds):
            start = time.perf_counter()
            model, val_loss = train_tiny_moe(seed, corpus, settings)
            trained = time.perf_counter() - start
            directory = save_model_experts(model, Path(tmp) / f"seed{seed}")
            prompts = prompts_of(corpus, settings["prompt_tokens"], seed)
            result = measure_model(model, directory, prompts, settings, seed=seed)
            runs.append({"arm": f"moe{settings['num_experts']}", "seed": seed, "val_loss": val_loss,
                         "train_seconds": trained, **result})
            log(f"seed {seed}: val loss {val_loss:.3f}, LRU hit rate at C=k: "
                f"{result['hit_rate']['lru'][settings['k'] - 1]:.3f}, with prefetch "
                f"{result['hit_rate']['lru+prefetch'][settings['k'] - 1]:.3f}")
    return {"schema": SCHEMA, "experiment": "offload", "settings": dict(settings, seeds=list(range(seeds))),
            "runs": runs}


def main(argv=None) -> None:
    """``python -m moe_ref.offload [--out chapters/data/offload.json] [--seeds 3]``."""
    import argparse

    from .experiments.results import dumps, git_commit, provenance

    parser = argparse.ArgumentParser(prog="python -m moe_ref.offload", description=main.__doc__)
    parser.add_argument("--out", default="chapters/data/offload.json")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    commit, start = git_commit(), time.perf_counter()
    result = run_experiment(args.seeds)
    command = f"python -m moe_ref.offload --out {args.out} --seeds {args.seeds}"
    result = {**result, "provenance": provenance(command, time.perf_counter() - start, "cpu", commit)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(dumps(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

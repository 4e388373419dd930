"""The property matrix of issue #8: router x implementation x backend x capacity x dtype (x shared, padding).

A seeded sweep (``pytest.mark.parametrize``; every case draws its weights and input from a seed derived from
its id, so a failure reproduces alone with ``-k``). For every case of :data:`MATRIX`:

1. the forward output equals the independent float64 per-token reference of ``conftest.reference_output``,
   and the capacity decisions (which pairs are kept, how many are dropped) equal a plain-Python recount;
2. the gradients (input and every parameter, auxiliary losses included) equal those of the same module with
   ``impl="naive"``, and in float64 a central finite difference along a random direction;
3. ``copy.deepcopy`` (with a live graph, and after backward) and a ``state_dict`` round trip (strict, through
   ``torch.save``) into a freshly built module reproduce the outputs and buffers exactly.

On subsets of the same matrix: ``torch.compile(backend="aot_eager")`` (a diagonal: every router kind, every
implementation and backend, every capacity; a compile costs seconds), ``torch.autocast`` in bfloat16 (every
implementation on one module), non-finite real and padding tokens, empty inputs, and a gradient path when
every pair is dropped or every token is padding.

The (shared experts, padding) variants are rotated over the matrix Latin-square fashion rather than
multiplied in (see :func:`_cases`). 
"""

from __future__ import annotations

import copy
import io
import math
import zlib
from dataclasses import dataclass

import pytest
import torch
from torch.func import functional_call

from conftest import assert_every_drop_counted, close64, reference_output
from moe_ref import IMPLS, AuxLossConfig, CapacityConfig, MoE, RouterConfig, SharedExpertConfig
from moe_ref.capacity import CapacityRecord

D_MODEL, D_HIDDEN, E, K = 16, 24, 4, 2
BATCH, SEQ = 3, 5
LENGTHS = (5, 3, 4)  # real tokens per sequence when the case pads (right padding)

#: Router kinds; "noisy_eval" is the noisy router in eval mode (no noise), every other one runs in train mode.
ROUTERS = {
    "softmax": RouterConfig("softmax"),
    "noisy": RouterConfig("noisy"),
    "noisy_eval": RouterConfig("noisy"),
    "sigmoid": RouterConfig("sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.0),
    "expert_choice": RouterConfig("expert_choice", capacity_factor=1.25),
}
TOKEN_CHOICE = [r for r in ROUTERS if r != "expert_choice"]
NO_GRAD_IN_EVAL = {"router.w_noise"}  # the noisy router draws no noise in eval mode
#: (impl, backend): every implementation, the grouped one with both CPU backends.
IMPL_BACKENDS = [("grouped", "loop"), ("grouped", "torch")] + [(impl, None) for impl in IMPLS if impl != "grouped"]
assert {impl for impl, _ in IMPL_BACKENDS} == set(IMPLS)
CAPACITIES = {
    "dropless": None,
    "seq0.75": CapacityConfig(capacity_factor=0.75, group="sequence"),
    "batch1.0score": CapacityConfig(capacity_factor=1.0, group="batch", drop_priority="score"),
}
DTYPES = {"f32": torch.float32, "f64": torch.float64}
#: Every auxiliary loss on, so that each of their gradients is compared too.
AUX = AuxLossConfig(balance_coef=0.01, seq_balance_coef=1e-3, z_coef=1e-3)


@dataclass(frozen=True)
class Case:
    router: str
    impl: str
    backend: str | None
    capacity: str
    dtype: str
    shared: bool
    padding: bool

    @property
    def id(self) -> str:
        impl = self.impl if self.backend is None else f"{self.impl}[{self.backend}]"
        extras = "-shared" * self.shared + "-pad" * self.padding
        return f"{self.router}-{impl}-{self.capacity}-{self.dtype}{extras}"

    __str__ = id.fget

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def build(self, seed: int | None = None, **overrides) -> MoE:
        """The module of this case, initialised from ``seed`` (default: the case's own)."""
        torch.manual_seed(self.seed if seed is None else seed)
        kw = dict(router=ROUTERS[self.router], capacity=CAPACITIES[self.capacity],
                  shared=SharedExpertConfig(1, 8, gate=True) if self.shared else None, aux_losses=AUX,
                  impl=self.impl, backend=self.backend)
        moe = MoE(D_MODEL, D_HIDDEN, E, K, **{**kw, **overrides}).to(self.torch_dtype)
        if self.router == "sigmoid":  # a bias large enough to change the selection, so that losing it shows
            with torch.no_grad():
                moe.router.expert_bias.copy_(0.3 * torch.randn(E))
        return moe.train(self.router != "noisy_eval")

    def inputs(self, shape=(BATCH, SEQ, D_MODEL)) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(shape, generator=g).to(self.torch_dtype)
        mask = None
        if self.padding:
            mask = torch.arange(shape[1]).unsqueeze(0) < torch.tensor(LENGTHS[:shape[0]]).unsqueeze(1)
        return x, mask


def _valid(router: str, capacity: str, dtype: str, backend: str | None) -> bool:
    if router == "expert_choice" and capacity != "dropless":
        return False  # expert choice sets its own capacity
    return not (backend == "torch" and dtype == "f64")  # torch.nn.functional.grouped_mm has no float64


#: (shared experts, padding mask)
EXTRAS = [(False, False), (True, False), (False, True), (True, True)]


def _cases(routers, impl_backends, capacities, dtypes, extras=None):
    """The valid cases of the product. ``extras=None``: one (shared, padding) variant per case, rotated
    Latin-square fashion (the index sum of the other coordinates), so that every router, implementation,
    capacity and dtype meets every variant while the matrix stays one case per combination."""
    cases = []
    for ri, r in enumerate(routers):
        for ii, (impl, backend) in enumerate(impl_backends):
            for ci, cap in enumerate(capacities):
                for di, dt in enumerate(dtypes):
                    if not _valid(r, cap, dt, backend):
                        continue
                    variants = [EXTRAS[(ri + ii + ci + di) % len(EXTRAS)]] if extras is None else extras
                    cases += [Case(r, impl, backend, cap, dt, shared, pad) for shared, pad in variants]
    return cases


MATRIX = _cases(ROUTERS, IMPL_BACKENDS, CAPACITIES, DTYPES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: intra-op threads only spin, which on a shared 2-core runner costs several times the
    work (the whole file runs in a fraction of the time on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def forward(moe: MoE, x: torch.Tensor, mask: torch.Tensor | None, seed: int = 1234) -> torch.Tensor:
    """``moe(x, mask)`` with the global RNG reseeded, so that the noisy router draws the same noise each time."""
    torch.manual_seed(seed)
    return moe(x, mask)


def grads(moe: MoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {name: p.grad for name, p in moe.named_parameters()}
    out["x"] = x.grad
    return out


def assert_grads_close(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        a, b = actual[name], expected[name]
        assert (a is None) == (b is None), name
        if b is not None:
            try:
                close64(a, b.double(), dtype)
            except AssertionError as err:
                raise AssertionError(f"gradient of {name}: {err}") from None


def check_capacity_decisions(moe: MoE, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Recount in plain Python which pairs a capacity keeps (``CapacityConfig`` semantics) and check the record
    and the layer's drop statistics against it. Independent of ``moe_ref.capacity``."""
    r, c, config = moe.last_routing, moe.last_capacity, moe.capacity_config
    T, slots = r.expert_indices.shape
    real = torch.ones(T, slots, dtype=torch.bool) if mask is None else mask.reshape(T, 1).expand(T, slots).clone()
    if r.mask is not None:
        assert not bool((r.mask & ~real).any()), "a padding token was routed"
        real &= r.mask
    assigned = torch.bincount(r.expert_indices[real], minlength=E)
    assert r.tokens_per_expert.tolist() == assigned.tolist()
    if config is None:
        assert c is None and moe.num_dropped == 0 and moe.tokens_dropped == 0
        return
    S = x.shape[-2] if config.group == "sequence" else T
    C = min(S, max(1, math.ceil(config.capacity_factor * S * K / E - 1e-9)))
    assert c.capacity == C
    keep = torch.zeros(T, slots, dtype=torch.bool)
    for start in range(0, T, S):
        tokens = list(range(start, start + S))
        if config.drop_priority == "position":
            order = [(t, j) for t in tokens for j in range(slots)]
        else:
            assert config.drop_priority == "score"
            top = {t: max([float(r.router_scores[t, r.expert_indices[t, j]]) for j in range(slots) if real[t, j]],
                          default=-math.inf) for t in tokens}
            ranked = sorted(tokens, key=lambda t: (-top[t], t))
            order = [(t, j) for j in range(slots) for t in ranked]
        used = [0] * E
        for t, j in order:
            e = int(r.expert_indices[t, j])
            if real[t, j] and used[e] < C:
                keep[t, j] = True
                used[e] += 1
    assert c.keep.tolist() == keep.tolist()
    assert c.dropped.tolist() == (real & ~keep).tolist()
    dropped = int((real & ~keep).sum())
    assert moe.num_dropped == dropped
    assert moe.drop_rate == pytest.approx(dropped / max(int(real.sum()), 1))
    assert moe.tokens_dropped == int(((real & ~keep).any(1) & ~keep.any(1)).sum())
    if config.group == "sequence" and config.capacity_factor < 1:
        assert dropped > 0  # the first sequence is full: 10 pairs for 4 experts x 2 slots


def finite_difference(moe: MoE, x: torch.Tensor, mask, g: torch.Tensor, grad: dict, eps: float = 1e-6) -> None:
    """Float64: the gradient along a random direction of ``sum(out * g) + aux_loss`` equals a central
    difference (the routing is piecewise constant, so a small step does not change it)."""
    gen = torch.Generator().manual_seed(7)
    params = dict(moe.named_parameters())
    buffers = dict(moe.named_buffers())
    direction = {name: torch.randn(p.shape, generator=gen, dtype=p.dtype) for name, p in params.items()}
    direction["x"] = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    predicted = sum(float((grad[n].double() * v).sum()) for n, v in direction.items() if grad[n] is not None)

    def loss(sign: float) -> float:
        p = {n: t.detach() + sign * eps * direction[n] for n, t in params.items()}
        probe = copy.deepcopy(moe)
        torch.manual_seed(1234)
        out = functional_call(probe, {**p, **buffers}, (x.detach() + sign * eps * direction["x"], mask))
        aux = 0.0 if probe.aux_loss is None else float(probe.aux_loss)
        return float((out * g).sum()) + aux

    numeric = (loss(1.0) - loss(-1.0)) / (2 * eps)
    assert numeric == pytest.approx(predicted, rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------
# 1-3: reference, gradients, deepcopy and state_dict, over the whole matrix
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_matrix(case: Case):
    dtype = case.torch_dtype
    moe = case.build()
    x, mask = case.inputs()
    x.requires_grad_(True)
    out = forward(moe, x, mask)
    assert out.dtype == dtype and out.shape == x.shape

    # 1. the float64 per-token reference, and every drop counted
    close64(out, reference_output(moe, x, mask), dtype)
    assert_every_drop_counted(moe)
    check_capacity_decisions(moe, x, mask)
    assert moe.last_routing.router_logits.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if mask is not None:  # padding tokens get the dense paths only
        pad = ~mask.reshape(-1)
        assert not bool(moe.last_routing.combine_weights[pad].any())

    # 3a. deepcopy while the forward's graph is alive
    twin = copy.deepcopy(moe)
    naive = copy.deepcopy(moe)
    naive.impl, naive.backend = "naive", None

    # 2. gradients against impl="naive" (auxiliary losses included: they are attached to the output)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    (out * g).sum().backward()
    got = grads(moe, x)
    no_grad = NO_GRAD_IN_EVAL if case.router == "noisy_eval" else set()
    assert {name for name, v in got.items() if v is None} == no_grad
    x_naive = x.detach().clone().requires_grad_(True)
    out_naive = forward(naive, x_naive, mask)
    close64(out, out_naive.detach().double(), dtype)
    (out_naive * g).sum().backward()
    assert_grads_close(got, grads(naive, x_naive), dtype)
    if dtype == torch.float64:
        finite_difference(moe, x, mask, g, got)

    # 3b. the copies (taken with a live graph, and after backward) compute the same function
    after_backward = copy.deepcopy(moe)
    for clone in (twin, after_backward):
        assert clone.impl == case.impl and clone.backend == case.backend
        torch.testing.assert_close(forward(clone, x.detach(), mask), out.detach(), rtol=0, atol=0)

    # 3c. state_dict round trip (through torch.save, strict) into a freshly built, differently seeded module
    state = moe.state_dict()
    if case.router == "sigmoid":
        assert {"router.expert_bias", "router.load_since_update"} <= state.keys()
        assert int(state["router.load_since_update"].sum()) > 0  # the train forwards counted their load
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = case.build(seed=case.seed + 99)
    with torch.no_grad():
        assert not torch.equal(forward(fresh, x.detach(), mask), out.detach())  # or the round trip shows nothing
    result = fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    before = {name: b.clone() for name, b in moe.named_buffers()}
    assert {name: b.dtype for name, b in fresh.named_buffers()} == {name: b.dtype for name, b in before.items()}
    for name, b in fresh.named_buffers():
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)
    x2 = x.detach().clone().requires_grad_(True)
    out_fresh = forward(fresh, x2, mask)
    out_orig = forward(moe, x.detach().clone().requires_grad_(True), mask)
    torch.testing.assert_close(out_fresh, out_orig, rtol=0, atol=0)
    for name, b in fresh.named_buffers():  # both counted the same load in the same forward
        torch.testing.assert_close(b, dict(moe.named_buffers())[name], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# a gradient path when every pair is dropped or every token is padding
# ---------------------------------------------------------------------------------------------------------

GRAD_PATH = _cases(ROUTERS, IMPL_BACKENDS, CAPACITIES, DTYPES, [(False, True)])


def assert_zero_grads(module, x: torch.Tensor, skip=()) -> None:
    """Backward reached ``x`` and every parameter (a zero gradient, not ``None``: DDP needs every one)."""
    assert x.grad is not None and not bool(x.grad.any())
    for name, p in module.named_parameters():
        if name not in skip:
            assert p.grad is not None and not bool(p.grad.any()), name


@pytest.mark.parametrize("case", GRAD_PATH, ids=str)
def test_grad_path_all_padding(case: Case):
    # no auxiliary loss: attaching it would give the output a gradient path of its own
    moe = case.build(aux_losses=AuxLossConfig(balance_coef=0.0))
    x, _ = case.inputs()
    x.requires_grad_(True)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    out = forward(moe, x, mask)
    assert out.requires_grad and out.grad_fn is not None
    assert not bool(out.detach().any())  # no routed output, no dense path in this case
    assert int(moe.tokens_per_expert.sum()) == 0 and moe.num_dropped == 0 and moe.aux_loss is None
    out.sum().backward()
    assert_zero_grads(moe, x, skip=NO_GRAD_IN_EVAL if case.router == "noisy_eval" else set())


@pytest.mark.parametrize("impl,backend", IMPL_BACKENDS)
@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_grad_path_every_pair_dropped(router, impl, backend):
    case = Case(router, impl, backend, "dropless", "f32", False, False)
    moe = case.build()
    x, _ = case.inputs((BATCH * SEQ, D_MODEL))
    x.requires_grad_(True)
    routing = moe.router(x)
    T = x.shape[0]
    none = torch.zeros(T, K, dtype=torch.bool)
    dropped_all = CapacityRecord(capacity=1, group_size=T, keep=none, positions=torch.full((T, K), -1),
                                 dropped=~none)
    out = IMPLS[impl](moe.experts, x, routing, dropped_all, backend)
    assert out.shape == x.shape and not bool(out.detach().any())
    assert out.requires_grad and out.grad_fn is not None
    out.sum().backward()
    assert_zero_grads(moe, x, skip=NO_GRAD_IN_EVAL if router == "noisy_eval" else set())


# ---------------------------------------------------------------------------------------------------------
# torch.compile (aot_eager): one case per router kind and implementation, float32
# ---------------------------------------------------------------------------------------------------------

def _compile_subset() -> list[Case]:
    """A diagonal of the matrix: every implementation and backend once, every router kind, every capacity.
    (Compiling costs seconds per case: the layer's data-dependent shapes break it into about a dozen graphs.)"""
    return [Case("softmax", "grouped", "loop", "seq0.75", "f32", False, False),
            Case("sigmoid", "grouped", "torch", "batch1.0score", "f32", True, False),
            Case("noisy", "naive", None, "dropless", "f32", False, True),
            Case("expert_choice", "einsum", None, "dropless", "f32", True, True),
            Case("sigmoid", "padded", None, "seq0.75", "f32", False, True)]


COMPILED = _compile_subset()


@pytest.mark.parametrize("case", COMPILED, ids=str)
def test_compile_aot_eager(case: Case):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = case.build()
    compiled_module = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_module, backend=counter)
    x, mask = case.inputs()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    results = []
    for module in (eager, compiled):
        x_ = x.clone().requires_grad_(True)
        out = forward(module, x_, mask)
        (out * g).sum().backward()
        results.append((out.detach(), grads(eager if module is eager else compiled_module, x_)))
    assert counter.frame_count >= 1  # something was compiled, not all run eagerly
    (out_e, grad_e), (out_c, grad_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    assert_grads_close(grad_c, grad_e, torch.float32)

    # the auxiliary losses alone: their gradient must reach the router through the compiled graph
    for module in (eager, compiled_module):
        module.zero_grad()
    aux_grads = []
    for module in (eager, compiled):
        out = forward(module, x.clone().requires_grad_(True), mask)  # as above: no recompilation
        (out * 0).sum().backward()
        aux_grads.append((eager if module is eager else compiled_module).router.gate.weight.grad)
    assert aux_grads[0] is not None and bool(aux_grads[0].abs().sum() > 0)
    assert aux_grads[1] is not None
    torch.testing.assert_close(aux_grads[1], aux_grads[0], rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()  # leave no compiled frames behind for the other test files


# ---------------------------------------------------------------------------------------------------------
# autocast (bfloat16): one module per router, capacity and extras; every implementation on it
# ---------------------------------------------------------------------------------------------------------

AUTOCAST = [Case(r, "naive", None, cap, "f32", shared, pad)
            for r in ROUTERS for cap in CAPACITIES for shared, pad in [(False, False), (True, True)]
            if _valid(r, cap, "f32", None)]


@pytest.mark.parametrize("case", AUTOCAST, ids=lambda c: c.id.replace("-naive", ""))
def test_autocast_bf16(case: Case):
    moe = case.build()
    x, mask = case.inputs()
    outputs = {}
    for impl, backend in IMPL_BACKENDS:
        moe.impl, moe.backend = impl, backend
        x_ = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(moe, x_, mask)
        assert out.dtype == torch.float32, (impl, backend)
        r = moe.last_routing
        assert r.router_logits.dtype == torch.float32 and r.combine_weights.dtype == torch.float32
        close64(out, reference_output(moe, x, mask), torch.bfloat16)
        assert_every_drop_counted(moe)
        out.sum().backward()
        assert x_.grad is not None and x_.grad.dtype == torch.float32
        outputs[(impl, backend)] = out.detach()
    first = outputs[IMPL_BACKENDS[0]]
    for key, out in outputs.items():
        close64(out, first.double(), torch.bfloat16)
    # the bfloat16 compute shows: autocast is not silently ignored
    with torch.no_grad():
        full = forward(moe, x, mask)
    assert not torch.equal(full, first)


# ---------------------------------------------------------------------------------------------------------
# non-finite input: the damage stays with the token that carries it (token choice, dropless)
# ---------------------------------------------------------------------------------------------------------

NONFINITE = _cases(TOKEN_CHOICE, IMPL_BACKENDS, ["dropless"], DTYPES)


BAD_VALUES = {"inf": (math.inf, None), "nan": (math.nan, None), "-inf@3": (-math.inf, 3)}  # whole token, or one entry


def _poison(x: torch.Tensor, token: tuple[int, int], bad: str) -> torch.Tensor:
    value, coordinate = BAD_VALUES[bad]
    x = x.clone()
    if coordinate is None:
        x[token] = value
    else:
        x[token + (coordinate,)] = value
    return x


@pytest.mark.parametrize("bad", list(BAD_VALUES))
@pytest.mark.parametrize("case", NONFINITE, ids=str)
def test_nonfinite_token_stays_local(case: Case, bad: str):
    moe = case.build()
    x, mask = case.inputs()
    token = (0, 1)  # a real token in every padding pattern
    with torch.no_grad():
        clean = forward(moe, x, mask)
        out = forward(moe, _poison(x, token, bad), mask)
    others = torch.ones(BATCH, SEQ, dtype=torch.bool)
    others[token] = False
    assert bool(torch.isfinite(out[others]).all())
    close64(out[others], clean[others].double(), case.torch_dtype)
    assert not bool(torch.isfinite(out[token]).all()) or not torch.equal(out[token], clean[token])


# A non-finite value in a *padding* position (e.g. a fully masked attention row upstream) must change nothing:
# padding is not routed, takes no capacity and counts in no loss. Every router and capacity: padding takes no
# place in any queue, so the real tokens' routing is unchanged.
NONFINITE_PADDING = _cases(ROUTERS, IMPL_BACKENDS, CAPACITIES, DTYPES, [(False, True)])
@pytest.mark.parametrize("case", NONFINITE_PADDING, ids=str)
def test_nonfinite_padding_token_output(case: Case):
    moe = case.build()
    x, mask = case.inputs()
    token = (1, SEQ - 1)  # padding (LENGTHS[1] = 3)
    assert not mask[token]
    with torch.no_grad():
        clean = forward(moe, x, mask)
        out = forward(moe, _poison(x, token, "nan"), mask)
    assert not bool(clean[token].any())  # no shared experts in these cases: padding's output is 0
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


@pytest.mark.parametrize("router", ROUTERS)
def test_nonfinite_padding_token_losses(router: str):
    case = Case(router, "naive", None, "dropless", "f32", False, True)
    moe = case.build()
    x, mask = case.inputs()
    forward(moe, x, mask)
    clean = dict(moe.losses)
    assert clean and all(bool(torch.isfinite(v)) for v in clean.values())
    moe.zero_grad()
    forward(moe, x, mask).sum().backward()
    clean_grad = moe.router.gate.weight.grad.clone()
    moe.zero_grad()
    forward(moe, _poison(x, (1, SEQ - 1), "nan"), mask).sum().backward()
    assert moe.losses.keys() == clean.keys()
    for name, value in moe.losses.items():
        torch.testing.assert_close(value, clean[name], msg=name)
    torch.testing.assert_close(moe.router.gate.weight.grad, clean_grad)  # padding never reaches the gate


# ---------------------------------------------------------------------------------------------------------
# empty input
# ---------------------------------------------------------------------------------------------------------

EMPTY = _cases(ROUTERS, IMPL_BACKENDS, CAPACITIES, DTYPES)


@pytest.mark.parametrize("case", EMPTY, ids=str)
def test_empty_input(case: Case):
    moe = case.build()
    x, mask = case.inputs((2, 0, D_MODEL))
    x.requires_grad_(True)
    out = forward(moe, x, mask)
    assert out.shape == (2, 0, D_MODEL) and out.dtype == case.torch_dtype
    assert moe.tokens_per_expert.tolist() == [0] * E and moe.num_dropped == 0
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape

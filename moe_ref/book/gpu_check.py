"""``python -m moe_ref.bench gpu``: a prepared check of the package on one CUDA GPU, in under 8 minutes.

It runs four sections, each with a time budget (:data:`BUDGETS_S`, seconds; a section stops between two
measurements once its budget or the total's is spent, and records what it skipped rather than overrun):

1. ``correctness``: the ``"triton"`` grouped-matmul backend run natively (no interpreter) in float32, float16
   and bfloat16, forward and backward (``dx`` and ``dw`` through autograd), against an independent float64
   reference written here (:func:`reference_grouped_mm64`, :func:`reference_grads64`: a loop of float64
   matmuls per group, not the package's ``"loop"`` backend), on Mixtral-like problems (E=8, top-2,
   d=4096, d_ff=14336, 512 tokens), fine-grained ones (E=64 and E=256, top-8, d=2048) and decode ones
   (M = 1, 2, 8, 32, 64 rows over 64 experts, most of them empty); ragged random group sizes
   (:func:`~moe_ref.book.bench.random_group_sizes`) with at least one empty group. The ``"torch"`` backend
   is checked too wherever :func:`~moe_ref.kernels.grouped_mm.torch_backend_available` says it runs. An
   error is ``max |out - ref| / max |ref|`` per tensor, against :data:`TOLERANCES` by dtype.
2. ``gmm``: TFLOP/s of the grouped matmuls, forward and forward + backward, for ``triton``, ``torch``, the
   per-expert loop and a dense GEMM of the same FLOPs (:func:`~moe_ref.book.bench.bench_gmm`, bfloat16,
   ``triton.testing.do_bench``) on the shapes of :data:`GPU_GMM_SHAPES`. The Triton kernels' autotune
   cache is cleared before each shape, so each shape tunes its own tiles whatever ran before it.
3. ``layer``: the MoE layer (:func:`~moe_ref.hf.from_hf` of a Mixtral block, with the default backend and
   with each other backend that runs: ``moe_ref_triton``, ``moe_ref_torch``) against ``transformers``'
   ``MixtralSparseMoeBlock`` (eager and grouped_mm experts) and a dense FFN of the same active FLOPs,
   bfloat16, forward and forward + backward at 2048 tokens, forward without gradient at decode batches of
   1 and 64 tokens (:func:`compare_layer`).
4. ``nbval``: chapters 5 and 6 executed under ``pytest --nbval-lax`` in a subprocess, with
   ``TRITON_INTERPRET`` removed from its environment, under a timeout.

The results go to a JSON file (default ``chapters/data/gpu_results.json``): the GPU, its compute capability,
the driver (``nvidia-smi``), CUDA, torch, triton and transformers versions, the date, the
:func:`~moe_ref.experiments.results.provenance` (command, commit, wall time), every section's results and
status (``"ok"``, ``"failed"`` or ``"skipped"``, with a reason), and a summary (:func:`summarize_gmm`): per
shape class the throughput ratios triton/torch and triton/dense, and a suggested ``default_backend``. A text
summary is printed. The exit status is 1 when a section failed.

``--dry-run`` checks the plumbing on the CPU in seconds: tiny shapes, the Triton kernels under Triton's
interpreter (float32 and float16; bfloat16 is recorded as skipped, the interpreter's ``tl.dot`` being wrong
for it), times from ``time.perf_counter``, the layer comparison in float32, and ``pytest --collect-only``
instead of running the notebooks. Its JSON is marked ``"dry_run": true`` and goes to a temporary file unless
``--out`` says otherwise. Its numbers say nothing about any GPU.

Without a GPU and without ``--dry-run`` the command exits with status 2 and writes nothing.

Example::

    python -m moe_ref.bench gpu --out chapters/data/gpu_results.json     # make gpu-check
    python -m moe_ref.bench gpu --dry-run --out /tmp/gpu_dry.json
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

import torch

#: Where the GPU run writes its results by default (relative to the working directory).
DEFAULT_OUT = "chapters/data/gpu_results.json"
#: The sections, in the order they run.
SECTIONS = ("correctness", "gmm", "layer", "nbval")
#: Time budget of each section on the GPU, in seconds; the whole check stops at :data:`TOTAL_BUDGET_S`. Most of
#: the correctness section's time goes to compiling the kernels' autotuning candidates, for each dtype, number of
#: experts and stride pattern; the gmm section reuses the bfloat16 ones.
BUDGETS_S = {"correctness": 140.0, "gmm": 120.0, "layer": 60.0, "nbval": 100.0}
#: The whole GPU check's budget, seconds (the sections' sum; a measurement under way is not interrupted, so
#: the run may exceed it by the longest single measurement).
TOTAL_BUDGET_S = 420.0
#: Budgets of the dry run in seconds, generous for its tiny shapes, which take a few seconds in all.
DRY_BUDGETS_S = {"correctness": 30.0, "gmm": 30.0, "layer": 30.0, "nbval": 30.0}
#: Largest accepted ``max |out - ref| / max |ref|`` per dtype (float32 products are IEEE, not TF32).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
#: The notebooks of the ``nbval`` section, chapters 5 and 6.
#:
#: :meta hide-value:
NOTEBOOKS = ("chapters/05_dispatch_fast.ipynb", "chapters/06_triton_grouped_gemm.ipynb")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_ORDER = (torch.bfloat16, torch.float16, torch.float32)
_BF16_INTERPRETER = "Triton's CPU interpreter gives wrong results for bfloat16 tl.dot; bfloat16 is checked on a GPU"
_REPO = Path(__file__).resolve().parents[2]

#: Correctness problems on the GPU, as ``(name, shape class, tokens, k, experts, d_model, d_ff)``; the decode
#: problems give ``tokens`` rows in all (``k = 1``: M = 1 .. 64 rows over 64 experts).
GPU_CASES = (
    *((f"decode-M{m}", "decode", m, 1, 64, 2048, 1408) for m in (1, 2, 8, 32, 64)),
    ("fine-grained-64", "fine-grained", 256, 8, 64, 2048, 1408),
    ("fine-grained-256", "fine-grained", 256, 8, 256, 2048, 512),
    ("mixtral", "mixtral", 512, 2, 8, 4096, 14336),
)
#: The dry run's tiny correctness problems, same layout (only the last one's ``down`` projection is run too).
DRY_CASES = (
    ("decode-M2", "decode", 2, 1, 8, 32, 16),
    ("fine-grained-16", "fine-grained", 8, 4, 16, 32, 16),
    ("mixtral-tiny", "mixtral", 8, 2, 8, 32, 48),
)
#: Shapes of the ``gmm`` section on the GPU (keys of :data:`~moe_ref.book.bench.GMM_SHAPES`).
GPU_GMM_SHAPES = ("mixtral-8x7b", "fine-grained-64x8", "fine-grained-256x8", "mixtral-decode-32")
#: The dry run's tiny ``gmm`` shape (same layout as :data:`~moe_ref.book.bench.GMM_SHAPES`).
DRY_GMM_SHAPES = {"tiny-mixtral": dict(tokens=8, k=2, experts=8, d_model=32, d_ff=48)}
#: The layer comparison, its shape and runs ``(label, tokens, mode)``; decode inputs are ``[B, 1, d_model]``.
GPU_LAYER = dict(d_model=4096, d_hidden=14336, num_experts=8, k=2, reps=10, warmup=2,
                 runs=(("prefill", 2048, "forward"), ("prefill", 2048, "forward+backward"),
                       ("decode", 1, "forward"), ("decode", 64, "forward")))
#: The dry run's layer comparison, tiny, float32 on the CPU, same layout as :data:`GPU_LAYER`.
DRY_LAYER = dict(d_model=16, d_hidden=32, num_experts=4, k=2, reps=2, warmup=1,
                 runs=(("prefill", 32, "forward"), ("prefill", 32, "forward+backward"),
                       ("decode", 1, "forward"), ("decode", 4, "forward")))
#: Candidates of :func:`compare_layer`, in table order.
LAYER_CANDIDATES = ("moe_ref", "moe_ref_triton", "moe_ref_torch", "hf_eager", "hf_grouped_mm", "dense")


# --- correctness ------------------------------------------------------------------------------------------

def reference_grouped_mm64(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``out[group e] = x[group e] @ w[e]`` in float64, one matmul per group.

    Args:
        x: ``[M, K]``, any float dtype (converted to float64).
        w: ``[E, K, N]``.
        counts: ``E`` group sizes summing to ``M``.

    Returns:
        ``[M, N]`` float64.
    """
    x64, w64 = x.detach().double(), w.detach().double()
    out = torch.zeros(x64.shape[0], w64.shape[2], dtype=torch.float64, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = x64[start:start + n] @ w64[e]
        start += n
    return out


def reference_grads64(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, counts: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``sum(dy * out)`` in float64, by their formulas (no autograd).

    ``dx[group e] = dy[group e] @ w[e]^T`` ``[M, K]`` and ``dw[e] = x[group e]^T @ dy[group e]``
    ``[E, K, N]`` (zeros for an empty group); ``x`` ``[M, K]``, ``w`` ``[E, K, N]``, ``dy`` ``[M, N]``.
    """
    x64, w64, dy64 = x.detach().double(), w.detach().double(), dy.detach().double()
    dx, dw = torch.zeros_like(x64), torch.zeros_like(w64)
    start = 0
    for e, n in enumerate(counts):
        if n:
            dx[start:start + n] = dy64[start:start + n] @ w64[e].T
            dw[e] = x64[start:start + n].T @ dy64[start:start + n]
        start += n
    return dx, dw


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (0 for equal tensors; the absolute error if ``expected`` is 0)."""
    if actual.shape != expected.shape:
        raise ValueError(f"actual has shape {tuple(actual.shape)}, expected has {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    err = float((actual.double() - expected).abs().max())
    scale = float(expected.abs().max())
    return err / scale if scale > 0 else err


def with_empty_group(counts: list[int]) -> list[int]:
    """``counts`` unchanged if a group is empty, else with group 1's rows moved to group 0 (same total)."""
    counts = list(counts)
    if len(counts) < 2:
        raise ValueError(f"counts needs at least 2 groups to hold an empty one, got {counts}")
    if 0 not in counts:
        counts[0] += counts[1]
        counts[1] = 0
    return counts


def _call_backend(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """The kernel under test (a seam for the tests): :func:`~moe_ref.kernels.grouped_mm.grouped_mm`."""
    from ..kernels.grouped_mm import grouped_mm
    return grouped_mm(x, w, offsets, backend=backend)


def _problems(case: tuple) -> list[dict]:
    name, shape_class, tokens, k, experts, d_model, d_ff = case
    from .bench import random_group_sizes
    counts = with_empty_group(random_group_sizes(tokens, k, experts, seed=0))
    return [dict(case=name, shape_class=shape_class, projection=proj, K=K, N=N, E=experts, M=sum(counts),
                 counts=counts) for proj, K, N in (("up", d_model, d_ff), ("down", d_ff, d_model))]


def check_problem(problem: dict, dtype: torch.dtype, backend: str, device: str | torch.device, seed: int = 0
                  ) -> dict:
    """Run one grouped matmul forward and backward with ``backend``; compare with the float64 reference.

    Args:
        problem: ``{"K", "N", "E", "counts", ...}`` (as :func:`correctness_problems` builds); the other keys
            are copied into the record.
        dtype: float32, float16 or bfloat16.
        backend: ``"triton"`` or ``"torch"`` (any backend of :func:`~moe_ref.kernels.grouped_mm.grouped_mm`).
        device: where to run.
        seed: the inputs' random generator.

    Returns:
        The record of the problem's keys, ``dtype``, ``backend``, ``errors`` ``{"out", "dx", "dw"}`` (relative
        errors, :func:`relative_error`), ``max_rel_err``, ``tol`` (:data:`TOLERANCES`), ``passed``,
        ``empty_groups`` and ``seconds``.
    """
    if dtype not in TOLERANCES:
        raise TypeError(f"dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    start = time.perf_counter()
    counts, K, N, E = problem["counts"], problem["K"], problem["N"], problem["E"]
    M = sum(counts)
    g = torch.Generator(device=device).manual_seed(seed + 1000 * K + N + M)
    x = torch.randn(M, K, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(E, K, N, generator=g, device=device) * K ** -0.5).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g, device=device).to(dtype)
    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    y = _call_backend(x, w, offsets, backend)
    y.backward(dy)
    ref = reference_grouped_mm64(x, w, counts)
    dx_ref, dw_ref = reference_grads64(x, w, dy, counts)
    errors = {"out": relative_error(y.detach(), ref),
              "dx": relative_error(x.grad, dx_ref) if x.grad is not None else float("inf"),
              "dw": relative_error(w.grad, dw_ref) if w.grad is not None else float("inf")}
    worst = max(errors.values())
    tol = TOLERANCES[dtype]
    record = {key: value for key, value in problem.items() if key != "counts"}
    record.update(dtype=_DTYPE_NAMES[dtype], backend=backend, errors=errors, max_rel_err=worst, tol=tol,
                  passed=bool(worst <= tol), empty_groups=sum(1 for c in counts if c == 0),
                  largest_group=max(counts), seconds=round(time.perf_counter() - start, 3))
    return record


def correctness_problems(dry_run: bool) -> list[dict]:
    """The problems of the correctness section, cheapest first: both projections of every case (the dry run:
    the ``up`` projections, and the last case's ``down``)."""
    if dry_run:
        problems = [p for case in DRY_CASES for p in _problems(case)]
        return [p for p in problems if p["projection"] == "up" or p["case"] == DRY_CASES[-1][0]]
    return [p for case in GPU_CASES for p in _problems(case)]


def check_correctness(problems: list[dict], *, device: str | torch.device, dtypes: tuple = tuple(TOLERANCES),
                      backends: tuple[str, ...] = ("triton", "torch"), triton_skip: str | None = None,
                      deadline: float | None = None) -> dict:
    """Check ``backends`` on ``problems`` in ``dtypes`` (:func:`check_problem`), until ``deadline``.

    The checks run in order of priority, so that a budget spent early still covers every shape class: first
    the ``up`` projection of each shape class's first case in bfloat16, float16 and float32, then the rest
    in the same dtype order.

    Args:
        problems: from :func:`correctness_problems`.
        device: ``"cuda"`` (native kernels) or ``"cpu"`` (the Triton kernels under the interpreter).
        dtypes: a subset of :data:`TOLERANCES`'s keys.
        backends: ``"triton"`` and/or ``"torch"``; ``"torch"`` runs only where
            :func:`~moe_ref.kernels.grouped_mm.torch_backend_available`, ``"triton"`` in bfloat16 only on CUDA.
        triton_skip: a reason to skip every ``"triton"`` check (e.g. no interpreter), or ``None``.
        deadline: a ``time.perf_counter()`` value after which the remaining checks are skipped.

    Returns:
        ``{"status", "cases", "skipped", "tolerances"}``: ``status`` is ``"failed"`` if a check failed or
        raised, ``"ok"`` if at least one ran and all passed, else ``"skipped"``; ``cases`` the records of
        :func:`check_problem` (or ``{..., "passed": False, "error"}`` for one that raised); ``skipped``
        ``{"case", "projection", "dtype", "backend", "reason"}``.
    """
    from ..kernels.grouped_mm import torch_backend_available

    device = torch.device(device)
    for dtype in dtypes:
        if dtype not in TOLERANCES:
            raise TypeError(f"dtypes must be among {list(_DTYPE_NAMES.values())}, got {dtype}")
    cases, skipped = [], []
    first = {}
    for p in problems:
        first.setdefault(p["shape_class"], p["case"])
    order = sorted(((0 if p["case"] == first[p["shape_class"]] and p["projection"] == "up" else 1,
                     _DTYPE_ORDER.index(dtype), i, p, dtype) for i, p in enumerate(problems) for dtype in dtypes),
                   key=lambda item: item[:3])
    for *_, problem, dtype in order:
        for backend in backends:
            where = dict(case=problem["case"], projection=problem["projection"], dtype=_DTYPE_NAMES[dtype],
                         backend=backend)
            reason = None
            if backend == "triton" and triton_skip:
                reason = triton_skip
            elif backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
                reason = _BF16_INTERPRETER
            elif backend == "torch" and not torch_backend_available(dtype, device):
                reason = f"torch.nn.functional.grouped_mm does not support {dtype} on {device.type}"
            elif deadline is not None and time.perf_counter() > deadline:
                reason = "time budget spent"
            if reason:
                skipped.append({**where, "reason": reason})
                continue
            try:
                cases.append(check_problem(problem, dtype, backend, device))
            except Exception as error:  # noqa: BLE001 (recorded as a failure; the other checks go on)
                cases.append({**where, "passed": False, "error": f"{type(error).__name__}: {error}"})
            finally:
                _free(device)
    status = "failed" if any(not c["passed"] for c in cases) else ("ok" if cases else "skipped")
    return dict(status=status, cases=cases, skipped=skipped,
                tolerances={_DTYPE_NAMES[d]: t for d, t in TOLERANCES.items()})


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- gmm throughput ---------------------------------------------------------------------------------------

def perf_counter_ms(fn, *, reps: int = 2, warmup: int = 1, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` calls after ``warmup``, by ``time.perf_counter``
    (the device synchronised around each call on CUDA); the dry run's stand-in for ``do_bench``."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _reset_autotune() -> None:
    """Forget the Triton kernels' autotuned tiles, so that each shape tunes its own whatever ran before it."""
    module = sys.modules.get("moe_ref.kernels.triton_gmm")
    for name in ("_gmm_kernel", "_gmm_dw_kernel"):
        cache = getattr(getattr(module, name, None), "cache", None)
        if isinstance(cache, dict):
            cache.clear()


def run_gmm(*, dry_run: bool, triton_skip: str | None, deadline: float | None, verbose: bool = True) -> dict:
    """The ``gmm`` section: :func:`~moe_ref.book.bench.bench_gmm` shape by shape until ``deadline``.

    On the GPU: :data:`GPU_GMM_SHAPES` in bfloat16 with ``do_bench``; in the dry run :data:`DRY_GMM_SHAPES`
    on the CPU in float32 with :func:`perf_counter_ms`. Returns ``{"status", "config", "rows", "skipped"}``
    (``rows`` as in ``bench_gmm``'s ``results``).
    """
    from ..kernels.grouped_mm import torch_backend_available
    from .bench import GMM_CANDIDATES, GMM_SHAPES, bench_gmm

    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    table = DRY_GMM_SHAPES if dry_run else GMM_SHAPES
    shapes = tuple(DRY_GMM_SHAPES) if dry_run else GPU_GMM_SHAPES
    skipped = []
    candidates = []
    for name in GMM_CANDIDATES:
        if name == "triton" and triton_skip:
            skipped.append(dict(candidate=name, reason=triton_skip))
        elif name == "torch" and not torch_backend_available(dtype, device):
            skipped.append(dict(candidate=name, reason=f"torch grouped_mm does not support {dtype} on {device}"))
        else:
            candidates.append(name)
    kwargs = dict(device=device, dtype=dtype, shape_table=table, verbose=verbose)
    if dry_run:
        kwargs["timer"] = lambda fn: perf_counter_ms(fn, reps=1, warmup=0, device=device)
    else:
        kwargs.update(warmup_ms=10, rep_ms=50)
    rows, errors = [], []
    for shape in shapes:
        if deadline is not None and time.perf_counter() > deadline:
            skipped.append(dict(shape=shape, reason="time budget spent"))
            continue
        _reset_autotune()
        try:
            rows += bench_gmm((shape,), tuple(candidates), **kwargs)["results"]
        except Exception as error:  # noqa: BLE001
            errors.append(dict(shape=shape, error=f"{type(error).__name__}: {error}"))
        finally:
            _free(torch.device(device))
    status = "failed" if errors else ("ok" if rows else "skipped")
    config = dict(shapes={s: table[s] for s in shapes}, candidates=candidates, dtype=_DTYPE_NAMES[dtype],
                  device=device, timer="perf_counter" if dry_run else "triton.testing.do_bench")
    return dict(status=status, config=config, rows=rows, skipped=skipped, errors=errors)


def summarize_gmm(rows: list[dict]) -> dict:
    """Per shape class, throughput ratios of ``triton`` and a suggested ``default_backend``.

    Args:
        rows: ``bench_gmm`` result rows (``shape``, ``projection``, ``candidate``, ``mode``, ``ms``).

    Returns:
        The summary, a dict
        ``{"shapes": {shape: {"modes": {mode: {"triton_over_torch", "triton_over_dense", "triton_over_loop"}},
        "default_backend"}}, "default_backend"}``. A ratio is the other candidate's total time over the
        projections divided by triton's: triton's TFLOP/s over the other's, above 1 when triton is faster;
        ``None`` where either was not measured on every projection. A shape suggests ``"triton"`` only when
        ``triton_over_torch >= 1`` in every mode measured, else ``"torch"``; the overall suggestion is
        ``"triton"`` only when every shape suggests it.
    """
    if not isinstance(rows, list):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    totals: dict = {}
    projections: dict = {}
    for r in rows:
        key = (r["shape"], r["mode"])
        projections.setdefault(key, set()).add(r["projection"])
        totals.setdefault(key, {}).setdefault(r["candidate"], {})[r["projection"]] = float(r["ms"])
    shapes: dict = {}
    for (shape, mode), by_candidate in totals.items():
        needed = projections[(shape, mode)]

        def total(name):
            times = by_candidate.get(name, {})
            return sum(times.values()) if set(times) == needed else None

        triton = total("triton")
        ratios = {f"triton_over_{other}": (None if triton is None or total(other) is None or triton <= 0
                                           else total(other) / triton) for other in ("torch", "dense", "loop")}
        shapes.setdefault(shape, {"modes": {}})["modes"][mode] = ratios
    for entry in shapes.values():
        vs_torch = [m["triton_over_torch"] for m in entry["modes"].values()]
        entry["default_backend"] = "triton" if all(v is not None and v >= 1.0 for v in vs_torch) else "torch"
    overall = "triton" if shapes and all(e["default_backend"] == "triton" for e in shapes.values()) else "torch"
    return dict(shapes=shapes, default_backend=overall,
                rule="triton where it was measured at least as fast as torch in every mode, else torch")


# --- the MoE layer ----------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_layer(d_model: int, d_hidden: int, num_experts: int, k: int, runs: tuple, *, device: str = "cuda",
                  dtype: torch.dtype = torch.bfloat16, reps: int = 10, warmup: int = 2, inner: int = 5,
                  seed: int = 0, deadline: float | None = None) -> dict:
    """Time the MoE layer against ``transformers``' Mixtral block and a dense FFN on ``device`` in ``dtype``.

    Candidates (:data:`LAYER_CANDIDATES`): ``moe_ref`` (:func:`~moe_ref.hf.from_hf` of the block: the same
    weights; default backend), ``moe_ref_triton`` and ``moe_ref_torch`` (the same with that backend, where it
    is not the default and runs; triton only on CUDA), ``hf_eager``, ``hf_grouped_mm`` and ``dense`` (an FFN of width
    ``k * d_hidden``). Each repetition times every candidate once in a rotating order; a forward-only sample is
    ``inner`` calls without gradient in eval mode; a forward + backward sample one call in training mode.
    The device is synchronised around every sample.

    Args:
        d_model, d_hidden, num_experts, k: the Mixtral block's shape.
        runs: ``(label, tokens, mode)`` triples; ``mode`` is ``"forward"`` or ``"forward+backward"``; the input
            is ``[1, tokens, d_model]``, or ``[tokens, 1, d_model]`` when ``label`` is ``"decode"``.
        device, dtype: where and in what (the router of ``moe_ref`` stays float32).
        reps, warmup: timed and untimed repetitions.
        inner: calls per forward-only sample.
        seed: weights and inputs.
        deadline: a ``time.perf_counter()`` value; runs not started by then are skipped, and a run stops
            repeating once it passes (after one repetition at least).

    Returns:
        ``{"status", "config", "runs", "skipped"}``; each run ``{"label", "tokens", "mode", "reps",
        "results": {name: {"median_ms", "min_ms", "ratio", "max_abs_diff", "max_rel_diff"}}}`` with ``ratio``
        the median over ``moe_ref``'s and the diffs against ``moe_ref``'s output (``None`` for ``dense``).

    Raises:
        ImportError: without ``transformers``.
        ValueError: an unknown mode, or ``reps < 1``.
    """
    from ..hf import from_hf
    from ..kernels.grouped_mm import default_backend, torch_backend_available, triton_backend_available
    from ..ffn import FFN
    from .bench import _hf_variant, _mixtral_block, _step, rotations

    for _, tokens, mode in runs:
        if mode not in ("forward", "forward+backward"):
            raise ValueError(f"runs: mode must be 'forward' or 'forward+backward', got {mode!r}")
        if not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"runs: tokens must be a positive int, got {tokens!r}")
    if reps < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"reps and inner must be >= 1 and warmup >= 0, got {reps}, {inner}, {warmup}")
    device = torch.device(device)
    torch.manual_seed(seed)
    with device:
        block = _mixtral_block(d_model, d_hidden, num_experts, k)
    block = block.to(dtype)
    modules = {"moe_ref": from_hf(block)}
    chosen = default_backend(dtype, device)
    for backend, runs_here in (("triton", device.type == "cuda" and triton_backend_available(dtype, device)),
                               ("torch", torch_backend_available(dtype, device))):
        if backend != chosen and runs_here:
            modules[f"moe_ref_{backend}"] = copy.deepcopy(modules["moe_ref"])
            modules[f"moe_ref_{backend}"].backend = backend
    modules["hf_eager"] = _hf_variant(block, "eager")
    modules["hf_grouped_mm"] = _hf_variant(block, "grouped_mm")
    del block
    with device:
        modules["dense"] = FFN(d_model, k * d_hidden)
    modules["dense"].to(dtype)
    names = [n for n in LAYER_CANDIDATES if n in modules]
    out_runs, skipped = [], []
    for label, tokens, mode in runs:
        if deadline is not None and time.perf_counter() > deadline:
            skipped.append(dict(label=label, tokens=tokens, mode=mode, reason="time budget spent"))
            continue
        shape = (tokens, 1, d_model) if label == "decode" else (1, tokens, d_model)
        backward = mode == "forward+backward"
        x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=backward)
        grad_out = torch.randn(*shape, device=device, dtype=dtype)
        for m in modules.values():
            m.train(backward)

        def sample(name):
            module = modules[name]
            _sync(device)
            start = time.perf_counter()
            if backward:
                out = _step(module, x, grad_out)
                calls = 1
            else:
                with torch.no_grad():
                    for _ in range(inner):
                        out = module(x)
                calls = inner
            _sync(device)
            return (time.perf_counter() - start) * 1e3 / calls, out.detach()

        outputs = {name: sample(name)[1] for name in names}
        for _ in range(warmup):
            for name in names:
                sample(name)
        times = {name: [] for name in names}
        for rep, order in rotations(names, reps):
            if rep and deadline is not None and time.perf_counter() > deadline:
                break
            for name in order:
                times[name].append(sample(name)[0])
        reference = statistics.median(times["moe_ref"])
        scale = float(outputs["moe_ref"].float().abs().max()) or 1.0
        results = {}
        for name in names:
            diff = None if name == "dense" else float((outputs[name].float() - outputs["moe_ref"].float()).abs().max())
            median = statistics.median(times[name])
            results[name] = dict(median_ms=median, min_ms=min(times[name]), ratio=median / reference,
                                 max_abs_diff=diff, max_rel_diff=None if diff is None else diff / scale)
        out_runs.append(dict(label=label, tokens=tokens, mode=mode, reps=len(times["moe_ref"]), results=results))
        del x, grad_out, outputs
        _free(device)
    config = dict(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, k=k, reps=reps, warmup=warmup,
                  inner=inner, seed=seed, device=str(device), dtype=_DTYPE_NAMES.get(dtype, str(dtype)),
                  candidates=names, default_backend=chosen)
    return dict(status="ok" if out_runs else "skipped", config=config, runs=out_runs, skipped=skipped)


def run_layer(*, dry_run: bool, deadline: float | None) -> dict:
    """The ``layer`` section: :func:`compare_layer` with :data:`GPU_LAYER` (bfloat16, CUDA) or
    :data:`DRY_LAYER` (float32, CPU); ``"skipped"`` without ``transformers``."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        return dict(status="skipped", reason=f"transformers is not importable ({error})")
    spec = dict(DRY_LAYER if dry_run else GPU_LAYER)
    runs = spec.pop("runs")
    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    return compare_layer(spec.pop("d_model"), spec.pop("d_hidden"), spec.pop("num_experts"), spec.pop("k"), runs,
                         device=device, dtype=dtype, deadline=deadline, **spec)


# --- notebooks --------------------------------------------------------------------------------------------

def notebook_command(collect_only: bool) -> list[str]:
    """The pytest command of the ``nbval`` section (run from the repository root)."""
    command = [sys.executable, "-m", "pytest", *NOTEBOOKS, "--nbval-lax", "--nbval-current-env",
               "-p", "no:cacheprovider", "-q"]
    return command + ["--collect-only"] if collect_only else command


def parse_pytest_counts(text: str) -> dict:
    """Counts from pytest's last lines: ``{"passed": 3, "failed": 1, ...}`` (``"collected"`` for --collect-only)."""
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|tests? collected)", text):
        key = "collected" if "collected" in word else ("error" if word.startswith("error") else word)
        counts[key] = int(number)
    return counts


def run_notebooks(*, dry_run: bool, timeout_s: float) -> dict:
    """The ``nbval`` section: chapters 5 and 6 under nbval (``--collect-only`` in the dry run) in a subprocess,
    ``TRITON_INTERPRET`` removed from its environment on the GPU. Returns ``{"status", "command", "returncode",
    "counts", "tail", "seconds"}``."""
    command = notebook_command(collect_only=dry_run)
    env = dict(os.environ)
    if not dry_run:
        env.pop("TRITON_INTERPRET", None)
    record = dict(command=shlex.join(["python", *command[1:]]), collect_only=dry_run, timeout_s=round(timeout_s, 1))
    if timeout_s <= 1:
        return dict(record, status="skipped", reason="time budget spent")
    # its own process group, so that a timeout also ends the notebook kernels pytest started
    proc = subprocess.Popen(command, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return dict(record, status="failed", reason=f"timed out after {timeout_s:.0f} s", returncode=None,
                    counts=parse_pytest_counts(stdout), tail=(stdout + stderr)[-3000:])
    counts = parse_pytest_counts(stdout)
    ok = proc.returncode == 0 and (counts.get("collected", 0) if dry_run else counts.get("passed", 0)) > 0
    return dict(record, status="ok" if ok else "failed", returncode=proc.returncode, counts=counts,
                tail=(stdout + stderr)[-3000:], **({} if ok else {"reason": f"pytest exited with {proc.returncode}"}))


# --- the whole check --------------------------------------------------------------------------------------

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or ``None`` without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def check_environment() -> dict:
    """GPU name and compute capability (``None`` without CUDA), driver, CUDA, torch, triton, transformers, date."""
    cuda = torch.cuda.is_available()
    return dict(gpu=torch.cuda.get_device_name(0) if cuda else None,
                capability=list(torch.cuda.get_device_capability(0)) if cuda else None,
                driver=driver_version(), cuda=torch.version.cuda, torch=torch.__version__,
                triton=_version("triton"), transformers=_version("transformers"),
                python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def prepare_interpreter(dry_run: bool) -> tuple[str | None, str | None]:
    """Set (dry run) or clear (GPU) ``TRITON_INTERPRET`` if ``triton`` is not imported yet.

    Triton reads the variable when it is imported (its own ``tl`` helpers are defined then) and
    :mod:`moe_ref.kernels.triton_gmm` when it is, so it can only be changed before both.

    Returns:
        ``(note, skip)``: what was changed (or ``None``), and why the Triton kernels cannot be checked in
        this process (or ``None``).
    """
    from ..kernels.grouped_mm import triton_installed

    if not triton_installed():
        return None, "the triton package is not installed"
    want = "1" if dry_run else None
    value = os.environ.get("TRITON_INTERPRET")
    note = None
    if (value == "1") != dry_run:
        if "triton" in sys.modules:
            run = "dry run" if dry_run else "GPU check"
            return None, (f"triton was imported with TRITON_INTERPRET={value}; the {run} needs it "
                          f"{'set to 1' if dry_run else 'unset'} before triton is first imported")
        if want is None:
            del os.environ["TRITON_INTERPRET"]
            note = f"removed TRITON_INTERPRET={value} from this process: the GPU check runs the kernels natively"
        else:
            os.environ["TRITON_INTERPRET"] = want
            note = "set TRITON_INTERPRET=1 in this process before importing triton (dry run: Triton's interpreter)"
    module = sys.modules.get("moe_ref.kernels.triton_gmm")
    if module is not None and module.INTERPRET != dry_run:
        return note, "moe_ref.kernels.triton_gmm was imported with another TRITON_INTERPRET setting"
    return note, None


def run_check(*, dry_run: bool, sections: tuple[str, ...] = SECTIONS, budgets: dict | None = None,
              total_budget_s: float | None = None, verbose: bool = True) -> dict:
    """Run the ``sections`` (a subset of :data:`SECTIONS`) and return the results (without provenance).

    Args:
        dry_run: tiny shapes on the CPU (see the module docstring); else one CUDA GPU.
        sections: which to run; the others are recorded as skipped.
        budgets: seconds per section (default :data:`BUDGETS_S`, or :data:`DRY_BUDGETS_S` in the dry run).
        total_budget_s: the whole check's (default :data:`TOTAL_BUDGET_S`, or the dry budgets' sum).
        verbose: print progress lines of the ``gmm`` section.

    Returns:
        ``{"schema", "experiment", "dry_run", "env", "budgets_s", "total_budget_s", "notes", "sections",
        "summary"}``.

    Raises:
        RuntimeError: not a dry run and no CUDA GPU.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"sections must be among {SECTIONS}, got {sorted(unknown)}")
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU is visible to torch; run with dry_run=True to check the plumbing on CPU")
    budgets = dict(DRY_BUDGETS_S if dry_run else BUDGETS_S, **(budgets or {}))
    total_budget_s = sum(budgets.values()) if total_budget_s is None and dry_run else (
        TOTAL_BUDGET_S if total_budget_s is None else total_budget_s)
    note, triton_skip = prepare_interpreter(dry_run)
    notes = [note] if note else []
    if note and verbose:
        sys.stderr.write(f"gpu check: {note}\n")
    if dry_run:
        notes.append("dry run: tiny shapes on the CPU; the times measure the plumbing, not any GPU")
    else:
        notes.append("the Triton autotune cache is cleared before each gmm shape: each shape tunes its own tiles")
    device = "cpu" if dry_run else "cuda"
    start = time.perf_counter()
    total_deadline = start + total_budget_s
    runners = {
        "correctness": lambda deadline: check_correctness(correctness_problems(dry_run), device=device,
                                                          triton_skip=triton_skip, deadline=deadline),
        "gmm": lambda deadline: run_gmm(dry_run=dry_run, triton_skip=triton_skip, deadline=deadline,
                                        verbose=verbose),
        "layer": lambda deadline: run_layer(dry_run=dry_run, deadline=deadline),
        "nbval": lambda deadline: run_notebooks(dry_run=dry_run, timeout_s=deadline - time.perf_counter()),
    }
    results = {}
    for name in SECTIONS:
        began = time.perf_counter()
        if name not in sections:
            results[name] = dict(status="skipped", reason="not selected (--sections)")
            continue
        deadline = min(began + budgets[name], total_deadline)
        if deadline - began <= 0:
            results[name] = dict(status="skipped", reason="the total time budget is spent")
            continue
        try:
            results[name] = runners[name](deadline)
        except Exception as error:  # noqa: BLE001 (one section failing must not lose the others)
            results[name] = dict(status="failed", reason=f"{type(error).__name__}: {error}",
                                 traceback=traceback.format_exc()[-3000:])
        finally:
            _free(torch.device(device))
        results[name].update(seconds=round(time.perf_counter() - began, 2), budget_s=budgets[name])
    if triton_skip:
        notes.append(f"triton parts skipped: {triton_skip}")
    env = check_environment()
    gmm = summarize_gmm(results["gmm"].get("rows", []))
    summary = dict(gmm=gmm, gmm_dtype=results["gmm"].get("config", {}).get("dtype"), suggested_row=None)
    if not dry_run and gmm["shapes"] and results["correctness"]["status"] == "ok":
        ratios = "; ".join(f"{shape} {mode} {_fmt(r['triton_over_torch'])}" for shape, e in gmm["shapes"].items()
                           for mode, r in e["modes"].items())
        summary["suggested_row"] = dict(
            device="cuda", gpu=env["gpu"], dtype="bfloat16", backend=gmm["default_backend"],
            evidence=f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}: "
                     f"python -m moe_ref.bench gpu, triton/torch TFLOP/s ratio {ratios}")
    return dict(schema=1, experiment="gpu_check", dry_run=dry_run, env=env, budgets_s=budgets,
                total_budget_s=total_budget_s, notes=notes, sections=results, summary=summary)


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_check(result: dict) -> str:
    """A text summary of :func:`run_check`'s result, lines of at most 100 characters."""
    env = result["env"]
    lines = [f"GPU check{' (DRY RUN on CPU)' if result['dry_run'] else ''}: {env['gpu'] or 'no GPU'}, "
             f"capability {env['capability']}, driver {env['driver']}, CUDA {env['cuda']}",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, {env['date']}"]
    lines.append(f"{'section':<13}{'status':<9}{'seconds':>8}  detail")
    for name, s in result["sections"].items():
        detail = s.get("reason", "")
        if name == "correctness" and "cases" in s:
            failed = sum(1 for c in s["cases"] if not c["passed"])
            detail = f"{len(s['cases'])} checks, {failed} failed, {len(s['skipped'])} skipped"
        elif name == "gmm" and "rows" in s:
            detail = f"{len(s['rows'])} measurements, {len(s['skipped'])} skipped, {len(s['errors'])} errors"
        elif name == "layer" and "runs" in s:
            detail = f"{len(s['runs'])} runs, {len(s['skipped'])} skipped"
        elif name == "nbval" and "counts" in s:
            detail = f"{s['counts']}"
        lines.append(f"{name:<13}{s['status']:<9}{_fmt(s.get('seconds'), '.1f'):>8}  {detail}"[:100])
    correctness = result["sections"]["correctness"]
    if correctness.get("cases"):
        lines.append(f"{'worst relative error':<22}{'backend':<8}{'dtype':<10}{'max':>10}{'tol':>9}  case")
        worst: dict = {}
        for c in correctness["cases"]:
            key = (c["backend"], c["dtype"])
            if key not in worst or c.get("max_rel_err", float("inf")) > worst[key].get("max_rel_err", -1.0):
                worst[key] = c
        for (backend, dtype), c in sorted(worst.items()):
            lines.append(f"{'':<22}{backend:<8}{dtype:<10}{_fmt(c.get('max_rel_err'), '.2e'):>10}"
                         f"{_fmt(c.get('tol'), '.0e'):>9}  {c['case']} {c['projection']}"
                         f"{'' if c['passed'] else ' FAILED'}"[:100])
    rows = result["sections"]["gmm"].get("rows", [])
    if rows:
        dtype = result["summary"]["gmm_dtype"]
        lines.append(f"grouped matmul TFLOP/s, {dtype}")
        lines.append(f"{'shape':<20}{'proj':<5}{'mode':<17}" + "".join(f"{n:>10}" for n in
                                                                      ("triton", "torch", "loop", "dense")))
        table: dict = {}
        for r in rows:
            table.setdefault((r["shape"], r["projection"], r["mode"]), {})[r["candidate"]] = r["tflops"]
        for (shape, proj, mode), v in table.items():
            lines.append(f"{shape:<20}{proj:<5}{mode:<17}" + "".join(
                f"{_fmt(v.get(n), '.2e' if result['dry_run'] else '.1f'):>10}"
                for n in ("triton", "torch", "loop", "dense")))
    summary = result["summary"]["gmm"]
    if summary["shapes"]:
        lines.append(f"{'shape':<20}{'mode':<17}{'triton/torch':>13}{'triton/dense':>13}  suggested backend")
        for shape, entry in summary["shapes"].items():
            for mode, ratios in entry["modes"].items():
                lines.append(f"{shape:<20}{mode:<17}{_fmt(ratios['triton_over_torch']):>13}"
                             f"{_fmt(ratios['triton_over_dense']):>13}  {entry['default_backend']}")
        lines.append(f"suggested default_backend overall: {summary['default_backend']} "
                     f"(triton only where measured >= torch in every mode)")
    for run in result["sections"]["layer"].get("runs", []):
        lines += textwrap.wrap(f"layer {run['label']} {run['tokens']} tokens, {run['mode']}: "
                               + ", ".join(f"{n} {r['median_ms']:.3g} ms" for n, r in run["results"].items()),
                               width=100, subsequent_indent="    ")
    return "\n".join(line[:100] for line in lines)


def add_arguments(parser) -> None:
    """The options of ``python -m moe_ref.bench gpu``."""
    parser.add_argument("--dry-run", action="store_true",
                        help="check the plumbing on the CPU with tiny shapes (Triton's interpreter), in seconds")
    parser.add_argument("--out", metavar="PATH", default=None,
                        help=f"results JSON (default {DEFAULT_OUT}; with --dry-run a file in the temp directory)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--total-budget", type=float, default=None, metavar="SECONDS",
                        help=f"stop starting new measurements after this long (default {TOTAL_BUDGET_S:.0f} s)")


def run(args, argv: list[str] | None = None) -> dict:
    """Run the check from parsed ``args``: print the summary, write the JSON with provenance; exit 2 without a GPU
    (not a dry run), 1 if a section failed."""
    from ..experiments.results import dumps, git_commit, provenance

    if not args.dry_run and not torch.cuda.is_available():
        sys.stderr.write("python -m moe_ref.bench gpu: no CUDA GPU is visible to torch (torch.cuda.is_available() "
                         "is False), so nothing is measured or written; run with --dry-run to check the plumbing "
                         "on CPU\n")
        raise SystemExit(2)
    if args.out is None:
        out = Path(tempfile.gettempdir(), "moe_ref_gpu_check_dry_run.json") if args.dry_run else Path(DEFAULT_OUT)
    else:
        out = Path(args.out)
    if args.dry_run and out.resolve() == (_REPO / DEFAULT_OUT).resolve():
        sys.stderr.write(f"python -m moe_ref.bench gpu --dry-run: refusing to write dry-run numbers to {DEFAULT_OUT}; "
                         f"pass another --out\n")
        raise SystemExit(2)
    if args.total_budget is not None and args.total_budget <= 0:
        raise ValueError(f"--total-budget must be positive, got {args.total_budget}")
    words = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "moe_ref.bench", *words])
    start = time.perf_counter()
    commit = git_commit()  # read at the start, as the other benchmarks do
    result = run_check(dry_run=args.dry_run, sections=tuple(args.sections), total_budget_s=args.total_budget)
    record = provenance(command, time.perf_counter() - start, "cpu" if args.dry_run else "cuda", commit=commit)
    result = {**result, "provenance": record}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    print(format_check(result))
    print(f"wrote {out}")
    failed = [name for name, s in result["sections"].items() if s["status"] == "failed"]
    if failed:
        sys.stderr.write(f"gpu check: sections failed: {', '.join(failed)} (details in {out})\n")
        raise SystemExit(1)
    return result

"""Chapter 6: a grouped GEMM in Triton, the ``"triton"`` backend of :func:`~moe_ref.kernels.grouped_mm.grouped_mm`.

The problem is the one of :mod:`moe_ref.kernels.grouped_mm`: rows of ``x`` ``[M, K]`` come in ragged groups, one
per expert, given by the cumulative row ends ``offsets`` ``[E]``; group ``e`` is multiplied by ``w[e]``
``[K, N]``. An ordinary tiled matmul cuts the output ``[M, N]`` into ``BLOCK_M x BLOCK_N`` tiles, one
program each. Here a row tile must not straddle two experts (it would need two weight matrices), so every
expert's rows are tiled on their own: expert ``e`` with ``n_e`` rows owns ``ceil(n_e / BLOCK_M)`` row tiles.

**The schedule is computed on the device.** The host does not know the group sizes without a
synchronisation (they live in ``offsets`` on the GPU), so it launches an upper bound of row tiles,
``ceil(M / BLOCK_M) + E`` (each group wastes at most one partial tile), times ``ceil(N / BLOCK_N)`` column
tiles. Each program loads the ``E`` offsets, computes the per-expert tile counts and their cumulative sum
(``tl.cumsum``), and finds its own expert as the number of cumulative counts not above its row-tile
index: the tile list is never materialised, each program recomputes the bit it needs (``E`` is at most a
few hundred, a single vector). Programs past the last tile return at once.

**Masking** handles every edge: the last row tile of an expert stops at the expert's end (so a group of
one row, or zero rows, is fine), the last column tile at ``N``, the last ``K`` slice at ``K``; masked loads
read zeros, which add nothing to the dot product.

**Accumulation** is in float32 whatever the input dtype (``tl.dot`` into a float32 accumulator), and the
tile is cast to the input dtype once, at the store. Float32 inputs use IEEE float32 products
(``input_precision="ieee"``), not TF32, so the backend matches the others to float32 rounding.

**Backward.** With ``Y = X W`` per group, ``dX = dY Wᵀ`` is the same grouped matmul with each ``w[e]``
transposed: the kernel takes strides, so ``w.transpose(1, 2)`` is passed without a copy. ``dW[e] = X_eᵀ
dY_e`` reduces over the rows of one expert: a second kernel, ``_gmm_dw_kernel``, tiles over (expert,
``K`` block, ``N`` block) and loops over that expert's rows; an expert without rows stores zeros.

**Fused gather.** In an MoE layer the grouped rows are token vectors permuted by expert,
``x_sorted = x[gather_indices]``. With ``gather_indices`` the kernel reads row ``r`` of the grouped problem
from ``x[gather_indices[r]]`` directly, so the permuted copy is never written (ScatterMoE
:cite:p:`tan2024scattermoe`, vLLM's fused MoE). The backward scatters ``dX`` back with ``index_add_`` (a
token appears ``k`` times).

Both kernels are registered with ``torch.library`` (``moe_ref::grouped_mm_triton`` and
``moe_ref::grouped_mm_triton_dw``) with fake (meta) implementations and an autograd formula, so autograd
and ``torch.compile`` see one opaque operator.

**Autotuning.** On a GPU the kernels are autotuned over a few tile shapes typical of Ampere/Hopper
(128x128x64 with 4 or 8 warps, 3 or 4 pipeline stages, smaller tiles for thin problems, and 16- or 32-row
tiles for decode), keyed on ``N``, ``K`` and ``M_BUCKET``, the power of two at or above the row count ``M``
(capped at 65536): a decode step with a few rows and a prefill with thousands get their own tile choices,
while nearby batch sizes share one tuning run. Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, which
must be set before this module is imported) exactly one small configuration is used: the autotuner and
``do_bench`` need a driver. None of these choices has been timed on a GPU yet (chapter 6).

This module imports ``triton`` at its top; :mod:`moe_ref.kernels.grouped_mm` imports it only when the ``"triton"``
backend is asked for, or chosen by default on a CUDA GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .grouped_mm import unsupported_message

#: Whether the kernels below were defined for Triton's CPU interpreter (read once, at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(kind: str) -> list:
    """Autotuning candidates: one small tile under the interpreter, several on a GPU."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); for dW, BLOCK_M is the row slice of the reduction
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
              (64, 64, 64, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 5),
              (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3)]  # the last three: decode
    if kind == "dw":
        shapes = [(64, 128, 128, 8, 3), (64, 128, 128, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                  (32, 128, 128, 8, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@triton.jit
def _group_bounds(offs_ptr, expert):
    """First and end row of group ``expert``, from the cumulative ends ``offs_ptr``."""
    end = tl.load(offs_ptr + expert).to(tl.int32)
    start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    return start, end


def m_bucket(rows: int) -> int:
    """The autotuning key's row count: the power of two at or above ``rows``, between 1 and 65536."""
    return min(triton.next_power_of_2(max(int(rows), 1)), 1 << 16)


@triton.autotune(configs=_configs("fwd"), key=["N", "K", "M_BUCKET"])
@triton.jit
def _gmm_kernel(x_ptr, w_ptr, y_ptr, offs_ptr, gather_ptr, N, K, E, M_BUCKET,
                stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
                stride_ym, stride_yn,
                HAS_GATHER: tl.constexpr, E_POW2: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` output tile of ``y[group e] = x[group e] @ w[e]``.

    Program ``pid`` is (row tile ``pid // n_col_tiles``, column tile
    ``pid % n_col_tiles``); the row tile index runs over all experts' tiles,
    expert 0's first.
    """
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    tile_m = pid // n_col_tiles
    tile_n = pid % n_col_tiles

    # --- device-side schedule: which expert owns row tile ``tile_m``? ---
    e = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e, mask=e < E, other=0).to(tl.int32)
    starts = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0).to(tl.int32)
    tiles = tl.where(e < E, tl.cdiv(ends - starts, BLOCK_M), 0)  # row tiles per expert
    cum = tl.cumsum(tiles, 0)  # inclusive: expert e owns [cum[e] - tiles[e], cum[e])
    if tile_m >= tl.sum(tiles, 0):
        return  # the launch is an upper bound; this program has no tile
    expert = tl.sum((cum <= tile_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(e == expert, cum - tiles, 0), 0)
    row_start = tl.sum(tl.where(e == expert, starts, 0), 0)
    row_end = tl.sum(tl.where(e == expert, ends, 0), 0)

    # --- the tile: rows of this expert only, columns below N ---
    rows = row_start + (tile_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    if HAS_GATHER:  # row r of the grouped problem is row gather[r] of x: no copy of x
        src = tl.load(gather_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + ks[:, None] * stride_wk + cols[None, :] * stride_wn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # float32 for any input dtype
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K  # the last K slice may be partial: masked loads read 0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_configs("dw"), key=["N", "K", "M_BUCKET"])
@triton.jit
def _gmm_dw_kernel(x_ptr, dy_ptr, dw_ptr, offs_ptr, gather_ptr, N, K, M_BUCKET,
                   stride_xm, stride_xk, stride_dym, stride_dyn,
                   stride_we, stride_wk, stride_wn,
                   HAS_GATHER: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[BLOCK_K, BLOCK_N]`` tile of ``dw[e] = x[group e]ᵀ @ dy[group e]``.

    The grid is (expert, K tile, N tile). The reduction runs over the expert's rows,
    ``BLOCK_M`` at a time; an expert without rows stores zeros.
    """
    expert = tl.program_id(0)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kk < K
    col_ok = cols < N
    row_start, row_end = _group_bounds(offs_ptr, expert)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if HAS_GATHER:
            src = tl.load(gather_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        # x tile loaded already transposed, [BLOCK_K, BLOCK_M]: only the pointers change
        a = tl.load(x_ptr + kk[:, None] * stride_xk + src[None, :] * stride_xm,
                    mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        b = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
                    + cols[None, :] * stride_dyn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    dw_ptrs = (dw_ptr + expert.to(tl.int64) * stride_we
               + kk[:, None] * stride_wk + cols[None, :] * stride_wn)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty),
             mask=k_ok[:, None] & col_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs: exact float32 products (not TF32); ignored by tl.dot for 16-bit inputs
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather: torch.Tensor | None
                ) -> torch.Tensor:
    """Launch ``_gmm_kernel``: ``x`` ``[M_x, K]``, ``w`` ``[E, K, N]`` (any strides) -> ``[M, N]``."""
    M = gather.shape[0] if gather is not None else x.shape[0]
    E, K, N = w.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()

    def grid(meta):
        row_tiles = triton.cdiv(M, meta["BLOCK_M"]) + E  # upper bound: one partial tile per expert
        return (row_tiles * triton.cdiv(N, meta["BLOCK_N"]),)

    _gmm_kernel[grid](x, w, y, offsets, gather if gather is not None else offsets, N, K, E, m_bucket(M),
                      x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
                      HAS_GATHER=gather is not None, E_POW2=triton.next_power_of_2(E),
                      PRECISION=_precision(x.dtype))
    return y


def _launch_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, gather: torch.Tensor | None,
               num_experts: int) -> torch.Tensor:
    """Launch ``_gmm_dw_kernel``: ``x`` ``[M_x, K]``, ``dy`` ``[M, N]`` -> ``dw`` ``[E, K, N]``, dtype of ``x``."""
    K, N = x.shape[1], dy.shape[1]
    dw = torch.empty((num_experts, K, N), dtype=x.dtype, device=x.device)
    if K == 0 or N == 0:
        return dw
    if dy.shape[0] == 0:
        return dw.zero_()

    def grid(meta):
        return (num_experts, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))

    _gmm_dw_kernel[grid](x, dy, dw, offsets, gather if gather is not None else offsets, N, K, m_bucket(dy.shape[0]),
                         x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                         dw.stride(0), dw.stride(1), dw.stride(2),
                         HAS_GATHER=gather is not None, PRECISION=_precision(x.dtype))
    return dw


# --- torch.library registration --------------------------------------------------------------------------

@torch.library.custom_op("moe_ref::grouped_mm_triton", mutates_args=())
def _op_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_indices: torch.Tensor | None
            ) -> torch.Tensor:
    return _launch_fwd(x, w, offsets, gather_indices)


@_op_fwd.register_fake
def _(x, w, offsets, gather_indices):
    M = gather_indices.shape[0] if gather_indices is not None else x.shape[0]
    return x.new_empty((M, w.shape[2]))


@torch.library.custom_op("moe_ref::grouped_mm_triton_dw", mutates_args=())
def _op_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, gather_indices: torch.Tensor | None,
           num_experts: int) -> torch.Tensor:
    return _launch_dw(x, dy, offsets, gather_indices, num_experts)


@_op_dw.register_fake
def _(x, dy, offsets, gather_indices, num_experts):
    return x.new_empty((num_experts, x.shape[1], dy.shape[1]))


def _setup_context(ctx, inputs, output):
    x, w, offsets, gather_indices = inputs
    ctx.save_for_backward(x, w, offsets, gather_indices)


def _backward(ctx, dy):
    x, w, offsets, gather = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # dX = dY Wᵀ per group: the same kernel, w[e] transposed through its strides (no copy)
        dx_grouped = _op_fwd(dy, w.transpose(1, 2), offsets, None)
        if gather is None:
            dx = dx_grouped
        else:  # row r came from x[gather[r]]: scatter-add back (a token may be read several times)
            dx = torch.zeros_like(x).index_add_(0, gather.long(), dx_grouped)
    if ctx.needs_input_grad[1]:
        dw = _op_dw(x, dy, offsets, gather, w.shape[0])
    return dx, dw, None, None


_op_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public entry point ----------------------------------------------------------------------------------

def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                      gather_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped matmul with the Triton kernels, optionally gathering the input rows.

    ``out[r] = x[gather_indices[r]] @ w[e]`` for every row ``r`` of group ``e`` (``x[r]`` without
    ``gather_indices``). No input checks beyond dtypes and devices: call
    :func:`~moe_ref.kernels.grouped_mm.grouped_mm` with ``backend="triton"`` for the checked version without
    gather.

    Args:
        x: ``[M_x, K]`` float32, float16 or bfloat16, on a CUDA device; or float32 or float16 on the CPU
            when Triton's interpreter is on (``TRITON_INTERPRET=1`` before this module was imported).
        w: ``[E, K, N]``, same dtype and device as ``x``; any strides.
        offsets: ``[E]`` int32 (or int64) cumulative row ends of the groups of the grouped problem;
            ``offsets[-1]`` is its number of rows ``M`` (``M_x``, or ``len(gather_indices)``).
        gather_indices: optional ``[M]`` integer row indices into ``x``; row ``r`` of the grouped problem
            reads ``x[gather_indices[r]]``.

    Returns:
        ``[M, N]`` with the dtype of ``x``, differentiable in ``x`` and ``w`` (the gradient of ``x`` is
        scattered back through ``gather_indices``).

    Raises:
        TypeError: mismatched dtypes.
        ValueError: tensors on different devices, or a dtype or device the kernels cannot run (float64; CPU
            tensors without the interpreter, or bfloat16 ones with it); the message names the dtype and device.
    """
    if w.dtype != x.dtype:
        raise TypeError(f"x and w must have the same dtype, got x {x.dtype} and w {w.dtype}")
    if len({x.device, w.device, offsets.device}) != 1 or (
            gather_indices is not None and gather_indices.device != x.device):
        raise ValueError("x, w, offsets (and gather_indices) must be on the same device")
    supported = x.dtype in (torch.float32, torch.float16, torch.bfloat16) and (
        x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu" and x.dtype != torch.bfloat16))
    if not supported:
        raise ValueError(unsupported_message("triton", x.dtype, x.device))
    offsets = offsets.to(torch.int32)
    if gather_indices is not None:
        gather_indices = gather_indices.to(torch.int32)
    return _op_fwd(x, w, offsets, gather_indices)

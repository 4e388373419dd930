"""Grouped matrix multiply: one matmul per expert, over ragged groups of rows, in a single call.

After the tokens of an MoE layer are sorted by expert, the rows of ``x`` ``[M, K]`` come in contiguous
groups, group ``e`` being the tokens routed to expert ``e``. :func:`grouped_mm` multiplies each group by its
own weight matrix ``w[e]`` ``[K, N]`` and returns the ``[M, N]`` result, rows in the same order:

.. code-block:: text

    out[start_e:offsets[e]] = x[start_e:offsets[e]] @ w[e]
    # where start_e = offsets[e-1], and start_0 = 0

This is the semantics of ``torch.nn.functional.grouped_mm(x, w, offs=offsets)`` for a 2-D ``x`` and a
3-D ``w``. Three backends compute it:

* ``"loop"``: a Python loop over the experts, one ``x_e @ w[e]`` each. Readable, any dtype, any device.
* ``"triton"``: the Triton kernel of chapter 6 (``moe_ref.kernels.triton_gmm.grouped_mm_triton``): a device-side
  tile schedule over (expert, row block, column block), float32 accumulation; float32, float16 and bfloat16
  on CUDA, or float32 and float16 CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
  the kernels are imported). ``moe_ref.kernels.triton_gmm``, and so ``triton``, is imported only when this
  backend is used.
* ``"torch"``: ``torch.nn.functional.grouped_mm``, one kernel for all groups. Its kernels want strides that
  are multiples of 16 bytes, so the inner dimension ``K`` and output dimension ``N`` are zero-padded up to
  that alignment (zero rows and columns change no product). It is wrapped in the custom operator
  ``moe_ref::grouped_mm_torch`` with its own fake (meta) kernel and autograd formula, because the fake
  kernel of ``aten._grouped_mm`` accepts only bfloat16, which breaks ``torch.compile`` on float32. It
  supports float32, bfloat16 and float16 on the CPU and bfloat16 on CUDA (compute capability 8.0 or
  later); not float64. Problems with no rows, ``K = 0`` or ``N = 0`` go to the loop.

The default backend follows from measurement, never from what a backend merely supports: it is the first
row of :data:`DEFAULT_BACKENDS` that matches the device (and, on CUDA, the GPU's name) and the dtype, among
backends that can run the inputs, and otherwise ``"torch"`` where it supports the inputs and ``"loop"``
elsewhere. The table has no GPU row yet: the Triton kernel has not been timed on a GPU
(``python -m moe_ref.bench gpu`` is the prepared check whose results would add one), so on a CUDA GPU the
default is ``"torch"`` for bfloat16 and ``"loop"`` (cuBLAS per expert) for the other dtypes, and
``"triton"`` runs only when asked for. A backend asked for by name that cannot run the dtype or device
raises a ``ValueError`` naming the backend, the dtype and the device.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The backends that run wherever torch does (the CPU included, without Triton's interpreter).
BACKENDS = ("loop", "torch")
#: Every name accepted by the ``backend`` argument of :func:`grouped_mm`: :data:`BACKENDS` and ``"triton"``.
ALL_BACKENDS = BACKENDS + ("triton",)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_backend_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the ``"triton"`` backend can run operands of ``dtype`` on ``device``.

    True for float32, float16 and bfloat16 when ``triton`` is installed and ``device`` is a CUDA device;
    for float32 and float16 on the CPU when Triton's interpreter is on (``TRITON_INTERPRET=1``). The
    interpreter's ``tl.dot`` gives wrong results for bfloat16, so bfloat16 on the CPU is refused.
    """
    if dtype not in _TRITON_DTYPES or not triton_installed():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and dtype != torch.bfloat16
            and os.environ.get("TRITON_INTERPRET", "0") == "1")


@dataclass(frozen=True)
class MeasuredDefault:
    """One row of :data:`DEFAULT_BACKENDS`: the backend measured fastest for a device, GPU and dtype.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        gpu: a substring of the CUDA device's name (``"H100"``), or ``""`` for any device of its type.
        dtype: the operand dtype.
        backend: the backend chosen.
        evidence: what was measured, with the command, the result and the date.
    """

    device: str
    gpu: str
    dtype: torch.dtype
    backend: str
    evidence: str


#: The measured choices behind :func:`default_backend`, first match wins. A GPU row is added only from a run
#: of ``python -m moe_ref.bench gpu`` (its ``summary`` suggests the row) that shows the backend at least as
#: fast as ``"torch"`` on the shapes where it would be picked; none has run yet.
DEFAULT_BACKENDS: tuple[MeasuredDefault, ...] = (
    MeasuredDefault("cpu", "", torch.float32, "torch",
                    "AMD EPYC, 2 threads, torch 2.13.0, 2026-11-29: one MoE layer forward+backward at d=512, "
                    "h=1024, E=8, k=2, 2048 tokens took 242 ms with 'torch' and 310 ms with 'loop' "
                    "(interleaved, median of 10)"),
)


def default_backend(dtype: torch.dtype, device: torch.device | str) -> str:
    """The backend :func:`grouped_mm` uses when none is given: a measured choice (see the module docstring)."""
    device = torch.device(device)
    for row in DEFAULT_BACKENDS:
        if (row.device == device.type and row.dtype == dtype
                and (not row.gpu or row.gpu in torch.cuda.get_device_name(device))
                and backend_supports(row.backend, dtype, device)):
            return row.backend
    return "torch" if torch_backend_available(dtype, device) else "loop"


def backend_supports(backend: str, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``backend`` can run operands of ``dtype`` on ``device`` (``"loop"``: any floating dtype)."""
    check_backend(backend)
    if backend == "triton":
        return triton_backend_available(dtype, device)
    if backend == "torch":
        return torch_backend_available(dtype, device)
    return dtype.is_floating_point


def torch_backend_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` supports operands of ``dtype`` on ``device``."""
    if not hasattr(F, "grouped_mm"):
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        # The CUDA kernels (CUTLASS) are documented for bfloat16 on SM80 and newer.
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    return False


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, backend: str | None = None
               ) -> torch.Tensor:
    """Multiply ragged row groups of ``x`` by per-group matrices: ``out[group e] = x[group e] @ w[e]``.

    Args:
        x: ``[M, K]`` floating point; rows sorted by group.
        w: ``[E, K, N]``, same dtype and device as ``x``.
        offsets: ``[E]`` integer (int32 preferred), the cumulative row ends of the groups: group ``e`` is
            rows ``offsets[e-1]`` to ``offsets[e]`` (from row 0 for ``e == 0``). Non-decreasing, with
            ``offsets[-1] == M``; a group may be empty.
        backend: ``"loop"``, ``"torch"``, ``"triton"`` or ``None`` (the best available: see the module
            docstring).

    Returns:
        ``[M, N]`` with the dtype of ``x``; differentiable in ``x`` and ``w``.

    Raises:
        TypeError: ``x``, ``w`` or ``offsets`` of the wrong type or dtype.
        ValueError: wrong shapes, offsets that decrease or do not end at ``M``, an unknown backend, or a
            backend asked for that cannot run the dtype or device (the message names all three; e.g.
            ``"triton"`` without ``triton`` installed, or on the CPU without Triton's interpreter).
    """
    check_backend(backend)
    _check_inputs(x, w, offsets)
    return grouped_mm_unchecked(x, w, offsets, backend=backend)


def check_backend(backend: str | None) -> str | None:
    """Return ``backend`` if it is ``None`` or one of :data:`ALL_BACKENDS`; raise a ``ValueError`` otherwise."""
    if backend is not None and backend not in ALL_BACKENDS:
        raise ValueError(f"backend must be one of {ALL_BACKENDS} or None, got {backend!r}")
    return backend


def grouped_mm_unchecked(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, backend: str | None = None
                         ) -> torch.Tensor:
    """:func:`grouped_mm` without the input checks, for callers that built ``offsets`` themselves.

    The checks read the offsets on the host (``offsets.tolist()``), a device synchronisation on a GPU.
    """
    if backend is None:
        backend = default_backend(x.dtype, x.device)
    elif not backend_supports(backend, x.dtype, x.device):
        raise ValueError(unsupported_message(backend, x.dtype, x.device))
    if backend == "triton":
        from .triton_gmm import grouped_mm_triton  # noqa: PLC0415 (imports triton: only when asked for)
        return grouped_mm_triton(x, w, offsets)
    if backend == "torch":
        return _grouped_mm_torch(x, w, offsets)
    return _grouped_mm_loop(x, w, offsets)


def unsupported_message(backend: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """Why ``backend`` cannot run ``dtype`` on ``device``, naming all three, and what can."""
    device = torch.device(device)
    if backend == "triton" and not triton_installed():
        why = "the triton package is not installed (pip install triton; Linux wheels)"
    elif backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        why = "Triton's CPU interpreter gives wrong results for bfloat16 tl.dot"
    elif backend == "triton" and device.type == "cpu" and dtype in _TRITON_DTYPES:
        why = ("on the CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 set before "
               "moe_ref.kernels.triton_gmm is imported)")
    elif backend == "triton":
        why = "it supports float32, float16 and bfloat16 on CUDA (float32 and float16 on the CPU's interpreter)"
    elif backend == "torch":
        why = ("torch.nn.functional.grouped_mm supports float32, bfloat16 and float16 on the CPU and bfloat16 on "
               "CUDA (compute capability 8.0+)")
    else:
        why = "it takes floating-point operands"
    message = f"backend={backend!r} cannot run dtype {dtype} on device {device.type}: {why}"
    usable = default_backend(dtype, device) if dtype.is_floating_point else None
    return message if usable in (None, backend) else f"{message}; use backend={usable!r} or None (the default)"


def _check_inputs(x, w, offsets) -> None:
    for name, t, dim in (("x", x, 2), ("w", w, 3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-d, got shape {tuple(t.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must have the same dtype, got x {x.dtype} and w {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x and w must be on the same device, got x on {x.device} and w on {w.device}")
    if isinstance(offsets, torch.Tensor) and offsets.device != x.device:
        raise ValueError(f"offsets must be on the device of x ({x.device}), got {offsets.device}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"inner dimensions differ: x is {tuple(x.shape)} (K={x.shape[1]}) but w is "
                         f"{tuple(w.shape)} (K={w.shape[1]}); w must be [E, K, N]")
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an integer tensor (int32), got dtype {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() != w.shape[0]:
        raise ValueError(f"offsets must have shape [E] = [{w.shape[0]}] (one row end per group of w), "
                         f"got shape {tuple(offsets.shape)}")
    if offsets.numel() == 0:
        raise ValueError("w must have at least one group (E >= 1)")
    ends = offsets.tolist()  # one small host copy; the loop backend needs the values anyway
    starts = [0] + ends[:-1]
    if any(end < start for start, end in zip(starts, ends)):
        raise ValueError(f"offsets must be non-negative and non-decreasing (cumulative row ends), got {ends}")
    if ends[-1] != x.shape[0]:
        raise ValueError(f"offsets[-1] must equal the number of rows of x, M={x.shape[0]}, got {ends[-1]}")


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: one ordinary matmul per group, outputs concatenated in row order."""
    outputs, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        outputs.append(x[start:end] @ w[e])  # an empty group gives a [0, N] block
        start = end
    return torch.cat(outputs, dim=0)


def _align(t: torch.Tensor, dim: int, align: int) -> torch.Tensor:
    """``t`` zero-padded at the end of ``dim`` to a multiple of ``align`` (``t`` itself when it already is)."""
    pad = -t.shape[dim] % align
    if not pad:
        return t
    widths = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, pad]
    return F.pad(t, widths)


@torch.library.custom_op("moe_ref::grouped_mm_torch", mutates_args=())
def _op_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    N = w.shape[2]
    align = max(1, 16 // x.element_size())  # the kernels want 16-byte strides
    # zero columns of x meet zero rows of w, so padding K changes no product; padded N columns are sliced off
    x, w = _align(x, 1, align), _align(_align(w, 1, align), 2, align)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = F.grouped_mm(x, w, offs=offsets)
    return out if out.shape[1] == N else out[:, :N].contiguous()


@_op_torch.register_fake
def _(x, w, offsets):
    return x.new_empty((x.shape[0], w.shape[2]))


@torch.library.custom_op("moe_ref::grouped_mm_torch_dw", mutates_args=())
def _op_torch_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``dw[e] = x[group e]^T dy[group e]`` ``[E, K, N]``: ``grouped_mm`` of two 2-D operands."""
    K, N = x.shape[1], dy.shape[1]
    align = max(1, 16 // x.element_size())
    x_t = _align(x, 1, align).contiguous().t()  # [K', M], column-major (a view of the row-major x)
    dy = _align(dy, 1, align).contiguous()  # [M, N']
    dw = F.grouped_mm(x_t, dy, offs=offsets)
    return dw if dw.shape[1:] == (K, N) else dw[:, :K, :N].contiguous()


@_op_torch_dw.register_fake
def _(x, dy, offsets, num_experts):
    return x.new_empty((num_experts, x.shape[1], dy.shape[1]))


def _torch_setup_context(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _torch_backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dy = dy.contiguous()  # e.g. the expanded gradient of out.sum() has zero strides
    dx = _op_torch(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    dw = _op_torch_dw(x, dy, offsets, w.shape[0]) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_op_torch.register_autograd(_torch_backward, setup_context=_torch_setup_context)


def _grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The ``"torch"`` backend: the custom operator, or the loop for problems with an empty dimension."""
    if x.shape[0] == 0 or w.shape[1] == 0 or w.shape[2] == 0:
        return _grouped_mm_loop(x, w, offsets)
    return _op_torch(x, w, offsets.to(device=x.device, dtype=torch.int32))

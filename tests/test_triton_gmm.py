"""The ``"triton"`` grouped-matmul backend (:mod:`moe_ref.kernels.triton_gmm`).

Runs on a CUDA GPU, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, which ``make test``
sets when torch sees no GPU; it must be set before the kernels are imported). The interpreter is slow and its
``tl.dot`` is wrong for bfloat16, so shapes are tiny and bfloat16 is only tested on CUDA.
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the triton package is not installed")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (run through `make test`, or set "
                "TRITON_INTERPRET=1)", allow_module_level=True)

from moe_ref import MoE  # noqa: E402
from moe_ref.kernels import triton_gmm  # noqa: E402
from moe_ref.kernels.grouped_mm import (default_backend, grouped_mm, torch_backend_available,  # noqa: E402
                                        triton_backend_available)
from moe_ref.kernels.triton_gmm import grouped_mm_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=0.25, rtol=2e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def reference(x, w, counts, gather=None):
    """float64 per-group matmuls, written independently of the module."""
    x = x.double() if gather is None else x.double()[gather.long()]
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x[start:start + n] @ w[e].double())
        start += n
    return torch.cat(out)


def offsets_of(counts):
    return torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)


# ragged groups: empty experts first, middle and last, groups of one row, sizes off every block size (16)
CASES = [
    (37, 21, [3, 0, 17, 1, 20]),
    (16, 48, [0, 1, 0, 33]),
    (5, 3, [7, 0]),
    (20, 17, [0, 0, 0]),  # no rows at all
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,counts", CASES)
def test_forward_backward_against_float64(dtype, K, N, counts):
    g = torch.Generator().manual_seed(K * N + sum(counts))
    M = sum(counts)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(len(counts), K, N, generator=g).to(DEVICE, dtype).requires_grad_()
    grad_out = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    out = grouped_mm(x, w, offsets_of(counts), backend="triton")
    assert out.shape == (M, N) and out.dtype == dtype
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference(x64, w64, counts)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])
    torch.testing.assert_close(w.grad.double(), w64.grad, **TOL[dtype])
    for e, n in enumerate(counts):  # an expert without rows gets dW = 0 exactly
        if n == 0:
            assert torch.all(w.grad[e] == 0)


def test_matches_torch_grouped_mm():
    if not torch_backend_available(torch.float32, DEVICE) and not torch_backend_available(torch.bfloat16, DEVICE):
        pytest.skip("torch.nn.functional.grouped_mm is not available here")
    dtype = torch.float32 if torch_backend_available(torch.float32, DEVICE) else torch.bfloat16
    counts, K, N = [5, 0, 18, 1], 32, 16  # multiples of 16 bytes: F.grouped_mm called directly
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), K, generator=g).to(DEVICE, dtype)
    w = torch.randn(len(counts), K, N, generator=g).to(DEVICE, dtype)
    ours = grouped_mm_triton(x, w, offsets_of(counts))
    theirs = F.grouped_mm(x, w, offs=offsets_of(counts))
    torch.testing.assert_close(ours.double(), theirs.double(), **TOL[dtype])


def test_weight_strides_no_copy():
    # the backward passes w.transpose(1, 2); any strides must work in the forward too
    counts, K, N = [9, 0, 14], 18, 23
    x = torch.randn(sum(counts), K, device=DEVICE)
    w_t = torch.randn(3, N, K, device=DEVICE).transpose(1, 2)  # [E, K, N], not contiguous
    torch.testing.assert_close(grouped_mm_triton(x, w_t, offsets_of(counts)).double(),
                               reference(x, w_t, counts), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_gather(dtype):
    # MoE-style: 10 tokens, top-2 -> 20 rows; row r reads x[gather[r]], the permuted copy never exists
    g = torch.Generator().manual_seed(2)
    T, K, N, counts = 10, 19, 22, [6, 0, 13, 1]
    gather = torch.randint(0, T, (sum(counts),), generator=g).to(DEVICE)
    x = torch.randn(T, K, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(len(counts), K, N, generator=g).to(DEVICE, dtype).requires_grad_()
    grad_out = torch.randn(sum(counts), N, generator=g).to(DEVICE, dtype)
    out = grouped_mm_triton(x, w, offsets_of(counts), gather_indices=gather)
    out.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference(x64, w64, counts, gather)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])  # scattered back, summed over top-k
    torch.testing.assert_close(w.grad.double(), w64.grad, **TOL[dtype])
    assert torch.all(w.grad[1] == 0)


def test_moe_layer_triton_equals_loop(monkeypatch):
    calls = []
    kernel = triton_gmm.grouped_mm_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    # grouped_mm imports the kernel from its module at each call: count the calls to prove it is used
    monkeypatch.setattr(triton_gmm, "grouped_mm_triton", counted)
    torch.manual_seed(0)
    moe = MoE(16, 24, num_experts=4, k=2, backend="loop").to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    y_loop = moe(x)
    y_loop.sum().backward()
    assert calls == []
    grads_loop = [p.grad.clone() for p in moe.parameters()]
    gx_loop = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    moe.backend = "triton"
    y = moe(x)
    assert len(calls) == 3  # w_in, w_up and w_out of the swiglu experts, one launch each
    y.sum().backward()
    torch.testing.assert_close(y, y_loop, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, gx_loop, atol=1e-4, rtol=1e-4)
    for p, g in zip(moe.parameters(), grads_loop):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


def test_availability_and_default():
    assert triton_backend_available(torch.float32, DEVICE)
    assert not triton_backend_available(torch.float64, DEVICE)
    if DEVICE == "cpu":  # the CPU default is unchanged by the triton backend
        assert default_backend(torch.float32, "cpu") == "torch"
        assert default_backend(torch.float64, "cpu") == "loop"
    else:  # no GPU measurement in DEFAULT_BACKENDS yet: the kernel is never the default before one
        assert default_backend(torch.bfloat16, "cuda") != "triton"
        assert default_backend(torch.float16, "cuda") == "loop"


X, W = torch.randn(10, 4, device=DEVICE), torch.randn(3, 4, 5, device=DEVICE)


@pytest.mark.parametrize("x,w,offsets,error,match", [
    (X, W, torch.tensor([5, 3, 10], dtype=torch.int32), ValueError, "non-decreasing"),
    (X, W, torch.tensor([3, 5, 9], dtype=torch.int32), ValueError, r"offsets\[-1\] must equal .* M=10"),
    (X, W, torch.tensor([5, 10], dtype=torch.int32), ValueError, r"offsets must have shape \[E\] = \[3\]"),
    (X, W, torch.tensor([3.0, 5.0, 10.0]), TypeError, "offsets must be an integer tensor"),
    (X, torch.randn(3, 6, 5), torch.tensor([3, 5, 10], dtype=torch.int32), ValueError, "inner dimensions"),
    (X, W.half(), torch.tensor([3, 5, 10], dtype=torch.int32), TypeError, "same dtype"),
    (X.double(), W.double(), torch.tensor([3, 5, 10], dtype=torch.int32), ValueError,
     f"backend='triton' cannot run dtype torch.float64 on device {DEVICE}"),
])
def test_bad_inputs(x, w, offsets, error, match):
    with pytest.raises(error, match=match):
        grouped_mm(x, w, offsets.to(x.device) if offsets.device != x.device else offsets, backend="triton")


def test_torch_compile():
    # on CPU the default inductor backend works too but takes ~20 s on 2 cores; "aot_eager" still traces the
    # op through dynamo and AOTAutograd with its fake implementation and autograd formula
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    counts, K, N = [5, 0, 18], 32, 48
    x = torch.randn(sum(counts), K, device=DEVICE, requires_grad=True)
    w = torch.randn(3, K, N, device=DEVICE, requires_grad=True)
    offsets = offsets_of(counts)
    fn = torch.compile(lambda a, b: grouped_mm_triton(a, b, offsets).square().sum(), fullgraph=False,
                       backend=backend)
    fn(x, w).backward()
    x64 = x.detach().double().requires_grad_()
    reference(x64, w.detach(), counts).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-3, rtol=1e-3)


def test_clear_errors_without_triton_or_interpreter(monkeypatch):
    import sys
    gm = sys.modules["moe_ref.kernels.grouped_mm"]  # the module (the package attribute is the function)
    x, w, offsets = torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([1, 4], dtype=torch.int32)
    monkeypatch.setattr(gm, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' cannot run dtype torch.float32 on device cpu: the "
                                         "triton package is not installed .*; use backend='torch' or None"):
        grouped_mm(x, w, offsets, backend="triton")
    monkeypatch.undo()
    if DEVICE == "cpu":  # the interpreter's tl.dot is wrong for bfloat16: refused rather than computed
        assert not triton_backend_available(torch.bfloat16, "cpu")
        with pytest.raises(ValueError, match="dtype torch.bfloat16 on device cpu: Triton's CPU interpreter gives "
                                             "wrong results"):
            grouped_mm(x.bfloat16(), w.bfloat16(), offsets, backend="triton")
        with pytest.raises(ValueError, match="dtype torch.bfloat16 on device cpu"):  # the kernel's own check
            grouped_mm_triton(x.bfloat16(), w.bfloat16(), offsets)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run dtype torch.float32 on device cpu: on the "
                                         "CPU it runs only under Triton's interpreter"):
        grouped_mm(x, w, offsets, backend="triton")
    moe = MoE(4, 8, 2, 1, backend="triton")  # a layer forced onto the backend fails the same way, at forward
    with pytest.raises(ValueError, match="backend='triton' cannot run dtype torch.float32 on device cpu"):
        moe(torch.randn(3, 4))


def test_autotune_key_includes_rows():
    from moe_ref.kernels import triton_gmm
    assert triton_gmm._gmm_kernel.keys[-1] == triton_gmm._gmm_dw_kernel.keys[-1] == "M_BUCKET"
    assert [triton_gmm.m_bucket(m) for m in (0, 1, 3, 64, 65, 4096, 10 ** 6)] == [1, 1, 4, 64, 128, 4096, 65536]


def test_import_moe_ref_does_not_import_triton():
    import subprocess
    import sys
    # the kernel module is not imported by a forward on another backend either; and the name checked is the
    # right one: importing the backend puts it in sys.modules. (torch itself may import triton on first use of
    # a custom op, so only the import of moe_ref is checked for triton.)
    code = ("import sys, moe_ref; assert 'triton' not in sys.modules, 'triton'; "
            "assert 'moe_ref.kernels.triton_gmm' not in sys.modules, 'triton_gmm'; "
            "import torch; moe_ref.MoE(4, 4, 2, 1, backend='loop')(torch.ones(3, 4)); "
            "assert 'moe_ref.kernels.triton_gmm' not in sys.modules, 'triton_gmm after a forward'; "
            "from moe_ref.kernels import triton_gmm; assert 'moe_ref.kernels.triton_gmm' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

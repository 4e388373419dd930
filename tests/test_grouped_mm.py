import pytest
import torch

from moe_ref import grouped_mm as top_level_grouped_mm
from moe_ref.kernels.grouped_mm import (ALL_BACKENDS, BACKENDS, check_backend, default_backend, grouped_mm,
                                        grouped_mm_unchecked, torch_backend_available)


def reference(x, w, counts):
    """float64 per-group matmuls, written independently of the module."""
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x[start:start + n].double() @ w[e].double())
        start += n
    return torch.cat(out)


def offsets_of(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


# ragged groups with empty experts at the start, middle and end; aligned and unaligned K and N
CASES = [
    (5, 3, [3, 0, 7]),
    (8, 8, [0, 4, 0, 5, 0]),
    (3, 5, [0, 7, 0]),
    (16, 12, [1, 9, 2, 0]),
    (4, 4, [0, 0]),  # no rows at all
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,N,counts", CASES)
def test_matches_float64_loop_forward_and_backward(backend, K, N, counts):
    g = torch.Generator().manual_seed(sum(counts) + K)
    M = sum(counts)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = torch.randn(len(counts), K, N, generator=g, requires_grad=True)
    grad_out = torch.randn(M, N, generator=g)
    out = grouped_mm(x, w, offsets_of(counts), backend=backend)
    assert out.shape == (M, N) and out.dtype == torch.float32
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference(x64, w64, counts)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
    for e, n in enumerate(counts):  # an empty expert gets a zero gradient, not garbage
        if n == 0:
            assert torch.all(w.grad[e] == 0)


def test_torch_backend_accepts_expanded_gradients():
    # ``out.sum().backward()`` sends a stride-0 gradient, which the raw kernel rejects
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 4, requires_grad=True)
    grouped_mm(x, w, offsets_of([3, 0, 7]), backend="torch").sum().backward()
    torch.testing.assert_close(x.grad[:3], w[0].sum(1).expand(3, 8).detach())


def test_gradcheck_float64_loop():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offsets_of([2, 0, 4])), (x, w))


def test_default_backend():
    assert torch_backend_available(torch.float32, "cpu")
    assert not torch_backend_available(torch.float64, "cpu")
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    out = grouped_mm(x, w, offsets_of([1, 3]))  # float64 falls back to the loop
    torch.testing.assert_close(out, reference(x, w, [1, 3]))
    with pytest.raises(ValueError, match="backend='torch' cannot run dtype torch.float64 on device cpu"):
        grouped_mm(x, w, offsets_of([1, 3]), backend="torch")


def test_bfloat16_torch_backend():
    x, w = torch.randn(6, 8), torch.randn(2, 8, 8)
    out = grouped_mm(x.bfloat16(), w.bfloat16(), offsets_of([2, 4]), backend="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(x.bfloat16(), w.bfloat16(), [2, 4]), atol=0.1, rtol=0.02)


X, W = torch.randn(10, 4), torch.randn(3, 4, 5)


@pytest.mark.parametrize("x,w,offsets,backend,error,match", [
    (X, W, torch.tensor([5, 3, 10], dtype=torch.int32), None, ValueError, "non-decreasing"),
    (X, W, torch.tensor([-1, 3, 10], dtype=torch.int32), None, ValueError, "non-negative"),
    (X, W, torch.tensor([3, 5, 9], dtype=torch.int32), None, ValueError, r"offsets\[-1\] must equal .* M=10"),
    (X, W, torch.tensor([5, 10], dtype=torch.int32), None, ValueError, r"offsets must have shape \[E\] = \[3\]"),
    (X, W, torch.tensor([3.0, 5.0, 10.0]), None, TypeError, "offsets must be an integer tensor"),
    (X, W, [3, 5, 10], None, TypeError, "offsets must be a torch.Tensor"),
    (X, torch.randn(3, 6, 5), torch.tensor([3, 5, 10], dtype=torch.int32), None, ValueError, "inner dimensions"),
    (X, W.double(), torch.tensor([3, 5, 10], dtype=torch.int32), None, TypeError, "same dtype"),
    (X.long(), W, torch.tensor([3, 5, 10], dtype=torch.int32), None, TypeError, "x must be a floating-point"),
    (X[None], W, torch.tensor([3, 5, 10], dtype=torch.int32), None, ValueError, "x must be 2-d"),
    (X, W[0], torch.tensor([3, 5, 10], dtype=torch.int32), None, ValueError, "w must be 3-d"),
    (X, W, torch.tensor([3, 5, 10], dtype=torch.int32), "cutlass", ValueError, "backend must be one of"),
])
def test_bad_inputs(x, w, offsets, backend, error, match):
    with pytest.raises(error, match=match):
        grouped_mm(x, w, offsets, backend=backend)


def test_int64_offsets_accepted():
    out = grouped_mm(X, W, torch.tensor([3, 5, 10]), backend="torch")
    torch.testing.assert_close(out.double(), reference(X, W, [3, 2, 5]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [*BACKENDS, None])
def test_unchecked_equals_checked(backend):
    counts = [3, 0, 7]
    x = torch.randn(10, 5, requires_grad=True)
    w = torch.randn(3, 5, 4, requires_grad=True)
    checked = grouped_mm(x, w, offsets_of(counts), backend=backend)
    unchecked = grouped_mm_unchecked(x, w, offsets_of(counts), backend=backend)
    assert torch.equal(unchecked, checked)
    g = torch.randn_like(checked)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(checked, [x, w], g),
                                                  torch.autograd.grad(unchecked, [x, w], g)))
    torch.testing.assert_close(checked.double(), reference(x, w, counts), atol=1e-5, rtol=1e-5)


def test_backend_names_and_top_level_function():
    assert top_level_grouped_mm is grouped_mm
    assert check_backend(None) is None and all(check_backend(b) == b for b in ALL_BACKENDS)
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend("cutlass")
    assert default_backend(torch.float32, "cpu") == "torch" and default_backend(torch.float64, "cpu") == "loop"


def test_default_follows_the_measured_table(monkeypatch):
    import sys
    gm = sys.modules["moe_ref.kernels.grouped_mm"]
    assert [row.backend for row in gm.DEFAULT_BACKENDS if row.device == "cuda"] == []  # nothing measured on a GPU
    assert all(row.evidence for row in gm.DEFAULT_BACKENDS)
    rows = (gm.MeasuredDefault("cpu", "", torch.bfloat16, "triton", "a row the CPU cannot run: skipped"),
            gm.MeasuredDefault("cpu", "", torch.float32, "loop", "hand-made row for the test"))
    monkeypatch.setattr(gm, "DEFAULT_BACKENDS", rows)
    assert default_backend(torch.float32, "cpu") == "loop"  # the first matching row wins
    assert default_backend(torch.bfloat16, "cpu") == "torch"  # its row names a backend that cannot run it
    assert default_backend(torch.float64, "cpu") == "loop"  # no row: the fallback

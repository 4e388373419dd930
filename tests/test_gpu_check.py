"""The GPU check (``python -m moe_ref.bench gpu``, :mod:`moe_ref.book.gpu_check`), tested on the CPU.

The end-to-end test runs the ``--dry-run`` plumbing (tiny shapes, Triton's interpreter). No GPU number is
produced or stored here: the summary-rule test feeds hand-made times.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from moe_ref.book import gpu_check
from moe_ref.book.bench import bench_gmm, main

TINY = dict(case="tiny", shape_class="test", projection="up", K=8, N=12, E=3, M=9, counts=[4, 0, 5])


def _dry_run(tmp_path, capsys):
    """Run ``gpu --dry-run``: in this process when TRITON_INTERPRET=1 is already set (the kernels, if imported,
    are interpreted), else in a subprocess that sets it. Returns (exit code, stderr, the JSON)."""
    out = tmp_path / "dry.json"
    argv = ["gpu", "--dry-run", "--out", str(out)]
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
    else:
        done = subprocess.run([sys.executable, "-m", "moe_ref.bench", *argv], capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
        code, err = done.returncode, done.stderr
    return code, err, json.loads(out.read_text()) if out.exists() else None


def test_dry_run_end_to_end(tmp_path, capsys):
    start = time.perf_counter()
    code, err, data = _dry_run(tmp_path, capsys)
    assert code == 0, err[-2000:]
    assert time.perf_counter() - start < 60
    assert data["dry_run"] is True and data["experiment"] == "gpu_check" and data["schema"] == 1
    for key in ("gpu", "capability", "driver", "cuda", "torch", "triton", "transformers", "date"):
        assert key in data["env"]
    for key in ("command", "git_commit", "wall_seconds", "device"):
        assert key in data["provenance"]
    assert data["provenance"]["command"].startswith("python -m moe_ref.bench gpu --dry-run")
    sections = data["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, section in sections.items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        assert section["seconds"] <= section["budget_s"] + 30

    correctness = sections["correctness"]
    assert correctness["status"] == "ok"
    ran = {(c["backend"], c["dtype"]) for c in correctness["cases"]}
    assert ("torch", "float32") in ran
    triton_ok = all("triton parts skipped" not in note for note in data["notes"])
    if triton_ok:
        assert {("triton", "float32"), ("triton", "float16")} <= ran
        assert ("triton", "bfloat16") not in ran
        bf16 = [s for s in correctness["skipped"] if s["backend"] == "triton" and s["dtype"] == "bfloat16"]
        assert bf16 and all("interpreter" in s["reason"] for s in bf16)
    for case in correctness["cases"]:
        assert case["passed"] and case["max_rel_err"] <= case["tol"]
        assert set(case["errors"]) == {"out", "dx", "dw"} and case["empty_groups"] >= 1

    gmm = sections["gmm"]
    assert gmm["status"] == "ok" and gmm["config"]["timer"] == "perf_counter"
    assert {r["candidate"] for r in gmm["rows"]} >= {"torch", "loop", "dense"}
    assert {r["mode"] for r in gmm["rows"]} == {"forward", "forward+backward"}
    assert set(data["summary"]["gmm"]["shapes"]) == set(gpu_check.DRY_GMM_SHAPES)
    assert data["summary"]["gmm"]["default_backend"] in ("triton", "torch")
    assert data["summary"]["suggested_row"] is None  # never from a dry run

    layer = sections["layer"]
    if layer["status"] == "ok":
        assert layer["config"]["device"] == "cpu" and layer["config"]["dtype"] == "float32"
        assert [(r["label"], r["mode"]) for r in layer["runs"]][-1] == ("decode", "forward")
        assert {"moe_ref", "hf_eager", "dense"} <= set(layer["runs"][0]["results"])
    else:
        assert "transformers" in layer["reason"]

    nbval = sections["nbval"]
    assert nbval["collect_only"] is True and nbval["counts"]["collected"] >= 2
    assert "05_dispatch_fast" in nbval["command"] and "--collect-only" in nbval["command"]
    text = gpu_check.format_check(data)
    assert "DRY RUN" in text and all(len(line) <= 100 for line in text.splitlines())


def _check(problems=(TINY,), dtypes=(torch.float32,), **kwargs):
    return gpu_check.check_correctness(list(problems), device="cpu", dtypes=dtypes, backends=("torch",), **kwargs)


def test_correct_kernel_passes():
    result = _check(dtypes=(torch.float32, torch.float16))
    assert result["status"] == "ok" and len(result["cases"]) == 2
    assert all(c["passed"] and c["empty_groups"] == 1 for c in result["cases"])


def test_wrong_output_is_reported(monkeypatch):
    real = gpu_check._call_backend

    def wrong(x, w, offsets, backend):
        y = real(x, w, offsets, backend)
        return y + 1e-2 * y.detach().abs().max()  # a 1% error, far above float32's tolerance

    monkeypatch.setattr(gpu_check, "_call_backend", wrong)
    result = _check()
    assert result["status"] == "failed"
    case = result["cases"][0]
    assert not case["passed"] and case["errors"]["out"] > 5e-3 and case["errors"]["out"] > case["tol"]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.1


def test_wrong_weight_gradient_is_reported(monkeypatch):
    real = gpu_check._call_backend
    monkeypatch.setattr(gpu_check, "_call_backend", lambda x, w, offsets, backend:
                        real(x, _ScaleGrad.apply(w), offsets, backend))
    case = _check()["cases"][0]
    assert case["errors"]["out"] < 1e-6 and case["errors"]["dx"] < 1e-6  # only dw is wrong
    assert case["errors"]["dw"] == pytest.approx(0.1, rel=1e-3) and not case["passed"]


def test_raising_kernel_and_deadline(monkeypatch):
    def broken(x, w, offsets, backend):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "_call_backend", broken)
    result = _check()
    assert result["status"] == "failed" and "kernel exploded" in result["cases"][0]["error"]
    result = _check(deadline=time.perf_counter() - 1.0)
    assert result["status"] == "skipped" and not result["cases"]
    assert result["skipped"][0]["reason"] == "time budget spent"
    with pytest.raises(TypeError, match="dtypes"):
        _check(dtypes=(torch.float64,))


def test_reference_is_right():
    g = torch.Generator().manual_seed(0)
    counts = [2, 0, 3]
    x, w, dy = torch.randn(5, 4, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(5, 6, generator=g)
    out = gpu_check.reference_grouped_mm64(x, w, counts)
    torch.testing.assert_close(out[:2], x[:2].double() @ w[0].double())
    torch.testing.assert_close(out[2:], x[2:].double() @ w[2].double())
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    gpu_check.reference_grouped_mm64(x64, w64, counts)  # detaches: no graph
    manual = torch.cat([x64[:2] @ w64[0], x64[2:] @ w64[2]])
    manual.backward(dy.double())
    dx, dw = gpu_check.reference_grads64(x, w, dy, counts)
    torch.testing.assert_close(dx, x64.grad)
    torch.testing.assert_close(dw, w64.grad)
    assert not dw[1].any()  # an empty group's gradient is zero
    assert gpu_check.with_empty_group([3, 4, 5]) == [7, 0, 5] and gpu_check.with_empty_group([3, 0]) == [3, 0]
    assert gpu_check.relative_error(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0]).double()) == \
        pytest.approx(0.05)
    with pytest.raises(ValueError, match="shape"):
        gpu_check.relative_error(torch.zeros(2), torch.zeros(3).double())


def _rows(times):
    """``bench_gmm`` rows from ``{(shape, mode, candidate): (ms_up, ms_down)}`` (hand-made times)."""
    return [dict(shape=shape, projection=proj, mode=mode, candidate=cand, ms=ms, tflops=1.0 / ms)
            for (shape, mode, cand), pair in times.items() for proj, ms in zip(("up", "down"), pair)]


def test_summary_suggests_triton_only_where_at_least_as_fast():
    rows = _rows({
        # A: triton faster than torch in both modes (ties count as fast enough)
        ("A", "forward", "triton"): (1.0, 1.0), ("A", "forward", "torch"): (1.5, 0.5),
        ("A", "forward+backward", "triton"): (3.0, 3.0), ("A", "forward+backward", "torch"): (4.0, 5.0),
        ("A", "forward", "dense"): (0.5, 0.5),
        # B: faster forward, slower forward+backward
        ("B", "forward", "triton"): (1.0, 1.0), ("B", "forward", "torch"): (2.0, 2.0),
        ("B", "forward+backward", "triton"): (3.0, 3.0), ("B", "forward+backward", "torch"): (2.9, 3.0),
        # C: torch never measured; D: torch measured on one projection only
        ("C", "forward", "triton"): (1.0, 1.0),
        ("D", "forward", "triton"): (1.0, 1.0), ("D", "forward", "torch"): (9.0, 9.0),
    })
    rows = [r for r in rows if not (r["shape"] == "D" and r["candidate"] == "torch" and r["projection"] == "down")]
    summary = gpu_check.summarize_gmm(rows)
    shapes = summary["shapes"]
    assert shapes["A"]["modes"]["forward"]["triton_over_torch"] == pytest.approx(1.0)
    assert shapes["A"]["modes"]["forward+backward"]["triton_over_torch"] == pytest.approx(1.5)
    assert shapes["A"]["modes"]["forward"]["triton_over_dense"] == pytest.approx(0.5)
    assert shapes["A"]["modes"]["forward+backward"]["triton_over_dense"] is None
    assert shapes["A"]["default_backend"] == "triton"
    assert shapes["B"]["modes"]["forward"]["triton_over_torch"] == pytest.approx(2.0)
    assert shapes["B"]["default_backend"] == "torch"
    assert shapes["C"]["modes"]["forward"]["triton_over_torch"] is None and shapes["C"]["default_backend"] == "torch"
    assert shapes["D"]["modes"]["forward"]["triton_over_torch"] is None and shapes["D"]["default_backend"] == "torch"
    assert summary["default_backend"] == "torch"
    only_a = gpu_check.summarize_gmm([r for r in rows if r["shape"] == "A"])
    assert only_a["default_backend"] == "triton"
    assert gpu_check.summarize_gmm([])["default_backend"] == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_gpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as info:
        main(["gpu", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible to torch" in err and "--dry-run" in err and err.count("\n") == 1
    assert not out.exists()


def test_dry_run_never_writes_the_gpu_results(capsys):
    with pytest.raises(SystemExit) as info:
        main(["gpu", "--dry-run", "--out", str(gpu_check._REPO / gpu_check.DEFAULT_OUT)])
    assert info.value.code == 2 and "refusing" in capsys.readouterr().err


def test_bench_gmm_on_cpu_with_a_timer():
    shape = {"s": dict(tokens=6, k=2, experts=3, d_model=8, d_ff=12)}
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return 2.0

    result = bench_gmm(("s",), ("loop", "dense"), device="cpu", dtype=torch.float32, timer=timer, shape_table=shape,
                       verbose=False)
    assert len(result["results"]) == len(calls) == 2 * 2 * 2  # projections x candidates x modes
    assert result["config"]["dtype"] == "float32" and result["config"]["device"] == "cpu"
    up = next(r for r in result["results"] if r["projection"] == "up" and r["mode"] == "forward")
    assert up["tflops"] == pytest.approx(2 * 12 * 8 * 12 / 2.0 / 1e9)
    with pytest.raises(ValueError, match="timer"):
        bench_gmm(("s",), ("loop",), device="cpu", shape_table=shape, verbose=False)
    with pytest.raises(ValueError, match="unknown shapes"):
        bench_gmm(("nope",), ("loop",), device="cpu", timer=timer, shape_table=shape, verbose=False)


def test_parse_pytest_counts():
    assert gpu_check.parse_pytest_counts("== 3 failed, 38 passed, 1 error in 9.1s ==") == \
        {"failed": 3, "passed": 38, "error": 1}
    assert gpu_check.parse_pytest_counts("41 tests collected in 0.05s") == {"collected": 41}


def test_checks_run_by_priority():
    # a spent budget must still have covered every shape class: representatives first, bfloat16 first
    problems = [dict(TINY, case=f"{cls}-{i}", shape_class=cls, projection=proj)
                for cls in ("a", "b") for i in (1, 2) for proj in ("up", "down")]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    order = [(c["case"], c["projection"], c["dtype"]) for c in _check(problems, dtypes)["cases"]]
    assert order[:6] == [("a-1", "up", "bfloat16"), ("b-1", "up", "bfloat16"), ("a-1", "up", "float16"),
                         ("b-1", "up", "float16"), ("a-1", "up", "float32"), ("b-1", "up", "float32")]
    assert len(order) == len(set(order)) == len(problems) * len(dtypes)


def test_notebook_timeout_is_a_failure(monkeypatch):
    monkeypatch.setattr(gpu_check, "notebook_command", lambda collect_only: [
        sys.executable, "-c", "import sys, time; print('1 passed', flush=True); time.sleep(30)"])
    start = time.perf_counter()
    result = gpu_check.run_notebooks(dry_run=False, timeout_s=1.5)
    assert time.perf_counter() - start < 10
    assert result["status"] == "failed" and "timed out" in result["reason"] and result["returncode"] is None
    assert gpu_check.run_notebooks(dry_run=False, timeout_s=0.5)["status"] == "skipped"

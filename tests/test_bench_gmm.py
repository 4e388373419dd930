"""The ``gmm`` benchmark's CPU-checkable parts: shapes, FLOPs, roofline, the plot, and its refusal without CUDA.

No GPU number is produced or stored here; the plot test feeds clearly artificial values.
"""

import pytest
import torch

from moe_ref.book.bench import GMM_SHAPES, format_gmm, gmm_problems, main, plot_gmm, random_group_sizes, roofline_tflops


def test_mixtral_problems():
    up, down = gmm_problems(GMM_SHAPES["mixtral-8x7b"])
    assert (up["M"], up["K"], up["N"], up["E"]) == (32768, 4096, 14336, 8)
    assert (down["K"], down["N"]) == (14336, 4096)
    assert up["flops"] == 2 * 32768 * 4096 * 14336
    fine = gmm_problems(GMM_SHAPES["fine-grained-64x8"])[0]
    assert (fine["M"], fine["K"], fine["N"], fine["E"]) == (16384 * 8, 2048, 1408, 64)


def test_group_sizes_and_roofline():
    counts = random_group_sizes(100, 2, 8)
    assert len(counts) == 8 and sum(counts) == 200 and max(counts) <= 100  # k distinct experts per token
    assert counts == random_group_sizes(100, 2, 8) and counts != random_group_sizes(100, 2, 8, seed=1)
    # tiny problem: memory bound, intensity * bandwidth = 2 * 16^3 FLOP / (2 bytes * 3 * 16^2) * 1 TB/s
    assert roofline_tflops(16, 16, 16, 1, 1000.0, 1.0) == pytest.approx(2 * 16**3 / (2 * 3 * 16**2))
    # huge one: compute bound
    assert roofline_tflops(32768, 4096, 14336, 8, 1000.0, 3.0) == 1000.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gmm_refuses_without_cuda(capsys):
    with pytest.raises(SystemExit) as info:
        main(["gmm"])
    assert info.value.code != 0
    assert "no CUDA GPU" in capsys.readouterr().err


def test_plot_gmm(tmp_path):
    pytest.importorskip("matplotlib")
    fake = dict(env=dict(gpu="(artificial values for the test)", torch="-", triton="-", date="-"),
                results=[dict(shape="s", projection=p, M=64, K=32, N=16, E=2, candidate=c, mode=m, ms=1.0,
                              tflops=float(i))
                         for i, (p, c, m) in enumerate((p, c, m) for p in ("up", "down") for c in ("a", "b")
                                                       for m in ("forward", "forward+backward"))])
    path = tmp_path / "gmm.png"
    plot_gmm(fake, str(path), peak_tflops=10.0, peak_bandwidth_tbs=1.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_gmm(fake).splitlines()
    assert len(table) == 2 + len(fake["results"]) and "forward+backward" in table[-1]

"""``moe_ref.book.ep_bench``: the expert-parallel benchmark's record, at a tiny size (W = 1, 2; one timed step)."""

import json
import subprocess
import sys

import pytest
import torch

from moe_ref.book import ep_bench
from moe_ref.book.bench import main
from moe_ref.book.ep_bench import COMM_KEYS, bench_ep, format_ep, hot_direction

TINY = dict(tokens_per_rank=64, d_model=32, d_hidden=64, experts=8, k=2, reps=1, warmup=1, threads=1)
RANK_KEYS = {"rank", "step_ms", "counts_ms", "dispatch_ms", "combine_ms", "dispatch_backward_ms",
             "combine_backward_ms", "experts_ms", "comm_ms", "compute_ms", "rows_sent", "rows_received"}


@pytest.fixture(scope="module")
def result():
    return bench_ep((1, 2), **TINY)


def run_of(result, W, scenario):
    return next(r for r in result["runs"] if r["world_size"] == W and r["scenario"] == scenario)


def test_schema(result):
    assert result["schema"] == 1 and set(result) == {"schema", "provenance", "settings", "runs"}
    for key in ("command", "git_commit", "torch", "python", "cpu", "threads", "load", "date", "seconds",
                "cpu_count", "cores"):
        assert key in result["provenance"], key
    assert result["provenance"]["threads"] == 1 and result["provenance"]["cores"] >= 1
    assert result["settings"]["world_sizes"] == [1, 2] and result["settings"]["tokens_per_rank"] == 64
    assert [(r["world_size"], r["scenario"]) for r in result["runs"]] == [
        (1, "balanced"), (1, "skewed"), (2, "balanced"), (2, "skewed")]
    for run in result["runs"]:
        assert [q["rank"] for q in run["ranks"]] == list(range(run["world_size"]))
        assert all(set(q) == RANK_KEYS for q in run["ranks"])
        assert run["oversubscription"] == run["world_size"] / result["provenance"]["cores"]
    assert json.loads(json.dumps(result)) == result  # plain JSON, nothing lost


def test_times_positive_and_consistent(result):
    for run in result["runs"]:
        for q in run["ranks"]:
            for key in ("step_ms", "experts_ms", "comm_ms", "compute_ms", *(f"{k}_ms" for k in COMM_KEYS)):
                assert q[key] > 0, (run["world_size"], run["scenario"], key)
            assert q["comm_ms"] + q["compute_ms"] == pytest.approx(q["step_ms"], rel=1e-12)
            assert q["comm_ms"] < q["step_ms"]
            # one timed step: the median of one value is that value, so comm is exactly the sum of its parts
            assert q["comm_ms"] == pytest.approx(sum(q[f"{k}_ms"] for k in COMM_KEYS), rel=1e-9)
        slowest = max(q["step_ms"] for q in run["ranks"])
        assert run["tokens_per_s"] == pytest.approx(run["world_size"] * 64 / (slowest / 1e3))


def test_rows_and_imbalance(result):
    T, k = TINY["tokens_per_rank"], TINY["k"]
    for run in result["runs"]:
        W, ranks = run["world_size"], run["ranks"]
        assert all(q["rows_sent"] == T * k for q in ranks)  # dropless: every (token, expert) pair travels
        received = [q["rows_received"] for q in ranks]
        assert sum(received) == W * T * k
        assert run["imbalance"] == pytest.approx(max(received) / (W * T * k / W))
    assert run_of(result, 1, "balanced")["imbalance"] == run_of(result, 1, "skewed")["imbalance"] == 1.0
    skewed = run_of(result, 2, "skewed")
    assert skewed["imbalance"] > run_of(result, 2, "balanced")["imbalance"]
    # the hot half of every rank's tokens goes to experts 0 and 1, both on rank 0
    assert skewed["ranks"][0]["rows_received"] >= 2 * (T // 2) * k


def test_hot_direction_sets_the_logits():
    torch.manual_seed(0)
    gate = torch.randn(8, 32) * 0.1
    u = hot_direction(gate, [0, 1], lead=10.0)
    expected = torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(gate @ u, expected, atol=1e-4, rtol=0)


def test_format(result):
    text = format_ep(result)
    assert "balanced" in text and "skewed" in text and "tokens/s" in text and "comm %" in text
    assert "note:" not in text or result["provenance"]["cores"] < 2
    crowded = json.loads(json.dumps(result))
    for run in crowded["runs"]:
        run["oversubscription"] = 2.0 * run["world_size"]
    assert "note: at W=1, 2" in format_ep(crowded)  # the shared cores are said


def test_bad_input():
    with pytest.raises(ValueError, match="world_sizes"):
        bench_ep((3,), **TINY)
    with pytest.raises(ValueError, match="scenarios"):
        bench_ep((1,), **TINY, scenarios=("hot",))
    with pytest.raises(ValueError, match="hot_fraction"):
        bench_ep((1,), **TINY, hot_fraction=1.5)


def test_cli_writes_json(result, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(world_sizes, **kwargs):
        seen.update(kwargs, world_sizes=world_sizes)
        return result

    monkeypatch.setattr(ep_bench, "bench_ep", fake)
    path = tmp_path / "ep.json"
    main(["ep", "--world-sizes", "1", "2", "--reps", "3", "--json", str(path)])
    assert seen["world_sizes"] == (1, 2) and seen["reps"] == 3 and seen["tokens_per_rank"] == 2048
    assert seen["command"].startswith("python -m moe_ref.bench ep --world-sizes 1 2")
    assert json.loads(path.read_text()) == result
    assert "skewed" in capsys.readouterr().out


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "moe_ref.bench", "ep", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--world-sizes" in out.stdout and "--hot-fraction" in out.stdout

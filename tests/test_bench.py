import json
import statistics
import subprocess
import sys

import pytest

from moe_ref.book.bench import DEFAULT_CANDIDATES, LAYER_CANDIDATES, bench_layer, format_layer, main

pytest.importorskip("transformers")

TINY = dict(d_model=16, d_hidden=32, num_experts=4, k=2, tokens=32, reps=2, warmup=1, threads=1)


def test_bench_layer_result_structure():
    result = bench_layer(**TINY, candidates=LAYER_CANDIDATES)
    assert set(result) == {"config", "env", "results"}
    assert list(result["results"]) == list(LAYER_CANDIDATES)
    for key in ("torch", "transformers", "cpu", "threads", "date", "load_average", "load_average_after"):
        assert key in result["env"]
    assert result["env"]["threads"] == 1
    assert result["config"]["tokens"] == 32 and result["config"]["dtype"] == "float32"
    reference = result["results"]["moe_ref"]["median_ms"]
    for name, r in result["results"].items():
        assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"])
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]))
        assert r["min_ms"] == min(r["times_ms"])
        assert r["ratio"] == pytest.approx(r["median_ms"] / reference)
    for name in ("hf_eager", "hf_grouped_mm", "moe_ref_padded"):  # identical weights: the same function
        assert result["results"][name]["max_abs_diff"] < 1e-5
    assert result["results"]["dense"]["max_abs_diff"] is None  # a different function: nothing to compare
    table = format_layer(result)
    assert all(name in table for name in LAYER_CANDIDATES)


def test_default_candidates_and_moe_ref_always_first():
    result = bench_layer(**{**TINY, "reps": 1, "warmup": 0})
    assert list(result["results"]) == list(DEFAULT_CANDIDATES) and "moe_ref_padded" not in result["results"]
    result = bench_layer(**{**TINY, "reps": 1, "warmup": 0}, candidates=("dense",))
    assert list(result["results"]) == ["moe_ref", "dense"]  # the reference of the ratios is always run


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    main(["layer", "--d-model", "16", "--d-hidden", "32", "--experts", "4", "--tokens", "16", "--reps", "1",
          "--warmup", "0", "--threads", "1", "--candidates", "moe_ref", "dense", "--json", str(path)])
    data = json.loads(path.read_text())
    assert list(data["results"]) == ["moe_ref", "dense"] and data["env"]["threads"] == 1
    assert data["config"]["d_model"] == 16 and data["config"]["tokens"] == 16
    assert "moe_ref" in capsys.readouterr().out


def test_module_entry_point():
    # ``python -m moe_ref.bench`` is the command line of moe_ref.book.bench
    done = subprocess.run([sys.executable, "-m", "moe_ref.bench", "layer", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--candidates" in done.stdout


def test_bad_arguments():
    with pytest.raises(ValueError, match="candidates must be among"):
        bench_layer(**TINY, candidates=("moe_ref", "megablocks"))
    with pytest.raises(ValueError, match="reps must be"):
        bench_layer(**{**TINY, "reps": 0})

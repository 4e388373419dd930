import json

import pytest

from moe_ref.bench import DEFAULT_CANDIDATES, LAYER_CANDIDATES, bench_layer, format_layer, main

pytest.importorskip("transformers")

TINY = dict(d_model=16, d_hidden=32, num_experts=4, k=2, tokens=32, reps=2, warmup=1, threads=1)


def test_bench_layer_result_structure():
    result = bench_layer(**TINY, candidates=LAYER_CANDIDATES)
    assert set(result) == {"config", "env", "results"}
    assert list(result["results"]) == list(LAYER_CANDIDATES)
    for key in ("torch", "transformers", "cpu", "threads", "date", "load_average", "load_average_after"):
        assert key in result["env"]
    assert result["config"]["tokens"] == 32 and result["config"]["dtype"] == "float32"
    for name, r in result["results"].items():
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert r["ratio"] == pytest.approx(r["median_ms"] / result["results"]["moe_ref"]["median_ms"])
        if name == "dense":
            assert r["max_abs_diff"] is None
        else:  # identical weights: the same function
            assert r["max_abs_diff"] < 1e-5
    assert result["results"]["moe_ref"]["ratio"] == 1.0
    assert "hf_grouped_mm" in format_layer(result)


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    main(["layer", "--d-model", "16", "--d-hidden", "32", "--experts", "4", "--tokens", "16", "--reps", "1",
          "--warmup", "0", "--threads", "1", "--candidates", "moe_ref", "dense", "--json", str(path)])
    data = json.loads(path.read_text())
    assert list(data["results"]) == ["moe_ref", "dense"] and data["env"]["threads"] == 1
    assert "moe_ref" in capsys.readouterr().out
    assert set(DEFAULT_CANDIDATES) <= set(LAYER_CANDIDATES)


def test_bad_arguments():
    with pytest.raises(ValueError, match="candidates must be among"):
        bench_layer(**TINY, candidates=("moe_ref", "megablocks"))
    with pytest.raises(ValueError, match="reps must be"):
        bench_layer(**{**TINY, "reps": 0})

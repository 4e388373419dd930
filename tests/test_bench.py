import json
import statistics
import subprocess
import sys

import pytest
import torch

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
          "--warmup", "0", "--threads", "1", "--candidates", "moe_ref", "dense", "--runs", "2",
          "--decode-batches", "1", "4", "--decode-copies", "2", "--decode-reps", "1", "--profile",
          "--malloc", "system", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["experiment"] == "layer_bench" and data["provenance"]["command"].startswith("python -m moe_ref")
    assert data["malloc"].startswith("system")
    assert len(data["runs"]) == 2
    for run in data["runs"]:
        assert list(run["results"]) == ["moe_ref", "dense"] and run["env"]["threads"] == 1
        assert run["config"]["d_model"] == 16 and run["config"]["tokens"] == 16
        assert run["targets"]["vs_dense"] == pytest.approx(1 / run["results"]["dense"]["ratio"])
        assert run["targets"]["vs_hf"] is None  # no transformers candidate was run
    assert [row["batch"] for row in data["decode"]["rows"]] == [1, 4] and data["decode"]["config"]["copies"] == 2
    assert set(data["profile"]["profiles"]) == {"moe_ref", "dense"}
    out = capsys.readouterr().out
    assert "moe_ref / dense FFN" in out and "run 2 of 2" in out and "python, dispatch" in out


def test_training_targets_on_hand_made_numbers():
    from moe_ref.book.layer_bench import format_targets, training_targets

    def result(**ms):
        return {"results": {name: {"median_ms": v, "min_ms": v - 10, "ratio": v / ms["moe_ref"]}
                            for name, v in ms.items()}}

    t = training_targets(result(moe_ref=105.0, dense=100.0, hf_eager=150.0, hf_grouped_mm=110.0))
    assert t["vs_dense"] == pytest.approx(1.05) and t["dense_met"]
    assert t["best_hf"] == "hf_grouped_mm" and t["vs_hf"] == pytest.approx(105 / 110) and t["hf_met"]
    assert t["vs_dense_min"] == pytest.approx(95 / 90) and t["vs_hf_min"] == pytest.approx(95 / 100)
    t = training_targets(result(moe_ref=111.0, dense=100.0, hf_grouped_mm=100.0))
    assert not t["dense_met"] and not t["hf_met"]
    assert "1.110 (target <= 1.10: not met); fastest repetitions: 1.122" in format_targets(t)


def test_profile_groups_sum_to_the_wall_time():
    from moe_ref.book.layer_profile import GROUP_ORDER, profile_step

    class Gather(torch.nn.Module):  # a matmul and a gather, nothing else of size
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            return (x @ self.w).index_select(0, torch.arange(x.shape[0] - 1, -1, -1))

    x = torch.randn(256, 64, requires_grad=True)
    p = profile_step(Gather(), x, torch.randn(256, 64), steps=2)
    assert list(p["groups"]) == list(GROUP_ORDER)
    assert sum(p["groups"].values()) == pytest.approx(p["wall_ms"], rel=1e-6)
    assert p["groups"]["matmuls"] > 0 and p["groups"]["gather, scatter, copy"] > 0
    assert "mm" in p["ops"] and "index_select" in p["ops"]
    with pytest.raises(ValueError, match="steps"):
        profile_step(Gather(), x, x, steps=0)


def test_profile_layer_reports_the_median_round():
    from moe_ref.book.layer_profile import profile_layer

    result = profile_layer(16, 32, 4, 2, 16, steps=1, rounds=3)
    for p in result["profiles"].values():
        assert len(p["round_wall_ms"]) == 3 and p["wall_ms"] == sorted(p["round_wall_ms"])[1]
    with pytest.raises(ValueError, match="rounds"):
        profile_layer(16, 32, 4, 2, 16, rounds=0)


def test_module_entry_point():
    # ``python -m moe_ref.bench`` is the command line of moe_ref.book.bench
    done = subprocess.run([sys.executable, "-m", "moe_ref.bench", "layer", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--candidates" in done.stdout


def test_bad_arguments():
    with pytest.raises(ValueError, match="candidates must be among"):
        bench_layer(**TINY, candidates=("moe_ref", "megablocks"))
    with pytest.raises(ValueError, match="reps must be"):
        bench_layer(**{**TINY, "reps": 0})


def test_keep_freed_memory_in_a_fresh_process():
    # it changes the allocator of the process for good, so it runs in its own
    code = "from moe_ref.book.layer_bench import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0
    last = done.stdout.strip().splitlines()[-1]
    if sys.platform.startswith("linux"):  # glibc
        assert last == "keep: mallopt M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB"
    else:
        assert last.startswith(("keep", "unchanged"))

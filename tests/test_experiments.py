"""The experiments package: every experiment end to end at toy size, results files, resuming, bad input."""

import json

import pytest
import torch

from moe_ref import experiments
from moe_ref.experiments import EXPERIMENTS, ResultsError, load_results, run, settings, sweeps, upcycle
from moe_ref.experiments.__main__ import main
from moe_ref.experiments.arms import (MODEL, decode_choices, decode_tokens, encode_choices, encode_tokens,
                                      probe_batch)
from moe_ref.book.data import build_corpus

TOY = dict(seeds=1, scale=0.002, progress=False, log=lambda *a: None)  # 3 steps, evaluated after each


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("results")
    return {name: (folder / f"{name}.json", run(name, folder / f"{name}.json", **TOY))
            for name in EXPERIMENTS}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_end_to_end(toy_results, name):
    path, result = toy_results[name]
    loaded = load_results(path, name, expect={"train": {"steps": 3}, "seeds": [0]})
    assert loaded == json.loads(json.dumps(result))
    assert {r["arm"] for r in loaded["runs"]} == set(EXPERIMENTS[name])
    provenance = loaded["provenance"]
    assert provenance["threads"] == 1 and provenance["wall_seconds"] > 0
    assert provenance["command"].startswith("python -m moe_ref.experiments")
    for r in loaded["runs"]:
        assert len(r["val_loss"]) == len(r["val_step"]) == len(r["train_seconds"])
        assert all(a <= b for a, b in zip(r["train_seconds"], r["train_seconds"][1:]))
        moe = loaded["settings"]["arms"][r["arm"]]["num_experts"] > 0
        assert (r["routing"] is not None) == (moe and r["arm"] != "dense_pretrain")
        if r["routing"] is not None:
            choices = torch.stack([decode_choices(layer) for layer in r["routing"]])
            probe = decode_tokens(loaded["probe"]["tokens"])
            assert choices.shape == (MODEL.n_layers, *probe.shape)
            assert choices.max() < loaded["settings"]["arms"][r["arm"]]["num_experts"]
            assert r["agreement"][-1] == [1.0] * MODEL.n_layers  # the final routing agrees with itself


def test_upcycled_starts_where_dense_stopped(toy_results):
    _, result = toy_results["upcycling"]
    runs = {r["arm"]: r for r in result["runs"]}
    assert runs["upcycled"]["start_gap"] < 1e-4
    steps = result["steps"]
    flops = {arm: runs[arm]["flops_per_token"] for arm in runs}
    # equal added compute: steps x FLOPs per token agree to within one step's worth
    dense_work = steps["dense_continue"] * flops["dense_continue"]
    for arm in ("upcycled", "moe_scratch"):
        assert abs(steps[arm] * flops[arm] - dense_work) <= flops[arm]
        assert runs[arm]["steps"] == steps[arm] == len(runs[arm]["val_step"])


def test_same_command_same_numbers(toy_results, tmp_path):
    again = run("experts", tmp_path / "again.json", **TOY)
    before = toy_results["experts"][1]
    for a, b in zip(before["runs"], again["runs"]):
        assert a["arm"] == b["arm"] and a["val_loss"] == b["val_loss"] and a["routing"] == b["routing"]


def test_equal_active_flops():
    """The claim the experiments rest on: every arm but the two marked ones has the dense model's active
    FFN width, so the same FLOPs per token up to the router's 2 d E per layer (3% at E = 32)."""
    dense = sweeps.EXPERTS["dense"].model(0).flops_per_token()
    for name, arm in {**sweeps.EXPERTS, **sweeps.VARIANTS}.items():
        flops = arm.model(0).flops_per_token()
        if name in ("dense_wide", "top2_full"):
            assert flops > 1.4 * dense
        else:
            assert 1.0 <= flops / dense < 1.035, name
    moe8 = sweeps.EXPERTS["moe8"].model(0).num_params()
    wide = sweeps.EXPERTS["dense_wide"].model(0).num_params()
    assert abs(wide - moe8) / moe8 < 0.01


def test_resume_after_interruption(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    real = experiments._run_unit
    calls = []

    def flaky(name, key, *args):
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, key, *args)

    monkeypatch.setattr(experiments, "_run_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        run("experts", out, arms=["dense", "moe2"], **TOY)
    partial = tmp_path / "r.json.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2  # the settings line and the first unit
    assert not out.exists()
    calls.clear()
    result = run("experts", out, arms=["dense", "moe2"], **TOY)
    assert calls == ["moe2/seed=0"]  # only what was missing
    assert [r["arm"] for r in result["runs"]] == ["dense", "moe2"] and not partial.exists()
    # a partial file written for other settings is refused, naming the file
    experiments.results.Partial(out, settings("experts", 1, 0.002, ["dense"])).add("x", [])
    with pytest.raises(ResultsError, match=f"{partial}.*other settings"):
        experiments.results.Partial(out, settings("experts", 1, 0.004, ["dense"]))


def test_more_seeds_reuse_the_file(toy_results, tmp_path, monkeypatch):
    out = tmp_path / "grow.json"
    first = run("experts", out, arms=["dense"], **TOY)
    real, calls = experiments._run_unit, []

    def counting(name, key, *args):
        calls.append(key)
        return real(name, key, *args)

    monkeypatch.setattr(experiments, "_run_unit", counting)
    grown = run("experts", out, arms=["dense"], **{**TOY, "seeds": 2})
    assert calls == ["dense/seed=1"]
    assert grown["runs"][0] == first["runs"][0] and grown["settings"]["seeds"] == [0, 1]
    assert grown["provenance"]["extends"] == first["provenance"]
    load_results(out, "experts")
    # other settings than the file's: nothing is reused, the file is rewritten
    calls.clear()
    run("experts", out, arms=["dense"], **{**TOY, "scale": 0.003})
    assert calls == ["dense/seed=0"]


def test_cut_line_is_ignored(tmp_path):
    out = tmp_path / "c.json"
    config = settings("experts", 1, 0.002, ["dense"])
    store = experiments.results.Partial(out, config)
    store.add("a", [{"x": 1}])
    with store.path.open("a") as f:
        f.write('{"key": "b", "records": [')
    again = experiments.results.Partial(out, config)
    assert list(again.done) == ["a"]
    again.add("c", [])
    assert list(experiments.results.Partial(out, config).done) == ["a", "c"]


@pytest.fixture
def good_file(toy_results, tmp_path):
    path, _ = toy_results["experts"]
    return json.loads(path.read_text())


@pytest.mark.parametrize("damage,message", [
    (lambda r: r.pop("provenance"), "missing top-level keys"),
    (lambda r: r.update(schema=99), "schema 99"),
    (lambda r: r.update(experiment="variants"), "holds experiment 'variants'"),
    (lambda r: r["provenance"].pop("git_commit"), "provenance lacks"),
    (lambda r: r["runs"].pop(), "runs do not match settings"),
    (lambda r: r["runs"].append(dict(r["runs"][0])), "more than one run"),
    (lambda r: r["runs"][0].pop("val_loss"), "run 0 lacks"),
    (lambda r: r.update(runs=[]), "non-empty"),
])
def test_bad_files(good_file, tmp_path, damage, message):
    damage(good_file)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(good_file))
    with pytest.raises(ResultsError, match=message) as info:
        load_results(path, "experts")
    assert str(path) in str(info.value)


def test_missing_corrupt_and_mismatched(toy_results, tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        load_results(tmp_path / "nope.json", "experts")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(tmp_path / "x.json", "experts")
    path, _ = toy_results["experts"]
    with pytest.raises(ResultsError, match=r"train\.steps: file has 3, expected 1500"):
        load_results(path, "experts", expect={"train": {"steps": 1500}})
    with pytest.raises(ResultsError, match=r"model\.d_model"):
        load_results(path, "experts", expect={"model": {"d_model": 128}})
    with pytest.raises(ValueError, match="name must be one of"):
        load_results(path, "nonsense")


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="name must be one of"):
        settings("nonsense")
    with pytest.raises(ValueError, match="seeds"):
        settings("experts", seeds=0)
    with pytest.raises(ValueError, match="scale"):
        settings("experts", scale=-1)
    with pytest.raises(ValueError, match="arms"):
        settings("experts", arms=["moe3"])
    with pytest.raises(ValueError, match="arms"):
        settings("upcycling", arms=["upcycled"])
    with pytest.raises(SystemExit) as info:
        main(["nonsense", "--out", str(tmp_path / "x.json")])
    assert info.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["experts", "--out", str(tmp_path / "x.json"), "--arms", "moe3"])
    assert info.value.code == 2 and "arms must be" in capsys.readouterr().err


def test_probe_and_codecs():
    corpus = build_corpus(bytes_per_domain=20_000)
    tokens, domains = probe_batch(corpus, 4, 16, seed=1)
    assert tokens.shape == (12, 16) and domains.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(decode_tokens(encode_tokens(tokens)), tokens)
    choices = torch.randint(36, (5, 7))
    assert torch.equal(decode_choices(encode_choices(choices)), choices)
    with pytest.raises(ValueError, match="choices"):
        encode_choices(torch.tensor([[36]]))

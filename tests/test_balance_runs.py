"""``python -m moe_ref.book.balance_runs``: chapter 3's results file, on a tiny setting; the grid's models."""

import json
import subprocess
import sys

import torch

from moe_ref.book import balance_runs
from moe_ref.routers import SigmoidRouter, TopKRouter


def test_command_writes_results_with_provenance(tmp_path):
    out = tmp_path / "runs.json"
    cmd = [sys.executable, "-m", "moe_ref.book.balance_runs", "--out", str(out), "--steps", "3",
           "--seeds", "2", "--schemes", "softmax:bias", "sigmoid:none", "--bytes-per-domain", "20000"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    prov = result["provenance"]
    assert set(prov) >= {"command", "git_commit", "torch", "python", "cpu", "threads", "date", "wall_seconds"}
    assert prov["command"].startswith("python -m moe_ref.book.balance_runs --out ")
    assert prov["torch"] == torch.__version__ and prov["threads"] == 1 and prov["wall_seconds"] > 0
    settings = result["settings"]
    assert settings["steps"] == 3 and settings["seeds"] == [0, 1]
    assert set(result["schemes"]) == {"softmax:bias", "sigmoid:none"}
    assert result["schemes"]["softmax:bias"]["bias_rate"] > 0
    runs = result["runs"]
    assert [(r["scheme"], r["seed"]) for r in runs] == [("softmax:bias", 0), ("softmax:bias", 1),
                                                          ("sigmoid:none", 0), ("sigmoid:none", 1)]
    domains, E, k = settings["domains"], settings["experts"]["E"], settings["experts"]["k"]
    tokens = settings["eval"]["batches"] * settings["eval"]["batch_size"] * settings["model"]["block_size"]
    for run in runs:
        counts = torch.tensor(run["counts"])  # [domains, layers, E]
        assert counts.shape == (len(domains), settings["model"]["n_layers"], E)
        assert (counts.sum(-1) == tokens * k).all()  # every validation token routed to k experts
        load = torch.tensor(run["train_load"])  # [windows, layers, E]
        assert load.shape == (1, settings["model"]["n_layers"], E)
        assert load.sum() == 3 * settings["model"]["n_layers"] * settings["train"]["batch_size"] * \
            settings["model"]["block_size"] * k
        assert run["val_loss"] > 0 and set(run["val_loss_by_domain"]) == set(domains)


def test_every_scheme_of_a_seed_starts_from_the_same_weights():
    reference = balance_runs.make_model("softmax:none", 1).state_dict()
    for key, scheme in balance_runs.SCHEMES.items():
        model = balance_runs.make_model(key, 1)
        state = model.state_dict()
        for name, value in reference.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)
        router = model.ffns[0].router
        assert type(router) is (SigmoidRouter if scheme.gating == "sigmoid" else TopKRouter)
        assert router.has_bias == (scheme.gating == "sigmoid" or scheme.bias_rate > 0)
        if router.has_bias:
            assert router.bias_update_rate == scheme.bias_rate
        assert model.ffns[0].loss_config.balance_coef == scheme.balance_coef

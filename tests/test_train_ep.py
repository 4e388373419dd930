"""``moe_ref.train_ep``: the torchrun demo trains, equals single-process training, and saves a loadable checkpoint."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_ref.book.data import build_corpus
from moe_ref.book.train import evaluate
from moe_ref.launch import spawn
from moe_ref.train_ep import EVAL_SEED, build_model, load_checkpoint, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("ep_ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "moe_ref.train_ep",
                          "--steps", "3", "--log-every", "1", "--check", "--save", str(save)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, save


def test_torchrun_trains_and_checks(torchrun_run):
    stdout, _ = torchrun_run
    assert "2 ranks" in stdout and "4 of 8 experts per rank" in stdout
    losses = [float(v) for v in re.findall(r"^step +\d+ \| loss ([\d.naif]+)", stdout, re.M)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)  # a fresh byte model: about uniform
    assert "finished 3 steps" in stdout
    loss_diff, weight_diff = map(float, re.search(r"max \|loss difference\| over 3 steps (\S+), max \|weight "
                                                  r"difference\| over all ranks (\S+)", stdout).groups())
    assert loss_diff < 1e-4 and weight_diff < 1e-4
    assert "first differ" not in stdout


def test_checkpoint_loads_into_the_plain_model(torchrun_run):
    """The saved model, loaded without expert parallelism, gives the validation loss the ranks reported."""
    stdout, save = torchrun_run
    reported = float(re.search(r"validation loss (\S+) \(mean over ranks\)", stdout).group(1))
    args = parse_args(["--steps", "3"])
    model = build_model(args)
    before = model.blocks[0].ffn.experts.w_in.detach().clone()
    load_checkpoint(model, save)
    assert not torch.equal(model.blocks[0].ffn.experts.w_in, before)  # trained weights arrived
    assert model.head.weight is model.tok_emb.weight  # still tied
    torch.set_num_threads(1)
    corpus = build_corpus()
    losses = []
    for rank in range(2):  # each rank evaluated its own batches; the report is their mean
        by_domain = evaluate(model, corpus, batches=args.eval_batches, batch_size=args.batch, seed=EVAL_SEED + rank)
        losses.append(sum(by_domain.values()) / len(by_domain))
    assert sum(losses) / 2 == pytest.approx(reported, abs=2e-6)


def _worker(rank, world_size, argv):
    return main(argv)


def test_main_in_spawned_workers_with_a_2d_mesh():
    """``--ep 1`` on 2 ranks: a ("dp", "ep") mesh of 2 x 1, experts replicated; float64, clipping active: the run
    equals single-process gradient accumulation to float64 rounding."""
    argv = ["--ep", "1", "--steps", "3", "--batch", "4", "--dtype", "float64", "--grad-clip", "0.05",
            "--eval-batches", "1", "--log-every", "10", "--check"]
    summaries = spawn(_worker, 2, argv, timeout=120)
    assert [s["ep"] for s in summaries] == [1, 1]
    assert summaries[0]["loss"] == summaries[1]["loss"]  # the mean over ranks, the same on each
    check = summaries[0]["check"]
    assert check["loss_diff"] < 1e-12 and check["weight_diff"] < 1e-12 and check["separated_at"] is None
    assert "check" not in summaries[1]


def test_bad_options():
    for argv in (["--steps", "0"], ["--k", "9"], ["--ep", "0"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    with pytest.raises(ValueError, match="RANK"):  # not under torchrun, no process group
        env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        try:
            main(["--steps", "1"])
        finally:
            os.environ.update(env)

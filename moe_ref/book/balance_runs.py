"""Chapter 3's balancing comparison: the same tiny MoE model trained under each balancing scheme.

The chapter runs a few of these trainings live and plots the full grid from a committed results file, which
this module writes::

    python -m moe_ref.book.balance_runs --out chapters/data/balance_runs.json

The grid crosses the gating function (softmax or sigmoid scores) with the balancing method (none, the
auxiliary balance loss, the auxiliary-loss-free bias), so that a difference between methods is not a
difference between gates, and adds the router z-loss to the softmax model. Every run of one seed starts
from the same weights and sees the same batches; only the routing and its balancing change.

For each run the file keeps the final validation loss (overall and per domain), the routing counts on
fixed validation batches (``[domains][layers][experts]``), from which the chapter computes every balance
measure, and the training load summed over windows of :data:`LOAD_WINDOW` steps (``[windows][layers]
[experts]``); and, once, a ``provenance`` record: the command, the git commit, the torch and Python versions, the CPU,
the thread count, the date and the wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..losses import AuxLossConfig
from ..moe import MoE
from ..routers import RouterConfig
from ..experiments import results
from .data import Corpus, build_corpus
from .model import ModelConfig, TinyTransformer
from .train import History, TrainConfig, train

MODEL = ModelConfig(vocab_size=256, block_size=64, d_model=64, n_layers=2, n_heads=4)
"""The chapter's model: chapter 1's tiny transformer, made smaller so that many runs fit a CPU."""

E, K, D_EXPERT = 8, 2, 64
"""Experts per layer, experts per token, hidden width of each (SwiGLU) expert."""

BALANCE_COEF, Z_COEF, BIAS_RATE = 0.01, 1e-3, 1e-2
"""Auxiliary balance loss weight (Switch), router z-loss weight (ST-MoE), bias step per optimizer step."""

TRAIN = dict(steps=200, batch_size=32, lr=6e-3, warmup=20)
"""The training budget of every run (``eval_every`` is set to the number of steps)."""

EVAL = dict(batches=4, batch_size=32, seed=1234)
"""The fixed validation batches (per domain) whose routing counts the results keep."""


@dataclass(frozen=True)
class Scheme:
    """One cell of the grid: the gating function and the balancing method.

    Attributes:
        gating: ``"softmax"`` or ``"sigmoid"`` scores.
        method: ``"none"``, ``"aux"``, ``"bias"``, ``"aux+z"`` or ``"z"``.
        balance_coef, z_coef: the :class:`~moe_ref.losses.AuxLossConfig` coefficients.
        bias_rate: the auxiliary-loss-free bias step (0: no bias).
    """

    gating: str
    method: str
    balance_coef: float = 0.0
    z_coef: float = 0.0
    bias_rate: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.gating}, {self.method}"


SCHEMES = {
    "softmax:none": Scheme("softmax", "none"),
    "softmax:aux": Scheme("softmax", "aux", balance_coef=BALANCE_COEF),
    "softmax:bias": Scheme("softmax", "bias", bias_rate=BIAS_RATE),
    "sigmoid:none": Scheme("sigmoid", "none"),
    "sigmoid:aux": Scheme("sigmoid", "aux", balance_coef=BALANCE_COEF),
    "sigmoid:bias": Scheme("sigmoid", "bias", bias_rate=BIAS_RATE),
    "softmax:aux+z": Scheme("softmax", "aux+z", balance_coef=BALANCE_COEF, z_coef=Z_COEF),
    "softmax:z": Scheme("softmax", "z", z_coef=Z_COEF),
}
"""The grid, by key (``gating:method``)."""


def make_model(key: str, seed: int, model_config: ModelConfig = MODEL) -> TinyTransformer:
    """The model of scheme ``key`` (a key of :data:`SCHEMES`), initialised from ``seed``.

    All schemes of one seed get the same initial weights: every router has the same gate, and the bias
    buffers of the schemes with a bias start at zero without drawing random numbers.
    """
    scheme = SCHEMES[key]
    router = RouterConfig(scheme.gating, bias_update_rate=scheme.bias_rate)
    losses = AuxLossConfig(balance_coef=scheme.balance_coef, z_coef=scheme.z_coef)

    def moe(layer: int) -> MoE:
        return MoE(model_config.d_model, D_EXPERT, E, K, init_std=0.02, router=router, aux_losses=losses)

    torch.manual_seed(seed)
    return TinyTransformer(model_config, ffn_factory=moe)


@dataclass
class Run:
    """One trained run: the model, its history, and each layer's load and bias after every step.

    Attributes:
        load: ``[steps, layers, E]`` assignments per expert of each training batch.
        bias: ``[steps, layers, E]`` selection biases after each step, or ``None`` without a bias.
    """

    model: TinyTransformer
    history: History
    load: torch.Tensor
    bias: torch.Tensor | None


def train_run(key: str, seed: int, corpus: Corpus, steps: int = TRAIN["steps"], *,
              device: str = "cpu", model_config: ModelConfig = MODEL) -> Run:
    """Train scheme ``key`` with ``seed`` (initialisation and data order) for ``steps`` steps."""
    model = make_model(key, seed, model_config).to(device)
    has_bias = SCHEMES[key].bias_rate > 0
    load, bias = [], []

    def record(step, model, x, labels):
        load.append(torch.stack([f.tokens_per_expert.float().cpu() for f in model.ffns]))
        if has_bias:
            bias.append(torch.stack([f.router.expert_bias.cpu() for f in model.ffns]))

    config = TrainConfig(**{**TRAIN, "steps": steps}, eval_every=steps, seed=seed)
    history = train(model, corpus, config, progress=False, callback=record)
    return Run(model, history, torch.stack(load), torch.stack(bias) if has_bias else None)


@torch.no_grad()
def routing_counts(model: TinyTransformer, corpus: Corpus, *, batches: int = EVAL["batches"],
                   batch_size: int = EVAL["batch_size"], seed: int = EVAL["seed"]) -> torch.Tensor:
    """Assignments per expert on fixed validation batches of each domain: ``[domains, layers, E]``."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(corpus.domains), len(model.ffns), E)
    for d, domain in enumerate(corpus.domains):
        for _ in range(batches):
            x, _, _ = corpus.get_batch("val", batch_size, model.config.block_size, generator,
                                       domain=domain)
            model(x.to(device))
            for layer, ffn in enumerate(model.ffns):
                counts[d, layer] += ffn.tokens_per_expert.float().cpu()
    return counts


LOAD_WINDOW = 10
"""The results keep the training load summed over windows of this many steps."""


def window_sums(load: torch.Tensor, width: int) -> torch.Tensor:
    """``load`` ``[steps, ...]`` summed over consecutive windows of ``width`` steps (a last partial one
    included): ``[ceil(steps / width), ...]``."""
    return torch.stack([w.sum(0) for w in load.split(width)])


def provenance(argv: list[str], seconds: float, device: str) -> dict:
    """Where and how a results file was made (:func:`moe_ref.experiments.results.provenance`)."""
    return results.provenance(" ".join(["python -m moe_ref.book.balance_runs", *argv]), seconds, device)


def run_grid(keys, seeds, steps: int, corpus: Corpus, device: str = "cpu", log=print) -> list[dict]:
    """Train every ``(key, seed)`` and return one JSON-ready record per run."""
    records = []
    for key in keys:
        for seed in seeds:
            t0 = time.perf_counter()
            run = train_run(key, seed, corpus, steps, device=device)
            counts = routing_counts(run.model, corpus)
            records.append({
                "scheme": key, "seed": seed,
                "val_loss": run.history.val_loss[-1],
                "val_loss_by_domain": {d: v[-1] for d, v in run.history.val_loss_by_domain.items()},
                "counts": counts.int().tolist(),
                "train_load": window_sums(run.load, LOAD_WINDOW).int().tolist(),
                "seconds": round(time.perf_counter() - t0, 2),
            })
            log(f"{key:14s} seed {seed}: val loss {records[-1]['val_loss']:.4f}, "
                f"{records[-1]['seconds']:.1f} s")
    return records


def main(argv: list[str] | None = None) -> dict:
    """Command line: train the grid and write the results file. Returns what it wrote."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m moe_ref.book.balance_runs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="steps per run")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES),
                        metavar="KEY", help=f"schemes to run (default all: {', '.join(SCHEMES)})")
    parser.add_argument("--bytes-per-domain", type=int, default=400_000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: runs are small, threads contend)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = build_corpus(bytes_per_domain=args.bytes_per_domain)
    seeds = list(range(args.seeds))
    records = run_grid(args.schemes, seeds, args.steps, corpus, args.device)
    result = {
        "provenance": provenance(argv, time.perf_counter() - t0, args.device),
        "settings": {
            "steps": args.steps, "seeds": seeds, "bytes_per_domain": args.bytes_per_domain,
            "model": asdict(MODEL), "experts": {"E": E, "k": K, "d_expert": D_EXPERT},
            "train": {**TRAIN, "steps": args.steps}, "eval": EVAL, "domains": list(corpus.domains),
        },
        "schemes": {key: asdict(SCHEMES[key]) for key in args.schemes},
        "runs": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(results.dumps(result))
    print(f"wrote {args.out} ({len(records)} runs, {result['provenance']['wall_seconds']} s)")
    return result


if __name__ == "__main__":
    main()

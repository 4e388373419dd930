"""The book's full-scale experiments, each a command that writes a results file under ``chapters/data/``::

    python -m moe_ref.experiments experts --out chapters/data/experts.json
    python -m moe_ref.experiments variants --out chapters/data/variants.json
    python -m moe_ref.experiments upcycling --out chapters/data/upcycling.json
    python -m moe_ref.experiments shrink --out chapters/data/shrink.json

* ``experts``: MoE against dense at equal active FLOPs, E = 2 ... 32 experts, and the dense model of the
  8-expert model's total parameters (:mod:`~moe_ref.experiments.sweeps`);
* ``variants``: top-1 against top-2, finer experts, a shared expert, expert choice
  (:mod:`~moe_ref.experiments.sweeps`);
* ``upcycling``: a trained dense model turned into an MoE, against continuing it and against an MoE from
  scratch, at equal added compute (:mod:`~moe_ref.experiments.upcycle`);
* ``shrink``: the 8-expert MoE quantized, pruned, merged and distilled into a dense student
  (:mod:`~moe_ref.experiments.shrink`).

Each shows a progress line with an ETA, appends every finished unit to ``<out>.partial.jsonl`` and, when
rerun with the same options after an interruption, resumes from there. ``--scale`` (default: the book's
``MOE_BOOK_SCALE``) multiplies the steps, for a GPU. The results carry their provenance
(:mod:`~moe_ref.experiments.results`); the same command, commit and thread count give the same numbers
(all but the times). The chapters run a small live version of the same code and plot the committed files.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ..book.data import build_corpus
from ..book.page import Progress
from . import shrink, sweeps, upcycle
from .arms import MODEL, PROBE, TRAIN, encode_tokens, probe_batch, run_arm
from .results import SCHEMA, Partial, ResultsError, dumps, fingerprint, git_commit, load, provenance

EXPERIMENTS = {"experts": sweeps.EXPERTS, "variants": sweeps.VARIANTS, "upcycling": upcycle.ARMS,
               "shrink": shrink.ARMS}
"""The experiments by name, each with its arms."""

PER_SEED = {"upcycling": upcycle.run_seed, "shrink": shrink.run_seed}
"""The experiments whose unit of work is one seed (all arms together), with the function that runs it."""

RUN_KEYS = ("val_step", "val_loss", "val_loss_by_domain", "train_seconds", "seconds", "params",
            "flops_per_token", "routing", "agreement")
"""What every run record of every experiment holds."""

BYTES_PER_DOMAIN = 400_000


def settings(name: str, seeds: int = 3, scale: float = 1.0, arms: list | None = None) -> dict:
    """Everything that determines experiment ``name``'s numbers: model, training, seeds, arms, data."""
    if name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    known = EXPERIMENTS[name]
    arms = list(known) if arms is None else list(arms)
    unknown = [a for a in arms if a not in known]
    if unknown or not arms:
        raise ValueError(f"arms must be a non-empty list of {list(known)}, got {arms}")
    if name in PER_SEED and arms != list(known):
        raise ValueError(f"arms: the {name} experiment runs all of its arms together")
    train = dict(TRAIN, steps=max(1, round(TRAIN["steps"] * scale)),
                 eval_every=max(1, round(TRAIN["eval_every"] * scale)))
    return {"model": asdict(MODEL), "train": train, "seeds": list(range(seeds)), "scale": scale,
            "arms": {a: known[a].spec() for a in arms}, "bytes_per_domain": BYTES_PER_DOMAIN,
            "probe": PROBE}


def run(name: str, out, *, seeds: int = 3, scale: float = 1.0, arms: list | None = None,
        device: str = "cpu", command: str | None = None, progress: bool = True, log=print) -> dict:
    """Run experiment ``name``, write ``out``, return the result.

    Finished units are taken from ``<out>.partial.jsonl`` (an interrupted run) and from ``out`` itself when
    it holds the same experiment with the same settings but fewer seeds: rerunning with more ``seeds``
    trains only the new ones. The provenance of such an earlier file is kept under ``"extends"``.
    """
    config = settings(name, seeds, scale, arms)
    out = Path(out)
    partial = Partial(out, config)
    units = _units(name, config)
    earlier = _earlier(out, name, config)
    if earlier is not None:
        for key, records in _units_of(name, earlier["runs"]).items():
            if key in units and key not in partial.done:
                partial.add(key, records)
    t0 = time.perf_counter()
    commit = git_commit()  # now: the code that computes, not whatever the tree holds at the end
    corpus = build_corpus(bytes_per_domain=config["bytes_per_domain"])
    probe, probe_domains = probe_batch(corpus, PROBE["sequences_per_domain"], MODEL.block_size,
                                       PROBE["seed"])
    train = config["train"]
    todo = [key for key in units if key not in partial.done]
    bar = Progress(sum(units[key] for key in todo), desc=name, enabled=progress, every=1.0)
    for key in todo:
        records = _run_unit(name, key, corpus, train, device, probe, bar.update)
        partial.add(key, records)
        summary = ", ".join(f"{r['arm']} {r['val_loss'][-1]:.3f}" for r in records)
        bar.write(f"{key}: final val loss {summary}")
    bar.close()
    runs = [record for key in units for record in partial.done[key]]
    result = {
        "schema": SCHEMA, "experiment": name,
        "provenance": provenance(command or f"python -m moe_ref.experiments {name} --out {out}",
                                 time.perf_counter() - t0, device, commit),
        "settings": config,
        "probe": {"tokens": encode_tokens(probe), "domains": probe_domains.tolist(),
                  "domain_names": list(corpus.domains)},
        "runs": runs,
    }
    if earlier is not None:
        result["provenance"]["extends"] = earlier["provenance"]
    if name == "upcycling":
        result["steps"] = upcycle.added_steps(train)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    partial.remove()
    log(f"wrote {out} ({len(runs)} runs)")
    return result


def _earlier(out: Path, name: str, config: dict) -> dict | None:
    """The results file already at ``out`` if it holds this experiment with these settings but other
    seeds (which can be reused), else ``None``. A file that cannot be read is left alone (and overwritten)."""
    if not out.exists():
        return None
    try:
        earlier = load(out, name, run_keys=RUN_KEYS)
    except ResultsError:
        return None
    return earlier if fingerprint(earlier["settings"]) == fingerprint(config) else None


def _units_of(name: str, runs: list) -> dict:
    """Group the run records of a results file by unit key (as :func:`_units` names them)."""
    units = {}
    for record in runs:
        units.setdefault(_unit_key(name, record["arm"], record["seed"]), []).append(record)
    return units


def _unit_key(name: str, arm: str, seed: int) -> str:
    """A unit of work: one (arm, seed) run, or for the per-seed experiments all the arms of one seed."""
    return f"seed={seed}" if name in PER_SEED else f"{arm}/seed={seed}"


def _units(name: str, config: dict) -> dict:
    """The units of work, ``{key: optimizer steps}``, in running order (seed-major: every arm of seed 0
    first, so a partial file already holds complete paired comparisons)."""
    steps = config["train"]["steps"]
    if name == "upcycling":
        per_seed = sum(upcycle.added_steps(config["train"]).values())
        return {_unit_key(name, None, seed): per_seed for seed in config["seeds"]}
    if name in PER_SEED:
        return {_unit_key(name, None, seed): steps * len(config["arms"]) for seed in config["seeds"]}
    return {_unit_key(name, arm, seed): steps for seed in config["seeds"] for arm in config["arms"]}


def _run_unit(name: str, key: str, corpus, train: dict, device: str, probe, on_step) -> list[dict]:
    if name in PER_SEED:
        seed = int(key.split("=")[1])
        return PER_SEED[name](seed, corpus, train, device, probe, on_step)
    arm, seed = key.split("/seed=")
    record, _ = run_arm(arm, EXPERIMENTS[name][arm], int(seed), corpus, train, probe=probe, device=device,
                        on_step=on_step)
    return [record]


def load_results(path, name: str, expect: dict | None = None) -> dict:
    """:func:`~moe_ref.experiments.results.load` for experiment ``name``, checking every run's keys."""
    if name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    return load(path, name, expect, RUN_KEYS)


__all__ = ["EXPERIMENTS", "settings", "run", "load_results", "ResultsError"]

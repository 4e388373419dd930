"""Shrinking a trained MoE (chapter 13): quantization, pruning and merging of its experts, and distillation.

For each seed:

1. train the dense baseline (``dense``) and the top-2-of-8 MoE teacher (``moe8``), the ``experts``
   experiment's arms at the same model and training budget;
2. count each expert's tokens on calibration batches of the training split
   (:func:`moe_ref.quantize.calibration_counts`);
3. on the validation batches the training loop evaluates: the teacher with its routed experts in int8 and
   int4, per output channel and per group (:func:`moe_ref.quantize.quantize_experts`), with the experts'
   bytes; pruned to the ``keep`` most used experts of each layer and merged into fewer experts
   (:mod:`moe_ref.prune`), without retraining;
4. distil the teacher into a dense student of equal active FLOPs (``student``): the dense arm's model
   initialised with the teacher's non-expert weights, trained for the dense baseline's steps on the same
   batches with Switch's 0.75 hard + 0.25 soft loss (:mod:`moe_ref.distill`).

The ``moe8`` record carries ``calibration``, ``quantization`` and ``pruning``; the ``student`` record
``soft_weight``. All three records are in the ``experts`` experiment's run layout.
"""

from __future__ import annotations

import time

import torch

from ..book.train import evaluate
from ..distill import DistillationModel, student_from_teacher
from ..prune import merge_model, prune_model
from ..quantize import calibration_counts, expert_bytes, quantize_experts
from .arms import Arm, run_arm
from .sweeps import EXPERTS

ARMS = {
    "dense": EXPERTS["dense"],
    "moe8": EXPERTS["moe8"],
    "student": Arm("dense student of E=8", EXPERTS["dense"].d_hidden),
}
"""The models trained for each seed (the dense baseline, the MoE teacher, the distilled dense student)."""

FORMATS = [(8, None), (8, 32), (4, None), (4, 64), (4, 32)]
"""Quantization formats ``(bits, group_size)``; ``None``: per output channel."""

KEEP = [6, 4, 2]
"""Experts kept per layer when pruning (of 8)."""

MERGE = [6, 4, 2]
"""Experts per layer after merging (of 8)."""

SOFT_WEIGHT = 0.25
"""The teacher probabilities' share of the distillation loss (Switch section 5)."""

CALIBRATION = dict(batches=8, seed=777)
"""The experts are calibrated on this many training batches of the training batch size, drawn with this
seed."""


def calibration_batches(corpus, train: dict, block_size: int, batches: int = CALIBRATION["batches"],
                        seed: int = CALIBRATION["seed"]) -> list[torch.Tensor]:
    """``batches`` inputs ``[batch_size, block_size]`` from the training split, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [corpus.get_batch("train", train["batch_size"], block_size, generator)[0] for _ in range(batches)]


def val_loss(model, corpus, train: dict) -> float:
    """The mean validation loss over domains, on the batches the training loop evaluates."""
    by_domain = evaluate(model, corpus, batches=train["eval_batches"], batch_size=train["batch_size"])
    return sum(by_domain.values()) / len(by_domain)


def measure(teacher, corpus, train: dict, device: str) -> dict:
    """Calibration counts, and the validation loss of the quantized, pruned and merged teacher."""
    calib = [x.to(device) for x in calibration_batches(corpus, train, teacher.config.block_size)]
    counts = calibration_counts(teacher, calib)
    base = val_loss(teacher, corpus, train)
    quant = [{"bits": 32, "group_size": None, "val_loss": base, "expert_bytes": expert_bytes(teacher)}]
    for bits, group in FORMATS:
        model = quantize_experts(teacher, bits, group)
        quant.append({"bits": bits, "group_size": group, "val_loss": val_loss(model, corpus, train),
                      "expert_bytes": expert_bytes(model)})
    pruning = [{"method": "none", "experts": teacher.ffns[0].num_experts, "val_loss": base}]
    for keep in KEEP:
        pruning.append({"method": "prune", "experts": keep,
                        "val_loss": val_loss(prune_model(teacher, keep, counts), corpus, train)})
    for merged in MERGE:
        pruning.append({"method": "merge", "experts": merged,
                        "val_loss": val_loss(merge_model(teacher, merged, counts), corpus, train)})
    return {"calibration": counts.tolist(), "quantization": quant, "pruning": pruning}


def run_seed(seed: int, corpus, train: dict, device: str, probe, on_step) -> list[dict]:
    """The three runs of one seed (see the module docstring); the teacher records its routing of ``probe``."""
    dense, _ = run_arm("dense", ARMS["dense"], seed, corpus, train, device=device, on_step=on_step)
    moe, teacher = run_arm("moe8", ARMS["moe8"], seed, corpus, train, probe=probe, device=device,
                           on_step=on_step)
    t0 = time.perf_counter()
    moe.update(measure(teacher, corpus, train, device))
    moe["measure_seconds"] = round(time.perf_counter() - t0, 2)
    student = student_from_teacher(teacher, ARMS["student"].model(seed).to(device))
    wrapper = DistillationModel(student, teacher, soft_weight=SOFT_WEIGHT)
    distilled, _ = run_arm("student", ARMS["student"], seed, corpus, train, device=device, model=wrapper,
                           on_step=on_step)
    distilled["soft_weight"] = SOFT_WEIGHT
    return [dense, moe, distilled]

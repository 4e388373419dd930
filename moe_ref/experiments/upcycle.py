"""Sparse upcycling at equal added compute (:cite:t:`komatsuzaki2023upcycling`).

For each seed: train the dense model (the *sunk* cost), then spend the same added training FLOPs three ways:

* ``dense_continue``: keep training the dense model;
* ``upcycled``: turn each dense FFN into an MoE of ``E`` copies with a fresh router
  (:func:`moe_ref.upcycling.upcycle`, top-2, renormalised), and train that;
* ``moe_scratch``: train the same MoE from a random initialisation.

A top-2 MoE of full-width copies costs more FLOPs per token than the dense model, so it gets fewer steps:
``steps x flops_per_token`` is the same for the three arms. Each continuation restarts the learning-rate
schedule (warm-up, then cosine decay).
"""

from __future__ import annotations

import copy

import torch
from ..losses import AuxLossConfig
from ..upcycling import upcycle
from .arms import BALANCE_COEF, MODEL, Arm, run_arm

E, K = 8, 2
"""Experts of the upcycled model, and experts per token."""

CONTINUE_SEED = 1000
"""The continuations draw their batches from seed ``seed + CONTINUE_SEED``, not the pre-training's."""

ARMS = {
    "dense_pretrain": Arm("dense (sunk)", MODEL.d_hidden),
    "dense_continue": Arm("dense, continued", MODEL.d_hidden),
    "upcycled": Arm(f"upcycled, top-{K} of {E}", MODEL.d_hidden, E, K),
    "moe_scratch": Arm(f"MoE from scratch, top-{K} of {E}", MODEL.d_hidden, E, K),
}


def added_steps(train: dict) -> dict:
    """Steps of each continuation arm: the dense arm as many as the pre-training (added compute = 100% of
    the sunk cost), the MoE arms that compute divided by their FLOPs per token."""
    dense = ARMS["dense_pretrain"].flops_per_token()
    moe = ARMS["moe_scratch"].flops_per_token()
    steps = train["steps"]
    return {"dense_pretrain": steps, "dense_continue": steps, "upcycled": round(steps * dense / moe),
            "moe_scratch": round(steps * dense / moe)}


def run_seed(seed: int, corpus, train: dict, device: str, probe, on_step) -> list[dict]:
    """The four runs of one seed, in order; every record also gets ``steps`` and, for the upcycled one,
    ``start_gap``: the largest difference between its logits and the dense model's at step 0."""
    steps = added_steps(train)
    records = []
    pre, dense = run_arm("dense_pretrain", ARMS["dense_pretrain"], seed, corpus, train, device=device,
                         on_step=on_step)
    records.append(pre)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}

    cont, _ = run_arm("dense_continue", ARMS["dense_continue"], seed, corpus,
                      {**train, "steps": steps["dense_continue"]}, device=device, model=dense,
                      data_seed=seed + CONTINUE_SEED, on_step=on_step)
    records.append(cont)

    dense.load_state_dict(dense_state)
    upcycled = copy.deepcopy(dense)
    torch.manual_seed(seed)  # the fresh routers' initialisation
    for block in upcycled.blocks:
        block.ffn = upcycle(block.ffn, E, K, aux_losses=AuxLossConfig(balance_coef=BALANCE_COEF))
    upcycled.to(device)
    x = probe.to(device)
    gap = (upcycled.eval()(x)[0] - dense.to(device).eval()(x)[0]).abs().max().item()
    up, _ = run_arm("upcycled", ARMS["upcycled"], seed, corpus, {**train, "steps": steps["upcycled"]},
                    device=device, model=upcycled.train(), probe=probe, data_seed=seed + CONTINUE_SEED,
                    on_step=on_step)
    up["start_gap"] = gap
    records.append(up)

    scratch, _ = run_arm("moe_scratch", ARMS["moe_scratch"], seed, corpus,
                         {**train, "steps": steps["moe_scratch"]}, device=device, probe=probe,
                         on_step=on_step)
    records.append(scratch)
    for record in records:
        record["steps"] = steps[record["arm"]]
    return records

"""Two comparisons at equal active compute, each a grid of arms x seeds.

* ``experts``: the dense model against MoE models with more and more experts, every one top-2 of experts of
  half the dense width, so that a token passes through the same number of hidden units (the same FLOPs)
  whatever ``E``; plus the dense model with as many parameters as the 8-expert MoE.
* ``variants``: at the 8-expert model's total and active size, how the experts are cut and chosen: top-1
  (Switch), finer experts (DeepSeekMoE's granularity), a shared expert, expert choice, and top-2 of
  full-width experts (twice the active FLOPs).

Every arm of one seed sees the same batches in the same order; the seed also sets the initial weights.
"""

from __future__ import annotations

from .arms import MODEL, Arm

_W = MODEL.d_hidden  # the dense FFN's hidden width (256)

EXPERTS = {
    "dense": Arm("dense", _W),
    **{f"moe{E}": Arm(f"E={E}", _W // 2, E, 2) for E in (2, 4, 8, 16, 32)},
    "dense_wide": Arm("dense, params of E=8", 8 * _W // 2),
}
"""The ``experts`` arms: E = 2 ... 32 experts of width 128, top-2, against the dense width-256 model."""

VARIANTS = {
    "top2": Arm("top-2 of 8", _W // 2, 8, 2),
    "top1": Arm("top-1 of 4 (Switch)", _W, 4, 1),
    "fine": Arm("top-8 of 32 (fine)", _W // 8, 32, 8),
    "fine_shared": Arm("1 shared + top-7 of 31", _W // 8, 31, 7, shared=1),
    "expert_choice": Arm("expert choice, 8", _W // 2, 8, 2, router="expert_choice"),
    "top2_full": Arm("top-2 of 4, 2x FLOPs", _W, 4, 2),
}
"""The ``variants`` arms. All but ``top2_full`` have 1024 expert hidden units in all and 256 active."""

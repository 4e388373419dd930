"""Where a layer's training step spends its time: ``torch.profiler`` operator times, grouped (chapter 5).

:func:`profile_step` runs forward + backward of a module a few times under ``torch.profiler`` and sums the
*self* time of every ATen operator (the time inside the operator, its children excluded) into the groups of
:data:`GROUPS`, by operator name. What no operator accounts for, the wall time minus the operators' self
times, is the Python and dispatch overhead around them (``"python, dispatch"``). The groups are by what the
operators do, not by which step of the layer called them: a ``mul`` of the gate product and a ``mul`` of a
combine are both ``"elementwise"``. Read a layer's profile against the dense FFN's: the dense FFN has only
matmuls and the elementwise work of its activation, so any other group is the price of routing.

Run from the command line as part of ``python -m moe_ref.bench layer --profile``.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

#: Operator groups and the ATen operators (names without ``aten::``) in each; anything else is ``"other ops"``.
GROUPS = {
    "matmuls": ("mm", "addmm", "bmm", "_grouped_mm", "matmul", "linear"),
    "elementwise": ("silu", "silu_backward", "mul", "mul_", "add", "add_", "div", "sub", "neg", "sum", "pow"),
    "gather, scatter, copy": ("index_select", "index_copy", "index_copy_", "index_add", "index_add_",
                              "scatter_add_", "scatter_add", "gather", "scatter", "index", "index_put_",
                              "_index_put_impl_", "copy_", "fill_", "zero_", "cat", "clone", "contiguous",
                              "_to_copy", "constant_pad_nd"),
    "routing, sort": ("_softmax", "_softmax_backward_data", "topk", "sort", "argsort", "bincount", "cumsum",
                      "floor_divide", "arange", "eq", "gt", "lt", "logsumexp", "one_hot"),
}
#: Every group a profile reports, in plotting order.
GROUP_ORDER = (*GROUPS, "other ops", "python, dispatch")


def _group(op_name: str) -> str:
    name = op_name.removeprefix("aten::")
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "other ops"


def profile_step(module, x: torch.Tensor, grad_out: torch.Tensor, steps: int = 3, warmup: int = 1) -> dict:
    """Milliseconds per forward + backward step of ``module`` on ``x``, by operator group.

    Args:
        module: any module ``[..., d] -> [..., d]``.
        x: its input, ``requires_grad`` as the caller wants (the benchmarks differentiate it too).
        grad_out: the gradient fed to the output, the output's shape.
        steps: profiled steps (the result is their mean).
        warmup: unprofiled steps first.

    Returns:
        ``{"wall_ms", "groups": {group: ms}, "ops": {op: ms}}`` per step: ``groups`` has every name of
        :data:`GROUP_ORDER` and sums to ``wall_ms``; ``ops`` lists the operators' self times (ms, ``aten::``
        prefix removed), largest first.
    """
    from .bench import _step  # the benchmarks' training step (bench imports this module: a late import)

    for name, value, minimum in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    for _ in range(warmup):
        _step(module, x, grad_out)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            _step(module, x, grad_out)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    ops, groups = {}, dict.fromkeys(GROUP_ORDER, 0.0)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue  # profiler and autograd-engine ranges: their time is their children's
        ms = event.self_cpu_time_total / 1e3 / steps
        ops[event.key.removeprefix("aten::")] = ms
        groups[_group(event.key)] += ms
    groups["python, dispatch"] = max(wall_ms - sum(groups.values()), 0.0)
    ops = dict(sorted(ops.items(), key=lambda item: -item[1]))
    return dict(wall_ms=wall_ms, groups=groups, ops=ops)


def profile_layer(d_model: int = 512, d_hidden: int = 1024, num_experts: int = 8, k: int = 2, tokens: int = 2048,
                  *, steps: int = 3, rounds: int = 5, seed: int = 0) -> dict:
    """:func:`profile_step` of the benchmark's ``moe_ref`` layer and of the dense FFN of equal active FLOPs.

    The layers are those of :func:`~moe_ref.book.bench.bench_layer` (an :class:`~moe_ref.moe.MoE` built from a
    seeded ``transformers`` Mixtral block, and a SwiGLU :class:`~moe_ref.ffn.FFN` of width ``k * d_hidden``),
    on one sequence ``[1, tokens, d_model]`` in float32, with the gradient of the input too. Each of
    ``rounds`` rounds profiles both, in turn; each layer's reported profile is its round of median wall time,
    so that a slow spell of a shared machine during one round does not decide the split.

    Returns:
        ``{"config", "profiles": {"moe_ref": ..., "dense": ...}}``; each profile also has ``round_wall_ms``,
        every round's wall time.
    """
    from ..ffn import FFN
    from ..hf import from_hf
    from .bench import _mixtral_block

    torch.manual_seed(seed)
    modules = {"moe_ref": from_hf(_mixtral_block(d_model, d_hidden, num_experts, k)),
               "dense": FFN(d_model, k * d_hidden)}
    x = torch.randn(1, tokens, d_model, requires_grad=True)
    grad_out = torch.randn(1, tokens, d_model)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    every = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            every[name].append(profile_step(module, x, grad_out, steps=steps))
    profiles = {}
    for name, found in every.items():
        walls = [p["wall_ms"] for p in found]
        median_round = sorted(range(rounds), key=walls.__getitem__)[(rounds - 1) // 2]
        profiles[name] = dict(found[median_round], round_wall_ms=walls)
    config = dict(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, k=k, tokens=tokens, steps=steps,
                  rounds=rounds, seed=seed, threads=torch.get_num_threads(), dtype="float32",
                  mode="forward+backward")
    return dict(config=config, profiles=profiles)


def format_profile(result: dict) -> str:
    """A :func:`profile_layer` result as a text table: ms per step by group, one column per layer."""
    names = list(result["profiles"])
    lines = [f"{'ms per step':<24}" + "".join(f"{name:>12}" for name in names)]
    for group in ("wall time", *GROUP_ORDER):
        values = [p["wall_ms"] if group == "wall time" else p["groups"][group] for p in result["profiles"].values()]
        lines.append(f"{group:<24}" + "".join(f"{v:>12.1f}" for v in values))
    return "\n".join(lines)

"""Build a :class:`~moe_ref.moe.MoE` equivalent to a ``transformers`` MoE block, with its weights copied.

Supported blocks (``transformers`` 5.x; apart from Switch, the experts are stored as fused 3-D parameters
``gate_up_proj`` ``[E, 2 * d_hidden, d_model]`` and ``down_proj`` ``[E, d_model, d_hidden]``):

=================================  ===============================================================
block class                        routing
=================================  ===============================================================
``MixtralSparseMoeBlock``          softmax, top-k, renormalised :cite:p:`jiang2024mixtral`
``Qwen2MoeSparseMoeBlock``         softmax, top-k, ``norm_topk_prob``; one shared expert with a
                                   sigmoid gate
``Qwen3MoeSparseMoeBlock``         softmax, top-k, ``norm_topk_prob``
``OlmoeSparseMoeBlock``            softmax, top-k, ``norm_topk_prob``
``DeepseekV3MoE``                  sigmoid, selection bias, group-limited, scaled;
                                   ``n_shared_experts`` shared
``SwitchTransformersSparseMLP``    softmax, top-1, weight = the probability, capacity
                                   ``expert_capacity`` per sequence :cite:p:`fedus2022switch`
=================================  ===============================================================

Switch (``transformers`` 5.x ``SwitchTransformersSparseMLP``): the router computes its logits in
``router_dtype`` (only ``"float32"`` is accepted), takes the argmax expert, and keeps a token only while the
running count (``cumsum`` over the positions of the sequence) of tokens sent to that expert is at most
``expert_capacity``: position priority, capacity per sequence. The expert output is multiplied by the
router probability (not renormalised). A dropped token is skipped by the experts loop, so the block returns
**zeros** for it (the residual connection of ``SwitchTransformersLayerFF`` carries it); older
``transformers`` versions returned the unchanged hidden state scaled by the router probability instead. The
converted MoE is ``MoE(..., k=1, router=RouterConfig(norm_topk_prob=False),
capacity=CapacityConfig(capacity=expert_capacity, group="sequence", drop_priority="position"))``, which
drops the same tokens and returns the same zeros. The experts are plain (``wi``, activation, ``wo``, no
gate): ``dense_act_fn`` ``"relu"``, ``"gelu"`` or ``"silu"``. A router bias is refused; the dropout inside
the experts (``dropout_rate``, training mode only) is not reproduced.

**Jitter.** ``router_jitter_noise`` (on by default in Switch configs, 0.01) multiplies the router's input by
``U(1 - eps, 1 + eps)`` noise in training mode; Mixtral's multiplies the whole block input, so the experts
see it too. Both become :class:`~moe_ref.routers.RouterConfig` ``jitter_noise`` (with ``jitter_experts``
for Mixtral). In eval mode there is no noise and the two agree exactly. In training mode, seeded alike, they
draw the same noise: Mixtral agrees, and Switch routes the same tokens to the same experts. Switch's outputs
then agree in bfloat16 but not in float32, where ``transformers`` multiplies the block's input tensor in
place (its cast to float32 returns the same tensor), so its experts see the jittered input too; the Switch
paper jitters the router's input only, which is what the converted layer does (``jitter_experts=True``
reproduces the float32 block).

``transformers`` is imported only by :func:`from_hf`, never by ``import moe_ref``. The MoE returned is in
training mode like any new module, has the dtype and device of the block's expert weights (its router
stays float32, as :mod:`moe_ref.routers` explains), and has all auxiliary-loss coefficients at 0: set
``moe.loss_config = AuxLossConfig(...)`` to train with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .capacity import CapacityConfig
from .losses import AuxLossConfig
from .moe import MoE, SharedExpertConfig
from .routers import RouterConfig

_NO_LOSSES = AuxLossConfig(balance_coef=0.0)

#: ``transformers`` activation names and the gated activation of :mod:`moe_ref.ffn` they give in an expert.
_GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}

_SOFTMAX_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                   "OlmoeSparseMoeBlock")
#: Class names of the blocks :func:`from_hf` converts.
SUPPORTED = (*_SOFTMAX_BLOCKS, "DeepseekV3MoE", "SwitchTransformersSparseMLP")


def _block_class(module: nn.Module):
    """The ``transformers`` class of ``module`` among :data:`SUPPORTED` (by exact class, not by name only)."""
    name = type(module).__name__
    if name not in SUPPORTED:
        return None
    from transformers.models.deepseek_v3 import modeling_deepseek_v3
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.olmoe import modeling_olmoe
    from transformers.models.qwen2_moe import modeling_qwen2_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    from transformers.models.switch_transformers import modeling_switch_transformers

    for mod in (modeling_mixtral, modeling_qwen2_moe, modeling_qwen3_moe, modeling_olmoe, modeling_deepseek_v3,
                modeling_switch_transformers):
        cls = getattr(mod, name, None)
        if cls is not None and isinstance(module, cls):
            return name
    return None


def _activation(config) -> str:
    act = getattr(config, "hidden_act", None)
    if act not in _GATED_ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported; expected one of {tuple(_GATED_ACTIVATIONS)}")
    return _GATED_ACTIVATIONS[act]


@torch.no_grad()
def _copy_experts(moe: MoE, experts: nn.Module) -> None:
    """``gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and ``down_proj`` ``[E, H, I]`` -> our ``[E, in, out]``."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        raise ValueError("only the concatenated, non-transposed gate_up_proj layout is supported")
    d_hidden = moe.d_hidden
    if gate_up.shape != (moe.num_experts, 2 * d_hidden, moe.d_model) or down.shape != (moe.num_experts, moe.d_model,
                                                                                          d_hidden):
        raise ValueError(f"unexpected expert weight shapes gate_up_proj {tuple(gate_up.shape)}, down_proj "
                         f"{tuple(down.shape)}")
    moe.experts.w_in.copy_(gate_up[:, :d_hidden, :].transpose(1, 2))
    moe.experts.w_up.copy_(gate_up[:, d_hidden:, :].transpose(1, 2))
    moe.experts.w_out.copy_(down.transpose(1, 2))


@torch.no_grad()
def _copy_mlp(ffn: nn.Module, mlp: nn.Module) -> None:
    """A ``transformers`` gated MLP (``gate_proj``, ``up_proj``, ``down_proj`` Linears) into an :class:`FFN`."""
    ffn.w_in.weight.copy_(mlp.gate_proj.weight)
    ffn.w_up.weight.copy_(mlp.up_proj.weight)
    ffn.w_out.weight.copy_(mlp.down_proj.weight)


def _plain_activation(act: nn.Module) -> str:
    """The name of a plain activation module, found by evaluating it (``transformers`` has many classes)."""
    probe = torch.linspace(-4.0, 4.0, 81, dtype=torch.float64)
    with torch.no_grad():
        value = act(probe)
    for name, fn in (("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu)):
        if torch.allclose(value, fn(probe), rtol=0.0, atol=1e-12):
            return name
    raise ValueError(f"expert activation {act!r} is not supported; expected relu, gelu (exact) or silu")


def _from_switch(block: nn.Module) -> MoE:
    """``SwitchTransformersSparseMLP`` -> top-1 softmax :class:`~moe_ref.moe.MoE` with Switch's capacity."""
    router = block.router
    if router.dtype != torch.float32:
        raise ValueError(f"router_dtype={router.dtype} is not supported; the MoE router computes in float32")
    if router.classifier.bias is not None:
        raise ValueError("router_bias=True is not supported: the MoE router's gate has no bias")
    experts = [block.experts[f"expert_{e}"] for e in range(router.num_experts)]
    if any(e.wi.bias is not None or e.wo.bias is not None for e in experts):
        raise ValueError("experts with biases are not supported")
    d_hidden, d_model = experts[0].wi.weight.shape
    moe = MoE(d_model, d_hidden, router.num_experts, 1, activation=_plain_activation(experts[0].act),
              router=RouterConfig(norm_topk_prob=False, jitter_noise=float(router.jitter_noise or 0.0)),
              capacity=CapacityConfig(capacity=router.expert_capacity, group="sequence", drop_priority="position"),
              aux_losses=_NO_LOSSES)
    weight = experts[0].wi.weight
    moe.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        moe.router.gate.weight.copy_(router.classifier.weight)
        for e, expert in enumerate(experts):
            moe.experts.w_in[e].copy_(expert.wi.weight.t())
            moe.experts.w_out[e].copy_(expert.wo.weight.t())
    return moe


def from_hf(block: nn.Module) -> MoE:
    """A :class:`~moe_ref.moe.MoE` that computes the same function as the ``transformers`` MoE ``block``.

    Args:
        block: one of the blocks in :data:`~moe_ref.hf.SUPPORTED` (e.g. ``model.model.layers[i].mlp``).

    Returns:
        A new :class:`~moe_ref.moe.MoE` with copied weights (and, for DeepSeek-V3, the selection bias), with the
        block's dtype and device. Forward and backward agree with the block's to float rounding; the order
        in which a token's ``k`` expert outputs are summed may differ.

    Raises:
        TypeError: ``block`` is not a supported ``transformers`` MoE block.
        ValueError: a supported block with a configuration this library cannot express (an activation other
            than silu, gelu or relu; Switch's router bias or a ``router_dtype`` other than float32).
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be a torch.nn.Module, got {type(block).__name__}")
    name = _block_class(block)
    if name is None:
        raise TypeError(f"from_hf does not support {type(block).__name__}; supported blocks: {SUPPORTED}")
    if name == "SwitchTransformersSparseMLP":
        return _from_switch(block)
    experts, gate = block.experts, block.gate
    config = experts.config
    num_experts, d_model = gate.weight.shape
    d_hidden = experts.down_proj.shape[-1]
    common = dict(activation=_activation(config), aux_losses=_NO_LOSSES)
    if name in _SOFTMAX_BLOCKS:
        norm = getattr(gate, "norm_topk_prob", True)  # Mixtral always renormalises
        jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)  # Mixtral only: on the whole input
        router = RouterConfig(norm_topk_prob=bool(norm), jitter_noise=jitter, jitter_experts=jitter > 0)
        shared = getattr(block, "shared_expert", None)
        if shared is not None:
            common["shared"] = SharedExpertConfig(1, shared.gate_proj.out_features, gate=True)
        moe = MoE(d_model, d_hidden, num_experts, gate.top_k, router=router, **common)
    else:  # DeepseekV3MoE
        n_shared = config.n_shared_experts
        router = RouterConfig("sigmoid", norm_topk_prob=bool(gate.norm_topk_prob), n_group=gate.num_group,
                              topk_group=gate.topk_group, routed_scaling_factor=float(gate.routed_scaling_factor))
        shared = SharedExpertConfig(n_shared, block.shared_experts.gate_proj.out_features // n_shared)
        moe = MoE(d_model, d_hidden, num_experts, gate.top_k, router=router, shared=shared, **common)
    moe.to(device=experts.down_proj.device, dtype=experts.down_proj.dtype)  # the router stays float32
    with torch.no_grad():
        moe.router.gate.weight.copy_(gate.weight)
        _copy_experts(moe, experts)
        if name == "DeepseekV3MoE":
            _copy_mlp(moe.shared, block.shared_experts)
            moe.router.expert_bias.copy_(gate.e_score_correction_bias)
        elif moe.shared is not None:
            _copy_mlp(moe.shared, block.shared_expert)
            moe.shared_gate.weight.copy_(block.shared_expert_gate.weight)
    return moe

"""Sparse upcycling: an MoE layer made from a trained dense FFN (:cite:t:`komatsuzaki2023upcycling`).

Every expert starts as a copy of the dense FFN and the router starts fresh. With top-``k`` routing whose
``k`` weights are renormalised to sum to 1, the new layer computes exactly the dense FFN at step 0,
``sum_i w_i FFN(x) = FFN(x)``, whatever the router says; training then pulls the copies apart. The sunk
cost of the dense training is kept instead of starting the MoE from scratch.

Without renormalisation (Switch's raw top-1 weight ``p_i``) the output would be ``p_i FFN(x)``, a different
function, so :func:`upcycle` refuses it.
"""

from __future__ import annotations

import torch

from .ffn import FFN
from .losses import AuxLossConfig
from .moe import MoE
from .routers import RouterConfig


def upcycle(ffn: FFN, num_experts: int, k: int = 2, *, router: RouterConfig | str | None = None,
            aux_losses: AuxLossConfig | None = None, router_init_std: float = 0.02, **moe_kwargs) -> MoE:
    """An :class:`~moe_ref.moe.MoE` whose ``num_experts`` experts are copies of ``ffn``.

    Args:
        ffn: the trained dense :class:`~moe_ref.ffn.FFN` (without biases: experts have none).
        num_experts: ``E``.
        k: experts per token; the layer renormalises the ``k`` weights, so ``k = 1`` is refused (a
            renormalised top-1 weight is always 1 and the router would get no gradient).
        router: a softmax or sigmoid :class:`~moe_ref.routers.RouterConfig` (or kind name); default softmax
            with ``norm_topk_prob=True``. Its ``norm_topk_prob`` must not be ``False``.
        aux_losses: as for :class:`~moe_ref.moe.MoE`.
        router_init_std: standard deviation of the fresh router's gate weights.
        **moe_kwargs: other :class:`~moe_ref.moe.MoE` arguments (``impl``, ``capacity``...).

    Returns:
        the new layer, on ``ffn``'s device and in its dtype. At initialisation it computes ``ffn(x)`` for
        every ``x`` (up to float rounding), as long as no token is dropped by a capacity.
    """
    if not isinstance(ffn, FFN):
        raise TypeError(f"ffn must be a moe_ref.ffn.FFN, got {type(ffn).__name__}")
    if ffn.bias:
        raise ValueError("ffn must have no biases (bias=False): experts have none")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2 (renormalised top-1 weights are always 1), got {k!r}")
    router = RouterConfig("softmax", norm_topk_prob=True) if router is None else RouterConfig.coerce(router)
    if router.kind not in ("softmax", "sigmoid"):
        raise ValueError(f"router must be a softmax or sigmoid router, got kind={router.kind!r}")
    if router.norm_topk_prob is False:
        raise ValueError("router.norm_topk_prob must be True: only renormalised weights sum to 1")
    if router.routed_scaling_factor != 1.0:
        raise ValueError("router.routed_scaling_factor must be 1.0 to reproduce the dense FFN")
    weight = ffn.w_in.weight
    moe = MoE(ffn.d_model, ffn.d_hidden, num_experts, k, activation=ffn.activation, router=router,
              aux_losses=aux_losses, **moe_kwargs).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        # nn.Linear stores [out, in]; Experts stores input-major [E, in, out]
        moe.experts.w_in.copy_(ffn.w_in.weight.t().expand_as(moe.experts.w_in))
        if ffn.w_up is not None:
            moe.experts.w_up.copy_(ffn.w_up.weight.t().expand_as(moe.experts.w_up))
        moe.experts.w_out.copy_(ffn.w_out.weight.t().expand_as(moe.experts.w_out))
        moe.router.gate.weight.normal_(0.0, router_init_std)
    return moe

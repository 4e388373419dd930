"""moe_ref: the reference implementation that accompanies the Mixture-of-Experts book.

One small module per idea; :class:`~moe_ref.moe.MoE` only composes them:

* :mod:`~moe_ref.ffn`, :mod:`~moe_ref.activations`, :mod:`~moe_ref.counting` (chapter 1): the dense FFN and
  its formula; parameters and FLOPs.
* :mod:`~moe_ref.routing` (chapter 2): routing rules, pure functions from logits to a
  :class:`~moe_ref.routing.Routing` record; :mod:`~moe_ref.routers`: the router modules and
  :class:`~moe_ref.routers.RouterConfig`.
* :mod:`~moe_ref.experts` (chapter 2): the stacked expert weights and the FFN on them.
* :mod:`~moe_ref.losses` (chapter 3): balance and z-losses, and how the layer attaches them to its output.
* :mod:`~moe_ref.capacity` (chapter 4): capacity, drop priorities, :class:`~moe_ref.capacity.CapacityRecord`.
* :mod:`~moe_ref.dispatch` (chapters 2, 5): sort, permute, combine; :mod:`~moe_ref.padded` (chapters 4, 5):
  fixed-size buffers, GShard's einsum and the index form.
* :mod:`~moe_ref.shared` (chapter 2): shared experts and the residual MoE; :mod:`~moe_ref.moe`: the layer.
* :mod:`~moe_ref.kernels` (chapters 5, 6): ``grouped_mm`` and its Triton backend.
* :mod:`~moe_ref.upcycling` (chapter 7): an MoE made of copies of a trained dense FFN;
  :mod:`~moe_ref.specialization` (chapter 8): what routing follows, measured on recorded routings.
* :mod:`~moe_ref.expert_parallel` (chapter 9): the experts spread over ranks, on ``torch.distributed``;
  :mod:`~moe_ref.checkpoint`: sharded safetensors checkpoints loadable at any world size;
  :mod:`~moe_ref.launch`: worker processes for notebooks and tests; :mod:`moe_ref.train_ep`: the ``torchrun``
  demo.
* :mod:`~moe_ref.hf`: an equivalent :class:`~moe_ref.moe.MoE` from a ``transformers`` MoE block.
* :mod:`moe_ref.book`: what the notebooks need beside the library (data, tiny model, trainer, settings,
  benchmarks); :mod:`moe_ref.experiments`: the full-scale experiments of chapters 7 and 8.
"""

from .activations import ACTIVATIONS, GATED
from .capacity import (CAPACITY_GROUPS, DROP_PRIORITIES, CapacityConfig, CapacityRecord, apply_capacity,
                       expert_capacity, queue_positions)
from .counting import (MoEParams, attention_flops, count_params, dispatch_bytes, ffn_flops, ffn_params, moe_flops,
                       moe_params)
from .dispatch import DispatchPlan, combine, permute, sort_by_expert
from .experts import Experts
from .ffn import FFN
from .checkpoint import load_sharded, save_sharded
from .expert_parallel import (ExpertParallelMoE, expert_parallel, node_limited, ranks_per_token,
                              reduce_gradients)
from . import launch
from .hf import from_hf
from .kernels.grouped_mm import grouped_mm
from .losses import AuxLossConfig, load_balancing_loss, router_z_loss, sequence_balance_loss
from .moe import IMPLS, MoE
from .shared import ResidualConfig, SharedExpertConfig
from .routers import (ROUTERS, ExpertChoiceRouter, NoisyTopKRouter, Router, RouterConfig, SigmoidRouter,
                      TopKRouter, make_router)
from .upcycling import upcycle
from .routing import (Routing, expert_choice, expert_choice_capacity, noisy_logits, sigmoid_grouped_topk,
                      softmax_topk)

__version__ = "0.2.0"


def __getattr__(name: str):
    # moe_ref.book (the notebooks' helpers) is imported on first use, not with the library
    if name == "book":
        import importlib

        return importlib.import_module(".book", __name__)
    raise AttributeError(f"module 'moe_ref' has no attribute {name!r}")

__all__ = [
    "FFN", "ACTIVATIONS", "GATED", "count_params", "ffn_params", "ffn_flops", "attention_flops",
    "MoE", "IMPLS", "Experts", "SharedExpertConfig", "ResidualConfig", "MoEParams", "moe_params", "moe_flops",
    "Routing", "softmax_topk", "noisy_logits", "sigmoid_grouped_topk", "expert_choice", "expert_choice_capacity",
    "RouterConfig", "ROUTERS", "Router", "TopKRouter", "NoisyTopKRouter", "SigmoidRouter", "ExpertChoiceRouter",
    "make_router",
    "AuxLossConfig", "load_balancing_loss", "router_z_loss", "sequence_balance_loss",
    "CapacityConfig", "CapacityRecord", "expert_capacity", "queue_positions", "apply_capacity",
    "CAPACITY_GROUPS", "DROP_PRIORITIES",
    "DispatchPlan", "sort_by_expert", "permute", "combine",
    "grouped_mm", "from_hf", "upcycle", "dispatch_bytes",
    "ExpertParallelMoE", "expert_parallel", "reduce_gradients", "node_limited", "ranks_per_token",
    "save_sharded", "load_sharded",
]

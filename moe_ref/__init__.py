"""moe_ref: the reference implementation that accompanies the Mixture-of-Experts book.

Each module holds one idea and mirrors a chapter:

* :mod:`moe_ref.ffn`, :mod:`moe_ref.counting` (chapter 1): the dense FFN; parameters and FLOPs.
* :mod:`moe_ref.data`, :mod:`moe_ref.model`, :mod:`moe_ref.train` (chapter 1, used by all): the corpus with
  domain labels, the tiny transformer, the training loop.
* :mod:`moe_ref.routing`, :mod:`moe_ref.moe`, :mod:`moe_ref.grouped_mm` (chapter 2): routers, the MoE layer,
  the grouped matmul of its experts.
* :mod:`moe_ref.losses` (chapter 3): load-balancing and router z-losses.
* :mod:`moe_ref.hf`: an equivalent :class:`~moe_ref.moe.MoE` from a ``transformers`` MoE block (imports ``transformers``
  only when called).
* :mod:`moe_ref.book`: the device and scale knob of the notebooks.
"""

from .counting import MoEParams, attention_flops, count_params, ffn_flops, ffn_params, moe_flops, moe_params
from .data import DOMAINS, Corpus, build_corpus, decode, encode
from .ffn import FFN
from .model import ModelConfig, TinyTransformer
from .train import History, TrainConfig, evaluate, train
from .grouped_mm import grouped_mm
from .hf import from_hf
from .losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from .moe import DispatchPlan, Experts, MoE
from .routing import (ExpertChoiceRouter, NoisyTopKRouter, Router, Routing, SigmoidRouter, TopKRouter,
                      expert_choice, expert_choice_capacity, make_router, sigmoid_grouped_topk, softmax_topk)
from .capacity import CAPACITY_GROUPS, DROP_PRIORITIES, apply_capacity, expert_capacity, queue_positions
from .dispatch import buffer_slots, dispatch_tensors, experts_padded, moe_einsum, moe_padded

__version__ = "0.1.0"

__all__ = [
    "FFN", "count_params", "ffn_params", "ffn_flops", "attention_flops",
    "DOMAINS", "Corpus", "build_corpus", "encode", "decode",
    "ModelConfig", "TinyTransformer", "TrainConfig", "History", "train", "evaluate",
    "MoE", "Experts", "DispatchPlan", "MoEParams", "moe_params", "moe_flops", "grouped_mm", "from_hf",
    "Routing", "Router", "TopKRouter", "NoisyTopKRouter", "SigmoidRouter", "ExpertChoiceRouter", "make_router",
    "softmax_topk", "sigmoid_grouped_topk", "expert_choice", "expert_choice_capacity",
    "load_balancing_loss", "router_z_loss", "sequence_balance_loss",
    "expert_capacity", "queue_positions", "apply_capacity", "CAPACITY_GROUPS", "DROP_PRIORITIES",
    "buffer_slots", "dispatch_tensors", "experts_padded", "moe_einsum", "moe_padded",
]

"""Total and active parameters of published MoE models, from their ``transformers`` configs, two ways.

* :func:`count_meta` builds the ``transformers`` model on PyTorch's *meta* device (shapes only: nothing is
  allocated or downloaded, and DeepSeek-V3's 671B parameters take well under a second) and sums ``numel``
  of its parameters, sorted into :data:`PARTS` by name.
* :func:`count_formula` computes the same parts from the config's fields with :mod:`moe_ref.counting`'s
  formulas (:func:`~moe_ref.counting.moe_params`, :func:`~moe_ref.counting.ffn_params`) and the attention
  formulas here.

The two are independent: one reads the modules ``transformers`` builds, the other only the config. A token's
*active* parameters are everything except the routed experts, plus ``k`` of the ``E`` routed experts of each
MoE layer (shared experts are always active). For Switch, an encoder-decoder, the count is over both stacks,
as Switch's paper counts its models; a source token passes only through the encoder and a target token
mostly through the decoder.

:func:`parameter_bytes` and :func:`forward_peak_bytes` measure what a (small, real) model costs to hold and
to run: its weights, and the most bytes of tensors its forward pass holds at once.

Supported configs (``transformers`` 5.x): ``MixtralConfig``, ``SwitchTransformersConfig``,
``DeepseekV3Config``, ``Qwen3MoeConfig``, ``OlmoeConfig``. :func:`published_configs` gives the six models of
chapter 10 with the fields that differ from the ``transformers`` defaults set explicitly, and the source of
each shape. ``transformers`` is imported only inside these functions, never by ``import moe_ref``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .counting import ffn_params, moe_params

PARTS = ("embedding", "attention", "dense_ffn", "router", "routed_experts", "shared_experts", "norms",
         "lm_head")
"""The parts a model's parameters are sorted into. ``norms`` holds every normalisation weight, including
those inside attention (Qwen3's and OLMoE's query/key norms, DeepSeek-V3's low-rank norms); ``attention``
includes Switch's relative position biases; ``lm_head`` is 0 when it is tied to the embedding."""

SUPPORTED = ("MixtralConfig", "SwitchTransformersConfig", "DeepseekV3Config", "Qwen3MoeConfig", "OlmoeConfig")
"""Class names of the configs this module counts."""


@dataclass(frozen=True)
class Breakdown:
    """Parameters of one model by part (:data:`PARTS`), stored and used per token.

    Attributes:
        parts: part -> parameters stored.
        active_parts: part -> parameters one token uses (equal to ``parts`` except for ``routed_experts``).
        num_experts: routed experts ``E`` of each MoE layer; ``k``: routed experts per token.
        moe_layers: number of MoE layers (over both stacks for Switch).
    """

    parts: dict[str, int]
    active_parts: dict[str, int]
    num_experts: int
    k: int
    moe_layers: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def active(self) -> int:
        return sum(self.active_parts.values())

    @property
    def active_share(self) -> float:
        """The fraction of the weights one token's forward pass multiplies (active over total parameters)."""
        return self.active / self.total

    @property
    def expert_share(self) -> float:
        """Routed experts over total parameters."""
        return self.parts["routed_experts"] / self.total

    @property
    def embeddings(self) -> int:
        """Input embedding plus (untied) output head."""
        return self.parts["embedding"] + self.parts["lm_head"]

    def with_experts(self, experts: int) -> int:
        """Parameters of the same model with ``experts`` routed experts per MoE layer kept, the rest removed.

        ``with_experts(1)`` is the dense model the MoE was cut from when every expert has the dense FFN's
        shape (Mixtral's: a Mistral-7B-shaped model, plus its router's ``d * E`` per layer, 1M parameters), and
        ``with_experts(k)`` equals ``active``.
        """
        if not isinstance(experts, int) or not 0 <= experts <= self.num_experts:
            raise ValueError(f"experts must be an int in [0, {self.num_experts}], got {experts!r}")
        return self.total - self.parts["routed_experts"] * (self.num_experts - experts) // self.num_experts


def _config_name(config) -> str:
    name = type(config).__name__
    if name not in SUPPORTED:
        raise TypeError(f"config must be one of {', '.join(SUPPORTED)}; got {name}")
    return name


def meta_model(config) -> nn.Module:
    """The ``transformers`` model of ``config`` (causal LM, or Switch's encoder-decoder) on the meta device."""
    name = _config_name(config)
    import transformers

    cls = (transformers.SwitchTransformersForConditionalGeneration if name == "SwitchTransformersConfig"
           else transformers.AutoModelForCausalLM)
    with torch.device("meta"):  # shapes only: no memory, no random numbers, no download
        return cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)


def _moe_shape(config) -> tuple[int, int]:
    """``(E, k)`` of the config's MoE layers."""
    name = _config_name(config)
    if name == "SwitchTransformersConfig":
        return config.num_experts, 1
    if name == "DeepseekV3Config":
        return config.n_routed_experts, config.num_experts_per_tok
    if name == "MixtralConfig":
        return config.num_local_experts, config.num_experts_per_tok
    return config.num_experts, config.num_experts_per_tok


def _part_of(name: str) -> str:
    """The part of :data:`PARTS` a ``transformers`` parameter name belongs to (the order of tests matters)."""
    last = name.rsplit(".", 2)[-2] if name.endswith(".weight") or name.endswith(".bias") else name
    if "shared_expert" in name:
        return "shared_experts"
    if ".experts." in name:
        return "routed_experts"
    if "norm" in last:
        return "norms"
    if name.startswith("lm_head."):
        return "lm_head"
    if "embed_tokens" in name or name == "shared.weight":
        return "embedding"
    if name.endswith("mlp.gate.weight") or ".router." in name:
        return "router"
    if "attn" in name or "Attention" in name:
        return "attention"
    if ".mlp." in name:
        return "dense_ffn"
    raise RuntimeError(f"parameter {name!r} fits none of the parts {PARTS}")


def _breakdown(parts: dict[str, int], num_experts: int, k: int, moe_layers: int,
               active_routed: int | None = None) -> Breakdown:
    active = dict(parts)
    # every MoE layer's experts have one shape, so k/E of them is exact
    active["routed_experts"] = (parts["routed_experts"] * k // num_experts if active_routed is None
                                else active_routed)
    return Breakdown(parts, active, num_experts, k, moe_layers)


def count_meta(config) -> Breakdown:
    """Count the parameters of ``config``'s ``transformers`` model built on the meta device, by part.

    Each parameter tensor is counted once (a tied output head is the embedding, so ``lm_head`` is 0). Raises
    ``TypeError`` for a config not in :data:`SUPPORTED`.
    """
    model = meta_model(config)
    parts = dict.fromkeys(PARTS, 0)
    moe_layers = set()
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        part = _part_of(name)
        parts[part] += p.numel()
        if part == "router":
            moe_layers.add(name)
    num_experts, k = _moe_shape(config)
    return _breakdown(parts, num_experts, k, len(moe_layers))


# --- formulas -----------------------------------------------------------------------------------------------

def gqa_attention_params(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Bias-free grouped-query attention: ``Q`` and output ``d * H * hd`` each, ``K`` and ``V`` ``d * KV * hd``
    each (multi-head attention when ``KV = H``)."""
    return 2 * d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim


def mla_attention_params(d_model: int, n_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                         qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int) -> tuple[int, int]:
    """DeepSeek-V3's multi-head latent attention, bias-free: ``(matrices, norm weights)``.

    Queries: ``d -> q_lora_rank -> H * (nope + rope)`` (or ``d -> H * (nope + rope)`` directly); keys and
    values: ``d -> kv_lora_rank + rope`` (the latent and the shared rotary key), then ``kv_lora_rank ->
    H * (nope + v)``; output ``H * v -> d``. The two low-rank norms have ``q_lora_rank`` and ``kv_lora_rank``
    weights.
    """
    qk = qk_nope_head_dim + qk_rope_head_dim
    if q_lora_rank is None:
        q, q_norm = d_model * n_heads * qk, 0
    else:
        q, q_norm = d_model * q_lora_rank + q_lora_rank * n_heads * qk, q_lora_rank
    kv = d_model * (kv_lora_rank + qk_rope_head_dim) + kv_lora_rank * n_heads * (qk_nope_head_dim + v_head_dim)
    return q + kv + n_heads * v_head_dim * d_model, q_norm + kv_lora_rank


def _refuse_attention_bias(config) -> None:
    if getattr(config, "attention_bias", False):
        raise ValueError(f"{type(config).__name__} with attention_bias=True is not counted by formula "
                         "(the published models have none)")


def count_formula(config) -> Breakdown:
    """Count the parameters of ``config`` by formula, from its fields only, by part (:data:`PARTS`).

    Raises ``TypeError`` for a config not in :data:`SUPPORTED`.
    """
    name = _config_name(config)
    num_experts, k = _moe_shape(config)
    parts = dict.fromkeys(PARTS, 0)
    if name == "SwitchTransformersConfig":
        return _switch_formula(config, parts, num_experts)
    _refuse_attention_bias(config)
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    parts["embedding"] = V * d
    parts["lm_head"] = 0 if config.tie_word_embeddings else V * d
    parts["norms"] = 2 * L * d + d  # two RMSNorms a layer and the final one
    if name == "DeepseekV3Config":
        attn, attn_norms = mla_attention_params(d, config.num_attention_heads, config.q_lora_rank,
                                                config.kv_lora_rank, config.qk_nope_head_dim,
                                                config.qk_rope_head_dim, config.v_head_dim)
        parts["attention"], parts["norms"] = L * attn, parts["norms"] + L * attn_norms
        moe = [i >= config.first_k_dense_replace for i in range(L)]
        h, shared = config.moe_intermediate_size, config.n_shared_experts
        router = "sigmoid"  # its selection bias is a buffer, not a parameter
    else:
        H, KV = config.num_attention_heads, config.num_key_value_heads
        hd = getattr(config, "head_dim", None) or d // H
        parts["attention"] = L * gqa_attention_params(d, H, KV, hd)
        if name == "Qwen3MoeConfig":
            parts["norms"] += L * 2 * hd  # per-head RMSNorm of queries and keys, shared by the heads
            moe = [i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0
                   for i in range(L)]
        else:
            moe = [True] * L
        if name == "OlmoeConfig":
            parts["norms"] += L * (H + KV) * hd  # RMSNorm over all query and all key channels
        # Mixtral's and OLMoE's intermediate_size is the experts' width
        h = config.moe_intermediate_size if name == "Qwen3MoeConfig" else config.intermediate_size
        shared, router = 0, "softmax"
    # one MoE layer: moe_params' total is router + E experts + shared; its active has k experts instead
    layer = moe_params(d, h, num_experts, k, "swiglu", router=router, n_shared=shared, d_shared=h)
    router_params = d * num_experts
    shared_params = ffn_params(d, shared * h, "swiglu") if shared else 0
    n_moe = sum(moe)
    parts["router"] = n_moe * router_params
    parts["shared_experts"] = n_moe * shared_params
    parts["routed_experts"] = n_moe * (layer.total - router_params - shared_params)
    parts["dense_ffn"] = (L - n_moe) * ffn_params(d, config.intermediate_size, "swiglu")
    return _breakdown(parts, num_experts, k, n_moe,
                      active_routed=n_moe * (layer.active - router_params - shared_params))


def _switch_formula(config, parts: dict[str, int], num_experts: int) -> Breakdown:
    """Switch Transformer (T5 encoder-decoder, ReLU FFNs, top-1), both stacks."""
    d, V, H, d_kv, d_ff = config.d_model, config.vocab_size, config.num_heads, config.d_kv, config.d_ff
    # tied (the released models): one matrix for the encoder's and decoder's inputs and the output head;
    # untied, transformers 5 gives the encoder and the decoder their own input matrices besides ``shared``
    parts["embedding"] = V * d if config.tie_word_embeddings else 3 * V * d
    parts["lm_head"] = 0 if config.tie_word_embeddings else V * d
    attn = 4 * d * H * d_kv
    buckets = config.relative_attention_num_buckets * H  # relative position bias, first layer of a stack
    layers = {"encoder": (config.num_layers, config.encoder_sparse_step, 1),
              "decoder": (config.num_decoder_layers, config.decoder_sparse_step, 2)}
    n_moe = 0
    for n_layers, step, n_attn in layers.values():
        parts["attention"] += n_layers * n_attn * attn + buckets
        parts["norms"] += n_layers * (n_attn + 1) * d + d  # one T5 LayerNorm per sub-layer, and a final one
        for i in range(n_layers):  # transformers' rule for which layers are sparse
            if step > 0 and (i % step == 1 or step == 1):
                n_moe += 1
            else:
                parts["dense_ffn"] += ffn_params(d, d_ff, "relu")
    layer = moe_params(d, d_ff, num_experts, 1, "relu")
    parts["router"] = n_moe * d * num_experts
    parts["routed_experts"] = n_moe * (layer.total - d * num_experts)
    return _breakdown(parts, num_experts, 1, n_moe, active_routed=n_moe * (layer.active - d * num_experts))


# --- the published models -----------------------------------------------------------------------------------

def published_configs() -> dict[str, object]:
    """The six models of chapter 10, as ``transformers`` configs, by name.

    * Mixtral 8x7B: ``MixtralConfig()`` defaults :cite:p:`jiang2024mixtral`.
    * Switch-Base-8 and Switch-Base-128: the ``transformers`` defaults are *not* the released checkpoints'
      shape (``d_ff`` 2048 and 3 sparse layers a stack); the released ``google/switch-base-*`` configs have
      ``d_ff`` 3072 and every other layer sparse (6 a stack), set here :cite:p:`fedus2022switch`.
    * DeepSeek-V3: ``DeepseekV3Config()`` defaults; the multi-token-prediction module is not part of the
      ``transformers`` model and not counted (the 671B of the report exclude it) :cite:p:`deepseekv3`.
    * Qwen3-30B-A3B: the defaults have 24 layers and ``head_dim`` 64; the released config has 48 layers,
      ``head_dim`` 128 and normalised top-k, set here.
    * OLMoE-1B-7B: the defaults have experts of width 2048; the released model's are 1024, set here.
    """
    from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen3MoeConfig, SwitchTransformersConfig

    switch = dict(d_ff=3072, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6)
    return {
        "Mixtral 8x7B": MixtralConfig(),
        "Switch-Base-8": SwitchTransformersConfig(num_experts=8, **switch),
        "Switch-Base-128": SwitchTransformersConfig(num_experts=128, **switch),
        "DeepSeek-V3": DeepseekV3Config(),
        "Qwen3-30B-A3B": Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, vocab_size=151936,
                                        intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                        num_experts_per_tok=8, norm_topk_prob=True,
                                        tie_word_embeddings=False),
        "OLMoE-1B-7B": OlmoeConfig(intermediate_size=1024),
    }


# --- memory of a real (small) model -------------------------------------------------------------------------

def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor counted once, in their own dtypes."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class PeakBytes(NamedTuple):
    """Bytes of the tensors a call created: ``peak`` at most at once, ``retained`` still alive after it."""

    peak: int
    retained: int


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages the operators under it create, while any tensor on them is alive.

    Every ATen operator's outputs pass through :meth:`__torch_dispatch__`. A new storage adds its bytes;
    a weak-reference finaliser on each tensor that uses it removes them when the last such tensor is
    collected (CPython frees a tensor as soon as its last reference goes, so the count follows the program).
    Views and in-place results share their input's storage and add nothing. Scratch memory inside one
    kernel is not seen.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data pointer -> [tensors alive, bytes]

    def _release(self, pointer: int) -> None:
        entry = self._storages[pointer]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            pointer = storage.data_ptr()
            if pointer == 0:  # an empty tensor
                continue
            entry = self._storages.get(pointer)
            if entry is None and pointer in inputs:  # a view of, or in place on, memory made before the call
                continue
            if entry is None:
                entry = self._storages[pointer] = [0, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, pointer)
        return out


def forward_peak_bytes(module: nn.Module, *args, **kwargs) -> PeakBytes:
    """Run ``module(*args, **kwargs)`` without gradients and count the bytes of the tensors it creates.

    ``peak`` is the most bytes of such tensors alive at one time: the activations and buffers of an
    inference forward pass, on top of the parameters (:func:`parameter_bytes`) and the inputs, which are not
    counted. ``retained`` is what is still alive when the call returns (the output, and anything the module
    keeps, such as a routing record). Exact for CPU tensors created by ATen operators; kernels' internal
    scratch space is not seen, so it is a lower bound on the allocator's peak.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    mode = _LiveBytes()
    with torch.no_grad(), mode:
        out = module(*args, **kwargs)
    retained = mode.live
    del out
    return PeakBytes(mode.peak, retained)

"""moe_ref.accounting: formula counts against the meta-device transformers models, and published figures."""

import pytest

transformers = pytest.importorskip("transformers")

from moe_ref import accounting  # noqa: E402

PUBLISHED = accounting.published_configs()


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_formula_equals_meta_model_per_part(name):
    config = PUBLISHED[name]
    meta, formula = accounting.count_meta(config), accounting.count_formula(config)
    model = accounting.meta_model(config)
    # the meta count is the plain sum over the module's (deduplicated) parameters
    assert meta.total == sum(p.numel() for p in model.parameters())
    assert formula.parts == meta.parts
    assert formula.active_parts == meta.active_parts  # moe_params' active against k/E of the experts
    assert formula.moe_layers == meta.moe_layers


TINY = {
    "mixtral, GQA, tied": transformers.MixtralConfig(
        vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=3, tie_word_embeddings=True),
    "qwen3, dense layers": transformers.Qwen3MoeConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        decoder_sparse_step=2, mlp_only_layers=[3]),
    "olmoe": transformers.OlmoeConfig(
        vocab_size=50, hidden_size=32, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2),
    "deepseek, no q lora": transformers.DeepseekV3Config(
        vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=8, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    "switch, every layer sparse, untied": transformers.SwitchTransformersConfig(
        vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_decoder_layers=2, num_heads=2,
        num_experts=4, num_sparse_encoder_layers=3, num_sparse_decoder_layers=1, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(TINY))
def test_formula_equals_meta_model_on_other_shapes(name):
    config = TINY[name]
    meta, formula = accounting.count_meta(config), accounting.count_formula(config)
    assert formula.parts == meta.parts
    assert formula.active_parts == meta.active_parts


def test_tiny_deepseek_counted_by_hand():
    b = accounting.count_formula(TINY["deepseek, no q lora"])
    d, H = 32, 4
    attention = d * H * 12 + d * (16 + 4) + 16 * H * (8 + 6) + H * 6 * d  # q, kv_a, kv_b, o
    assert b.parts["attention"] == 4 * attention
    assert b.parts["norms"] == 4 * (2 * d + 16) + d  # no q norm without q lora
    assert b.parts["routed_experts"] == 3 * 8 * 3 * d * 8
    assert b.parts["shared_experts"] == 3 * 3 * d * 16
    assert b.parts["dense_ffn"] == 3 * d * 48
    assert b.active_parts["routed_experts"] == 3 * 2 * 3 * d * 8


def test_mixtral_by_hand_and_as_published():
    d, h, V, L, E = 4096, 14336, 32000, 32, 8
    attention = 2 * d * d + 2 * d * 1024            # q, o: 32 heads of 128; k, v: 8 KV heads of 128
    expert = 3 * d * h                              # gate, up, down
    other = L * (attention + d * E + 2 * d) + d + 2 * V * d
    b = accounting.count_meta(PUBLISHED["Mixtral 8x7B"])
    assert b.total == other + L * E * expert
    assert b.active == other + L * 2 * expert
    assert f"{b.total / 1e9:.1f}" == "46.7"         # Mistral AI: 46.7B total
    assert f"{b.active / 1e9:.1f}" == "12.9"        # 12.9B active, embeddings included
    assert b.with_experts(2) == b.active
    assert f"{b.with_experts(1) / 1e9:.2f}" == "7.24"  # one expert a layer: a Mistral-7B-shaped model
    non_expert = b.total - b.parts["routed_experts"]
    assert b.with_experts(1) == non_expert + L * expert
    # "8 x 7B": eight Mistral-7B-shaped models hold the non-expert parameters 8 times, Mixtral once
    assert 8 * b.with_experts(1) - b.total == 7 * non_expert


@pytest.mark.parametrize("name, total, active", [
    ("DeepSeek-V3", "671", "37.6"),      # report: 671B total, 37B activated
    ("Qwen3-30B-A3B", "30.5", "3.35"),   # model card: 30.5B total, 3.3B activated
    ("OLMoE-1B-7B", "6.92", "1.28"),     # paper: 6.9B total, 1.3B active
    ("Switch-Base-8", "0.619", "0.223"),
    ("Switch-Base-128", "7.42", "0.224"),  # Switch paper, Table 9: 7.4B
])
def test_other_models_as_published(name, total, active):
    b = accounting.count_meta(PUBLISHED[name])
    assert (f"{b.total / 1e9:.3g}", f"{b.active / 1e9:.3g}") == (total, active)


def test_unknown_config_type_is_named():
    with pytest.raises(TypeError, match="LlamaConfig"):
        accounting.count_meta(transformers.LlamaConfig())
    with pytest.raises(TypeError, match="LlamaConfig"):
        accounting.count_formula(transformers.LlamaConfig())
    with pytest.raises(TypeError, match="dict"):
        accounting.count_formula({"hidden_size": 8})


def test_bad_expert_count_and_attention_bias():
    b = accounting.count_formula(PUBLISHED["Mixtral 8x7B"])
    with pytest.raises(ValueError, match="experts"):
        b.with_experts(9)
    with pytest.raises(ValueError, match="attention_bias"):
        accounting.count_formula(transformers.OlmoeConfig(attention_bias=True))


def test_forward_peak_bytes_by_hand():
    import torch
    from torch import nn

    T, d, h = 100, 16, 48
    mlp = nn.Sequential(nn.Linear(d, h, bias=False), nn.ReLU(), nn.Linear(h, d, bias=False))
    x = torch.randn(T, d)
    # Sequential keeps the first product [T, h] until ReLU's output [T, h] exists: 2 T h floats at once
    # (then [T, h] + [T, d] < 2 T h); the output [T, d] is what is left
    assert accounting.forward_peak_bytes(mlp, x) == (2 * T * h * 4, T * d * 4)
    assert accounting.parameter_bytes(mlp) == 2 * d * h * 4
    assert accounting.parameter_bytes(mlp.to(torch.bfloat16)) == 2 * d * h * 2
    x = torch.randn(T, d, dtype=torch.bfloat16)
    y = torch.empty(T, h, dtype=torch.bfloat16)

    class InPlace(nn.Module):
        def forward(self, x):
            z = x.view(T * d)          # a view: no new storage
            z.mul_(2)                  # in place: none either
            return y.clone().add_(1)   # one new [T, h] storage
    assert accounting.forward_peak_bytes(InPlace(), x) == (T * h * 2, T * h * 2)
    with pytest.raises(TypeError, match="Module"):
        accounting.forward_peak_bytes(lambda x: x, x)

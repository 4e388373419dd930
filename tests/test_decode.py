"""KV-cached generation (moe_ref.decode) and the MoE layer's decode fast path (dispatch.routed_decode)."""

import pytest
import torch

from moe_ref.book.model import ModelConfig, TinyTransformer
from moe_ref.capacity import CapacityConfig
from moe_ref.decode import KVCache, forward_cached, generate, sample
from moe_ref.dispatch import routed_decode, routed_grouped
from moe_ref.moe import MoE

torch.set_num_threads(1)

CONFIG = ModelConfig(vocab_size=32, block_size=16, d_model=32, n_layers=2, n_heads=4, d_hidden=64)


def _model(kind: str) -> TinyTransformer:
    torch.manual_seed(0)
    if kind == "dense":
        model = TinyTransformer(CONFIG)
    else:
        model = TinyTransformer(CONFIG, lambda i: MoE(CONFIG.d_model, 32, 4, k=2))
    with torch.no_grad():  # larger weights than the init, so that positions and experts matter
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def _greedy_reference(model, prompt, n):
    """Greedy decoding with the plain full forward at every step, written apart from moe_ref.decode."""
    out = prompt
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(out)
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("chunks", [(16,), (1,) * 16, (5, 1, 1, 4, 5)])
def test_cached_logits_equal_full_forward(kind, chunks):
    model = _model(kind)
    idx = torch.randint(0, CONFIG.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
    cache = KVCache(model, 3)
    got, start = [], 0
    for t in chunks:
        got.append(forward_cached(model, idx[:, start:start + t], cache))
        start += t
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_generation_token_for_token(kind):
    model = _model(kind)
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, 12, temperature=0.0)
    assert out.shape == (2, 16)
    assert torch.equal(out, _greedy_reference(model, prompt, 12))


def test_sampling_is_seeded_and_top_k_restricts_support():
    model = _model("dense")
    prompt = torch.zeros(4, 1, dtype=torch.long)
    a = generate(model, prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, -2.0]])
    draws = torch.cat([sample(logits, temperature=2.0, top_k=2, generator=torch.Generator().manual_seed(s))
                       for s in range(200)])
    assert set(draws.flatten().tolist()) == {1, 3}
    assert sample(logits, temperature=0.0).item() == 1
    # temperature 1 draws follow softmax(logits): compare the frequency of id 1 with its probability
    probs = torch.softmax(torch.tensor([5.0, 4.0]), 0)
    g = torch.Generator().manual_seed(0)
    freq = (sample(logits.expand(4000, 5), top_k=2, generator=g) == 1).float().mean().item()
    assert abs(freq - probs[0].item()) < 0.03


def test_generate_restores_training_mode():
    model = _model("dense").train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 2, temperature=0.0)
    assert model.training


def test_bad_input():
    model = _model("dense")
    with pytest.raises(ValueError, match="prompt has 17 tokens.*block_size=16"):
        generate(model, torch.zeros(1, 17, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_tokens.*block_size"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 1, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 1, top_k=0)
    with pytest.raises(ValueError, match="prompt must have shape"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="prompt"):
        generate(model, torch.zeros(1, 2), 1)
    cache = KVCache(model, 2)
    with pytest.raises(ValueError, match=r"idx must have shape \[batch=2"):
        forward_cached(model, torch.zeros(1, 3, dtype=torch.long), cache)
    forward_cached(model, torch.zeros(2, 15, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="15 cached \\+ 2 new positions exceed block_size=16"):
        forward_cached(model, torch.zeros(2, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="eval mode"):
        forward_cached(model.train(), torch.zeros(2, 1, dtype=torch.long), KVCache(model, 2))
    with pytest.raises(TypeError, match="TinyTransformer"):
        KVCache(torch.nn.Linear(2, 2), 1)


# --- the MoE layer's decode fast path ------------------------------------------------------------------------

def _reference_moe(layer, x):
    """Float64 loop over tokens and their experts, written apart from the package's dispatch code."""
    routing = layer.last_routing
    e_ = layer.experts
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(routing.slots):
            if routing.mask is not None and not routing.mask[t, j]:
                continue
            e = int(routing.expert_indices[t, j])
            xt = x[t].double()
            h = torch.nn.functional.silu(xt @ e_.w_in[e].double()) * (xt @ e_.w_up[e].double())
            out[t] += float(routing.combine_weights[t, j]) * (h @ e_.w_out[e].double())
    return out


@pytest.mark.parametrize("T", [1, 3, 16, 64])
@pytest.mark.parametrize("router", ["softmax", "expert_choice"])
def test_fast_path_equals_grouped_path(T, router):
    torch.manual_seed(T)
    layer = MoE(24, 40, 8, k=2, router=router).eval()
    x = torch.randn(T, 24)
    with torch.no_grad():
        fast = layer(x)
        routing = layer.last_routing
        assert layer._decoding(x)
        layer.decode_max_tokens = 0
        assert not layer._decoding(x)
        grouped = layer(x)
        direct = routed_decode(layer.experts, x, routing)
        reference = routed_grouped(layer.experts, x, routing)
    torch.testing.assert_close(fast, grouped, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(direct, reference, rtol=1e-6, atol=1e-6)
    if router == "softmax":
        torch.testing.assert_close(direct.double(), _reference_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_fast_path_with_padding_capacity_and_float64():
    torch.manual_seed(0)
    layer = MoE(16, 24, 4, k=2, capacity=CapacityConfig(capacity_factor=0.5)).double().eval()
    x = torch.randn(12, 16, dtype=torch.float64)
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 7]] = False
    with torch.no_grad():
        fast = layer(x, mask)
        assert layer.num_dropped > 0
        routing, capacity = layer.last_routing, layer.last_capacity
        grouped = routed_grouped(layer.experts, x, routing, capacity)
        direct = routed_decode(layer.experts, x, routing, capacity)
    assert fast.dtype == torch.float64 and direct.dtype == torch.float64
    torch.testing.assert_close(direct, grouped, rtol=1e-12, atol=1e-12)
    assert torch.equal(direct[[2, 7]], torch.zeros(2, 16, dtype=torch.float64))


def test_fast_path_not_taken_with_autograd_or_many_tokens():
    layer = MoE(8, 8, 4, k=2)
    assert not layer._decoding(torch.randn(4, 8))  # grad enabled
    with torch.no_grad():
        assert not layer._decoding(torch.randn(65, 8))
        layer.backend = "loop"
        assert not layer._decoding(torch.randn(4, 8))


# --- touched experts ----------------------------------------------------------------------------------------

def test_expected_touched_hand_cases_and_monte_carlo():
    from moe_ref.decode import expected_touched_experts
    assert expected_touched_experts((8, 2), 1) == pytest.approx(2.0)
    assert expected_touched_experts((8, 2), 2) == pytest.approx(8 * (1 - 9 / 16))  # 3.5
    assert expected_touched_experts((8, 8), 3) == pytest.approx(8.0)
    assert expected_touched_experts([0.25] * 8, 5) == pytest.approx(expected_touched_experts((8, 2), 5))
    assert expected_touched_experts([1.0, 1.0, 0.0, 0.0], 7) == pytest.approx(2.0)
    # uniform random k-subsets, counted by brute force
    g = torch.Generator().manual_seed(0)
    for B in (1, 4, 16):
        choice = torch.rand(20000, B, 8, generator=g).topk(2, dim=-1).indices  # [S, B, 2] uniform subsets
        counts = [len(set(row.flatten().tolist())) for row in choice[:4000]]
        assert sum(counts) / len(counts) == pytest.approx(expected_touched_experts((8, 2), B), abs=0.06)
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        expected_touched_experts((4, 5), 1)
    with pytest.raises(ValueError, match="probs"):
        expected_touched_experts([1.5, 0.5], 2)


def test_touched_experts_on_traces():
    from moe_ref.decode import touched_experts
    # every sequence always picks experts {0, 1} except sequence 3, which picks {2, 3}
    choices = torch.tensor([0, 1]).expand(6, 10, 2).clone()
    choices[3] = torch.tensor([2, 3])
    counts = touched_experts(choices, 2, 8, samples=300, generator=torch.Generator().manual_seed(0))
    assert set(counts.tolist()) == {2, 4}
    assert touched_experts(choices, 6, 8, samples=10).tolist() == [4] * 10  # all sequences: 4 experts
    with pytest.raises(ValueError, match="batch must be <= the 6 recorded sequences"):
        touched_experts(choices, 7, 8)


# --- the decode benchmark's plumbing --------------------------------------------------------------------------

def test_decode_bench_command_writes_results_with_provenance(tmp_path):
    import json

    from moe_ref.book.bench import main

    path = tmp_path / "decode.json"
    main(["decode", "--d-model", "16", "--d-hidden", "8", "--experts", "4", "--k", "2", "--batches", "1", "4",
          "--reps", "1", "--inner", "1", "--candidates", "moe_ref", "moe_ref_grouped", "dense_active",
          "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["experiment"] == "decode_bench" and result["provenance"]["threads"] == 1
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    row = result["rows"][0]
    assert set(row["candidates"]) == {"moe_ref", "moe_ref_grouped", "dense_active"}
    assert 1 <= row["touched"] <= 2 and row["max_abs_diff"] < 1e-6 and row["hf_best"] is None
    from moe_ref.book.decode_bench import bench_decode
    with pytest.raises(ValueError, match="candidates"):
        bench_decode(candidates=("nope",))
    with pytest.raises(ValueError, match="copies"):
        bench_decode(candidates=("moe_ref",), copies=0)
    cold = bench_decode(16, 8, 4, 2, batches=(2,), reps=1, inner=1, warmup=0, candidates=("moe_ref",), copies=3)
    assert cold["config"]["copies"] == 3 and cold["rows"][0]["candidates"]["moe_ref"]["ms"] > 0


def test_decode_timer_runs_every_copy_and_reports_per_layer():
    calls = []
    layers = [lambda x, i=i: calls.append(i) for i in range(3)]
    assert _time_per_layer(layers, calls) >= 0
    assert calls == [0, 1, 2] * 4  # inner=4 passes through the three copies, in turn


def _time_per_layer(layers, calls):
    from moe_ref.book.decode_bench import _time
    return _time(layers, None, 4)

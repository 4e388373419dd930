"""Offloaded experts (moe_ref.offload): bit-identical outputs, LRU bookkeeping against hand-made traces, bad files."""

import json
import shutil

import pytest
import torch

from moe_ref import offload
from moe_ref.book.model import ModelConfig, TinyTransformer
from moe_ref.capacity import CapacityConfig
from moe_ref.moe import MoE
from moe_ref.shared import SharedExpertConfig

torch.set_num_threads(1)


def _layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MoE(16, 24, 8, 2, **kwargs).eval()


@pytest.fixture
def saved(tmp_path):
    layer = _layer()
    offload.save_experts(layer, tmp_path / "layer")
    return layer, tmp_path / "layer"


@pytest.mark.parametrize("kwargs", [{}, {"activation": "gelu"}, {"shared": SharedExpertConfig(1, 8)},
                                    {"capacity": CapacityConfig(capacity_factor=1.0)},
                                    {"router": "sigmoid"}])
@pytest.mark.parametrize("cache_size", [1, 3, 8])
def test_bit_identical_to_naive_and_close_to_grouped(tmp_path, kwargs, cache_size):
    layer = _layer(**kwargs)
    offload.save_experts(layer, tmp_path)
    off = offload.OffloadedMoE(layer, tmp_path, cache_size)
    x = torch.randn(3, 11, 16)
    mask = torch.rand(3, 11) > 0.2
    with torch.no_grad():
        for _ in range(2):  # the second pass runs from a warm cache
            got = off(x, mask)
            layer.impl = "naive"
            assert torch.equal(got, layer(x, mask))
            layer.impl = "grouped"
            torch.testing.assert_close(got, layer(x, mask), rtol=0, atol=1e-6)
    assert len(off.cache.resident) <= cache_size


def test_lru_order_and_evictions_on_a_hand_made_routing(saved):
    layer, directory = saved
    with torch.no_grad():  # the router picks expert a first and expert b second for x = 2 e_a + e_b
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :8] = torch.eye(8)
    off = offload.OffloadedMoE(layer, directory, 3)

    def token(a, b):
        x = torch.zeros(1, 16)
        x[0, a], x[0, b] = 2.0, 1.0
        return x

    # each step touches {a, b}, fetched in increasing order; by hand, with an LRU of 3:
    steps = [((0, 1), [0, 1], 0), ((1, 2), [0, 1, 2], 1), ((3, 0), [2, 0, 3], 2), ((4, 5), [3, 4, 5], 2),
             ((5, 3), [4, 3, 5], 4)]
    with torch.no_grad():
        for (a, b), resident, hits in steps:
            off(token(a, b))
            assert off.last_touched == sorted((a, b))
            assert off.cache.resident == resident  # least recently used first
            assert off.cache.stats.hits == hits  # running total
    s = off.cache.stats
    assert (s.requests, s.misses) == (10, 10 - 4)
    assert (s.loads, s.evictions) == (6, 3)  # experts 0..5 loaded once each into 3 slots
    assert s.bytes_read == 6 * 3 * 16 * 24 * 4


def test_hit_rates_of_the_three_policies_on_a_hand_made_trace():
    trace = [[0, 1], [0, 2], [1, 3], [0, 1], [2, 3], [0, 1]]
    # by hand, cache of 3; requests in increasing order within a step
    # LRU:  0m 1m | 0h 2m | 1h 3m(evict 0) | 0m(evict 2) 1h | 2m(evict 3) 3m(evict 0) | 0m(evict 1) 1m(evict 2)
    lru = offload.simulate(trace, 3, 4, policy="lru")
    assert (lru.hits, lru.requests, lru.evictions) == (3, 12, 6)
    # FIFO: 0m 1m | 0h 2m | 1h 3m(evict 0) | 0m(evict 1) 1m(evict 2) | 2m(evict 3) 3m(evict 0) | 0m(evict 1) 1m(evict 2)
    fifo = offload.simulate(trace, 3, 4, policy="fifo")
    assert (fifo.hits, fifo.requests) == (2, 12)
    # a cache of all experts misses each expert once
    full = offload.simulate(trace, 4, 4, policy="random")
    assert (full.hits, full.misses, full.evictions) == (8, 4, 0)
    # prefetching the next step's experts makes every request a hit
    ahead = offload.simulate(trace, 2, 4, predictions=trace)  # a perfect predictor
    assert ahead.hit_rate == 1.0 and ahead.prefetch_loads == ahead.loads


def test_simulate_matches_the_live_layer(saved):
    layer, directory = saved
    off = offload.OffloadedMoE(layer, directory, 2, policy="random", seed=3)
    trace = []
    with torch.no_grad():
        for _ in range(30):
            off(torch.randn(1, 16))
            trace.append(off.last_touched)
    simulated = vars(offload.simulate(trace, 2, 8, policy="random", seed=3))
    live = vars(off.cache.stats)
    assert {**simulated, "load_seconds": 0, "bytes_read": 0} == {**live, "load_seconds": 0, "bytes_read": 0}
    assert live["bytes_read"] == live["loads"] * 3 * 16 * 24 * 4


def test_uniform_hit_rate_formula():
    assert offload.uniform_hit_rate(3, 8, 1) == 3 / 8
    assert offload.uniform_hit_rate(8, 8, 2) == 1.0
    assert offload.uniform_hit_rate(4, 8, 2) == pytest.approx((4 / 8 + 3 / 7) / 2)
    # against uniform routing through an LRU (C >= k: the cache is a uniformly random C-subset before a token)
    g = torch.Generator().manual_seed(0)
    trace = [torch.randperm(8, generator=g)[:2].tolist() for _ in range(20000)]
    assert offload.simulate(trace, 4, 8).hit_rate == pytest.approx(offload.uniform_hit_rate(4, 8, 2), abs=0.01)


def test_cache_size_bounds(saved):
    layer, directory = saved
    for bad, error in [(0, ValueError), (9, ValueError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="cache_size"):
            offload.OffloadedMoE(layer, directory, bad)
    with pytest.raises(ValueError, match="policy"):
        offload.OffloadedMoE(layer, directory, 2, policy="mru")


def _expert_file(directory):
    return directory / "experts-00000-of-00001.safetensors"


def test_missing_truncated_and_wrong_shape_files(saved, tmp_path):
    layer, directory = saved
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    _expert_file(broken).unlink()
    with pytest.raises(ValueError, match=r"experts-00000-of-00001.safetensors is missing"):
        offload.OffloadedMoE(layer, broken, 2)
    shutil.copy(_expert_file(directory), _expert_file(broken))
    data = _expert_file(broken).read_bytes()
    _expert_file(broken).write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"experts-00000-of-00001.safetensors cannot be read \(truncated"):
        offload.OffloadedMoE(layer, broken, 2)
    other = tmp_path / "other"  # same configuration record, other shapes: a file of another layer
    small = MoE(16, 12, 8, 2)
    offload.save_experts(small, other)
    index = json.loads((other / "model.safetensors.index.json").read_text())
    index["metadata"]["config"]["d_hidden"] = 24
    (other / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"experts-00000-of-00001.safetensors: tensor 'experts.0.w_in' has shape "
                                         r"\(16, 12\), the layer needs \(16, 24\)"):
        offload.OffloadedMoE(layer, other, 2)
    with pytest.raises(ValueError, match="another configuration: d_hidden"):
        offload.OffloadedMoE(small, directory, 2)


def test_a_failed_load_leaves_the_cache_unchanged(saved):
    layer, directory = saved
    off = offload.OffloadedMoE(layer, directory, 2)
    x = torch.randn(4, 16)
    with torch.no_grad():
        off(x[:1])
    before, stats = off.cache.resident, offload.CacheStats(**vars(off.cache.stats))
    data = _expert_file(directory).read_bytes()
    _expert_file(directory).write_bytes(data[:200])  # damaged after the layer was built
    missing = next(e for e in range(8) if e not in before)
    with pytest.raises(ValueError, match="cannot be read"):
        off.cache.get(missing)
    assert off.cache.resident == before
    assert (off.cache.stats.loads, off.cache.stats.evictions) == (stats.loads, stats.evictions)
    _expert_file(directory).write_bytes(data)
    with torch.no_grad():
        off(x[:1])  # works again once the file is whole


def test_inference_only(saved):
    layer, directory = saved
    off = offload.OffloadedMoE(layer, directory, 2)
    assert not any(p.requires_grad for p in off.parameters())
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        off(torch.randn(2, 16, requires_grad=True))
    off(torch.randn(2, 16))  # no input or parameter needs a gradient: fine


def test_offloaded_model_generates_the_same_tokens_and_prefetch_is_scored(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layers=3, n_heads=2, block_size=48)
    model = TinyTransformer(config, lambda i: MoE(16, 24, 8, 2, impl="naive")).eval()
    offload.save_model_experts(model, tmp_path)
    prompt = torch.randint(0, 256, (1, 8))
    reference, _ = offload.generate(model, prompt, 30, temperature=1.0, seed=1)
    greedy = offload.generate(model, prompt, 30)[0]
    with torch.no_grad():  # the key-value cache loop picks what the full forward's logits pick, step by step
        assert torch.equal(model(greedy[:, :-1])[0][0, 7:].argmax(-1), greedy[0, 8:])
    for prefetch in (False, True):
        off = offload.offload_model(model, tmp_path, 2, prefetch=prefetch)
        tokens, _ = offload.generate(off, prompt, 30, temperature=1.0, seed=1)
        assert torch.equal(tokens, reference)
        stats = [layer.cache.stats for layer in offload.offloaded_layers(off)]
        assert stats[0].predicted == 0  # nothing precedes the first layer
        if prefetch:
            assert all(s.touched_after_prediction == s.requests > 0 for s in stats[1:])
            assert all(0 < s.predicted_right <= s.predicted for s in stats[1:])
        else:
            assert all(s.prefetch_loads == 0 for s in stats)
    assert all(isinstance(b.ffn, MoE) for b in model.blocks)  # the original is untouched

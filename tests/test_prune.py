"""Pruning and merging experts: the pruned layer is the original with the deleted logits at -inf, never routes
to a deleted expert, is unchanged when only unused experts go; the merged router's probabilities are sums;
bad input."""

import pytest
import torch

from moe_ref.moe import MoE
from moe_ref.prune import (MergedRouter, expert_similarity, keep_most_used, merge_experts, merge_groups,
                           merge_model, prune_experts, prune_model)
from moe_ref.quantize import calibration_counts
from moe_ref.routers import RouterConfig
from moe_ref.book.model import ModelConfig, TinyTransformer

from conftest import ffn64


def pruned_reference(moe: MoE, keep: list, x: torch.Tensor) -> torch.Tensor:
    """The original layer with the deleted experts' logits at -inf, top-k renormalised, float64 loops."""
    W = moe.router.gate.weight.double()
    ex = moe.experts
    out = torch.zeros(x.shape[0], moe.d_model, dtype=torch.float64)
    for t, token in enumerate(x.double()):
        logits = W @ token
        for e in range(moe.num_experts):
            if e not in keep:
                logits[e] = -float("inf")
        top = torch.topk(logits, moe.k).indices.tolist()
        p = torch.exp(logits[top] - logits[top].max())
        p = p / p.sum()
        for weight, e in zip(p.tolist(), top):
            w_up = None if ex.w_up is None else ex.w_up[e]
            out[t] += weight * ffn64(token[None], ex.w_in[e], w_up, ex.w_out[e], ex.activation)[0]
    return out


@pytest.mark.parametrize("keep", [[0, 2, 5], [1, 3, 4, 6, 7], [6, 2]])
def test_pruned_layer_is_the_masked_original(keep):
    torch.manual_seed(0)
    moe = MoE(12, 20, 8, 2, activation="swiglu").eval()
    pruned = prune_experts(moe, keep)
    assert pruned.num_experts == len(keep) and pruned.kept_ids == sorted(keep)
    x = torch.randn(60, 12)
    torch.testing.assert_close(pruned(x).double(), pruned_reference(moe, keep, x), rtol=1e-5, atol=1e-6)


def test_pruned_model_never_routes_to_a_removed_expert():
    torch.manual_seed(1)
    moe = MoE(16, 16, 8, 2).eval()
    counts = torch.tensor([50, 3, 40, 0, 41, 7, 60, 2])
    pruned = prune_experts(moe, 4, counts)
    assert pruned.kept_ids == [0, 2, 4, 6] == keep_most_used(counts, 4)
    removed = {1, 3, 5, 7}
    for _ in range(10):
        pruned(torch.randn(100, 16) * 5)
        chosen = {pruned.kept_ids[i] for i in pruned.last_routing.expert_indices.unique().tolist()}
        assert chosen and not chosen & removed
        assert int(pruned.last_routing.expert_indices.max()) < 4


@pytest.mark.parametrize("router", ["softmax", RouterConfig("softmax", norm_topk_prob=True),
                                    RouterConfig("sigmoid"), "noisy"])
def test_removing_never_used_experts_changes_nothing(router):
    torch.manual_seed(2)
    k = 1 if isinstance(router, RouterConfig) and router.kind == "softmax" else 2
    moe = MoE(8, 16, 6, k, router=router).eval()
    with torch.no_grad():  # experts 1 and 4 lose to every other expert on positive inputs
        moe.router.gate.weight[[1, 4]] = -10.0
    batches = [torch.randn(50, 8).abs() for _ in range(4)]
    counts = calibration_counts(moe, batches)[0]
    assert int(counts[1]) == int(counts[4]) == 0
    pruned = prune_experts(moe, 4, counts)
    assert pruned.kept_ids == [0, 2, 3, 5]
    for x in batches:
        torch.testing.assert_close(pruned(x), moe(x), rtol=1e-6, atol=1e-7)


def test_prune_and_merge_a_whole_model():
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=32, block_size=8, d_model=16, n_layers=2, n_heads=2, d_hidden=16)
    model = TinyTransformer(config, lambda i: MoE(16, 8, 8, 2)).eval()
    x = torch.randint(0, 32, (4, 8))
    counts = calibration_counts(model, [x])
    assert counts.shape == (2, 8)
    for shrunk in (prune_model(model, 3, counts), merge_model(model, 3, counts)):
        assert [f.num_experts for f in shrunk.ffns] == [3, 3]
        logits, _ = shrunk(x)
        assert logits.shape == (4, 8, 32) and bool(torch.isfinite(logits).all())
    assert [f.num_experts for f in model.ffns] == [8, 8]  # the original is untouched


def test_merged_router_probabilities_are_sums():
    torch.manual_seed(4)
    moe = MoE(10, 12, 6, 2).eval()
    groups = [[0, 3], [1], [2, 4, 5]]
    router = MergedRouter(moe.router, groups)
    x = torch.randn(30, 10)
    p = torch.softmax(x.double() @ moe.router.gate.weight.double().t(), dim=-1)
    expected = torch.stack([p[:, g].sum(-1) for g in groups], dim=-1)
    torch.testing.assert_close(torch.softmax(router.logits(x).double(), -1), expected, rtol=1e-6, atol=1e-7)


def test_merged_weights_are_usage_weighted_averages():
    torch.manual_seed(5)
    moe = MoE(6, 4, 4, 2).eval()
    counts = torch.tensor([3, 1, 0, 5])
    merged = merge_experts(moe, 2, counts, groups=[[0, 1], [2, 3]])
    w = moe.experts.w_in.detach()
    torch.testing.assert_close(merged.experts.w_in[0], 0.75 * w[0] + 0.25 * w[1])
    torch.testing.assert_close(merged.experts.w_in[1], w[3], rtol=1e-6, atol=1e-7)
    assert merged.merged_groups == [[0, 1], [2, 3]]


def test_similar_experts_are_grouped_together():
    torch.manual_seed(6)
    moe = MoE(8, 8, 6, 2)
    with torch.no_grad():  # 0~4 and 1~5 are near copies; 2, 3 unrelated
        for a, b in [(0, 4), (1, 5)]:
            for name in ("w_in", "w_up", "w_out"):
                w = getattr(moe.experts, name)
                w[b] = w[a] + 1e-3 * torch.randn_like(w[a])
    groups = merge_groups(expert_similarity(moe.experts), 4)
    assert [0, 4] in groups and [1, 5] in groups and [2] in groups and [3] in groups


@pytest.mark.parametrize("keep,match", [(0, "keep"), (1, "keep must be >= k"), (9, "keep"),
                                        ([0], "at least k"), ([], "keep"), ([0, 0, 1], "distinct"),
                                        ([0, 8], "distinct")])
def test_bad_keep(keep, match):
    moe = MoE(8, 8, 8, 2)
    with pytest.raises(ValueError, match=match):
        prune_experts(moe, keep, torch.ones(8))


def test_other_bad_input():
    moe = MoE(8, 8, 8, 2)
    with pytest.raises(ValueError, match="counts"):
        prune_experts(moe, 4)
    with pytest.raises(ValueError, match="counts"):
        prune_experts(moe, 4, torch.ones(7))
    grouped = MoE(8, 8, 8, 2, router=RouterConfig("sigmoid", n_group=4, topk_group=2))
    with pytest.raises(ValueError, match="groups"):
        prune_experts(grouped, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="num_experts"):
        merge_experts(moe, 1)
    with pytest.raises(ValueError, match="groups"):
        merge_experts(moe, 2, groups=[[0, 1, 2], [3, 4]])
    with pytest.raises(ValueError, match="softmax"):
        merge_experts(MoE(8, 8, 8, 2, router="sigmoid"), 4)
    with pytest.raises(TypeError, match="MoE"):
        prune_experts(torch.nn.Linear(2, 2), 1)

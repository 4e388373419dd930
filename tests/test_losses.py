import math

import pytest
import torch

from moe_ref.losses import AuxLossConfig, attach_aux_loss, load_balancing_loss, router_z_loss, sequence_balance_loss
from moe_ref.routing import softmax_topk


def balanced(T, E, k):
    """Uniform probabilities and token t -> experts t, t+1, ..., t+k-1 (mod E): every expert gets T*k/E."""
    probs = torch.full((T, E), 1.0 / E)
    indices = (torch.arange(T)[:, None] + torch.arange(k)[None, :]) % E
    return probs, indices


@pytest.mark.parametrize("k", [1, 2, 4])
def test_balance_loss_is_one_at_perfect_balance(k):
    probs, indices = balanced(16, 8, k)
    assert load_balancing_loss(probs, indices).item() == pytest.approx(1.0, abs=1e-6)
    # any probabilities with uniform load give 1 as well (sum_i P_i = 1)
    probs = torch.randn(16, 8).softmax(-1)
    assert load_balancing_loss(probs, indices).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_larger_when_unbalanced_by_hand():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(6, 4)
    indices = torch.zeros(6, 1, dtype=torch.int64)  # every token on expert 0: f = (1, 0, 0, 0)
    assert load_balancing_loss(probs, indices).item() == pytest.approx(4 * 0.7)
    # k = 2, every token on experts 0 and 1: f = (1/2, 1/2, 0, 0), P = (0.7, 0.1, ...): 4 * 0.4 = 1.6
    indices = torch.tensor([[0, 1]]).expand(6, 2)
    assert load_balancing_loss(probs, indices).item() == pytest.approx(1.6)


def test_balance_loss_gradient_flows_through_probabilities_only():
    logits = torch.randn(10, 4, requires_grad=True)
    r = softmax_topk(logits, 2, norm_topk_prob=True)
    load_balancing_loss(r.router_probs, r.expert_indices).backward()
    assert logits.grad.abs().sum() > 0
    # f is a constant (counts): the gradient is that of E * sum_i f_i * P_i with f held fixed
    logits2 = logits.detach().clone().requires_grad_()
    f = torch.bincount(r.expert_indices.reshape(-1), minlength=4).float() / (10 * 2)
    (4 * (f * logits2.softmax(-1).mean(0)).sum()).backward()
    torch.testing.assert_close(logits.grad, logits2.grad)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_matches_transformers_times_k(k, masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(k)
    B, S, E = 3, 7, 6
    logits = torch.randn(B * S, E)
    mask = (torch.rand(B, S) > 0.3).long() if masked else None
    r = softmax_topk(logits, k, norm_topk_prob=True)
    ours = load_balancing_loss(r.router_probs, r.expert_indices, attention_mask=mask)
    theirs = load_balancing_loss_func((logits,), num_experts=E, top_k=k, attention_mask=mask)
    torch.testing.assert_close(k * ours, theirs)


def test_balance_loss_mask_drops_padding():
    probs = torch.randn(8, 4).softmax(-1)
    indices = torch.randint(4, (8, 2))
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1])
    keep = mask.bool()
    torch.testing.assert_close(load_balancing_loss(probs, indices, attention_mask=mask),
                               load_balancing_loss(probs[keep], indices[keep]))
    torch.testing.assert_close(router_z_loss(probs.log(), attention_mask=mask), router_z_loss(probs.log()[keep]))


def test_z_loss_by_hand():
    # logsumexp(0, 0) = log 2; logsumexp(log 3, 0) = log 4 = 2 log 2: mean of squares = 2.5 (log 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)
    # shifting all logits of a token changes the z-loss but not the softmax
    assert router_z_loss(logits + 5).item() > router_z_loss(logits).item()


def test_sequence_balance_loss_by_hand():
    # E = 2, k = 1, S = 2. Sequence 0 is balanced: f = (1, 1), P = (0.5, 0.5) -> 1.
    # Sequence 1 sends both tokens to expert 0: f = (2, 0); scores (0.6, 0.2) and (0.9, 0.3) normalise to
    # (0.75, 0.25) both: P = (0.75, 0.25) -> 1.5. Mean over sequences: 1.25.
    scores = torch.tensor([[[0.8, 0.2], [0.2, 0.8]], [[0.6, 0.2], [0.9, 0.3]]])
    indices = torch.tensor([[[0], [1]], [[0], [0]]])
    assert sequence_balance_loss(scores, indices).item() == pytest.approx(1.25)
    # the batch as a whole is less unbalanced (expert 0 has 3 of 4 tokens) and the batch loss says so
    assert load_balancing_loss((scores / scores.sum(-1, keepdim=True)).reshape(4, 2), indices.reshape(4, 1)) < 1.25


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sequence_balance_loss_is_one_at_balance(k):
    probs, indices = balanced(16, 8, k)
    assert sequence_balance_loss(probs.reshape(2, 8, 8), indices.reshape(2, 8, k)).item() == pytest.approx(1.0)


def test_sequence_balance_loss_mask_drops_padding():
    torch.manual_seed(0)
    scores = torch.rand(2, 5, 4)
    indices = scores.topk(2, dim=-1).indices
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    # padding leaves sequence 0 with its real tokens 0, 1, 3 only: the mean of the two sequences' losses
    seq0 = sequence_balance_loss(scores[:1, [0, 1, 3]], indices[:1, [0, 1, 3]])
    seq1 = sequence_balance_loss(scores[1:], indices[1:])
    torch.testing.assert_close(sequence_balance_loss(scores, indices, attention_mask=mask), (seq0 + seq1) / 2)
    # a sequence with no real token is left out of the mean
    empty = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(sequence_balance_loss(scores, indices, attention_mask=empty), seq1)


def test_attach_aux_loss_identity_forward_gradient_backward():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    out = w * 3.0
    aux = (w ** 2).sum()
    attached = attach_aux_loss(out, aux, scale=0.5)
    assert torch.equal(attached, out)
    attached.sum().backward()
    # d(sum(3 w))/dw = 3, plus the aux loss's gradient 2 w times the scale 0.5
    torch.testing.assert_close(w.grad, torch.tensor([3.0 + 1.0, 3.0 + 2.0]))
    # an aux loss without a graph attaches nothing
    plain = torch.ones(2)
    assert attach_aux_loss(plain, torch.tensor(1.0)) is plain


def test_aux_loss_config():
    config = AuxLossConfig(balance_coef=0.1, z_coef=0.01)
    assert (config.coef("balance"), config.coef("seq_balance"), config.coef("z")) == (0.1, 0.0, 0.01)
    assert AuxLossConfig().coef("balance") == 0.01
    with pytest.raises(ValueError, match="z_coef must be >= 0"):
        AuxLossConfig(z_coef=-1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        AuxLossConfig(scale=float("inf"))
    with pytest.raises(TypeError, match="compute_all must be a bool"):
        AuxLossConfig(compute_all=1)


def test_losses_gradcheck_float64():
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(4, (6, 2))
    assert torch.autograd.gradcheck(lambda l: load_balancing_loss(l.softmax(-1), indices), (logits,))
    assert torch.autograd.gradcheck(router_z_loss, (logits,))
    assert torch.autograd.gradcheck(
        lambda l: sequence_balance_loss(l.sigmoid().reshape(2, 3, 4), indices.reshape(2, 3, 2)), (logits,))


def test_loss_bad_inputs():
    probs, indices = balanced(4, 4, 2)
    with pytest.raises(TypeError, match="expert_indices must be an int64"):
        load_balancing_loss(probs, indices.float())
    with pytest.raises(ValueError, match="must agree on all but the last"):
        load_balancing_loss(probs, indices[:3])
    with pytest.raises(ValueError, match="attention_mask must have one entry per token"):
        load_balancing_loss(probs, indices, attention_mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"router_scores must be \[batch, seq, E\]"):
        sequence_balance_loss(probs, indices)
    with pytest.raises(TypeError, match="router_logits must be a floating-point"):
        router_z_loss(indices)

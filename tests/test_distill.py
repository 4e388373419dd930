"""Distillation (Switch section 5): the loss against hand-computed cases, the student's initialisation from the
teacher's non-expert weights, the wrapper the training loop trains, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_ref.distill import (DistillationModel, distillation_loss, expert_free_state, kept_fraction,
                             student_from_teacher)
from moe_ref.moe import MoE
from moe_ref.book.data import build_corpus
from moe_ref.book.model import ModelConfig, TinyTransformer
from moe_ref.book.train import TrainConfig, train

LN2 = math.log(2)


def test_hand_computed_case():
    # student probabilities [1/4, 1/2, 1/4], label 1: hard = ln 2
    # teacher probabilities [1/2, 1/4, 1/4]: soft = -(1/2 ln 1/4 + 1/4 ln 1/2 + 1/4 ln 1/4) = 1.75 ln 2
    # loss = 0.75 ln 2 + 0.25 * 1.75 ln 2 = 1.1875 ln 2
    student = torch.tensor([[0.0, LN2, 0.0]])
    teacher = torch.tensor([[LN2, 0.0, 0.0]])
    targets = torch.tensor([1])
    loss = distillation_loss(student, teacher, targets)
    assert abs(loss.item() - 1.1875 * LN2) < 1e-6
    assert abs(distillation_loss(student, teacher, targets, soft_weight=1.0).item() - 1.75 * LN2) < 1e-6


def test_temperature_hand_case():
    # tau = 2 halves the logits: student [0, ln 4, 0] -> [1/4, 1/2, 1/4] in the soft term; hard term at tau 1:
    # softmax [1/6, 4/6, 1/6], label 0: -ln(1/6). Teacher [ln 4, 0, 0] / 2 -> [1/2, 1/4, 1/4]: soft 1.75 ln 2
    student = torch.tensor([[0.0, 2 * LN2, 0.0]])
    teacher = torch.tensor([[2 * LN2, 0.0, 0.0]])
    loss = distillation_loss(student, teacher, torch.tensor([0]), soft_weight=0.5, temperature=2.0)
    assert abs(loss.item() - (0.5 * math.log(6) + 0.5 * 1.75 * LN2)) < 1e-6


def test_against_a_float64_loop():
    torch.manual_seed(0)
    z, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7) * 3
    y = torch.randint(0, 7, (2, 5))
    total = 0.0
    for zi, ti, yi in zip(z.reshape(-1, 7).double(), t.reshape(-1, 7).double(), y.reshape(-1)):
        q = torch.exp(zi) / torch.exp(zi).sum()
        p = torch.exp(ti) / torch.exp(ti).sum()
        total += 0.75 * -math.log(q[yi]) + 0.25 * -(p * q.log()).sum().item()
    assert abs(distillation_loss(z, t, y).item() - total / 10) < 1e-5
    assert torch.allclose(distillation_loss(z, t, y, soft_weight=0.0), F.cross_entropy(z.reshape(-1, 7),
                                                                                        y.reshape(-1)))


def test_the_teacher_gets_no_gradient():
    z, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    distillation_loss(z, t, torch.zeros(4, dtype=torch.long)).backward()
    assert z.grad is not None and t.grad is None


def tiny(ffn=None):
    config = ModelConfig(vocab_size=256, block_size=16, d_model=16, n_layers=2, n_heads=2, d_hidden=32,
                         activation="relu")
    return TinyTransformer(config, ffn)


def test_student_takes_the_teachers_non_expert_weights():
    torch.manual_seed(1)
    teacher = tiny(lambda i: MoE(16, 16, 4, 2, activation="relu"))
    student = student_from_teacher(teacher, tiny())
    assert torch.equal(student.tok_emb.weight, teacher.tok_emb.weight)
    assert torch.equal(student.blocks[1].attn.qkv.weight, teacher.blocks[1].attn.qkv.weight)
    state = expert_free_state(teacher)
    assert state and not any(".ffn." in key for key in state)
    own = student.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="non-expert"):
        student_from_teacher(teacher, TinyTransformer(ModelConfig(vocab_size=256, block_size=16, d_model=8,
                                                                  n_layers=2, n_heads=2, d_hidden=32)))


def test_wrapper_trains_the_student_only():
    torch.manual_seed(2)
    teacher = tiny(lambda i: MoE(16, 16, 4, 2, activation="relu"))
    student = student_from_teacher(teacher, tiny())
    model = DistillationModel(student, teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randint(0, 256, (3, 16))
    y = torch.randint(0, 256, (3, 16))
    model.train()
    assert not teacher.training
    logits, loss = model(x, y)
    expected = distillation_loss(student(x)[0], teacher(x)[0], y)
    torch.testing.assert_close(loss, expected)
    model.eval()
    torch.testing.assert_close(model(x, y)[1], student(x, y)[1])  # evaluation: the student's own loss
    corpus = build_corpus(bytes_per_domain=20_000)
    train(model, corpus, TrainConfig(steps=3, batch_size=4, eval_every=3, eval_batches=1), progress=False)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(student.blocks[0].ffn.w_in.weight, tiny().blocks[0].ffn.w_in.weight)
    assert model.num_params() == student.num_params()


def test_kept_fraction():
    assert kept_fraction(3.0, 2.0, 2.75) == pytest.approx(0.25)
    assert kept_fraction(3.0, 2.0, 3.5) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="no gain"):
        kept_fraction(2.0, 2.0, 2.0)


@pytest.mark.parametrize("kwargs,match", [({"soft_weight": 1.5}, "soft_weight"), ({"soft_weight": -0.1},
                                          "soft_weight"), ({"temperature": 0.0}, "temperature")])
def test_bad_input(kwargs, match):
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        distillation_loss(z, z, torch.zeros(2, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(z, torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        distillation_loss(z, z, torch.zeros(2))

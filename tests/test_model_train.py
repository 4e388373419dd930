import pytest
import torch
from torch import nn

from moe_ref import FFN, MoE, attention_flops
from moe_ref.book import ModelConfig, TinyTransformer, TrainConfig, build_corpus, train
from moe_ref.book.train import aux_loss

TINY = ModelConfig(block_size=32, d_model=32, n_layers=2, n_heads=2, d_hidden=64)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(bytes_per_domain=40_000)


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    model = TinyTransformer(TINY)
    x = torch.randint(256, (3, 20))
    logits, loss = model(x)
    assert logits.shape == (3, 20, 256) and loss is None
    # changing a later token must not change earlier logits
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    torch.testing.assert_close(model(x2)[0][:, :10], logits[:, :10])
    assert not torch.allclose(model(x2)[0][:, 10:], logits[:, 10:])


def test_param_count_hand_computed():
    c = TINY
    per_block = 2 * 2 * c.d_model + 4 * c.d_model**2 + 2 * c.d_model * c.d_hidden  # 2 LayerNorms, attn, relu FFN
    expected = c.vocab_size * c.d_model + c.block_size * c.d_model + c.n_layers * per_block + 2 * c.d_model
    assert TinyTransformer(TINY).num_params() == expected  # the head is tied to the token embedding


def test_flops_per_token():
    c = TINY
    per_layer = 8 * 32 * 32 + 4 * 32 * 32 + 2 * 2 * 32 * 64
    assert TinyTransformer(TINY).flops_per_token() == 2 * 32 * 256 + 2 * per_layer
    assert attention_flops(32, 32) == per_layer - 2 * 2 * 32 * 64


def test_ffn_factory_is_used():
    model = TinyTransformer(TINY, ffn_factory=lambda i: FFN(32, 16 * (i + 1), "swiglu"))
    assert [f.d_hidden for f in model.ffns] == [16, 32]


def test_bad_inputs():
    model = TinyTransformer(TINY)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(TypeError, match="steps"):
        TrainConfig(steps=1.5)


def test_training_reduces_loss_and_is_reproducible(corpus):
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup=5, eval_every=20, eval_batches=2)
    torch.manual_seed(0)
    h1 = train(TinyTransformer(TINY), corpus, cfg, progress=False)
    torch.manual_seed(0)
    h2 = train(TinyTransformer(TINY), corpus, cfg, progress=False)
    assert h1.loss == h2.loss and h1.val_loss == h2.val_loss
    first, last = sum(h1.loss[:5]) / 5, sum(h1.loss[-5:]) / 5
    assert first > 5.0  # ln(256) = 5.55 at initialisation
    assert last < first - 1.5
    assert h1.val_step == [19, 39] and h1.val_loss[1] < h1.val_loss[0]
    assert set(h1.val_loss_by_domain) == {"english", "python", "arithmetic"}
    assert h1.aux_loss == [0.0] * 40


def test_residual_init_scales_ffn_and_expert_output_matrices():
    torch.manual_seed(0)
    config = ModelConfig(block_size=16, d_model=64, n_layers=8, n_heads=2, d_hidden=128)
    model = TinyTransformer(config, ffn_factory=lambda i: MoE(64, 128, 8, 2) if i % 2 else FFN(64, 128))
    small = 0.02 / (2 * config.n_layers) ** 0.5
    for i, ffn in enumerate(model.ffns):
        w_out = ffn.experts.w_out if i % 2 else ffn.w_out.weight
        assert w_out.std().item() == pytest.approx(small, rel=0.1), i
        if not i % 2:  # the other nn.Linear weights get GPT-2's 0.02
            assert ffn.w_in.weight.std().item() == pytest.approx(0.02, rel=0.1), i
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(small, rel=0.1)


class _FFNWithHooks(nn.Module):
    """An FFN-slot module that leaves an auxiliary loss and counts optimizer steps.

    Its ``aux_loss`` carries a graph to ``aux_weight``: the loop must record it but never add it to the loss
    (an MoE layer attaches its auxiliary gradient to its output itself), so ``aux_weight`` never gets a gradient.
    """

    def __init__(self):
        super().__init__()
        self.ffn = FFN(32, 64)
        self.aux_weight = nn.Parameter(torch.ones(()))
        self.aux_loss, self.steps_seen = None, 0

    def forward(self, x):
        y = self.ffn(x)
        self.aux_loss = self.aux_weight * 0.5 * y.pow(2).mean()
        return y

    def after_optimizer_step(self):
        self.steps_seen += 1

    def flops_per_token(self):
        return self.ffn.flops_per_token()


def test_aux_loss_and_step_hooks(corpus):
    torch.manual_seed(0)
    model = TinyTransformer(TINY, ffn_factory=lambda i: _FFNWithHooks())
    seen = []
    h = train(model, corpus, TrainConfig(steps=3, batch_size=4, eval_every=3, eval_batches=1), progress=False,
              callback=lambda step, m, x, labels: seen.append((step, x.shape, labels.shape)))
    assert [f.steps_seen for f in model.ffns] == [3, 3]
    assert all(a > 0 for a in h.aux_loss)
    assert all(f.aux_weight.grad is None for f in model.ffns)  # recorded, never added to the loss
    assert all(f.ffn.w_in.weight.grad is not None for f in model.ffns)
    assert seen == [(s, (4, 32), (4,)) for s in range(3)]
    model(torch.zeros(1, 4, dtype=torch.long))
    expected = sum(f.aux_loss for f in model.ffns)
    torch.testing.assert_close(aux_loss(model), expected)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(99) == pytest.approx(0.1, abs=1e-3)

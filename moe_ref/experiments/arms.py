"""The models an experiment compares ("arms") and one seeded training run of one of them.

Every arm is chapter 1's tiny transformer with a different FFN slot. The sizes are chosen so that the arms of
one experiment have the same *active* FFN width (the hidden units a token passes through), hence the same
FLOPs per token, except where an arm says otherwise (the dense model of equal total parameters, top-2 of
full-width experts).

A run records its validation curve, the training time up to each evaluation, and, for MoE arms, each
token's first-choice expert on a fixed *probe* set of validation sequences: after training (for the
specialisation measures of :mod:`moe_ref.specialization`) and at every evaluation (how soon routing
settles).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import _checks
from ..ffn import FFN
from ..losses import AuxLossConfig
from ..moe import MoE
from ..routers import RouterConfig
from ..shared import SharedExpertConfig
from ..book.data import Corpus
from ..book.model import ModelConfig, TinyTransformer
from ..book.train import TrainConfig, train

MODEL = ModelConfig(vocab_size=256, block_size=64, d_model=64, n_layers=2, n_heads=4, d_hidden=256,
                    activation="relu")
"""The model of every experiment, chapter 1's tiny transformer at a size where many seeded runs fit a CPU."""

TRAIN = dict(steps=1500, batch_size=32, lr=6e-3, warmup=50, eval_every=100, eval_batches=4)
"""The training budget of every run, before ``scale``: 1500 steps of 32 x 64 bytes (3.1M tokens)."""

BALANCE_COEF = 0.01
"""Weight of the auxiliary balance loss in every MoE arm (Switch's value, chapter 3)."""

PROBE = dict(sequences_per_domain=32, seed=4321)
"""The probe set, this many validation sequences of each domain, drawn with this seed."""


@dataclass(frozen=True)
class Arm:
    """One model of a comparison.

    Attributes:
        label: the name plots and tables use.
        d_hidden: the dense FFN's hidden width, or each routed expert's.
        num_experts: routed experts ``E``; 0 for a dense FFN.
        k: experts per token (the average, for expert choice).
        router: ``"softmax"`` (token choice) or ``"expert_choice"``.
        shared: always-on shared experts of width ``d_hidden`` (DeepSeekMoE).
    """

    label: str
    d_hidden: int
    num_experts: int = 0
    k: int = 1
    router: str = "softmax"
    shared: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def ffn(self, d_model: int, activation: str) -> nn.Module:
        """A fresh FFN-slot module for a model of width ``d_model``."""
        if not self.is_moe:
            return FFN(d_model, self.d_hidden, activation)
        shared = SharedExpertConfig(self.shared, self.d_hidden) if self.shared else None
        return MoE(d_model, self.d_hidden, self.num_experts, self.k, activation=activation,
                   router=RouterConfig(self.router), shared=shared, init_std=0.02,
                   aux_losses=AuxLossConfig(balance_coef=BALANCE_COEF))

    def model(self, seed: int, model_config: ModelConfig = MODEL) -> TinyTransformer:
        """The arm's model, initialised from ``seed``."""
        torch.manual_seed(seed)
        return self._build(model_config)

    def flops_per_token(self, model_config: ModelConfig = MODEL) -> int:
        """The model's forward FLOPs per token, counted on the meta device (no weights, no random numbers)."""
        with torch.device("meta"):
            return self._build(model_config).flops_per_token()

    def _build(self, model_config: ModelConfig) -> TinyTransformer:
        return TinyTransformer(model_config, lambda layer: self.ffn(model_config.d_model,
                                                                    model_config.activation))

    def spec(self) -> dict:
        return asdict(self)


def probe_batch(corpus: Corpus, sequences_per_domain: int = PROBE["sequences_per_domain"],
                block_size: int = MODEL.block_size, seed: int = PROBE["seed"]):
    """The fixed probe set: ``(tokens [S, T] int64, domains [S] int64)``, ``S = 3 * sequences_per_domain``,
    drawn from the validation split, domain by domain."""
    generator = torch.Generator().manual_seed(seed)
    tokens, domains = [], []
    for label, domain in enumerate(corpus.domains):
        x, _, _ = corpus.get_batch("val", sequences_per_domain, block_size, generator, domain=domain)
        tokens.append(x)
        domains.append(torch.full((sequences_per_domain,), label, dtype=torch.long))
    return torch.cat(tokens), torch.cat(domains)


@torch.no_grad()
def first_choices(model: TinyTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Each token's first-choice expert (the router's highest score) in every MoE layer: ``[layers, S, T]``
    int64. ``tokens``: ``[S, T]`` int64."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model(tokens.to(device))
    choices = [f.last_routing.router_scores.argmax(-1).view(tokens.shape).cpu()
               for f in model.ffns if isinstance(f, MoE)]
    model.train(was_training)
    return torch.stack(choices)


DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def encode_choices(choices: torch.Tensor) -> list[str]:
    """``[S, T]`` expert ids below 36 as ``S`` strings of base-36 digits (compact in a JSON file)."""
    if choices.numel() and int(choices.max()) >= len(DIGITS):
        raise ValueError(f"choices must be < {len(DIGITS)} to encode, got {int(choices.max())}")
    return ["".join(DIGITS[i] for i in row) for row in choices.tolist()]


def decode_choices(rows: list[str]) -> torch.Tensor:
    """Inverse of :func:`encode_choices`: ``[S, T]`` int64."""
    return torch.tensor([[int(c, 36) for c in row] for row in rows], dtype=torch.long)


def encode_tokens(tokens: torch.Tensor) -> list[str]:
    """``[S, T]`` bytes as ``S`` hex strings."""
    return [bytes(row).hex() for row in tokens.tolist()]


def decode_tokens(rows: list[str]) -> torch.Tensor:
    """Inverse of :func:`encode_tokens`: ``[S, T]`` int64."""
    return torch.tensor([list(bytes.fromhex(row)) for row in rows], dtype=torch.long)


def run_arm(key: str, arm: Arm, seed: int, corpus: Corpus, train_settings: dict, *,
            probe: torch.Tensor | None = None, model_config: ModelConfig = MODEL, device: str = "cpu",
            model: TinyTransformer | None = None, data_seed: int | None = None,
            on_step=None) -> tuple[dict, TinyTransformer]:
    """Train ``arm`` from ``seed`` (or continue ``model``) and return ``(record, model)``.

    Args:
        key: the arm's name in the results (``record["arm"]``).
        train_settings: keyword arguments of :class:`~moe_ref.book.train.TrainConfig` (without the seed).
        probe: ``[S, T]`` probe tokens; MoE arms then record first choices (see the module docstring).
        model: train this model instead of a fresh one (continued training).
        data_seed: seed of the batches (default ``seed``).
        on_step: called with no argument after every optimizer step (a progress bar).

    The record holds ``arm``, ``seed``, the curves (``val_step``, ``val_loss``, ``val_loss_by_domain``,
    ``train_seconds``), ``seconds``, ``params`` (total), ``flops_per_token`` (forward, active), and for MoE
    arms with a probe ``routing`` (``[layers][S]`` strings) and ``agreement`` (``[evaluations][layers]``:
    the share of probe tokens whose first choice is already the final one).
    """
    _checks.positive_int("seed", seed, minimum=0)
    model = arm.model(seed, model_config) if model is None else model
    model.to(device)
    config = TrainConfig(**train_settings, seed=seed if data_seed is None else data_seed)
    checkpoints = []
    track = probe is not None and arm.is_moe

    def callback(step, model, x, labels):
        if on_step is not None:
            on_step()
        if track and config.evaluates_after(step):
            checkpoints.append(first_choices(model, probe))

    history = train(model, corpus, config, progress=False, callback=callback)
    record = {
        "arm": key, "seed": seed,
        "val_step": history.val_step, "val_loss": history.val_loss,
        "val_loss_by_domain": history.val_loss_by_domain,
        "train_seconds": [round(s, 3) for s in history.val_seconds],
        "seconds": round(history.seconds, 2),
        "params": model.num_params(), "flops_per_token": model.flops_per_token(),
        "routing": None, "agreement": None,
    }
    if track:
        final = checkpoints[-1]
        record["routing"] = [encode_choices(layer) for layer in final]
        record["agreement"] = [[round((c[layer] == final[layer]).float().mean().item(), 4)
                                for layer in range(final.shape[0])] for c in checkpoints]
    return record, model

"""A small, seeded training loop for :class:`~moe_ref.book.model.TinyTransformer` on the :class:`~moe_ref.book.data.Corpus`.

Sparse layers need no special loop. An MoE layer attaches the gradient of its auxiliary losses to its own
output (:func:`~moe_ref.losses.attach_aux_loss`), so ``loss.backward()`` on the language-model loss trains
them too. The loop knows two optional attributes of any module:

* ``module.aux_loss``: the detached value of the weighted auxiliary losses of its last forward, recorded in
  the :class:`History` (never added to the loss: its gradient is already on its way);
* ``module.after_optimizer_step()``: called after every optimizer step (e.g. the auxiliary-loss-free
  bias update of DeepSeek-V3).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import _checks
from .data import Corpus
from .page import Progress


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per step.
        block_size: tokens per sequence (default: the model's ``block_size``).
        lr: peak learning rate of AdamW; linear warm-up for ``warmup`` steps, then cosine decay to
            ``min_lr_ratio * lr``.
        weight_decay: AdamW weight decay on matrices (not on norms, biases or 1-d parameters).
        grad_clip: clip the global gradient norm to this (``None`` for no clipping).
        eval_every: evaluate on the validation split every this many steps (and after the last step).
        eval_batches: batches per evaluation, per domain.
        seed: seeds the batches and the global torch RNG (dropout, router noise).
    """

    steps: int = 200
    batch_size: int = 32
    block_size: int | None = None
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("warmup", self.warmup, minimum=0)
        if self.block_size is not None:
            _checks.positive_int("block_size", self.block_size)
        _checks.finite_float("lr", self.lr, minimum=0.0, strict=True)
        _checks.finite_float("weight_decay", self.weight_decay, minimum=0.0)
        _checks.finite_float("min_lr_ratio", self.min_lr_ratio, minimum=0.0)
        if self.grad_clip is not None:
            _checks.finite_float("grad_clip", self.grad_clip, minimum=0.0, strict=True)

    def evaluates_after(self, step: int) -> bool:
        """Whether :func:`train` evaluates after optimizer step ``step`` (0-based): every ``eval_every``
        steps and after the last."""
        return (step + 1) % self.eval_every == 0 or step + 1 == self.steps

    def lr_at(self, step: int) -> float:
        """Learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class History:
    """What :func:`train` measured. Lists are aligned with ``step`` (every step) or ``val_step``.

    Attributes:
        step: step indices ``0 .. steps-1``.
        loss: language-model loss of each training batch (without auxiliary losses).
        aux_loss: sum of the FFN modules' weighted auxiliary losses at each step (0.0 for dense models).
        lr: learning rate used at each step.
        val_step: steps after which the validation split was evaluated.
        val_loss: mean validation loss over domains at each ``val_step``.
        val_loss_by_domain: ``{domain: [loss at each val_step]}``.
        val_seconds: training time up to each ``val_step``: wall-clock seconds spent in the steps
            themselves, without the evaluations and the callback (for loss-against-time curves).
        seconds: wall-clock time of the whole run.
    """

    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    val_step: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_loss_by_domain: dict = field(default_factory=dict)
    val_seconds: list = field(default_factory=list)
    seconds: float = 0.0


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the (detached) ``aux_loss`` values that modules of ``model`` set in the last forward, or ``None``."""
    losses = [m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
    return torch.stack([l.reshape(()) for l in losses]).sum() if losses else None


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Weight decay on matrices only; norms, biases and other 1-d parameters are left alone."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, *, batches: int = 4, batch_size: int = 32,
             block_size: int | None = None, split: str = "val", seed: int = 1234) -> dict:
    """Mean loss per domain on ``batches`` fixed batches of ``split``: ``{domain: loss}``.

    The batches depend only on ``seed``, so successive evaluations during training see the same data.
    """
    block_size = block_size or model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for domain in corpus.domains:
        losses = []
        for _ in range(batches):
            x, y, _ = corpus.get_batch(split, batch_size, block_size, generator, domain=domain)
            losses.append(model(x.to(device), y.to(device))[1].item())
        result[domain] = sum(losses) / len(losses)
    model.train(was_training)
    return result


def train(model: nn.Module, corpus: Corpus, config: TrainConfig | None = None, *, device=None,
          progress: bool = True, callback: Callable | None = None) -> History:
    """Train ``model`` in place with AdamW and return the :class:`History`.

    Args:
        model: a :class:`~moe_ref.book.model.TinyTransformer` (anything with ``config.block_size`` whose
            ``forward(x, y)`` returns ``(logits, loss)``).
        corpus: the data.
        config: hyper-parameters (defaults to ``TrainConfig()``).
        device: where to train (default: where the model's parameters are).
        progress: show a progress line (:class:`~moe_ref.book.page.Progress`): live in Jupyter, one
            final line in the saved notebook.
        callback: ``callback(step, model, x, labels)`` after each optimizer step, for measurements such
            as expert load; ``x`` is the batch ``[B, T]`` and ``labels`` its domains ``[B]``.

    Two calls with the same model initialisation, corpus and config give the same history on the CPU.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    block_size = config.block_size or model.config.block_size
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    history = History(val_loss_by_domain={d: [] for d in corpus.domains})
    hooks = [m for m in model.modules() if callable(getattr(m, "after_optimizer_step", None))]
    t0 = time.perf_counter()
    step_seconds = 0.0
    model.train()
    bar = Progress(config.steps, desc="train", enabled=progress)
    for step in range(config.steps):
        step_start = time.perf_counter()
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, labels = corpus.get_batch("train", config.batch_size, block_size, generator)
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        extra = aux_loss(model)  # for the record: its gradient is attached to the layers' outputs
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        for module in hooks:
            module.after_optimizer_step()
        history.step.append(step)
        history.loss.append(loss.item())
        history.aux_loss.append(0.0 if extra is None else extra.item())
        history.lr.append(lr)
        step_seconds += time.perf_counter() - step_start
        if callback is not None:
            callback(step, model, x, labels)
        if config.evaluates_after(step):
            by_domain = evaluate(model, corpus, batches=config.eval_batches, batch_size=config.batch_size,
                                 block_size=block_size)
            history.val_step.append(step)
            history.val_seconds.append(step_seconds)
            history.val_loss.append(sum(by_domain.values()) / len(by_domain))
            for d, v in by_domain.items():
                history.val_loss_by_domain[d].append(v)
            bar.postfix = f"loss {loss.item():.3f}, val loss {history.val_loss[-1]:.3f}"
        bar.update()
    bar.close()
    history.seconds = time.perf_counter() - t0
    return history

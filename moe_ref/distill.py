"""Chapter 13: distilling a trained MoE into a dense student of equal active FLOPs (Switch Transformer, section 5).

:cite:t:`fedus2022switch` distil sparse teachers into dense students by (i) initialising the student with the
teacher's non-expert weights (embeddings, attention, norms, output layer) and (ii) training it on "a mixture
of 0.25 for the teacher probabilities and 0.75 for the ground truth label". Per token, with student logits
``z``, teacher logits ``t``, label ``y`` and temperature ``tau``:

    ``loss = (1 - w) * CE(softmax(z), y) + w * CE(softmax(t / tau), softmax(z / tau))``,
    ``CE(p_teacher, q_student) = -sum_v p_teacher[v] log q_student[v]``,

``w = soft_weight = 0.25``. The soft term is the cross-entropy with the teacher's distribution; it differs from
``KL(p_teacher || q_student)`` by the teacher's entropy, a constant for the student, so the gradients are the
same. (Hinton et al.'s ``tau^2`` factor, which keeps the soft gradients' size when ``tau > 1``, is not applied:
Switch uses ``tau = 1``.)

:func:`student_from_teacher` builds the student; :class:`DistillationModel` wraps student and frozen teacher
so that the book's training loop (:func:`moe_ref.book.train.train`) trains the student on the mixed loss and
evaluates it on the plain language-model loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .moe import MoE


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      soft_weight: float = 0.25, temperature: float = 1.0) -> torch.Tensor:
    """``(1 - soft_weight) * hard + soft_weight * soft``, averaged over tokens (a float32 scalar).

    Args:
        student_logits: ``[..., V]`` float.
        teacher_logits: ``[..., V]`` float, same shape (detached here: the teacher is not trained).
        targets: ``[...]`` int64 labels in ``0 .. V-1``.
        soft_weight: the teacher's share, in ``[0, 1]`` (Switch: 0.25).
        temperature: ``tau > 0`` dividing both logits in the soft term only.
    """
    _checks.float_tensor("student_logits", student_logits)
    _checks.float_tensor("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long:
        raise TypeError("targets must be an int64 tensor")
    if targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(student_logits.shape[:-1])}, got {tuple(targets.shape)}")
    w = _checks.finite_float("soft_weight", soft_weight, minimum=0.0)
    if w > 1:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    tau = _checks.finite_float("temperature", temperature, minimum=0.0, strict=True)
    V = student_logits.shape[-1]
    z = student_logits.reshape(-1, V).float()
    t = teacher_logits.detach().reshape(-1, V).float()
    hard = F.cross_entropy(z, targets.reshape(-1))
    soft = -(F.softmax(t / tau, dim=-1) * F.log_softmax(z / tau, dim=-1)).sum(-1).mean()
    return (1 - w) * hard + w * soft


def expert_free_state(model: nn.Module) -> dict:
    """The state dict of ``model`` without its MoE layers' entries: its non-expert weights."""
    moe_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, MoE)]
    return {k: v for k, v in model.state_dict().items() if not any(k.startswith(p) for p in moe_prefixes)}


@torch.no_grad()
def student_from_teacher(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """Copy ``teacher``'s non-expert weights into ``student`` (in place; returned).

    Every entry of the teacher's state dict outside its MoE layers must exist in the student with the same
    shape (same embeddings, attention, norms and head); the student's FFNs keep their own initialisation.
    """
    state = expert_free_state(teacher)
    own = student.state_dict()
    missing = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or wrong:
        raise ValueError(f"student must have the teacher's non-expert weights: missing {missing[:4]}, "
                         f"other shapes {wrong[:4]}")
    for k, v in state.items():
        own[k].copy_(v)
    return student


class DistillationModel(nn.Module):
    """Student and frozen teacher for the book's training loop: ``forward(idx, targets)`` returns
    ``(student logits, loss)`` with the :func:`distillation_loss` in training mode and the student's plain
    cross-entropy in eval mode (so :func:`~moe_ref.book.train.evaluate` measures the student itself).

    The teacher stays in eval mode, frozen (``requires_grad=False``), and runs under ``no_grad``.
    ``config``, ``num_params`` and ``flops_per_token`` are the student's.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, soft_weight: float = 0.25,
                 temperature: float = 1.0):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.soft_weight, self.temperature = soft_weight, temperature
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()

    @property
    def config(self):
        return self.student.config

    def train(self, mode: bool = True):
        """Set the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits, loss = self.student(idx, targets)
        if self.training and targets is not None:
            with torch.no_grad():
                teacher_logits, _ = self.teacher(idx)
            loss = distillation_loss(logits, teacher_logits, targets, self.soft_weight, self.temperature)
        return logits, loss

    def num_params(self, **kwargs) -> int:
        return self.student.num_params(**kwargs)

    def flops_per_token(self, *args) -> int:
        return self.student.flops_per_token(*args)


def kept_fraction(dense_loss: float, moe_loss: float, student_loss: float) -> float:
    """The share of the MoE's gain over the dense baseline that the student keeps:
    ``(dense - student) / (dense - moe)`` (1: all of it, 0: none, < 0: worse than dense). Meaningless when the
    gain ``dense - moe`` is within the noise."""
    gain = dense_loss - moe_loss
    if gain == 0:
        raise ValueError("the MoE has no gain over the dense baseline (dense_loss == moe_loss)")
    return (dense_loss - student_loss) / gain


__all__ = ["distillation_loss", "expert_free_state", "student_from_teacher", "DistillationModel",
           "kept_fraction"]

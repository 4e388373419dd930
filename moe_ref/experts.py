"""Chapter 2: the routed experts, ``E`` FFNs with their weights stacked, and the three ways to run them.

The FFN formula is :func:`~moe_ref.ffn.ffn_forward`; only the matrix product changes:

* :meth:`Experts.forward`: rows sorted by expert in ragged groups, one grouped matmul per projection
  (:func:`~moe_ref.kernels.grouped_mm.grouped_mm`);
* :meth:`Experts.padded`: fixed-size buffers ``[E, C, d_model]``, one ``torch.bmm`` per projection;
* :meth:`Experts.expert`: one expert on its own tokens, plain ``@`` (the readable reference).

The weights are cast to the dtype of the rows they meet, so the caller chooses the compute dtype (the
autocast dtype under autocast) once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks
from .activations import activation_fn
from .ffn import ffn_forward
from .kernels.grouped_mm import check_backend, grouped_mm, grouped_mm_unchecked


def _bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, w.to(x.dtype))


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.to(x.dtype)


class Experts(nn.Module):
    """``E`` FFN experts: ``w_in``, ``w_up`` ``[E, d_model, d_hidden]``, ``w_out`` ``[E, d_hidden, d_model]``.

    Expert ``e`` computes ``act(x @ w_in[e]) @ w_out[e]`` (plain) or ``(act(x @ w_in[e]) * (x @ w_up[e])) @
    w_out[e]`` (gated), as :class:`~moe_ref.ffn.FFN` does, with the weight matrices stored input-major.

    Args:
        d_model: width of the token vectors.
        d_hidden: hidden width of each expert.
        num_experts: ``E``.
        activation: as for :class:`~moe_ref.ffn.FFN`.
        init_std: initialise the weights from ``N(0, init_std^2)``; ``None`` (default) uses the
            initialisation ``nn.Linear`` would give each expert matrix (uniform in ``+-1/sqrt(fan_in)``).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, activation: str = "swiglu",
                 init_std: float | None = None):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.activation = activation
        self.act, self.gated = activation_fn(activation)
        self.init_std = None if init_std is None else _checks.finite_float("init_std", init_std, minimum=0.0)
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_hidden)) if self.gated else None
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the expert weights (see the ``init_std`` argument)."""
        for w in (self.w_in, self.w_up, self.w_out):
            if w is None:
                continue
            if self.init_std is None:
                bound = 1 / math.sqrt(w.shape[1])  # fan_in is the middle (input) dimension
                w.uniform_(-bound, bound)
            else:
                w.normal_(0.0, self.init_std)

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor, backend: str | None = None, *,
                check: bool = True) -> torch.Tensor:
        """All experts on their groups of rows, one grouped matmul per projection.

        Args:
            x_sorted: ``[A, d_model]``, rows grouped by expert.
            offsets: ``[E]`` int32 cumulative group ends.
            backend: passed to :func:`~moe_ref.kernels.grouped_mm.grouped_mm`.
            check: validate the inputs (reads ``offsets`` on the host: a synchronisation on a GPU). The MoE
                layer turns it off for the offsets it computed itself.

        Returns:
            ``[A, d_model]`` in the dtype of ``x_sorted``, row ``a`` being its expert's output for row ``a``.
        """
        backend = check_backend(backend)
        gmm = grouped_mm if check else grouped_mm_unchecked

        def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return gmm(x, w.to(x.dtype), offsets, backend=backend)

        return ffn_forward(x_sorted, self.act, self.w_in, self.w_up, self.w_out, matmul)

    def narrow(self, start: int, stop: int) -> "Experts":
        """Experts ``start, ..., stop - 1`` as a new module holding copies of their weights.

        Draws no random numbers, so building a full :class:`Experts` and narrowing it consumes the RNG exactly
        as the full module does (expert parallelism uses this to hold the same experts as a plain layer).
        """
        _checks.positive_int("start", start, minimum=0)
        _checks.positive_int("stop", stop, minimum=start + 1)
        if stop > self.num_experts:
            raise ValueError(f"stop must be <= num_experts={self.num_experts}, got {stop}")
        with torch.device("meta"):  # meta: the initialisation draws nothing
            part = Experts(self.d_model, self.d_hidden, stop - start, self.activation, self.init_std)
        for name in ("w_in", "w_up", "w_out"):
            w = getattr(self, name)
            if w is not None:
                setattr(part, name, nn.Parameter(w.detach()[start:stop].clone(), requires_grad=w.requires_grad))
        return part

    def padded(self, x_padded: torch.Tensor) -> torch.Tensor:
        """Every expert on its buffer, ``[E, C, d_model] -> [E, C, d_model]``: one ``torch.bmm`` per projection."""
        return ffn_forward(x_padded, self.act, self.w_in, self.w_up, self.w_out, _bmm)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x`` ``[n, d_model]``, with ordinary matmuls."""
        _checks.positive_int("e", e, minimum=0)
        if e >= self.num_experts:
            raise ValueError(f"e must be < num_experts={self.num_experts}, got {e}")
        _checks.float_tensor("x", x, last_dim=self.d_model)
        w_up = None if self.w_up is None else self.w_up[e]
        return ffn_forward(x, self.act, self.w_in[e], w_up, self.w_out[e], _matmul)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation!r}")

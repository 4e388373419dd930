"""Chapter 13: weight-only quantization of the routed experts (int8, int4), and calibration coverage.

**The arithmetic (symmetric, weight-only).** A weight matrix ``W`` ``[d_in, d_out]`` (input-major, as
:class:`~moe_ref.experts.Experts` stores it) is cut into *groups*: for each output column, runs of
``group_size`` consecutive input rows (``group_size = d_in``: one group per output channel, "per channel").
A group ``g`` gets one scale ``s_g = max_{i in g} |w_i| / q_max`` and each weight an integer code
``q_i = clamp(round(w_i / s_g), -q_max, q_max)``; the weight is read back as ``q_i * s_g``.

* ``bits = 8``: ``q_max = 127``; ``bits = 4``: ``q_max = 7`` (the codes are symmetric, ``-q_max .. q_max``:
  the most negative code ``-2^(b-1)`` is left unused so that zero and the sign are exact).
* **The error bound.** ``|w_i / s_g| <= q_max`` by the choice of ``s_g``, so the rounding never clips and
  ``|w_i - q_i s_g| = s_g |w_i / s_g - round(w_i / s_g)| <= s_g / 2``. Smaller groups have smaller maxima,
  hence smaller scales and errors; an all-zero group gets ``s_g = 1`` and is exact.
* **The memory.** Codes: 1 byte (int8) or half a byte (int4, two codes packed in one byte) per weight, plus
  one float32 scale per group: ``numel * bits / 8 + 4 * numel / group_size`` bytes against ``4 * numel``.
  int8 per channel with ``d_in = 64``: ``1 + 4/64 = 1.06`` bytes per weight, 3.8x smaller than float32.

``full_range=True`` uses torchao's convention instead (``s_g = max |w| / ((2^b - 1) / 2)``, codes
``-2^(b-1) .. 2^(b-1) - 1``): the same bound holds (``w = +max`` gives ``127.5 -> 128``, clamped to 127: an
error of exactly ``s_g / 2``).

:func:`quantize_experts` replaces the routed experts of an :class:`~moe_ref.moe.MoE` (or of every MoE of a
model) by :class:`QuantizedExperts`, which keeps only the codes and the scales and dequantizes on the fly
(all of ``impl`` work unchanged). The router and the shared experts stay in float32: the router is tiny and
its choices are discrete, so an error there changes which experts run. A real kernel fuses the dequantization
into the matmul; this reference dequantizes each forward into a float32 tensor and measures quality and
storage, not speed.

**Calibration.** :func:`calibration_counts` runs batches through a model and counts the tokens each expert of
each MoE layer was given; :func:`calibration_coverage` raises (or warns) when some expert saw none, since
anything computed from calibration statistics (activation-aware scales, usage-based pruning) is then blind
for that expert.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from . import _checks
from .experts import Experts
from .moe import MoE

BITS = (8, 4)
"""The supported code widths."""

_WEIGHTS = ("w_in", "w_up", "w_out")


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return int(bits)


def _check_group_size(group_size, d_in: int) -> int:
    """``None`` means one group per output channel (``d_in``); else a positive divisor of ``d_in``."""
    if group_size is None:
        return d_in
    _checks.positive_int("group_size", group_size)
    if d_in % group_size:
        raise ValueError(f"group_size must divide the input dimension {d_in}, got {group_size}")
    return group_size


def qrange(bits: int, full_range: bool = False) -> tuple[float, int, int]:
    """``(divisor, lowest code, highest code)``: the scale is ``max |w| / divisor``.

    Symmetric (default): ``(2^(b-1) - 1, -(2^(b-1) - 1), 2^(b-1) - 1)``, e.g. ``(127, -127, 127)``;
    ``full_range`` (torchao's int8 weight-only): ``((2^b - 1) / 2, -2^(b-1), 2^(b-1) - 1)``, ``(127.5, -128, 127)``.
    """
    bits = _check_bits(bits)
    half = 2 ** (bits - 1)
    return ((2 ** bits - 1) / 2, -half, half - 1) if full_range else (half - 1, -(half - 1), half - 1)


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int | None = None, *,
                    full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of ``w`` ``[..., d_in, d_out]`` (float) along its input dimension ``-2``.

    Returns ``(codes, scales)``: ``codes`` int8 of the shape of ``w`` (int4 codes unpacked, in ``-7 .. 7``),
    ``scales`` float32 ``[..., d_in / group_size, d_out]``. ``group_size=None``: per output channel.
    """
    _checks.float_tensor("w", w, min_dim=2)
    divisor, lo, hi = qrange(bits, full_range)
    d_in, d_out = w.shape[-2:]
    g = _check_group_size(group_size, d_in)
    groups = w.detach().float().reshape(*w.shape[:-2], d_in // g, g, d_out)
    scales = groups.abs().amax(dim=-2) / divisor  # [..., d_in/g, d_out]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: exact with any scale
    codes = torch.round(groups / scales.unsqueeze(-2)).clamp(lo, hi).to(torch.int8)
    return codes.reshape(w.shape), scales


def dequantize_tensor(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_tensor`: ``codes`` int8 ``[..., d_in, d_out]`` times their group's scale,
    float32 of the shape of ``codes``."""
    d_in, d_out = codes.shape[-2:]
    g = d_in // scales.shape[-2]
    groups = codes.float().reshape(*codes.shape[:-2], d_in // g, g, d_out)
    return (groups * scales.unsqueeze(-2)).reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two int4 codes (``-8 .. 7``) per byte: ``[..., n]`` int8 with ``n`` even -> ``[..., n / 2]`` uint8,
    the even column in the low nibble, the odd one in the high nibble (offset binary: ``code + 8``)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: int4 packing needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("codes must lie in -8 .. 7 for int4 packing")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., n / 2]`` uint8 -> ``[..., n]`` int8."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


class QuantizedExperts(Experts):
    """The routed experts of an :class:`~moe_ref.experts.Experts` stored as int8 or packed int4 codes and
    float32 scales; ``w_in``, ``w_up``, ``w_out`` are properties that dequantize on each access (float32,
    the original shapes), so every implementation of the MoE layer runs unchanged.

    Buffers per weight ``name``: ``name_codes`` (int8 ``[E, d_in, d_out]``, or uint8 ``[E, d_in, d_out / 2]``
    for int4) and ``name_scales`` (float32 ``[E, d_in / group_size, d_out]``). No parameters: the layer is
    for inference (``requires_grad`` is meaningless for integer codes).

    Args:
        experts: the float experts to quantize (not modified).
        bits: 8 or 4.
        group_size: input rows per scale; ``None``: per output channel.
    """

    def __init__(self, experts: Experts, bits: int = 8, group_size: int | None = None):
        nn.Module.__init__(self)  # not Experts.__init__: no float parameters
        if not isinstance(experts, Experts):
            raise TypeError(f"experts must be an Experts module, got {type(experts).__name__}")
        if isinstance(experts, QuantizedExperts):
            raise TypeError("experts are already quantized")
        self.bits = _check_bits(bits)
        for name in ("d_model", "d_hidden", "num_experts", "activation", "act", "gated", "init_std"):
            setattr(self, name, getattr(experts, name))
        self.group_size = group_size
        self._names = tuple(n for n in _WEIGHTS if getattr(experts, n) is not None)
        for name in self._names:
            w = getattr(experts, name)
            _check_group_size(group_size, w.shape[1])  # named before anything is computed
            if self.bits == 4 and w.shape[2] % 2:
                raise ValueError(f"int4 packs two output columns per byte: {name} has {w.shape[2]}")
        for name in self._names:
            codes, scales = quantize_tensor(getattr(experts, name), self.bits, group_size)
            self.register_buffer(f"{name}_codes", pack_int4(codes) if self.bits == 4 else codes)
            self.register_buffer(f"{name}_scales", scales)

    def _weight(self, name: str) -> torch.Tensor | None:
        if name not in self._names:
            return None
        codes = getattr(self, f"{name}_codes")
        if self.bits == 4:
            codes = unpack_int4(codes)
        return dequantize_tensor(codes, getattr(self, f"{name}_scales"))

    w_in = property(lambda self: self._weight("w_in"), doc="``[E, d_model, d_hidden]`` float32, dequantized.")
    w_up = property(lambda self: self._weight("w_up"), doc="``[E, d_model, d_hidden]`` float32 or ``None``.")
    w_out = property(lambda self: self._weight("w_out"), doc="``[E, d_hidden, d_model]`` float32, dequantized.")

    def reset_parameters(self) -> None:
        raise TypeError("quantized experts cannot be re-initialised; quantize freshly initialised experts")

    def narrow(self, start: int, stop: int) -> "Experts":
        """Not supported: narrow the float experts first, then quantize."""
        raise TypeError("quantized experts cannot be narrowed; narrow the float experts, then quantize")

    def nbytes(self) -> int:
        """Bytes of the stored codes and scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"{super().extra_repr()}, int{self.bits}, {group}"


def expert_bytes(module: nn.Module) -> int:
    """Bytes the routed experts of ``module`` (an :class:`~moe_ref.moe.MoE`, or a model holding MoE layers)
    occupy: float parameters at their element size, quantized ones as codes plus scales."""
    total = 0
    for m in module.modules():
        if isinstance(m, QuantizedExperts):
            total += m.nbytes()
        elif isinstance(m, Experts):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def predicted_bytes(numel: int, bits: int, group_size: int, scale_bytes: int = 4) -> float:
    """The storage formula: ``numel * bits / 8`` bytes of codes plus ``scale_bytes`` per group of
    ``group_size`` weights."""
    return numel * _check_bits(bits) / 8 + scale_bytes * numel / group_size


def quantize_experts(module: nn.Module, bits: int = 8, group_size: int | None = None) -> nn.Module:
    """A copy of ``module`` whose routed experts are :class:`QuantizedExperts`.

    Args:
        module: an :class:`~moe_ref.moe.MoE`, or any model holding MoE layers (each is converted).
        bits: 8 or 4; anything else is a ``ValueError``.
        group_size: input rows per scale (a divisor of every expert matrix's input dimension, ``d_model``
            for ``w_in``/``w_up`` and ``d_hidden`` for ``w_out``); ``None``: per output channel.

    The router, the shared experts and everything outside the MoE layers stay as they are (float32). The copy
    is in eval mode; ``module`` is not modified.
    """
    _check_bits(bits)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("module holds no MoE layer to quantize")
    for m in layers:  # check every layer before copying anything
        if isinstance(m.experts, QuantizedExperts):
            raise ValueError("module's experts are already quantized")
        for name in _WEIGHTS:
            w = getattr(m.experts, name)
            if w is not None:
                _check_group_size(group_size, w.shape[1])
    out = copy.deepcopy(module).eval()
    for m in out.modules():
        if isinstance(m, MoE):
            m.experts = QuantizedExperts(m.experts, bits, group_size)
    return out


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of ``model`` in module order (``model`` itself if it is one)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def calibration_counts(model: nn.Module, batches) -> torch.Tensor:
    """Run ``batches`` (an iterable of inputs to ``model``, e.g. ``[B, T]`` token ids) through ``model`` in
    eval mode and count the (token, expert) assignments of each MoE layer: ``[layers, E]`` int64.

    Every layer must have the same ``E``.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model holds no MoE layer to calibrate")
    sizes = {m.num_experts for m in layers}
    if len(sizes) != 1:
        raise ValueError(f"calibration_counts needs the same num_experts in every layer, got {sorted(sizes)}")
    counts = torch.zeros(len(layers), sizes.pop(), dtype=torch.long)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
            for i, m in enumerate(layers):
                counts[i] += m.last_routing.tokens_per_expert.to(torch.long).cpu()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("batches must hold at least one batch")
    return counts


class CalibrationWarning(UserWarning):
    """Some expert saw fewer calibration tokens than asked for."""


def calibration_coverage(model: nn.Module, batches, *, min_tokens: int = 1, on_missing: str = "raise"
                         ) -> torch.Tensor:
    """:func:`calibration_counts`, checked: every expert of every layer must have seen ``min_tokens``.

    Args:
        on_missing: ``"raise"`` (a ``ValueError`` listing the starved experts as ``layer/expert``),
            ``"warn"`` (a :class:`CalibrationWarning`) or ``"ignore"``.

    Returns:
        ``[layers, E]`` int64, the counts.
    """
    _checks.positive_int("min_tokens", min_tokens)
    _checks.choice("on_missing", on_missing, ("raise", "warn", "ignore"))
    counts = calibration_counts(model, batches)
    starved = (counts < min_tokens).nonzero().tolist()
    if starved and on_missing != "ignore":
        names = ", ".join(f"{layer}/{e}" for layer, e in starved[:16]) + (" ..." if len(starved) > 16 else "")
        message = (f"{len(starved)} of {counts.numel()} experts (layer/expert) saw fewer than {min_tokens} "
                   f"calibration tokens: {names}; calibrate with more or more varied data")
        if on_missing == "raise":
            raise ValueError(message)
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    return counts


__all__ = ["BITS", "qrange", "quantize_tensor", "dequantize_tensor", "pack_int4", "unpack_int4",
           "QuantizedExperts", "quantize_experts", "expert_bytes", "predicted_bytes", "moe_layers",
           "calibration_counts", "calibration_coverage", "CalibrationWarning"]

"""Argument checks shared by every module.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument and says what was expected, so
bad input fails at the call site rather than deep inside a matmul.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) that is at least ``minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def finite_float(name: str, value, *, minimum: float | None = None, strict: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number above ``minimum`` (``>`` if ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def choice(name: str, value, options: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``options``; raise a ``ValueError`` listing them otherwise."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def float_tensor(name: str, x, *, last_dim: int | None = None, min_dim: int = 1) -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor of at least ``min_dim`` dims whose last dim is ``last_dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got a {x.dim()}-d tensor")
    if last_dim is not None and x.shape[-1] != last_dim:
        raise ValueError(f"{name} must have last dimension {last_dim}, got shape {tuple(x.shape)}")
    return x


def boolean(name: str, value) -> bool:
    """Return ``value`` if it is a ``bool``; raise a ``TypeError`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def matches_module(name: str, x: torch.Tensor, param: torch.Tensor) -> None:
    """Check that ``x`` can meet the module parameter ``param``: same device, and same dtype unless autocast
    is on for that device (autocast casts the operands itself)."""
    if param.device.type == "meta":
        return
    if x.device != param.device:
        raise ValueError(f"{name} is on {x.device} but the module's parameters are on {param.device}; "
                         f"move one of them")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {param.dtype}; cast the "
                        f"input or the module (module.to({x.dtype})), or run under torch.autocast")


def token_mask(mask, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Check a token mask (``True``/1 for a real token, ``False``/0 for padding) of ``shape`` and return it as a
    flat ``[T]`` bool tensor; ``None`` stays ``None``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"token_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"token_mask must be a bool or integer tensor (1 for real tokens), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"token_mask must have shape {tuple(shape)} (the input's shape without d_model), "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"token_mask is on {mask.device} but the input is on {device}")
    return mask.reshape(-1).bool()

"""The one knob every notebook reads: where to run and how big.

``MOE_BOOK_SCALE`` (environment variable, default 1) multiplies the notebooks' step counts and sizes; the
defaults are chosen so that each notebook runs in one to two minutes on a 2-core CPU. On a GPU, set
e.g. ``MOE_BOOK_SCALE=20``.
``MOE_BOOK_DEVICE`` overrides the device (default: ``cuda`` when available, else ``cpu``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Settings:
    """Device and scale for a notebook. ``scaled(n)`` is ``n`` times the scale, rounded, at least 1."""

    device: str
    scale: float

    def scaled(self, n: int) -> int:
        return max(1, round(n * self.scale))


def settings(seed: int = 0) -> Settings:
    """Read ``MOE_BOOK_DEVICE`` and ``MOE_BOOK_SCALE``, seed torch, and return the :class:`Settings`."""
    device = os.environ.get("MOE_BOOK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    raw = os.environ.get("MOE_BOOK_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"MOE_BOOK_SCALE must be a positive number, got {raw!r}") from None
    if not scale > 0:
        raise ValueError(f"MOE_BOOK_SCALE must be a positive number, got {raw!r}")
    torch.manual_seed(seed)
    return Settings(device=device, scale=scale)

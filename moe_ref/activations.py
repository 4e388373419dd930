"""The activations of every FFN and expert in the package, by name.

Plain activations compute ``act(x W_in) W_out``; gated ones :cite:p:`shazeer2020glu` compute
``(act(x W_gate) * (x W_up)) W_out`` and so have one more weight matrix.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import _checks

#: Activations of the plain FFN, ``act(x W1) W2``.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
#: Gated activations, ``(act(x W_gate) * (x W_up)) W_down``, mapped to their gate activation.
GATED = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


def activation_fn(name: str):
    """Return ``(act, gated)`` for an activation name: the elementwise function and whether it is gated."""
    _checks.choice("activation", name, (*ACTIVATIONS, *GATED))
    return (GATED[name], True) if name in GATED else (ACTIVATIONS[name], False)

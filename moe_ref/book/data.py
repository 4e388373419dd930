"""A small byte-level corpus with domain labels, built from text that ships with every Python install.

Three domains, so that later chapters can ask which experts a domain's tokens go to:

* ``"english"``: the Python language reference, as prose (``pydoc_data.topics``);
* ``"python"``: source code of the standard library (top-level ``*.py`` files, in name order);
* ``"arithmetic"``: synthetic lines such as ``"417+86=503\\n"``, generated from a fixed seed.

Tokens are bytes (vocabulary of 256), so no tokenizer is needed and nothing is downloaded. Each domain is cut
to the same number of bytes; its first ``1 - val_fraction`` is the training split and the rest the
validation split, contiguous, so no validation window overlaps a training window. The corpus is a pure
function of its arguments and of the Python version (whose files it reads).
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass

import torch

from .. import _checks

DOMAINS = ("english", "python", "arithmetic")
VOCAB_SIZE = 256


def english_text() -> str:
    """The language reference's topics (``pydoc_data.topics.topics``), joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def python_text(max_bytes: int) -> str:
    """Top-level standard-library ``*.py`` files in name order, joined until ``max_bytes`` is reached."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            break
    return "\n".join(parts)


def arithmetic_text(max_bytes: int, seed: int = 0) -> str:
    """Lines ``a op b = c`` with ``a, b < 1000`` and ``op`` in ``+ - *``, from ``random.Random(seed)``."""
    rng, lines, size = random.Random(seed), [], 0
    while size < max_bytes:
        a, b, op = rng.randrange(1000), rng.randrange(1000), rng.choice("+-*")
        c = a + b if op == "+" else a - b if op == "-" else a * b
        line = f"{a}{op}{b}={c}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a ``uint8`` tensor ``[n]``."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens) -> str:
    """Inverse of :func:`encode` (invalid UTF-8 is replaced). ``tokens``: any 1-d integer sequence of bytes."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """Tokens of each domain, split into train and validation.

    Attributes:
        domains: domain names; a domain's label is its index here.
        train: ``{domain: uint8 tensor [n_train]}``.
        val: ``{domain: uint8 tensor [n_val]}``.
    """

    domains: tuple
    train: dict
    val: dict

    def split(self, split: str) -> dict:
        """The ``{domain: tokens}`` dict of ``split`` ("train" or "val")."""
        return self.train if _checks.choice("split", split, ("train", "val")) == "train" else self.val

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator | None = None,
                  domain: str | None = None):
        """Sample ``batch_size`` windows of ``block_size + 1`` bytes, each from a single domain.

        Domains are drawn uniformly (each row independently) unless ``domain`` fixes one, so every domain
        gets the same share of training whatever its size.

        Returns:
            ``(x, y, labels)``: inputs ``[B, T]`` int64, next-byte targets ``[B, T]`` int64, and the domain
            label of each row ``[B]`` int64.
        """
        data = self.split(split)
        _checks.positive_int("batch_size", batch_size)
        _checks.positive_int("block_size", block_size)
        if domain is None:
            labels = torch.randint(len(self.domains), (batch_size,), generator=generator)
        else:
            _checks.choice("domain", domain, self.domains)
            labels = torch.full((batch_size,), self.domains.index(domain), dtype=torch.long)
        rows = []
        for label in labels.tolist():
            tokens = data[self.domains[label]]
            if len(tokens) <= block_size:
                raise ValueError(f"block_size must be < {len(tokens)} (the {split} length of one domain), "
                                 f"got {block_size}")
            start = int(torch.randint(len(tokens) - block_size, (1,), generator=generator))
            rows.append(tokens[start:start + block_size + 1])
        window = torch.stack(rows).long()
        return window[:, :-1], window[:, 1:], labels


def build_corpus(bytes_per_domain: int = 400_000, val_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Build the three-domain :class:`Corpus`.

    Args:
        bytes_per_domain: bytes kept from each domain (the English source has about 470 kB on Python 3.11;
            asking for more than a domain has is a ``ValueError``).
        val_fraction: fraction of each domain, taken from its end, held out for validation.
        seed: seed of the synthetic arithmetic domain.
    """
    _checks.positive_int("bytes_per_domain", bytes_per_domain, minimum=1000)
    _checks.finite_float("val_fraction", val_fraction, minimum=0.0, strict=True)
    if val_fraction >= 1:
        raise ValueError(f"val_fraction must be < 1, got {val_fraction}")
    # Built one at a time so that a too-large request fails before the synthetic domain is generated.
    sources = {"english": english_text, "python": lambda: python_text(bytes_per_domain),
               "arithmetic": lambda: arithmetic_text(bytes_per_domain, seed)}
    train, val = {}, {}
    for name in DOMAINS:
        tokens = encode(sources[name]())
        if len(tokens) < bytes_per_domain:
            raise ValueError(f"bytes_per_domain must be <= {len(tokens)} (all of domain {name!r}), "
                             f"got {bytes_per_domain}")
        tokens = tokens[:bytes_per_domain]
        n_train = int(round(bytes_per_domain * (1 - val_fraction)))
        train[name], val[name] = tokens[:n_train], tokens[n_train:]
    return Corpus(DOMAINS, train, val)

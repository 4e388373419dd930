"""What do experts specialise in? Numbers from recorded routings.

The inputs are routing decisions recorded on a fixed probe set: for every token its first-choice (top-1)
expert id in one layer, next to the token's id (a byte value in this book) and, where it applies, a domain
label. All inputs are integer tensors (any integer dtype; Python lists are converted with
``torch.as_tensor``), all ids are non-negative, and every result is a Python ``float``. The work is done in
float64 on the CPU, so results do not depend on the device the routing was recorded on.

Two papers frame the questions. Mixtral (:cite:t:`jiang2024mixtral`, section 5, "Routing analysis") finds no clear
assignment of experts to topics or domains, but a strong dependence on syntax and on the token itself, and
reports that consecutive tokens are assigned the same expert more often than chance. OpenMoE
(:cite:t:`xue2024openmoe`) calls the same finding "context-independent specialization": routing follows
token identity (the same token goes to the same experts whatever its context), and it is settled early in
pre-training.

The measures:

* :func:`lookup_accuracy` -- how well a lookup table from a per-token key (the byte, or the byte with its
  predecessor) to the most frequent expert predicts the expert on *held-out* tokens. Held out, so a key seen
  once does not "explain" its token the way it inflates a plug-in mutual information.
* :func:`identity_vs_context` -- that accuracy for no key (the majority expert: chance), the byte alone, and
  the (previous byte, byte) pair, on one split: ``token`` is what identity explains, ``bigram - token`` what
  one token of context adds.
* :func:`repeat_rate` -- the fraction of neighbouring positions routed to the same expert, against the
  ``sum_e p_e^2`` that independent routing with the same expert loads would give; optionally only over
  neighbours with different bytes, since equal bytes go to the same expert trivially when routing follows
  identity.
* :func:`domain_specialization` (from :func:`domain_distributions`) -- how far each domain's expert
  distribution is from the pooled one (total variation), raw and after controlling for the bytes the domain
  uses: the second is exactly 0 when the expert is a function of the byte.
* :func:`agreement` -- the fraction of positions where two routings pick the same expert (a checkpoint's
  routing against the final one shows when routing settles during training).
"""

from __future__ import annotations

import torch

from . import _checks


# --- input checks -------------------------------------------------------------------------------------------

def _ids(name: str, x, *, dim: int | None = None) -> torch.Tensor:
    """``x`` as a non-empty int64 CPU tensor of non-negative ids (``dim`` dimensions if given)."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (list, tuple)):
            x = torch.as_tensor(x)
        else:
            raise TypeError(f"{name} must be an integer torch.Tensor (or a list of ints), got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor of ids, got dtype {x.dtype}")
    if dim is not None and x.dim() != dim:
        shape = "[N]" if dim == 1 else "[S, T]"
        raise ValueError(f"{name} must be a {dim}-d tensor of shape {shape}, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.int64)
    if bool((x < 0).any()):
        raise ValueError(f"{name} must hold non-negative ids, got minimum {int(x.min())}")
    return x


def _same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the same shape as {ref_name}, {tuple(ref.shape)}; "
                         f"got {tuple(x.shape)}")


def _fit_fraction(value) -> float:
    value = _checks.finite_float("fit_fraction", value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {value}")
    return value


# --- held-out lookup tables ---------------------------------------------------------------------------------

def _split(n: int, fit_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit and test indices of ``n`` tokens, as documented in :func:`lookup_accuracy`."""
    if n < 2:
        raise ValueError(f"experts must hold at least 2 tokens to split into a fit and a test part, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_fit = min(max(int(fit_fraction * n), 1), n - 1)
    return perm[:n_fit], perm[n_fit:]


def _majority(experts: torch.Tensor) -> int:
    """The most frequent id in ``experts`` (ties: the smallest; ``argmax`` returns the first maximum)."""
    return int(torch.bincount(experts).argmax())


def _fit_table(keys: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A lookup table: the sorted distinct ``keys`` and, for each, its most frequent expert (ties: smallest)."""
    pairs, counts = torch.unique(torch.stack([keys, experts], dim=1), dim=0, return_counts=True)
    # `unique` sorts the (key, expert) rows; a stable sort by descending count and then a stable sort by key
    # leaves each key's rows ordered by count, equal counts still by ascending expert: the first row wins.
    order = torch.sort(-counts, stable=True).indices
    pairs = pairs[order]
    pairs = pairs[torch.sort(pairs[:, 0], stable=True).indices]
    first = torch.ones(len(pairs), dtype=torch.bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    return pairs[first, 0], pairs[first, 1]


def _predict(table: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """The table's expert for each key; ``fallback`` (same shape as ``keys``) where the key is not in the table."""
    table_keys, table_experts = table
    pos = torch.searchsorted(table_keys, keys).clamp(max=len(table_keys) - 1)
    seen = table_keys[pos] == keys
    return torch.where(seen, table_experts[pos], fallback)


def _held_out_accuracy(experts, fit, test, feature_chain) -> float:
    """Accuracy on ``test`` of a chain of lookup tables fit on ``fit``: the first feature's table, backing off to
    the next feature's for unseen keys, and so on, finally to the fit part's majority expert."""
    pred = torch.full((len(test),), _majority(experts[fit]), dtype=torch.int64)
    for keys in reversed(feature_chain):
        pred = _predict(_fit_table(keys[fit], experts[fit]), keys[test], pred)
    return float((pred == experts[test]).double().mean())


def lookup_accuracy(experts, features, *, fit_fraction: float = 0.5, seed: int = 0, backoff=None) -> float:
    """Held-out accuracy of predicting each token's expert from its key with a lookup table.

    Args:
        experts: ``[N]`` integer tensor, the expert id of each token (its first choice).
        features: ``[N]`` integer tensor, a non-negative key per token (a byte value, or a combined key).
        fit_fraction: the share of tokens the tables are fit on, in ``(0, 1)``.
        seed: seeds the split.
        backoff: ``None`` or another ``[N]`` integer feature tensor, used for test keys unseen in the fit part.

    The split: ``perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))``, ``n_fit =
    int(fit_fraction * N)`` clamped to ``[1, N - 1]``; the tokens ``perm[:n_fit]`` are the fit part and
    ``perm[n_fit:]`` the test part. On the fit part a table maps each key to its most frequent expert (ties: the
    smallest expert id). A test token whose key is not in the table gets the ``backoff`` table's expert (that
    table also fit on the fit part), and where that key is unseen too, or without ``backoff``, the fit part's
    most frequent expert (ties: smallest). Returns the fraction of test tokens predicted right.
    """
    experts = _ids("experts", experts, dim=1)
    features = _ids("features", features, dim=1)
    _same_shape("features", features, "experts", experts)
    chain = [features]
    if backoff is not None:
        backoff = _ids("backoff", backoff, dim=1)
        _same_shape("backoff", backoff, "experts", experts)
        chain.append(backoff)
    fit_fraction = _fit_fraction(fit_fraction)
    seed = _checks.positive_int("seed", seed, minimum=0)
    fit, test = _split(len(experts), fit_fraction, seed)
    return _held_out_accuracy(experts, fit, test, chain)


def identity_vs_context(experts, tokens, *, seed: int = 0, fit_fraction: float = 0.5) -> dict:
    """How much of the routing the token's identity explains, and how much one token of context adds.

    Args:
        experts: ``[S, T]`` integer tensor, the expert id of each token of ``S`` sequences of ``T`` positions.
        tokens: ``[S, T]`` integer tensor, the token ids (bytes) at those positions.
        seed, fit_fraction: the split, as in :func:`lookup_accuracy`; one split over all ``S * T`` tokens
            serves all three numbers.

    Returns a dict of floats, held-out accuracies on the same test tokens:

    * ``chance``: always predicting the fit part's most frequent expert;
    * ``token``: a table from the token id (unseen ids: the majority expert);
    * ``bigram``: a table from the pair (previous token, token), backing off to the token table for unseen
      pairs; the first position of a sequence has as "previous token" a sentinel id ``max(tokens) + 1``.
    """
    experts = _ids("experts", experts, dim=2)
    tokens = _ids("tokens", tokens, dim=2)
    _same_shape("tokens", tokens, "experts", experts)
    fit_fraction = _fit_fraction(fit_fraction)
    seed = _checks.positive_int("seed", seed, minimum=0)
    base = int(tokens.max()) + 2  # ids 0..base-2 and the sentinel base-1: a pair key prev * base + token is unique
    prev = torch.cat([torch.full_like(tokens[:, :1], base - 1), tokens[:, :-1]], dim=1)
    pair = prev * base + tokens
    e, tok, pair = experts.reshape(-1), tokens.reshape(-1), pair.reshape(-1)
    fit, test = _split(len(e), fit_fraction, seed)
    return {
        "chance": _held_out_accuracy(e, fit, test, []),
        "token": _held_out_accuracy(e, fit, test, [tok]),
        "bigram": _held_out_accuracy(e, fit, test, [pair, tok]),
    }


# --- neighbours ---------------------------------------------------------------------------------------------

def _sum_sq_shares(experts: torch.Tensor) -> float:
    p = torch.bincount(experts.reshape(-1)).double() / experts.numel()
    return float((p * p).sum())


def repeat_rate(experts, *, tokens=None) -> dict:
    """How often consecutive positions go to the same expert, against independent routing with the same loads.

    Args:
        experts: ``[S, T]`` integer tensor (``T >= 2``), the expert id at each position of ``S`` sequences.
        tokens: ``None`` or a ``[S, T]`` integer tensor of the token ids (bytes) at those positions.

    Returns a dict of floats:

    * ``rate``: the fraction of the ``S * (T - 1)`` pairs ``(t, t + 1)`` within a sequence with equal experts;
    * ``chance``: ``sum_e p_e^2``, ``p_e`` the share of all ``S * T`` tokens routed to expert ``e``: the
      expected rate if every token drew its expert independently from those loads.

    With ``tokens``, also the same two numbers over only the pairs whose two tokens differ:
    ``rate_different_tokens`` (the fraction of those pairs with equal experts) and ``chance_different_tokens``
    (``sum_e q_e^2``, ``q_e`` the share of expert ``e`` among the two tokens of each of those pairs, a token in
    two such pairs counted twice). Both are ``None`` when no pair has two different tokens.
    """
    experts = _ids("experts", experts, dim=2)
    if experts.shape[1] < 2:
        raise ValueError(f"experts must have at least 2 positions per sequence (shape [S, T] with T >= 2), "
                         f"got shape {tuple(experts.shape)}")
    left, right = experts[:, :-1], experts[:, 1:]
    same = left == right
    out = {"rate": float(same.double().mean()), "chance": _sum_sq_shares(experts)}
    if tokens is not None:
        tokens = _ids("tokens", tokens, dim=2)
        _same_shape("tokens", tokens, "experts", experts)
        differ = tokens[:, :-1] != tokens[:, 1:]
        if bool(differ.any()):
            out["rate_different_tokens"] = float(same[differ].double().mean())
            out["chance_different_tokens"] = _sum_sq_shares(torch.cat([left[differ], right[differ]]))
        else:
            out["rate_different_tokens"] = out["chance_different_tokens"] = None
    return out


# --- domains ------------------------------------------------------------------------------------------------

def domain_distributions(experts, tokens, domains, num_experts: int, *, num_domains: int | None = None):
    """Each domain's expert distribution, observed and as predicted from its tokens alone.

    Args: as for :func:`domain_specialization`.

    Returns:
        ``(p, q, counts)``: ``p[d, e] = P(e | d)`` and ``q[d, e] = Q(e | d) = sum_b P(b | d) P(e | b)`` with
        ``P(e | b)`` pooled over all domains (what domain ``d``'s routing would be if each token were routed like
        the same token anywhere), and ``counts[d, e]`` the tokens of domain ``d`` routed to ``e``; all
        ``[D, E]`` float64. A domain without tokens has rows of zeros.
    """
    num_experts = _checks.positive_int("num_experts", num_experts)
    experts = _ids("experts", experts, dim=1)
    tokens = _ids("tokens", tokens, dim=1)
    domains = _ids("domains", domains, dim=1)
    _same_shape("tokens", tokens, "experts", experts)
    _same_shape("domains", domains, "experts", experts)
    if int(experts.max()) >= num_experts:
        raise ValueError(f"experts must hold ids in [0, num_experts) = [0, {num_experts}), "
                         f"got {int(experts.max())}")
    if num_domains is None:
        num_domains = int(domains.max()) + 1
    num_domains = _checks.positive_int("num_domains", num_domains)
    if int(domains.max()) >= num_domains:
        raise ValueError(f"domains must hold labels in [0, num_domains) = [0, {num_domains}), "
                         f"got {int(domains.max())}")
    _, tok = torch.unique(tokens, return_inverse=True)  # compact token ids 0..V-1
    V, E, D = int(tok.max()) + 1, num_experts, num_domains

    def counts(rows, cols, n_rows, n_cols):
        flat = torch.bincount(rows * n_cols + cols, minlength=n_rows * n_cols)
        return flat.reshape(n_rows, n_cols).double()

    c_de = counts(domains, experts, D, E)       # tokens of domain d routed to e
    c_db = counts(domains, tok, D, V)           # tokens of domain d with token id b
    c_be = counts(tok, experts, V, E)           # tokens with id b routed to e, all domains
    n_d = c_de.sum(1)
    p_e_given_b = c_be / c_be.sum(1, keepdim=True)  # every compact id occurs, so no row is empty
    n_safe = n_d.clamp(min=1).unsqueeze(1)
    # Counts times P(e | b), then one division by n_d: when P(e | b) is one-hot this is the same integer count
    # divided by the same n_d as P(e | d), so the difference is exactly zero.
    return c_de / n_safe, (c_db @ p_e_given_b) / n_safe, c_de


def domain_specialization(experts, tokens, domains, num_experts: int, *, num_domains: int | None = None) -> dict:
    """How differently domains use the experts, raw and after controlling for the tokens each domain uses.

    Args:
        experts: ``[N]`` integer tensor of expert ids in ``[0, num_experts)``.
        tokens: ``[N]`` integer tensor of token ids (bytes).
        domains: ``[N]`` integer tensor of domain labels in ``[0, num_domains)``.
        num_experts: the number of experts ``E``.
        num_domains: the number of domains ``D``; default ``max(domains) + 1``.

    With ``P`` the empirical distributions over the ``N`` tokens and ``TV(p, q) = 1/2 sum_e |p_e - q_e|``:

    * ``per_domain_raw[d] = TV(P(e | d), P(e))``, against the pooled expert marginal;
    * ``per_domain_given_tokens[d] = TV(P(e | d), Q(e | d))`` with ``Q`` from :func:`domain_distributions`.
      It is exactly 0 (in exact arithmetic; here up to float64 rounding) when the expert is a function of the
      token.
    * ``raw`` and ``given_tokens``: the means of the per-domain lists over the domains that have tokens.

    The lists are in label order ``0 .. D - 1``, with ``None`` for a label that has no tokens. Returns a dict
    of floats and lists of floats.
    """
    p_e_given_d, q_e_given_d, c_de = domain_distributions(experts, tokens, domains, num_experts,
                                                          num_domains=num_domains)
    present = c_de.sum(1) > 0
    p_e = c_de.sum(0) / c_de.sum()
    raw = 0.5 * (p_e_given_d - p_e).abs().sum(1)
    given = 0.5 * (p_e_given_d - q_e_given_d).abs().sum(1)
    per_raw = [float(v) if ok else None for v, ok in zip(raw, present)]
    per_given = [float(v) if ok else None for v, ok in zip(given, present)]
    return {
        "raw": float(raw[present].mean()),
        "given_tokens": float(given[present].mean()),
        "per_domain_raw": per_raw,
        "per_domain_given_tokens": per_given,
    }


# --- two routings -------------------------------------------------------------------------------------------

def agreement(a, b) -> float:
    """The fraction of positions where two routings pick the same expert.

    Args:
        a, b: integer tensors of expert ids of the same (any) shape, e.g. ``[S, T]`` first choices of a
            checkpoint and of the final model on the same probe tokens.
    """
    a = _ids("a", a)
    b = _ids("b", b)
    _same_shape("b", b, "a", a)
    return float((a == b).double().mean())

"""Tests of moe_ref.specialization against hand-computed cases, pure-Python references and known regimes.

The references below use dicts, tuples and Python floats (float64), never the module's helpers. Where a
reference needs the fit/test split it re-derives it from the recipe the docstring of ``lookup_accuracy``
documents (``torch.randperm`` with a generator seeded with ``seed``, the first ``int(fit_fraction * N)`` tokens
fit), so a change of that recipe fails here too.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch

from moe_ref.specialization import (agreement, domain_specialization, identity_vs_context, lookup_accuracy,
                                    repeat_rate)

torch.set_num_threads(1)


# --- references ---------------------------------------------------------------------------------------------

def split_ref(n, fit_fraction, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_fit = min(max(int(fit_fraction * n), 1), n - 1)
    return perm[:n_fit], perm[n_fit:]


def majority_ref(values):
    """Most frequent value, ties to the smallest."""
    c = Counter(values)
    best = max(c.values())
    return min(v for v, k in c.items() if k == best)


def lookup_ref(experts, keys_chain, fit_fraction=0.5, seed=0):
    """Held-out accuracy of a chain of tables (each a list of hashable keys per token), float64 loops."""
    fit, test = split_ref(len(experts), fit_fraction, seed)
    default = majority_ref([experts[i] for i in fit])
    tables = []
    for keys in keys_chain:
        by_key = defaultdict(list)
        for i in fit:
            by_key[keys[i]].append(experts[i])
        tables.append({k: majority_ref(v) for k, v in by_key.items()})
    right = 0
    for i in test:
        pred = default
        for keys, table in zip(keys_chain, tables):
            if keys[i] in table:
                pred = table[keys[i]]
                break
        right += pred == experts[i]
    return right / len(test)


def tv(p, q, support):
    return 0.5 * sum(abs(p.get(e, 0.0) - q.get(e, 0.0)) for e in support)


def domain_ref(experts, tokens, domains, num_experts):
    n = len(experts)
    p_e = {e: c / n for e, c in Counter(experts).items()}
    by_tok = defaultdict(Counter)
    for e, b in zip(experts, tokens):
        by_tok[b][e] += 1
    p_e_b = {b: {e: c / sum(cnt.values()) for e, c in cnt.items()} for b, cnt in by_tok.items()}
    raws, givens = [], []
    for d in range(max(domains) + 1):
        idx = [i for i in range(n) if domains[i] == d]
        if not idx:
            raws.append(None)
            givens.append(None)
            continue
        p_e_d = {e: c / len(idx) for e, c in Counter(experts[i] for i in idx).items()}
        p_b_d = {b: c / len(idx) for b, c in Counter(tokens[i] for i in idx).items()}
        q = defaultdict(float)
        for b, pb in p_b_d.items():
            for e, pe in p_e_b[b].items():
                q[e] += pb * pe
        raws.append(tv(p_e_d, p_e, range(num_experts)))
        givens.append(tv(p_e_d, q, range(num_experts)))
    return raws, givens


# --- lookup_accuracy ----------------------------------------------------------------------------------------

def test_lookup_hand_case_on_documented_split():
    # Place the data on the documented split so the answer is known by hand: fit = perm[:3], test = perm[3:].
    fit, test = split_ref(6, 0.5, seed=3)
    experts, keys = [0] * 6, [0] * 6
    # fit: key 7 -> experts 2 and 1 (a tie: the table says 1); key 9 -> expert 2. Majority of the fit part: 2.
    for i, (k, e) in zip(fit, [(7, 2), (7, 1), (9, 2)]):
        keys[i], experts[i] = k, e
    # test: key 7 expert 1 (right), key 7 expert 2 (wrong), key 8 unseen -> majority 2, expert 2 (right).
    for i, (k, e) in zip(test, [(7, 1), (7, 2), (8, 2)]):
        keys[i], experts[i] = k, e
    assert lookup_accuracy(torch.tensor(experts), torch.tensor(keys), seed=3) == pytest.approx(2 / 3, abs=1e-15)
    # A backoff feature: key 5 on fit[1] (expert 1) and on the unseen test token, key 0 elsewhere. The backoff
    # table says 5 -> 1, so that token is now predicted 1: wrong.
    back = [0] * 6
    back[fit[1]] = back[test[2]] = 5
    assert lookup_accuracy(torch.tensor(experts), torch.tensor(keys), seed=3,
                           backoff=torch.tensor(back)) == pytest.approx(1 / 3, abs=1e-15)
    # Its backoff key unseen in the fit part too (6): back to the majority expert 2, right again.
    back[test[2]] = 6
    assert lookup_accuracy(torch.tensor(experts), torch.tensor(keys), seed=3,
                           backoff=torch.tensor(back)) == pytest.approx(2 / 3, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fit_fraction", [0.3, 0.5, 0.8])
def test_lookup_matches_python_reference(seed, fit_fraction):
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(2, 80, (1,), generator=g))
    experts = torch.randint(0, 4, (n,), generator=g)
    keys = torch.randint(0, 12, (n,), generator=g)
    back = keys // 4
    e, k, b = experts.tolist(), keys.tolist(), back.tolist()
    dtype = [torch.int64, torch.int32, torch.int16, torch.uint8][seed % 4]
    got = lookup_accuracy(experts.to(dtype), keys.to(dtype), fit_fraction=fit_fraction, seed=seed)
    assert got == pytest.approx(lookup_ref(e, [k], fit_fraction, seed), abs=1e-15)
    got = lookup_accuracy(experts, keys, fit_fraction=fit_fraction, seed=seed, backoff=back)
    assert got == pytest.approx(lookup_ref(e, [k, b], fit_fraction, seed), abs=1e-15)


def test_lookup_accepts_lists():
    assert lookup_accuracy([1, 1, 1, 1], [3, 4, 3, 4]) == 1.0


# --- identity_vs_context ------------------------------------------------------------------------------------

def test_routing_by_byte_is_explained_by_the_byte():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (64, 256), generator=g)
    experts = tokens % 8
    out = identity_vs_context(experts, tokens)
    assert out["token"] == 1.0
    assert out["bigram"] == 1.0  # most pairs are unseen: the back-off to the byte table is exercised
    assert abs(out["chance"] - 1 / 8) < 0.02


def test_bigram_beats_token_when_routing_depends_on_the_previous_byte():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (400, 50), generator=g)
    prev = torch.cat([torch.zeros(400, 1, dtype=torch.long), tokens[:, :-1]], dim=1)
    experts = (prev + tokens) % 8
    out = identity_vs_context(experts, tokens, seed=2)
    # 16 * 16 pair keys and 16 (start, byte) keys from the 400 first positions: all seen in the 10k fit tokens
    assert out["bigram"] == 1.0
    assert out["token"] < 0.2 and abs(out["chance"] - 1 / 8) < 0.03


@pytest.mark.parametrize("seed", range(4))
def test_identity_vs_context_matches_python_reference(seed):
    g = torch.Generator().manual_seed(200 + seed)
    S, T = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
    tokens = torch.randint(0, 5, (S, T), generator=g)
    experts = (tokens + torch.randint(0, 2, (S, T), generator=g)) % 3
    e = experts.reshape(-1).tolist()
    tok = tokens.tolist()
    byte = [b for row in tok for b in row]
    pair = [(row[t - 1] if t else "start", row[t]) for row in tok for t in range(T)]
    out = identity_vs_context(experts, tokens, seed=seed)
    assert out["chance"] == pytest.approx(lookup_ref(e, [], 0.5, seed), abs=1e-15)
    assert out["token"] == pytest.approx(lookup_ref(e, [byte], 0.5, seed), abs=1e-15)
    assert out["bigram"] == pytest.approx(lookup_ref(e, [pair, byte], 0.5, seed), abs=1e-15)


def test_random_routing_is_at_chance():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (100, 500), generator=g)
    experts = torch.randint(0, 8, (100, 500), generator=g)
    out = identity_vs_context(experts, tokens)
    assert abs(out["chance"] - 1 / 8) < 0.03
    assert abs(out["token"] - 1 / 8) < 0.03
    assert abs(out["bigram"] - 1 / 8) < 0.03
    rr = repeat_rate(experts, tokens=tokens)
    assert abs(rr["chance"] - 1 / 8) < 0.005
    assert abs(rr["rate"] - rr["chance"]) < 0.01
    assert abs(rr["rate_different_tokens"] - rr["chance_different_tokens"]) < 0.01
    domains = torch.arange(100).repeat_interleave(500) % 4
    dom = domain_specialization(experts.reshape(-1), tokens.reshape(-1), domains, 8)
    assert dom["raw"] < 0.05 and dom["given_tokens"] < 0.05


# --- repeat_rate --------------------------------------------------------------------------------------------

def test_repeat_rate_hand_case():
    experts = torch.tensor([[0, 0, 1, 1], [2, 0, 0, 0]])
    tokens = torch.tensor([[5, 5, 6, 7], [1, 2, 2, 3]])
    out = repeat_rate(experts, tokens=tokens)
    assert out["rate"] == pytest.approx(4 / 6, abs=1e-15)      # same: (0,0) (1,1) | (0,0) (0,0)
    assert out["chance"] == pytest.approx(30 / 64, abs=1e-15)  # shares 5/8, 2/8, 1/8
    # pairs with different tokens: (5,6)->(0,1) (6,7)->(1,1) | (1,2)->(2,0) (2,3)->(0,0): 2 of 4 equal;
    # their 8 endpoints have experts 0,1,1,1,2,0,0,0: shares 4/8, 3/8, 1/8.
    assert out["rate_different_tokens"] == pytest.approx(0.5, abs=1e-15)
    assert out["chance_different_tokens"] == pytest.approx(26 / 64, abs=1e-15)
    assert set(repeat_rate(experts)) == {"rate", "chance"}


def test_repeat_rate_without_pairs_of_different_tokens():
    out = repeat_rate(torch.tensor([[1, 2, 2]]), tokens=torch.tensor([[9, 9, 9]]))
    assert out["rate"] == pytest.approx(0.5) and out["chance"] == pytest.approx(5 / 9)
    assert out["rate_different_tokens"] is None and out["chance_different_tokens"] is None


def test_repeat_rate_sees_sticky_routing():
    g = torch.Generator().manual_seed(3)
    experts = torch.randint(0, 8, (50, 1), generator=g).repeat(1, 40)  # each sequence on one expert
    out = repeat_rate(experts)
    assert out["rate"] == 1.0 and out["chance"] < 0.3


# --- domain_specialization ----------------------------------------------------------------------------------

def test_domains_explained_by_their_bytes():
    g = torch.Generator().manual_seed(4)
    n = 20_000
    domains = torch.randint(0, 3, (n,), generator=g)
    # domain 0 uses bytes 0..127, domain 1 bytes 64..191, domain 2 all bytes; the expert is byte // 32
    lo = torch.tensor([0, 64, 0])[domains]
    width = torch.tensor([128, 128, 256])[domains]
    tokens = lo + (torch.rand(n, generator=g) * width).long()
    experts = tokens // 32
    out = domain_specialization(experts, tokens, domains, 8)
    assert out["raw"] > 0.2
    assert abs(out["given_tokens"]) < 1e-12
    assert all(abs(v) < 1e-12 for v in out["per_domain_given_tokens"])
    assert all(v > 0.1 for v in out["per_domain_raw"])


@pytest.mark.parametrize("seed", range(5))
def test_domain_matches_python_reference(seed):
    g = torch.Generator().manual_seed(300 + seed)
    n = int(torch.randint(1, 60, (1,), generator=g))
    experts = torch.randint(0, 5, (n,), generator=g)
    tokens = torch.randint(0, 7, (n,), generator=g) * 11  # sparse ids
    domains = torch.randint(0, 4, (n,), generator=g)
    raws, givens = domain_ref(experts.tolist(), tokens.tolist(), domains.tolist(), 6)
    out = domain_specialization(experts.int(), tokens, domains, 6)
    assert len(out["per_domain_raw"]) == len(raws)
    for got, ref in [(out["per_domain_raw"], raws), (out["per_domain_given_tokens"], givens)]:
        for a, b in zip(got, ref):
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-12)
    present = [r for r in raws if r is not None]
    assert out["raw"] == pytest.approx(sum(present) / len(present), abs=1e-12)
    present = [r for r in givens if r is not None]
    assert out["given_tokens"] == pytest.approx(sum(present) / len(present), abs=1e-12)


def test_domain_empty_label_and_num_domains():
    out = domain_specialization([0, 1, 1], [3, 3, 4], [0, 0, 2], 2, num_domains=4)
    assert out["per_domain_raw"][1] is None and out["per_domain_raw"][3] is None
    # P(e) = (1/3, 2/3); domain 0: (1/2, 1/2) -> TV 1/6; domain 2: (0, 1) -> TV 1/3
    assert out["per_domain_raw"][0] == pytest.approx(1 / 6) and out["per_domain_raw"][2] == pytest.approx(1 / 3)
    assert out["raw"] == pytest.approx(0.25)
    # byte 3 -> (1/2, 1/2), byte 4 -> (0, 1): domain 0 uses byte 3 only, domain 2 byte 4 only: both 0
    assert out["given_tokens"] == pytest.approx(0.0, abs=1e-15)


# --- agreement ----------------------------------------------------------------------------------------------

def test_agreement_hand_case():
    a = torch.tensor([[0, 1, 2], [3, 3, 1]])
    b = torch.tensor([[0, 2, 2], [3, 0, 0]], dtype=torch.int32)
    assert agreement(a, b) == pytest.approx(3 / 6, abs=1e-15)
    assert agreement(a, a) == 1.0


# --- bad input ----------------------------------------------------------------------------------------------

e4 = torch.tensor([0, 1, 2, 3])
m24 = torch.tensor([[0, 1, 2, 3], [1, 1, 0, 0]])
BAD = {
    "experts float": (lambda: lookup_accuracy(e4.float(), e4), TypeError, "experts must be an integer"),
    "experts bool": (lambda: agreement(e4 > 1, e4 > 1), TypeError, "a must be an integer"),
    "experts not a tensor": (lambda: lookup_accuracy("abc", e4), TypeError, "experts must be an integer"),
    "features shape": (lambda: lookup_accuracy(e4, e4[:3]), ValueError, "features must have the same shape"),
    "features 2-d": (lambda: lookup_accuracy(e4, e4.reshape(2, 2)), ValueError, "features must be a 1-d"),
    "features negative": (lambda: lookup_accuracy(e4, e4 - 1), ValueError, "features must hold non-negative"),
    "backoff shape": (lambda: lookup_accuracy(e4, e4, backoff=e4[:2]), ValueError, "backoff must have the same"),
    "fit_fraction 1": (lambda: lookup_accuracy(e4, e4, fit_fraction=1.0), ValueError, "fit_fraction must be in"),
    "fit_fraction 0": (lambda: lookup_accuracy(e4, e4, fit_fraction=0), ValueError, "fit_fraction must be in"),
    "fit_fraction str": (lambda: lookup_accuracy(e4, e4, fit_fraction="a"), TypeError, "fit_fraction must be"),
    "seed negative": (lambda: lookup_accuracy(e4, e4, seed=-1), ValueError, "seed must be >= 0"),
    "one token": (lambda: lookup_accuracy(e4[:1], e4[:1]), ValueError, "experts must hold at least 2"),
    "empty experts": (lambda: lookup_accuracy([], []), ValueError, "experts must not be empty"),
    "identity 1-d": (lambda: identity_vs_context(e4, e4), ValueError, "experts must be a 2-d"),
    "identity tokens shape": (lambda: identity_vs_context(m24, m24[:, :3]), ValueError, "tokens must have the"),
    "repeat T=1": (lambda: repeat_rate(m24[:, :1]), ValueError, "experts must have at least 2 positions"),
    "repeat tokens float": (lambda: repeat_rate(m24, tokens=m24.double()), TypeError, "tokens must be an integer"),
    "repeat tokens shape": (lambda: repeat_rate(m24, tokens=m24.t()), ValueError, "tokens must have the same"),
    "domain expert id": (lambda: domain_specialization(e4, e4, e4, 3), ValueError, "experts must hold ids in"),
    "domain num_experts": (lambda: domain_specialization(e4, e4, e4, 0), ValueError, "num_experts must be >= 1"),
    "domain num_domains": (lambda: domain_specialization(e4, e4, e4, 4, num_domains=2), ValueError,
                           "domains must hold labels in"),
    "domain shape": (lambda: domain_specialization(e4, e4, e4[:3], 4), ValueError, "domains must have the same"),
    "domain negative": (lambda: domain_specialization(e4, e4, e4 - 2, 4), ValueError, "domains must hold non-neg"),
    "agreement shape": (lambda: agreement(m24, e4), ValueError, "b must have the same shape as a"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    fn, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern):
        fn()

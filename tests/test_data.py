import pytest
import torch

from moe_ref.book import DOMAINS, build_corpus, decode, encode
from moe_ref.book.data import arithmetic_text


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(bytes_per_domain=50_000)


def test_deterministic(corpus):
    again = build_corpus(bytes_per_domain=50_000)
    for d in DOMAINS:
        assert torch.equal(corpus.train[d], again.train[d]) and torch.equal(corpus.val[d], again.val[d])
    other_seed = build_corpus(bytes_per_domain=50_000, seed=1)
    assert not torch.equal(corpus.train["arithmetic"], other_seed.train["arithmetic"])


def test_split_sizes_and_disjoint(corpus):
    for d in DOMAINS:
        assert len(corpus.train[d]) == 45_000 and len(corpus.val[d]) == 5_000
        assert corpus.train[d].dtype == torch.uint8


def test_domains_look_like_their_source(corpus):
    english = decode(corpus.train["english"][:5000])
    python = decode(corpus.train["python"][:20000])
    arith = decode(corpus.train["arithmetic"][:2000])
    assert "statement" in english and "def " not in english[:500]
    assert "def " in python and "import " in python
    assert set(arith) <= set("0123456789+-*=\n")


def test_arithmetic_lines_are_correct():
    for line in arithmetic_text(2000, seed=3).splitlines():
        lhs, rhs = line.split("=")
        assert eval(lhs) == int(rhs)  # noqa: S307 (digits and one operator, checked above)


def test_batch_labels_match_source(corpus):
    g = torch.Generator().manual_seed(0)
    x, y, labels = corpus.get_batch("train", 64, 32, g)
    assert x.shape == y.shape == (64, 32) and labels.shape == (64,)
    assert x.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2}
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    for row, label in zip(x, labels):
        source = corpus.train[DOMAINS[label]]
        # the window must occur in its labelled domain
        windows = source.unfold(0, 32, 1)
        assert (windows == row.to(torch.uint8)).all(dim=1).any()


def test_batch_reproducible_and_domain_filter(corpus):
    a = corpus.get_batch("val", 8, 16, torch.Generator().manual_seed(5))
    b = corpus.get_batch("val", 8, 16, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    _, _, labels = corpus.get_batch("val", 8, 16, domain="python")
    assert labels.tolist() == [1] * 8


def test_encode_decode_roundtrip():
    text = "héllo = 1\n"
    assert decode(encode(text)) == text


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="split"):
        corpus.get_batch("test", 4, 8)
    with pytest.raises(ValueError, match="domain"):
        corpus.get_batch("train", 4, 8, domain="french")
    with pytest.raises(ValueError, match="block_size"):
        corpus.get_batch("val", 4, 10_000)
    with pytest.raises(ValueError, match="bytes_per_domain"):
        build_corpus(bytes_per_domain=10**9)
    with pytest.raises(ValueError, match="val_fraction"):
        build_corpus(bytes_per_domain=5000, val_fraction=1.0)

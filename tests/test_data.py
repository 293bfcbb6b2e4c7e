import gzip
import hashlib
import importlib.util
import json
import math
import platform
import shutil
from pathlib import Path

import pytest
import torch

from dsv3lib.data import (
    CORPUS_DIR,
    DOMAINS,
    SPLITS,
    ByteTokenizer,
    batches,
    bits_per_byte,
    eval_batches,
    load_corpus,
    read_documents,
    unigram_entropy,
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def _freq(t: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(t, minlength=256).double()
    return counts / counts.sum()


def test_load_is_deterministic(corpus):
    load_corpus.cache_clear()
    again = load_corpus()
    assert again is not corpus
    for s in SPLITS:
        assert torch.equal(again.tokens[s], corpus.tokens[s])
        for d in DOMAINS:
            assert torch.equal(again.domain_tokens[s][d], corpus.domain_tokens[s][d])
    assert again.doc_names == corpus.doc_names and again.n_bytes == corpus.n_bytes


def test_split_is_disjoint_and_val_has_both_domains(corpus):
    for d in DOMAINS:
        train, val = set(corpus.doc_names["train"][d]), set(corpus.doc_names["val"][d])
        assert train and val and not train & val
        share = corpus.n_bytes["val"][d] / (corpus.n_bytes["val"][d] + corpus.n_bytes["train"][d])
        assert 0.07 < share <= 0.10
    for d, docs in read_documents().items():
        assert set(corpus.doc_names["train"][d]) | set(corpus.doc_names["val"][d]) == set(docs)


def test_tensors_are_long_and_consistent(corpus):
    for s in SPLITS:
        t = corpus.tokens[s]
        assert t.dtype == torch.long and t.dim() == 1
        assert int(t.min()) >= 0 and int(t.max()) < ByteTokenizer.vocab_size
        # the combined tensor holds exactly the domain tensors' tokens, reordered by document
        parts = [corpus.domain_tokens[s][d] for d in DOMAINS]
        assert len(t) == sum(map(len, parts))
        assert torch.equal(torch.bincount(t, minlength=256), sum(torch.bincount(p, minlength=256) for p in parts))


def test_combined_split_interleaves_domains(corpus):
    t = corpus.train
    quarter = len(t) // 4
    code_chars = torch.tensor([ord("#")])
    for i in range(4):
        piece = t[i * quarter:(i + 1) * quarter]
        # every quarter holds code (comments) and prose documents
        assert torch.isin(piece, code_chars).sum() > 100
        assert (piece == ByteTokenizer.eot_id).sum() >= 2


def test_eot_separates_documents_and_never_occurs_inside(corpus):
    topics = read_documents()["prose"]
    tok = ByteTokenizer()
    t = corpus.domain_tokens["val"]["prose"]
    names = corpus.doc_names["val"]["prose"]
    assert int((t == tok.eot_id).sum()) == len(names)
    assert int(t[-1]) == tok.eot_id
    bounds = (t == tok.eot_id).nonzero().flatten().tolist()
    starts = [0] + [b + 1 for b in bounds[:-1]]
    for name, a, b in zip(names, starts, bounds):
        assert tok.decode(t[a:b]) == topics[name]


def test_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "naïve café — “quotes” ß 東京 🐍\n\ttab"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not raised


def test_tokenizer_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="256"):
        tok.decode([65, 256])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="NUL"):
        tok.encode("a\0b")


def test_batches_shapes_shift_and_determinism(corpus):
    t = corpus.val
    x, y = next(batches(t, 4, 32, seed=1))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    a = [b for _, b in zip(range(3), batches(t, 4, 32, seed=1))]
    b = [b for _, b in zip(range(3), batches(t, 4, 32, seed=1))]
    c = [b for _, b in zip(range(3), batches(t, 4, 32, seed=2))]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_batches_windows_come_from_the_tensor():
    t = torch.arange(100)
    x, y = next(batches(t, 8, 10, seed=0))
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 9, dtype=torch.long))
    assert torch.equal(y, x + 1) and int(y.max()) <= 99
    x, y = next(batches(t, 2, 99))  # the one window that fits
    assert torch.equal(x[0], t[:-1]) and torch.equal(y[0], t[1:])


def test_eval_batches_cover_without_overlap():
    t = torch.arange(1003)
    got = list(eval_batches(t, 4, 10))
    xs = torch.cat([x for x, _ in got])
    ys = torch.cat([y for _, y in got])
    assert xs.shape == ys.shape == (100, 10)  # (1003 - 1) // 10 windows; 2 tokens dropped
    assert [len(x) for x, _ in got] == [4] * 25
    assert torch.equal(ys.flatten(), t[1:1001])  # every target once, in order
    assert torch.equal(xs.flatten(), t[:1000])
    assert len(list(eval_batches(t, 3, 10))[-1][0]) == 1  # 100 = 33 * 3 + 1
    assert len(list(eval_batches(t, 4, 10, max_batches=2))) == 2
    # deterministic
    assert all(torch.equal(p[0], q[0]) for p, q in zip(got, eval_batches(t, 4, 10)))


@pytest.mark.parametrize("fn", [batches, eval_batches])
def test_bad_arguments_name_the_argument(fn):
    t = torch.arange(50)
    fn(t, 2, 49)  # the largest window that fits
    # errors come at the call, before the first batch is asked for
    with pytest.raises(ValueError, match="seq_len"):
        fn(t, 2, 50)
    with pytest.raises(ValueError, match="seq_len"):
        fn(t, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        fn(t, 0, 8)
    with pytest.raises(ValueError, match="tokens"):
        fn(t.view(5, 10), 2, 4)


def test_eval_batches_bad_max_batches():
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(torch.arange(50), 2, 4, max_batches=0)


def _manifest(root: Path = CORPUS_DIR) -> dict:
    return json.loads((root / "manifest.json").read_text(encoding="utf-8"))


def test_shipped_files_match_their_manifest():
    m = _manifest()
    assert sorted(e["domain"] for e in m["files"].values()) == sorted(DOMAINS)
    docs = read_documents()
    for name, e in m["files"].items():
        blob = (CORPUS_DIR / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == e["sha256"] and len(blob) == e["bytes"]
        text = gzip.decompress(blob)
        assert hashlib.sha256(text).hexdigest() == e["text_sha256"] and len(text) == e["text_bytes"]
        assert len(docs[e["domain"]]) == e["documents"]
    assert (CORPUS_DIR / "NOTICE").read_text().count("Python Software Foundation") >= 1


def test_corpus_is_the_one_the_book_quotes(corpus):
    # fixed bytes whatever Python runs this: the counts chapter 0 prints
    assert [len(corpus.tokens[s]) for s in SPLITS] == [843_881, 92_435]
    assert corpus.n_bytes["train"] == {"prose": 419_621, "code": 424_179}


def test_corrupted_or_missing_file_is_named(tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, root)
    assert read_documents(root) == read_documents()
    blob = bytearray((root / "code.json.gz").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (root / "code.json.gz").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"code\.json\.gz does not match its SHA-256"):
        read_documents(root)
    (root / "code.json.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"code\.json\.gz is missing"):
        read_documents(root)
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        read_documents(root)


def _build_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(_manifest()["built_with"] != f"{platform.python_implementation()} {platform.python_version()}",
                    reason="the interpreter's text differs from the one the corpus was built with")
def test_build_script_reproduces_the_shipped_text():
    _, manifest = _build_script().build()
    for name, e in manifest["files"].items():
        assert e["text_sha256"] == _manifest()["files"][name]["text_sha256"]


def test_unigram_entropy():
    uniform = torch.arange(256).repeat(10)
    assert unigram_entropy(uniform) == pytest.approx(math.log(256))
    assert unigram_entropy(torch.full((100,), 7)) == 0.0
    assert unigram_entropy(torch.tensor([1, 2])) == pytest.approx(math.log(2))
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="tokens"):
        unigram_entropy(torch.tensor([], dtype=torch.long))


def test_corpus_entropy_is_text_like(corpus):
    h = unigram_entropy(corpus.train)
    assert 2.5 < h < 4.0  # English/code bytes: ~4.6 bits, far below the 8 of random bytes


def test_domains_have_different_byte_distributions(corpus):
    prose = _freq(corpus.domain_tokens["train"]["prose"])
    code = _freq(corpus.domain_tokens["train"]["code"])
    assert code[ord("#")] > 10 * prose[ord("#")]
    assert code[ord("(")] > 1.5 * prose[ord("(")]
    # the domains differ more from each other than each domain's train differs from its val
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())
    for d, f in (("prose", prose), ("code", code)):
        assert tv(prose, code) > 1.5 * tv(f, _freq(corpus.domain_tokens["val"][d]))


def test_describe_lists_each_domain(corpus):
    text = corpus.describe()
    assert len(text.splitlines()) == len(DOMAINS) + 1
    for d in DOMAINS:
        assert d in text
    assert "Corpus(" in repr(corpus)

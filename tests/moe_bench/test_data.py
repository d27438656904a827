"""Byte corpora: the embedded split, labelled windows, user files and their errors."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
import torch

from moe_bench import data
from moe_bench.data import DOMAINS, DataConfig


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.load(DataConfig())


def domain_text(corpus: data.Corpus, split: str, domain: int) -> bytes:
    start, end = corpus.split(split).bounds[domain]
    return bytes(corpus.split(split).data_N[start:end].tolist())


@pytest.mark.slow  # measures real time: one process, nothing else running beside it
def test_embedded_loads_fast():
    start = time.perf_counter()
    data.load(DataConfig())
    assert time.perf_counter() - start < 2.0


def test_split_is_deterministic_and_disjoint_by_document(corpus):
    again = data.load(DataConfig())
    for split in data.SPLITS:
        assert again.split(split).documents == corpus.split(split).documents
        assert torch.equal(again.split(split).data_N, corpus.split(split).data_N)
    train, val = (set(corpus.split(s).documents) for s in data.SPLITS)
    assert train and val and not train & val


@pytest.mark.parametrize("domain", range(len(DOMAINS)))
def test_both_domains_in_both_splits_in_the_asked_fraction(corpus, domain):
    prefix = ("pydoc:", "stdlib:")[domain]
    n_train, n_val = (
        sum(name.startswith(prefix) for name in corpus.split(s).documents) for s in data.SPLITS
    )
    assert n_val == round(0.1 * (n_train + n_val)) >= 1
    for split in data.SPLITS:
        assert corpus.split(split).domain_bytes()[DOMAINS[domain]] > 10_000


def test_embedded_code_is_stdlib_source_and_prose_is_pydoc(corpus):
    prose, code = (domain_text(corpus, "train", d) for d in range(2))
    assert b"def " in code and b"import " in code
    assert b"statement" in prose
    names = corpus.split("train").documents + corpus.split("val").documents
    assert not [n for n in names if "/test/" in n or n.startswith("stdlib:pydoc_data")]


def test_max_bytes_caps_each_domain():
    small = data.load(DataConfig(max_bytes=50_000))
    for d in DOMAINS:
        total = sum(small.split(s).domain_bytes()[d] for s in data.SPLITS)
        n_docs = sum(
            n.startswith(("pydoc:", "stdlib:")[DOMAINS.index(d)])
            for s in data.SPLITS
            for n in small.split(s).documents
        )
        assert total == 50_000 + n_docs  # the budget, plus one end-of-document byte each


def test_training_windows_are_shifted_and_inside_their_domain(corpus):
    g = torch.Generator().manual_seed(0)
    idx_BS, targets_BS, domain_B = next(corpus.batches("train", 32, 64, g))
    assert idx_BS.shape == targets_BS.shape == (32, 64) and domain_B.shape == (32,)
    assert idx_BS.dtype == targets_BS.dtype == torch.long
    assert torch.equal(idx_BS[:, 1:], targets_BS[:, :-1])
    assert set(domain_B.tolist()) == {0, 1}  # mixed domains in one batch
    texts = [domain_text(corpus, "train", d) for d in range(2)]
    for idx_S, target_S, d in zip(idx_BS, targets_BS, domain_B.tolist()):
        window = bytes(idx_S.tolist() + target_S[-1:].tolist())
        assert window in texts[d]


def test_training_windows_use_every_valid_start_and_no_other(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(65, 115)))  # 50 distinct bytes
    corpus = data.load(DataConfig(source="path", path=str(tmp_path / "a.txt")))
    train_N = corpus.split("train").data_N  # 45 bytes and the end mark: 46 = S + 6
    idx_BS, targets_BS, _ = next(corpus.batches("train", 200, 40, torch.Generator()))
    starts = {int((train_N == first).nonzero()) for first in idx_BS[:, 0]}
    assert starts == set(range(6))  # starts 0..5: the last window ends on the end mark
    assert torch.equal(targets_BS[:, -1], train_N[idx_BS[:, 0].long() - 65 + 40])


def test_batches_follow_the_generator(corpus):
    def first_two(seed: int) -> list[torch.Tensor]:
        it = corpus.batches("train", 4, 16, torch.Generator().manual_seed(seed))
        return [next(it)[0] for _ in range(2)]

    a, b, c = first_two(1), first_two(1), first_two(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])


def test_val_windows_are_fixed_labelled_and_capped(corpus):
    idx_NS, targets_NS, domain_N = corpus.val_windows(128, 300)
    again = corpus.val_windows(128, 300)
    assert all(torch.equal(x, y) for x, y in zip((idx_NS, targets_NS, domain_N), again))
    assert idx_NS.shape == (300, 128) and domain_N.shape == (300,)
    assert torch.equal(idx_NS[:, 1:], targets_NS[:, :-1])
    assert set(domain_N.tolist()) == {0, 1}
    texts = [domain_text(corpus, "val", d) for d in range(2)]
    for idx_S, target_S, d in zip(idx_NS, targets_NS, domain_N.tolist()):
        assert bytes(idx_S.tolist() + target_S[-1:].tolist()) in texts[d]
    # domains keep their share of bytes
    share = (domain_N == 1).float().mean().item()
    val_bytes = corpus.split("val").domain_bytes()
    assert share == pytest.approx(val_bytes["code"] / sum(val_bytes.values()), abs=0.02)


def test_val_windows_tile_without_overlap_when_uncapped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 1000 + b"y" * 1000)
    corpus = data.load(DataConfig(source="path", path=str(tmp_path / "a.txt")))
    idx_NS, _, _ = corpus.val_windows(50, 10_000)
    val_bytes = corpus.split("val").domain_bytes()["prose"]  # 200 text bytes + 1 end mark
    assert len(idx_NS) == math.ceil((val_bytes - 50) / 50)


def test_unigram_entropy_of_the_embedded_corpus(corpus):
    for split in data.SPLITS:
        h = corpus.unigram_entropy(split)
        assert 4.0 < h.bits < 6.0
        assert h.nats == pytest.approx(h.bits * math.log(2))


def test_unigram_entropy_by_hand(tmp_path):
    (tmp_path / "ab.txt").write_bytes(b"ab" * 50)
    corpus = data.load(DataConfig(source="path", path=str(tmp_path / "ab.txt")))
    # one document: its last 10% (10 bytes) is validation; train = 45 a, 45 b, 1 end mark
    p = torch.tensor([45, 45, 1], dtype=torch.float64) / 91
    assert corpus.unigram_entropy("train").nats == pytest.approx(float(-(p * p.log()).sum()))


def test_user_folder_recursive_labelled_by_suffix(tmp_path):
    (tmp_path / "notes.md").write_text("# notes\n" + "some prose here. " * 30)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("def f(x):\n    return x\n" * 30)
    (tmp_path / "pkg" / "util.py").write_text("import os\n" * 60)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))  # not text: skipped
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 50)  # hidden: skipped
    corpus = data.load(DataConfig(source="path", path=str(tmp_path)))
    names = set(corpus.split("train").documents + corpus.split("val").documents)
    assert names == {"notes.md", "notes.md#val", "pkg/mod.py", "pkg/util.py"}
    assert "#" in corpus.split("val").documents[0]  # the single prose file, split by bytes
    code = domain_text(corpus, "train", 1) + domain_text(corpus, "val", 1)
    assert b"def f(x)" in code and b"import os" in code
    for split in data.SPLITS:
        assert all(n > 0 for n in corpus.split(split).domain_bytes().values())


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "does not exist"),
        ("empty_file", "is empty"),
        ("binary_file", "is not UTF-8 text"),
        ("empty_folder", r"holds no non-empty UTF-8 text file \(0 files, 0 not UTF-8 text\)"),
    ],
)
def test_user_path_errors(tmp_path, kind, problem):
    path = tmp_path / kind
    if kind == "empty_folder":
        path.mkdir()
    elif kind != "missing":
        path.write_bytes({"empty_file": b"", "binary_file": b"\xff\xfe\x00x"}[kind])
    with pytest.raises(ValueError, match=rf"data.path='{re.escape(str(path))}' {problem}"):
        data.load(DataConfig(source="path", path=str(path)))


def test_folder_of_binaries_names_what_was_skipped(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\(2 files, 1 not UTF-8 text\)"):
        data.load(DataConfig(source="path", path=str(tmp_path)))


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello")

    def denied(path: Path, limit: int) -> bytes:
        raise PermissionError(13, "Permission denied")

    # running as root ignores file modes, so the refusal is faked at the read itself
    monkeypatch.setattr(data, "read_text", denied)
    with pytest.raises(ValueError, match=r"data.path='.*': cannot read .*a.txt: Permission denied"):
        data.load(DataConfig(source="path", path=str(tmp_path)))


def test_text_too_short_for_the_window(tmp_path):
    (tmp_path / "a.txt").write_text("short text")
    corpus = data.load(DataConfig(source="path", path=str(tmp_path / "a.txt")))
    with pytest.raises(ValueError, match=r"the val split of data.path=.* has no domain longer"):
        corpus.val_windows(64, 10)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(source="web"), "source='web' is not one of 'embedded', 'path'"),
        (dict(source="path"), "data.path=None must name a file or folder for source=path"),
        (dict(path="x.txt"), "data.path='x.txt' is set but data.source='embedded'"),
        (dict(val_fraction=0.0), "val_fraction=0.0 must be > 0"),
        (dict(val_fraction=1.0), "val_fraction=1.0 must be < 1"),
        (dict(max_bytes=0), "max_bytes=0 must be >= 1"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields)


def test_argument_errors(corpus):
    with pytest.raises(ValueError, match="split='test' is not one of 'train', 'val'"):
        corpus.unigram_entropy("test")
    with pytest.raises(ValueError, match="seq_len=0 must be >= 1"):
        corpus.val_windows(0, 10)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        corpus.batches("train", 0, 8, torch.Generator())

"""Byte-level text corpora for the convergence task: an embedded default, or the user's files.

Shape legend: B windows in a batch, S window length (seq_len), N bytes of a split.

Embedded default (no download; real text no one here wrote):
- prose: the CPython documentation that ships with Python, `pydoc_data.topics.topics`
  (the text `help("if")` prints); each topic is one document.
- code: the standard library's own `.py` sources under `os.path.dirname(os.__file__)`, minus
  test suites, site-packages, caches and generated files (EXCLUDED_STDLIB_DIRS); each file is
  one document.

User data (`source="path"`): a UTF-8 text file, or every UTF-8 text file under a folder
(recursive; hidden files and folders skipped; files that are not UTF-8 or hold a NUL byte
skipped). A file is labelled `code` when its suffix is in CODE_SUFFIXES, else `prose`, so the
per-domain expert loads mean the same thing for user data as for the embedded corpus.

Rules shared by both sources:
- Documents are taken in a fixed pseudo-random order (crc32 of the name, then the name), so a
  byte budget samples across the whole source instead of its alphabetical start. Each domain
  holds at most `max_bytes`: the document that crosses the budget is cut, later ones dropped.
- Train/validation split by document, per domain: of its n documents, the
  `round(val_fraction * n)` (at least one, never all) of lowest `crc32("split:" + name)` are
  held out. crc32 is fixed by zlib, so the split is the same on every run, machine and Python
  version; the salt makes it independent of the budget order. A domain of one document (say,
  one user file) is split by bytes instead: its last `val_fraction` is held out. So both
  splits hold every domain the corpus has.
- Tokens are UTF-8 bytes (vocabulary 256). Within a split, the documents of one domain lie
  back to back, each followed by byte 0 (NUL, which text never holds) as end-of-document
  mark; windows never cross from one domain into the other, so every window has one domain.
  Training windows start uniformly over all valid starts, so domains mix in proportion to
  their bytes; with the default budget the embedded domains weigh about alike.
"""

from __future__ import annotations

import codecs
import math
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch

from variants.contract.config import check_choice, check_int, check_number

DOMAINS = ("prose", "code")  # a window's domain id indexes this tuple
# fmt: off
CODE_SUFFIXES = frozenset({
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt",
    ".scala", ".js", ".ts", ".jsx", ".tsx", ".rb", ".php", ".pl", ".lua", ".sh", ".bash",
    ".sql", ".r", ".jl", ".swift", ".cs", ".hs", ".ml", ".el", ".lisp", ".clj", ".f90",
})
# fmt: on
# test suites, third-party code, and generated files: pydoc_data/topics.py is the prose domain
# as a dict literal (it would leak prose into code), encodings/ are generated codec tables
EXCLUDED_STDLIB_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data", "encodings"}
)
END_OF_DOCUMENT = 0
SPLITS = ("train", "val")


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded" (CPython docs + stdlib sources) or "path" (yours)
    path: str | None = None  # a text file or folder; required when source == "path"
    val_fraction: float = 0.1  # share of each domain's documents held out for validation
    max_bytes: int = 2**19  # per domain; 512 KiB keeps the embedded domains about equal

    def __post_init__(self) -> None:
        check_choice(self, "source", ("embedded", "path"))
        if self.source == "path" and not self.path:
            raise ValueError(f"data.path={self.path!r} must name a file or folder for source=path")
        if self.source == "embedded" and self.path is not None:
            raise ValueError(
                f"data.path={self.path!r} is set but data.source='embedded'; "
                "set data.source=path to train on it, or drop data.path"
            )
        check_number(self, "val_fraction", positive=True)
        if self.val_fraction >= 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be < 1")
        check_int(self, "max_bytes", 1)


@dataclass(frozen=True)
class Document:
    name: str  # stable: "pydoc:<topic>", "stdlib:<path>", or the path relative to data.path
    domain: str  # one of DOMAINS
    text: bytes  # UTF-8


class Entropy(NamedTuple):
    bits: float  # per byte
    nats: float  # per byte: the unit of the LM's cross-entropy loss


@dataclass(frozen=True)
class Split:
    """One split as a byte tensor: domain d occupies data_N[bounds[d][0]:bounds[d][1]]."""

    data_N: torch.Tensor  # uint8
    bounds: tuple[tuple[int, int], ...]  # per domain id
    documents: tuple[str, ...]  # names, for checks and logs

    def domain_bytes(self) -> dict[str, int]:
        return {d: end - start for d, (start, end) in zip(DOMAINS, self.bounds)}


class Corpus:
    """Train and validation splits, their random training batches and fixed validation set."""

    def __init__(self, documents: list[Document], val_fraction: float, origin: str) -> None:
        train_docs, val_docs = split_documents(documents, val_fraction)
        self.origin = origin  # what to name in errors: the user's path or "the embedded corpus"
        self.splits = {"train": pack(train_docs), "val": pack(val_docs)}

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ValueError(f"split={name!r} is not one of {', '.join(map(repr, SPLITS))}")
        return self.splits[name]

    def _starts(self, split: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per domain: first window start and number of valid starts (window = S + 1 bytes)."""
        check_int(SimpleNamespace(seq_len=seq_len), "seq_len", 1)
        bounds = self.split(split).bounds
        first_D = torch.tensor([start for start, _ in bounds])
        count_D = torch.tensor([max(0, end - start - seq_len) for start, end in bounds])
        if count_D.sum() == 0:
            sizes = ", ".join(f"{d} {n} bytes" for d, n in self.split(split).domain_bytes().items())
            raise ValueError(
                f"the {split} split of {self.origin} ({sizes}) has no domain longer than "
                f"seq_len+1={seq_len + 1} bytes; use a shorter seq_len or more text"
            )
        return first_D, count_D

    def _windows(self, split: str, start_B: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, ...]:
        """(idx_BS, targets_BS) long: bytes [start, start+S) and the next byte of each."""
        data_N = self.split(split).data_N
        span_BS = start_B[:, None] + torch.arange(seq_len + 1)
        window_BS = data_N[span_BS].long()
        return window_BS[:, :-1], window_BS[:, 1:]

    def batches(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Endless random batches (idx_BS, targets_BS, domain_B), on CPU.

        Starts are uniform over every valid window start of the split, so domains mix in
        proportion to their bytes; `generator` alone decides the sequence of batches.
        Arguments are checked here, not at the first batch.
        """
        check_int(SimpleNamespace(batch_size=batch_size), "batch_size", 1)
        first_D, count_D = self._starts(split, seq_len)
        cum_D = count_D.cumsum(0)

        def endless() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            while True:
                u_B = torch.randint(int(cum_D[-1]), (batch_size,), generator=generator)
                domain_B = torch.searchsorted(cum_D, u_B, right=True)
                start_B = first_D[domain_B] + u_B - (cum_D - count_D)[domain_B]
                yield (*self._windows(split, start_B, seq_len), domain_B)

        return endless()

    def val_windows(
        self, seq_len: int, max_windows: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed validation set (idx_NS, targets_NS, domain_N), the same on every call.

        Non-overlapping windows tile each domain of the validation split; when there are more
        than `max_windows`, that many are taken evenly spaced over all of them, so domains keep
        their share of bytes, as in training.
        """
        check_int(SimpleNamespace(max_windows=max_windows), "max_windows", 1)
        first_D, count_D = self._starts("val", seq_len)
        starts, domains = [], []
        for d, (first, count) in enumerate(zip(first_D.tolist(), count_D.tolist())):
            # starts first, first + S, ... while a whole window (S + 1 bytes) fits
            start_W = torch.arange(first, first + count, seq_len)
            starts.append(start_W)
            domains.append(torch.full_like(start_W, d))
        start_W, domain_W = torch.cat(starts), torch.cat(domains)
        picked_N = torch.linspace(0, len(start_W) - 1, min(max_windows, len(start_W)))
        picked_N = picked_N.round().long()
        idx_NS, targets_NS = self._windows("val", start_W[picked_N], seq_len)
        return idx_NS, targets_NS, domain_W[picked_N]

    def unigram_entropy(self, split: str) -> Entropy:
        """Entropy of the split's byte frequencies: the loss of the best context-free model.

        A model that learned nothing beyond byte frequencies reaches this validation loss;
        counted over every byte of the split, end-of-document marks included.
        """
        counts_V = torch.bincount(self.split(split).data_N.long(), minlength=256).double()
        p_V = counts_V[counts_V > 0] / counts_V.sum()
        nats = float(-(p_V * p_V.log()).sum())
        return Entropy(bits=nats / math.log(2), nats=nats)


def load(cfg: DataConfig) -> Corpus:
    """The corpus `cfg` describes, split and packed; see the module docstring for the rules."""
    if cfg.source == "embedded":
        sources, origin = embedded_sources(), "the embedded corpus"
    else:
        sources, origin = user_sources(cfg.path), f"data.path={cfg.path!r}"
    documents, skipped = within_budget(sources, cfg.max_bytes)
    if not documents:
        raise ValueError(f"{origin} {empty_problem(cfg.path, len(sources), skipped)}")
    return Corpus(documents, cfg.val_fraction, origin)


# name -> (domain, read): read(limit) gives up to `limit` bytes of text, or None if not text
Sources = dict[str, tuple[str, Callable[[int], bytes | None]]]


def order_key(name: str) -> tuple[int, str]:
    """The fixed order in which documents fill the byte budget."""
    return zlib.crc32(name.encode()), name


def split_key_of(doc: Document) -> tuple[int, str]:
    """Independent of `order_key`: which documents fill the budget must not pick the val split."""
    return zlib.crc32(b"split:" + doc.name.encode()), doc.name


def within_budget(sources: Sources, max_bytes: int) -> tuple[list[Document], int]:
    """(documents, number skipped as not text): each domain filled up to `max_bytes`.

    Sources are read in `order_key` order and only for the room left, so a large source
    costs no more start-up time than the budget it fills.
    """
    used = dict.fromkeys(DOMAINS, 0)
    documents, skipped = [], 0
    for name in sorted(sources, key=order_key):
        domain, read = sources[name]
        room = max_bytes - used[domain]
        if room <= 0:
            continue
        text = read(room)
        if text is None:
            skipped += 1
        elif text:
            documents.append(Document(name, domain, text))
            used[domain] += len(text)
    return documents, skipped


def embedded_sources() -> Sources:
    from pydoc_data.topics import topics

    sources: Sources = {
        f"pydoc:{topic}": ("prose", lambda limit, text=text: text.encode()[:limit])
        for topic, text in topics.items()
    }
    root = Path(os.__file__).parent
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [s for s in subdirs if s not in EXCLUDED_STDLIB_DIRS]
        for file in files:
            if file.endswith(".py"):
                path = Path(folder, file)
                name = f"stdlib:{path.relative_to(root).as_posix()}"
                sources[name] = ("code", lambda limit, path=path: read_text(path, limit))
    return sources


def user_sources(path: str) -> Sources:
    """Every non-hidden file of a user's file or folder; ValueError naming data.path."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"data.path={path!r} does not exist")
    if root.is_file():
        files = {root.name: root}
    else:
        files = {
            p.relative_to(root).as_posix(): p
            for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        }

    def reader(file: Path) -> Callable[[int], bytes | None]:
        def read(limit: int) -> bytes | None:
            try:
                return read_text(file, limit)
            except OSError as err:
                reason = err.strerror or str(err)
                raise ValueError(f"data.path={path!r}: cannot read {file}: {reason}") from err

        return read

    return {
        name: ("code" if file.suffix.lower() in CODE_SUFFIXES else "prose", reader(file))
        for name, file in files.items()
    }


def empty_problem(path: str | None, num_sources: int, skipped: int) -> str:
    if path is not None and Path(path).expanduser().is_file():
        return "is not UTF-8 text" if skipped else "is empty"
    return f"holds no non-empty UTF-8 text file ({num_sources} files, {skipped} not UTF-8 text)"


def read_text(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of `path` if it is UTF-8 text (no NUL byte), else None.

    A read cut inside a multi-byte character is still text: the decoder is not told the
    input ended. Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read(limit)
    if bytes([END_OF_DOCUMENT]) in raw:
        return None
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except UnicodeDecodeError:
        return None
    return raw


def split_documents(
    documents: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, val), per domain: by document where it has two or more, else by bytes."""
    train, val = [], []
    for domain in DOMAINS:
        ranked = sorted((d for d in documents if d.domain == domain), key=split_key_of)
        if len(ranked) == 1:
            (doc,) = ranked
            cut = len(doc.text) - max(1, round(val_fraction * len(doc.text)))
            train.append(Document(doc.name, domain, doc.text[:cut]))
            val.append(Document(f"{doc.name}#val", domain, doc.text[cut:]))
        else:
            n_val = min(max(round(val_fraction * len(ranked)), 1), len(ranked) - 1)
            train += ranked[n_val:]
            val += ranked[:n_val]
    return train, val


def pack(documents: list[Document]) -> Split:
    """Documents grouped by domain, each followed by the end-of-document byte."""
    mark = bytes([END_OF_DOCUMENT])
    chunks, bounds, offset = [], [], 0
    for domain in DOMAINS:
        blob = b"".join(doc.text + mark for doc in documents if doc.domain == domain)
        chunks.append(blob)
        bounds.append((offset, offset + len(blob)))
        offset += len(blob)
    data_N = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return Split(data_N, tuple(bounds), tuple(doc.name for doc in documents))

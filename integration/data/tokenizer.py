"""Tokenizers: a byte-level BPE trained on the corpus (cached), or raw UTF-8 bytes.

Several ranks on one machine may ask for the same tokenizer at once. The cache
file is published by atomic rename, and training happens under an ``fcntl``
lock, so exactly one process trains and the others load its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from integration.data.corpus import corpus_fingerprint, read_documents

__all__ = [
    "EOS_TOKEN",
    "TokenizerLike",
    "ByteTokenizer",
    "BPETokenizer",
    "get_tokenizer",
    "cache_lock",
    "atomic_write",
]

EOS_TOKEN = "<|endoftext|>"
_MIN_BPE_VOCAB = 257  # 256 byte symbols + EOS


class TokenizerLike(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``path`` (created if needed), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ByteTokenizer:
    """Raw UTF-8 bytes: ids 0..255, EOS = 256, vocab 257."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256
    trained = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """Wrapper around a HF ``tokenizers.Tokenizer`` (byte-level BPE).

    ``trained`` is True when this process trained it (False when loaded from cache);
    ``vocab_size`` is the actual size, which is at most the requested size (a small
    corpus can run out of merges).
    """

    def __init__(self, tok, name: str, path: Path, trained: bool) -> None:
        self._tok = tok
        self.name = name
        self.path = path
        self.trained = trained
        self.vocab_size: int = tok.get_vocab_size()
        self.eos_id: int = tok.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def _train_bpe(docs: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def _split_inputs(texts_or_files: Sequence[str | os.PathLike] | None) -> tuple[list[Path], list[str]]:
    files: list[Path] = []
    texts: list[str] = []
    for item in texts_or_files or ():
        if isinstance(item, os.PathLike):
            files.append(Path(item))
        else:
            texts.append(str(item))
    return files, texts


def get_tokenizer(
    kind: str,
    vocab_size: int,
    cache_dir: str | os.PathLike,
    texts_or_files: Sequence[str | os.PathLike] | None = None,
    fingerprint: str | None = None,
) -> ByteTokenizer | BPETokenizer:
    """Return a tokenizer of ``kind`` ``"bpe"`` or ``"bytes"``.

    ``texts_or_files``: ``Path`` items are files, ``str`` items are in-memory texts
    (each one a document). For ``"bpe"`` the trained tokenizer JSON is cached in
    ``cache_dir`` under a key of (corpus content hash, vocab_size); pass
    ``fingerprint`` (from :func:`corpus_fingerprint`) to skip re-hashing.
    """
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"data.tokenizer must be 'bpe' or 'bytes', got {kind!r}")
    if not isinstance(vocab_size, int) or vocab_size < _MIN_BPE_VOCAB:
        raise ValueError(
            f"data.vocab_size ({vocab_size!r}) must be an integer >= {_MIN_BPE_VOCAB} for a BPE tokenizer"
        )
    files, texts = _split_inputs(texts_or_files)
    if not files and not texts:
        raise ValueError("get_tokenizer('bpe'): no training text given")
    fp = fingerprint or corpus_fingerprint(files, texts)
    name = f"bpe{vocab_size}-{fp[:16]}"
    cache = Path(cache_dir)
    path = cache / f"tokenizer-{name}.json"

    from tokenizers import Tokenizer

    if path.exists():  # published by atomic rename, so existing means complete
        return BPETokenizer(Tokenizer.from_file(str(path)), name, path, trained=False)
    with cache_lock(cache / f"tokenizer-{name}.lock"):
        if path.exists():
            return BPETokenizer(Tokenizer.from_file(str(path)), name, path, trained=False)
        tok = _train_bpe(read_documents(files) + texts, vocab_size)
        atomic_write(path, tok.to_str().encode("utf-8"))
    return BPETokenizer(tok, name, path, trained=True)

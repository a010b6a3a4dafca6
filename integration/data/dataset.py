"""Token datasets with step-addressed microbatches.

Every microbatch is a pure function of ``(step, home_replica, index, ...)``, so a
step interrupted by a stage failure can be replayed bit-for-bit after recovery,
on any rank, without any data-loader state.

Sources (``data.source``):

* ``stdlib`` (default): the Python standard library's ``.py`` files, no download.
* ``text``: user text files/globs in ``data.paths``.
* ``megatron``: a Megatron ``.bin``/``.idx`` pair at ``data.prefix`` (already
  tokenized; no tokenizer is trained).

Tokenized corpora are cached in ``data.cache_dir`` as raw int32 files, written
under a file lock with atomic rename (several ranks may build at once).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

#: The first bytes of a megatron-core ``.idx`` file (``megatron/core/datasets/indexed_dataset.py``).
MEGATRON_INDEX_HEADER = b"MMIDIDX\x00\x00"

from integration.data.corpus import (
    DEFAULT_MAX_BYTES,
    corpus_fingerprint,
    read_documents,
    resolve_paths,
    stdlib_files,
)
from integration.data.tokenizer import atomic_write, cache_lock, get_tokenizer

__all__ = ["TokenDataset", "build_dataset", "load_megatron_tokens", "tokenize_to_cache", "DEFAULTS"]

_SPLITS = {"train": "train", "validation": "validation", "val": "validation"}

#: Defaults for the ``data`` config keys read by :func:`build_dataset`.
DEFAULTS: dict[str, Any] = {
    "source": "stdlib",
    "paths": [],
    "prefix": None,
    "tokenizer": "bpe",
    "vocab_size": 1024,
    "cache_dir": "~/.cache/skipfree/data",
    "max_bytes": DEFAULT_MAX_BYTES,
    "seed": 0,
    "val_fraction": 0.05,
}


class TokenDataset:
    """A flat token stream split into train (head) and validation (last ``val_fraction``).

    Samples are non-overlapping windows of ``seq_len`` inputs (window ``w`` covers
    tokens ``[w*seq_len, (w+1)*seq_len]`` inclusive, the extra token feeding the
    last label). Training samples follow a seeded permutation of the windows that
    is redrawn each epoch; the sample stream wraps around indefinitely.
    """

    def __init__(self, tokens: np.ndarray, val_fraction: float = 0.05, seed: int = 0) -> None:
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction ({val_fraction}) must be in [0, 1)")
        n_val = int(len(tokens) * float(val_fraction))
        self.tokens = tokens
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self._splits = {"train": tokens[: len(tokens) - n_val], "validation": tokens[len(tokens) - n_val :]}
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ---------------------------------------------------------------- geometry

    def split_tokens(self, split: str = "train") -> np.ndarray:
        """The token array of ``split`` (``"train"`` or ``"validation"``/``"val"``)."""
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        return self._splits[_SPLITS[split]]

    def num_windows(self, seq_len: int, split: str = "train") -> int:
        """Number of distinct ``seq_len`` samples in ``split``."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return max(0, (len(self.split_tokens(split)) - 1) // seq_len)

    def _require_windows(self, seq_len: int, split: str) -> int:
        n = self.num_windows(seq_len, split)
        if n == 0:
            raise ValueError(
                f"{_SPLITS[split]} split has {len(self.split_tokens(split))} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; use more data or adjust data.val_fraction / model.seq_len"
            )
        return n

    def _permutation(self, seq_len: int, epoch: int, n_windows: int) -> np.ndarray:
        key = (seq_len, epoch, n_windows)  # n_windows differs per split
        perm = self._perm_cache.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, seq_len, epoch]).permutation(n_windows)
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[key] = perm
        return perm

    def _window(self, arr: np.ndarray, window: int, seq_len: int) -> np.ndarray:
        start = window * seq_len
        return np.asarray(arr[start : start + seq_len + 1], dtype=np.int64)

    def _stack(self, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        block = torch.from_numpy(np.stack(chunks))
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    # ------------------------------------------------------------------ access

    def sample_offset(
        self, step: int, home_replica: int, index: int, num_home_replicas: int, microbatches_per_home: int,
        micro_batch_size: int,
    ) -> int:
        """Global position of the microbatch's first sample in the sample stream."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not 0 <= home_replica < num_home_replicas:
            raise ValueError(f"home_replica {home_replica} outside 0..{num_home_replicas - 1}")
        if not 0 <= index < microbatches_per_home:
            raise ValueError(f"microbatch index {index} outside 0..{microbatches_per_home - 1}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        return ((step * num_home_replicas + home_replica) * microbatches_per_home + index) * micro_batch_size

    def microbatch(
        self,
        step: int,
        home_replica: int,
        index: int,
        num_home_replicas: int,
        microbatches_per_home: int,
        micro_batch_size: int,
        seq_len: int,
        split: str = "train",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, labels)``, both ``LongTensor[micro_batch_size, seq_len]``; labels are
        tokens shifted by one. Same arguments -> same tensors; distinct
        ``(step, home_replica, index)`` read distinct samples until the stream wraps."""
        n_windows = self._require_windows(seq_len, split)
        arr = self.split_tokens(split)
        first = self.sample_offset(
            step, home_replica, index, num_home_replicas, microbatches_per_home, micro_batch_size
        )
        chunks = []
        for j in range(first, first + micro_batch_size):
            epoch, pos = divmod(j, n_windows)
            chunks.append(self._window(arr, int(self._permutation(seq_len, epoch, n_windows)[pos]), seq_len))
        return self._stack(chunks)

    def validation_batches(
        self, n: int, micro_batch_size: int, seq_len: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` validation microbatches of sequential windows (wrapping); deterministic."""
        n_windows = self._require_windows(seq_len, "validation")
        arr = self.split_tokens("validation")
        batches = []
        for b in range(n):
            chunks = [
                self._window(arr, (b * micro_batch_size + r) % n_windows, seq_len)
                for r in range(micro_batch_size)
            ]
            batches.append(self._stack(chunks))
        return batches


# -------------------------------------------------------------------- sources


def tokenize_to_cache(
    files: Sequence[Path], tokenizer: Any, cache_dir: Path, fingerprint: str
) -> np.ndarray:
    """Tokenize ``files`` (EOS after each document) into a cached int32 memmap."""
    path = cache_dir / f"tokens-{tokenizer.name}-{fingerprint[:16]}.int32"
    if not path.exists():
        with cache_lock(cache_dir / f"{path.name}.lock"):
            if not path.exists():
                ids = tokenizer.encode_batch(read_documents(files))
                eos = np.array([tokenizer.eos_id], dtype=np.int32)
                parts = [p for doc in ids for p in (np.asarray(doc, dtype=np.int32), eos)]
                atomic_write(path, np.concatenate(parts).tobytes())
    return np.memmap(path, dtype=np.int32, mode="r")


def check_megatron_files(prefix: str) -> str:
    """The expanded ``prefix`` of a Megatron indexed dataset whose ``.bin`` and ``.idx`` exist and whose
    ``.idx`` starts with megatron-core's index header; a ``ValueError`` naming ``data.prefix`` otherwise
    (without reading the tokens, so the preflight can call it)."""
    if not prefix:
        raise ValueError("data.prefix: required when data.source is 'megatron' (path without .bin/.idx)")
    prefix = os.path.expanduser(str(prefix))
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f"; give the prefix without extension, e.g. '{prefix[:-4]}'"
        raise ValueError(
            f"data.prefix: expected a Megatron indexed dataset '{prefix}.bin' + '{prefix}.idx'; "
            f"missing {', '.join(repr(m) for m in missing)}{hint}"
        )
    with open(prefix + ".idx", "rb") as f:
        header = f.read(len(MEGATRON_INDEX_HEADER))
    if header != MEGATRON_INDEX_HEADER:
        raise ValueError(f"data.prefix: '{prefix}.idx' is not a Megatron index file (its header is not "
                         f"{MEGATRON_INDEX_HEADER!r}); write the dataset with megatron's preprocess_data.py or "
                         f"IndexedDatasetBuilder")
    return prefix


def load_megatron_tokens(prefix: str) -> np.ndarray:
    """All token ids of a Megatron indexed dataset (``prefix.bin``/``prefix.idx``) in order.

    Read through ``megatron.core.datasets.indexed_dataset.IndexedDataset`` and copied
    into memory (the dataset's own mmap closes when it is garbage collected).
    """
    prefix = check_megatron_files(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        ds = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError, IndexError, struct.error) as exc:  # megatron asserts on malformed files
        raise ValueError(f"data.prefix: '{prefix}' is not a readable Megatron indexed dataset ({exc})") from None
    if len(ds) == 0:
        raise ValueError(f"data.prefix: '{prefix}' holds no sequences")
    tokens = np.concatenate(ds[0 : len(ds)])
    del ds
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
        raise ValueError(f"data.prefix: '{prefix}' holds token ids outside the int32 range")
    return tokens.astype(np.int32, copy=False)


def _get(cfg: Any, key: str, fallback: bool = True) -> Any:
    """``cfg[key]``; a missing or null value gives ``DEFAULTS[key]`` when ``fallback``."""
    try:
        value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    except (AttributeError, KeyError):  # e.g. a struct-mode DictConfig without the key
        value = None
    return DEFAULTS[key] if value is None and fallback else value


def build_dataset(cfg: Any) -> tuple[TokenDataset, int]:
    """Build the dataset described by a ``data`` config (dict, DictConfig or object).

    Keys (defaults in :data:`DEFAULTS`): ``source`` (``stdlib``/``text``/``megatron``),
    ``paths``, ``prefix``, ``tokenizer`` (``bpe``/``bytes``), ``vocab_size``,
    ``cache_dir``, ``max_bytes``, ``seed``, ``val_fraction``.

    Returns ``(dataset, vocab_size)`` where ``vocab_size`` bounds every token id:
    the tokenizer's actual size for text sources; for ``megatron`` the configured
    ``vocab_size`` (must exceed the largest id) or, when it is null/0, max id + 1.
    """
    source = _get(cfg, "source")
    seed = int(_get(cfg, "seed"))
    val_fraction = float(_get(cfg, "val_fraction"))

    if source == "megatron":
        tokens = load_megatron_tokens(_get(cfg, "prefix", fallback=False))
        needed = int(tokens.max()) + 1
        vocab = _get(cfg, "vocab_size", fallback=False)
        if vocab:
            if int(vocab) < needed:
                raise ValueError(
                    f"data.vocab_size ({vocab}) is below the largest token id in data.prefix + 1 ({needed}); "
                    "raise it or set it to null to infer"
                )
            needed = int(vocab)
        return TokenDataset(tokens, val_fraction, seed), needed

    if source == "stdlib":
        files = stdlib_files(int(_get(cfg, "max_bytes")))
    elif source == "text":
        files = resolve_paths(list(_get(cfg, "paths") or []), "data.paths")
    else:
        raise ValueError(f"data.source must be 'stdlib', 'text' or 'megatron', got {source!r}")

    cache_dir = Path(os.path.expanduser(str(_get(cfg, "cache_dir"))))
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = corpus_fingerprint(files)
    tokenizer = get_tokenizer(
        _get(cfg, "tokenizer"), int(_get(cfg, "vocab_size")), cache_dir, files, fingerprint
    )
    tokens = tokenize_to_cache(files, tokenizer, cache_dir, fingerprint)
    return TokenDataset(tokens, val_fraction, seed), tokenizer.vocab_size

"""Tests for the download-free data pipeline (integration.data)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from integration.data import (
    TokenDataset,
    build_dataset,
    get_tokenizer,
    read_text_files,
    resolve_paths,
    stdlib_files,
)

SAMPLE = "def add(a, b):\n    return a + b  # héllo\n"


def _write_corpus(root: Path, n_files: int = 3, repeat: int = 200) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        path = root / f"doc{i}.txt"
        lines = [f"line {j} of document {i}: the quick brown fox {j * i % 17}\n" for j in range(repeat)]
        path.write_text("".join(lines), encoding="utf-8")
        files.append(path)
    return files


def _tokenizer_worker(files: list[str], cache_dir: str, barrier, queue) -> None:
    barrier.wait()
    tok = get_tokenizer("bpe", 300, cache_dir, [Path(f) for f in files])
    queue.put((tok.trained, tok.encode(SAMPLE), tok.vocab_size))


# --------------------------------------------------------------------- corpus


def test_stdlib_files_sorted_capped() -> None:
    files = stdlib_files(200_000)
    assert files and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files) <= 200_000
    assert files == stdlib_files(200_000)
    assert not any(part in {"site-packages", "test", "tests"} for f in files for part in f.parts)


def test_text_paths_and_errors(tmp_path: Path) -> None:
    files = _write_corpus(tmp_path / "txt", n_files=2, repeat=2)
    assert resolve_paths([str(tmp_path / "txt" / "*.txt")]) == files
    assert read_text_files([str(files[1]), str(files[0])]).startswith("line 0 of document 1")
    with pytest.raises(ValueError, match=r"data.paths: no file matches '/x/\*.txt'"):
        read_text_files(["/x/*.txt"])
    with pytest.raises(ValueError, match="data.paths: file not found"):
        read_text_files([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="data.paths: .* is a directory"):
        read_text_files([str(tmp_path / "txt")])
    with pytest.raises(ValueError, match="data.paths: empty"):
        build_dataset({"source": "text", "paths": [], "cache_dir": str(tmp_path)})


# ------------------------------------------------------------------ tokenizer


def test_bytes_tokenizer() -> None:
    tok = get_tokenizer("bytes", 0, "/nonexistent", None)
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.name == "bytes"
    ids = tok.encode(SAMPLE)
    assert max(ids) < 256 and tok.decode(ids) == SAMPLE


def test_bpe_cache_reused(tmp_path: Path) -> None:
    files = _write_corpus(tmp_path / "txt")
    first = get_tokenizer("bpe", 300, tmp_path / "cache", files)
    assert first.trained and first.vocab_size <= 300 and first.eos_id == 0
    mtime = first.path.stat().st_mtime_ns
    second = get_tokenizer("bpe", 300, tmp_path / "cache", files)
    assert not second.trained and second.path.stat().st_mtime_ns == mtime
    assert second.encode(SAMPLE) == first.encode(SAMPLE)
    assert second.decode(second.encode(SAMPLE)) == SAMPLE
    third = get_tokenizer("bpe", 320, tmp_path / "cache", files)  # new key -> retrain
    assert third.trained and third.path != first.path
    with pytest.raises(ValueError, match="data.vocab_size"):
        get_tokenizer("bpe", 100, tmp_path / "cache", files)
    with pytest.raises(ValueError, match="data.tokenizer"):
        get_tokenizer("wordpiece", 300, tmp_path / "cache", files)


def test_bpe_concurrent_processes(tmp_path: Path) -> None:
    files = [str(f) for f in _write_corpus(tmp_path / "txt", n_files=4, repeat=400)]
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_tokenizer_worker, args=(files, str(tmp_path / "cache"), barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [False, True], "exactly one process trains"
    assert results[0][1:] == results[1][1:]
    assert not list((tmp_path / "cache").glob("*.tmp"))


# -------------------------------------------------------------------- dataset


def _toy_dataset(n: int = 1000, val_fraction: float = 0.1, seed: int = 0) -> TokenDataset:
    return TokenDataset(np.arange(n, dtype=np.int32), val_fraction=val_fraction, seed=seed)


def test_split_and_labels_shifted() -> None:
    ds = _toy_dataset()
    assert len(ds.split_tokens("train")) == 900 and len(ds.split_tokens("val")) == 100
    tokens, labels = ds.microbatch(0, 0, 0, 1, 1, 4, 8)
    assert tokens.shape == labels.shape == (4, 8) and tokens.dtype == labels.dtype == torch.int64
    assert torch.equal(labels, tokens + 1)  # toy stream is arange: labels are the next token
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    assert int(tokens.max()) < 900  # training never reads validation tokens
    assert all(int(row[0]) % 8 == 0 for row in tokens)  # window-aligned starts


def test_microbatch_addressing() -> None:
    ds = _toy_dataset(n=20_000, val_fraction=0.05)
    args = dict(num_home_replicas=2, microbatches_per_home=3, micro_batch_size=2, seq_len=8)
    seen = {}
    for step in range(3):
        for replica in range(2):
            for index in range(3):
                tokens, labels = ds.microbatch(step, replica, index, **args)
                again = ds.microbatch(step, replica, index, **args)
                assert torch.equal(tokens, again[0]) and torch.equal(labels, again[1])
                seen[(step, replica, index)] = tokens
    starts = [int(t[r, 0]) for t in seen.values() for r in range(2)]
    assert len(set(starts)) == len(starts), "distinct addresses read distinct windows"
    # a fresh object (e.g. another rank or a restarted process) gives the same data
    other = _toy_dataset(n=20_000, val_fraction=0.05)
    assert torch.equal(other.microbatch(2, 1, 2, **args)[0], seen[(2, 1, 2)])
    # the seed changes the order
    reseeded = _toy_dataset(n=20_000, val_fraction=0.05, seed=1)
    assert not torch.equal(reseeded.microbatch(2, 1, 2, **args)[0], seen[(2, 1, 2)])
    with pytest.raises(ValueError, match="home_replica"):
        ds.microbatch(0, 2, 0, **args)
    with pytest.raises(ValueError, match="microbatch index"):
        ds.microbatch(0, 0, 3, **args)


def test_wraparound_covers_every_window_each_epoch() -> None:
    ds = _toy_dataset(n=101, val_fraction=0.0)  # 100 usable -> 12 windows of 8
    n = ds.num_windows(8)
    assert n == 12
    rows = [int(ds.microbatch(s, 0, 0, 1, 1, 1, 8)[0][0, 0]) // 8 for s in range(2 * n)]
    assert sorted(rows[:n]) == list(range(n)) and sorted(rows[n:]) == list(range(n))
    with pytest.raises(ValueError, match="seq_len"):
        ds.microbatch(0, 0, 0, 1, 1, 1, 200)


def test_validation_batches_deterministic() -> None:
    ds = _toy_dataset()
    a, b = ds.validation_batches(3, 2, 8), ds.validation_batches(3, 2, 8)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert int(a[0][0][0, 0]) == 900 and torch.equal(a[0][1], a[0][0] + 1)


def test_build_dataset_text_source(tmp_path: Path) -> None:
    _write_corpus(tmp_path / "txt")
    cfg = {
        "source": "text",
        "paths": [str(tmp_path / "txt" / "*.txt")],
        "tokenizer": "bpe",
        "vocab_size": 300,
        "cache_dir": str(tmp_path / "cache"),
        "seed": 0,
        "val_fraction": 0.05,
    }
    ds, vocab = build_dataset(cfg)
    assert vocab <= 300 and int(ds.tokens.max()) < vocab
    assert list(ds.tokens).count(0) == 3  # EOS (id 0) after each of the 3 documents
    ds2, _ = build_dataset(cfg)  # cached memmap
    assert np.array_equal(np.asarray(ds.tokens), np.asarray(ds2.tokens))
    assert torch.equal(ds.microbatch(1, 0, 0, 1, 1, 2, 16)[0], ds2.microbatch(1, 0, 0, 1, 1, 2, 16)[0])
    byte_ds, byte_vocab = build_dataset({**cfg, "tokenizer": "bytes"})
    assert byte_vocab == 257 and int(byte_ds.tokens.max()) == 256


def test_build_dataset_stdlib_source(tmp_path: Path) -> None:
    ds, vocab = build_dataset(
        {"source": "stdlib", "max_bytes": 150_000, "tokenizer": "bytes", "cache_dir": str(tmp_path)}
    )
    assert vocab == 257 and ds.num_windows(64) > 100
    assert ds.validation_batches(1, 2, 64)[0][0].shape == (2, 64)


def test_megatron_indexed_round_trip(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus_text_document")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=int(rng.integers(50, 200))) for _ in range(20)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")

    ds, vocab = build_dataset({"source": "megatron", "prefix": prefix, "vocab_size": None, "val_fraction": 0.1})
    expected = np.concatenate(docs)
    assert np.array_equal(np.asarray(ds.tokens), expected)
    assert vocab == int(expected.max()) + 1
    tokens, labels = ds.microbatch(0, 0, 0, 1, 1, 2, 32)
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    assert build_dataset({"source": "megatron", "prefix": prefix, "vocab_size": 1024})[1] == 1024
    with pytest.raises(ValueError, match="data.vocab_size"):
        build_dataset({"source": "megatron", "prefix": prefix, "vocab_size": 10})


def test_megatron_missing_prefix_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.prefix: expected .*\.bin.*\.idx"):
        build_dataset({"source": "megatron", "prefix": str(tmp_path / "nothing")})
    with pytest.raises(ValueError, match="without extension"):
        build_dataset({"source": "megatron", "prefix": str(tmp_path / "nothing.bin")})
    with pytest.raises(ValueError, match="data.prefix: required"):
        build_dataset({"source": "megatron"})
    with pytest.raises(ValueError, match="data.source"):
        build_dataset({"source": "hdf5"})


def test_megatron_garbage_files_are_a_clear_error(tmp_path: Path) -> None:
    """Bytes that are not a megatron-core indexed dataset: our message on data.prefix, never
    megatron's AssertionError (a wrong header) or a raw struct/numpy error (a truncated index)."""
    from integration.data.dataset import MEGATRON_INDEX_HEADER

    garbage = tmp_path / "garbage"
    (tmp_path / "garbage.bin").write_bytes(b"\x07" * 4096)
    (tmp_path / "garbage.idx").write_bytes(b"not an index" * 10)
    with pytest.raises(ValueError, match=r"data.prefix: .*garbage.idx' is not a Megatron index file"):
        build_dataset({"source": "megatron", "prefix": str(garbage)})
    (tmp_path / "garbage.idx").write_bytes(MEGATRON_INDEX_HEADER + b"\x01")  # the right header, then nothing
    with pytest.raises(ValueError, match=r"data.prefix: .* is not a readable Megatron indexed dataset"):
        build_dataset({"source": "megatron", "prefix": str(garbage)})

"""Text corpora available without any download.

The default corpus is the Python standard library's own ``.py`` sources: real
text that exists on every machine that can run this project. Files are taken in
sorted relative-path order so the corpus is identical across runs of the same
Python installation.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "DEFAULT_MAX_BYTES",
    "stdlib_files",
    "resolve_paths",
    "read_text_files",
    "read_documents",
    "corpus_fingerprint",
]

DEFAULT_MAX_BYTES = 8_000_000

# Test suites are huge and repetitive; third-party packages are not "the stdlib".
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_GLOB_CHARS = set("*?[")


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """Standard-library ``.py`` files in sorted order, stopping before ``max_bytes`` total.

    A file that would push the total over ``max_bytes`` is skipped (later, smaller
    files may still fit), so the result is deterministic for a given install.
    """
    if max_bytes <= 0:
        raise ValueError(f"data.max_bytes ({max_bytes}) must be positive")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"data.source 'stdlib': standard library not found at {root}")
    chosen: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            if size == 0 or total + size > max_bytes:
                continue
            chosen.append(path)
            total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise ValueError(f"data.max_bytes ({max_bytes}) is smaller than every stdlib file")
    return chosen


def resolve_paths(paths: Sequence[str | os.PathLike] | str, field: str = "data.paths") -> list[Path]:
    """Expand files and globs (``**`` allowed) into a sorted, de-duplicated file list.

    Raises ``ValueError`` naming ``field`` for an empty list, a glob matching
    nothing, a missing file or a directory.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError(f"{field}: empty; list text files or globs (e.g. 'corpus/*.txt')")
    out: list[Path] = []
    seen: set[Path] = set()
    for entry in paths:
        text = os.path.expanduser(str(entry))
        if _GLOB_CHARS & set(text):
            matches = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
            if not matches:
                raise ValueError(f"{field}: no file matches '{entry}'")
        else:
            path = Path(text)
            if path.is_dir():
                raise ValueError(f"{field}: '{entry}' is a directory; use a glob such as '{entry}/*.txt'")
            if not path.is_file():
                raise ValueError(f"{field}: file not found '{entry}'")
            matches = [path]
        for path in matches:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def read_documents(files: Iterable[Path]) -> list[str]:
    """One string per file (UTF-8, undecodable bytes replaced)."""
    return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]


def read_text_files(paths: Sequence[str | os.PathLike] | str, field: str = "data.paths") -> str:
    """Concatenate the text of files/globs (see :func:`resolve_paths`), newline separated."""
    return "\n".join(read_documents(resolve_paths(paths, field)))


def corpus_fingerprint(files: Iterable[Path] = (), texts: Iterable[str] = ()) -> str:
    """SHA-256 over file contents and in-memory texts: the corpus identity for caches.

    Content (not paths or mtimes) is hashed, so copies of the same corpus share a
    cache and an edited file invalidates it.
    """
    h = hashlib.sha256()
    for f in files:
        data = Path(f).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()

"""Reading a user's plan or cluster file: bounded in size, every OS or encoding problem one clear error."""

from __future__ import annotations

from pathlib import Path


def read_bounded_text(path: str | Path, max_bytes: int, error: type[Exception], what: str,
                      not_found_hint: str = "") -> str:
    """The text of ``path``; raises ``error`` naming ``what`` (e.g. "plan file") for a missing file, a
    directory, a file over ``max_bytes``, bytes that are not UTF-8, or a read the OS refuses."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a directory; give the file inside it")
    if not p.is_file():
        raise error(f"{what} not found: {p}{not_found_hint}")
    try:
        if p.stat().st_size > max_bytes:
            raise error(f"{what} {p}: larger than {max_bytes} bytes; not a {what}")
        return p.read_text()
    except UnicodeDecodeError:
        raise error(f"{what} {p}: not UTF-8 text") from None
    except OSError as exc:
        raise error(f"{what} {p}: cannot be read ({exc.strerror})") from None

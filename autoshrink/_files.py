"""Writing files so that a crash or a kill never leaves half of one behind.

Every result, cache entry and exported model goes through :func:`atomic_path`: the data is
written to a temporary file in the destination's folder, then moved onto the destination with
``os.replace`` (atomic on POSIX and Windows), so readers see the old file or the new one, never
a torn one, and two processes writing the same cache entry cannot corrupt it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["append_line", "atomic_path", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` if the block succeeds,
    delete it if the block raises. Missing parent folders are created.

    The temporary name keeps ``path``'s suffix (some writers, e.g. ``torch.export.save``, look
    at it) and starts with a dot, so globs over the folder do not pick it up.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("whole")
        >>> target.read_text()
        'whole'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def append_line(path: str | os.PathLike[str], line: str) -> Path:
    """Append ``line`` and a newline to ``path`` (created, with its folders, if missing) in one
    ``write`` under an exclusive ``flock``: processes appending to one log never interleave.

    Example:
        >>> import tempfile, pathlib
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"
        >>> _ = append_line(log, "one"); _ = append_line(log, "two")
        >>> log.read_text().splitlines()
        ['one', 'two']
    """
    import fcntl

    if "\n" in line:
        raise ValueError(f"append_line writes one line; got text with a newline: {line[:60]!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)  # closing releases the lock
    return target

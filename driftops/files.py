"""Atomic file writes: a crash at any point leaves the old file or the new one, never a partial file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

# Temp files are named ``.<random>.tmp.<name>`` beside their target: the name keeps the target's suffix (writers
# such as Pillow choose the format by it) and :func:`remove_stale_temporaries` finds those of killed processes.
STALE_TEMPORARIES = ".*.tmp.*"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` for the block to write; afterwards fsynced and moved onto ``path`` (its folder
    created if missing, and fsynced). On an exception the temp file is removed and ``path`` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{os.urandom(6).hex()}.tmp.{path.name}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, write: Callable[[object], None]) -> None:
    """Write ``path`` atomically by ``write(fileobj)`` (a binary file object). The file gets the permissions of a
    plain ``open()`` (0o666 less the umask), not a private temp file's 0o600."""
    with atomic_path(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
            write(fh)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the temp files that writes interrupted by a killed process left in ``folder``."""
    for stale in Path(folder).glob(STALE_TEMPORARIES):
        stale.unlink()

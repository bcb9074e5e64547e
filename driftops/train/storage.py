"""The run folder on disk: atomic file writes, the checkpoint and the metrics log.

A run folder holds ``config.json`` (a :class:`~driftops.train.TrainConfig`), ``metrics.jsonl`` (one
JSON record per logged step), ``checkpoint.pt`` (model, EMA, optimiser, step, and every rank's RNG and method
states, written atomically) and, when training ends, ``metrics.json`` (a summary).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import DriftopsError

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"


def atomic_write_bytes(path: Path, write: Callable[[object], None]) -> None:
    """Write a file atomically: ``write(fileobj)`` into a temp file in the same folder, fsync, ``os.replace``.

    A crash at any point leaves either the old file or the new one, and no temp file on exceptions. The file gets the
    permissions of a plain ``open()`` (0o666 less the umask), not a private temp file's 0o600.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def read_checkpoint(run_dir: str | Path) -> bytes:
    """The bytes of a run folder's checkpoint (what :func:`load_checkpoint` parses)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise DriftopsError(f"no {CHECKPOINT} in {run_dir}; pass a run folder written by `driftops train`")
    return path.read_bytes()


def parse_checkpoint(data: bytes, device: str = "cpu") -> dict:
    """The checkpoint dictionary of checkpoint bytes (keys: config, step, seconds, world_size, model, ema, optimizer
    and ranks, one ``{"rng", "method"}`` state per rank), its tensors on ``device``."""
    # Our own file: it holds numpy RNG states, which the weights-only unpickler refuses.
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def load_checkpoint(run_dir: str | Path, device: str = "cpu") -> dict:
    """The checkpoint dictionary of a run folder (see :func:`parse_checkpoint`)."""
    return parse_checkpoint(read_checkpoint(run_dir), device)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temp files of writes interrupted by a killed process (``.NAME.*.tmp``)."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in a run folder (empty if there is none)."""
    path = Path(run_dir) / METRICS_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one record to ``metrics.jsonl``."""
    with open(Path(run_dir) / METRICS_LOG, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records logged after ``step`` (written after the last checkpoint of a killed run)."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    atomic_write_text(Path(run_dir) / METRICS_LOG, "".join(json.dumps(r) + "\n" for r in kept))

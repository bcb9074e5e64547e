"""The run folder on disk: the checkpoint and the metrics log.

A run folder holds ``config.json`` (a :class:`~driftops.train.TrainConfig`), ``metrics.jsonl`` (one
JSON record per logged step), ``checkpoint.pt`` (model, EMA, optimiser, step, and every rank's RNG and method
states, written atomically) and, when training ends, ``metrics.json`` (a summary).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ..errors import DriftopsError
from ..files import atomic_write_text

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"


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

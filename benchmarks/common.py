"""Shared benchmark plumbing: run each case in a fresh process, record seconds and peak memory, print and save."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _child(fn: Callable[[], dict], queue) -> None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        out = fn() or {}
        out.setdefault("seconds", time.perf_counter() - t0)
        out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    except Exception as exc:  # reported in the table, not raised: one failing case must not hide the others
        out = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    queue.put(out)


def measure(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` in a fresh process; return its dict plus ``seconds`` and ``peak_mib`` (RSS growth)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table (missing cells blank, floats to 4 significant digits)."""

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def save(name: str, rows: list[dict], args: dict) -> Path:
    """Write rows with the machine description and arguments to ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "args": args}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return path

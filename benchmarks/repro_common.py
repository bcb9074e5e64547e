"""Plumbing of the reproduction scripts: resumable result stores, resumable training, mean ± std tables.

Every script keeps one JSON store of finished cases, written atomically after each (config, seed) case,
and trains each case in its own run folder under ``benchmarks/results/runs/<script>/``; a killed
script restarted with the same command skips the finished cases and resumes the interrupted run from
its last checkpoint.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import driftops  # noqa: F401  (before torch, as the driftops command does: see driftops.threads)
import numpy as np
import torch

from driftops.files import atomic_write_text
from driftops.metrics import w2
from driftops.train import Target, TrainConfig, read_metrics, train

RESULTS = Path(__file__).resolve().parent / "results"


class Store:
    """Finished cases of a script, ``{key: record}``, in ``benchmarks/results/<name>.json`` (with the command line).

    Several processes may fill one store with disjoint cases: each write merges into the file's current
    records under an exclusive lock.
    """

    def __init__(self, name: str) -> None:
        self.path = RESULTS / f"{name}.json"
        self.records: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        return json.loads(self.path.read_text())["records"] if self.path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def pending(self, key: Callable[..., str], *axes: Iterable) -> Iterator[tuple[str, tuple]]:
        """``(key(*case), case)`` for each case of the product of ``axes`` (in order) not finished yet."""
        for case in itertools.product(*axes):
            k = key(*case)
            if k not in self:
                yield k, case

    def add(self, key: str, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.records = {**self._read(), key: record}
            meta = {"command": command_line(), "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
            atomic_write_text(self.path, json.dumps({"meta": meta, "records": self.records}, indent=1) + "\n")


def grid_parser(doc: str, name: str, seeds: int) -> argparse.ArgumentParser:
    """The parser of a reproduction script, with the options they all share: ``--seeds`` (how many, from 42),
    ``--threads`` (per training run) and ``--name`` (the result file stem in ``benchmarks/results``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=seeds, help="number of seeds, from 42")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=name, help="result file stem in benchmarks/results")
    return parser


def seed_list(args: argparse.Namespace) -> list[int]:
    """The seeds of ``--seeds``: 42, 43, ..."""
    return list(range(42, 42 + args.seeds))


def command_line() -> str:
    """The command that runs this script as it was started."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def train_resumable(cfg: TrainConfig) -> dict:
    """Train ``cfg`` to ``cfg.steps`` steps: a new run, or the run in ``cfg.out`` continued from its checkpoint."""
    done = Path(cfg.out) / "metrics.json"
    if done.exists() and json.loads(done.read_text())["steps"] >= cfg.steps:
        return json.loads(done.read_text())
    return train(cfg, resume=(Path(cfg.out) / "checkpoint.pt").exists())


def scatter_source(out: Path) -> bool:
    """Whether a finished case's run folder ``out`` is still there to draw its scatter cell from; says so when not."""
    if not out.exists():
        print(f"{out} is gone: its cell of the scatter grid is left out")
    return out.exists()


def curve(run_dir: str | Path) -> tuple[list[int], list[float], list[float]]:
    """Steps, training seconds and W2^2 of the evaluations logged in a run folder."""
    rows = [r for r in read_metrics(run_dir) if "w2" in r]
    return [r["step"] for r in rows], [r["seconds"] for r in rows], [r["w2"] for r in rows]


def late_mean(times: list[float], values: list[float], end: float) -> float:
    """Mean of the ``values`` logged at ``times`` (steps or seconds) in the last third of a run ending at ``end``."""
    late = [v for t, v in zip(times, values) if t >= 2 * end / 3]
    return sum(late) / len(late)


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std over seeds; ± 0 for one value); '-' for none."""
    if not values:
        return "-"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def write_markdown(name: str, title: str, table: list[str], protocol: str) -> Path:
    """``benchmarks/results/<name>.md``: a title, the table, the protocol and the command that made it."""
    text = f"# {title}\n\n" + "\n".join(table) + f"\n\n{protocol.strip()}\n\nMade by `{command_line()}`.\n"
    path = RESULTS / f"{name}.md"
    atomic_write_text(path, text)
    print(text)
    return path


def redraw_w2(sample: Callable[[int, int], torch.Tensor], target: Target, draws: int, n: int = 1000) -> list[float]:
    """Exact W2² between ``sample(n, seed)`` (n, D) and ``n`` fresh target points, over ``draws`` seeded draws."""
    return [w2(sample(n, 30_000 + k), target.eval_set(n, 40_000 + k)[0]) for k in range(draws)]


def floor_draws(target: str, draws: int, n: int = 1000) -> list[float]:
    """Exact W2² between two independent draws of ``n`` points of ``target``, ``draws`` times: the metric's floor."""
    tgt = Target.from_config(TrainConfig(target=target))
    return [w2(tgt.eval_set(n, 50_000 + 2 * k)[0], tgt.eval_set(n, 50_001 + 2 * k)[0]) for k in range(draws)]

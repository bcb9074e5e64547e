"""Shared benchmark plumbing: run each case in a fresh process (optionally under another environment and beside
other load), record seconds and peak memory and the machine's thread settings, print and save."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import driftops  # before torch, as the driftops command does: see driftops.threads
import torch

from driftops.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# Environment variables that change how the OpenMP / BLAS thread pools behave.
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_DYNAMIC", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
              "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KEOPS_CACHE_FOLDER", "DRIFTOPS_THREADS", "CXXFLAGS",
              "BENCH_KEOPS_FIRST")
# Named environments for subprocess runs: "default" is a fresh shell (none of THREAD_ENV's OpenMP variables set, no
# CXXFLAGS); "generic": KeOps's formulas compiled without driftops's -march=native (CXXFLAGS set, empty); "static":
# the same with keopscore imported before driftops (where the script offers it: bench_drift.py reads BENCH_KEOPS_FIRST),
# so that KeOps's loops keep their own static schedule.
ENVIRONMENTS = {
    "default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "omp1": {"OMP_NUM_THREADS": "1"}, "generic": {"CXXFLAGS": ""},
    "static": {"CXXFLAGS": "", "BENCH_KEOPS_FIRST": "1"},
}  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, core counts, load, torch / OpenMP thread settings, the thread-related environment and the CXXFLAGS
    KeOps compiles with (driftops imported first: it sets those flags when it imports KeOps)."""
    from threadpoolctl import threadpool_info

    import keopscore

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "driftops_threads": driftops.threads.settings(),
        "threadpools": [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "filepath")} for p in threadpool_info()],
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "keops_cxxflags": keopscore.config.get_cpp_env_flags(),
    }


def print_machine(info: dict) -> None:
    """One paragraph describing the machine and its thread settings."""
    pools = ", ".join(f"{p['internal_api']} x{p['num_threads']} ({Path(p['filepath']).name})" for p in info["threadpools"])
    load = " ".join(f"{v:.2f}" for v in info["loadavg"])
    print(f"# {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load {load}; torch {info['torch']} "
          f"threads {info['torch_threads']}/{info['torch_interop_threads']}; driftops {info['driftops_threads']}; "
          f"pools: {pools}; env: {info['env'] or 'none set'}; KeOps CXXFLAGS: {info['keops_cxxflags'] or 'none'}")


def child_env(name: str) -> dict:
    """The environment of a subprocess run under ``ENVIRONMENTS[name]`` (OpenMP variables and CXXFLAGS otherwise unset)."""
    env = {k: v for k, v in os.environ.items() if k != "CXXFLAGS" and not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env | ENVIRONMENTS[name]


def run_script(script: str, payload: dict, env: str = "default", copies: int = 1) -> list[dict]:
    """Run ``python script --child JSON`` in ``copies`` simultaneous processes under environment ``env``; each
    prints one JSON dict as its last stdout line. Returns their dicts (``{"error": ...}`` on failure)."""
    cmd = [sys.executable, script, "--child", json.dumps(payload)]
    procs = [subprocess.Popen(cmd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(copies)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        lines = stdout.strip().splitlines()
        try:
            out.append(json.loads(lines[-1]))
        except (IndexError, json.JSONDecodeError):
            out.append({"error": (stderr.strip().splitlines() or ["no output"])[-1][:200]})
    return out


@contextlib.contextmanager
def load(kind: str) -> Iterator[int]:
    """A load scenario: ``"idle"`` (nothing added), ``"busy"`` (one process spinning on one core for the
    duration) or ``"pair"`` (nothing added here: the caller runs two copies at once). Yields the copy count."""
    spinner = None
    if kind == "busy":
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
    try:
        yield 2 if kind == "pair" else 1
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


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


def timings(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn()``, one after the other."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` in a forked process; return its dict plus ``seconds`` and ``peak_mib`` (RSS growth)."""
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


def save(name: str, rows: list[dict], args: dict, machine: dict | None = None) -> Path:
    """Write rows with the machine description and arguments to ``benchmarks/results/<name>.json``."""
    path = RESULTS / f"{name}.json"
    meta = {"machine": machine or machine_info(), "args": args}
    atomic_write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(f"wrote {path}")
    return path


def recipe_model(cfg, dim: int):
    """The generator of a training config ``cfg`` (a ``driftops.train.TrainConfig``) for ``dim``-dimensional samples,
    initialised from ``cfg.seed`` (the global torch seed is set to it)."""
    from driftops.models import Generator

    torch.manual_seed(cfg.seed)
    return Generator(cfg.noise_dim, dim, cfg.hidden, cfg.blocks, arch=cfg.arch)


def logsumexp_underflow_free(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp(z, dim)`` with the shifted exponents clamped at -80: the same float32 values (terms below
    e^-80 of the largest cannot change a float32 sum), without ``exp``'s slow path on underflowing arguments (7x
    faster on a 1024 x 1024 matrix at eps 0.01 here)."""
    top = z.amax(dim, keepdim=True)
    return (z - top).clamp_min(-80.0).exp().sum(dim).log() + top.squeeze(dim)


def recipe_plan_mean(a: torch.Tensor, b: torch.Tensor, eps: float, iters: int = 20, logsumexp=torch.logsumexp) -> tuple[torch.Tensor, float]:
    """The paper code's Sinkhorn barycentres: dense log-domain Sinkhorn between a (N, D) and b (M, D), ``iters``
    alternating updates from zero potentials at ``eps``; returns the rows' barycentres (N, D) of the row-normalised
    plan and the plan's mean L1 row-marginal error (its columns are exact after the last update)."""
    c = torch.cdist(a, b) ** 2 / eps
    f, g = a.new_zeros(len(a)), a.new_zeros(len(b))
    for _ in range(iters):
        f = -logsumexp(g[None, :] - c, 1)
        g = -logsumexp(f[:, None] - c, 0)
    row_error = float((logsumexp(f[:, None] + g[None, :] - c, 1).exp() - 1).abs().mean())
    return torch.softmax(g[None, :] - c, 1) @ b, row_error


def recipe_drift(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int = 20, logsumexp=torch.logsumexp) -> tuple[torch.Tensor, float]:
    """The paper code's Sinkhorn drift (N, D) of samples x (N, D) toward targets y (M, D): the barycentres of the cross
    plan minus those of the self plan (:func:`recipe_plan_mean`, no gradients), and the cross plan's marginal error."""
    with torch.no_grad():
        attract, error = recipe_plan_mean(x, y, eps, iters, logsumexp)
        repel, _ = recipe_plan_mean(x, x, eps, iters, logsumexp)
    return attract - repel, error

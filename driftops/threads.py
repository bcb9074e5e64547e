"""OpenMP settings that keep KeOps fast on a machine shared with other work.

torch and KeOps's compiled CPU reductions share one OpenMP runtime: the formulas ask for
``libgomp.so.1``, which the dynamic loader resolves to the copy torch loaded first (same soname).
libgomp reads its wait policy once, when it loads (at ``import torch``): by default a worker that
finishes its share of a parallel region spins up to ``GOMP_SPINCOUNT`` = 300,000 times (about
3 ms) before it sleeps. The block-sparse reductions open one parallel region per row cluster,
hundreds per call; when another process holds a core, a region's end waits for a descheduled
worker while its partner spins on the core that worker needs, and so on for every region (an
8192-point drift: 0.2 s alone, 0.6 s beside one busy process, 6.4 s each for two driftops
processes at once). With the passive policy idle workers sleep at once (a futex wait) and give
their core back.

So, at ``import driftops`` (when torch is not imported yet, and the user set neither
``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``), driftops imports torch with
``OMP_WAIT_POLICY=PASSIVE`` in the environment and restores the environment right after:
subprocesses see the user's settings; the policy lives in this process's runtime.

When torch was imported first (the runtime already spins), driftops's reductions run on one
long-lived thread of their own instead of the caller's. That thread gets its own OpenMP team, so the
runtime manages more threads than there are cores, and libgomp then spins at most 100 times before
sleeping (GOMP_SPINCOUNT's documented throttle) for every wait, the caller's team included.

The number of threads is left alone (torch's count, one per usable core, which KeOps shares
since the runtime is shared; the reduction thread is given the caller's count), so a larger
machine still uses all its cores; :func:`set_threads` overrides it for driftops's reductions only,
restoring the caller's setting after each call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import DriftopsError

# Variables that already choose libgomp's waiting behaviour: when one is set, driftops leaves it alone.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
T = TypeVar("T")


@dataclass(frozen=True)
class ThreadSettings:
    """What driftops did to the OpenMP runtime.

    wait_policy: the policy driftops set at torch's import ("PASSIVE"), or None when it could not
    (torch was imported first) or should not (the user chose one); own_thread: reductions run on a
    thread of their own (torch was imported first and the user chose no policy); threads: the thread
    count of driftops's calls, or None for torch's current setting.
    """

    wait_policy: str | None = None
    own_thread: bool = False
    threads: int | None = None


_settings = ThreadSettings()


def import_torch() -> None:
    """Import torch with the passive wait policy for its OpenMP runtime (see the module docstring)."""
    global _settings
    if any(v in os.environ for v in WAIT_VARIABLES):
        import torch  # noqa: F401

        return
    if "torch" in sys.modules:
        _settings = replace(_settings, own_thread=True)
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    _settings = replace(_settings, wait_policy="PASSIVE")


def settings() -> dict:
    """The current settings, for logs and benchmark records: driftops's choices (:class:`ThreadSettings`),
    torch's thread count and each OpenMP runtime's ``omp_get_max_threads`` on this thread."""
    import torch

    runtimes = {Path(lib._name).name: lib.omp_get_max_threads() for lib in openmp_runtimes()}
    return {
        "wait_policy": _settings.wait_policy, "own_thread": _settings.own_thread, "threads": _settings.threads,
        "torch_threads": torch.get_num_threads(), "openmp_max_threads": runtimes,
    }  # fmt: skip


@functools.cache
def openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The GNU OpenMP runtimes with soname ``libgomp.so.1`` (the one KeOps's formulas link) loaded at the first
    call (torch is imported by then), as ctypes handles: torch's, and the system's if another library loaded
    it. Vendored copies (``libgomp-<hash>``, private to scikit-learn or POT) are not included."""
    paths = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if Path(path).name.startswith("libgomp.so"):
                paths.add(path)
    return tuple(ctypes.CDLL(p) for p in sorted(paths))


def set_threads(n: int | None) -> None:
    """Run driftops's reductions (torch and KeOps) on ``n`` threads; ``None`` restores torch's setting.

    The caller's own thread count is restored after every driftops call, so this only affects
    driftops. By default driftops uses torch's count (one thread per usable core).
    """
    global _settings
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DriftopsError(f"set_threads takes a positive integer or None (torch's setting), got {n!r}")
    _settings = replace(_settings, threads=n)


def call(fn: Callable[[], T], cpu: bool = True) -> T:
    """``fn()`` (a reduction; ``cpu``: of CPU tensors) under driftops's thread settings: with the count of
    :func:`set_threads` when one is set, on the reduction thread when the runtime could not be made passive
    (module docstring) and the tensors are on the CPU (GPU work stays on the caller's thread, whose current
    device and stream it uses); the caller's thread counts are unchanged afterwards."""
    if not (_settings.own_thread and cpu) or threading.current_thread() is _ReductionThread.current:
        with _count(_settings.threads):
            return fn()
    import torch

    n = _settings.threads or torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def job() -> T:
        torch.get_num_threads()  # torch sets its count on a thread's first use: do it before ours
        for lib in openmp_runtimes():
            lib.omp_set_num_threads(n)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn()

    return _ReductionThread.get().run_job(job)


@contextlib.contextmanager
def _count(n: int | None) -> Iterator[None]:
    """Within the block, ``n`` threads (None: unchanged) for torch and every ``libgomp.so.1`` runtime on this
    thread; afterwards the previous counts."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    runtimes = [(lib, lib.omp_get_max_threads()) for lib in openmp_runtimes()]
    torch.set_num_threads(n)
    for lib, _ in runtimes:
        lib.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for lib, count in runtimes:
            lib.omp_set_num_threads(count)


class _ReductionThread(threading.Thread):
    """The long-lived daemon thread reductions run on (one per process; a forked child starts its own)."""

    current: "_ReductionThread | None" = None

    def __init__(self) -> None:
        super().__init__(name="driftops-reductions", daemon=True)
        self.pid = os.getpid()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.start()

    @classmethod
    def get(cls) -> "_ReductionThread":
        if cls.current is None or cls.current.pid != os.getpid():
            import torch

            # The caller's OpenMP team must exist for the runtime to count both teams: a small parallel torch op.
            torch.ones(1 << 17).add_(1)
            cls.current = cls()
        return cls.current

    def run_job(self, fn: Callable[[], T]) -> T:
        future: Future = Future()
        self.jobs.put((fn, future))
        return future.result()

    def run(self) -> None:  # the thread's body
        while True:
            fn, future = self.jobs.get()
            try:
                future.set_result(fn())
            except BaseException as err:  # handed to the caller
                future.set_exception(err)

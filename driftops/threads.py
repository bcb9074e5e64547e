"""OpenMP settings that keep KeOps fast, alone on a machine or beside other work.

torch and KeOps's compiled CPU reductions share one OpenMP runtime: the formulas ask for
``libgomp.so.1``, which the dynamic loader resolves to the copy torch loaded first (same soname).
libgomp reads its wait policy once, when it loads (at ``import torch``). Many short parallel regions run back to
back (torch opens one per operation; KeOps's block-sparse loop as KeOps writes it, one per row cluster, hundreds
per call), and two waits decide their speed:

* by default a worker that finishes its share spins up to ``GOMP_SPINCOUNT`` = 300,000 times (about
  3 ms) before it sleeps: when another process holds a core, a region's end waits for a descheduled
  worker while its partner spins on the core that worker needs (an 8192-point drift: 0.2 s alone,
  6.4 s each for two driftops processes at once);
* with no spinning at all (``OMP_WAIT_POLICY=PASSIVE``) every region wakes its workers from a futex
  sleep, ~50 us each: an 8192-point Sinkhorn solve at eps 0.01 took 3.1 s against 1.8 s spinning 1000
  times, slower than one thread (2.9 s).

So, at ``import driftops`` (when torch is not imported yet and the user set no ``GOMP_SPINCOUNT``),
driftops imports torch with ``GOMP_SPINCOUNT=1000`` (``SPIN_COUNT``: ~10 us, longer than the gap between
two regions, far shorter than a time slice) in the environment and restores the environment right after:
subprocesses see the user's settings. ``OMP_WAIT_POLICY=PASSIVE`` gets the same spin count: ~10 us of
spinning keeps the policy's promise (waiting threads take no CPU time worth counting) without a futex
wake per region (libgomp lets ``GOMP_SPINCOUNT`` override the policy's spin count; set
``GOMP_SPINCOUNT=0`` for no spinning at all). ``OMP_WAIT_POLICY=ACTIVE`` or a ``GOMP_SPINCOUNT`` of the
user's is left alone. When torch was imported first, its runtime keeps libgomp's default.

Spinning costs only where threads share cores with other work. So every public driftops call and every
reduction runs its torch work on torch's thread count less the cores that other processes (and the hypervisor's
steal) kept busy over the last quarter second (:class:`OtherLoad`, from ``/proc/stat`` and this process's CPU time),
at least one: torch splits an operation's work statically and would wait for a descheduled thread. KeOps's CPU
loops, which driftops compiles to hand out rows to threads as they come free
(:data:`driftops.backends.keops.LOOP_SCHEDULES`), run on the caller's whole count whatever the load (:func:`loop`):
a thread that shares its core with another process takes fewer rows, so the loop keeps the share of that core the
system gives it. (Where KeOps was imported before driftops its loops keep their static split and the reduced count.)
On an idle machine the count is torch's (one per usable core, which KeOps shares since the runtime is shared), so a
larger machine still uses all its cores; :func:`set_threads` fixes the count (no adaptation to the load). The
caller's counts are restored after each call.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import DriftopsError

# OMP_WAIT_POLICY values under which driftops sets its spin count (unset, or passive: see the module docstring).
SPUN_POLICIES = ("", "passive")
# Spins of a worker waiting for the next region before it sleeps (libgomp's default: 300,000).
SPIN_COUNT = 1000
# Seconds between two measurements of the other processes' load.
LOAD_INTERVAL = 0.25
T = TypeVar("T")


@dataclass(frozen=True)
class ThreadSettings:
    """What driftops did to the OpenMP runtime.

    spin_count: the ``GOMP_SPINCOUNT`` driftops set at torch's import, or None when it could not
    (torch was imported first) or should not (the user chose a spin count or an active policy);
    threads: the thread count of :func:`set_threads`, or None for torch's count less the cores other processes keep busy.
    """

    spin_count: int | None = None
    threads: int | None = None


_settings = ThreadSettings()
# torch's thread count of the caller of the outermost driftops scope that changed it (None: unchanged).
_caller: contextvars.ContextVar[int | None] = contextvars.ContextVar("driftops_caller_threads", default=None)


def import_torch() -> None:
    """Import torch with ``GOMP_SPINCOUNT=SPIN_COUNT`` for its OpenMP runtime (see the module docstring)."""
    global _settings
    other_load()  # a first measurement, so that the first reduction already knows the load
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    if "GOMP_SPINCOUNT" in os.environ or policy not in SPUN_POLICIES or "torch" in sys.modules:
        import torch  # noqa: F401

        return
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    _settings = replace(_settings, spin_count=SPIN_COUNT)


class OtherLoad:
    """The number of cores other processes kept busy, averaged over the last ``LOAD_INTERVAL`` seconds or more:
    all CPUs' busy time in ``/proc/stat`` (steal included) less this process's own CPU time, per second of wall
    time; re-measured at most every ``LOAD_INTERVAL``; 0 before the second measurement or without ``/proc/stat``."""

    def __init__(self) -> None:
        self.last: tuple[float, float, float] | None = None
        self.cores = 0.0

    def __call__(self) -> float:
        now = time.monotonic()
        if self.last is not None and now - self.last[0] < LOAD_INTERVAL:
            return self.cores
        sample = self.sample(now)
        if sample is not None and self.last is not None:
            wall, busy, own = (a - b for a, b in zip(sample, self.last))
            self.cores = max(0.0, (busy - own) / wall)
        self.last = sample
        return self.cores

    @staticmethod
    def sample(now: float) -> tuple[float, float, float] | None:
        """(now, busy seconds of all CPUs, this process's CPU seconds), or None without ``/proc/stat``."""
        try:
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
        return now, (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


other_load = OtherLoad()


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def reduction_threads(cpu: bool) -> int | None:
    """The thread count of a reduction (``cpu``: of CPU tensors): :func:`set_threads`'s, else on the CPU torch's
    count less the cores other processes keep busy (rounded, at least 1); None: torch's count, unchanged."""
    if _settings.threads is not None or not cpu:
        return _settings.threads
    import torch

    n = torch.get_num_threads()
    free = max(1, usable_cores() - round(other_load()))
    return free if free < n else None


def settings() -> dict:
    """The current settings, for logs and benchmark records: driftops's choices (:class:`ThreadSettings`), KeOps's
    loop schedule (``"dynamic"``: driftops's, see :func:`loop`), torch's thread count and each OpenMP runtime's
    ``omp_get_max_threads`` on this thread."""
    import torch

    from .backends import keops

    runtimes = {Path(lib._name).name: lib.omp_get_max_threads() for lib in openmp_runtimes()}
    return {
        "spin_count": _settings.spin_count, "threads": _settings.threads, "keops_loops": "dynamic" if keops.DYNAMIC else "static",
        "other_load": round(other_load.cores, 2), "torch_threads": torch.get_num_threads(), "openmp_max_threads": runtimes,
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
    """Run driftops's calls and reductions (torch and KeOps) on ``n`` threads; ``None`` restores the default.

    The caller's own thread count is restored after every driftops call, so this only affects
    driftops. By default driftops uses torch's count (one thread per usable core) less the cores other
    processes keep busy (module docstring).
    """
    global _settings
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DriftopsError(f"set_threads takes a positive integer or None (torch's setting), got {n!r}")
    _settings = replace(_settings, threads=n)


def loop_threads(cpu: bool) -> int | None:
    """The thread count of KeOps's dynamically scheduled CPU loops (``cpu``: of CPU tensors): :func:`set_threads`'s,
    else the count the caller gave torch, whatever the load (a thread sharing its core with other work takes fewer
    rows instead of holding up the others); None: unchanged (the caller's count is the current one)."""
    if _settings.threads is not None or not cpu:
        return _settings.threads
    return _caller.get()


def loop(fn: Callable[[], T], cpu: bool = True) -> T:
    """``fn()`` (a KeOps loop; ``cpu``: over CPU tensors) on :func:`loop_threads` threads; the counts as they were
    afterwards."""
    with _count(loop_threads(cpu)):
        return fn()


def call(fn: Callable[[], T], cpu: bool = True) -> T:
    """``fn()`` (a reduction; ``cpu``: of CPU tensors) on :func:`reduction_threads` threads; the caller's thread
    counts are unchanged afterwards."""
    with _count(reduction_threads(cpu)):
        return fn()


def scoped(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator of the public calls: all of ``fn``'s torch and KeOps work on :func:`reduction_threads` threads
    (module docstring), the caller's thread counts restored afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> T:
        with _count(reduction_threads(True)):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _count(n: int | None) -> Iterator[None]:
    """Within the block, ``n`` threads (None: unchanged) for torch and every ``libgomp.so.1`` runtime on this
    thread; afterwards the previous counts. The outermost change records the caller's count (:func:`loop_threads`)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    runtimes = [(lib, lib.omp_get_max_threads()) for lib in openmp_runtimes()]
    outermost = _caller.set(before) if _caller.get() is None else None
    torch.set_num_threads(n)
    for lib, _ in runtimes:
        lib.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for lib, count in runtimes:
            lib.omp_set_num_threads(count)
        if outermost is not None:
            _caller.reset(outermost)

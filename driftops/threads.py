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
subprocesses see the user's settings; the policy lives in this process's runtime. The number of
threads is left alone (torch's default, one per usable core, also used by KeOps since the runtime
is shared), so a larger machine still uses all its cores; :func:`set_threads` overrides it for
driftops's own calls only, restoring the caller's setting after each call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from .errors import DriftopsError

# Variables that already choose libgomp's waiting behaviour: when one is set, driftops leaves it alone.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


@dataclass(frozen=True)
class ThreadSettings:
    """What driftops did to the OpenMP runtime.

    wait_policy: the policy driftops set at torch's import ("PASSIVE"), or None when it could not
    (torch was imported first) or should not (the user chose one); threads: the thread count of
    driftops's calls, or None for torch's current setting.
    """

    wait_policy: str | None = None
    threads: int | None = None


_settings = ThreadSettings()


def import_torch() -> None:
    """Import torch with the passive wait policy for its OpenMP runtime (see the module docstring)."""
    global _settings
    if "torch" in sys.modules or any(v in os.environ for v in WAIT_VARIABLES):
        import torch  # noqa: F401

        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    _settings = replace(_settings, wait_policy="PASSIVE")


def settings() -> dict:
    """The current settings, for logs and benchmark records: driftops's choices, torch's threads,
    the OpenMP runtime's ``omp_get_max_threads`` and whether its wait policy is passive."""
    import torch

    runtimes = {Path(lib._name).name: lib.omp_get_max_threads() for lib in openmp_runtimes()}
    return {"wait_policy": _settings.wait_policy, "threads": _settings.threads, "torch_threads": torch.get_num_threads(), "openmp_max_threads": runtimes}


def openmp_runtimes() -> list[ctypes.CDLL]:
    """The loaded GNU OpenMP runtimes with soname ``libgomp.so.1`` (the one KeOps's formulas link), as ctypes
    handles: torch's, and the system's if another library loaded it. Vendored copies (``libgomp-<hash>``,
    private to scikit-learn or POT) are not included."""
    paths = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if Path(path).name.startswith("libgomp.so"):
                paths.add(path)
    return [ctypes.CDLL(p) for p in sorted(paths)]


def set_threads(n: int | None) -> None:
    """Run driftops's reductions (torch and KeOps) on ``n`` threads; ``None`` restores torch's setting.

    The caller's own thread count is restored after every driftops call, so this only affects
    driftops. By default driftops uses torch's count (one thread per usable core).
    """
    global _settings
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DriftopsError(f"set_threads takes a positive integer or None (torch's setting), got {n!r}")
    _settings = replace(_settings, threads=n)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Within the block, use the thread count of :func:`set_threads` (when one is set) for torch and for
    every ``libgomp.so.1`` runtime; afterwards restore the caller's counts."""
    n = _settings.threads
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

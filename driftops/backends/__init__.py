"""Backends: how the two reductions of :mod:`driftops.backends.base` are evaluated.

``"dense"`` (torch reference), ``"keops"`` (lazy, any size, CPU or GPU),
``"sparse"`` (block-sparse truncated KeOps reductions for D <= 3) and
``"auto"`` (sparse where it is exact to its tolerance and pays off, else keops).
"""

from __future__ import annotations

from ..errors import DriftopsError
from .base import Backend
from .dense import DenseBackend
from .keops import KeOpsBackend
from .sparse import SparseBackend

# Largest N*M*(D+4) for which "auto" uses the dense backend (about 64 MiB of float32 temporaries).
DENSE_MAX_ELEMENTS = 1 << 24


class AutoBackend(Backend):
    """Dense torch for tiny problems (no compile, no call overhead), the block-sparse path for large
    low-dimensional problems where it pays off, KeOps otherwise."""

    name = "auto"

    def __init__(self) -> None:
        self.dense = DenseBackend()
        self.keops = KeOpsBackend()
        self.sparse = SparseBackend()

    def pick(self, x, y, eps, cost) -> Backend:
        if x.shape[0] * y.shape[0] * (x.shape[1] + 4) <= DENSE_MAX_ELEMENTS:
            return self.dense
        return self.sparse if self.sparse.pays_off(x, y, eps, cost) else self.keops

    def reduce_lse(self, x, y, eps, cost, logw, diag):
        return self.pick(x, y, eps, cost).reduce_lse(x, y, eps, cost, logw, diag)

    def reduce_mean(self, x, y, eps, cost, values, logw, diag):
        return self.pick(x, y, eps, cost).reduce_mean(x, y, eps, cost, values, logw, diag)

    def reduce_lse_mean(self, x, y, eps, cost, values, logw):
        return self.pick(x, y, eps, cost).reduce_lse_mean(x, y, eps, cost, values, logw)


BACKENDS = {"auto": AutoBackend, "keops": KeOpsBackend, "sparse": SparseBackend, "dense": DenseBackend}


def get_backend(backend: str | Backend) -> Backend:
    """A backend instance from its name (or the instance itself)."""
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise DriftopsError(f"unknown backend {backend!r}; pass one of {', '.join(map(repr, BACKENDS))} or a Backend instance")
    return BACKENDS[backend]()


__all__ = ["Backend", "DenseBackend", "KeOpsBackend", "SparseBackend", "AutoBackend", "get_backend", "BACKENDS"]

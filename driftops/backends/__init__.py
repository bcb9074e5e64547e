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


class AutoBackend(Backend):
    """KeOps, switching to the block-sparse path for large low-dimensional problems where it pays off."""

    name = "auto"

    def __init__(self) -> None:
        self.keops = KeOpsBackend()
        self.sparse = SparseBackend()

    def pick(self, x, y, eps, cost) -> Backend:
        return self.sparse if self.sparse.pays_off(x, y, eps, cost) else self.keops

    def lse(self, x, y, eps, cost, logw=None, self_offset=None):
        return self.pick(x, y, eps, cost).lse(x, y, eps, cost, logw, self_offset)

    def weighted_mean(self, x, y, eps, cost, values, logw=None, self_offset=None):
        return self.pick(x, y, eps, cost).weighted_mean(x, y, eps, cost, values, logw, self_offset)


BACKENDS = {"auto": AutoBackend, "keops": KeOpsBackend, "sparse": SparseBackend, "dense": DenseBackend}


def get_backend(backend: str | Backend) -> Backend:
    """A backend instance from its name (or the instance itself)."""
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise DriftopsError(f"unknown backend {backend!r}; pass one of {', '.join(map(repr, BACKENDS))} or a Backend instance")
    return BACKENDS[backend]()


__all__ = ["Backend", "DenseBackend", "KeOpsBackend", "SparseBackend", "AutoBackend", "get_backend", "BACKENDS"]

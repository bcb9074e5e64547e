"""Backends: how the two reductions of :mod:`driftops.backends.base` are evaluated.

``"dense"`` (torch reference), ``"keops"`` (lazy, any size, CPU or GPU),
``"sparse"`` (block-sparse truncated KeOps reductions for D <= 3) and
``"auto"`` (see :class:`AutoBackend`).
"""

from __future__ import annotations

import copy

import torch

from ..errors import DriftopsError
from .base import Backend, needs_grad
from .dense import DenseBackend
from .keops import KeOpsBackend
from .sparse import SparseBackend

# Largest N*M*(D+4) for which "auto" uses the dense backend (about 64 MiB of float32 temporaries).
DENSE_MAX_ELEMENTS = 1 << 24
# Largest N*M for which "auto" reduces the later iterations of a Sinkhorn stage densely on the CPU (a kernel the dense
# backend keeps: 32 MiB in float32, 64 MiB in float64). benchmarks/bench_sinkhorn.py (README), 2D: 2048 points 2.1-6.2x
# faster at eps 0.001 than the block-sparse path, the same at 0.1 and 0.01; coarse levels of 4096 and 8192 points
# 1.3-1.5x faster at 0.001. 4096 x 4096 (64 MiB in float32) was up to 2.2x slower at eps 0.01, where the block-sparse
# Newton finish converges in 1-2 iterations.
DENSE_ITERATIONS_MAX_ELEMENTS = 1 << 23
# Largest dimension for which "auto" uses the block-sparse backend. Measured on 2D and 3D clouds of 8k to 1M points
# (benchmarks/bench_sparse.py, bench_auto.py): it is faster than the dense-lazy reduction at every temperature, by
# 1.1-2x when most blocks are kept, 4x at 16k points and eps = 0.01, more where a larger share is skipped.
SPARSE_MAX_DIM = 3


class AutoBackend(Backend):
    """The backend chosen per reduction, by measurement and by device:

    1. dense torch for tiny problems (N * M * (D + 4) <= DENSE_MAX_ELEMENTS; no compile, no call overhead), and
       for repeated reductions (:meth:`iterations`) on the CPU without gradients while N * M <=
       DENSE_ITERATIONS_MAX_ELEMENTS (2896 x 2896 points): the dense backend keeps their kernel and a Sinkhorn
       iteration is one matrix-vector product;
    2. inputs on a GPU: dense-lazy KeOps (its GPU path; the block-sparse path's small clusters and host-side
       bookkeeping have not been measured faster there);
    3. CPU, D <= SPARSE_MAX_DIM and no gradient needed: the block-sparse path (measured faster than dense-lazy
       KeOps from 8k to 1M points in 2D and 3D, eps 0.01 to 0.1);
    4. otherwise dense-lazy KeOps.

    benchmarks/bench_auto.py measures each backend beside this pick (README): on a single reduction of fresh clouds
    dense-lazy KeOps is faster below about 4096 points in 2D and 8192 in 3D (1.3-2.6x, a few milliseconds), which
    rules 1 and 3 leave alone so that the reductions of the same clouds (a Sinkhorn stage, a drift's log-sum-exp and
    mean) share one block-sparse plan.
    """

    name = "auto"

    def __init__(self) -> None:
        self.dense = DenseBackend()
        self.keops = KeOpsBackend()
        self.sparse = SparseBackend()
        self.repeated = False

    def iterations(self) -> AutoBackend:
        """This choice for repeated reductions (rule 1), sharing this instance's backends and their caches."""
        if self.repeated:
            return self
        twin = copy.copy(self)
        twin.repeated = True
        return twin

    def pick(self, x: torch.Tensor, y: torch.Tensor, *others: torch.Tensor | None) -> Backend:
        """The backend for a reduction of x (N, D) against y (M, D) with further inputs ``others``."""
        if x.shape[0] * y.shape[0] * (x.shape[1] + 4) <= DENSE_MAX_ELEMENTS:
            return self.dense
        if x.device.type != "cpu":
            return self.keops
        grad = needs_grad(x, y, *others)
        if self.repeated and not grad and x.shape[0] * y.shape[0] <= DENSE_ITERATIONS_MAX_ELEMENTS:
            return self.dense
        return self.sparse if x.shape[1] <= SPARSE_MAX_DIM and not grad else self.keops

    def reduce_lse(self, x, y, eps, cost, logw, diag):
        return self.pick(x, y, logw).reduce_lse(x, y, eps, cost, logw, diag)

    def reduce_mean(self, x, y, eps, cost, values, logw, diag):
        return self.pick(x, y, values, logw).reduce_mean(x, y, eps, cost, values, logw, diag)

    def reduce_lse_mean(self, x, y, eps, cost, values, logw):
        return self.pick(x, y, values, logw).reduce_lse_mean(x, y, eps, cost, values, logw)

    def reduce_topk(self, x, y, eps, cost, logw, k):
        return self.pick(x, y).reduce_topk(x, y, eps, cost, logw, k)


BACKENDS = {"auto": AutoBackend, "keops": KeOpsBackend, "sparse": SparseBackend, "dense": DenseBackend}


def get_backend(backend: str | Backend) -> Backend:
    """A backend instance from its name (or the instance itself)."""
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise DriftopsError(f"unknown backend {backend!r}; pass one of {', '.join(map(repr, BACKENDS))} or a Backend instance")
    return BACKENDS[backend]()


__all__ = ["Backend", "DenseBackend", "KeOpsBackend", "SparseBackend", "AutoBackend", "get_backend", "BACKENDS"]

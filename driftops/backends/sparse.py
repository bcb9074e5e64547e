"""Block-sparse truncated KeOps reductions for D <= 3: the million-point CPU path.

Both clouds are binned on a regular grid (cells of side ``cell_size``); points are sorted so that
every cell is a contiguous *cluster*. For a row cluster I and a column cluster J the cluster
bounding boxes give bounds ``dmin(I, J) <= |x_i - y_j| <= dmax(I, J)`` and the column log-weights
give ``Lmin_J <= logw_j <= Lmax_J``. Then

* ``U_IJ = Lmax_J - c(dmin(I, J))/eps`` bounds every logit of block (I, J) from above;
* ``B_I = max_J (Lmin_J - c(dmax(I, J))/eps)`` is reached or beaten by an unmasked entry of every
  row of I (with a self mask, only clusters that keep an unmasked point count, see ``_keep_mask``).

Block (I, J) is kept iff ``U_IJ >= B_I - truncation``: every dropped entry weighs less than
``exp(-truncation)`` times an entry kept in its row, whatever the log-weights (Sinkhorn's
strongly varying ``log b + g/eps`` included). Kept blocks are reduced exactly by KeOps
(``LazyTensor.ranges``), so the relative error of a row sum is at most
``(number of dropped entries) * exp(-truncation)`` and, in practice, far smaller.

No gradients: inputs are detached (flows and Sinkhorn loops run without autograd); use the
``keops`` or ``dense`` backend to differentiate.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from pykeops.torch import LazyTensor
from pykeops.torch.cluster import cluster_ranges_centroids, from_matrix, sort_clusters

from ..costs import cost_power
from ..errors import DriftopsError
from .base import Backend
from .keops import keops_logits

# Cell-size rule (measured on 2D Gaussian vs checkerboard, 65k and 1M points, see benchmarks/bench_sparse.py):
# cells of side truncation_radius / CELLS_PER_RADIUS, grown until a cluster holds MIN_MEAN_POINTS points on
# average and a cloud has at most MAX_CLUSTERS clusters (KeOps opens one OpenMP region per row cluster and
# the cluster-pair bookkeeping is O(K_I * K_J)).
CELLS_PER_RADIUS = 3.0
MIN_MEAN_POINTS = 32
MAX_CLUSTERS = 4096
# pays_off: a problem this large (N * M pairs) whose estimated kept fraction is below KEPT_FRACTION.
MIN_PAIRS = 5e7
KEPT_FRACTION = 0.3
# Number of cluster pairs whose bounds are evaluated at once (bounds the memory of the keep mask).
PAIR_CHUNK = 1 << 22


@dataclass(frozen=True)
class Clustering:
    """A cloud sorted into grid cells. n points, K non-empty cells, D dims.

    points: (n, D) sorted points; perm: (n,) original row of each sorted point;
    labels: (n,) cluster of each sorted point (non-decreasing); ranges: (K, 2) int64 ``[start, end)``;
    counts: (K,) points per cluster; lo, hi: (K, D) float64 bounding boxes; cell_size: the cell side.
    """

    points: torch.Tensor
    perm: torch.Tensor
    labels: torch.Tensor
    ranges: torch.Tensor
    counts: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    cell_size: float


def grid_labels(x: torch.Tensor, size: float) -> torch.Tensor:
    """Compact cell labels in ``[0, K)`` of points x (n, D) on a grid of side ``size``, shape (n,) int64.

    Same as ``pykeops.torch.cluster.grid_cluster`` but without its 2^10-cells-per-axis label
    collisions and its O(prod(cells)) buffer, so it is safe for far-apart clouds and 3D.
    """
    q = ((x - x.amin(0)) / size).floor().long()
    extent = q.amax(0) + 1
    if math.prod(float(e) for e in extent) < 2.0**62:
        lin = q[:, 0]
        for d in range(1, x.shape[1]):
            lin = lin * extent[d] + q[:, d]
        return torch.unique(lin, return_inverse=True)[1]
    return torch.unique(q, dim=0, return_inverse=True)[1]


def cluster_cloud(x: torch.Tensor, size: float) -> Clustering:
    """Sort x (n, D) into grid cells of side ``size`` (see :class:`Clustering`)."""
    labels = grid_labels(x, size)
    labels, perm = torch.sort(labels)
    points = x[perm].contiguous()
    ranges, _, counts = cluster_ranges_centroids(points, labels)
    k, d = ranges.shape[0], x.shape[1]
    idx = labels[:, None].expand(-1, d)
    pts = points.to(torch.float64)
    lo = torch.full((k, d), math.inf, dtype=torch.float64, device=x.device).scatter_reduce(0, idx, pts, "amin")
    hi = torch.full((k, d), -math.inf, dtype=torch.float64, device=x.device).scatter_reduce(0, idx, pts, "amax")
    return Clustering(points, perm, labels, ranges, counts.long(), lo, hi, size)


def truncation_radius(eps: float, cost: str, truncation: float) -> float:
    """Distance at which the kernel has decayed by ``exp(-truncation)``: sqrt(thr·eps) or thr·eps."""
    return math.sqrt(truncation * eps) if cost_power(cost) == 2 else truncation * eps


def _fingerprint(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents cheaply: its storage and version counter (a checksum for
    inference tensors, which have no version counter). The cache holds a reference to the tensor,
    so its memory, hence its data_ptr, cannot be reused by another tensor while the entry lives."""
    version = float(t.double().sum()) if t.is_inference() else t._version
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version)


def _segment_minmax(values: torch.Tensor, c: Clustering) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster (min, max) of per-point values (n,) given in the ORIGINAL order, float64 (K,)."""
    v = values.detach().to(torch.float64)[c.perm]
    k = c.ranges.shape[0]
    lmin = torch.full((k,), math.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, c.labels, v, "amin")
    lmax = torch.full((k,), -math.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, c.labels, v, "amax")
    return lmin, lmax


def _keep_mask(
    cx: Clustering,
    cy: Clustering,
    eps: float,
    cost: str,
    truncation: float,
    logw_bounds: tuple[torch.Tensor, torch.Tensor] | None,
    self_mask: bool,
) -> torch.Tensor:
    """The (K_I, K_J) boolean matrix of kept cluster pairs (rule in the module docstring), in row chunks.

    With a self mask one entry per row is excluded; it lies in a single column cluster, so the
    best lower bound of a row cluster is the larger of the second-best ``b_IJ`` and the best
    ``b_IJ`` over clusters with at least two points (both are reached by an unmasked entry).
    """
    p = cost_power(cost)
    k_i, k_j = cx.lo.shape[0], cy.lo.shape[0]
    lmin, lmax = logw_bounds if logw_bounds is not None else (cy.lo.new_zeros(k_j), cy.lo.new_zeros(k_j))
    keep = torch.empty(k_i, k_j, dtype=torch.bool, device=cx.lo.device)
    step = max(1, PAIR_CHUNK // max(k_j * cx.lo.shape[1], 1))
    for s in range(0, k_i, step):
        lo, hi = cx.lo[s : s + step, None, :], cx.hi[s : s + step, None, :]
        gap = torch.maximum(cy.lo[None] - hi, lo - cy.hi[None]).clamp_min(0.0)
        span = torch.maximum(cy.hi[None] - lo, hi - cy.lo[None])
        dmin2, dmax2 = (gap * gap).sum(-1), (span * span).sum(-1)
        cmin, cmax = (dmin2, dmax2) if p == 2 else (dmin2.sqrt(), dmax2.sqrt())
        upper = lmax[None] - cmin / eps
        lower = lmin[None] - cmax / eps
        if self_mask:
            top2 = lower.topk(min(2, k_j), dim=1).values[:, -1] if k_j > 1 else lower.new_full((lower.shape[0],), -math.inf)
            multi = lower.masked_fill(cy.counts[None] < 2, -math.inf).amax(1)
            best = torch.maximum(top2, multi)
        else:
            best = lower.amax(1)
        keep[s : s + step] = upper >= (best - truncation)[:, None]
    return keep


class SparseBackend(Backend):
    """Block-sparse truncated KeOps reductions (D <= 3, no gradients); exact on kept blocks.

    ``truncation``: log-ratio below which cluster pairs are dropped (every dropped entry weighs
    less than ``exp(-truncation)`` times a kept entry of its row). ``cell_size``: grid cell side;
    by default ``truncation_radius / 3``, enlarged until clusters hold >= 32 points on average
    and a cloud has at most 4096 clusters.
    """

    name = "sparse"
    cache_size = 8

    def __init__(self, truncation: float = 20.0, cell_size: float | None = None) -> None:
        if truncation <= 0:
            raise DriftopsError(f"truncation must be > 0 (a log-ratio, e.g. 20), got {truncation!r}")
        if cell_size is not None and cell_size <= 0:
            raise DriftopsError(f"cell_size must be > 0 or None (automatic), got {cell_size!r}")
        self.truncation = float(truncation)
        self.cell_size = cell_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, Clustering]] = OrderedDict()

    def __repr__(self) -> str:
        return f"SparseBackend(truncation={self.truncation}, cell_size={self.cell_size})"

    # -- clustering ---------------------------------------------------------------------------
    def clustering(self, x: torch.Tensor, eps: float, cost: str) -> Clustering:
        """The (cached) clustering of cloud x (n, D) for temperature ``eps``."""
        x = x.detach()
        start = self.cell_size if self.cell_size is not None else truncation_radius(eps, cost, self.truncation) / CELLS_PER_RADIUS
        key = (_fingerprint(x), start, self.cell_size is None)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[1]
        c = cluster_cloud(x, start)
        if self.cell_size is None:
            while c.counts.numel() > 1 and (
                x.shape[0] < MIN_MEAN_POINTS * c.counts.numel() or c.counts.numel() > MAX_CLUSTERS
            ):
                c = cluster_cloud(x, c.cell_size * 1.5)
        self._cache[key] = (x, c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return c

    def plan_blocks(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        cost: str,
        logw: torch.Tensor | None = None,
        self_offset: int | None = None,
    ) -> tuple[Clustering, Clustering, torch.Tensor]:
        """Clusterings of x and y and the (K_I, K_J) kept-pair mask for these logits."""
        self._check(x, y)
        cx, cy = self.clustering(x, eps, cost), self.clustering(y, eps, cost)
        bounds = _segment_minmax(logw, cy) if logw is not None else None
        keep = _keep_mask(cx, cy, eps, cost, self.truncation, bounds, self_offset is not None)
        if not bool(keep.any(1).all()):
            raise DriftopsError("internal error in the sparse backend: a row cluster kept no block; use backend='keops'")
        return cx, cy, keep

    @staticmethod
    def kept_fraction(cx: Clustering, cy: Clustering, keep: torch.Tensor) -> tuple[float, float]:
        """(fraction of cluster pairs kept, fraction of point pairs kept)."""
        pairs = float((cx.counts.double()[:, None] * cy.counts.double()[None, :])[keep].sum())
        return float(keep.double().mean()), pairs / (float(cx.counts.sum()) * float(cy.counts.sum()))

    def pays_off(self, x: torch.Tensor, y: torch.Tensor, eps: float, cost: str) -> bool:
        """True when D <= 3, N·M >= 5e7 and the kept fraction of pairs without log-weights is < 0.3.

        Cheap: one clustering per cloud (cached and reused by the reductions) and an O(K_I·K_J) mask.
        """
        if x.shape[-1] > 3 or x.shape[0] * y.shape[0] < MIN_PAIRS:
            return False
        cx, cy, keep = self.plan_blocks(x, y, eps, cost)
        return self.kept_fraction(cx, cy, keep)[1] < KEPT_FRACTION

    # -- reductions -----------------------------------------------------------------------------
    @staticmethod
    def _check(x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[-1] > 3:
            raise DriftopsError(
                f"the sparse backend handles points in dimension D <= 3, got D = {x.shape[-1]}; "
                "use backend='keops' (or 'auto', which picks it) for higher dimensions"
            )

    def _logits(self, x, y, eps, cost, logw, self_offset) -> tuple[LazyTensor, Clustering, Clustering]:
        cx, cy, keep = self.plan_blocks(x, y, eps, cost, logw, self_offset)
        lw = logw.detach()[cy.perm].contiguous() if logw is not None else None
        s = keops_logits(cx.points, cy.points, eps, cost, lw, self_offset, cx.perm, cy.perm)
        s.ranges = from_matrix(cx.ranges, cy.ranges, keep)
        return s, cx, cy

    @staticmethod
    def _unsort(out: torch.Tensor, cx: Clustering) -> torch.Tensor:
        res = torch.empty_like(out)
        res[cx.perm] = out
        return res

    def lse(self, x, y, eps, cost, logw=None, self_offset=None):
        """``log sum_j exp(logw_j - c(x_i, y_j)/eps)`` over kept unmasked j, shape (N,), original order."""
        s, cx, _ = self._logits(x, y, eps, cost, logw, self_offset)
        return self._unsort(s.logsumexp(dim=1).reshape(-1), cx)

    def weighted_mean(self, x, y, eps, cost, values, logw=None, self_offset=None):
        """``sum_j softmax_j(S_ij) values_j`` over kept unmasked j, values (M, E) -> (N, E), original order."""
        s, cx, cy = self._logits(x, y, eps, cost, logw, self_offset)
        v = values.detach()[cy.perm].contiguous()
        return self._unsort(s.sumsoftmaxweight(LazyTensor(v[None, :, :]), dim=1), cx)

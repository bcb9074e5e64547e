"""Block-sparse truncated KeOps reductions for D <= 3: the million-point CPU path.

Both clouds are binned on a regular grid; points are sorted so that every non-empty cell is a
contiguous *cluster* (KeOps block-sparse ``ranges``). For a row cluster I and a column cluster J:

* ``U_IJ = Lmax_J - c(dmin(I, J))/eps`` bounds every logit of block (I, J) from above, with
  ``dmin`` the gap between the bounding boxes and ``Lmax_J`` the largest ``logw`` in J;
* ``b_IJ = logw_r - c(dfar(I, r))/eps`` is reached or beaten, in every row of I, by the entry of
  J's representative point r (``dfar``: farthest corner of I's box from r); ``B_I = max_J b_IJ``
  (the second largest with a self mask, since one entry per row is masked).

Block (I, J) is kept iff ``U_IJ >= B_I - truncation``: every dropped entry weighs less than
``exp(-truncation)`` times an entry kept in its row, whatever the column log-weights (Sinkhorn's
strongly varying ``log b + g/eps`` included), and every row keeps the block of its ``B_I``.
Kept blocks are reduced exactly by KeOps, so a row sum has relative error at most
``(number of dropped entries) * exp(-truncation)``, and far less in practice (measured ~1e-7
at truncation 20, see ``benchmarks/bench_sparse.py``).

No gradients: inputs are detached (flows and Sinkhorn loops run without autograd); use the
``keops`` or ``dense`` backend to differentiate.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from pykeops.torch import LazyTensor
from pykeops.torch.cluster import cluster_ranges_centroids

from ..costs import cost_power
from ..errors import DriftopsError
from .base import Backend
from .keops import keops_logits

# Cell-size rule (measured on 2D Gaussian vs checkerboard, 65k and 1M points, see benchmarks/bench_sparse.py):
# cells of side truncation_radius / CELLS_PER_RADIUS, grown by CELL_GROWTH until a cluster holds
# MIN_MEAN_POINTS points on average and a cloud has at most MAX_CLUSTERS clusters. Smaller cells keep fewer
# pairs, but KeOps opens one OpenMP region per ROW cluster (slow for tiny clusters on a busy CPU), while
# consecutive kept COLUMN clusters are merged into one range (cheap): rows get larger cells than columns.
# The cluster-pair bookkeeping is O(K_I * K_J) per reduction.
CELLS_PER_RADIUS = {"rows": 4.0, "cols": 6.0}
MIN_MEAN_POINTS = {"rows": 64, "cols": 16}
CELL_GROWTH = 1.25
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
    counts: (K,) points per cluster; lo, hi: (K, D) float64 bounding boxes; rep: (K,) sorted index of
    each cluster's representative (its point nearest to the centroid); cell_size: the cell side.
    """

    points: torch.Tensor
    perm: torch.Tensor
    labels: torch.Tensor
    ranges: torch.Tensor
    counts: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    rep: torch.Tensor
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
    pts = points.to(torch.float64)
    ranges, centroids, counts = cluster_ranges_centroids(pts, labels)
    k, d = ranges.shape[0], x.shape[1]
    idx = labels[:, None].expand(-1, d)
    lo = pts.new_full((k, d), math.inf).scatter_reduce(0, idx, pts, "amin")
    hi = pts.new_full((k, d), -math.inf).scatter_reduce(0, idx, pts, "amax")
    # Representative: the first point at the smallest distance to its cluster's centroid.
    dist = ((pts - centroids[labels]) ** 2).sum(1)
    nearest = dist.new_full((k,), math.inf).scatter_reduce(0, labels, dist, "amin")
    order = torch.arange(pts.shape[0], device=x.device)
    cand = torch.where(dist == nearest[labels], order, pts.shape[0])
    rep = torch.full((k,), pts.shape[0], dtype=torch.long, device=x.device).scatter_reduce(0, labels, cand, "amin")
    return Clustering(points, perm, labels, ranges, counts.long(), lo, hi, rep, size)


def truncation_radius(eps: float, cost: str, truncation: float) -> float:
    """Distance at which the kernel has decayed by ``exp(-truncation)``: sqrt(thr·eps) or thr·eps."""
    return math.sqrt(truncation * eps) if cost_power(cost) == 2 else truncation * eps


def _fingerprint(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents cheaply: its storage and version counter (a checksum for
    inference tensors, which have no version counter). The cache holds a reference to the tensor,
    so its memory, hence its data_ptr, cannot be reused by another tensor while the entry lives."""
    version = float(t.double().sum()) if t.is_inference() else t._version
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version)


def _keep_mask(
    cx: Clustering,
    cy: Clustering,
    eps: float,
    cost: str,
    truncation: float,
    logw: torch.Tensor | None,
    self_mask: bool,
) -> torch.Tensor:
    """The (K_I, K_J) boolean matrix of kept cluster pairs (rule in the module docstring), in row chunks.

    ``logw``: (M,) column log-weights in the SORTED order of cy, or None. The lower bound ``b_IJ``
    uses the representative y_r of J (its actual log-weight, and the farthest corner of I's box
    from y_r), which is tighter than ``Lmin_J - c(dmax)/eps`` and still reached by a real entry.
    With a self mask one entry per row is excluded, so ``B_I`` is the second largest ``b_IJ``:
    at most one of the two best representatives is masked for any row.
    """
    p = cost_power(cost)
    k_i, k_j = cx.lo.shape[0], cy.lo.shape[0]
    if logw is None:
        lmax = lrep = cy.lo.new_zeros(k_j)
    else:
        lw = logw.detach().to(torch.float64)
        lmax = lw.new_full((k_j,), -math.inf).scatter_reduce(0, cy.labels, lw, "amax")
        lrep = lw[cy.rep]
    rep = cy.points[cy.rep].to(torch.float64)
    keep = torch.empty(k_i, k_j, dtype=torch.bool, device=cx.lo.device)
    step = max(1, PAIR_CHUNK // max(k_j * cx.lo.shape[1], 1))
    for s in range(0, k_i, step):
        dmin2 = dfar2 = 0.0
        for d in range(cx.lo.shape[1]):
            lo, hi = cx.lo[s : s + step, d, None], cx.hi[s : s + step, d, None]
            gap = torch.maximum(cy.lo[None, :, d] - hi, lo - cy.hi[None, :, d]).clamp_min_(0.0)
            far = torch.maximum((rep[None, :, d] - lo).abs_(), (hi - rep[None, :, d]).abs_())
            dmin2, dfar2 = gap.mul_(gap) + dmin2, far.mul_(far) + dfar2
        cmin, cfar = (dmin2, dfar2) if p == 2 else (dmin2.sqrt(), dfar2.sqrt())
        lower = lrep[None] - cfar / eps
        if not self_mask:
            best = lower.amax(1)
        elif k_j > 1:
            best = lower.topk(2, dim=1).values[:, 1]
        else:
            best = lower.new_full((lower.shape[0],), -math.inf)
        keep[s : s + step] = lmax[None] - cmin / eps >= (best - truncation)[:, None]
    return keep


def _runs(ranges_j: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slices_i, redranges_j) for reductions over j: like ``from_matrix`` but each maximal run of
    consecutive kept column clusters (contiguous in the sorted cloud) is merged into one range."""
    pad = keep.new_zeros(keep.shape[0], 1)
    starts = keep & ~torch.cat([pad, keep[:, :-1]], 1)
    ends = keep & ~torch.cat([keep[:, 1:], pad], 1)
    j_start, j_end = starts.nonzero()[:, 1], ends.nonzero()[:, 1]
    redranges_j = torch.stack([ranges_j[j_start, 0], ranges_j[j_end, 1]], 1)
    return starts.sum(1).cumsum(0), redranges_j


def block_ranges(ranges_i: torch.Tensor, ranges_j: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 6-tuple ``LazyTensor.ranges`` of the block-sparsity pattern ``keep`` (K_I, K_J), with merged runs."""
    slices_i, redranges_j = _runs(ranges_j, keep)
    slices_j, redranges_i = _runs(ranges_i, keep.t().contiguous())
    return (ranges_i, slices_i, redranges_j, ranges_j, slices_j, redranges_i)


class SparseBackend(Backend):
    """Block-sparse truncated KeOps reductions (D <= 3, no gradients); exact on kept blocks.

    ``truncation``: log-ratio below which cluster pairs are dropped (every dropped entry weighs
    less than ``exp(-truncation)`` times a kept entry of its row). ``cell_size``: grid cell side;
    by default ``R / 4`` for the rows and ``R / 6`` for the columns, with R the truncation radius
    (``sqrt(truncation·eps)`` for sqeuclidean, ``truncation·eps`` for euclidean), enlarged by
    1.25x until clusters hold >= 64 (rows) / 16 (columns) points on average and a cloud has at
    most 4096 clusters.
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
        self._decisions: OrderedDict[tuple, bool] = OrderedDict()

    def __repr__(self) -> str:
        return f"SparseBackend(truncation={self.truncation}, cell_size={self.cell_size})"

    # -- clustering ---------------------------------------------------------------------------
    def clustering(self, x: torch.Tensor, eps: float, cost: str, role: str = "rows") -> Clustering:
        """The (cached) clustering of cloud x (n, D) for temperature ``eps``, as ``role`` "rows" or "cols"."""
        x = x.detach()
        if self.cell_size is None:
            start = truncation_radius(eps, cost, self.truncation) / CELLS_PER_RADIUS[role]
        else:
            start = self.cell_size
        key = (_fingerprint(x), start, self.cell_size is None and role)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[1]
        size = start
        if self.cell_size is None:
            k = int(grid_labels(x, size).max()) + 1
            while k > 1 and (x.shape[0] < MIN_MEAN_POINTS[role] * k or k > MAX_CLUSTERS):
                size *= CELL_GROWTH
                k = int(grid_labels(x, size).max()) + 1
        c = cluster_cloud(x, size)
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
        cx, cy = self.clustering(x, eps, cost, "rows"), self.clustering(y, eps, cost, "cols")
        lw = logw.detach()[cy.perm].contiguous() if logw is not None else None
        keep = _keep_mask(cx, cy, eps, cost, self.truncation, lw, self_offset is not None)
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

        Cheap: one clustering per cloud (cached and reused by the reductions) and an O(K_I·K_J)
        mask, computed once per (x, y, eps, cost); the clouds' memory stays referenced by the cache.
        """
        if x.shape[-1] > 3 or x.shape[0] * y.shape[0] < MIN_PAIRS:
            return False
        key = (_fingerprint(x.detach()), _fingerprint(y.detach()), float(eps), cost)
        if key not in self._decisions:
            cx, cy, keep = self.plan_blocks(x, y, eps, cost)
            self._decisions[key] = self.kept_fraction(cx, cy, keep)[1] < KEPT_FRACTION
            while len(self._decisions) > self.cache_size:
                self._decisions.popitem(last=False)
        return self._decisions[key]

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
        s.ranges = block_ranges(cx.ranges, cy.ranges, keep)
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

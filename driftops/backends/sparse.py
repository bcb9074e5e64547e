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
With log-weights and the squared Euclidean cost, a kept block must also pass a tighter test that
follows the log-weights' trend across each cell and pays the row box's width on the kernel's scale
rather than on the transport's displacement (:func:`_centred_excess`): ~15% fewer pairs for Sinkhorn's
drift at 65k points. Kept blocks are reused while the log-weights move by less than a slack (see
:class:`SparseBackend`), so a Sinkhorn loop plans a pair of clouds about once instead of every half-step.
Above 2^20 cluster pairs the rule is not evaluated on all K_I * K_J pairs: a lower bound from the
4 nearest representatives limits the distance of any kept pair, and a k-d tree (scipy) lists the
candidate pairs within it (see :func:`_keep_blocks`); the kept pairs are nearly the same.
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

from ..costs import cost_power
from ..errors import DriftopsError
from .base import Backend
from .keops import LazyTensor, compiled_once, keops_logits, lse_and_mean, reduction_kind, top_logits

# Cell-size rule: cells of side truncation_radius / CELLS_PER_RADIUS, grown by CELL_GROWTH until a cluster holds
# MIN_MEAN_POINTS points on average and a cloud has at most MAX_CLUSTERS clusters. Smaller cells keep fewer pairs,
# and much fewer under Sinkhorn's log-weights g/eps, which vary strongly inside a large cell and loosen the block
# bound (2D Gaussian vs checkerboard, eps = 0.01: at 8k points, 16 instead of 64 points per cluster made Sinkhorn
# iterations 1.65x faster; at 65k, unweighted reductions 1.5x faster). Costs that grow with the number of clusters:
# the keep mask, ~80 ns per cluster pair (a k-d tree lists candidate pairs above 2^20 of them), and one OpenMP
# region per ROW cluster (~10 us); consecutive kept COLUMN clusters are merged into one range. At 1M points the
# cap decides: one-sided drift of 1M vs 1M points at eps = 0.01 in 230 s with 16384 clusters, 440 s with 32768.
CELLS_PER_RADIUS = 8.0
MIN_MEAN_POINTS = 16
# On a GPU a KeOps thread block reads a whole cluster: clusters of ~16 points would leave most of it idle.
GPU_MIN_MEAN_POINTS = 256
CELL_GROWTH = 1.25
MAX_CLUSTERS = 1 << 14
# Grids of at most this many cells per point are labelled by counting (no sort).
BINCOUNT_CELLS = 4
# Below this many cluster pairs the keep mask is computed densely (no k-d tree).
DENSE_MASK_PAIRS = 1 << 20
# The centred test for log-weighted blocks runs where the constant bound keeps at most this share of the cluster pairs:
# wide kernels keep most pairs anyway (8192 points, Sinkhorn's weights: 2% fewer pairs at eps 0.1, for twice the
# planning time; 11-16% fewer at eps 0.01-0.003).
REFINE_MAX_SHARE = 0.25
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
    cells = math.prod(float(e) for e in extent)
    if cells < 2.0**62:
        lin = q[:, 0]
        for d in range(1, x.shape[1]):
            lin = lin * extent[d] + q[:, d]
        if cells > BINCOUNT_CELLS * x.shape[0]:
            return torch.unique(lin, return_inverse=True)[1]
        present = torch.bincount(lin, minlength=int(cells)) > 0  # O(n + cells), no sort
        return (torch.cumsum(present, 0) - 1)[lin]
    return torch.unique(q, dim=0, return_inverse=True)[1]


def cluster_ranges(labels: torch.Tensor, points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, 2) int64 ``[start, end)`` ranges, (K, D) centroids and (K,) int64 counts of the K clusters of
    sorted ``labels`` (n,) over ``points`` (n, D). Like pykeops's ``cluster_ranges_centroids``, whose
    float32 cumulative sum is wrong past 2^24 points, but with int64 offsets."""
    counts = torch.bincount(labels, minlength=k)
    ends = torch.cumsum(counts, 0)
    centroids = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device).index_add_(0, labels, points)
    return torch.stack([ends - counts, ends], 1), centroids / counts[:, None], counts


def cluster_cloud(x: torch.Tensor, size: float) -> Clustering:
    """Sort x (n, D) into grid cells of side ``size`` (see :class:`Clustering`)."""
    labels = grid_labels(x, size)
    labels, perm = torch.sort(labels)
    points = x[perm].contiguous()
    pts = points.to(torch.float64)
    k, d = int(labels[-1]) + 1, x.shape[1]
    ranges, centroids, counts = cluster_ranges(labels, pts, k)
    idx = labels[:, None].expand(-1, d)
    lo = pts.new_full((k, d), math.inf).scatter_reduce(0, idx, pts, "amin")
    hi = pts.new_full((k, d), -math.inf).scatter_reduce(0, idx, pts, "amax")
    # Representative: the first point at the smallest distance to its cluster's centroid.
    dist = ((pts - centroids[labels]) ** 2).sum(1)
    nearest = dist.new_full((k,), math.inf).scatter_reduce(0, labels, dist, "amin")
    order = torch.arange(pts.shape[0], device=x.device)
    cand = torch.where(dist == nearest[labels], order, pts.shape[0])
    rep = torch.full((k,), pts.shape[0], dtype=torch.long, device=x.device).scatter_reduce(0, labels, cand, "amin")
    return Clustering(points, perm, labels, ranges, counts, lo, hi, rep, size)


def truncation_radius(eps: float, cost: str, truncation: float) -> float:
    """Distance at which the kernel has decayed by ``exp(-truncation)``: sqrt(thr·eps) or thr·eps."""
    return math.sqrt(truncation * eps) if cost_power(cost) == 2 else truncation * eps


def _fingerprint(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents cheaply: its storage and version counter (a checksum for
    inference tensors, which have no version counter). The cache holds a reference to the tensor,
    so its memory, hence its data_ptr, cannot be reused by another tensor while the entry lives."""
    version = float(t.double().sum()) if t.is_inference() else t._version
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d a[..., d] * b[..., d]`` (broadcast), one dimension at a time: a reduction over a last dimension of
    size 2 or 3 is several times slower in torch."""
    out = a[..., 0] * b[..., 0]
    for d in range(1, a.shape[-1]):
        out = out + a[..., d] * b[..., d]
    return out


@dataclass(frozen=True)
class ColumnBounds:
    """Bounds on the column log-weights of each column cluster J (float64, K_J clusters, D dims).

    lmax: (K_J,) largest log-weight; lrep: (K_J,) log-weight of the representative point, rep: (K_J, D).
    Affine bound (sqeuclidean cost with log-weights, else None): ``logw_j <= top_J + <slope_J, y_j - centre_J>``
    for every j in J, with ``slope`` (K_J, D) a least-squares fit and ``top`` (K_J,) the smallest offset that
    makes it hold, ``centre_J`` the centre of J's box. Sinkhorn's ``log b + g/eps`` varies across a cell mostly
    along ``grad g / eps``, which the affine bound follows and the constant ``lmax`` does not.
    """

    lmax: torch.Tensor
    lrep: torch.Tensor
    rep: torch.Tensor
    slope: torch.Tensor | None = None
    top: torch.Tensor | None = None


def _column_bounds(cy: Clustering, logw: torch.Tensor | None, cost: str) -> ColumnBounds:
    """The :class:`ColumnBounds` of the clustered columns ``cy`` with log-weights ``logw`` (M,) sorted as cy."""
    rep = cy.points[cy.rep].to(torch.float64)
    k_j, d = cy.lo.shape
    if logw is None:
        zero = cy.lo.new_zeros(k_j)
        return ColumnBounds(zero, zero, rep)
    lw = logw.detach().to(torch.float64)
    lab = cy.labels
    lmax = lw.new_full((k_j,), -math.inf).scatter_reduce(0, lab, lw, "amax")
    if cost_power(cost) != 2:
        return ColumnBounds(lmax, lw[cy.rep], rep)
    centre = (cy.lo + cy.hi) / 2
    dy = cy.points.to(torch.float64) - centre[lab]
    finite = torch.isfinite(lw)
    h = torch.where(finite, lw - lmax[lab], 0.0)  # finite wherever lw is
    w = finite.to(torch.float64)
    n = lw.new_zeros(k_j).index_add_(0, lab, w).clamp_min_(1.0)
    yc = (dy - lw.new_zeros(k_j, d).index_add_(0, lab, dy * w[:, None]).div_(n[:, None])[lab]) * w[:, None]
    hc = (h - lw.new_zeros(k_j).index_add_(0, lab, h).div_(n)[lab]) * w
    cov = lw.new_zeros(k_j, d, d).index_add_(0, lab, yc[:, :, None] * yc[:, None, :])
    ridge = 1e-9 * cy.cell_size**2 * n[:, None, None] * torch.eye(d, dtype=lw.dtype, device=lw.device)
    slope = torch.linalg.solve(cov + ridge, lw.new_zeros(k_j, d).index_add_(0, lab, yc * hc[:, None]))
    slope = torch.where(torch.isfinite(slope), slope, 0.0)  # any slope gives a valid bound
    top = lw.new_full((k_j,), -math.inf).scatter_reduce(0, lab, lw - _dot(dy, slope[lab]), "amax")
    return ColumnBounds(lmax, lw[cy.rep], rep, slope, top)


def _centred_excess(cx: Clustering, cy: Clustering, cols: ColumnBounds, ii: torch.Tensor, jj: torch.Tensor, ri: torch.Tensor, eps: float) -> torch.Tensor:
    """(P,) upper bound of ``logit(x, y) - logit(x, r)`` over x in box I = ii, y in cluster J = jj and the representative
    r of cluster ri (squared Euclidean cost). Around I's box centre c, with x = c + u and |u_d| <= a_d (half-widths),
    ``logit(x, y) = psi(y) + 2 <u, y - c> / eps - |u|^2 / eps`` with ``psi(y) = logw_y - |y - c|^2 / eps``, so the
    difference is at most ``max_J psi - psi(r) + 2 sum_d a_d max_J |y_d - r_d| / eps``: the box's width is paid on
    the distance from y to r (the kernel's width), not on the distance from x to them (the transport's displacement).
    ``max_J psi`` uses the affine bound of the log-weights: per dimension, the concave
    ``s (y - centre) - (y - c)^2 / eps`` peaks at ``c + s eps / 2``, clamped to J's interval."""
    c, half = (cx.lo[ii] + cx.hi[ii]) / 2, (cx.hi[ii] - cx.lo[ii]) / 2
    r = cols.rep[ri]
    excess = cols.top[jj] - cols.lrep[ri] + _dot(r - c, r - c) / eps
    for d in range(cx.lo.shape[1]):
        lo, hi, cd, rd, s = cy.lo[jj, d], cy.hi[jj, d], c[:, d], r[:, d], cols.slope[jj, d]
        y = (cd + s * (eps / 2)).clamp_(lo, hi)
        excess += s * (y - (lo + hi) / 2)
        excess += (2 * half[:, d] * torch.maximum((lo - rd).abs_(), (hi - rd).abs_()) - (y - cd) ** 2) / eps
    return excess


def _refine(cx: Clustering, cy: Clustering, cols: ColumnBounds, ii: torch.Tensor, jj: torch.Tensor, best: torch.Tensor, eps: float, truncation: float) -> torch.Tensor:
    """(P,) whether the pairs (ii, jj) pass the centred rule for the best representatives ``best`` (P, R) of their row
    clusters (columns r of largest ``logit(c_I, r)``): block J is dropped only if every row of I has a representative
    entry exceeding all of J's by more than ``truncation``. With a self mask R = 2: either may be a row's masked self
    pair, never both."""
    keep = torch.zeros_like(ii, dtype=torch.bool)
    for r in range(best.shape[1]):
        keep |= _centred_excess(cx, cy, cols, ii, jj, best[:, r], eps) >= -truncation
    return keep


def _best_representatives(cx: Clustering, cols: ColumnBounds, ii: torch.Tensor, jj: torch.Tensor, k_i: int, eps: float, count: int) -> torch.Tensor:
    """(K_I, count <= 2) the column clusters among the pairs (ii, jj) (every row cluster in ii at least once) whose
    representatives have the largest logits at the centre of I's box (the best one twice if there is one only)."""
    centre = (cx.lo[ii] + cx.hi[ii]) / 2
    gap = cols.rep[jj] - centre
    value = cols.lrep[jj] - _dot(gap, gap) / eps
    order = torch.sort(value, descending=True, stable=True).indices
    order = order[torch.sort(ii[order], stable=True).indices]
    counts = torch.bincount(ii, minlength=k_i)
    first = torch.cumsum(counts, 0) - counts
    return torch.stack([jj[order[first]], jj[order[first + (counts >= 2)]]], 1)[:, :count]


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
    cols = _column_bounds(cy, logw, cost)
    lmax, lrep, rep = cols.lmax, cols.lrep, cols.rep
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
        rows = lmax[None] - cmin / eps >= (best - truncation)[:, None]
        if cols.slope is not None and rows.sum() <= REFINE_MAX_SHARE * rows.numel():
            centre = (cx.lo[s : s + step] + cx.hi[s : s + step]) / 2
            gap = rep[None] - centre[:, None]
            at_centre = lrep[None] - _dot(gap, gap) / eps
            top = at_centre.topk(min(1 + self_mask, k_j), dim=1).indices
            ki, kj = rows.nonzero(as_tuple=True)
            rows[ki, kj] = _refine(cx, cy, cols, ki + s, kj, top[ki], eps, truncation)
        keep[s : s + step] = rows
    return keep


@dataclass(frozen=True)
class Blocks:
    """Kept cluster pairs (I, J) as maximal runs of consecutive kept column clusters of one row cluster (contiguous
    points in the sorted column cloud), sorted by I then J: run r covers ``(i[r], j)`` for ``start[r] <= j <= end[r]``;
    ``i``, ``start``, ``end`` (R,) int64; ``shape`` = (K_I, K_J)."""

    i: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_mask(cls, keep: torch.Tensor) -> "Blocks":
        """The runs of a (K_I, K_J) boolean mask, with one host sync (the number of runs)."""
        step = torch.diff(torch.nn.functional.pad(keep.to(torch.int8), (1, 1)), dim=1)
        at = step.nonzero()  # in (I, J) order: each run's first column, then the column after its last
        return cls(at[0::2, 0], at[0::2, 1], at[1::2, 1] - 1, tuple(keep.shape))

    @classmethod
    def from_pairs(cls, i: torch.Tensor, j: torch.Tensor, shape: tuple[int, int]) -> "Blocks":
        """The runs of kept pairs ``(i, j)`` (P,) sorted by i then j."""
        new = torch.ones_like(i, dtype=torch.bool)
        new[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1] + 1)
        starts = new.nonzero()[:, 0]
        ends = torch.cat([starts[1:], starts.new_tensor([i.numel()])])[: starts.numel()] - 1
        return cls(i[starts], j[starts], j[ends], shape)

    def dense(self) -> torch.Tensor:
        """The (K_I, K_J) boolean mask (small problems and tests only)."""
        j = torch.arange(self.shape[1], device=self.i.device)
        inside = (j >= self.start[:, None]) & (j <= self.end[:, None])
        return torch.zeros(self.shape, dtype=torch.long, device=self.i.device).index_add_(0, self.i, inside.long()) > 0

    def per_row(self) -> torch.Tensor:
        """(K_I,) number of kept column clusters of each row cluster."""
        return torch.zeros(self.shape[0], dtype=torch.long, device=self.i.device).index_add_(0, self.i, self.end - self.start + 1)


def _group_best(group: torch.Tensor, values: torch.Tensor, n: int, second: bool) -> torch.Tensor:
    """(n,) largest (``second``: second largest, -inf if none) of ``values`` in each group."""
    out = values.new_full((n,), -math.inf)
    if not second:
        return out.scatter_reduce(0, group, values, "amax")
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    counts = torch.bincount(group, minlength=n)
    first = torch.cumsum(counts, 0) - counts
    has2 = counts >= 2
    out[has2] = values[order[first[has2] + 1]]
    return out


def _pair_bounds(cx, cy, ii, jj, eps, p, lmax, lrep, rep) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bound ``U_IJ`` and reached lower bound ``b_IJ`` (module docstring) of the pairs (ii, jj)."""
    dmin2 = dfar2 = 0.0
    for d in range(cx.lo.shape[1]):
        lo, hi = cx.lo[ii, d], cx.hi[ii, d]
        gap = torch.maximum(cy.lo[jj, d] - hi, lo - cy.hi[jj, d]).clamp_min_(0.0)
        r = rep[jj, d]
        far = torch.maximum((r - lo).abs_(), (hi - r).abs_())
        dmin2, dfar2 = gap.mul_(gap) + dmin2, far.mul_(far) + dfar2
    cmin, cfar = (dmin2, dfar2) if p == 2 else (dmin2.sqrt(), dfar2.sqrt())
    return lmax[jj] - cmin / eps, lrep[jj] - cfar / eps


def _keep_blocks(
    cx: Clustering,
    cy: Clustering,
    eps: float,
    cost: str,
    truncation: float,
    logw: torch.Tensor | None,
    self_mask: bool,
) -> Blocks:
    """The kept cluster pairs, without the O(K_I * K_J) mask when the kernel is local.

    1. ``B0_I``: the rule's lower bound over the 4 column clusters whose representatives are nearest
       to I's box centre (a lower bound over a subset is still reached by a real entry of every row).
    2. No pair farther apart than ``rho_I`` can be kept, with ``c(rho_I)/eps = max_J Lmax_J - B0_I +
       truncation``: candidate pairs come from a k-d tree ball query on box centres (radius
       ``rho_I`` + both half-diagonals).
    3. On the candidates: ``B_I = max(B0_I, best b_IJ)`` and the rule ``U_IJ >= B_I - truncation``.
    Falls back to :func:`_keep_mask` when the candidates exceed a quarter of all pairs (wide
    kernel, or strongly varying log-weights), or on non-CPU tensors.
    """
    k_i, k_j = cx.lo.shape[0], cy.lo.shape[0]
    if k_i * k_j <= DENSE_MASK_PAIRS or cx.lo.device.type != "cpu" or (self_mask and k_j < 2):
        return Blocks.from_mask(_keep_mask(cx, cy, eps, cost, truncation, logw, self_mask))
    from scipy.spatial import cKDTree

    p = cost_power(cost)
    cols = _column_bounds(cy, logw, cost)
    lmax, lrep, rep = cols.lmax, cols.lrep, cols.rep
    centre_i, centre_j = (cx.lo + cx.hi) / 2, (cy.lo + cy.hi) / 2
    half_i, half_j = (cx.hi - cx.lo).norm(dim=1) / 2, float((cy.hi - cy.lo).norm(dim=1).amax()) / 2
    tree = cKDTree(rep.numpy())
    k0 = min(4, k_j)
    _, near = tree.query(centre_i.numpy(), k=k0)
    near = torch.as_tensor(near, dtype=torch.long).reshape(k_i, k0)
    i0 = torch.arange(k_i).repeat_interleave(k0)
    _, b0 = _pair_bounds(cx, cy, i0, near.reshape(-1), eps, p, lmax, lrep, rep)
    best = _group_best(i0, b0, k_i, self_mask)
    reach = float(lmax.amax()) - best + truncation  # c(rho_I) / eps
    rho = (eps * reach).sqrt() if p == 2 else eps * reach
    radius = rho + half_i + half_j
    # Expected candidates ~ sum_I (number of column clusters within radius): bail out early when wide.
    area_j = float(((cy.hi - cy.lo).amax(1) ** cy.lo.shape[1]).mean().clamp_min(1e-300))
    extent = (cy.hi.amax(0) - cy.lo.amin(0)).clamp_min(1e-300)
    if not bool(torch.isfinite(radius).all()) or float((radius.clamp_max(float(extent.norm())) ** cy.lo.shape[1]).sum()) > 0.25 * k_i * k_j * area_j:
        return Blocks.from_mask(_keep_mask(cx, cy, eps, cost, truncation, logw, self_mask))
    ctree = cKDTree(centre_j.numpy())
    lists = ctree.query_ball_point(centre_i.numpy(), r=radius.numpy(), return_sorted=False)
    sizes = torch.as_tensor([len(v) for v in lists], dtype=torch.long)
    if int(sizes.sum()) > 0.25 * k_i * k_j:
        return Blocks.from_mask(_keep_mask(cx, cy, eps, cost, truncation, logw, self_mask))
    import numpy as np

    jj = torch.as_tensor(np.concatenate([np.asarray(v, dtype=np.int64) for v in lists]), dtype=torch.long)
    ii = torch.arange(k_i).repeat_interleave(sizes)
    upper, lower = _pair_bounds(cx, cy, ii, jj, eps, p, lmax, lrep, rep)
    best = torch.maximum(best, _group_best(ii, lower, k_i, self_mask))
    kept = upper >= (best - truncation)[ii]
    if cols.slope is not None and kept.sum() <= REFINE_MAX_SHARE * k_i * k_j:
        reps = _best_representatives(cx, cols, torch.cat([i0, ii]), torch.cat([near.reshape(-1), jj]), k_i, eps, 1 + self_mask)
        ii, jj = ii[kept], jj[kept]
        kept = _refine(cx, cy, cols, ii, jj, reps[ii], eps, truncation)
    key = torch.sort(ii[kept] * k_j + jj[kept]).values
    return Blocks.from_pairs(key // k_j, key % k_j, (k_i, k_j))


def _spread(old: torch.Tensor | None, new: torch.Tensor | None) -> float:
    """How far log-weights moved from ``old`` to ``new`` (M,), up to a constant (which no row's ratios see): max - min
    of ``new - old`` over the finite entries; 0 without log-weights, inf if the finite entries differ."""
    if old is None or new is None:
        return 0.0 if old is None and new is None else math.inf
    finite = torch.isfinite(new)
    if not torch.equal(finite, torch.isfinite(old)):
        return math.inf
    moved = (new - old)[finite]
    return float(moved.amax() - moved.amin()) if moved.numel() else 0.0


@dataclass(frozen=True)
class _Plan:
    """Kept blocks of one call: its clouds (held, so their ``data_ptr`` in the cache key is not reused), their
    clusterings, the sorted float64 column log-weights (or None) and truncation they were planned for."""

    x: torch.Tensor
    y: torch.Tensor
    cx: Clustering
    cy: Clustering
    logw: torch.Tensor | None
    truncation: float
    blocks: Blocks


def block_ranges(ranges_i: torch.Tensor, ranges_j: torch.Tensor, blocks: Blocks) -> tuple[torch.Tensor, ...]:
    """The 6-tuple ``LazyTensor.ranges`` of the kept blocks, one column range per run of column clusters.

    Only reductions over j (``dim=1``) are ever run, which read the first three ranges; the last three
    (for reductions over i) describe the dense pattern instead of transposing the blocks.
    """
    slices_i = torch.bincount(blocks.i, minlength=blocks.shape[0]).cumsum(0)
    redranges_j = torch.stack([ranges_j[blocks.start, 0], ranges_j[blocks.end, 1]], 1)
    n = ranges_i[-1, 1]
    k_j = ranges_j.shape[0]
    slices_j = torch.arange(1, k_j + 1, dtype=slices_i.dtype, device=ranges_i.device)
    redranges_i = torch.stack([torch.zeros_like(n), n]).reshape(1, 2).expand(k_j, 2).contiguous()
    return (ranges_i, slices_i, redranges_j, ranges_j, slices_j, redranges_i)


class SparseBackend(Backend):
    """Block-sparse truncated KeOps reductions (D <= 3, no gradients); exact on kept blocks.

    ``truncation``: log-ratio below which cluster pairs are dropped (every dropped entry weighs
    less than ``exp(-truncation)`` times a kept entry of its row). ``slack``: kept blocks planned for
    column log-weights are planned at ``truncation + slack`` and reused by later calls on the same clouds
    whose log-weights moved by at most ``slack`` up to a constant (a Sinkhorn loop's successive
    potentials), so the rule still holds for them; 0 plans every call anew. ``cell_size``: grid cell side;
    by default ``R / 8`` for both clouds, with R the truncation radius (``sqrt(truncation·eps)``
    for sqeuclidean, ``truncation·eps`` for euclidean), enlarged by 1.25x until clusters hold
    >= 16 points on average (256 on a GPU) and a cloud has at most 16384 clusters.
    """

    name = "sparse"
    cache_size = 8

    def __init__(self, truncation: float = 20.0, cell_size: float | None = None, slack: float = 0.5) -> None:
        if truncation <= 0:
            raise DriftopsError(f"truncation must be > 0 (a log-ratio, e.g. 20), got {truncation!r}")
        if not slack >= 0:
            raise DriftopsError(f"slack must be >= 0 (a log-ratio, e.g. 0.5), got {slack!r}")
        if cell_size is not None and cell_size <= 0:
            raise DriftopsError(f"cell_size must be > 0 or None (automatic), got {cell_size!r}")
        self.truncation = float(truncation)
        self.cell_size = cell_size
        self.slack = float(slack)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, Clustering]] = OrderedDict()
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()

    def __repr__(self) -> str:
        return f"SparseBackend(truncation={self.truncation}, cell_size={self.cell_size}, slack={self.slack})"

    # -- clustering ---------------------------------------------------------------------------
    def clustering(self, x: torch.Tensor, eps: float, cost: str) -> Clustering:
        """The (cached) clustering of cloud x (n, D) for temperature ``eps``, as rows or columns alike."""
        x = x.detach()
        if self.cell_size is None:
            start = truncation_radius(eps, cost, self.truncation) / CELLS_PER_RADIUS
        else:
            start = self.cell_size
        key = (_fingerprint(x), start)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[1]
        size = start
        if self.cell_size is None:
            k = int(grid_labels(x, size).max()) + 1
            least = MIN_MEAN_POINTS if x.device.type == "cpu" else GPU_MIN_MEAN_POINTS
            while k > 1 and (x.shape[0] < least * k or k > MAX_CLUSTERS):
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
        self_mask: bool = False,
    ) -> tuple[Clustering, Clustering, Blocks]:
        """Clusterings of x and y and the kept cluster pairs for these logits (``self_mask``: one pair
        per row is masked), reused from an earlier call on the same clouds when allowed (see ``slack``)."""
        self._check(x, y)
        x, y = x.detach(), y.detach()
        cx, cy = self.clustering(x, eps, cost), self.clustering(y, eps, cost)
        lw = logw.detach()[cy.perm].to(torch.float64) if logw is not None else None
        key = (_fingerprint(x), _fingerprint(y), eps, cost, self_mask)
        hit = self._plans.get(key)
        if (
            hit is not None
            and hit.cx is cx
            and hit.cy is cy
            and hit.truncation - self.truncation >= _spread(hit.logw, lw)
        ):
            self._plans.move_to_end(key)
            return cx, cy, hit.blocks
        truncation = self.truncation + (self.slack if lw is not None else 0.0)
        # Every row cluster keeps at least the block of its B_I (module docstring): no check (a host sync) needed.
        keep = _keep_blocks(cx, cy, eps, cost, truncation, lw, self_mask)
        self._plans[key] = _Plan(x, y, cx, cy, lw, truncation, keep)
        while len(self._plans) > self.cache_size:
            self._plans.popitem(last=False)
        return cx, cy, keep

    @staticmethod
    def kept_fraction(cx: Clustering, cy: Clustering, keep: Blocks) -> tuple[float, float]:
        """(fraction of cluster pairs kept, fraction of point pairs kept)."""
        ends = torch.cumsum(cy.counts.double(), 0)
        cols = ends[keep.end] - ends[keep.start] + cy.counts.double()[keep.start]
        pairs = float((cx.counts.double()[keep.i] * cols).sum())
        blocks = float((keep.end - keep.start + 1).sum()) / (keep.shape[0] * keep.shape[1])
        return blocks, pairs / (float(cx.counts.sum()) * float(cy.counts.sum()))

    # -- reductions -----------------------------------------------------------------------------
    @staticmethod
    def _check(x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[-1] > 3:
            raise DriftopsError(
                f"the sparse backend handles points in dimension D <= 3, got D = {x.shape[-1]}; "
                "use backend='keops' (or 'auto', which picks it) for higher dimensions"
            )

    def _logits(self, x, y, eps, cost, logw, diag) -> tuple[LazyTensor, Clustering, Clustering]:
        cx, cy, keep = self.plan_blocks(x, y, eps, cost, logw, diag is not None)
        lw = logw.detach()[cy.perm].contiguous() if logw is not None else None
        s = keops_logits(cx.points, cy.points, eps, cost, lw, None if diag is None else diag[cx.perm], cy.perm)
        s.ranges = block_ranges(cx.ranges, cy.ranges, keep)
        return s, cx, cy

    @staticmethod
    def _unsort(out: torch.Tensor, cx: Clustering) -> torch.Tensor:
        res = torch.empty_like(out)
        res[cx.perm] = out
        return res

    def reduce_lse(self, x, y, eps, cost, logw, diag):
        """``log sum_j exp(logw_j - c(x_i, y_j)/eps)`` over kept j != diag_i, shape (N,), original order."""
        s, cx, _ = self._logits(x, y, eps, cost, logw, diag)
        out = compiled_once(reduction_kind("sparse lse", x, None, cost, diag), lambda: s.logsumexp(dim=1))
        return self._unsort(out.reshape(-1), cx)

    def reduce_mean(self, x, y, eps, cost, values, logw, diag):
        """``sum_j softmax_j(S_ij) values_j`` over kept j != diag_i, values (M, E) -> (N, E), original order."""
        s, cx, cy = self._logits(x, y, eps, cost, logw, diag)
        v = values.detach()[cy.perm].contiguous()
        out = compiled_once(reduction_kind("sparse mean", x, v, cost, diag), lambda: lse_and_mean(s, v)[1])
        return self._unsort(out, cx)

    def reduce_topk(self, x, y, eps, cost, logw, k):
        """The k largest kept logits of each row and their columns, original orders (logit -inf: missing)."""
        s, cx, cy = self._logits(x, y, eps, cost, logw, None)
        top, cols = compiled_once(reduction_kind(f"sparse top{k}", x, None, cost, None), lambda: top_logits(s, k))
        return self._unsort(top, cx), self._unsort(cy.perm[cols], cx)

    def reduce_lse_mean(self, x, y, eps, cost, values, logw):
        """``reduce_lse`` and ``reduce_mean`` (no mask) from one block-sparse reduction, original order."""
        s, cx, cy = self._logits(x, y, eps, cost, logw, None)
        v = values.detach()[cy.perm].contiguous()
        lse, mean = compiled_once(reduction_kind("sparse mean", x, v, cost, None), lambda: lse_and_mean(s, v))
        return self._unsort(lse, cx), self._unsort(mean, cx)

"""Transport plans, written once over the reduction interface.

A plan from a source cloud (rows i) to a destination cloud (columns j) is
represented by column log-weights ``w_j`` such that its row-normalised weights
are ``P_ij = softmax_j(w_j - c(x_i, y_j)/eps)``; the barycentric map is then
one ``weighted_mean``:

* ``one_sided``: ``w_j = log m_j`` (m: destination multiplicities);
* ``two_sided``: ``w_j = log m_j - c_j/2`` with ``c_j = LSE_i(log a_i - c_ij/eps)``,
  i.e. ``P ∝ sqrt(row-softmax · column-softmax)``;
* ``sinkhorn``: ``w_j = log b_j + g_j/eps`` with ``g`` the Sinkhorn potential for the
  marginals a, b (normalised multiplicities), found by log-domain iterations to
  an L1 marginal error below ``tol``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .backends import SPARSE_MAX_DIM, AutoBackend, SparseBackend
from .backends.sparse import grid_labels
from .costs import cost_power, eps_schedule, max_cost
from .parallel import Cloud, Geometry

PLANS = ("one_sided", "two_sided", "sinkhorn")
# Relaxation factor of the g-update at the target temperature: about 1.8x fewer iterations than plain
# Sinkhorn at eps = 0.01 to 0.05 on 2D clouds (measured), reset to 1 whenever the marginal error grows.
OVERRELAXATION = 1.6
# Warm potentials whose marginal error is below WARM_ACCEPT are iterated directly; worse ones re-anneal
# from WARM_RESTART * eps: coarse temperatures fix the global (low-frequency) part of the error quickly,
# which plain iterations at a small eps fix slowly (measured: re-annealing from 2-16 eps cost more iterations
# than a cold start after a unit flow step at eps = 0.02; from 64 eps, the same as a cold start).
WARM_ACCEPT = 0.05
WARM_RESTART = 64.0
# Coarse-to-fine annealing (backends "auto" and "sparse", D <= 3): at an annealing temperature e, a cloud is seen as
# the mass-weighted centroids of grid cells of side (kernel width at e) / LEVEL_CELLS when that leaves at most
# 1 / LEVEL_MIN_SHRINK of its points; potentials move between levels by one c-transform (as in GeomLoss's multiscale
# backend). The target temperature always runs on the points themselves. 20k Gaussian vs checkerboard points in 2D,
# eps = 0.01: the cold annealing's first 25 temperatures then cost seconds instead of a minute.
LEVEL_CELLS = 2.0
LEVEL_MIN_SHRINK = 4
# The coarse level's own solve at the target temperature stops at tol / COARSE_TOL_FACTOR.
COARSE_TOL_FACTOR = 3.0


@dataclass
class SinkhornResult:
    """Log-domain Sinkhorn potentials (full clouds) for ``P_ij = a_i b_j exp((f_i + g_j - c_ij)/eps)``.

    For a self problem (source = destination) ``g`` is ``f``. ``marginal_error``
    is the L1 error of the column marginal when rows are exact.
    """

    f: torch.Tensor
    g: torch.Tensor
    eps: float
    iterations: int
    marginal_error: float
    converged: bool


def _update(geom: Geometry, rows: Cloud, cols: Cloud, pot_cols: torch.Tensor, eps: float) -> torch.Tensor:
    """The full (gathered) potential on ``rows`` that makes the plan's row marginals exact."""
    local = -eps * geom.lse(rows.local, cols, cols.log_marginal() + pot_cols / eps, None, eps)
    return rows.gather(local)


def _level(cloud: Cloud, geom: Geometry, eps: float) -> Cloud:
    """``cloud`` as seen at annealing temperature ``eps``: itself, or the (K, D) mass-weighted centroids of its
    grid cells (see ``LEVEL_CELLS``), held whole by every rank, with their masses as weights. Ring mode (no
    ``cloud.full``) has no coarse levels."""
    pts = cloud.full
    if pts is None or not isinstance(geom.backend, (AutoBackend, SparseBackend)) or pts.shape[1] > SPARSE_MAX_DIM:
        return cloud
    width = math.sqrt(eps) if cost_power(geom.cost) == 2 else eps
    labels = grid_labels(pts, width / LEVEL_CELLS)
    k = int(labels.max()) + 1
    if k * LEVEL_MIN_SHRINK > pts.shape[0]:
        return cloud
    weights = cloud.log_marginal().exp()
    mass = torch.zeros(k, dtype=pts.dtype, device=pts.device).index_add_(0, labels, weights)
    centroids = torch.zeros(k, pts.shape[1], dtype=pts.dtype, device=pts.device).index_add_(0, labels, pts * weights[:, None])
    centroids = centroids / mass.clamp_min(torch.finfo(pts.dtype).tiny)[:, None]
    return Cloud(centroids, centroids, 0, mass.log())


def _marginal_error(marginal_log: torch.Tensor, old: torch.Tensor, new: torch.Tensor, eps: float) -> float:
    """L1 error ``sum_j b_j |exp((old_j - new_j)/eps) - 1|`` of the marginal implied by ``old``."""
    ratio = torch.exp(((old - new) / eps).clamp(max=50.0))
    return float((marginal_log.exp() * (ratio - 1).abs()).sum())


def _iterate(
    geom: Geometry, src: Cloud, dst: Cloud | None, f: torch.Tensor, g: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Sinkhorn iterations at ``geom.eps`` from ``f`` (on src) and ``g`` (on dst; ignored when ``dst`` is None, the
    self problem) until the L1 marginal error is below ``tol``: returns (f, g, error, iterations)."""
    eps = geom.eps
    err, it = math.inf, 0
    if dst is None:
        for it in range(1, max_iter + 1):
            f_new = _update(geom, src, src, f, eps)
            err = _marginal_error(src.log_marginal(), f, f_new, eps)
            if err < tol:
                break
            f = 0.5 * (f + f_new)
        return f, f, err, it
    f = _update(geom, src, dst, g, eps)
    omega, previous = OVERRELAXATION, math.inf
    for it in range(1, max_iter + 1):
        g_new = _update(geom, dst, src, f, eps)
        err = _marginal_error(dst.log_marginal(), g, g_new, eps)
        if err < tol:
            break
        if err > previous:  # over-relaxation is only locally convergent: fall back to plain steps
            omega = 1.0
        previous = err
        g = g + omega * (g_new - g)
        f = _update(geom, src, dst, g, eps)
    return f, g, err, it


def sinkhorn(
    src: Cloud,
    dst: Cloud | None,
    geom: Geometry,
    tol: float = 1e-3,
    max_iter: int = 1000,
    annealing: float = 0.7,
    warm_start: SinkhornResult | None = None,
) -> SinkhornResult:
    """Sinkhorn potentials between ``src`` and ``dst`` (``dst=None``: the symmetric self problem).

    Anneals eps geometrically (factor ``annealing``) from the largest cost down to
    ``geom.eps`` with one update per temperature; ``warm_start`` potentials (same cloud
    sizes) are used as they are when their marginal error is below ``WARM_ACCEPT``,
    else re-annealed from ``WARM_RESTART * eps``; then iterates at ``geom.eps`` until the L1
    marginal error is below ``tol`` or ``max_iter`` iterations were done, with
    over-relaxed g-updates. With the "auto" and "sparse" backends in D <= 3, annealing temperatures run on
    coarsened clouds (see ``LEVEL_CELLS``), and after an annealing the target temperature is first solved on the
    coarsened clouds (to ``tol / COARSE_TOL_FACTOR``) when they shrink; ``iterations`` counts those on the points.
    The self problem uses the averaged symmetric update ``f <- (f + T(f)) / 2``. The returned f always makes the row marginals exact.
    """
    eps = geom.eps
    symmetric = dst is None
    dst = src if symmetric else dst
    cold = warm_start is None or warm_start.f.shape[0] != src.n or warm_start.g.shape[0] != dst.n
    top = max_cost(geom.cost, src.box(), dst.box())
    if cold:
        f = src.local.new_zeros(src.n)
        g = dst.local.new_zeros(dst.n)
    else:
        f, g = warm_start.f, warm_start.g
        rows, cols = (src, src) if symmetric else (dst, src)
        pot = f if symmetric else g
        start_error = _marginal_error(rows.log_marginal(), pot, _update(geom, rows, cols, f, eps), eps)
        top = eps if start_error < WARM_ACCEPT else min(top, WARM_RESTART * eps)
    schedule = eps_schedule(top, eps, annealing)[:-1]
    f_on, g_on = src, dst  # the clouds (fine or coarse) on which f and g live
    if cold and schedule:
        f_on, g_on = _level(src, geom, schedule[0]), _level(dst, geom, schedule[0])
        f, g = f.new_zeros(f_on.n), g.new_zeros(g_on.n)
    for k, e in enumerate(schedule):
        rows = _level(src, geom, e)
        if symmetric:
            f_new = _update(geom, rows, f_on, f, e)
            f = f_new if (cold and k == 0) or rows is not f_on else 0.5 * (f + f_new)
            f_on = rows
        else:
            f, f_on = _update(geom, rows, g_on, g, e), rows
            cols = _level(dst, geom, e)
            g, g_on = _update(geom, cols, f_on, f, e), cols
    # The target temperature: first on the coarse level when there is one (cheap; solved to tol / COARSE_TOL_FACTOR),
    # then on the points. The self problem carries f from level to level, the cross problem g (f follows from g).
    stages = [(src, dst)]
    if cold or schedule:
        coarse = (_level(src, geom, eps), dst if symmetric else _level(dst, geom, eps))
        if coarse[0] is not src and (symmetric or coarse[1] is not dst):
            stages.insert(0, coarse)
    for k, (rows, cols) in enumerate(stages):
        if symmetric and f_on is not rows:
            f = _update(geom, rows, f_on, f, eps)
        elif not symmetric and g_on is not cols:
            g, g_on = _update(geom, cols, f_on, f, eps), cols
        last = k == len(stages) - 1
        f, g, err, it = _iterate(geom, rows, None if symmetric else cols, f, g, tol if last else tol / COARSE_TOL_FACTOR, max_iter)
        f_on = rows
    converged = err < tol
    if not converged:
        warnings.warn(
            f"Sinkhorn stopped after {max_iter} iterations at eps={eps:g} with marginal error {err:.2e} > tol={tol:g}; "
            "raise max_iter, raise tol or use a larger eps",
            RuntimeWarning,
            stacklevel=3,
        )
    return SinkhornResult(f, g, eps, it, err, converged)


def column_logweights(
    plan: str,
    src: Cloud,
    dst: Cloud,
    geom: Geometry,
    mask_self: bool,
    potentials: SinkhornResult | None = None,
) -> torch.Tensor | None:
    """(M,) column log-weights of ``plan`` from ``src`` to ``dst`` (see the module docstring).

    ``mask_self`` marks a self interaction (``dst`` is ``src``) whose diagonal is
    excluded; ``potentials`` are required for ``sinkhorn``.
    """
    if plan == "one_sided":
        return dst.logw
    if plan == "two_sided":
        c = dst.gather(geom.lse(dst.local, src, src.logw, dst.offset if mask_self else None))
        return -0.5 * c if dst.logw is None else dst.logw - 0.5 * c
    return dst.log_marginal() + potentials.g / geom.eps


def barycentric(src: Cloud, dst: Cloud, geom: Geometry, logw: torch.Tensor | None, mask_self: bool) -> torch.Tensor:
    """(n, D) barycentric map ``T(x_i) = sum_j P_ij y_j`` of the local source rows."""
    return geom.weighted_mean(src.local, dst, logw, src.offset if mask_self else None)

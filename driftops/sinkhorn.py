"""The Sinkhorn solver: a frozen configuration, a precomputed list of stages, one loop.

Log-domain Sinkhorn for ``P_ij = a_i b_j exp((f_i + g_j - c(x_i, y_j))/eps)`` with marginals a (on the
source) and b (on the destination). A solve is a list of :class:`Stage` s computed up front (as GeomLoss's
``sinkhorn_loop`` runs its list of (eps, scale) pairs):

* **annealing**: temperatures falling geometrically (factor ``annealing``) from the squared diameter of the
  clouds (or from ``warm_restart * eps`` after a poor warm start), one update each, on the grid cells of their own
  temperature when there are coarse levels, never finer than the finest coarse level;
* **coarse levels** (``multiscale``, backends "auto"/"sparse", D <= 3): at the target eps, the clouds seen as
  the mass-weighted centroids of grid cells, coarsest first, each solved to ``tol * coarse_tol``;
* **the points** at the target eps, solved to ``tol``.

Potentials move between stages by one update (a c-transform): an update always computes a potential on its
stage's support from the other side's potential, wherever that lives. After the first ``ONE_SHOT_ITERATIONS`` of a
stage solved to a tolerance, its reductions use the backend's choice for repeated reductions (``Backend.iterations()``:
"auto" reduces clouds of up to 2^23 point pairs on a kept dense kernel, one matrix-vector product per reduction).

Cross problems (x != y) alternate the two half-steps (Gauss-Seidel) and over-relax both with the same
factor ω: ``f <- f + ω (T(g) - f)``. ``acceleration="adaptive"`` starts from ω = 1 (or the ω carried over
by a warm start), fits the contraction rate λ of the marginal error over windows of ``window`` iterations,
infers the plain rate ρ = (λ + ω - 1)² / (λ ω²) (SOR theory; ρ = λ at ω = 1) and, when two consecutive
windows agree, raises ω to Young's optimum ``2 / (1 + sqrt(1 - ρ))`` (at most ``omega_max``). Every
over-relaxed half-step is safeguarded per coordinate: the dual objective, concave and separable in f for
fixed g, must not decrease; coordinates where ω would decrease it take the plain update (ω = 1), computed
from the same log-sum-exp values. On the points, where coarse levels apply (D <= 3, backends "auto" and
"sparse") and eps is low (:func:`newton_entries`), the cross problem is finished by sparse Newton steps instead
(``newton``, :func:`_iterate_newton`), which hand over to the over-relaxed iterations when a step stops halving
the error. The self problem (x = y) uses the averaged symmetric update ``f <- (f + T(f)) / 2``, which contracts at
rate at most 1/2.

The stopping test is the L1 error of the column marginal when the row marginals are exact, checked on the
points with an exact (un-relaxed) f; a solve whose error stops decreasing (float32 rounding at a tiny eps)
stops early with a warning that gives the error reached, and an error below what the potentials' dtype can
resolve at eps (:func:`_resolution`) is reported as that resolution.

A solve reports where it is to ``Sinkhorn(progress=fn)``: ``fn(SolveStatus)`` at the start of every stage and of
every iteration (``driftops.flow`` shows it in its progress bar).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .backends import SPARSE_MAX_DIM, AutoBackend, Backend, SparseBackend
from .backends.sparse import grid_labels
from .costs import cost_power, eps_schedule, max_cost
from .errors import DriftopsError
from .parallel import Cloud, Comm, Geometry

ACCELERATIONS = ("adaptive", "fixed", "none")
# Newton steps need the kept plan entries to hold at least this share of the plan's mass, and keep at most
# NEWTON_MAX_ENTRIES entries in all (~400 MB of indices and weights).
NEWTON_MASS = 0.75
# Plan entries per row a Newton finish starts from by default (Sinkhorn(newton=None)) where it applies.
NEWTON_K = 128
NEWTON_MAX_ENTRIES = 1 << 25
# Solves capped below this many iterations per stage stop on their cap rather than their tolerance (a drift capped as
# the Sinkhorn-drifting paper's 20 iterations): by default they iterate, since a Newton step (a top-k, conjugate
# gradients, a line search, a new block plan) counts as one iteration but costs several. Capped at 20, 65,536-point
# drifts at eps 0.001 (2D) made training rounds 2-3x longer with Newton steps, for no better generator per step.
NEWTON_MIN_ITER = 100
# A Newton step of length t is taken when it lowers the marginal error by at least this share times t; a whole step
# must halve it, which a step (~13 reductions with its top-k) does when it beats the over-relaxed iterations it replaces.
NEWTON_DECREASE = 0.5
# Columns whose kept entries hold less than this share of their mass take their exact coordinate update, not Newton's.
NEWTON_COVERED = 0.5
# Conjugate-gradient iterations between two checks of the residual (each check is a host sync).
CG_CHECK = 10
# Iterations of a stage on the backend's one-shot choice before its choice for repeated reductions: building a dense
# kernel costs a few block-sparse reductions, which a stage converging at once (a warm-started flow step) would not
# win back.
ONE_SHOT_ITERATIONS = 5
# A stalled error ends a solve only if its potentials moved by at most eps, or by this many rounding units of their
# largest value when that is more (float32 potentials at tiny eps jitter by a few units at a fixed point of rounding).
STALL_ROUNDING = 64
# Cell sides of the coarse levels at the target temperature, in units of the finest side (kernel width / level_cells).
COARSE_SCALES = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Sinkhorn:
    """Settings of the log-domain Sinkhorn solver (see the module docstring).

    tol: L1 marginal error at which to stop (> 0); max_iter: iterations per stage (>= 1).
    annealing: factor (0 < annealing < 1) of the geometric eps-annealing of a cold start.
    acceleration: "adaptive" (ω from the observed contraction rate), "fixed" (ω = ``omega``
    throughout) or "none" (plain alternating updates). omega: the fixed factor, or the adaptive
    start (0 < omega < 2); omega_max: the adaptive cap (< 2); window: iterations per rate estimate.
    multiscale: coarse levels for D <= 3 with the "auto" and "sparse" backends; level_cells: cells
    per kernel width of the finest level; level_shrink: a level is used when it has at most
    1/level_shrink of the points of the next finer one; coarse_tol: coarse levels stop at tol * coarse_tol.
    newton: k > 0 finishes a cross problem on the points with Newton steps whose Hessian keeps the k largest plan
    entries of each row (:func:`_iterate_newton`; needs the column cloud held whole: not in "ring" or "mesh" modes,
    which keep the over-relaxed iterations); 0: over-relaxed iterations throughout; None (default): ``NEWTON_K``
    where coarse levels apply (backends "auto" and "sparse", D <= 3; measured faster there), a kernel covers few
    enough points for k entries to hold most of a row (low eps; :func:`newton_entries`) and ``max_iter`` is at least
    ``NEWTON_MIN_ITER``, else 0 (at larger eps and in higher D the top-k reduction costs more than the steps save; a
    capped solve wants the cheapest iterations).
    warm_accept: a warm start whose marginal error is below it is iterated directly, worse ones
    re-anneal from ``warm_restart * eps``. stall: iterations without a 1% improvement of the best
    marginal error after which a solve stops (its error cannot improve further, e.g. float32 rounding), unless its
    potentials still move by more than eps (a plateau of the error: see ``_Progress.stalled``).
    recentre: for the squared Euclidean cost, :func:`driftops.drift` and :func:`driftops.barycentric_map` solve
    the cross problem with x moved onto y's mean when the clouds' means are farther apart than ``recentre`` times
    the larger bounding-box diagonal of the two (the plan is unchanged; the potentials, in ``support``, are then
    those of the moved source); None: never.
    progress: called with a :class:`SolveStatus` at the start of every stage and of every iteration (not a
    setting: ignored by ``==`` and ``repr``).
    """

    tol: float = 1e-3
    max_iter: int = 1000
    annealing: float = 0.7
    acceleration: str = "adaptive"
    omega: float = 1.0
    omega_max: float = 1.95
    window: int = 10
    multiscale: bool = True
    level_cells: float = 4.0
    level_shrink: float = 2.0
    coarse_tol: float = 3.0
    warm_accept: float = 0.05
    warm_restart: float = 64.0
    stall: int = 500
    newton: int | None = None
    recentre: float | None = 0.5
    progress: Callable[[SolveStatus], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> DriftopsError:
            return DriftopsError(f"Sinkhorn({name}={getattr(self, name)!r}): {name} must be {rule}")

        for name in ("tol", "warm_accept", "coarse_tol", "level_cells"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise bad(name, "a positive finite number, e.g. 1e-3")
        for name in ("max_iter", "window", "stall"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "an integer >= 1")
        if self.newton is not None and (isinstance(self.newton, bool) or not isinstance(self.newton, int) or self.newton < 0):
            raise bad("newton", "None (automatic), or an integer >= 0 (plan entries per row kept in the Newton Hessian; 0: no Newton steps)")
        if self.recentre is not None and (isinstance(self.recentre, bool) or not isinstance(self.recentre, (int, float)) or not 0 <= self.recentre < math.inf):
            raise bad("recentre", "None (never), or a finite number >= 0 (0: always)")
        if not 0 < self.annealing < 1:
            raise bad("annealing", "in (0, 1), e.g. 0.7")
        if self.acceleration not in ACCELERATIONS:
            raise bad("acceleration", f"one of {', '.join(map(repr, ACCELERATIONS))}")
        if not 0 < self.omega < 2:
            raise bad("omega", "in (0, 2): over-relaxation diverges at 2")
        if not 1 <= self.omega_max < 2:
            raise bad("omega_max", "in [1, 2)")
        if not self.level_shrink > 1:
            raise bad("level_shrink", "> 1")
        if not self.warm_restart >= 1:
            raise bad("warm_restart", ">= 1")


def as_solver(solver: Sinkhorn | None, tol: float | None, max_iter: int | None) -> Sinkhorn:
    """The solver of a call: ``solver`` (default settings when None) with ``tol`` / ``max_iter`` replaced when given."""
    if solver is not None and not isinstance(solver, Sinkhorn):
        raise DriftopsError(f"solver must be a driftops.Sinkhorn(...), got {type(solver).__name__}")
    base = solver or Sinkhorn()
    changes = {k: v for k, v in (("tol", tol), ("max_iter", max_iter)) if v is not None}
    return replace(base, **changes) if changes else base


@dataclass
class SinkhornResult:
    """Log-domain potentials for ``P_ij = a_i b_j exp((f_i + g_j - c_ij)/eps)``, on the full clouds.

    f: (N,), g: (M,); for a self problem g is f. ``iterations``: iterations on the points;
    ``coarse_iterations``: iterations on coarse levels and annealing updates; ``marginal_error``: L1 error of
    the column marginal when rows are exact; ``omega``: the last over-relaxation factor (carried over by warm
    starts); ``support``: the (source, destination) clouds the potentials live on (None for a self problem's
    destination), used to carry the potentials over to new points; ``newton``: plan entries per row kept by the
    Newton steps (0: none taken).
    """

    f: torch.Tensor
    g: torch.Tensor
    eps: float
    iterations: int
    marginal_error: float
    converged: bool
    omega: float = 1.0
    coarse_iterations: int = 0
    support: tuple[Cloud, Cloud | None] | None = field(default=None, repr=False)
    newton: int = 0


@dataclass(frozen=True)
class SolveStatus:
    """Where a running solve is: ``stage`` (1-based) of ``stages``, at temperature ``eps`` on ``points`` row points
    (of the self problem when ``symmetric``), at its ``iteration``-th iteration (0: starting), with the last measured
    marginal error ``error`` (inf before the first)."""

    stage: int
    stages: int
    eps: float
    points: int
    symmetric: bool
    iteration: int = 0
    error: float = math.inf


@dataclass(frozen=True)
class Stage:
    """One step of a solve: at temperature ``eps``, f lives on ``rows`` and g on ``cols`` (None: the self
    problem); ``tol`` None means a single update (annealing), else iterate to that error."""

    eps: float
    rows: Cloud
    cols: Cloud | None
    tol: float | None


def low_dim_path(backend: Backend, dim: int) -> bool:
    """Whether a solve with ``backend`` in dimension ``dim`` gets coarse levels and, by default, a Newton finish:
    backends "auto" and "sparse" (the block-sparse path) in D <= 3."""
    return isinstance(backend, (AutoBackend, SparseBackend)) and dim <= SPARSE_MAX_DIM


def newton_entries(solver: Sinkhorn, geom: Geometry, rows: Cloud, cols: Cloud | None) -> int:
    """Plan entries per row of a Newton finish of ``rows`` against ``cols`` (None: the self problem, which has none):
    ``solver.newton``, or when None ``NEWTON_K`` on the low-dimensional path (:func:`low_dim_path`) where a kernel
    holds few enough columns (:func:`kernel_points`) for k entries to hold ``NEWTON_MASS`` of a row's mass, for a
    solve allowed ``NEWTON_MIN_ITER`` iterations or more, else 0.
    Where "auto" iterates densely on the points, none: a dense reduction reuses its kernel (a matrix-vector product,
    :mod:`driftops.backends.dense`), and the iterations cost less than the top-k and the conjugate gradients."""
    if cols is None:
        return 0
    if solver.newton is not None:
        return solver.newton
    if solver.max_iter < NEWTON_MIN_ITER or rows.full is None or cols.full is None or not low_dim_path(geom.backend, cols.full.shape[1]):
        return 0
    iterating = geom.backend.iterations()
    if isinstance(iterating, AutoBackend) and iterating.pick(rows.full, cols.full) is iterating.dense:
        return 0
    return NEWTON_K if kernel_points(cols, geom) * math.log(1.0 / (1.0 - NEWTON_MASS)) <= NEWTON_K else 0


def kernel_points(cloud: Cloud, geom: Geometry) -> float:
    """The mass-weighted mean number of points of ``cloud`` (held whole) under one kernel ``exp(-c/eps)``: points per
    grid cell of the kernel's width, times the kernel's integral in cells (pi^(D/2) Gaussian, D! V_D Laplacian). A
    2D row spread like the kernel over n points holds the share 1 - exp(-k/n) of its mass in its k largest entries."""
    pts, dim, p = cloud.full, cloud.full.shape[1], cost_power(geom.cost)
    labels = grid_labels(pts, math.sqrt(geom.eps) if p == 2 else geom.eps)
    mass = cloud.log_marginal().exp()
    per_cell = torch.zeros(int(labels.max()) + 1, dtype=mass.dtype, device=mass.device).index_add_(0, labels, mass)
    volume = math.pi ** (dim / 2) * (1.0 if p == 2 else math.gamma(dim + 1) / math.gamma(dim / 2 + 1))
    return volume * float((per_cell * torch.bincount(labels).to(mass.dtype)).sum() / per_cell.sum())


def level(cloud: Cloud, geom: Geometry, eps: float, solver: Sinkhorn, scale: float = 1.0) -> Cloud:
    """``cloud`` seen through grid cells of side ``scale * (kernel width at eps) / level_cells``: the (K, D) mass-weighted
    centroids of its non-empty cells with their masses as weights. Every rank of a sharded cloud builds the same
    centroids and owns an equal share of them as its rows (its updates of a coarse potential are gathered like the
    points' ones). The cloud itself when the cells would not shrink it ``level_shrink`` times, in D > 3, with backends
    without coarse levels, or in ring and mesh modes (no ``cloud.full``)."""
    pts = cloud.full
    if pts is None or not solver.multiscale or not low_dim_path(geom.backend, pts.shape[1]):
        return cloud
    width = math.sqrt(eps) if cost_power(geom.cost) == 2 else eps
    labels = grid_labels(pts, scale * width / solver.level_cells)
    k = int(labels.max()) + 1
    if k * solver.level_shrink > pts.shape[0]:
        return cloud
    weights = cloud.log_marginal().exp()
    mass = torch.zeros(k, dtype=pts.dtype, device=pts.device).index_add_(0, labels, weights)
    centroids = torch.zeros(k, pts.shape[1], dtype=pts.dtype, device=pts.device).index_add_(0, labels, pts * weights[:, None])
    centroids = centroids / mass.clamp_min(torch.finfo(pts.dtype).tiny)[:, None]
    if cloud.comm is None or cloud.comm.size == 1:
        return Cloud(centroids, centroids, 0, mass.log())
    sizes = tuple(len(share) for share in torch.arange(k).tensor_split(cloud.comm.size))
    offset = sum(sizes[: cloud.comm.rank])
    return Cloud(centroids[offset : offset + sizes[cloud.comm.rank]], centroids, offset, mass.log(), sizes, cloud.comm)


def _levels(cloud: Cloud, geom: Geometry, eps: float, solver: Sinkhorn) -> list[Cloud]:
    """The coarse levels of ``cloud`` at the target eps, coarsest first, without the points themselves: cells of
    1, 2, 4 and 8 times the finest side, each kept when it shrinks the next finer level ``level_shrink`` times."""
    out: list[Cloud] = []
    finer = cloud.n
    for scale in COARSE_SCALES:
        lv = level(cloud, geom, eps, solver, scale)
        if lv is not cloud and lv.n * solver.level_shrink <= finer:
            out.insert(0, lv)
            finer = lv.n
    return out


def _pad(levels: list[Cloud], n: int, points: Cloud | None) -> list[Cloud | None]:
    """``levels`` (coarsest first) lengthened to n by repeating its coarsest entry, or ``points`` when empty."""
    if not levels:
        return [points] * n
    return [levels[0]] * (n - len(levels)) + levels


def stages(src: Cloud, dst: Cloud | None, geom: Geometry, solver: Sinkhorn, top: float | None) -> list[Stage]:
    """The stages of a solve at ``geom.eps``: annealing from ``top`` (None: no annealing), the coarse levels, the points."""
    eps = geom.eps
    out = []
    if top is not None:
        coarse_src = _levels(src, geom, eps, solver)
        coarse_dst = [] if dst is None else _levels(dst, geom, eps, solver)

        def annealed(cloud: Cloud, coarse: list[Cloud], e: float) -> Cloud:
            # An annealing update runs on no more points than the finest coarse level at the target eps, when there is
            # one: its cells are finer than the kernel at e > eps, and the coarse stages that follow are solved to tol.
            lv = level(cloud, geom, e, solver)
            return coarse[-1] if coarse and (lv is cloud or lv.n > coarse[-1].n) else lv

        for e in eps_schedule(top, eps, solver.annealing)[:-1]:
            out.append(Stage(e, annealed(src, coarse_src, e), None if dst is None else annealed(dst, coarse_dst, e), None))
        n = max(len(coarse_src), len(coarse_dst))
        # Levels are paired from the finest end; the shorter hierarchy repeats its coarsest level (or the points).
        coarse_src = _pad(coarse_src, n, src)
        coarse_dst = _pad(coarse_dst, n, dst)
        out += [Stage(eps, r, c, solver.tol * solver.coarse_tol) for r, c in zip(coarse_src, coarse_dst)]
    out.append(Stage(eps, src, dst, solver.tol))
    return out


def _update(geom: Geometry, rows: Cloud, cols: Cloud, pot_cols: torch.Tensor, eps: float) -> torch.Tensor:
    """(N_rows,) the potential on ``rows`` that makes the row marginals exact for ``pot_cols`` on ``cols`` (gathered)."""
    local = -eps * geom.lse(rows, cols, cols.log_marginal() + pot_cols / eps, None, eps)
    return rows.gather(local)


def _error(log_marginal: torch.Tensor, old: torch.Tensor, exact: torch.Tensor, eps: float) -> float:
    """L1 marginal error ``sum_j b_j |exp((old_j - exact_j)/eps) - 1|`` of the side whose potential is ``old``."""
    ratio = torch.exp(((old - exact) / eps).clamp(max=50.0))
    return float((log_marginal.exp() * (ratio - 1).abs()).sum())


def relax(old: torch.Tensor, exact: torch.Tensor, omega: float, eps: float) -> torch.Tensor:
    """``old + omega (exact - old)`` on the coordinates where that does not lower the dual objective, ``exact`` elsewhere.

    With the other potential fixed the dual is a sum over coordinates of ``w_i (u_i - eps exp((u_i - exact_i)/eps))``
    (w_i > 0), so moving coordinate i from ``old`` by ``omega * eps * d`` (``d = (exact - old)/eps``) changes it by
    ``w_i eps (omega d - exp((omega - 1) d) + exp(-d))``: >= 0 near convergence for any omega in (0, 2), negative
    for large d when omega > 1.
    """
    if omega == 1.0:
        return exact
    d = (exact - old) / eps
    gain = omega * d - torch.expm1((omega - 1) * d) + torch.expm1(-d)
    return torch.where(gain >= 0, old + omega * (exact - old), exact)


class _Omega:
    """The over-relaxation factor of one solve: fixed, or adapted from the contraction rate of the marginal error.

    Adaptive: each window of ``window`` iterations gives a rate λ; the window right after a change of ω is skipped
    (over-relaxation starts with a transient rise of the error); two consecutive windows whose inferred plain rates
    agree raise ω to Young's optimum for the smaller one; two consecutive windows without progress return to ω = 1.
    """

    def __init__(self, solver: Sinkhorn, start: float) -> None:
        self.solver = solver
        self.value = 1.0 if solver.acceleration == "none" else start
        self.restart()

    def restart(self) -> None:
        """Forget the rate history (a new stage, or a new ω)."""
        self.start: tuple[int, float] | None = None  # (iteration, error) opening the current window
        self.rates: list[float] = []  # plain rates inferred from the windows since the last change
        self.stuck = 0
        self.skip = self.value != 1.0

    def observe(self, it: int, err: float) -> float:
        """Record the marginal error (rows exact) at iteration ``it`` of a stage; returns ω for the next iterations."""
        s = self.solver
        if s.acceleration != "adaptive" or not err > 0:
            return self.value
        if self.start is None or it - self.start[0] < s.window:
            self.start = self.start or (it, err)
            return self.value
        lam = (err / self.start[1]) ** (1.0 / (it - self.start[0]))
        self.start = (it, err)
        if self.skip:
            self.skip = False
            return self.value
        if lam >= 1.0:
            self.stuck += 1
            if self.stuck >= 2 and self.value != 1.0:  # no progress: plain steps, then estimate again
                self.value = 1.0
                self.restart()
            return self.value
        self.stuck = 0
        omega = self.value
        self.rates.append(min((lam + omega - 1) ** 2 / (lam * omega**2), 1.0))
        if len(self.rates) >= 2:
            r0, r1 = self.rates[-2:]
            if abs(math.sqrt(1 - r1) - math.sqrt(1 - r0)) <= 0.25 * math.sqrt(1 - min(r0, r1)):
                best = min(s.omega_max, 2.0 / (1.0 + math.sqrt(1.0 - max(r0, r1))))
                if best > omega + 0.01:
                    self.value = best
                    self.restart()
        return self.value


@dataclass
class _Progress:
    """Iterations of one stage, the stall test on its best marginal error, and the reports to ``solver.progress``
    (``status``: the stage's, None when nobody listens)."""

    solver: Sinkhorn
    status: SolveStatus | None
    geom: Geometry
    it: int = 0
    err: float = math.inf
    best: float = math.inf
    since: int = 0
    mark: torch.Tensor | None = None  # the potential half-way through the iterations without improvement

    @functools.cached_property
    def repeated(self) -> Geometry:
        """The geometry of reductions repeated on the same clouds (the stage's own in ring and mesh modes, whose column
        blocks arrive as new tensors at every reduction: no kernel to keep)."""
        if self.geom.comm.ring or self.geom.comm.mesh:
            return self.geom
        return replace(self.geom, backend=self.geom.backend.iterations())

    @property
    def at(self) -> Geometry:
        """The geometry of this iteration's reductions: the stage's for its first ``ONE_SHOT_ITERATIONS``, then its
        backend's choice for reductions repeated on the same clouds (:meth:`driftops.backends.Backend.iterations`;
        "auto" then reduces mid-sized clouds densely, and a dense kernel built so late is reused enough to pay)."""
        return self.geom if self.it <= ONE_SHOT_ITERATIONS else self.repeated

    def next(self) -> None:
        """Start an iteration and report it with the last measured error."""
        self.it += 1
        if self.status is not None:
            self.solver.progress(replace(self.status, iteration=self.it, error=self.err))

    def stalled(self, err: float, pot: torch.Tensor, eps: float) -> bool:
        """Record a measured error and the iterated potential ``pot``; True after ``solver.stall`` iterations without a
        1% improvement of the best error during whose second half ``pot`` moved by at most eps. A potential that moves
        further is crossing a plateau of the error (clustered or duplicated points at low eps shift mass one point at a
        time, the potentials creeping by a fraction of eps per iteration): the solve goes on, judged again after half as
        many iterations."""
        self.err = err
        if err < 0.99 * self.best:
            self.best, self.since, self.mark = err, self.it, None
        waited = self.it - self.since
        if self.mark is None and 2 * waited >= self.solver.stall:
            self.mark = pot.clone()
        if waited < self.solver.stall:
            return False
        if float((pot - self.mark).abs().max()) <= max(eps, STALL_ROUNDING * _rounding_unit(pot)):
            return True
        self.since, self.mark = self.it - self.solver.stall // 2, pot.clone()
        return False


def _iterate_self(geom: Geometry, rows: Cloud, f: torch.Tensor, eps: float, tol: float, solver: Sinkhorn, status: SolveStatus | None):
    """Averaged symmetric iterations ``f <- (f + T(f)) / 2`` to ``tol``: returns (f, error, iterations, stalled)."""
    p, err = _Progress(solver, status, geom), math.inf
    while p.it < solver.max_iter:
        p.next()
        f_new = _update(p.at, rows, rows, f, eps)
        err = _error(rows.log_marginal(), f, f_new, eps)
        if err < tol:
            break
        if p.stalled(err, f, eps):
            return f, err, p.it, True
        f = 0.5 * (f + f_new)
    return f, err, p.it, False


def _iterate_cross(geom: Geometry, rows: Cloud, cols: Cloud, g: torch.Tensor, eps: float, tol: float, solver: Sinkhorn, omega: _Omega, status: SolveStatus | None):
    """Over-relaxed alternating iterations from g (on cols) to ``tol``: returns (f, g, error, iterations, stalled).

    Every ``solver.window``-th f half-step is exact (not relaxed), and so is the one after an error below ``tol``:
    the next column error is then the true marginal error (rows exact), on which the stopping test, the stall test
    and the choice of ω rely. (With f over-relaxed the column error overstates it, by 3-4x at ω = 1.95.)
    """
    p, err = _Progress(solver, status, geom), math.inf
    f, exact = _update(geom, rows, cols, g, eps), True
    while p.it < solver.max_iter:
        p.next()
        g_star = _update(p.at, cols, rows, f, eps)
        err = _error(cols.log_marginal(), g, g_star, eps)
        if exact:
            if err < tol:
                return f, g, err, p.it, False
            w = omega.observe(p.it, err)
            if p.stalled(err, g, eps):
                return f, g, err, p.it, True
        w = omega.value
        g = relax(g, g_star, w, eps)
        f_star = _update(p.at, rows, cols, g, eps)
        exact = w == 1.0 or err < tol or p.it % solver.window == 0
        f = f_star if exact else relax(f, f_star, w, eps)
    if not exact:
        f = _update(p.at, rows, cols, g, eps)
    return f, g, err, p.it, False


def _schur_solve(w: torch.Tensor, cols: torch.Tensor, r: torch.Tensor, c: torch.Tensor, rhs: torch.Tensor, comm: Comm, iters: int = 100, rtol: float = 1e-2) -> torch.Tensor:
    """(M,) solution v of ``(diag(c) - Pᵀ diag(1/r) P) v = rhs`` by conjugate gradients preconditioned with diag(c).

    P (n local rows, M): ``w`` (n, k) nonnegative entries at columns ``cols`` (n, k) int64 (the largest entries of
    the plan's rows); r (n,) and c (M,) > 0: the row and column sums of P. Rows are split over ranks in
    "gather" mode: the products with Pᵀ are summed over ranks. Stops at a residual of ``rtol`` times the right-hand
    side's (checked every ``CG_CHECK`` products, the only host syncs), or after ``iters`` products.
    """
    flat_cols = cols.reshape(-1)

    def apply(v: torch.Tensor) -> torch.Tensor:
        u = (w * v[cols]).sum(1) / r  # diag(1/r) P v, (n,)
        return c * v - comm.sum(torch.zeros_like(v).index_add_(0, flat_cols, (w * u[:, None]).reshape(-1)))

    tiny = torch.finfo(rhs.dtype).tiny
    v, res = torch.zeros_like(rhs), rhs.clone()
    d = res / c
    rz = (res * d).sum()
    stop = rtol**2 * rz
    for it in range(iters):
        if it % CG_CHECK == 0 and bool(rz <= stop):
            break
        sd = apply(d)
        dsd = (d * sd).sum()
        # Between two checks, a converged (or broken-down) iteration leaves v as it is.
        step = torch.where((rz > stop) & (dsd > 0), rz / dsd.clamp_min(tiny), torch.zeros_like(rz))
        v += step * d
        res -= step * sd
        z = res / c
        rz, old = (res * z).sum(), rz
        d = z + (rz / old.clamp_min(tiny)) * d
    return v


def _iterate_newton(geom: Geometry, rows: Cloud, cols: Cloud, g: torch.Tensor, eps: float, tol: float, solver: Sinkhorn, omega: _Omega, k: int, status: SolveStatus | None):
    """Newton steps on g, rows kept exact (f = T(g)), to ``tol``: returns (f, g, error, iterations, stalled, k), k 0
    when no Newton step was taken.

    Each step: the column pass gives the marginal error and the column sums c; a top-k reduction the k largest entries
    of each row of the plan; conjugate gradients the Newton direction of the dual restricted to g for the plan P
    truncated to those entries (the Schur complement ``diag(c_P) - Pᵀ diag(1/r_P) P`` of its Hessian, r_P and c_P the
    row and column sums of P: a graph Laplacian with the null vector 1 like the whole plan's; with the whole plan's
    sums instead, the mass P misses acts as a spurious diagonal that damps the smooth error components, the slow
    ones, and Newton converged 4x slower), scaled by eps; the right-hand side ``eps (b - c)`` is the whole plan's.
    A column whose kept entries hold less than ``NEWTON_COVERED`` of its mass (few rows against many columns: n * k
    entries cannot reach every column) has next to no row in that Laplacian, where the step would be unbounded: it
    takes its exact coordinate update ``g* - g`` instead, and the whole plan's column sum as its diagonal.
    The step is taken whole when it at least halves the marginal error, else halved up to three times (a step of length
    t must lower the error by the share ``NEWTON_DECREASE * t``). When no length does, or when the kept entries hold
    less than ``NEWTON_MASS`` of the plan's mass (a spread plan: the truncated Hessian misjudges the step, and the
    over-relaxed iterations converge fast there), Newton is not paying for its top-k and the over-relaxed iterations
    take over from there. k is at most ``NEWTON_MAX_ENTRIES`` / rows. Three reductions and a top-k per accepted step.
    """
    p = _Progress(solver, status, geom)
    k = max(1, min(k, NEWTON_MAX_ENTRIES // rows.n))
    log_b = cols.log_marginal()
    log_a = rows.local_part(rows.log_marginal())
    b = log_b.exp()
    f = _update(geom, rows, cols, g, eps)
    g_star = _update(geom, cols, rows, f, eps)
    err, steps = _error(log_b, g, g_star, eps), 0
    while err >= tol and p.it < solver.max_iter:
        p.next()
        if p.stalled(err, g, eps):
            return f, g, err, p.it, True, k if steps else 0
        top, idx = geom.topk(rows, cols, log_b + g / eps, k)
        w = torch.exp(log_a[:, None] + rows.local_part(f)[:, None] / eps + top)
        if float(geom.comm.sum(w.sum())) < NEWTON_MASS:
            break  # a plan spread over more than k entries per row: the over-relaxed iterations converge fast there
        c = torch.exp(log_b + ((g - g_star) / eps).clamp(max=50.0))
        tiny = torch.finfo(w.dtype).tiny
        kept_c = geom.comm.sum(torch.zeros_like(c).index_add_(0, idx.reshape(-1), w.reshape(-1)))
        covered = kept_c >= NEWTON_COVERED * c
        diagonal = torch.where(covered, kept_c, c).clamp_min(tiny)
        step = torch.where(covered, _schur_solve(w, idx, w.sum(1).clamp_min(tiny), diagonal, eps * (b - c), geom.comm), g_star - g)
        for t in (1.0, 0.5, 0.25, 0.125):
            g_t = g + t * step
            f_t = _update(geom, rows, cols, g_t, eps)
            g_star_t = _update(geom, cols, rows, f_t, eps)
            err_t = _error(log_b, g_t, g_star_t, eps)
            if err_t <= (1.0 - NEWTON_DECREASE * t) * err:
                f, g, g_star, err = f_t, g_t, g_star_t, err_t
                steps += 1
                break
        else:
            break  # no length halves the error: Newton is not paying for its top-k
    else:
        return f, g, err, p.it, False, k if steps else 0  # converged (or out of iterations) by Newton steps alone
    rest = replace(solver, max_iter=max(1, solver.max_iter - p.it))
    f, g, err, its, stalled = _iterate_cross(geom, rows, cols, g, eps, tol, rest, omega, status)
    return f, g, err, p.it + its, stalled, k if steps else 0


def _rounding_unit(pot: torch.Tensor) -> float:
    """One rounding unit of the largest value of the potential ``pot`` in its dtype."""
    return torch.finfo(pot.dtype).eps * float(pot.abs().max())


def _resolution(f: torch.Tensor, g: torch.Tensor, eps: float) -> float:
    """The smallest L1 marginal error the potentials' dtype resolves at eps: one rounding unit of the largest
    potential, relative to eps (the exponent's rounding error). Reported in place of smaller errors, which a
    float32 solve can reach by hitting a fixed point of its own rounding."""
    return min(max(_rounding_unit(f), _rounding_unit(g)) / eps, 2.0)  # an L1 error between probability vectors is at most 2


def _carry_over(warm: SinkhornResult, src: Cloud, dst: Cloud | None, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Warm potentials (f on src, g on dst) from a previous result: as they are for the same points (moved in place,
    e.g. a flow step), by one c-transform of the previous f over the previous source for new points (the potentials
    are functions of position); None when the result cannot be carried over."""
    if warm.support is None:
        return None
    old_src, old_dst = warm.support
    if (dst is None) != (old_dst is None) or old_src.local.shape[1] != src.local.shape[1]:
        return None
    same = old_src.local is src.local and (dst is None or old_dst.local is dst.local)
    if same and warm.f.shape[0] == src.n and warm.g.shape[0] == (src if dst is None else dst).n:
        return warm.f, warm.g
    if dst is None:
        f = _update(geom, src, old_src, warm.f, geom.eps)
        return f, f
    return None, _update(geom, dst, old_src, warm.f, geom.eps)


def sinkhorn(src: Cloud, dst: Cloud | None, geom: Geometry, solver: Sinkhorn, warm_start: SinkhornResult | None = None) -> SinkhornResult:
    """Sinkhorn potentials between ``src`` and ``dst`` at ``geom.eps`` (``dst=None``: the symmetric self problem).

    Cold: anneal, then coarse levels, then the points (:func:`stages`). Warm (``warm_start`` from a previous call,
    carried over by :func:`_carry_over`): the points directly when the warm marginal error is below
    ``solver.warm_accept``, else a re-annealing from ``solver.warm_restart * eps``; ω starts from the warm one.
    Warns when the points' solve stops above ``solver.tol``.
    """
    eps = geom.eps
    symmetric = dst is None
    top = max_cost(geom.cost, src.box(), (src if symmetric else dst).box())
    omega = _Omega(solver, warm_start.omega if warm_start is not None and solver.acceleration == "adaptive" else solver.omega)
    newton = newton_entries(solver, geom, src, dst)
    warm = None if warm_start is None else _carry_over(warm_start, src, dst, geom)
    coarse_its = 0
    if warm is None:
        plan = stages(src, dst, geom, solver, top)
        first = plan[0]
        f = src.local.new_zeros(first.rows.n)
        g = f if symmetric else src.local.new_zeros(first.cols.n)
        f_on, g_on, fresh = first.rows, first.cols, True
    else:
        f, g = warm
        if f is None:
            f, coarse_its = _update(geom, src, dst, g, eps), 1
        rows, pot, other = (src, f, f) if symmetric else (dst, g, f)
        exact = _update(geom, rows, src, other, eps)
        start = _error(rows.log_marginal(), pot, exact, eps)
        # The reduction that measured the start also gives the next update: keep it (averaged for the self problem).
        f, g = (0.5 * (f + exact),) * 2 if symmetric else (f, exact)
        plan = stages(src, dst, geom, solver, None if start < solver.warm_accept else min(top, solver.warm_restart * eps))
        f_on, g_on, fresh = src, dst, False
    err, its, stalled, used = math.inf, 0, False, 0
    for k, st in enumerate(plan):
        status = None if solver.progress is None else SolveStatus(k + 1, len(plan), st.eps, st.rows.n, symmetric)
        if status is not None:
            solver.progress(status)
        if symmetric:
            if f_on is not st.rows or fresh:
                f, f_on, fresh = _update(geom, st.rows, f_on, f, st.eps), st.rows, False
                coarse_its += 1
            elif st.tol is None:
                f = 0.5 * (f + _update(geom, st.rows, f_on, f, st.eps))
                coarse_its += 1
            if st.tol is not None:
                f, err, its, stalled = _iterate_self(geom, st.rows, f, eps, st.tol, solver, status)
            g = f
        elif st.tol is None:
            f, f_on = _update(geom, st.rows, g_on, g, st.eps), st.rows
            g, g_on = _update(geom, st.cols, f_on, f, st.eps), st.cols
            coarse_its += 1
        else:
            if g_on is not st.cols:
                g, g_on = _update(geom, st.cols, f_on, f, st.eps), st.cols
            omega.restart()
            if newton and st is plan[-1] and st.cols.full is not None:
                f, g, err, its, stalled, used = _iterate_newton(geom, st.rows, st.cols, g, eps, st.tol, solver, omega, newton, status)
            else:
                f, g, err, its, stalled = _iterate_cross(geom, st.rows, st.cols, g, eps, st.tol, solver, omega, status)
            f_on = st.rows
        if st is not plan[-1] and st.tol is not None:
            coarse_its += its
    floor = _resolution(f, g, eps)
    err = max(err, floor)
    converged = err < solver.tol
    if not converged:
        if floor >= solver.tol:
            why = f"at the resolution of {str(f.dtype).removeprefix('torch.')} potentials at eps={eps:g}: marginal errors below {floor:.1e} cannot be resolved"
        elif stalled:
            why = f"early: its marginal error stopped decreasing at {err:.2e} > tol={solver.tol:g} after {its} iterations at eps={eps:g}"
        else:
            why = f"after {solver.max_iter} iterations at eps={eps:g} with marginal error {err:.2e} > tol={solver.tol:g}"
        if (floor >= solver.tol or stalled) and f.dtype == torch.float32:
            why += " (float32 potentials cannot resolve this temperature: use float64)"
        warnings.warn(f"Sinkhorn stopped {why}; raise max_iter, raise tol or use a larger eps", RuntimeWarning, stacklevel=3)
    return SinkhornResult(f, g, eps, its, err, converged, omega.value, coarse_its, (src, dst), used)

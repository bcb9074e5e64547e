"""Drift fields: attraction to the target minus repulsion from the model's own samples.

``V(x_i) = T_{x->y}(x_i) - T_{x->x}(x_i)`` where ``T`` is the barycentric map of
a plan (:mod:`driftops.plans`); ``x + V`` moves toward y. The self term masks
the diagonal for ``one_sided`` and ``two_sided`` (``mask_self=True``) and never
for ``sinkhorn``, whose drift is ``-N`` times the gradient of the Sinkhorn
divergence (:func:`driftops.sinkhorn_divergence`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import threads
from .backends import get_backend
from .checks import as_eps, as_points, as_weights, check_choice, check_finite, numpy_io
from .costs import check_cost
from .errors import DriftopsError
from .parallel import Cloud, Comm, Geometry
from .plans import PLANS, barycentric, column_logweights
from .sinkhorn import Sinkhorn, SinkhornResult, as_solver, sinkhorn

NAN_HINT = "the inputs are finite, so this is a numerical failure: use float64 or a larger eps"


@dataclass
class DriftInfo:
    """Sinkhorn state of a drift evaluation, per temperature: ``{eps: (cross, self)}``.

    Pass it back as ``warm_start=`` to start the next evaluation (e.g. the next
    flow step) from these potentials.
    """

    sinkhorn: dict[float, tuple[SinkhornResult, SinkhornResult]] = field(default_factory=dict)

    @property
    def marginal_error(self) -> float:
        """Largest L1 marginal error over all Sinkhorn problems solved (0 for other plans)."""
        return max((r.marginal_error for pair in self.sinkhorn.values() for r in pair), default=0.0)

    @property
    def iterations(self) -> int:
        """Total Sinkhorn iterations at the target temperatures."""
        return sum(r.iterations for pair in self.sinkhorn.values() for r in pair)


def _setup(x, y, eps, cost, backend, group, x_weights=None, y_weights=None, plan=None, solver=None, tol=None, max_iter=None, **settings):
    """Validate the common arguments and wrap the clouds for (possibly distributed) reductions; also returns the
    Sinkhorn solver of the call (``solver`` with ``tol`` / ``max_iter`` replaced when given).

    With a process group, the ranks then agree: all raise if one rank's input is bad or if the ranks' settings
    (``plan``, ``settings``, D, dtype, eps, cost, backend, which weights are given) differ; the communication
    mode is chosen from D and the global point count.
    """
    comm = Comm(group)
    with comm.checked() as check:
        x = as_points(x, "x")
        y = as_points(y, "y", like=x)
        eps_list = as_eps(eps)
        check_cost(cost)
        if plan is not None:
            check_choice(plan, PLANS, "plan")
        be = get_backend(backend)
        sol = as_solver(solver, tol, max_iter)
        x_logw = as_weights(x_weights, x.shape[0], "x_weights", x)
        y_logw = as_weights(y_weights, y.shape[0], "y_weights", x)
        check.signature.update(
            settings, plan=plan, solver=repr(sol), dim=x.shape[1], dtype=str(x.dtype), eps=eps_list, cost=cost, backend=be.name,
            weights=(x_logw is not None, y_logw is not None),
        )  # fmt: skip
        check.points = x.shape[0] + y.shape[0]
    comm.mode = comm.sharding.mode_for(x.shape[1], check.total, x.element_size(), comm.size, comm.world)
    src = Cloud.split(x, comm, x_logw)
    dst = Cloud.split(y, comm, y_logw)
    return eps_list, comm, src, dst, be, sol


def _agreed_finite(t: torch.Tensor, comm: Comm, what: str) -> torch.Tensor:
    """``t`` after checking that it is finite on every rank (all ranks raise otherwise)."""
    with comm.checked():
        check_finite(t, what, NAN_HINT)
    return t


def _recentred(src: Cloud, dst: Cloud, plan: str | None, cost: str, solver: Sinkhorn) -> Cloud:
    """The source of the cross plan: ``src`` moved by t = mean(y) - mean(x) for the Sinkhorn plan of the squared
    Euclidean cost when the means are farther apart than ``solver.recentre`` times the larger bounding-box
    diagonal, else ``src`` itself.

    ``|x + t - y|^2`` differs from ``|x - y|^2`` by terms in x alone and in y alone, which the potentials absorb:
    the plan of ``(x + t, y)`` is that of ``(x, y)``, and so is the map ``T(x_i) = sum_j P_ij y_j``. Its potentials
    stay the size of the clouds instead of their separation, which float32 resolves, and annealing starts from the
    clouds' own extent.
    """
    if plan != "sinkhorn" or cost != "sqeuclidean" or solver.recentre is None:
        return src
    t = dst.mean() - src.mean()
    extent = max(float((box[1] - box[0]).norm()) for box in (src.box(), dst.box()))
    return src.shifted(t) if float(t.norm()) > solver.recentre * extent else src


def _check_self_mask(cloud: Cloud, name: str) -> None:
    if cloud.n < 2:
        raise DriftopsError(f"the self term of {name} needs at least 2 points when the diagonal is masked; pass more points or mask_self=False")


def _normalised_sum(fields: list[torch.Tensor], comm: Comm) -> torch.Tensor:
    """One field as is; several (one per temperature) each scaled to unit mean squared norm per dimension, then summed."""
    if len(fields) == 1:
        return fields[0]
    total = torch.zeros_like(fields[0])
    count = comm.sum(torch.tensor(float(fields[0].shape[0]), dtype=fields[0].dtype, device=fields[0].device))
    for v in fields:
        scale = (comm.sum(v.pow(2).sum()) / (count * v.shape[1])).sqrt().clamp_min(torch.finfo(v.dtype).tiny)
        total = total + v / scale
    return total


@numpy_io
@threads.scoped
def drift(
    x,
    y,
    eps=0.05,
    plan: str = "sinkhorn",
    cost: str = "sqeuclidean",
    mask_self: bool = True,
    backend="auto",
    tol: float | None = None,
    max_iter: int | None = None,
    group=None,
    *,
    solver: Sinkhorn | None = None,
    x_weights=None,
    y_weights=None,
    warm_start: DriftInfo | None = None,
    return_info: bool = False,
):
    """Drift ``V = T_{x->y}(x) - T_{x->x}(x)`` of shape (N, D), dtype and device of x.

    x: (N, D) model samples; y: (M, D) target samples (torch or numpy; float32/float64).
    eps: temperature (> 0), or a list of temperatures whose drifts are each
    normalised to unit mean squared norm per dimension and summed.
    plan: ``"one_sided"``, ``"two_sided"`` or ``"sinkhorn"``; cost: ``"sqeuclidean"`` or
    ``"euclidean"``. mask_self: exclude i == j in the self term (one/two-sided only).
    solver: a :class:`driftops.Sinkhorn` (default ``Sinkhorn()``: tol 1e-3, max_iter 1000); tol, max_iter:
    shortcuts that replace the solver's stopping rule (L1 marginal error). x_weights, y_weights:
    optional non-negative multiplicities. group: torch.distributed group; each rank
    passes its slices and receives the drift of its slice of x. warm_start: a
    :class:`DriftInfo` from a previous call; return_info: also return one.
    """
    eps_list, comm, src, dst, be, solver = _setup(
        x, y, eps, cost, backend, group, x_weights, y_weights, plan, solver, tol, max_iter, call="drift", mask_self=mask_self,
        warm_start=warm_start is not None,
    )  # fmt: skip
    mask = mask_self and plan != "sinkhorn"
    if mask:
        _check_self_mask(src, "the drift")
    moved = _recentred(src, dst, plan, cost, solver)
    info = DriftInfo()
    fields = []
    for e in eps_list:
        geom = Geometry(e, cost, be, comm)
        cross = own = None
        if plan == "sinkhorn":
            prev = warm_start.sinkhorn.get(e, (None, None)) if warm_start is not None else (None, None)
            with torch.no_grad():
                cross = sinkhorn(moved, dst, geom, solver, prev[0])
                own = sinkhorn(src, None, geom, solver, prev[1])
            info.sinkhorn[e] = (cross, own)
        attract = barycentric(moved, dst, geom, column_logweights(plan, moved, dst, geom, False, cross), False)
        repel = barycentric(src, src, geom, column_logweights(plan, src, src, geom, mask, own), mask)
        fields.append(attract - repel)
    v = _agreed_finite(_normalised_sum(fields, comm), comm, "the drift")
    return (v, info) if return_info else v


@numpy_io
@threads.scoped
def barycentric_map(
    x,
    y,
    eps=0.05,
    plan: str = "two_sided",
    cost: str = "sqeuclidean",
    backend="auto",
    tol: float | None = None,
    max_iter: int | None = None,
    group=None,
    *,
    solver: Sinkhorn | None = None,
    x_weights=None,
    y_weights=None,
):
    """Barycentric map ``T(x_i) = sum_j P_ij y_j`` of the plan from x (N, D) to y (M, D); shape (N, D).

    solver, tol, max_iter: as for :func:`drift` (``plan="sinkhorn"`` only)."""
    eps_list, comm, src, dst, be, solver = _setup(
        x, y, eps, cost, backend, group, x_weights, y_weights, plan, solver, tol, max_iter, call="barycentric_map"
    )
    if len(eps_list) != 1:
        raise DriftopsError("barycentric_map takes a single eps; call it once per temperature")
    geom = Geometry(eps_list[0], cost, be, comm)
    src = _recentred(src, dst, plan, cost, solver)
    cross = None
    if plan == "sinkhorn":
        with torch.no_grad():
            cross = sinkhorn(src, dst, geom, solver)
    t = barycentric(src, dst, geom, column_logweights(plan, src, dst, geom, False, cross), False)
    return _agreed_finite(t, comm, "the barycentric map")


@numpy_io
@threads.scoped
def joint_drift(
    x,
    y_pos,
    y_neg=None,
    eps=0.05,
    cost: str = "euclidean",
    mask_self: bool = True,
    backend="auto",
    group=None,
    *,
    pos_weights=None,
    neg_weights=None,
):
    """Joint two-sided drift of Deng et al. (Algorithm 2), shape (N, D).

    One softmax over rows and one over columns of the concatenated logits
    ``[x->positives, x->negatives]``; ``A = sqrt(row · column)``;
    ``V_i = sum_j A+_ij (sum_k A-_ik) y+_j - sum_k A-_ik (sum_j A+_ij) y-_k``.
    Lazily: ``V_i = Z+_i Z-_i e^{-r_i} (T+(x_i) - T-(x_i))`` with r the joint row
    log-normaliser and Z± the two-sided partial sums. ``y_neg=None`` uses x itself
    as negatives (diagonal masked when ``mask_self``). Weights act as multiplicities.
    """
    eps_list, comm, xs, pos, be, _ = _setup(x, y_pos, eps, cost, backend, group, None, pos_weights, call="joint_drift", mask_self=mask_self)
    with comm.checked() as check:
        negatives = xs.local if y_neg is None else as_points(y_neg, "y_neg", like=xs.local)
        neg_logw = as_weights(neg_weights, negatives.shape[0], "neg_weights", xs.local)
        check.signature.update(negatives=y_neg is None, weights=neg_logw is not None)
    neg = Cloud.split(negatives, comm, neg_logw)
    mask = mask_self and y_neg is None
    if mask:
        _check_self_mask(xs, "the joint drift")
    fields = []
    for e in eps_list:
        geom = Geometry(e, cost, be, comm)
        row_off = xs.offset if mask else None
        r = torch.logaddexp(geom.lse(xs, pos, pos.logw, None), geom.lse(xs, neg, neg.logw, row_off))
        parts = []
        for cloud, off in ((pos, None), (neg, row_off)):
            c = cloud.gather(geom.lse(cloud, xs, None, cloud.offset if off is not None else None))
            u = -0.5 * c if cloud.logw is None else cloud.logw - 0.5 * c
            parts.append((geom.lse(xs, cloud, u, off), geom.weighted_mean(xs, cloud, u, off)))
        (lz_pos, t_pos), (lz_neg, t_neg) = parts
        fields.append((lz_pos + lz_neg - r).exp()[:, None] * (t_pos - t_neg))
    return _agreed_finite(_normalised_sum(fields, comm), comm, "the joint drift")

"""Particle flows: explicit Euler steps along the drift, ``x <- x + step_size * V(x)``.

With ``plan="sinkhorn"`` this is the Sinkhorn-divergence gradient flow (``V = -N grad S_eps``).
Sinkhorn potentials are warm-started from the previous step, so a flow step costs a few
Sinkhorn iterations instead of a full eps-annealing. Runs without autograd. The progress bar shows the
running Sinkhorn solve (stage, points, iteration, marginal error) while a step is under way.

Sharded flows (``group=``): each rank flows its own slice of the particles against its slice of the target;
snapshots, metrics and the drift norm are those of the whole cloud and equal on every rank, and a stop (callback,
divergence, bad input) on one rank stops every rank at the same step.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics
from .checks import as_eps, as_points, check_choice
from .drift import DriftInfo, drift
from .errors import DivergenceError, DriftopsError
from .parallel import Comm
from .plans import PLANS
from .sinkhorn import Sinkhorn, SolveStatus, as_solver

Schedule = Callable[[int], float] | Sequence[float] | None
DIVERGENCE_HINT = "use a smaller step_size or a larger eps"


@dataclass
class FlowResult:
    """Outcome of :func:`flow`.

    x: final particles (N, D), dtype/device of x0 (numpy if x0 was numpy).
    snapshots: ``(step, (n, D) cpu tensor)`` pairs, the same fixed subset of particles
    (``snapshot_index``, (n,)) at every snapshot, so that trails can be drawn.
    history: dict of lists. One entry per step: ``step``, ``eps``, ``step_size``,
    ``drift_norm`` (mean |V_i| before scaling), ``sinkhorn_iterations``, ``marginal_error``,
    ``seconds`` (wall time of the step). One entry per metric evaluation: ``metric_step``, ``w2``
    (squared W2 between fixed random subsets of the particles and of the target).
    steps: number of steps taken (fewer than asked if the callback stopped the flow).
    seconds: total wall time, metrics included.
    info: the Sinkhorn state after the last step (a warm start for a later flow or drift).
    """

    x: torch.Tensor | np.ndarray
    snapshots: list[tuple[int, torch.Tensor]]
    snapshot_index: torch.Tensor
    history: dict[str, list] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    info: DriftInfo | None = None


def _resolve(schedule: Schedule, default, steps: int, name: str) -> list:
    """Per-step values (steps,) from a callable ``k -> value`` (k = 0-based step), a sequence, or a constant default."""
    if schedule is None:
        return [default] * steps
    if callable(schedule):
        return [schedule(k) for k in range(steps)]
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, (Sequence, np.ndarray)):
        raise DriftopsError(f"{name} must be a callable step -> value or a sequence of values, got {type(schedule).__name__}")
    if len(schedule) < steps:
        raise DriftopsError(f"{name} has {len(schedule)} values but the flow takes {steps} steps; pass at least one value per step")
    return list(schedule[:steps])


def _positive_int(value, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DriftopsError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _step_size(value, k: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value) or value <= 0:
        raise DriftopsError(f"step_size at step {k} must be a positive finite number, got {value!r}; typical values are 0.1 to 1")
    return float(value)


def _subset(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of a fixed random subset of ``min(n, size)`` of n rows."""
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:size].sort().values


def _rekey(info: DriftInfo | None, eps: list[float]) -> DriftInfo | None:
    """Reuse the potentials of a single previous temperature as the warm start at a new single one."""
    if info is None or len(eps) != 1 or len(info.sinkhorn) != 1 or eps[0] in info.sinkhorn:
        return info
    return DriftInfo({eps[0]: next(iter(info.sinkhorn.values()))})


def _gather_rows(t: torch.Tensor, index: torch.Tensor, offset: int, comm: Comm) -> torch.Tensor:
    """(k, D) cpu copy of the rows ``index`` (sorted, numbered in the whole cloud) of a cloud whose rows
    ``offset .. offset + len(t)`` are this rank's ``t``."""
    mine = index[(index >= offset) & (index < offset + len(t))] - offset
    return comm.gather(t[mine.to(t.device)]).cpu()


def _show_solve(bar: tqdm, postfix: dict[str, str], every: float = 1.0) -> Callable[[SolveStatus], None]:
    """A ``Sinkhorn.progress`` hook showing the running solve in ``bar``'s postfix, at most once per ``every`` seconds."""
    last = -math.inf

    def show(s: SolveStatus) -> None:
        nonlocal last
        if time.perf_counter() - last >= every:
            last = time.perf_counter()
            err = "" if math.isinf(s.error) else f", err {s.error:.1e}"
            postfix["solve"] = f"{'self' if s.symmetric else 'cross'} {s.stage}/{s.stages}, {s.points} pts, it {s.iteration}{err}"
            bar.set_postfix(postfix)

    return show


def _w2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W2^2 for subsets POT can solve, the debiased Sinkhorn estimate beyond."""
    exact = max(len(x), len(y)) <= metrics.MAX_EXACT_POINTS
    return metrics.w2(x, y) if exact else metrics.sinkhorn_w2(x, y)


def flow(
    x0,
    y,
    steps: int = 100,
    step_size: float = 1.0,
    eps=0.05,
    plan: str = "sinkhorn",
    cost: str = "sqeuclidean",
    backend="auto",
    tol: float | None = None,
    max_iter: int | None = None,
    group=None,
    *,
    solver: Sinkhorn | None = None,
    warm_start: DriftInfo | None = None,
    eps_schedule: Schedule = None,
    step_schedule: Schedule = None,
    snapshot_every: int | None = None,
    max_snapshot_points: int = 20000,
    metric_every: int | None = 10,
    metric_points: int = 2000,
    callback: Callable[[int, torch.Tensor, DriftInfo], bool | None] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> FlowResult:
    """Flow particles x0 (N, D) toward the target y (M, D) along the drift of ``plan``.

    Each step computes ``V = drift(x, y, eps, plan, ...)`` (see :func:`driftops.drift`) and sets
    ``x <- x + step_size * V``. solver / tol / max_iter: the Sinkhorn settings, as for :func:`driftops.drift`;
    Sinkhorn potentials carry over from step to step, and from ``warm_start`` (a :class:`DriftInfo`, e.g. the
    ``info`` of a previous flow on other points) into the first step. eps_schedule / step_schedule: callables ``k -> value`` of the
    0-based step index, or sequences of at least ``steps`` values; they replace eps / step_size.
    snapshot_every: steps between snapshots (None: about 50 snapshots); step 0 and the last step
    are always kept, each on the same random subset of at most ``max_snapshot_points`` particles.
    metric_every: steps between W2^2 estimates on ``metric_points`` fixed random particles and
    target points (also at step 0 and at the end; None: never). callback(step, x, info) runs after
    every step (step counts from 1) and stops the flow by returning False. seed fixes the subsets.
    Raises :class:`DivergenceError` when the particles become non-finite. With ``group``, x0 and y are this rank's
    slices, ``x`` is its slice of the result, and the subsets, snapshots and history are of the whole cloud.
    """
    numpy_in = isinstance(x0, np.ndarray)
    comm = Comm(group)
    with comm.checked() as check:
        x = as_points(x0, "x0").detach().clone(memory_format=torch.contiguous_format)
        y = as_points(y, "y", like=x).detach().contiguous()
        steps = _positive_int(steps, "steps")
        check_choice(plan, PLANS, "plan")
        solver = as_solver(solver, tol, max_iter)
        eps_values = [as_eps(e) for e in _resolve(eps_schedule, eps, steps, "eps_schedule")]
        sizes = [_step_size(s, k) for k, s in enumerate(_resolve(step_schedule, step_size, steps, "step_schedule"))]
        snapshot_every = _positive_int(snapshot_every, "snapshot_every", True) or max(1, round(steps / 50))
        max_snapshot_points = _positive_int(max_snapshot_points, "max_snapshot_points")
        metric_every = _positive_int(metric_every, "metric_every", True)
        metric_points = _positive_int(metric_points, "metric_points")
        check.signature.update(call="flow", eps=eps_values, sizes=sizes, snapshots=(snapshot_every, max_snapshot_points), metrics=(metric_every, metric_points), seed=seed, solver=repr(solver))

    x_sizes, y_sizes = comm.sizes(len(x), x.device), comm.sizes(len(y), x.device)
    x_off, y_off, n_total = sum(x_sizes[: comm.rank]), sum(y_sizes[: comm.rank]), sum(x_sizes)
    gen = torch.Generator().manual_seed(seed)
    snap_idx = _subset(n_total, max_snapshot_points, gen)
    metric_x, metric_y = _subset(n_total, metric_points, gen), _subset(sum(y_sizes), metric_points, gen)
    y_metric = _gather_rows(y, metric_y, y_off, comm)
    history: dict[str, list] = {
        k: [] for k in ("step", "eps", "step_size", "drift_norm", "sinkhorn_iterations", "marginal_error", "seconds", "metric_step", "w2")
    }
    result = FlowResult(x, [], snap_idx, history)

    def record(step: int, snapshot: bool, metric: bool) -> None:
        if snapshot:
            result.snapshots.append((step, _gather_rows(x, snap_idx, x_off, comm)))
        if metric and metric_every is not None:
            history["metric_step"].append(step)
            sample = _gather_rows(x, metric_x, x_off, comm)
            history["w2"].append(comm.broadcast_float(_w2(sample, y_metric) if comm.rank == 0 else None))

    start = time.perf_counter()
    record(0, True, True)
    info = warm_start
    unconverged = 0
    with torch.no_grad(), tqdm(range(steps), desc=f"flow ({plan})", disable=not progress or comm.rank != 0, unit="step") as bar:
        postfix: dict[str, str] = {}
        if not bar.disable and solver.progress is None:
            solver = replace(solver, progress=_show_solve(bar, postfix))
        for k in bar:
            tick = time.perf_counter()
            info = _rekey(info, eps_values[k])
            eps_k = eps_values[k][0] if len(eps_values[k]) == 1 else eps_values[k]
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Sinkhorn stopped", RuntimeWarning)  # summarised once below
                    v, info = drift(x, y, eps_k, plan, cost, True, backend, group=group, solver=solver, warm_start=info, return_info=True)
                postfix.pop("solve", None)
            except DriftopsError as err:
                if k == 0:
                    raise
                raise DivergenceError(f"the drift failed at step {k + 1} (step_size={sizes[k - 1]:g}, eps={eps_k}): {err}; {DIVERGENCE_HINT}") from err
            x.add_(v, alpha=sizes[k])
            step = k + 1
            history["step"].append(step)
            history["eps"].append(eps_k)
            history["step_size"].append(sizes[k])
            history["drift_norm"].append(float(comm.sum(v.norm(dim=1).sum())) / n_total)
            history["sinkhorn_iterations"].append(info.iterations)
            history["marginal_error"].append(info.marginal_error)
            history["seconds"].append(time.perf_counter() - tick)
            unconverged += not all(r.converged for pair in info.sinkhorn.values() for r in pair)
            stop = comm.any(callback is not None and callback(step, x, info) is False)
            bad = int(comm.sum((~torch.isfinite(x)).any(1).sum()))
            if bad:
                raise DivergenceError(
                    f"{bad} of {n_total} particles became non-finite at step {step} (step_size={sizes[k]:g}, eps={eps_k}); {DIVERGENCE_HINT}"
                )
            result.steps = step
            last = stop or step == steps
            record(step, last or step % snapshot_every == 0, last or (metric_every is not None and step % metric_every == 0))
            if metric_every is not None and history["metric_step"][-1] == step:
                postfix.update(w2=f"{history['w2'][-1]:.3g}", drift=f"{history['drift_norm'][-1]:.3g}")
                bar.set_postfix(postfix)
            if stop:
                break
    result.seconds = time.perf_counter() - start
    result.info = info
    if unconverged:
        warnings.warn(
            f"Sinkhorn did not reach tol={solver.tol:g} within max_iter={solver.max_iter} in {unconverged} of {result.steps} steps "
            f"(largest marginal error {max(history['marginal_error']):.2e}); raise max_iter or tol, or use a larger eps",
            RuntimeWarning,
            stacklevel=2,
        )
    result.x = x.cpu().numpy() if numpy_in else x
    return result

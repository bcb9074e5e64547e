"""Sinkhorn solver: convergence to the stated tolerance and to dense references for every acceleration, the safeguard,
stages, warm starts (same and new points), precision reporting, settings, the gradient identity."""

import functools
import math
import warnings

import pytest
import torch

import driftops
from driftops.backends import KeOpsBackend
from driftops.errors import DriftopsError
from driftops.parallel import Cloud, Comm
from driftops.plans import Geometry
from driftops.costs import max_cost
from driftops.sinkhorn import ACCELERATIONS, NEWTON_MIN_ITER, ONE_SHOT_ITERATIONS, Sinkhorn, SolveStatus, kernel_points, level, newton_entries, relax, sinkhorn, stages

import reference


def pair(n=300, m=200, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=dtype), torch.randn(m, 2, generator=g, dtype=dtype) * 0.5 + 1.0


def marginal_errors(x, y, res, eps):
    """Independent check of the returned potentials: L1 errors of both marginals of the dense plan."""
    c = torch.cdist(x, y) ** 2
    p = torch.exp((res.f[:, None] + res.g[None, :] - c) / eps) / (x.shape[0] * y.shape[0])
    return float((p.sum(1) - 1 / x.shape[0]).abs().sum()), float((p.sum(0) - 1 / y.shape[0]).abs().sum())


@pytest.mark.parametrize("eps", [0.1, 0.01])
@pytest.mark.parametrize("symmetric", [False, True])
def test_converges_to_tolerance(eps, symmetric):
    x, y = pair(400, 300)
    comm = Comm()
    src, dst = Cloud.split(x, comm), (None if symmetric else Cloud.split(y, comm))
    res = sinkhorn(src, dst, Geometry(eps, "sqeuclidean", KeOpsBackend(), comm), Sinkhorn(tol=1e-3, max_iter=5000))
    assert res.converged and res.marginal_error < 1e-3
    rows, cols = marginal_errors(x, x if symmetric else y, res, eps)
    assert cols < 1e-3 and rows < 1e-3
    # The usual fixed 20 normalisations would be far from this; the reported error is the true one.
    assert abs(cols - res.marginal_error) < 1e-6 or symmetric


def test_drift_is_minus_n_times_sinkhorn_divergence_gradient():
    x, y = pair()
    v = driftops.drift(x, y, 0.1, plan="sinkhorn", backend="keops", tol=1e-9, max_iter=20000)
    xr = x.clone().requires_grad_()
    # GeomLoss does one update per temperature: scaling 0.999 makes its answer converged to ~1e-3.
    (grad,) = torch.autograd.grad(driftops.sinkhorn_divergence(xr, y, 0.1, scaling=0.999, backend="tensorized"), xr)
    assert float((v + x.shape[0] * grad).abs().max() / v.abs().max()) < 5e-3


def test_zero_drift_when_clouds_coincide():
    x, _ = pair()
    v = driftops.drift(x, x.clone(), 0.05, plan="sinkhorn", backend="keops", tol=1e-6, max_iter=20000)
    assert float(v.abs().max()) < 1e-4
    # The one-sided drift of identical clouds is not zero: it is the bias Sinkhorn removes.
    assert float(driftops.drift(x, x.clone(), 0.05, plan="one_sided", backend="keops").abs().max()) > 1e-2


def test_warm_start_converges_to_the_cold_answer():
    x, y = pair(500, 500)
    v, info = driftops.drift(x, y, 0.02, plan="sinkhorn", backend="keops", return_info=True)
    x2 = x + 0.05 * v
    v_cold, cold = driftops.drift(x2, y, 0.02, plan="sinkhorn", backend="keops", return_info=True)
    v_warm, warm = driftops.drift(x2, y, 0.02, plan="sinkhorn", backend="keops", return_info=True, warm_start=info)
    assert warm.marginal_error < 1e-3 and cold.marginal_error < 1e-3
    assert warm.iterations <= 1.2 * cold.iterations
    assert float((v_warm - v_cold).abs().max() / v_cold.abs().max()) < 1e-2


def test_sinkhorn_divergence_is_safe_under_no_grad_and_on_collapsed_clouds():
    x, y = pair(50, 40)
    with torch.no_grad():
        s = driftops.sinkhorn_divergence(x, y, 0.1)
        assert not torch.is_grad_enabled()
    assert s.ndim == 0 and float(s) > 0
    z = torch.zeros(30, 2, dtype=torch.float64)
    assert abs(float(driftops.sinkhorn_divergence(z, z.clone(), 0.1))) < 1e-6
    assert torch.isfinite(driftops.sinkhorn_divergence(z, z + 1.0, 0.1))


def test_sinkhorn_divergence_matches_driftops_convention():
    """S_eps with blur = sqrt(eps/2) is half the |x-y|^2-cost divergence: 1D shifted Diracs give |d|^2/2."""
    x = torch.zeros(1, 1, dtype=torch.float64)
    assert abs(float(driftops.sinkhorn_divergence(x, x + 3.0, 0.01)) - 4.5) < 1e-6


def test_coarse_level_keeps_mass_and_mean():
    x, _ = pair(3000, 10)
    w = torch.rand(3000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cloud = Cloud(x, x, 0, w.log())
    geom = Geometry(0.01, "sqeuclidean", driftops.backends.AutoBackend(), Comm())
    solver = Sinkhorn()
    coarse = level(cloud, geom, 1.0, solver)
    assert 1 < coarse.full.shape[0] * solver.level_shrink <= 3000
    assert float(coarse.logw.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    mean = (w[:, None] * x).sum(0) / w.sum()
    assert torch.allclose((coarse.logw.exp()[:, None] * coarse.full).sum(0), mean, atol=1e-12)
    assert level(cloud, geom, 1e-4, solver) is cloud  # cells too small to shrink the cloud: the points themselves
    assert level(cloud, Geometry(0.01, "sqeuclidean", KeOpsBackend(), Comm()), 1.0, solver) is cloud
    assert level(cloud, geom, 1.0, Sinkhorn(multiscale=False)) is cloud


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_coarse_to_fine_annealing_reaches_the_same_potentials(cost, symmetric):
    x, y = pair(1200, 900)
    wy = torch.rand(900, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    comm = Comm()
    src, dst = Cloud.split(x, comm), (None if symmetric else Cloud.split(y, comm, wy.log()))
    eps = 0.05 if cost == "sqeuclidean" else 0.1
    runs = {}
    for name in ("auto", "dense"):  # "auto" anneals on coarse levels, "dense" on the points
        runs[name] = sinkhorn(src, dst, Geometry(eps, cost, driftops.backends.get_backend(name), comm), Sinkhorn(tol=1e-8, max_iter=20000))
        assert runs[name].converged
    # Potentials are defined up to a constant shifted between f and g; their sum on the plan's support is not.
    shift = float((runs["auto"].f - runs["dense"].f).mean())
    assert torch.allclose(runs["auto"].f - shift, runs["dense"].f, atol=1e-5 * eps)
    assert torch.allclose(runs["auto"].g + shift * (not symmetric), runs["dense"].g, atol=1e-5 * eps)


def uniform_and_cornered():
    """3000 uniform points of the unit square and 2500 crowded towards a corner (float64), whole and as clouds."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3000, 2, generator=g, dtype=torch.float64)
    y = torch.rand(2500, 2, generator=g, dtype=torch.float64) ** 2
    comm = Comm()
    return x, y, Cloud.split(x, comm), Cloud.split(y, comm), comm


def test_coarse_solve_at_the_target_temperature_leaves_few_fine_iterations():
    x, y, src, dst, comm = uniform_and_cornered()
    runs = {}
    # "auto" solves eps = 0.01 first on 1350 occupied cells of side sqrt(eps) / 4 (of 1600) per cloud, and on coarser
    # ones; "dense" has no levels and iterates plainly on the points.
    for name, accel in (("auto", "adaptive"), ("dense", "none")):
        geom = Geometry(0.01, "sqeuclidean", driftops.backends.get_backend(name), comm)
        assert level(src, geom, 0.01, Sinkhorn()).full.shape[0] == (1350 if name == "auto" else 3000)
        assert level(src, geom, 0.01, Sinkhorn(level_cells=2.0)).full.shape[0] == (400 if name == "auto" else 3000)
        runs[name] = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-3, max_iter=5000, acceleration=accel))
        assert runs[name].converged
    assert runs["auto"].iterations * 5 <= runs["dense"].iterations
    rows, cols = marginal_errors(x, y, runs["auto"], 0.01)
    assert rows < 1e-10 and cols < 1e-3


def unit_clouds(n, m, d, seed=0, dtype=torch.float64):
    """x (n, d), y (m, d) with pairwise squared distances of order 1 whatever d, and positive weights of y (m,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype) / math.sqrt(d)
    y = (torch.rand(m, d, generator=g, dtype=dtype) + 0.3) / math.sqrt(d)
    return x, y, torch.rand(m, generator=g, dtype=dtype) + 0.2


@functools.lru_cache
def reference_maps(n, m, d, eps):
    """Clouds of :func:`unit_clouds` and their reference Sinkhorn maps x -> y (weighted y) and x -> x."""
    x, y, wy = unit_clouds(n, m, d)
    return x, y, wy, reference.sinkhorn_map(x, y, eps, wy=wy), reference.sinkhorn_map(x, x, eps)


@pytest.mark.parametrize("acceleration", ACCELERATIONS)
@pytest.mark.parametrize("n, m, d, eps", [(60, 45, 1, 0.3), (80, 50, 2, 0.03), (50, 70, 2, 0.003), (40, 30, 16, 0.03), (30, 40, 64, 0.1)])
def test_every_acceleration_reaches_the_dense_reference(acceleration, n, m, d, eps):
    x, y, wy, t_ref, s_ref = reference_maps(n, m, d, eps)
    solver = Sinkhorn(tol=1e-10, max_iter=100000, acceleration=acceleration, omega=1.5)
    v = driftops.drift(x, y, eps, plan="sinkhorn", backend="dense", solver=solver, y_weights=wy)
    assert float((v - (t_ref - s_ref)).abs().max() / (t_ref - s_ref).abs().max()) < 1e-6
    t = driftops.barycentric_map(x, y, eps, plan="sinkhorn", backend="keops", solver=solver, y_weights=wy)
    assert float((t - t_ref).abs().max()) < 1e-6


@pytest.mark.parametrize("n, m, d, eps", [(60, 45, 1, 0.3), (80, 50, 2, 0.03), (50, 70, 2, 0.003), (40, 30, 16, 0.03), (30, 40, 64, 0.1)])
def test_newton_finish_reaches_the_dense_reference(n, m, d, eps):
    x, y, wy, t_ref, s_ref = reference_maps(n, m, d, eps)
    solver = Sinkhorn(tol=1e-10, max_iter=1000, newton=64)  # every entry of these small plans
    v, info = driftops.drift(x, y, eps, plan="sinkhorn", backend="dense", solver=solver, y_weights=wy, return_info=True)
    assert float((v - (t_ref - s_ref)).abs().max() / (t_ref - s_ref).abs().max()) < 1e-6
    plain = driftops.drift(x, y, eps, plan="sinkhorn", backend="dense", solver=Sinkhorn(tol=1e-10, max_iter=100000), return_info=True, y_weights=wy)[1]
    assert info.sinkhorn[eps][0].iterations < plain.sinkhorn[eps][0].iterations
    t = driftops.barycentric_map(x, y, eps, plan="sinkhorn", backend="keops", solver=solver, y_weights=wy)
    assert float((t - t_ref).abs().max()) < 1e-6


def test_newton_finish_on_the_block_sparse_path():
    x, y, src, dst, comm = uniform_and_cornered()
    geom = Geometry(0.01, "sqeuclidean", driftops.backends.AutoBackend(), comm)
    newton = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-6, newton=256))
    plain = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-6, newton=0))
    assert newton.newton == 256 and plain.newton == 0
    # 64 entries hold about 58% of a row's mass here (rows spread over hundreds of points): no Newton step is taken.
    assert sinkhorn(src, dst, geom, Sinkhorn(tol=1e-6, newton=64)).newton == 0
    assert newton.converged and newton.iterations <= 10 and plain.iterations > 2 * newton.iterations, (newton.iterations, plain.iterations)
    rows, cols = marginal_errors(x, y, newton, 0.01)
    assert rows < 1e-10 and cols < 1e-6
    # The same potentials up to the constant (f + k, g - k) and the tolerance.
    k = float((newton.f - plain.f).mean())
    assert float((newton.f - plain.f - k).abs().max()) < 1e-4 and float((newton.g - plain.g + k).abs().max()) < 1e-4


def test_newton_hands_over_to_overrelaxation_when_its_hessian_is_too_sparse():
    x, y = pair(400, 300, seed=3)
    # One entry per row: the truncated Hessian misses most of each row's mass; the solve still converges.
    v, info = driftops.drift(x, y, 0.01, plan="sinkhorn", backend="dense", solver=Sinkhorn(tol=1e-8, newton=1), return_info=True)
    ref = driftops.drift(x, y, 0.01, plan="sinkhorn", backend="dense", solver=Sinkhorn(tol=1e-8))
    assert info.sinkhorn[0.01][0].converged and float((v - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("n, m, eps", [(3, 2000, 0.01), (12, 3000, 0.001)])
def test_newton_with_few_rows_against_many_columns(n, m, eps):
    # n * 128 plan entries cannot reach every column: those columns take their exact update, the solve stays finite
    # and converges to the over-relaxed solve's potentials (once a step on them grew g to 1e32 behind a "float32" warning).
    g = torch.Generator().manual_seed(5)
    x = 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = driftops.data.sample_toy("checkerboard", m, seed=6).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, info = driftops.drift(x, y, eps, plan="sinkhorn", solver=Sinkhorn(tol=1e-6, newton=128), return_info=True)
    ref = driftops.drift(x, y, eps, plan="sinkhorn", backend="dense", solver=Sinkhorn(tol=1e-9, newton=0))
    cross = info.sinkhorn[eps][0]
    assert cross.converged and float(cross.g.abs().max()) < 50
    assert float((v - ref).abs().max() / ref.abs().max()) < 1e-4


def test_newton_finish_by_default_where_coarse_levels_apply():
    x, y = pair(400, 300)

    def used(d: int, **kw) -> int:
        """Plan entries per row of the cross solve's last Newton step in dimension d (0: no Newton step)."""
        xd, yd = x.repeat(1, 2)[:, :d], y.repeat(1, 2)[:, :d]
        return driftops.drift(xd, yd, 0.05, plan="sinkhorn", return_info=True, **kw)[1].sinkhorn[0.05][0].newton

    assert used(2, backend="sparse") >= 128 and used(1, backend="sparse") >= 128
    # "auto" reduces 400 x 300 points densely, where iterations (one product with a kept kernel) cost less.
    assert used(2) == used(2, backend="keops") == used(4) == used(2, solver=Sinkhorn(newton=0)) == 0
    assert used(4, solver=Sinkhorn(newton=16)) >= 16  # asked for: used in any dimension
    # "auto" iterates densely while the dense backend keeps the kernel (1800 x 1700 float64), beyond that on the
    # block-sparse path, with Newton steps (the rule, without solving).
    geom = Geometry(0.01, "sqeuclidean", driftops.backends.AutoBackend(), Comm())
    assert newton_entries(Sinkhorn(), geom, *(Cloud.split(c, Comm()) for c in pair(1800, 1700))) == 0
    clouds = [Cloud.split(c, Comm()) for c in pair(4200, 4100, torch.float32)]
    assert newton_entries(Sinkhorn(), geom, *clouds) == newton_entries(Sinkhorn(max_iter=NEWTON_MIN_ITER), geom, *clouds) == 128
    # A capped solve iterates unless asked for Newton steps.
    assert newton_entries(Sinkhorn(max_iter=NEWTON_MIN_ITER - 1), geom, *clouds) == 0
    assert newton_entries(Sinkhorn(max_iter=20, newton=64), geom, *clouds) == 64
    # At a large eps each row spreads over most of the 300 columns: 128 entries would miss much of it, no Newton.
    assert driftops.drift(x, y, 5.0, plan="sinkhorn", backend="sparse", return_info=True)[1].sinkhorn[5.0][0].newton == 0


def test_auto_iterates_densely_on_mid_sized_clouds(monkeypatch):
    # 2100 x 1900 float64 points: beyond the one-shot dense size, within the kept kernel's (32 MB): the iterations on
    # the points after the first few reduce densely (one product each) and reach the dense backend's drift.
    x, y = pair(2100, 1900)
    seen = []
    reduce = driftops.backends.DenseBackend.reduce_lse

    def spy(self, a, b, *args):
        seen.append((a.shape[0], b.shape[0]))
        return reduce(self, a, b, *args)

    monkeypatch.setattr(driftops.backends.DenseBackend, "reduce_lse", spy)
    v, info = driftops.drift(x, y, 0.01, plan="sinkhorn", solver=Sinkhorn(tol=1e-6), return_info=True)
    cross, own = info.sinkhorn[0.01]
    assert cross.converged and own.converged and cross.newton == 0
    # After the first ONE_SHOT_ITERATIONS of the stage (block-sparse).
    assert seen.count((1900, 2100)) >= cross.iterations - ONE_SHOT_ITERATIONS > 5
    assert seen.count((2100, 2100)) >= own.iterations - ONE_SHOT_ITERATIONS
    monkeypatch.undo()
    ref = driftops.drift(x, y, 0.01, plan="sinkhorn", backend="dense", solver=Sinkhorn(tol=1e-6))
    assert float((v - ref).abs().max()) < 1e-4 < float(v.abs().max())


def test_kernel_points_of_a_lattice():
    # 64 x 64 points 1/64 apart, kernel width sqrt(eps) = 1/16: 16 points per cell of the kernel's width.
    grid = torch.stack(torch.meshgrid(*[torch.arange(64, dtype=torch.float64) / 64] * 2, indexing="ij"), -1).reshape(-1, 2)
    cloud = Cloud.split(grid, Comm())
    assert kernel_points(cloud, Geometry(1 / 256, "sqeuclidean", driftops.backends.AutoBackend(), Comm())) == pytest.approx(16 * math.pi)
    assert kernel_points(cloud, Geometry(1 / 16, "euclidean", driftops.backends.AutoBackend(), Comm())) == pytest.approx(32 * math.pi)


def test_newton_hands_over_when_its_steps_stop_halving_the_error(monkeypatch):
    x, y = pair(400, 300, seed=3)
    calls = []
    solve = driftops.sinkhorn._schur_solve

    def poor(*args, **kwargs):  # a direction that lowers the error by ~1% per step, as a stagnating truncated Hessian
        calls.append(1)
        return 0.01 * solve(*args, **kwargs)

    monkeypatch.setattr(driftops.sinkhorn, "_schur_solve", poor)
    v, info = driftops.drift(x, y, 0.01, plan="sinkhorn", backend="dense", solver=Sinkhorn(tol=1e-8, newton=64), return_info=True)
    ref = driftops.drift(x, y, 0.01, plan="sinkhorn", backend="dense", solver=Sinkhorn(tol=1e-8))
    # One step, refused at every length, then the over-relaxed iterations (accepting every 1% step would need ~2000).
    assert len(calls) == 1 and info.sinkhorn[0.01][0].converged and float((v - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("backend", ["dense", "keops", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_logits_of_every_backend(backend, dtype):
    x, y, w = unit_clouds(700, 900, 2, seed=4, dtype=dtype)
    logw = w.log() * 3
    for eps, k in ((0.05, 10), (1e-4, 40)):
        top, cols = driftops.backends.get_backend(backend).topk(x, y, eps, "sqeuclidean", logw, k)
        s = logw[None, :] - torch.cdist(x.double(), y.double()) ** 2 / eps
        ref = s.topk(k, dim=1)
        found = top.isfinite()
        # Every returned entry is among the reference's k largest, with its logit; the block-sparse path may return fewer
        # (rows whose kept blocks hold fewer than k points, at eps = 1e-4), never missing one within e^-20 of the row's best.
        assert cols.dtype == torch.int64 and top.shape == cols.shape == (700, k)
        assert bool((s.gather(1, cols)[found] - top[found].double()).abs().max() < 1e-3 * s.abs().max())
        assert bool((top[found].double() >= ref.values[:, -1:].expand(-1, k)[found] - 1e-3 * s.abs().max()).all())
        assert bool(found.all()) if backend != "sparse" else bool((found | (ref.values < ref.values[:, :1] - 20)).all())


def dual(x, y, f, g, eps):
    """Dense dual objective of entropic OT with uniform marginals: <a, f> + <b, g> - eps <a x b, exp((f + g - C)/eps) - 1>."""
    c = torch.cdist(x, y) ** 2
    a, b = 1.0 / x.shape[0], 1.0 / y.shape[0]
    return float(a * f.sum() + b * g.sum() - eps * a * b * (torch.exp((f[:, None] + g[None, :] - c) / eps) - 1).sum())


def test_safeguarded_half_steps_never_lower_the_dual_objective():
    # A hard case: a cold start at a small eps, with a large factor, where plain over-relaxation does lower the dual.
    x, y, _ = unit_clouds(70, 50, 2, seed=3)
    eps, omega = 0.005, 1.95
    comm = Comm()
    src, dst = Cloud.split(x, comm), Cloud.split(y, comm)
    geom = Geometry(eps, "sqeuclidean", driftops.backends.DenseBackend(), comm)

    def exact_rows(g):
        return -eps * torch.logsumexp(-torch.cdist(x, y) ** 2 / eps + (g / eps - math.log(y.shape[0]))[None, :], 1)

    def exact_cols(f):
        return -eps * torch.logsumexp(-torch.cdist(x, y) ** 2 / eps + (f / eps - math.log(x.shape[0]))[:, None], 0)

    plain_drops = 0
    f, g = torch.zeros(70, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    for _ in range(60):
        g_star = exact_cols(f)
        before = dual(x, y, f, g, eps)
        plain_drops += dual(x, y, f, g + omega * (g_star - g), eps) < before - 1e-12
        g = relax(g, g_star, omega, eps)
        assert dual(x, y, f, g, eps) >= before - 1e-12
        f_star = exact_rows(g)
        before = dual(x, y, f, g, eps)
        plain_drops += dual(x, y, f + omega * (f_star - f), g, eps) < before - 1e-12
        f = relax(f, f_star, omega, eps)
        assert dual(x, y, f, g, eps) >= before - 1e-12
    assert plain_drops > 0  # the safeguard was needed
    # The solver itself, from the same cold start, converges with these settings.
    res = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-8, max_iter=20000, acceleration="fixed", omega=omega, annealing=0.5))
    assert res.converged and reference_error(x, y, res, eps) < 1e-8


def reference_error(x, y, res, eps):
    return max(marginal_errors(x, y, res, eps))


def test_adaptive_factor_is_raised_and_carried_over_warm_starts():
    x, y, _ = unit_clouds(400, 300, 2, seed=4)
    comm = Comm()
    geom = Geometry(0.005, "sqeuclidean", driftops.backends.DenseBackend(), comm)
    src, dst = Cloud.split(x, comm), Cloud.split(y, comm)
    first = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-6, max_iter=20000))
    plain = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-6, max_iter=20000, acceleration="none"))
    assert first.converged and plain.converged and first.omega > 1.5
    assert first.iterations < plain.iterations
    x.add_(0.01 * (y.mean(0) - x))  # a flow step: the same points, moved in place
    warm = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-6, max_iter=20000), warm_start=first)
    assert warm.converged and warm.omega >= first.omega and warm.iterations < first.iterations
    fixed = sinkhorn(src, dst, geom, Sinkhorn(tol=1e-6, max_iter=20000, acceleration="fixed", omega=1.3), warm_start=first)
    assert fixed.omega == 1.3
    assert reference_error(x, y, warm, 0.005) < 1e-6


def test_warm_start_carries_potentials_to_new_points():
    comm = Comm()
    geom = Geometry(0.01, "sqeuclidean", driftops.backends.DenseBackend(), comm)
    solver = Sinkhorn(tol=1e-5, max_iter=20000)
    clouds = [unit_clouds(300, 300, 2, seed=s) for s in (5, 6)]
    (x0, y0, _), (x1, y1, _) = clouds
    prev = sinkhorn(Cloud.split(x0, comm), Cloud.split(y0, comm), geom, solver)
    src, dst = Cloud.split(x1, comm), Cloud.split(y1, comm)
    cold = sinkhorn(src, dst, geom, solver)
    warm = sinkhorn(src, dst, geom, solver, warm_start=prev)
    assert warm.converged and warm.iterations + warm.coarse_iterations < cold.iterations + cold.coarse_iterations
    assert reference_error(x1, y1, warm, 0.01) < 1e-5
    own_prev = sinkhorn(Cloud.split(x0, comm), None, geom, solver)
    own = sinkhorn(src, None, geom, solver, warm_start=own_prev)
    assert own.converged and torch.equal(own.f, own.g)


def test_stage_list_for_a_known_cloud():
    # 64 x 64 grid points in [0, 1)^2: cells of side sqrt(eps) / 2 * 2^k hold known numbers of points.
    t = torch.arange(64, dtype=torch.float64) / 64
    x = torch.cartesian_prod(t, t)
    comm = Comm()
    cloud = Cloud.split(x, comm)
    geom = Geometry(0.01, "sqeuclidean", driftops.backends.AutoBackend(), comm)
    plan = stages(cloud, None, geom, Sinkhorn(annealing=0.5, level_cells=2.0), top=1.0)
    assert [st.eps for st in plan] == pytest.approx([1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625] + [0.01] * 5)
    assert [st.tol for st in plan[:7]] == [None] * 7  # one update per annealing temperature
    assert [st.tol for st in plan[7:]] == pytest.approx([3e-3] * 4 + [1e-3])  # coarse levels to coarse_tol * tol
    assert [st.rows.full.shape[0] for st in plan[7:]] == [9, 25, 100, 400, 4096]
    assert plan[-1].rows is cloud and all(st.cols is None for st in plan)
    assert [st.rows.full.shape[0] for st in plan[:2]] == [4, 9]  # annealing temperatures on their own levels
    assert [st.rows.full.shape[0] for st in stages(cloud, None, geom, Sinkhorn(multiscale=False), top=1.0)] == [4096] * 14
    assert len(stages(cloud, None, geom, Sinkhorn(), top=None)) == 1
    default = stages(cloud, None, geom, Sinkhorn(annealing=0.5), top=1.0)  # cells of side sqrt(eps) / 4 * 2^k
    assert [st.rows.full.shape[0] for st in default[7:]] == [25, 100, 400, 1600, 4096]
    # Annealing temperatures whose own cells would be finer than the finest coarse level run on that level.
    fine = stages(cloud, None, geom, Sinkhorn(annealing=0.5, level_cells=16.0), top=1.0)
    assert [st.rows.full.shape[0] for st in fine] == [256, 529, 1024, 1600, 1600, 1600, 1600, 400, 1600, 4096]


def test_progress_reports_every_stage_and_iteration_without_changing_the_solve():
    x, y = pair(3000, 2500)
    comm = Comm()
    src, dst = Cloud.split(x, comm), Cloud.split(y, comm)
    geom = Geometry(0.01, "sqeuclidean", driftops.backends.AutoBackend(), comm)
    seen = []
    watched = Sinkhorn(progress=seen.append)
    assert watched == Sinkhorn() and repr(watched) == repr(Sinkhorn())  # not a setting
    quiet, loud = sinkhorn(src, dst, geom, Sinkhorn()), sinkhorn(src, dst, geom, watched)
    assert torch.equal(quiet.f, loud.f) and torch.equal(quiet.g, loud.g)
    plan = stages(src, dst, geom, Sinkhorn(), top=max_cost("sqeuclidean", src.box(), dst.box()))
    starts = [s for s in seen if s.iteration == 0]
    assert [(s.stage, s.stages, s.points, s.eps) for s in starts] == [(k + 1, len(plan), st.rows.n, st.eps) for k, st in enumerate(plan)]
    last = [s for s in seen if s.stage == len(plan)]
    assert [s.iteration for s in last] == list(range(loud.iterations + 1))  # one report per iteration on the points
    assert math.isinf(last[1].error) and last[-1].error < 0.1 and not any(s.symmetric for s in seen)
    seen.clear()
    sinkhorn(src, None, geom, watched)
    assert seen and all(isinstance(s, SolveStatus) and s.symmetric for s in seen)
    assert driftops.SolveStatus is SolveStatus


def test_float32_at_tiny_eps_reports_the_error_reached():
    # eps = 1e-3 in D = 64: float32 potentials resolve marginal errors down to about 3e-5 (their true error, evaluated in
    # float64, is 1e-5 once their own rounding is a fixed point), float64 ones reach 1e-7 (measured).
    x, y, _ = unit_clouds(300, 200, 64, seed=7, dtype=torch.float32)
    solver = Sinkhorn(tol=1e-7, max_iter=20000, stall=100)
    with pytest.warns(RuntimeWarning, match="float32 potentials cannot resolve"):
        _, info = driftops.drift(x, y, 1e-3, backend="dense", solver=solver, return_info=True)
    cross, _ = info.sinkhorn[1e-3]
    assert not cross.converged and cross.iterations < 2000 and 1e-7 < cross.marginal_error < 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = driftops.drift(x.double(), y.double(), 1e-3, backend="dense", solver=solver, return_info=True)
    assert info.marginal_error < 1e-7


@pytest.mark.parametrize("backend", ["keops", "auto"])
@pytest.mark.parametrize("d", [1, 3])
def test_far_apart_clouds_keep_the_plan(backend, d):
    # y lies 1000 away in every coordinate: the separation's cost (~1e6 / eps) swamps the potentials, but the plan is
    # that of the clouds moved onto each other, so the drift must match the float64 reference made on the far clouds
    # themselves: to 1e-8 in float64, and in float32 to its rounding of coordinates near 1000 (6e-5) at tol 1e-4.
    x, y, wy = unit_clouds(70, 45, d, seed=11)
    far, eps = y + 1000.0, 0.03
    t_ref = reference.sinkhorn_map(x, far, eps, wy=wy)
    expected = t_ref - reference.sinkhorn_map(x, x, eps)
    for dtype, tol, atol in ((torch.float64, 1e-10, 1e-8), (torch.float32, 1e-4, 1e-3)):
        args = (x.to(dtype), far.to(dtype), eps)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            v, info = driftops.drift(*args, backend=backend, y_weights=wy.to(dtype), tol=tol, max_iter=100000, return_info=True)
            t = driftops.barycentric_map(*args, plan="sinkhorn", backend=backend, y_weights=wy.to(dtype), tol=tol, max_iter=100000)
        assert info.sinkhorn[eps][0].converged
        assert float((v.double() - expected).abs().max()) < atol and float((t.double() - t_ref).abs().max()) < atol
    # Left in place, float32 potentials cannot resolve the separation (measured: errors 0.05-0.28).
    with pytest.warns(RuntimeWarning, match="cannot be resolved"):
        v = driftops.drift(x.float(), far.float(), eps, backend=backend, y_weights=wy.float(), solver=Sinkhorn(tol=1e-4, max_iter=300, recentre=None))
    assert float((v.double() - expected).abs().max()) > 1e-2


def test_solver_objects_are_accepted_everywhere(tmp_path):
    x, y, _ = unit_clouds(100, 80, 2, seed=8)
    capped = Sinkhorn(max_iter=3, acceleration="none")
    with pytest.warns(RuntimeWarning, match="after 3 iterations"):
        _, info = driftops.drift(x, y, 0.01, backend="dense", solver=capped, return_info=True)
    assert all(r.iterations <= 3 for pair in info.sinkhorn.values() for r in pair)
    # tol= and max_iter= replace the solver's stopping rule
    _, info = driftops.drift(x, y, 0.01, backend="dense", solver=Sinkhorn(tol=1e-12), tol=0.5, return_info=True)
    assert info.marginal_error < 0.5 and info.iterations < 10
    with pytest.warns(RuntimeWarning, match="after 3 iterations"):
        driftops.barycentric_map(x, y, 0.01, plan="sinkhorn", backend="dense", solver=capped)
    res = driftops.flow(x, y, steps=2, eps=0.01, backend="dense", solver=Sinkhorn(tol=1e-4), progress=False, metric_every=None)
    assert max(res.history["marginal_error"]) < 1e-4 and res.info.sinkhorn[0.01][0].converged
    from driftops.train import TrainConfig

    cfg = TrainConfig(out=str(tmp_path), sinkhorn_tol=1e-4, sinkhorn_iters=50, sinkhorn_acceleration="none", sinkhorn_newton=32)
    assert cfg.flow_options()["solver"] == Sinkhorn(tol=1e-4, max_iter=50, acceleration="none", newton=32)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(tol=0.0), "tol"), (dict(tol=-1e-3), "tol"), (dict(max_iter=0), "max_iter"), (dict(omega=2.0), "omega"),
        (dict(omega=0.0), "omega"), (dict(omega_max=2.0), "omega_max"), (dict(acceleration="nesterov"), "acceleration"),
        (dict(annealing=1.0), "annealing"), (dict(window=0), "window"), (dict(newton=-1), "newton"), (dict(newton=2.5), "newton"),
        (dict(recentre=-0.5), "recentre"), (dict(recentre=float("nan")), "recentre"),
    ],
)  # fmt: skip
def test_bad_solver_settings_raise(settings, match):
    with pytest.raises(DriftopsError, match=match):
        Sinkhorn(**settings)
    x, y, _ = unit_clouds(20, 10, 2)
    if set(settings) <= {"tol", "max_iter"}:
        with pytest.raises(DriftopsError, match=match):
            driftops.drift(x, y, 0.1, backend="dense", **settings)
    with pytest.raises(DriftopsError, match="driftops.Sinkhorn"):
        driftops.drift(x, y, 0.1, backend="dense", solver={"tol": 1e-3})

"""Sinkhorn plan: convergence to the stated tolerance, the gradient identity, warm starts, coarse levels."""

import pytest
import torch

import driftops
from driftops.backends import KeOpsBackend
from driftops.data import sample_toy
from driftops.parallel import Cloud, Comm
from driftops import plans
from driftops.plans import Geometry, sinkhorn


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
    res = sinkhorn(src, dst, Geometry(eps, "sqeuclidean", KeOpsBackend(), comm), tol=1e-3, max_iter=5000)
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
    v = driftops.drift(x, x.clone(), 0.05, plan="sinkhorn", backend="keops", tol=1e-8, max_iter=20000)
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
    coarse = plans._level(cloud, geom, 1.0)
    assert 1 < coarse.full.shape[0] * plans.LEVEL_MIN_SHRINK <= 3000
    assert float(coarse.logw.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    mean = (w[:, None] * x).sum(0) / w.sum()
    assert torch.allclose((coarse.logw.exp()[:, None] * coarse.full).sum(0), mean, atol=1e-12)
    assert plans._level(cloud, geom, 1e-4) is cloud  # cells too small to shrink the cloud: the points themselves
    assert plans._level(cloud, Geometry(0.01, "sqeuclidean", KeOpsBackend(), Comm()), 1.0) is cloud


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
        runs[name] = sinkhorn(src, dst, Geometry(eps, cost, driftops.backends.get_backend(name), comm), tol=1e-7, max_iter=20000)
        assert runs[name].converged
    # Potentials are defined up to a constant shifted between f and g; their sum on the plan's support is not.
    shift = float((runs["auto"].f - runs["dense"].f).mean())
    assert torch.allclose(runs["auto"].f - shift, runs["dense"].f, atol=1e-5 * eps)
    assert torch.allclose(runs["auto"].g + shift * (not symmetric), runs["dense"].g, atol=1e-5 * eps)


def test_coarse_solve_at_the_target_temperature_leaves_few_fine_iterations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3000, 2, generator=g, dtype=torch.float64)
    y = torch.rand(2500, 2, generator=g, dtype=torch.float64) ** 2
    comm = Comm()
    src, dst = Cloud.split(x, comm), Cloud.split(y, comm)
    runs = {}
    for name in ("auto", "dense"):  # "auto" solves eps = 0.01 first on 400 grid cells per cloud; "dense" has no levels
        geom = Geometry(0.01, "sqeuclidean", driftops.backends.get_backend(name), comm)
        assert plans._level(src, geom, 0.01).full.shape[0] == (400 if name == "auto" else 3000)
        runs[name] = sinkhorn(src, dst, geom, tol=1e-3, max_iter=5000)
        assert runs[name].converged
    assert runs["auto"].iterations * 5 <= runs["dense"].iterations
    rows, cols = marginal_errors(x, y, runs["auto"], 0.01)
    assert rows < 1e-10 and cols < 1e-3

"""Particle flows: convergence to the target, warm starts, snapshots, schedules, callbacks, divergence."""

import numpy as np
import pytest
import torch

import driftops
from driftops import metrics
from driftops.data import sample_toy

N = 200


@pytest.fixture(scope="module")
def clouds():
    y = sample_toy("eight_gaussians", N, seed=1, dtype=torch.float64)
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x0, y


def run(x0, y, **kw):
    opts = dict(steps=3, step_size=1.0, eps=0.5, backend="dense", tol=1e-2, progress=False, metric_points=N)
    return driftops.flow(x0, y, **(opts | kw))


@pytest.mark.parametrize("plan", driftops.PLANS)
def test_flow_reduces_w2(clouds, plan):
    x0, y = clouds
    res = run(x0, y, plan=plan, steps=5)
    before, after = metrics.w2(x0, y), metrics.w2(res.x, y)
    assert res.history["w2"][0] == pytest.approx(before)
    assert res.history["w2"][-1] == pytest.approx(after)
    assert after < 0.5 * before
    assert res.x.dtype == x0.dtype and torch.isfinite(res.x).all()
    assert torch.equal(x0, clouds[0])  # the input is not modified


def test_warm_started_steps_converge_without_extra_iterations(clouds):
    x0, y = clouds
    res = run(x0, y, steps=2, step_size=0.05, eps=0.2, tol=1e-4)
    x1 = x0 + 0.05 * driftops.drift(x0, y, 0.2, backend="dense", tol=1e-4)
    _, cold = driftops.drift(x1, y, 0.2, backend="dense", tol=1e-4, return_info=True)
    # Plain Sinkhorn's iteration count is set by its slowest mode, so warm potentials save little at this eps;
    # they must never cost more than a cold start and must reach the same tolerance.
    assert res.history["sinkhorn_iterations"][1] <= 1.2 * cold.iterations
    assert res.history["marginal_error"][1] < 1e-4


def test_progress_bar_shows_the_running_solve(clouds, capsys):
    x0, y = clouds
    run(x0, y, steps=1, progress=True, metric_every=None)
    err = capsys.readouterr().err
    assert "flow (sinkhorn)" in err and "solve=cross 1/" in err


def test_snapshots_and_history_shapes(clouds):
    x0, y = clouds
    res = run(x0, y, steps=5, snapshot_every=2, max_snapshot_points=50, metric_every=2, metric_points=100)
    assert [s for s, _ in res.snapshots] == [0, 2, 4, 5]
    assert all(p.shape == (50, 2) and p.device.type == "cpu" for _, p in res.snapshots)
    assert torch.equal(res.snapshots[0][1], x0[res.snapshot_index])
    assert torch.allclose(res.snapshots[-1][1], res.x[res.snapshot_index])
    h = res.history
    assert h["step"] == [1, 2, 3, 4, 5] and h["metric_step"] == [0, 2, 4, 5]
    assert all(len(h[k]) == 5 for k in ("eps", "step_size", "drift_norm", "sinkhorn_iterations", "marginal_error", "seconds"))
    assert len(h["w2"]) == 4 and all(v > 0 for v in h["w2"])
    assert max(h["marginal_error"]) < 1e-2 and res.steps == 5 and res.seconds > 0


def test_schedules(clouds):
    x0, y = clouds
    res = run(x0, y, steps=3, eps_schedule=lambda k: 1.0 / (k + 1), step_schedule=[0.5, 0.25, 0.125, 9.0], metric_every=None)
    assert res.history["eps"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert res.history["step_size"] == [0.5, 0.25, 0.125]
    assert res.history["w2"] == []
    with pytest.raises(driftops.DriftopsError, match="at least one value per step"):
        run(x0, y, steps=3, step_schedule=[1.0])
    with pytest.raises(driftops.DriftopsError, match="eps must be a positive"):
        run(x0, y, steps=3, eps_schedule=lambda k: 0.1 - 0.1 * k)


def test_callback_stops(clouds):
    x0, y = clouds
    seen = []
    res = run(x0, y, steps=10, callback=lambda step, x, info: seen.append((step, info.iterations)) or step < 2)
    assert res.steps == 2 and [s for s, _ in seen] == [1, 2] and all(it > 0 for _, it in seen)
    assert res.history["step"] == [1, 2] and res.snapshots[-1][0] == 2 and res.history["metric_step"][-1] == 2


def test_divergence_error(clouds):
    x0, y = clouds

    def poison(step, x, info):
        x[3] = float("inf")

    with pytest.raises(driftops.DivergenceError, match="step 1.*smaller step_size"):
        run(x0, y, callback=poison)
    with pytest.raises(driftops.DivergenceError, match="smaller step_size or a larger eps"):
        run(x0.float(), y.float(), plan="one_sided", cost="euclidean", eps=0.05, step_size=1e38, steps=3)


def test_numpy_in_numpy_out(clouds):
    x0, y = clouds
    res = run(x0.numpy(), y.numpy(), steps=2)
    assert isinstance(res.x, np.ndarray) and res.x.shape == (N, 2) and res.x.dtype == np.float64
    assert np.allclose(res.x, run(x0, y, steps=2).x.numpy())


def test_bad_arguments(clouds):
    x0, y = clouds
    with pytest.raises(driftops.DriftopsError, match="unknown plan"):
        run(x0, y, plan="both_sided")
    with pytest.raises(driftops.DriftopsError, match="steps must be a positive integer"):
        run(x0, y, steps=0)
    with pytest.raises(driftops.DriftopsError, match="step_size at step 0"):
        run(x0, y, step_size=-1.0)

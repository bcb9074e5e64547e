"""Bad input raises DriftopsError naming the problem; valid but hard input gives finite answers."""

import functools
import re
import warnings

import numpy as np
import pytest
import torch

import driftops
from driftops import DriftopsError
from driftops.sinkhorn import Sinkhorn

import reference

X = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
Y = torch.randn(15, 2, generator=torch.Generator().manual_seed(1))

BAD = [
    (dict(x=X.clone().index_put_((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan")))), "NaN or inf"),
    (dict(y=Y.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf")))), "NaN or inf"),
    (dict(y=torch.randn(15, 3)), "dimension"),
    (dict(y=Y.double()), "dtype"),
    (dict(x=X.half(), y=Y.half()), "float32 or float64"),
    (dict(x=X.long(), y=Y.long()), "float32 or float64"),
    (dict(x=torch.empty(0, 2)), "empty"),
    (dict(y=torch.empty(0, 2)), "empty"),
    (dict(x=torch.randn(20)), "shape (N, D)"),
    (dict(eps=0.0), "eps must be a positive"),
    (dict(eps=-1.0), "eps must be a positive"),
    (dict(eps=float("nan")), "eps must be a positive"),
    (dict(eps=[]), "empty sequence"),
    (dict(plan="sinkorn"), "unknown plan"),
    (dict(cost="cosine"), "unknown cost"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(x=[[0.0, 1.0]]), "torch tensor or numpy array"),
    (dict(y_weights=torch.ones(3)), "y_weights must be a tensor of shape"),
    (dict(x_weights=-torch.ones(20)), "non-negative"),
    (dict(x=X[:1], plan="one_sided"), "at least 2 points"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_drift_rejects_bad_input(kwargs, message):
    args = dict(x=X, y=Y, eps=0.1, plan="two_sided", backend="dense") | kwargs
    with pytest.raises(DriftopsError, match=re.escape(message)):
        driftops.drift(**args)


def test_error_is_a_value_error():
    assert issubclass(DriftopsError, ValueError)


def test_dense_backend_refuses_huge_problems_and_names_the_lazy_ones():
    x = torch.zeros(1, 2).expand(2_000_000, 2)
    with pytest.raises(DriftopsError, match="backend='keops'"):
        driftops.drift(x, x, 0.1, plan="one_sided", backend="dense", mask_self=False)


@pytest.mark.parametrize("fn", [driftops.sinkhorn_divergence, driftops.barycentric_map])
def test_other_entry_points_validate(fn):
    with pytest.raises(DriftopsError, match="NaN or inf"):
        fn(X, Y.clone().fill_(float("nan")), 0.1)
    with pytest.raises(DriftopsError, match="eps must be a positive"):
        fn(X, Y, -0.1)


def test_numpy_in_numpy_out():
    v = driftops.drift(X.numpy(), Y.numpy(), 0.2, plan="two_sided", backend="keops")
    assert isinstance(v, np.ndarray) and v.shape == (20, 2) and v.dtype == np.float32
    assert np.allclose(v, driftops.drift(X, Y, 0.2, plan="two_sided", backend="keops").numpy())


@pytest.mark.parametrize("plan", ["one_sided", "two_sided", "sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_but_valid_inputs_stay_finite(plan, dtype):
    g = torch.Generator().manual_seed(2)
    far = torch.randn(30, 2, generator=g, dtype=dtype) + 1000.0  # far-apart clouds
    near = torch.randn(25, 2, generator=g, dtype=dtype)
    dup = torch.cat([near[:5]] * 4)  # duplicated points
    for x, y, eps in ((near, far, 1e-3), (dup, near, 1e-3), (near, near, 1e-4), (dup, dup, 0.05)):
        v = driftops.drift(x, y, eps, plan=plan, backend="keops", max_iter=300)
        assert torch.isfinite(v).all()
    # Far-apart clouds: every point is pulled (about) to the target's nearest side, by ~1000.
    v = driftops.drift(near, far, 1e-3, plan=plan, backend="keops", max_iter=300)
    assert float((near + v).mean(0).sub(far.mean(0)).norm()) < 5.0


def test_isolated_point_self_mask_is_exact():
    """Masking by index: an isolated point at small eps is repelled by its nearest neighbour, not by itself."""
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.5, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    v = driftops.drift(x, y, 1e-3, plan="one_sided", backend="keops")
    # Self term of point 0 is its nearest other point (10.5, 0) is farther than (10, 0): T_xx(x_0) = (10, 0).
    assert torch.allclose(v[0], torch.tensor([-10.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(mode="grid"), "unknown sharding mode"), (dict(timeout=0.0), "positive number of seconds"), (dict(mesh=(2,)), "mesh must be"), (dict(mesh=(0, 2)), "mesh must be")],
)
def test_bad_sharding_settings_raise(kwargs, message):
    from driftops.parallel import Sharding

    with pytest.raises(DriftopsError, match=message):
        Sharding(None, **kwargs)


@functools.cache
def duplicated_points() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(20, 2) five points four times each, (25, 2) points whose first five they are, and their float64 reference
    Sinkhorn drift at eps 1e-3 (50,000 plain iterations: made once for every backend)."""
    near = torch.randn(25, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dup = torch.cat([near[:5]] * 4)
    return dup, near, reference.drift(dup, near, 1e-3, "sinkhorn")


@pytest.mark.parametrize("backend", ["dense", "keops"])
def test_duplicated_points_cross_the_plateau_of_the_error(backend):
    # 5 points 4 times each against 25 points (5 of them the same ones) at eps 1e-3: the marginal error stays at 0.08
    # for hundreds of iterations while the potentials creep (~0.3 eps per iteration, measured) until two points' mass
    # moves. Such a solve is not stalled: it must go on and reach its tolerance and the float64 reference.
    dup, near, expected = duplicated_points()
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = driftops.drift(dup, near, 1e-3, backend=backend, solver=Sinkhorn(max_iter=3000, progress=seen.append))
    plateau = [s.error for s in seen if s.stage == s.stages and not s.symmetric and 0.079 < s.error < 0.081]
    assert len(plateau) > Sinkhorn().stall  # long enough to have stopped the solve as stalled
    assert float((v - expected).abs().max()) < 3e-3

"""Every lazy path against the dense torch backend and against independent dense formulas."""

import json
import subprocess
import sys

import pytest
import torch

import driftops
from driftops import Sinkhorn
from driftops.backends import DenseBackend, KeOpsBackend, SparseBackend

import reference

SIZES = [(37, 23), (64, 97)]
CASES = [  # (D, dtype): every D in float64, the smallest and largest in float32 (each pair compiles its own formulas)
    (1, torch.float64), (2, torch.float64), (3, torch.float64), (16, torch.float64), (64, torch.float64),
    (2, torch.float32), (64, torch.float32),
]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def clouds(n, m, d, dtype, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
    y = torch.randn(m, d, generator=g, dtype=dtype) / d**0.5 * 0.7 + shift
    return x, y


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.filterwarnings("ignore:Sinkhorn stopped")
@pytest.mark.parametrize("d,dtype", CASES)
@pytest.mark.parametrize("n,m", SIZES)
@pytest.mark.parametrize("eps", [1e-3, 0.1, 10.0])
@pytest.mark.parametrize("plan", ["one_sided", "two_sided", "sinkhorn"])
def test_keops_equals_dense(plan, eps, n, m, d, dtype):
    x, y = clouds(n, m, d, dtype)
    # An unreachable tol: both backends run exactly max_iter Sinkhorn iterations (over-relaxed with a fixed factor), so
    # they compute the same thing.
    kw = dict(eps=eps, plan=plan, solver=Sinkhorn(tol=1e-30, max_iter=200, acceleration="fixed", omega=1.5))
    a = driftops.drift(x, y, backend="keops", **kw)
    b = driftops.drift(x, y, backend="dense", **kw)
    assert a.dtype == dtype and a.shape == (n, d)
    assert torch.isfinite(a).all()
    # 200 float32 Sinkhorn iterations at eps = 1e-3 amplify the rounding of logits ~1e3 (different summation
    # orders in KeOps and torch): measured 1e-2 to 7e-2 relative there depending on the CPU; 1e-4 elsewhere.
    tol = TOL[dtype] * (1000 if plan == "sinkhorn" and dtype == torch.float32 else 1)
    assert rel_err(a, b) < tol


@pytest.mark.parametrize("plan", ["one_sided", "two_sided", "sinkhorn"])
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("d", [1, 2, 16])
def test_matches_independent_formulas(plan, cost, d):
    x, y = clouds(50, 31, d, torch.float64, seed=1)
    eps = 1.0
    v = driftops.drift(x, y, eps, plan=plan, cost=cost, backend="keops", tol=1e-12, max_iter=100000)
    ref = reference.drift(x, y, eps, plan, cost)
    assert rel_err(v, ref) < 1e-8


@pytest.mark.parametrize("plan", ["one_sided", "two_sided", "sinkhorn"])
def test_barycentric_map_matches_formulas(plan):
    x, y = clouds(40, 60, 2, torch.float64, seed=2)
    t = driftops.barycentric_map(x, y, 0.3, plan=plan, backend="keops", tol=1e-12, max_iter=100000)
    ref = {"one_sided": reference.one_sided_map, "two_sided": reference.two_sided_map, "sinkhorn": reference.sinkhorn_map}[plan](x, y, 0.3)
    assert rel_err(t, ref) < 1e-8


# Every pair of (plan, cost, dtype) values once: each case compiles its own KeOps gradient formulas (~10 s each); in
# D = 2, where the tests above compile most of the reductions they differentiate.
@pytest.mark.parametrize(
    "plan, cost, dtype",
    [
        ("one_sided", "sqeuclidean", torch.float32),
        ("two_sided", "euclidean", torch.float32),
        ("one_sided", "euclidean", torch.float64),
        ("two_sided", "sqeuclidean", torch.float64),
    ],
)
def test_gradients_match_dense(plan, cost, dtype):
    x, y = clouds(45, 30, 2, dtype, seed=3)
    w = torch.randn(45, 2, dtype=dtype, generator=torch.Generator().manual_seed(9))
    grads = []
    for backend in ("keops", "dense"):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        v = driftops.drift(xr, yr, 0.5, plan=plan, cost=cost, backend=backend)
        grads.append(torch.autograd.grad((v * w).sum(), (xr, yr)))
    for gk, gd in zip(*grads):
        assert torch.isfinite(gk).all()
        assert rel_err(gk, gd) < TOL[dtype] * 10


def test_gradient_kernels_are_listed_and_loaded_before_the_backward():
    """A differentiable Sinkhorn drift loads every KeOps kernel its backward pass needs in the forward pass (where
    the build folder's lock covers their compilation), none beyond those of ``job_formulas(grad=True)``, each listed
    formula a kernel of its own (a fresh interpreter: its loaded kernel modules are those it used)."""
    code = (
        "import json, sys, torch, driftops\n"
        "from driftops.backends.formulas import job_formulas\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith('pykeops_cpp_'))\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(45, 2, generator=g, dtype=torch.float64).requires_grad_()\n"
        "y = (torch.randn(30, 2, generator=g, dtype=torch.float64) + 0.5).requires_grad_()\n"
        "v = driftops.drift(x, y, 0.5, plan='sinkhorn', backend='keops')\n"
        "forward = loaded()\n"
        "torch.autograd.grad((v * v).sum(), (x, y))\n"
        "backward = loaded()\n"
        "listed = job_formulas(2, torch.float64, plans=['sinkhorn'], backend='keops', grad=True)\n"
        "for f in listed: f.run()\n"
        "print(json.dumps([len(listed), forward, backward, loaded()]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=True)
    count, forward, backward, listed = json.loads(run.stdout.strip().splitlines()[-1])
    assert count == len(listed) == 9  # lse and mean, and their gradients to (x, y, logw) and (x, y, logw, values)
    assert backward == forward
    assert set(forward) <= set(listed) and len(forward) > 2  # gradient kernels among them


@pytest.mark.parametrize("backend", [KeOpsBackend(), DenseBackend()])
@pytest.mark.parametrize("offset", [None, 0, 7])
def test_reductions_with_logweights_and_offsets(backend, offset):
    g = torch.Generator().manual_seed(4)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    x = y[offset or 0 :][:25]
    logw = torch.randn(40, generator=g, dtype=torch.float64) * 5
    s = -reference.cost(x, y, "sqeuclidean") / 0.05 + logw
    if offset is not None:
        s[torch.arange(25), torch.arange(25) + offset] = -float("inf")
    assert torch.allclose(backend.lse(x, y, 0.05, "sqeuclidean", logw, offset), torch.logsumexp(s, 1), rtol=1e-12, atol=1e-10)
    assert torch.allclose(backend.weighted_mean(x, y, 0.05, "sqeuclidean", y, logw, offset), torch.softmax(s, 1) @ y, atol=1e-10)


@pytest.mark.parametrize("backend", [KeOpsBackend(), SparseBackend()])
@pytest.mark.parametrize("m", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_reductions_across_column_tiles(backend, m, dtype):
    """KeOps's CPU softmax loops sum columns in tiles of 64 (driftops.backends.keops.TILE): every width of a last tile,
    log-weights spread so far that each tile holds a new row maximum (the running sums rescaled) and most of a tile's
    terms lie below the floor of its exponentials (driftops.backends.keops.TILE_EXP); float32 against float64."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(25, 2, generator=g, dtype=torch.float64)
    y = torch.randn(m, 2, generator=g, dtype=torch.float64)
    logw = torch.linspace(0, 400, m, dtype=torch.float64) + torch.randn(m, generator=g, dtype=torch.float64)
    s = -reference.cost(x, y, "sqeuclidean") / 0.05 + logw
    if dtype == torch.float32:
        tol = 1e-4  # float32 rounding of logits up to 400
    else:
        tol = 1e-10 if backend.name == "keops" else 1e-5  # the sparse backend drops columns below exp(-20) of a row's mass
    xs, ys, ws = x.to(dtype), y.to(dtype), logw.to(dtype)
    lse, mean = backend.lse(xs, ys, 0.05, "sqeuclidean", ws), backend.weighted_mean(xs, ys, 0.05, "sqeuclidean", ys, ws)
    assert torch.allclose(lse.double(), torch.logsumexp(s, 1), rtol=0, atol=tol)
    assert torch.allclose(mean.double(), torch.softmax(s, 1) @ y, rtol=0, atol=tol)


def test_dense_backend_reuses_costs_only_for_unmodified_clouds():
    """The dense backend keeps the cost matrices of recent calls: reused for the same clouds (also transposed),
    recomputed after an in-place change or for a new tensor with the same storage size."""
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(30, 2, generator=g, dtype=torch.float64), torch.randn(45, 2, generator=g, dtype=torch.float64)
    logw = torch.randn(45, generator=g, dtype=torch.float64)
    backend = DenseBackend()

    def expected(a, b, w):
        return torch.logsumexp(-reference.cost(a, b, "sqeuclidean") / 0.1 + w, 1)

    for _ in range(2):
        assert torch.allclose(backend.lse(x, y, 0.1, "sqeuclidean", logw), expected(x, y, logw), rtol=1e-12)
        assert torch.allclose(backend.lse(y, x, 0.1, "sqeuclidean", None), expected(y, x, 0), rtol=1e-12)
    x.add_(0.3)  # moved in place, as a flow step does
    assert torch.allclose(backend.lse(x, y, 0.1, "sqeuclidean", logw), expected(x, y, logw), rtol=1e-12)
    assert torch.allclose(backend.lse(y, x, 0.1, "sqeuclidean", None), expected(y, x, 0), rtol=1e-12)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)  # a new cloud of the same shape
    assert torch.allclose(backend.lse(x, y, 0.1, "sqeuclidean", logw), expected(x, y, logw), rtol=1e-12)
    assert backend.cost(x, y, "sqeuclidean") is backend.cost(x, y, "sqeuclidean")
    assert torch.equal(backend.cost(y, x, "sqeuclidean"), backend.cost(x, y, "sqeuclidean").T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_backend_reuses_its_kernel_across_log_weights(dtype):
    """Calls that change only the log-weights reuse the kept kernel; a change spread over more than KERNEL_SPREAD
    rebuilds it; an in-place change of the caller's log-weights does not leak into it; every answer (log-sum-exp,
    mean, both from one pass) matches float64 torch at a temperature where most terms underflow."""
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(60, 2, generator=g, dtype=torch.float64), torch.randn(80, 2, generator=g, dtype=torch.float64) + 0.3
    eps = 0.01
    base = torch.randn(80, generator=g, dtype=torch.float64)
    backend = DenseBackend()
    xd, yd = x.to(dtype), y.to(dtype)
    tag = ("kernel", "sqeuclidean", eps)
    kernels = []
    big = base + 40 * torch.rand(80, generator=g, dtype=torch.float64)
    small = 0.5 * torch.randn(80, generator=g, dtype=torch.float64)
    for logw in (base, base + small, big, big + small, None):
        s = -reference.cost(x, y, "sqeuclidean") / eps + (0 if logw is None else logw)
        wd = None if logw is None else logw.to(dtype)
        assert rel_err(backend.lse(xd, yd, eps, "sqeuclidean", wd).double(), torch.logsumexp(s, 1)) < TOL[dtype]
        assert rel_err(backend.weighted_mean(xd, yd, eps, "sqeuclidean", yd, wd).double(), torch.softmax(s, 1) @ y) < TOL[dtype]
        both = backend.reduce_lse_mean(xd, yd, eps, "sqeuclidean", yd, wd)
        assert rel_err(both[0].double(), torch.logsumexp(s, 1)) < TOL[dtype] and rel_err(both[1].double(), torch.softmax(s, 1) @ y) < TOL[dtype]
        kernels.append(backend._find(xd, yd, tag)[2])
    assert kernels[1] is kernels[0]  # a change spread over 0.5 * 6: reused
    assert kernels[2] is not kernels[1] and kernels[3] is kernels[2]  # spread ~40: rebuilt, then reused
    assert kernels[4] is not kernels[3]  # back to zero log-weights: a spread ~40 again
    assert sum(entry[4] == tag for entry in backend._cache) == 1  # a rebuilt kernel replaces the one it supersedes
    w = base.to(dtype).clone()
    fresh = DenseBackend()
    fresh.lse(xd, yd, eps, "sqeuclidean", w)
    w.add_(1.0)  # the caller reuses its tensor: the kernel kept its own copy of the log-weights
    assert rel_err(fresh.lse(xd, yd, eps, "sqeuclidean", w).double(), torch.logsumexp(-reference.cost(x, y, "sqeuclidean") / eps + base + 1, 1)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_backend_at_underflowing_temperatures(dtype):
    """At eps far below the squared spread, most logits lie more than 80 below their row's maximum (where exp()
    underflows float32); row sums and means still match float64 torch, and a fully masked row gives -inf."""
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(50, 2, generator=g, dtype=torch.float64), torch.randn(70, 2, generator=g, dtype=torch.float64)
    logw = torch.randn(70, generator=g, dtype=torch.float64)
    eps = 1e-3
    s = -reference.cost(x, y, "sqeuclidean") / eps + logw
    assert ((s - s.amax(1, keepdim=True)) < -80).float().mean() > 0.9
    backend = DenseBackend()
    xd, yd, wd = x.to(dtype), y.to(dtype), logw.to(dtype)
    lse = backend.lse(xd, yd, eps, "sqeuclidean", wd)
    mean = backend.weighted_mean(xd, yd, eps, "sqeuclidean", yd, wd)
    assert rel_err(lse.double(), torch.logsumexp(s, 1)) < TOL[dtype]
    assert rel_err(mean.double(), torch.softmax(s, 1) @ y) < TOL[dtype]
    alone = backend.reduce_lse(xd[:3], yd[:1], eps, "sqeuclidean", None, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(alone, torch.full((3,), -float("inf"), dtype=dtype))


@pytest.mark.parametrize("backend", [KeOpsBackend(), DenseBackend(), SparseBackend()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_mask_on_crowded_and_isolated_points(backend, dtype):
    """Crowded rows (own point holds a small share of the row: subtracted from the unmasked sums) and
    isolated rows (own point holds almost all of it: recomputed with the pair masked by index)."""
    g = torch.Generator().manual_seed(11)
    y = torch.cat([torch.randn(300, 2, generator=g) * 0.3, torch.randn(12, 2, generator=g) * 2 + 8]).to(dtype)
    logw = torch.rand(312, generator=g, dtype=dtype)
    eps, offset = 0.01, 40
    x = y[offset:]
    s = -reference.cost(x, y, "sqeuclidean") / eps + logw
    own = s[torch.arange(x.shape[0]), torch.arange(x.shape[0]) + offset].clone()
    share = (own - torch.logsumexp(s, 1)).exp()
    assert (share > 0.9).any() and (share < 0.1).any()
    s[torch.arange(x.shape[0]), torch.arange(x.shape[0]) + offset] = -float("inf")
    tol = TOL[dtype] if backend.name != "sparse" else max(TOL[dtype], 1e-7)
    lse = backend.lse(x, y, eps, "sqeuclidean", logw, offset)
    mean = backend.weighted_mean(x, y, eps, "sqeuclidean", y, logw, offset)
    assert rel_err(lse, torch.logsumexp(s, 1)) < tol
    assert rel_err(mean, torch.softmax(s, 1) @ y) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_joint_drift_matches_algorithm_2(dtype):
    x, y = clouds(60, 45, 2, dtype, seed=5)
    neg = clouds(33, 1, 2, dtype, seed=6)[0]
    for y_neg, mask in ((None, True), (neg, False)):
        v = driftops.joint_drift(x, y, y_neg, eps=0.3, backend="keops")
        ref = reference.joint_drift(x, y, x if y_neg is None else y_neg, 0.3, mask=mask)
        assert rel_err(v, ref) < TOL[dtype] * 10


def test_joint_drift_weights_are_multiplicities():
    x, y = clouds(30, 20, 2, torch.float64, seed=7)
    w = torch.ones(20, dtype=torch.float64)
    w[:5] = 3.0
    y_rep = torch.cat([y, y[:5], y[:5]])
    v = driftops.joint_drift(x, y, eps=0.3, pos_weights=w, backend="keops")
    ref = reference.joint_drift(x, y_rep, x, 0.3)
    assert rel_err(v, ref) < 1e-9


def test_weights_are_multiplicities_for_drift():
    x, y = clouds(30, 20, 2, torch.float64, seed=8)
    w = torch.ones(20, dtype=torch.float64)
    w[:4] = 2.0
    for plan in ("one_sided", "two_sided", "sinkhorn"):
        v = driftops.drift(x, y, 0.3, plan=plan, y_weights=w, backend="keops", tol=1e-12, max_iter=50000)
        ref = driftops.drift(x, torch.cat([y, y[:4]]), 0.3, plan=plan, backend="keops", tol=1e-12, max_iter=50000)
        assert rel_err(v, ref) < 1e-8


@pytest.mark.parametrize("backend", ["keops", "sparse", "auto"])
@pytest.mark.parametrize("plan", ["one_sided", "two_sided", "sinkhorn"])
def test_zero_weights_drop_their_points(backend, plan):
    # A zero weight is a point that is not there (KeOps returns NaN on the -inf log-weight; driftops never passes it).
    x, y = clouds(700, 900, 2, torch.float64, seed=10)
    g = torch.Generator().manual_seed(11)
    wx, wy = torch.rand(700, generator=g, dtype=torch.float64) + 0.5, torch.rand(900, generator=g, dtype=torch.float64) + 0.5
    wy[::7] = 0
    wx[1::5] = 0
    solver = driftops.Sinkhorn(tol=1e-9)
    v = driftops.drift(x, y, 0.01, plan=plan, backend=backend, x_weights=wx, y_weights=wy, solver=solver)
    keep = wy > 0
    ref = driftops.drift(x, y[keep], 0.01, plan=plan, backend="dense", x_weights=wx, y_weights=wy[keep], solver=solver)
    assert torch.isfinite(v).all() and rel_err(v, ref) < 1e-5


def test_several_temperatures_are_normalised_and_summed():
    x, y = clouds(40, 30, 2, torch.float64, seed=9)
    total = driftops.drift(x, y, [0.05, 0.5], plan="two_sided", backend="keops")
    parts = [driftops.drift(x, y, e, plan="two_sided", backend="keops") for e in (0.05, 0.5)]
    expected = sum(p / p.pow(2).mean().sqrt() for p in parts)
    assert rel_err(total, expected) < 1e-12

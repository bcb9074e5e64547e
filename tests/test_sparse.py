"""The block-sparse backend equals the dense reference to within its truncation tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from driftops.backends.dense import DenseBackend
from driftops.backends.keops import KeOpsBackend
from driftops.backends import sparse
from driftops.backends.sparse import SparseBackend
from driftops.errors import DriftopsError

DENSE = DenseBackend()


def checkerboard(n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """n points uniform on the black squares of a 4x4 checkerboard on [-2, 2]^2."""
    u = torch.rand(4 * n, 2, generator=gen, dtype=torch.float64) * 4 - 2
    black = ((u[:, 0] + 2).floor() + (u[:, 1] + 2).floor()) % 2 == 0
    return u[black][:n].to(dtype).contiguous()


def clouds(n: int, m: int, d: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = checkerboard(m, g, torch.float64) if d == 2 else torch.rand(m, d, generator=g, dtype=torch.float64) * 4 - 2
    return x.to(dtype), y.to(dtype)


def lse_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max over rows of |a - b| / max(1, |b|): the relative error of the row sums (|b| small) or of the log."""
    return float(((a.double() - b) / b.abs().clamp_min(1)).abs().max())


def mean_error(a: torch.Tensor, b: torch.Tensor, values: torch.Tensor) -> float:
    """Max over rows of |a - b| relative to the largest |value|."""
    return float((a.double() - b).abs().max() / values.double().abs().max())


def reference(method: str, x, y, eps, cost, values=None, logw=None, self_offset=None) -> torch.Tensor:
    """The dense reduction in float64 (so the float32 tolerance measures the sparse backend only)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    if method == "lse":
        return DENSE.lse(d(x), d(y), eps, cost, d(logw), self_offset)
    return DENSE.weighted_mean(d(x), d(y), eps, cost, d(values), d(logw), self_offset)


def both(backend, x, y, eps, cost, values, logw=None, self_offset=None):
    return (
        backend.lse(x, y, eps, cost, logw, self_offset),
        backend.weighted_mean(x, y, eps, cost, values, logw, self_offset),
    )


def check(x, y, eps, cost="sqeuclidean", logw=None, self_offset=None, thr=20.0, tol=1e-5):
    """Sparse vs the float64 dense reference: error below ``tol``, or (float32 logits of size ~100
    carry ~1e-5 rounding) no more than twice the dense-lazy KeOps error in the same precision."""
    values = torch.cat([y, torch.sin(3 * y[:, :1])], 1)
    ref_lse = reference("lse", x, y, eps, cost, logw=logw, self_offset=self_offset)
    ref_mean = reference("mean", x, y, eps, cost, values, logw, self_offset)
    a_lse, a_mean = both(SparseBackend(thr), x, y, eps, cost, values, logw, self_offset)
    assert a_lse.dtype == x.dtype and a_lse.shape == (x.shape[0],)
    assert a_mean.dtype == x.dtype and a_mean.shape == (x.shape[0], values.shape[1])
    e_lse, e_mean = lse_error(a_lse, ref_lse), mean_error(a_mean, ref_mean, values)
    if e_lse >= tol or e_mean >= tol:
        k_lse, k_mean = both(KeOpsBackend(), x, y, eps, cost, values, logw, self_offset)
        tol_lse = max(tol, 2 * lse_error(k_lse, ref_lse))
        tol_mean = max(tol, 2 * mean_error(k_mean, ref_mean, values))
        assert e_lse < tol_lse and e_mean < tol_mean, (e_lse, tol_lse, e_mean, tol_mean)
    return e_lse, e_mean


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 1e-1, 0.7])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_dense_2d_float32(eps, weighted):
    x, y = clouds(2500, 2000, 2, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    # Strongly varying column log-weights, like Sinkhorn's log b + g/eps.
    logw = (torch.randn(2000, generator=g) * 30 + 10 * y[:, 0] / eps**0.5) if weighted else None
    check(x, y, eps, logw=logw)


@pytest.mark.parametrize("d", [1, 3])
def test_matches_dense_float64(d):
    x, y = clouds(2000, 1500, d, torch.float64, seed=d)
    logw = torch.randn(1500, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 20
    for eps in (1e-3, 1e-2, 0.3):
        check(x, y, eps, logw=logw, thr=30.0, tol=1e-10)


def test_euclidean_cost():
    x, y = clouds(2000, 2000, 2, torch.float32, seed=4)
    logw = torch.randn(2000, generator=torch.Generator().manual_seed(5)) * 10
    for eps in (1e-3, 1e-2, 0.3):
        check(x, y, eps, cost="euclidean", logw=logw)


def test_self_mask_offset_zero_and_slice():
    _, y = clouds(10, 3000, 2, torch.float32, seed=6)
    for eps in (1e-3, 3e-2):
        check(y, y, eps, self_offset=0)
        check(y[1000:1800], y, eps, self_offset=1000)
    # Isolated points: their own (masked) entry dominates every other by far; the rest must still be found.
    lone = torch.cat([y[:500], torch.tensor([[10.0, 10.0], [-9.0, 7.0], [10.0, -10.0]])])
    check(lone, lone, 1e-3, self_offset=0)


def test_duplicated_points():
    x, _ = clouds(1000, 10, 2, torch.float32, seed=7)
    y = torch.cat([x, x, x[:300]])
    check(x, y, 1e-2)
    check(y, y, 1e-2, self_offset=0)
    check(x, y, 1e-3, logw=torch.randn(y.shape[0], generator=torch.Generator().manual_seed(8)) * 20)


def test_far_apart_clouds():
    x, y = clouds(1500, 1500, 2, torch.float32, seed=9)
    far = y + torch.tensor([100.0, -60.0])
    check(x, far, 1e-2)
    check(torch.cat([x, far]), torch.cat([x, far]), 1e-2, self_offset=0)


def test_matches_keops():
    x, y = clouds(3000, 3000, 2, torch.float32, seed=10)
    logw = torch.randn(3000, generator=torch.Generator().manual_seed(11)) * 10
    a_lse, a_mean = both(SparseBackend(), x, y, 1e-2, "sqeuclidean", y, logw)
    b_lse, b_mean = both(KeOpsBackend(), x, y, 1e-2, "sqeuclidean", y, logw)
    assert lse_error(a_lse, b_lse.double()) < 1e-5
    assert mean_error(a_mean, b_mean.double(), y) < 1e-5


def test_small_truncation_is_measurably_worse():
    x, y = clouds(300, 3000, 2, torch.float32, seed=12)  # few rows: tiny row clusters are slow on a busy CPU
    values = y
    errors = {}
    for thr in (2.0, 20.0):
        # Small cells so the blocks hug the truncation radius (default cells are large at this size).
        a = SparseBackend(thr, cell_size=0.06).weighted_mean(x, y, 1e-2, "sqeuclidean", values)
        errors[thr] = mean_error(a, reference("mean", x, y, 1e-2, "sqeuclidean", values), values)
    assert errors[20.0] < 1e-5
    assert errors[2.0] > 100 * errors[20.0] and errors[2.0] > 1e-4, errors


def test_keeps_few_blocks_and_one_per_row():
    x, y = clouds(4000, 4000, 2, torch.float32, seed=13)
    sb = SparseBackend(cell_size=0.03)  # the default cells hold >= 64 points: few, large clusters at this size
    cx, cy, keep = sb.plan_blocks(x, y, 1e-3, "sqeuclidean")
    blocks, pairs = sb.kept_fraction(cx, cy, keep)
    assert (keep.per_row() > 0).all()
    assert 0 < pairs < 0.02 and blocks < 0.02, (blocks, pairs)
    # Larger eps keeps more.
    assert sb.kept_fraction(*sb.plan_blocks(x, y, 1.0, "sqeuclidean"))[1] > pairs


def test_blocks_are_maximal_runs_of_the_mask():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        keep = torch.rand(5, 7, generator=gen) < 0.5
        runs = sparse.Blocks.from_mask(keep)
        assert torch.equal(runs.dense(), keep) and torch.equal(runs.per_row(), keep.sum(1))
        assert bool((runs.start[1:] > runs.end[:-1] + 1)[runs.i[1:] == runs.i[:-1]].all())  # runs never touch
        i, j = keep.nonzero(as_tuple=True)
        pairs = sparse.Blocks.from_pairs(i, j, tuple(keep.shape))
        assert all(torch.equal(getattr(runs, k), getattr(pairs, k)) for k in ("i", "start", "end"))


def test_clustering_cache():
    x, y = clouds(2000, 2000, 2, torch.float32, seed=14)
    sb = SparseBackend()
    c1 = sb.clustering(x, 1e-2, "sqeuclidean")
    assert sb.clustering(x, 1e-2, "sqeuclidean") is c1
    x.add_(1.0)  # in-place change bumps the version: the cloud is re-sorted
    c2 = sb.clustering(x, 1e-2, "sqeuclidean")
    assert c2 is not c1 and torch.equal(c2.points, x[c2.perm])
    for k in range(3 * sb.cache_size):
        sb.clustering(x + k, 1e-2, "sqeuclidean")
    assert len(sb._cache) <= sb.cache_size
    # Results after the in-place change are right.
    check(x, y, 1e-2)


def test_no_gradient_and_original_order():
    x, y = clouds(1000, 1000, 2, torch.float32, seed=15)
    x.requires_grad_(True)
    out = SparseBackend().lse(x, y, 1e-2, "sqeuclidean")
    assert not out.requires_grad
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(16))
    again = SparseBackend().lse(x.detach()[perm], y, 1e-2, "sqeuclidean")
    assert torch.allclose(again, out[perm], rtol=1e-6, atol=1e-5)


def test_auto_picks_a_backend():
    from driftops.backends import AutoBackend

    auto = AutoBackend()
    big_x, big_y = clouds(12000, 6000, 2, torch.float32, seed=17)
    assert auto.pick(big_x, big_y) is auto.sparse
    assert auto.pick(big_x, big_y, big_y[:, :1].requires_grad_()) is auto.keops  # the sparse path has no gradient
    assert auto.pick(big_x.requires_grad_(), big_y) is auto.keops
    with torch.no_grad():
        assert auto.pick(big_x, big_y) is auto.sparse
    assert auto.pick(torch.randn(12000, 4), torch.randn(6000, 4)) is auto.keops
    small_x, small_y = clouds(500, 400, 2, torch.float32)
    assert auto.pick(small_x, small_y) is auto.dense


def test_auto_iterates_densely_while_the_dense_backend_keeps_the_kernel():
    from driftops.backends import DENSE_ITERATIONS_MAX_ELEMENTS, AutoBackend
    from driftops.backends.dense import CACHE_MAX_BYTES

    auto = AutoBackend()
    iterating = auto.iterations()
    assert iterating.iterations() is iterating and iterating.dense is auto.dense and iterating.sparse is auto.sparse
    assert not auto.repeated and iterating.repeated
    x, y = clouds(3000, 2500, 2, torch.float32, seed=18)
    assert auto.pick(x, y) is auto.sparse and iterating.pick(x, y) is iterating.dense
    # float64 3000 x 2500: 60 MB, kept; in any dimension; not with gradients (the dense kernel is kept without them).
    assert 3000 * 2500 <= DENSE_ITERATIONS_MAX_ELEMENTS < 4200 * 4100 and DENSE_ITERATIONS_MAX_ELEMENTS * 8 <= CACHE_MAX_BYTES
    assert iterating.pick(x.double(), y.double()) is iterating.dense
    assert iterating.pick(torch.randn(3000, 5), torch.randn(2500, 5)) is iterating.dense
    assert iterating.pick(x, y, y[:, 0].clone().requires_grad_()) is iterating.keops
    # A kernel the dense backend would not keep: the one-shot choice.
    big_x, big_y = clouds(4200, 4100, 2, torch.float32, seed=19)
    assert iterating.pick(big_x, big_y) is iterating.sparse
    assert iterating.pick(torch.randn(4200, 5), torch.randn(4100, 5)) is iterating.keops


def test_rejects_high_dimension():
    x = torch.randn(100, 4)
    with pytest.raises(DriftopsError, match="D <= 3"):
        SparseBackend().lse(x, x, 0.1, "sqeuclidean")
    with pytest.raises(DriftopsError, match="D <= 3"):
        SparseBackend().weighted_mean(x, x, 0.1, "sqeuclidean", x)
    with pytest.raises(DriftopsError):
        SparseBackend(truncation=0)


def test_inference_mode_tensors():
    """Inference tensors have no version counter: the cache falls back to a checksum."""
    x, y = clouds(1500, 1500, 2, torch.float32, seed=18)
    sb = SparseBackend()
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        first = sb.lse(xi, yi, 1e-2, "sqeuclidean")
        xi.add_(0.5)
        second = sb.lse(xi, yi, 1e-2, "sqeuclidean")
    expected = reference("lse", x + 0.5, y, 1e-2, "sqeuclidean")
    assert lse_error(second, expected) < 1e-5
    assert lse_error(first, expected) > 1e-2


@pytest.mark.parametrize("weighted", [False, True])
def test_kdtree_candidates_match_dense_mask(monkeypatch, weighted):
    """The k-d tree path (used above 2^20 cluster pairs) keeps nearly the dense rule's blocks (its lower bounds
    come from a subset of the column clusters) and stays accurate, with and without self mask, and with
    log-weights varying by a few tenths (strongly varying ones make it fall back to the dense mask)."""
    x, y = clouds(6000, 5000, 2, torch.float32, seed=19)
    logw = torch.randn(5000, generator=torch.Generator().manual_seed(20)) * 0.1 if weighted else None
    for a, b, lw, off in ((x, y, logw, None), (x, x, None, 0)):
        sb = SparseBackend(cell_size=0.05)
        cx, cy = sb.clustering(a, 1e-2, "sqeuclidean"), sb.clustering(b, 1e-2, "sqeuclidean")
        lws = None if lw is None else lw[cy.perm]
        dense = sparse._keep_mask(cx, cy, 1e-2, "sqeuclidean", 20.0, lws, off is not None)
        with monkeypatch.context() as m:
            m.setattr(sparse, "DENSE_MASK_PAIRS", 0)
            with monkeypatch.context() as no_fallback:
                no_fallback.setattr(sparse, "_keep_mask", None)  # the tree path is taken, not the dense mask
                tree = sparse._keep_blocks(cx, cy, 1e-2, "sqeuclidean", 20.0, lws, off is not None)
            t = tree.dense()
            assert torch.equal(sparse.Blocks.from_mask(t).start, tree.start)  # maximal runs either way
            # The same rule on other candidates for its representatives: nearly the same blocks.
            assert float(t[dense].float().mean()) > 0.98 and abs(int(t.sum()) - int(dense.sum())) <= 0.05 * int(dense.sum())
            check(a, b, 1e-2, logw=lw, self_offset=off, thr=20.0)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_grid_labels_count_or_sort_alike(d, monkeypatch):
    # Compact labels in the order of the cells' linear index, whether counted (small grids) or sorted (sparse ones).
    g = torch.Generator().manual_seed(21)
    x = torch.cat([torch.randn(3000, d, generator=g, dtype=torch.float64), torch.full((5, d), 1e4, dtype=torch.float64)])
    for size in (0.05, 0.3):
        counted = sparse.grid_labels(x[:3000], size)
        monkeypatch.setattr(sparse, "BINCOUNT_CELLS", 0)
        sorted_ = sparse.grid_labels(x[:3000], size)
        far = sparse.grid_labels(x, size)  # 1e4 away: far more cells than points, sorted either way
        monkeypatch.undo()
        assert torch.equal(counted, sorted_) and torch.equal(sparse.grid_labels(x, size), far)
        q = torch.floor((x[:3000] - x[:3000].amin(0)) / size)
        same = (q[:, None] == q[None]).all(-1)
        assert torch.equal(same, counted[:, None] == counted[None]) and int(counted.max()) + 1 == len(torch.unique(q, dim=0))


def kept_points(cx, cy, blocks) -> torch.Tensor:
    """(N, M) boolean: the point pairs the kept blocks cover, in the clouds' original orders."""
    sorted_mask = blocks.dense()[cx.labels][:, cy.labels]
    out = torch.zeros_like(sorted_mask)
    out[cx.perm[:, None], cy.perm[None, :]] = sorted_mask
    return out


def assert_rule_holds(x, y, eps, logw, blocks, cx, cy, truncation, self_mask):
    """Every dropped entry of every row is below its largest kept entry by more than ``truncation`` (float64)."""
    logits = logw.double()[None] - ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1) / eps
    if self_mask:
        logits.fill_diagonal_(-float("inf"))
    kept = kept_points(cx, cy, blocks)
    best_kept = logits.masked_fill(~kept, -float("inf")).amax(1)
    best_dropped = logits.masked_fill(kept, -float("inf")).amax(1)
    assert bool(torch.isfinite(best_kept).all())
    assert bool((best_dropped < best_kept - truncation).all()), float((best_dropped - best_kept).max())


def sinkhorn_like(y: torch.Tensor, eps: float) -> torch.Tensor:
    """Smooth log-weights varying by hundreds across the cloud, like Sinkhorn's ``g / eps`` at small eps: g = |y|^2 -
    2 phi(y) with phi convex, plus a little noise."""
    g = torch.Generator().manual_seed(23)
    yd = y.double()
    trend = (yd**2).sum(1) - 2 * (0.6 * (yd**2).sum(1) + yd @ torch.linspace(0.5, -0.3, y.shape[1], dtype=torch.float64))
    return trend / eps + 0.1 * torch.randn(y.shape[0], generator=g, dtype=torch.float64)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("tree", [False, True])
def test_weighted_rule_holds_pointwise(d, tree, monkeypatch):
    """The refined test for log-weights drops only what the rule allows, on the dense mask and the k-d tree path, with
    and without a self mask, at small truncations where a wrong bound shows."""
    if tree:
        monkeypatch.setattr(sparse, "DENSE_MASK_PAIRS", 0)
    x, y = clouds(1500, 1200, d, torch.float64, seed=24 + d)
    for eps, thr in ((1e-2, 3.0), (3e-2, 8.0)):
        for a, b, self_mask in ((x, y, False), (y, y, True)):
            logw = sinkhorn_like(b, eps)
            sb = SparseBackend(thr, cell_size=0.15 if d == 3 else 0.05, slack=0.0)
            cx, cy, blocks = sb.plan_blocks(a, b, eps, "sqeuclidean", logw, self_mask)
            assert_rule_holds(a, b, eps, logw, blocks, cx, cy, thr, self_mask)


def test_weighted_rule_keeps_fewer_pairs(monkeypatch):
    """On a converged Sinkhorn drift's own column log-weights ``g / eps - log M``, the refined test drops blocks the
    constant bound keeps (4-9% of the pairs at this size, 15% at 65k points), and the reductions stay exact."""
    import driftops

    x, y = clouds(6000, 5000, 2, torch.float32, seed=27)
    _, info = driftops.drift(x, y, eps=1e-2, plan="sinkhorn", return_info=True)
    logw = info.sinkhorn[1e-2][0].g.double() / 1e-2 - math.log(5000)
    sb = SparseBackend(slack=0.0)
    refined = sb.kept_fraction(*sb.plan_blocks(x, y, 1e-2, "sqeuclidean", logw))[1]
    check(x, y, 1e-2, logw=logw.float())
    monkeypatch.setattr(sparse, "_refine", lambda cx, cy, cols, ii, jj, *rest: torch.ones_like(ii, dtype=torch.bool))
    sb = SparseBackend(slack=0.0)
    constant = sb.kept_fraction(*sb.plan_blocks(x, y, 1e-2, "sqeuclidean", logw))[1]
    assert refined < 0.95 * constant, (refined, constant)


def test_blocks_reused_while_log_weights_move_less_than_the_slack():
    x, y = clouds(1500, 1200, 2, torch.float64, seed=28)
    eps, thr = 1e-2, 3.0
    logw = sinkhorn_like(y, eps)
    sb = SparseBackend(thr, cell_size=0.05, slack=0.5)
    cx, cy, first = sb.plan_blocks(x, y, eps, "sqeuclidean", logw)
    assert sb.plan_blocks(x, y, eps, "sqeuclidean", logw + 123.0)[2] is first  # a constant changes no ratio
    wiggle = torch.rand(1200, generator=torch.Generator().manual_seed(29), dtype=torch.float64)
    moved = logw + 0.5 * wiggle / wiggle.max()
    assert sb.plan_blocks(x, y, eps, "sqeuclidean", moved)[2] is first
    assert_rule_holds(x, y, eps, moved, first, cx, cy, thr, False)  # the slack keeps the rule for moved weights
    assert sb.plan_blocks(x, y, eps, "sqeuclidean", logw + wiggle)[2] is not first
    masked = logw.clone()
    masked[0] = -float("inf")  # a new zero weight: planned anew
    assert sb.plan_blocks(x, y, eps, "sqeuclidean", masked)[2] is not first
    assert sb.plan_blocks(x, y, eps, "sqeuclidean", None)[2] is sb.plan_blocks(x, y, eps, "sqeuclidean")[2]
    sb.truncation = 4.0  # above what the blocks were planned for
    assert sb.plan_blocks(x, y, eps, "sqeuclidean", logw)[2] is not first
    with pytest.raises(DriftopsError, match="slack"):
        SparseBackend(slack=-1.0)

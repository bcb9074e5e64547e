"""One drift evaluation at scale: seconds, peak memory and error of one_sided / two_sided / sinkhorn.

2D Gaussian noise (model, torch.randn(N, 2), seed 0) vs checkerboard (target,
``driftops.data.sample_toy("checkerboard", N)``), N = M, float32, squared Euclidean cost,
``backend="auto"`` (the block-sparse path at these sizes). Each (N, plan) runs in a fresh process
(``common.measure``) that calls the drift ``--repeat`` times: ``seconds`` is the best call,
``first_seconds`` the first (loading KeOps's compiled formulas included), ``peak_mib`` the process's RSS growth.

Error: the column log-weights that driftops passed to its two barycentric sums (cross and self)
are recorded, then 1,000 sampled rows are evaluated exactly by the dense-lazy KeOps backend against
all N columns (self pair masked by index for one/two-sided); ``rel_err`` = max |V - V_exact| /
max |V_exact| over those rows. Sinkhorn: ``drift(..., plan="sinkhorn", tol=1e-3, return_info=True)``,
its iterations (cross + self) and marginal error; beside it GeomLoss's multiscale Sinkhorn
(``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps/2), scaling=0.9, backend="multiscale")``): seconds for
value + gradient and ``gl_rel_diff`` = max |-N grad - V| / max |V|.

    python benchmarks/bench_flow.py --sizes 10000 100000
    python benchmarks/bench_flow.py --sizes 1000000 --plans one_sided two_sided --repeat 1 --out bench_flow_1m
    python benchmarks/bench_flow.py --sizes 1000000 --plans sinkhorn --tol 1e-2 --repeat 1 --out bench_flow_1m_sinkhorn
    python benchmarks/bench_flow.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import driftops  # noqa: E402  (before torch, as the driftops command does: see driftops.threads)
import torch  # noqa: E402
from common import machine_info, measure, print_machine, print_table, save  # noqa: E402

PLANS = ("one_sided", "two_sided", "sinkhorn")


def clouds(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    import driftops.data

    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), driftops.data.sample_toy("checkerboard", n, seed=1)


def recording_backend(thr: float | None = None):
    """backend="auto" (its block-sparse backend with truncation ``thr`` when given), recording the (logw, self_offset)
    of every weighted_mean call."""
    from driftops.backends import AutoBackend, SparseBackend

    class Recording(AutoBackend):
        def __init__(self):
            super().__init__()
            if thr is not None:
                self.sparse = SparseBackend(truncation=thr)
            self.calls = []

        def weighted_mean(self, x, y, eps, cost, values, logw=None, self_offset=None):
            self.calls.append((None if logw is None else logw.detach().clone(), self_offset))
            return super().weighted_mean(x, y, eps, cost, values, logw, self_offset)

    return Recording()


def exact_rows(x, y, rows, eps, calls) -> torch.Tensor:
    """V on ``rows`` from the recorded column log-weights, every pair visited (dense-lazy KeOps)."""
    from pykeops.torch import LazyTensor

    from driftops.backends.keops import keops_logits

    (lw_cross, off_cross), (lw_self, off_self) = calls[-2:]
    xr = x[rows].contiguous()
    out = []
    for cols, lw, off in ((y, lw_cross, off_cross), (x, lw_self, off_self)):
        s = keops_logits(xr, cols, eps, "sqeuclidean", lw, rows if off is not None else None)
        out.append(s.sumsoftmaxweight(LazyTensor(cols[None, :, :]), dim=1))
    return out[0] - out[1]


def case(n: int, plan: str, args) -> dict:
    x, y = clouds(n)
    be = recording_backend(args.thr)
    res: dict = {"n": n, "plan": plan}
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        if plan == "sinkhorn":
            v, info = driftops.drift(x, y, args.eps, plan=plan, backend=be, tol=args.tol, max_iter=args.max_iter, return_info=True)
            res["iters"], res["marg_err"] = info.iterations, info.marginal_error
        else:
            v = driftops.drift(x, y, args.eps, plan=plan, backend=be)
        times.append(time.perf_counter() - t)
    res["seconds"], res["first_seconds"] = min(times), times[0]
    res["sparse"] = be.pick(x, y) is be.sparse
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(2))[: args.rows].sort().values
    t = time.perf_counter()
    ref = exact_rows(x, y, rows, args.eps, be.calls)
    res["check_s"] = time.perf_counter() - t
    res["rel_err"] = float((v[rows].double() - ref.double()).abs().max() / ref.double().abs().max())
    if plan == "sinkhorn" and n <= args.geomloss_max:
        res.update(geomloss_case(x, y, v, args))
    return res


def geomloss_case(x, y, v, args) -> dict:
    import geomloss

    kw = {"truncate": args.gl_truncate}
    if args.gl_cluster_scale is not None:
        kw["cluster_scale"] = args.gl_cluster_scale
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=math.sqrt(args.eps / 2), scaling=0.9, backend="multiscale", **kw)
    xg = x.clone().requires_grad_(True)
    t = time.perf_counter()
    with torch.enable_grad():  # GeomLoss re-enables grad anyway; be explicit
        val = loss(xg, y)
        (grad,) = torch.autograd.grad(val, xg)
    secs = time.perf_counter() - t
    g = -x.shape[0] * grad.detach()
    return {"gl_seconds": secs, "gl_rel_diff": float((g.double() - v.double()).abs().max() / v.double().abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--tol", type=float, default=1e-3, help="Sinkhorn L1 marginal error")
    ap.add_argument("--max-iter", type=int, default=1000, help="Sinkhorn iteration cap")
    ap.add_argument("--rows", type=int, default=1000, help="rows checked exactly")
    ap.add_argument("--thr", type=float, default=None, help="sparse truncation (default: the backend's)")
    ap.add_argument("--geomloss-max", type=int, default=100_000, help="largest N for the GeomLoss comparison")
    ap.add_argument("--gl-truncate", type=float, default=5.0, help="GeomLoss multiscale truncate (units of blur)")
    ap.add_argument("--gl-cluster-scale", type=float, default=None, help="GeomLoss cluster_scale (default: its own)")
    ap.add_argument("--repeat", type=int, default=3, help="drift calls per case (best reported)")
    ap.add_argument("--quick", action="store_true", help="N = 4000 only")
    ap.add_argument("--out", default="bench_flow", help="result name: benchmarks/results/<out>.json")
    args = ap.parse_args()
    if args.quick:
        args.sizes = [4000]
    rows = []
    cols = ["n", "plan", "sparse", "seconds", "first_seconds", "peak_mib", "rel_err", "iters", "marg_err", "gl_seconds", "gl_rel_diff", "error"]
    for n in args.sizes:
        for plan in args.plans:
            r = measure(lambda: case(n, plan, args))
            r.setdefault("n", n)
            r.setdefault("plan", plan)
            rows.append(r)
            print(json.dumps(r), flush=True)
    machine = machine_info()  # after the forked cases: the parent runs no OpenMP region before forking
    print_machine(machine)
    print_table(rows, cols)
    save(args.out, rows, {**vars(args), "load_average": os.getloadavg()}, machine)


if __name__ == "__main__":
    main()

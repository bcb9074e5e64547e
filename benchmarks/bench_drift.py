"""Drift evaluation speed: driftops (KeOps, lazy) beside a lean dense torch version, in one run.

The load table (run first, the headline): N = M = 8192 in 2D (Gaussian noise vs checkerboard), eps 0.1,
one- and two-sided drift and the Sinkhorn drift (default tolerance) with ``backend="auto"`` and the lean dense
torch drift (Sinkhorn: 20 normalisations per problem) timed in the same process
(best and median of ``--repeat`` calls after a warm-up call), each in a fresh subprocess under three
environments (``default``: no OpenMP variable and no CXXFLAGS set, as in a fresh shell; ``passive``:
OMP_WAIT_POLICY=PASSIVE; ``omp1``: OMP_NUM_THREADS=1; on request ``generic``: KeOps's formulas compiled without
driftops's ``-march=native``, CXXFLAGS set empty, and ``static``: the same with keopscore imported before driftops,
so that KeOps's loops keep their own static schedule and follow driftops's reduced thread count) and three loads (``idle``; ``busy``: another process spinning on one core;
``pair``: two copies of the case at once, both reported). Then, unless ``--loads-only``: for N = M in 2D
and each plan, seconds of one drift evaluation with ``backend="auto"`` (block-sparse in 2D, truncated at exp(-20)) and
``backend="keops"`` (every pair visited), peak memory, pair evaluations per second
(N x N per reduction, also for the truncated path) and the dense/driftops ratio; the
dense version is skipped (and reported) where its N x M matrices would not fit in memory. The
Sinkhorn part reports the time driftops needs to reach the marginal tolerance
beside the time of the usual fixed 20 alternating normalisations (dense) and
their marginal error, and GeomLoss's gradient time.

    python benchmarks/bench_drift.py --loads-only    # the load table alone (about 45 minutes on 2 cores)
    python benchmarks/bench_drift.py --loads-only --plans one_sided two_sided   # without Sinkhorn (about 8 minutes)
    python benchmarks/bench_drift.py --loads-only --plans one_sided two_sided --rounds 3   # ratios to idle per round
    python benchmarks/bench_drift.py                 # everything (about 65 minutes)
    python benchmarks/bench_drift.py --quick         # small sizes, a few minutes
    python benchmarks/bench_drift.py --loads-only --loads idle --envs default generic   # compiler flags
    python benchmarks/bench_drift.py --loads-only --plans one_sided two_sided --envs default generic static  # loops
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
if os.environ.get("BENCH_KEOPS_FIRST"):  # the "static" environment (common.ENVIRONMENTS)
    import keopscore  # noqa: F401
import driftops  # noqa: E402  (this checkout's; before torch, as the driftops command does: see driftops.threads)
import torch  # noqa: E402

from common import ENVIRONMENTS, load, machine_info, measure, print_machine, print_table, run_script, save, timings  # noqa: E402
from driftops.data import sample_toy  # noqa: E402


def clouds(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return x, sample_toy("checkerboard", n, seed=seed + 1)


def dense_fits(n: int, copies: int = 4) -> bool:
    """Whether ``copies`` float32 N x N matrices fit in half the physical memory."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return copies * n * n * 4 < ram / 2


def dense_map(x, y, eps, plan, mask):
    """Lean dense torch: cdist, (masked) softmax, matmul."""
    s = torch.cdist(x, y).square_().div_(-eps)
    if mask:
        s.fill_diagonal_(-float("inf"))
    if plan == "two_sided":
        s -= 0.5 * torch.logsumexp(s, 0, keepdim=True)
    return torch.softmax(s, 1) @ y


def dense_sinkhorn20(x, y, eps):
    """The fixed 20 alternating log-domain normalisations; returns (barycentric map, mean row error)."""
    s = torch.cdist(x, y).square_().div_(-eps)
    for _ in range(20):
        s -= torch.logsumexp(s, 1, keepdim=True)
        s -= torch.logsumexp(s, 0, keepdim=True)
    row_error = float((torch.logsumexp(s, 1).exp() - 1).abs().mean())
    return torch.softmax(s, 1) @ y, row_error


def dense_drift(x, y, eps, plan):
    """The lean dense torch drift: the plan's map towards y less the (self-masked) map towards x; the Sinkhorn plan
    with the fixed 20 normalisations of each problem (the Sinkhorn-drifting paper's recipe, self term unmasked)."""
    if plan == "sinkhorn":
        return dense_sinkhorn20(x, y, eps)[0] - dense_sinkhorn20(x, x, eps)[0]
    return dense_map(x, y, eps, plan, False) - dense_map(x, x, eps, plan, True)


def case_drift(n, plan, eps, impl):
    """Seconds of one drift evaluation (after a small warm-up call that loads the compiled formulas)."""

    def run():
        x, y = clouds(n)
        with torch.no_grad():
            if impl == "dense":
                evaluate = lambda a, b: dense_drift(a, b, eps, plan)  # noqa: E731
            else:
                evaluate = lambda a, b: driftops.drift(a, b, eps, plan=plan, backend=impl)  # noqa: E731
            evaluate(x[:2048], y[:2048])
            start = time.perf_counter()
            evaluate(x, y)
            return {"seconds": time.perf_counter() - start}

    return run


def child_drift(payload: dict) -> dict:
    """One load-table case in this process: best and median seconds of each implementation, and the ratio."""
    n, plan, eps, repeat = payload["n"], payload["plan"], payload["eps"], payload["repeat"]
    x, y = clouds(n)
    out = {}
    with torch.no_grad():
        for impl in payload["impls"]:
            if impl == "dense":
                evaluate = lambda a, b: dense_drift(a, b, eps, plan)  # noqa: E731
            else:
                evaluate = lambda a, b: driftops.drift(a, b, eps, plan=plan, backend=impl)  # noqa: E731
            evaluate(x[:2048], y[:2048])
            times = timings(lambda: evaluate(x, y), repeat)
            out[f"{impl}_best"], out[f"{impl}_median"] = min(times), statistics.median(times)
    return out


def load_table(args) -> list[dict]:
    """The headline table: every (load, environment, plan) in subprocesses (see the module docstring), ``--rounds``
    times with the loads alternating, so that each busy or pair case has an idle case of the same round beside it;
    with several rounds, followed by :func:`round_summary`'s rows."""
    rows = []
    impls = [args.impl] + ([] if args.no_dense else ["dense"])
    for round_ in range(args.rounds):
        for scenario in args.loads:
            for env in args.envs:
                for plan in args.plans:
                    payload = {"n": args.load_n, "plan": plan, "eps": args.eps, "impls": impls, "repeat": args.repeat}
                    with load(scenario) as copies:
                        results = run_script(__file__, payload, env, copies)
                    for k, r in enumerate(results):
                        load_name = scenario if copies == 1 else f"{scenario}#{k + 1}"
                        row = {"round": round_, "load": load_name, "env": env, "plan": plan, "N": args.load_n, **r}
                        if "dense_best" in r and f"{args.impl}_best" in r:
                            row["x_dense"] = r["dense_best"] / r[f"{args.impl}_best"]
                        rows.append(row)
                        print_table([row], list(row))
    print()
    a = args.impl
    print_table(rows, ["round", "load", "env", "plan", "N", f"{a}_best", f"{a}_median", "dense_best", "dense_median", "x_dense", "error"])
    if args.rounds == 1:
        return rows
    summary = round_summary(rows, f"{a}_best")
    print()
    print_table(summary, ["load", "env", "plan", "best", "x_idle_median", "x_idle_rounds"])
    return rows + summary


def round_summary(rows: list[dict], key: str) -> list[dict]:
    """Per (load, environment, plan): the best time over the rounds, and each round's time over the idle time of the
    same round, environment and plan (``x_idle_rounds``) with its median."""
    idle = {(r["round"], r["env"], r["plan"]): r[key] for r in rows if r["load"] == "idle" and key in r}
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if key in r:
            cells.setdefault((r["load"], r["env"], r["plan"]), []).append(r)
    out = []
    for (load_name, env, plan), group in cells.items():
        ratios = [r[key] / idle[r["round"], env, plan] for r in group if (r["round"], env, plan) in idle]
        out.append({
            "load": load_name, "env": env, "plan": plan, "best": min(r[key] for r in group),
            "x_idle_median": statistics.median(ratios) if ratios else None, "x_idle_rounds": [round(q, 2) for q in ratios],
        })  # fmt: skip
    return out


def case_sinkhorn(n, eps, impl, tol):
    def run():
        x, y = clouds(n)
        if impl == "dense-20":
            (_, err_xy), (_, err_xx) = dense_sinkhorn20(x, y, eps), dense_sinkhorn20(x, x, eps)
            return {"marginal_error": max(err_xy, err_xx), "iterations": 40}
        if impl == "geomloss":
            xr = x.clone().requires_grad_()
            loss = driftops.sinkhorn_divergence(xr, y, eps, scaling=0.9, backend="online")
            torch.autograd.grad(loss, xr)
            return {}
        _, info = driftops.drift(x, y, eps, plan="sinkhorn", backend=impl.split("-")[1], tol=tol, return_info=True)
        return {"marginal_error": info.marginal_error, "iterations": info.iterations}

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", nargs="+", default=["idle", "busy", "pair"], choices=["idle", "busy", "pair"])
    p.add_argument("--envs", nargs="+", default=["default", "passive", "omp1"], choices=list(ENVIRONMENTS))
    p.add_argument("--plans", nargs="+", default=["one_sided", "two_sided", "sinkhorn"], choices=["one_sided", "two_sided", "sinkhorn"],
                   help="plans of the load table")
    p.add_argument("--load-n", type=int, default=8192, help="N = M of the load table")
    p.add_argument("--impl", default="auto", help="driftops backend of the load table")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per case of the load table (best and median)")
    p.add_argument("--rounds", type=int, default=1, help="passes over the load table, loads alternating (ratios per round)")
    p.add_argument("--no-dense", action="store_true", help="load table without the dense drift (its Sinkhorn recipe: ~1 min a call)")
    p.add_argument("--loads-only", action="store_true", help="only the load table")
    p.add_argument("--no-loads", action="store_true", help="skip the load table")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 65536])
    p.add_argument("--eps", type=float, default=0.1, help="temperature of the one/two-sided tables")
    p.add_argument("--sinkhorn-sizes", type=int, nargs="+", default=[8192])
    p.add_argument("--sinkhorn-eps", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--sinkhorn-impls", nargs="+", default=["driftops-auto", "driftops-keops", "dense-20", "geomloss"])
    p.add_argument("--quick", action="store_true", help="sizes 1024 and 4096 only, Sinkhorn at 2048, load table at 4096")
    p.add_argument("--out", default="bench_drift")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_drift(json.loads(args.child))))
        return
    if args.quick:
        args.sizes, args.sinkhorn_sizes, args.load_n = [1024, 4096], [2048], 4096
    torch.manual_seed(0)
    machine = machine_info()
    print_machine(machine)
    measure(case_drift(256, "two_sided", args.eps, "keops"))  # compile outside the timings
    load_rows = [] if args.no_loads else load_table(args)
    if args.loads_only:
        save(args.out, load_rows, vars(args), machine | {"loadavg_after": os.getloadavg()})
        return
    rows = []

    for n in args.sizes:
        for plan in ("one_sided", "two_sided"):
            pairs = (2 if plan == "one_sided" else 4) * n * n  # pair evaluations: 2 or 4 reductions over N x N
            row = {"N": n, "plan": plan}
            for impl in ("auto", "keops"):
                r = measure(case_drift(n, plan, args.eps, impl))
                row[f"{impl}_s"], row[f"{impl}_mib"] = r.get("seconds"), r.get("peak_mib")
                row[f"{impl}_pairs_per_s"] = pairs / r["seconds"] if "seconds" in r else None
            if dense_fits(n):
                d = measure(case_drift(n, plan, args.eps, "dense"))
                row.update(dense_s=d.get("seconds"), dense_mib=d.get("peak_mib"), error=d.get("error"))
                for impl in ("auto", "keops"):
                    if "seconds" in d and row[f"{impl}_s"]:
                        row[f"{impl}_speedup"] = d["seconds"] / row[f"{impl}_s"]
            else:
                row["dense_s"] = f"cannot allocate ({4 * n * n * 4 / 2**30:.0f} GiB)"
            rows.append(row)
            print_table([row], list(row))
    print()
    print_table(rows, ["N", "plan", "auto_s", "auto_pairs_per_s", "auto_speedup", "keops_s", "keops_pairs_per_s",
                       "keops_speedup", "keops_mib", "dense_s", "dense_mib"])

    srows = []
    for n in args.sinkhorn_sizes:
        for eps in args.sinkhorn_eps:
            for impl in args.sinkhorn_impls:
                if impl == "dense-20" and not dense_fits(n):
                    continue
                r = measure(case_sinkhorn(n, eps, impl, args.tol))
                srows.append({"N": n, "eps": eps, "impl": impl, **r})
                print_table([srows[-1]], list(srows[-1]))
    print()
    print_table(srows, ["N", "eps", "impl", "seconds", "iterations", "marginal_error", "peak_mib", "error"])
    save(args.out, load_rows + rows + srows, vars(args), machine | {"loadavg_after": os.getloadavg()})


if __name__ == "__main__":
    main()

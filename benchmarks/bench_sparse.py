"""Block-sparse (``sparse``) vs dense-lazy (``keops``) reductions: time, kept fraction, error, memory.

Gaussian points (torch.randn(N, 2)) vs a 4x4 checkerboard on [-2, 2]^2, float32, squared
Euclidean cost, no log-weights. For every (N, eps) the keops reference runs once; for every
truncation thr the sparse backend runs ``lse`` and ``weighted_mean`` (values = y). Each case runs
in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own.

Errors against keops, max over rows: ``lse``: |a - b| / max(1, |b|) (= relative error of the row
sums when |b| <= 1); ``weighted_mean``: max |a - b| / max |b|. Above ``--ref-rows`` points the keops
reference only runs on that many random rows, and its time is scaled up by N / rows.

    python benchmarks/bench_sparse.py                   # 65,536 points, eps 0.01 and 0.1, thr 10/20/30
    python benchmarks/bench_sparse.py --sizes 16384 65536 262144
    python benchmarks/bench_sparse.py --quick           # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import driftops  # noqa: E402,F401  (this checkout's; before torch, as the driftops command does: see driftops.threads)
import torch  # noqa: E402
from common import machine_info, print_machine  # noqa: E402
from driftops.files import atomic_write_text  # noqa: E402


def checkerboard(n: int, seed: int = 1) -> torch.Tensor:
    """n points uniform on the black squares of a 4x4 checkerboard on [-2, 2]^2, float32 (n, 2)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(4 * n, 2, generator=g) * 4 - 2
    black = ((u[:, 0] + 2).floor() + (u[:, 1] + 2).floor()) % 2 == 0
    return u[black][:n].contiguous()


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), checkerboard(n)


def ref_rows(n: int, limit: int) -> torch.Tensor:
    """Rows on which the keops reference is computed (all of them up to ``limit`` points)."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(2))[:limit].sort().values


def worker(case: dict) -> dict:
    """Run one case in this process; save its outputs to ``case['out']``; return timings and memory."""
    from driftops.backends.keops import KeOpsBackend
    from driftops.backends.sparse import SparseBackend

    x, y = data(case["n"])
    eps, cost = case["eps"], "sqeuclidean"
    res: dict = {}
    if case["backend"] == "keops":
        backend, rows = KeOpsBackend(), ref_rows(case["n"], case["ref_rows"])
        backend.lse(x[:64], y[:64], eps, cost)  # compile (if needed) outside the timing
        backend.weighted_mean(x[:64], y[:64], eps, cost, y[:64])
        xr = x[rows].contiguous()
        scale = case["n"] / len(rows)
    else:
        backend, xr, scale = SparseBackend(truncation=case["thr"]), x, 1.0
        small = SparseBackend(truncation=case["thr"])
        small.lse(x[:64], y[:64], eps, cost)
        small.weighted_mean(x[:64], y[:64], eps, cost, y[:64])
        t = time.perf_counter()
        cx, cy, keep = backend.plan_blocks(x, y, eps, cost)
        res["plan_s"] = time.perf_counter() - t  # clustering both clouds + keep mask (cached clustering after)
        res["blocks"], res["pairs"] = backend.kept_fraction(cx, cy, keep)
        res["clusters"] = [cx.counts.numel(), cy.counts.numel()]
        res["cell_size"] = [cx.cell_size, cy.cell_size]
    t = time.perf_counter()
    lse = backend.lse(xr, y, eps, cost)
    res["lse_s"] = (time.perf_counter() - t) * scale
    t = time.perf_counter()
    mean = backend.weighted_mean(xr, y, eps, cost, y)
    res["mean_s"] = (time.perf_counter() - t) * scale
    res["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save({"lse": lse, "mean": mean}, case["out"])
    return res


def run_case(case: dict) -> dict:
    """``worker(case)`` in a fresh subprocess (its own peak memory)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def errors(sparse: dict, ref: dict, rows: torch.Tensor) -> tuple[float, float]:
    a_lse, b_lse = sparse["lse"][rows].double(), ref["lse"].double()
    a_mean, b_mean = sparse["mean"][rows].double(), ref["mean"].double()
    e_lse = float(((a_lse - b_lse) / b_lse.abs().clamp_min(1)).abs().max())
    e_mean = float((a_mean - b_mean).abs().max() / b_mean.abs().max())
    return e_lse, e_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[65536], help="N = M (default: 65536)")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--thr", type=float, nargs="+", default=[10.0, 20.0, 30.0], help="truncations")
    ap.add_argument("--ref-rows", type=int, default=65536, help="keops reference rows above this size")
    ap.add_argument("--quick", action="store_true", help="N = 8192, eps 0.01, thr 10 and 20")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_sparse.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.quick:
        args.sizes, args.eps, args.thr = [8192], [0.01], [10.0, 20.0]

    machine = machine_info()
    print_machine(machine)
    header = (f"{'N':>7} {'eps':>5} {'thr':>4} | {'keops lse':>9} {'sparse':>7} {'x':>5} | {'keops wm':>9} "
              f"{'sparse':>7} {'x':>5} | {'blocks':>6} {'pairs':>6} | {'err lse':>8} {'err wm':>8} | {'MiB k/s':>9}")
    print(header)
    print("-" * len(header))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows = ref_rows(n, args.ref_rows)
            for eps in args.eps:
                ref_path = f"{tmp}/keops_{n}_{eps}.pt"
                ref = run_case({"backend": "keops", "n": n, "eps": eps, "ref_rows": args.ref_rows, "out": ref_path})
                ref_out = torch.load(ref_path)
                for thr in args.thr:
                    path = f"{tmp}/sparse_{n}_{eps}_{thr}.pt"
                    sp = run_case({"backend": "sparse", "n": n, "eps": eps, "thr": thr, "out": path})
                    e_lse, e_mean = errors(torch.load(path), ref_out, rows)
                    row = {
                        "n": n, "eps": eps, "thr": thr,
                        "keops_lse_s": ref["lse_s"], "sparse_lse_s": sp["lse_s"],
                        "speedup_lse": ref["lse_s"] / sp["lse_s"],
                        "keops_mean_s": ref["mean_s"], "sparse_mean_s": sp["mean_s"],
                        "speedup_mean": ref["mean_s"] / sp["mean_s"],
                        "sparse_plan_s": sp["plan_s"], "kept_blocks": sp["blocks"], "kept_pairs": sp["pairs"],
                        "clusters": sp["clusters"], "cell_size": sp["cell_size"],
                        "err_lse": e_lse, "err_mean": e_mean, "ref_rows": len(rows),
                        "keops_maxrss_mib": ref["maxrss_mib"], "sparse_maxrss_mib": sp["maxrss_mib"],
                    }
                    results.append(row)
                    print(f"{n:>7} {eps:>5} {thr:>4.0f} | {row['keops_lse_s']:>9.2f} {row['sparse_lse_s']:>7.2f} "
                          f"{row['speedup_lse']:>5.1f} | {row['keops_mean_s']:>9.2f} {row['sparse_mean_s']:>7.2f} "
                          f"{row['speedup_mean']:>5.1f} | {row['kept_blocks']:>6.3f} {row['kept_pairs']:>6.3f} | "
                          f"{e_lse:>8.1e} {e_mean:>8.1e} | {ref['maxrss_mib']:>4.0f}/{sp['maxrss_mib']:<4.0f}",
                          flush=True)
    meta = {"machine": machine, "load_average_after": os.getloadavg(), "note": "keops time scaled by N/ref_rows when ref_rows < N"}
    atomic_write_text(args.out, json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

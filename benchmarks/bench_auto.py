"""Where ``backend="auto"`` stands against each backend it chooses from, on this CPU, in one run.

For N = M, D, eps and two kinds of reduction, the seconds of ``dense``, ``keops`` (dense-lazy) and ``sparse``
(block-sparse, D <= 3) beside the backend ``auto`` picks, and auto's time over the fastest (1.0: auto picked it):

* ``mean``: one softmax-weighted mean of y (the barycentric map of a drift), no log-weights, first call on a
  pair of clouds (the sparse plan and the dense kernel built inside the timing);
* ``iteration``: a log-sum-exp with fresh column log-weights on clouds already reduced (a Sinkhorn iteration:
  the sparse plan and the dense kernel reused), with ``AutoBackend().iterations()``'s pick.

x: standard normal (N, D); y: standard normal shifted by 1 along every axis (M, D); float32, squared Euclidean
cost; best of ``--repeat`` calls after a warm-up call that compiles and loads the formulas. Dense cases above
``--dense-max`` pairs are skipped (their N x M matrices).

    python benchmarks/bench_auto.py                    # D 1-8, N 1024-16384, eps 0.1 and 0.01 (about 15 minutes)
    python benchmarks/bench_auto.py --dims 2 --sizes 1024 2048 --eps 0.1   # one corner
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import driftops  # noqa: E402,F401  (this checkout's; before torch, as the driftops command does: see driftops.threads)
import torch  # noqa: E402

from common import machine_info, print_machine, print_table, save, timings  # noqa: E402
from driftops.backends import SPARSE_MAX_DIM, AutoBackend, DenseBackend, KeOpsBackend, SparseBackend  # noqa: E402

BACKENDS = {"dense": DenseBackend, "keops": KeOpsBackend, "sparse": SparseBackend}


def clouds(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 1.0


def timed(fn, repeat: int) -> float:
    """Best seconds of ``repeat`` calls of ``fn()`` after one warm-up call."""
    fn()
    return min(timings(fn, repeat))


def case(kind: str, name: str, x: torch.Tensor, y: torch.Tensor, eps: float, repeat: int) -> float:
    """Seconds of one reduction of ``kind`` with backend ``name`` (see the module docstring)."""
    if kind == "mean":
        return timed(lambda: BACKENDS[name]().weighted_mean(x, y, eps, "sqeuclidean", y), repeat)
    backend = BACKENDS[name]().iterations()
    base = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(1))
    logw = [base, base + 0.01]  # log-weights that move a little from one iteration to the next
    step = iter(range(1 << 30))
    return timed(lambda: backend.lse(x, y, eps, "sqeuclidean", logw[next(step) % 2]), repeat)


def auto_pick(kind: str, x: torch.Tensor, y: torch.Tensor) -> str:
    auto = AutoBackend()
    picked = (auto if kind == "mean" else auto.iterations()).pick(x, y)
    return next(name for name, cls in BACKENDS.items() if isinstance(picked, cls))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--kinds", nargs="+", default=["mean", "iteration"], choices=["mean", "iteration"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=1 << 26, help="largest N * M timed with the dense backend")
    p.add_argument("--out", default="bench_auto")
    args = p.parse_args()
    machine = machine_info()
    print_machine(machine)
    rows = []
    with torch.no_grad():
        for kind in args.kinds:
            for d in args.dims:
                for n in args.sizes:
                    x, y = clouds(n, d)
                    for eps in args.eps:
                        row = {"kind": kind, "D": d, "N": n, "eps": eps, "auto": auto_pick(kind, x, y)}
                        for name in BACKENDS:
                            if (name == "sparse" and d > SPARSE_MAX_DIM) or (name == "dense" and n * n > args.dense_max):
                                continue
                            row[name] = case(kind, name, x, y, eps, args.repeat)
                        times = {name: row[name] for name in BACKENDS if name in row}
                        row["fastest"] = min(times, key=times.get)
                        if row["auto"] in times:
                            row["auto_over_fastest"] = times[row["auto"]] / times[row["fastest"]]
                        rows.append(row)
                        print_table([row], list(row))
    print()
    print_table(rows, ["kind", "D", "N", "eps", "dense", "keops", "sparse", "auto", "fastest", "auto_over_fastest"])
    save(args.out, rows, vars(args), machine | {"loadavg_after": os.getloadavg()})


if __name__ == "__main__":
    main()

"""Converged Sinkhorn drifts side by side: iterations, time and reached marginal error.

Implementations, each in a fresh process under the default environment:

* ``plain``: driftops with ``Sinkhorn(acceleration="none", multiscale=False)`` (alternating log-domain updates after
  eps-annealing);
* ``previous``: driftops at an earlier commit (``--previous``; by default e6ebddd, whose solver over-relaxes the g
  half-step only, factor 1.6, one coarse level), imported from ``git archive`` of that commit;
* ``overrelaxed``: ``Sinkhorn(newton=0)`` (both half-steps over-relaxed with an adaptive factor, coarse levels
  solved at the target eps);
* ``driftops``: the default ``Sinkhorn()``, in 2D at low eps the same with a sparse Newton finish on the points (the
  128 largest plan entries of each row in its Hessian; none where a kernel covers too many points for them);
* ``geomloss``: GeomLoss ``SamplesLoss(potentials=True)`` at the matching blur (scaling 0.9; multiscale in 2D), its
  potentials' marginal error measured as driftops measures its own;
* ``dense20``: 20 alternating dense log-domain normalisations from zero potentials (the Sinkhorn-drifting paper's
  recipe), where an N x M matrix fits.

Cases: Gaussian noise against the checkerboard (``gauss``), a checkerboard against a copy shifted by a twentieth
of a tile (``shift``), and Gaussian noise against the checkerboard moved by 100 along each axis (``far``: float32
potentials of the clouds as given cannot resolve the separation's cost). Reported: iterations on the points (cross +
self), iterations on coarse levels and annealing, seconds for the whole drift, largest L1 marginal error. Example::

    python benchmarks/bench_sinkhorn.py --sizes 8192 --eps 0.1 0.01 --cases gauss shift
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, child_env, machine_info, print_machine, print_table, save

IMPLS = ("plain", "previous", "overrelaxed", "driftops", "geomloss", "dense20")
DENSE_MAX = 20000


def clouds(case: str, n: int):
    import torch

    import driftops

    y = driftops.data.sample_toy("checkerboard", n, seed=1)
    if case == "shift":
        return driftops.data.sample_toy("checkerboard", n, seed=2) + 0.05, y
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    return noise, (y + 100.0 if case == "far" else y)


def column_error(x, y, f, g, eps: float) -> float:
    """L1 column-marginal error of the plan ``exp((f_i + g_j - |x_i - y_j|^2)/eps) / (N M)`` with its rows made exact."""
    import math

    import torch
    from pykeops.torch import LazyTensor

    n, m = len(x), len(y)
    scale = torch.tensor([-1.0 / eps], dtype=x.dtype)

    def lse(a, b, pot):  # log sum_j exp((pot_j - |a_i - b_j|^2)/eps) / len(b)
        s = LazyTensor(a[:, None, :]).sqdist(LazyTensor(b[None, :, :])) * LazyTensor(scale) + LazyTensor((pot / eps)[None, :, None])
        return s.logsumexp(dim=1).reshape(-1) - math.log(len(b))

    f = -eps * lse(x, y, g)  # rows exact
    col = torch.exp(g / eps + lse(y, x, f))  # (M,) column sums times M
    return float((col - 1).abs().sum() / m) if n else 0.0


def child(impl: str, case: str, n: int, eps: float, tol: float, max_iter: int) -> dict:
    import torch

    import driftops

    x, y = clouds(case, n)
    t0 = time.perf_counter()
    if impl in ("plain", "overrelaxed", "driftops", "previous"):
        kw = dict(tol=tol, max_iter=max_iter)
        if impl == "plain":
            kw["solver"] = driftops.Sinkhorn(acceleration="none", multiscale=False)
        if impl == "overrelaxed":
            kw["solver"] = driftops.Sinkhorn(newton=0)
        _, info = driftops.drift(x, y, eps, plan="sinkhorn", return_info=True, **kw)
        seconds = time.perf_counter() - t0
        cross, own = info.sinkhorn[eps]
        return {
            "iterations": f"{cross.iterations} + {own.iterations}",
            "coarse": sum(getattr(r, "coarse_iterations", 0) for r in (cross, own)) if impl != "previous" else None,
            "omega": round(getattr(cross, "omega", 1.6), 3) if impl != "plain" else 1.0,
            "seconds": seconds,
            "error": max(cross.marginal_error, own.marginal_error),
        }
    if impl == "geomloss":
        from geomloss import SamplesLoss

        loss = SamplesLoss("sinkhorn", p=2, blur=(eps / 2) ** 0.5, scaling=0.9, debias=True, potentials=True)
        f, g = (p.reshape(-1) for p in loss(x, y))
        seconds = time.perf_counter() - t0
        # GeomLoss's cost is |x - y|^2 / 2 with temperature blur^2 = eps / 2: its potentials are half of driftops's.
        return {"iterations": "one per eps", "seconds": seconds, "error": column_error(x, y, 2 * f, 2 * g, eps)}
    if n > DENSE_MAX:
        return {"error_text": f"N x N matrix of {n} points does not fit"}
    c = torch.cdist(x, y) ** 2 / eps
    f = torch.zeros(n)
    g = torch.zeros(n)
    for _ in range(20):
        f = -eps * torch.logsumexp(g[None, :] / eps - c, 1)
        g = -eps * torch.logsumexp(f[:, None] / eps - c, 0)
    seconds = time.perf_counter() - t0
    return {"iterations": "20", "seconds": seconds, "error": column_error(x, y, f, g, eps)}


def run(impl: str, payload: dict, previous_path: str | None) -> dict:
    """One case in a fresh process (``previous``: with the earlier commit's driftops first on the path)."""
    env = child_env("default")
    if impl == "previous":
        env["PYTHONPATH"] = os.pathsep.join([previous_path, str(Path(__file__).parent)])
    cmd = [sys.executable, __file__, "--child", json.dumps(payload | {"impl": impl})]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error_text": (p.stderr.strip().splitlines() or ["no output"])[-1][:160]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.003])
    parser.add_argument("--cases", nargs="+", default=["gauss", "shift"], choices=["gauss", "shift", "far"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--previous", default="e6ebddd", help="git commit of the previous solver")
    parser.add_argument("--out", default="bench_sinkhorn")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        p = json.loads(args.child)
        print(json.dumps(child(p["impl"], p["case"], p["n"], p["eps"], p["tol"], p["max_iter"])))
        return
    machine = machine_info()
    print_machine(machine)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "previous" in args.impls:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.previous, "driftops"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for n in args.sizes:
            for case in args.cases:
                for eps in args.eps:
                    for impl in args.impls:
                        payload = {"case": case, "n": n, "eps": eps, "tol": args.tol, "max_iter": args.max_iter}
                        row = {"n": n, "case": case, "eps": eps, "impl": impl} | run(impl, payload, tmp)
                        rows.append(row)
                        print_table([row], list(row))
                        save(args.out, rows, vars(args), machine)
    base = {(r["n"], r["case"], r["eps"]): r.get("seconds") for r in rows if r["impl"] == "dense20"}
    for r in rows:
        ref = base.get((r["n"], r["case"], r["eps"]))
        if ref and r.get("seconds"):
            r["x_dense20_time"] = r["seconds"] / ref
    print_table(rows, ["n", "case", "eps", "impl", "iterations", "coarse", "omega", "seconds", "x_dense20_time", "error", "error_text"])
    save(args.out, rows, vars(args), machine)


if __name__ == "__main__":
    main()

"""Is a sparse Newton finish worth it? Sinkhorn-Newton-Sparse against over-relaxed Sinkhorn at low eps.

Sinkhorn-Newton-Sparse (Tang et al., "Accelerating Sinkhorn with sparse Newton iterations", ICLR 2024): Newton
steps on the entropic dual whose Hessian keeps only the largest entries of the plan (``--densities``), solved by
Jacobi-preconditioned conjugate gradients, with a backtracking line search on the dual objective. Beside it the
solver family driftops runs on the points: Sinkhorn updates over-relaxed by a factor w on both half-steps.

Dense float64 on the Sinkhorn benchmark's clouds (Gaussian -> checkerboard, and a checkerboard against a shifted
copy), N = M = ``--n``. Every method starts from the same potentials: one Sinkhorn sweep per temperature of an
eps-scaling from the largest cost down to eps, halving (GeomLoss's schedule), and stops when the L1 marginal error of
both sides is below ``--tol``. Work is counted in passes over the N x M pairs, the unit of every driftops solver
(a Sinkhorn half-step is one pass): a Newton step costs one pass (plan, gradient, objective), one more per rejected
line-search trial, and nnz / (N M) of a pass per sparse Hessian-vector product. Writes
benchmarks/results/bench_newton.json.

    python benchmarks/bench_newton.py                 # N = 2048, eps 0.01 and 0.003: about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
import time

import driftops  # noqa: F401  (before torch, as the driftops command does: see driftops.threads)
import torch
from bench_sinkhorn import clouds
from common import machine_info, print_machine, print_table, save

DIAG_FLOOR = 1e-300


class Problem:
    """Dense float64 entropic OT between uniform clouds: logits ``S = -C / eps`` and the pass counter."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
        self.cost = torch.cdist(x.double(), y.double()).square_()
        self.eps = eps
        self.loga, self.logb = -math.log(x.shape[0]), -math.log(y.shape[0])
        self.passes = 0.0

    def logplan(self, f: torch.Tensor, g: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        e = eps or self.eps
        self.passes += 1
        return (f[:, None] + g[None, :] - self.cost) / e + self.loga + self.logb

    def update_f(self, g: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        e = eps or self.eps
        self.passes += 1
        return -e * torch.logsumexp((g[None, :] - self.cost) / e + self.logb, 1)

    def update_g(self, f: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        e = eps or self.eps
        self.passes += 1
        return -e * torch.logsumexp((f[:, None] - self.cost) / e + self.loga, 0)

    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Potentials after one sweep per temperature from the largest cost down to eps (halving), f exact for g."""
        f = self.cost.new_zeros(self.cost.shape[0])
        g = self.cost.new_zeros(self.cost.shape[1])
        e = float(self.cost.max())
        while True:
            e = max(e, self.eps)
            f = self.update_f(g, e)
            g = self.update_g(f, e)
            if e == self.eps:
                return self.update_f(g), g
            e /= 2

    def errors(self, logp: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(largest L1 marginal error of the two sides, row sums, column sums) of a plan's logarithm."""
        p = logp.exp()
        r, c = p.sum(1), p.sum(0)
        a, b = math.exp(self.loga), math.exp(self.logb)
        return max(float((r - a).abs().sum()), float((c - b).abs().sum())), r, c


def sinkhorn(prob: Problem, f: torch.Tensor, g: torch.Tensor, omega: float, tol: float, max_iter: int) -> dict:
    """Over-relaxed Sinkhorn (factor omega on both half-steps) from (f, g) with f exact for g (the rows' marginal
    met): each iteration's g-update reads the columns' marginal error from its own reduction, so an iteration is
    two passes."""
    its, err = 0, math.inf
    while its < max_iter:
        exact_g = prob.update_g(f)
        err = float((math.exp(prob.logb) * ((g - exact_g) / prob.eps).exp().sub(1).abs()).sum())
        if err < tol:
            break
        g = (1 - omega) * g + omega * exact_g
        f = (1 - omega) * f + omega * prob.update_f(g)
        its += 1
    return {"iterations": its, "error": err}


def newton(prob: Problem, f: torch.Tensor, g: torch.Tensor, density: float, tol: float, max_iter: int, cg_iter: int = 50) -> dict:
    """Sinkhorn-Newton-Sparse from (f, g): Newton steps with the plan truncated to its ``density`` largest entries."""
    n, m = prob.cost.shape
    a, b = math.exp(prob.loga), math.exp(prob.logb)
    logp = prob.logplan(f, g)
    err, r, c = prob.errors(logp)
    steps, trials, hvp, nnz_share = 0, 0, 0, 0.0
    while err >= tol and steps < max_iter:
        p = logp.exp()
        keep = max(1, int(density * n * m))
        threshold = torch.topk(p.reshape(-1), keep, sorted=False).values.min()
        masked = torch.where(p >= threshold, p, torch.zeros_like(p))
        sparse, sparse_t = masked.to_sparse_csr(), masked.t().contiguous().to_sparse_csr()
        nnz_share = sparse.values().numel() / (n * m)
        grad = torch.cat([a - r, b - c])
        diag = torch.cat([r, c]).clamp_min(DIAG_FLOOR) / prob.eps

        def hess(v: torch.Tensor) -> torch.Tensor:
            vf, vg = v[:n], v[n:]
            return torch.cat([r * vf + sparse @ vg, c * vg + sparse_t @ vf]) / prob.eps

        # Jacobi-preconditioned conjugate gradients on hess(d) = grad (the Hessian of the dual is -hess).
        d = torch.zeros_like(grad)
        res = grad.clone()
        z = res / diag
        q = z.clone()
        rz = float(res @ z)
        for _ in range(cg_iter):
            hq = hess(q)
            hvp += 1
            alpha = rz / float(q @ hq)
            d += alpha * q
            res -= alpha * hq
            if float(res.norm()) < 0.1 * float(grad.norm()):
                break
            z = res / diag
            rz, rz_old = float(res @ z), rz
            q = z + (rz / rz_old) * q
        # Backtracking line search on the dual objective <f, a> + <g, b> - eps * sum(P).
        value = a * float(f.sum()) + b * float(g.sum()) - prob.eps * float(r.sum())
        slope = float(grad @ d)
        t = 1.0
        while True:
            f_new, g_new = f + t * d[:n], g + t * d[n:]
            logp_new = prob.logplan(f_new, g_new)
            trials += 1
            err_new, r_new, c_new = prob.errors(logp_new)
            new_value = a * float(f_new.sum()) + b * float(g_new.sum()) - prob.eps * float(r_new.sum())
            if new_value >= value + 1e-4 * t * slope or t < 1e-6:
                break
            t /= 2
        f, g, logp, err, r, c = f_new, g_new, logp_new, err_new, r_new, c_new
        steps += 1
    prob.passes += hvp * nnz_share
    return {"iterations": steps, "error": err, "line_search_trials": trials, "hessian_products": hvp, "kept": nnz_share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.003])
    parser.add_argument("--cases", nargs="+", default=["gauss", "shift"])
    parser.add_argument("--omegas", type=float, nargs="+", default=[1.8, 1.9, 1.95])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=5000)
    args = parser.parse_args()
    print_machine(machine_info())
    rows = []
    for case in args.cases:
        x, y = clouds(case, args.n)
        for eps in args.eps:
            base = Problem(x, y, eps)
            f0, g0 = base.start()
            runs = [(f"sinkhorn w={w:g}", lambda p, w=w: sinkhorn(p, f0, g0, w, args.tol, args.max_iter)) for w in args.omegas]
            runs += [(f"newton kept {d:g}", lambda p, d=d: newton(p, f0, g0, d, args.tol, 200)) for d in args.densities]
            for name, solve in runs:
                prob = Problem(x, y, eps)
                start = time.perf_counter()
                out = solve(prob)
                row = {"case": case, "eps": eps, "method": name, "start_passes": base.passes, "passes": round(prob.passes, 1),
                       "seconds": round(time.perf_counter() - start, 2), **out}  # fmt: skip
                rows.append(row)
                print(row, flush=True)
                save("bench_newton", rows, vars(args))  # after every row: an interrupted run keeps what it measured
    print_table(rows, ["case", "eps", "method", "start_passes", "iterations", "passes", "error", "seconds"])


if __name__ == "__main__":
    main()

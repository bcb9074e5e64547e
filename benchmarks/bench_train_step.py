"""Time per training step of the Sinkhorn-drifting trainer at the paper's settings, side by side.

Paper preset (wide residual MLP, 1.59M parameters, AdamW 2e-4, batch 1024, no EMA or clipping) on the paper's
checkerboard at eps 0.01, each variant in a fresh process under the default environment:

* ``converged``: driftops, Sinkhorn to tol 1e-3 every step, each step's solve started cold (the default; a sparse
  Newton finish on the points);
* ``converged_warm``: the same, each solve warm-started from the previous step's potentials (c-transform);
* ``converged_overrelaxed``: converged, without the Newton finish (``Sinkhorn(newton=0)``);
* ``converged_8192``: converged, the drift computed on 8192 generated vs 8192 target points and the generator fitted
  to them in the preset's minibatches of 1024 (one drift per 8 optimiser steps; timed per optimiser step);
* ``capped20``: driftops, at most 20 Sinkhorn iterations per drift (the preset's setting);
* ``recipe20``: the paper code's recipe written here in plain torch: dense log-domain Sinkhorn, 20 iterations
  from zero potentials for the cross and the self plan, drift ``bary(x, y) - bary(x, x)`` of the row-normalised
  plans, the same generator and optimiser.

Steps are timed from the start of training (the hardest steps for Sinkhorn: the generator's outputs start as a
point mass). Reported: seconds per step (median of ``--repeats`` runs), the ratio to ``recipe20``, and the mean L1
marginal error of the cross plan over the logged steps. Example::

    python benchmarks/bench_train_step.py --steps 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from common import machine_info, print_machine, print_table, recipe_drift, recipe_model, run_script, save

VARIANTS = {
    "converged": dict(sinkhorn_iters=1000, sinkhorn_tol=1e-3),
    "converged_warm": dict(sinkhorn_iters=1000, sinkhorn_tol=1e-3, sinkhorn_warm=True),
    "converged_overrelaxed": dict(sinkhorn_iters=1000, sinkhorn_tol=1e-3, sinkhorn_newton=0),
    "converged_8192": dict(sinkhorn_iters=1000, sinkhorn_tol=1e-3, batch=8192, minibatch=1024),
    "capped20": dict(sinkhorn_iters=20),
    "recipe20": None,
}


def driftops_steps(options: dict, steps: int, eps: float, seed: int) -> dict:
    """Train ``steps`` steps (rounded up to whole drift rounds) with the paper preset and ``options``; seconds per
    optimiser step and mean marginal error."""
    from driftops.train import TrainConfig, read_metrics, train

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_preset("paper", plan="sinkhorn", eps=[eps], steps=steps, out=out, seed=seed, eval_every=0, log_every=1, progress=False, **options)
        summary = train(cfg)
        errors = [r["marginal_error"] for r in read_metrics(out) if "marginal_error" in r]
    return {"s_per_step": summary["seconds"] / summary["steps"], "marginal_error": statistics.fmean(errors)}


def recipe_steps(steps: int, eps: float, seed: int) -> dict:
    """The paper code's recipe (dense, 20 log-domain Sinkhorn iterations per plan) with the preset's generator."""
    import torch

    from driftops.data import sample_toy
    from driftops.train import TrainConfig

    cfg = TrainConfig.from_preset("paper", seed=seed)
    model = recipe_model(cfg, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    errors, start = [], time.perf_counter()
    for step in range(steps):
        x = model(torch.randn(cfg.batch, cfg.noise_dim))
        y = sample_toy("checkerboard", cfg.batch, seed=seed * 100_003 + step)
        v, error = recipe_drift(x, y, eps)
        loss = ((x - (x.detach() + v)) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        errors.append(error)
    return {"s_per_step": (time.perf_counter() - start) / steps, "marginal_error": statistics.fmean(errors)}


def child(variant: str, steps: int, eps: float, seed: int) -> dict:
    import driftops

    driftops.warmup(progress=False)  # kernels compiled before the clock starts
    if VARIANTS[variant] is None:
        return recipe_steps(steps, eps, seed)
    return driftops_steps(VARIANTS[variant], steps, eps, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--out", default="bench_train_step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        p = json.loads(args.child)
        print(json.dumps(child(p["variant"], p["steps"], p["eps"], p["seed"])))
        return
    machine = machine_info()
    print_machine(machine)
    rows = []
    for variant in args.variants:
        runs = [run_script(__file__, {"variant": variant, "steps": args.steps, "eps": args.eps, "seed": r})[0] for r in range(args.repeats)]
        ok = [r for r in runs if "error" not in r]
        row = {"variant": variant, "steps": args.steps, "eps": args.eps}
        if ok:
            row |= {"s_per_step": statistics.median(r["s_per_step"] for r in ok), "marginal_error": statistics.median(r["marginal_error"] for r in ok)}
        else:
            row["error"] = runs[0]["error"]
        rows.append(row)
        print_table([row], list(row))
        save(args.out, rows, vars(args), machine)
    base = next((r.get("s_per_step") for r in rows if r["variant"] == "recipe20"), None)
    for r in rows:
        if base and r.get("s_per_step"):
            r["x_recipe20"] = r["s_per_step"] / base
    print_table(rows, ["variant", "steps", "eps", "s_per_step", "x_recipe20", "marginal_error", "error"])
    save(args.out, rows, vars(args), machine)


if __name__ == "__main__":
    main()

"""The Sinkhorn-drifting paper's toy protocol: 8-Gaussians and Checkerboard, three plans, three temperatures.

Residual MLP generator (hidden 256, 6 blocks, noise 16), AdamW, flow-then-fit drifting with one
drift step per optimiser step (batch == minibatch), Sinkhorn capped at 20 iterations; W2^2 (exact,
POT emd2) of 1000 EMA samples to 1000 fresh target samples, mean ± std over seeds. The paper
uses batch 1024, 5000 steps and lr 2e-4; the defaults here fit a shared 2-core CPU. Writes
benchmarks/results/repro_toys.{json,md,png}.

    python benchmarks/repro_toys.py                                  # 2000 steps, batch 1024
    python benchmarks/repro_toys.py --steps 300 --batch 256 --lr 1e-3  # ~10 minutes on one core
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, print_table, save  # noqa: E402

from driftops.train import TrainConfig, load_run, train  # noqa: E402
from driftops.train.commands import evaluate, sample_model, scatter  # noqa: E402


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toys", nargs="+", default=["eight_gaussians", "checkerboard"])
    parser.add_argument("--plans", nargs="+", default=["one_sided", "two_sided", "sinkhorn"])
    parser.add_argument("--eps", nargs="+", type=float, default=[0.1, 0.05, 0.01])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--sinkhorn-iters", type=int, default=20)
    parser.add_argument("--backend", default="dense", help="dense is fastest at these batch sizes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    runs = RESULTS / "runs" / "repro_toys"
    rows, samples = [], {}
    for toy in args.toys:
        for plan in args.plans:
            for eps in args.eps:
                values, seconds = [], 0.0
                for seed in range(args.seeds):
                    out = runs / f"{toy}-{plan}-eps{eps:g}-s{seed}"
                    shutil.rmtree(out, ignore_errors=True)
                    cfg = TrainConfig(
                        method="drifting", target=toy, out=str(out), plan=plan, eps=[eps], backend=args.backend,
                        sinkhorn_iters=args.sinkhorn_iters, steps=args.steps, batch=args.batch, lr=args.lr,
                        seed=seed, threads=args.threads, eval_every=max(1, args.steps // 5), eval_points=1000,
                        checkpoint_every=args.steps, progress=False,
                    )
                    start = time.perf_counter()
                    train(cfg)
                    seconds += time.perf_counter() - start
                    values.append(evaluate(out, n=1000, seed=10_000 + seed)["w2"])
                    if seed == 0:
                        _, method, model = load_run(out)
                        ref, _ = method.target.eval_set(1000, 10_000)
                        samples[toy, plan, eps] = (sample_model(method, model, ref, None), ref)
                row = {"toy": toy, "plan": plan, "eps": eps, "w2": float(np.mean(values)), "w2_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "w2_all": values, "seconds_per_run": seconds / args.seeds}
                rows.append(row)
                print_table([row], ["toy", "plan", "eps", "w2", "w2_std", "seconds_per_run"])
    save("repro_toys", rows, vars(args))
    header = "| toy | plan | " + " | ".join(f"eps={e:g}" for e in args.eps) + " |"
    lines = [header, "|" + "---|" * (len(args.eps) + 2)]
    for toy in args.toys:
        for plan in args.plans:
            cells = [mean_std(next(r["w2_all"] for r in rows if (r["toy"], r["plan"], r["eps"]) == (toy, plan, e))) for e in args.eps]
            lines.append(f"| {toy} | {plan} | " + " | ".join(cells) + " |")
    note = f"\nW2^2 (exact) of 1000 EMA samples vs 1000 fresh target samples; {args.steps} steps, batch {args.batch}, lr {args.lr:g}, {args.seeds} seed(s).\n"
    (RESULTS / "repro_toys.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)
    keys = [(t, p) for t in args.toys for p in args.plans]
    fig = Figure(figsize=(2.2 * len(args.eps), 2.2 * len(keys)))
    axes = fig.subplots(len(keys), len(args.eps), squeeze=False)
    for i, (toy, plan) in enumerate(keys):
        for j, eps in enumerate(args.eps):
            gen, ref = samples[toy, plan, eps]
            scatter(axes[i, j], gen, ref, f"{toy} {plan} eps={eps:g}")
    fig.savefig(RESULTS / "repro_toys.png", dpi=120, bbox_inches="tight")
    print(f"wrote {RESULTS / 'repro_toys.md'} and {RESULTS / 'repro_toys.png'}")


if __name__ == "__main__":
    main()

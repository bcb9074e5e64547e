"""Class-conditional drifting on scikit-learn digits: one-sided vs Sinkhorn plan across temperatures.

Digits as PCA latents (``--latent-dim``, globally scaled to unit mean variance per dimension,
so a typical squared distance is about 2·D); temperatures are given as tau and used as
``eps = tau · D``. Each class's samples drift against that class's data only. Reports the class
accuracy of a classifier trained on real latents (RBF SVC), coverage, and W2^2 per class (exact,
generated vs real points of the class), averaged over classes; mean ± std over seeds. Writes
benchmarks/results/repro_digits.{json,md,png}.

    python benchmarks/repro_digits.py --steps 300     # ~6 minutes on one core
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
from driftops.train.commands import digit_grid, evaluate, sample_model  # noqa: E402


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", nargs="+", default=["one_sided", "sinkhorn"])
    parser.add_argument("--tau", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500, help="generated samples per step (split evenly over the 10 classes)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sinkhorn-iters", type=int, default=100)
    parser.add_argument("--backend", default="dense", help="dense is fastest for these per-class sizes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    runs = RESULTS / "runs" / "repro_digits"
    rows, grids = [], {}
    for plan in args.plans:
        for tau in args.tau:
            eps = tau * args.latent_dim
            stats: dict[str, list[float]] = {"accuracy": [], "coverage": [], "w2_class_mean": [], "w2": []}
            seconds = 0.0
            for seed in range(args.seeds):
                out = runs / f"{plan}-tau{tau:g}-s{seed}"
                shutil.rmtree(out, ignore_errors=True)
                cfg = TrainConfig(
                    method="drifting", target="digits", latent_dim=args.latent_dim, conditional=True, out=str(out),
                    plan=plan, eps=[eps], backend=args.backend, sinkhorn_iters=args.sinkhorn_iters, steps=args.steps,
                    batch=args.batch, target_batch=1797, lr=args.lr, seed=seed, threads=args.threads,
                    eval_every=max(1, args.steps // 5), eval_points=1797, checkpoint_every=args.steps, progress=False,
                )
                start = time.perf_counter()
                train(cfg)
                seconds += time.perf_counter() - start
                result = evaluate(out, n=1797, seed=10_000 + seed)
                for key in ("accuracy", "coverage", "w2"):
                    stats[key].append(result[key])
                stats["w2_class_mean"].append(float(np.mean(list(result["w2_per_class"].values()))))
                if seed == 0:
                    _, method, model = load_run(out)
                    ref, labels = method.target.eval_set(1797, 10_000)
                    grids[plan, tau] = digit_grid(method.target, sample_model(method, model, ref, labels), labels)
            row = {"plan": plan, "tau": tau, "eps": eps, **{k: float(np.mean(v)) for k, v in stats.items()}, "all": stats, "seconds_per_run": seconds / args.seeds}
            rows.append(row)
            print_table([row], ["plan", "tau", "eps", "accuracy", "coverage", "w2_class_mean", "w2", "seconds_per_run"])
    save("repro_digits", rows, vars(args))
    lines = ["| plan | tau (eps) | class accuracy | coverage | W2^2 per class (mean) | W2^2 all |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["all"]
        lines.append(f"| {r['plan']} | {r['tau']:g} ({r['eps']:g}) | {mean_std(s['accuracy'])} | {mean_std(s['coverage'])} | {mean_std(s['w2_class_mean'])} | {mean_std(s['w2'])} |")
    note = (
        f"\nDigits PCA latents D={args.latent_dim}, eps = tau * D; {args.steps} steps, batch {args.batch}, lr {args.lr:g}, "
        f"{args.seeds} seed(s); accuracy of an RBF SVC trained on real latents; 1797 generated vs 1797 real points.\n"
    )
    (RESULTS / "repro_digits.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)
    fig = Figure(figsize=(3 * len(args.tau), 3 * len(args.plans)))
    axes = fig.subplots(len(args.plans), len(args.tau), squeeze=False)
    for i, plan in enumerate(args.plans):
        for j, tau in enumerate(args.tau):
            axes[i, j].imshow(grids[plan, tau], cmap="gray_r", vmin=0, vmax=1)
            axes[i, j].set_title(f"{plan} tau={tau:g}", fontsize=9)
            axes[i, j].axis("off")
    fig.savefig(RESULTS / "repro_digits.png", dpi=120, bbox_inches="tight")
    print(f"wrote {RESULTS / 'repro_digits.md'} and {RESULTS / 'repro_digits.png'}")


if __name__ == "__main__":
    main()

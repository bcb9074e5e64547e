"""Class-conditional drifting on scikit-learn digits: one-sided vs Sinkhorn plan across temperatures, with seeds.

Digits as PCA latents (``--latent-dim``, globally scaled to unit mean variance per dimension, so a
typical squared distance is about 2·D); temperatures are given as tau and used as ``eps = tau · D``.
Each class's samples drift against that class's data only. Reports, mean ± std over seeds, the class
accuracy of an RBF SVC trained on real latents, coverage, and W2^2 per class (exact, generated vs real
points of the class) averaged over classes. Writes benchmarks/results/repro_digits.{json,md} and
repro_digits.png (decoded samples, one row per class, first seed). Resumable after a kill.

    python benchmarks/repro_digits.py                          # 4 tau x 2 plans x 3 seeds, 1500 steps
    python benchmarks/repro_digits.py --steps 10 --seeds 1 --tau 0.1 --name smoke
"""

from __future__ import annotations

import numpy as np
from repro_common import RESULTS, Store, grid_parser, mean_std, seed_list, train_resumable, write_markdown

from driftops import viz
from driftops.train import TrainConfig, evaluate, load_run, sample_model


def main() -> None:
    parser = grid_parser(__doc__, "repro_digits", seeds=3)
    parser.add_argument("--plans", nargs="+", default=["one_sided", "sinkhorn"])
    parser.add_argument("--tau", nargs="+", type=float, default=[0.005, 0.01, 0.05, 0.1])
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=500, help="generated samples per step (split evenly over the 10 classes)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sinkhorn-iters", type=int, default=100)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    store = Store(args.name)
    seeds = seed_list(args)
    for key, (plan, tau, seed) in store.pending(lambda p, t, s: f"{p}|{t:g}|{args.latent_dim}|{s}", args.plans, args.tau, seeds):
        out = RESULTS / "runs" / args.name / f"{plan}-tau{tau:g}-s{seed}"
        cfg = TrainConfig(
            method="drifting", target="digits", latent_dim=args.latent_dim, conditional=True, out=str(out),
            plan=plan, eps=[tau * args.latent_dim], backend=args.backend, sinkhorn_iters=args.sinkhorn_iters,
            steps=args.steps, batch=args.batch, target_batch=1797, lr=args.lr, seed=seed, threads=args.threads,
            eval_every=max(1, args.steps // 10), eval_points=1797, checkpoint_every=100, progress=False,
        )  # fmt: skip
        summary = train_resumable(cfg)
        result = evaluate(out, n=1797, seed=10_000 + seed)
        record = {k: result[k] for k in ("accuracy", "coverage", "w2")}
        record.update(plan=plan, tau=tau, seed=seed, w2_class_mean=float(np.mean(list(result["w2_per_class"].values()))), seconds=summary["seconds"])
        store.add(key, record)
        print(f"{key}: accuracy {record['accuracy']:.3f}, W2^2 per class {record['w2_class_mean']:.3f}", flush=True)
    pick = lambda p, t, k: [r[k] for r in store.records.values() if (r["plan"], r["tau"]) == (p, t) and r["seed"] in seeds]  # noqa: E731
    table = ["| plan | tau (eps) | class accuracy | coverage | W2^2 per class (mean) | W2^2 all |", "|---|---|---|---|---|---|"]
    for plan in args.plans:
        for tau in args.tau:
            cells = [mean_std(pick(plan, tau, k)) for k in ("accuracy", "coverage", "w2_class_mean", "w2")]
            table.append(f"| {plan} | {tau:g} ({tau * args.latent_dim:g}) | " + " | ".join(cells) + " |")
    protocol = (
        f"Digits PCA latents D={args.latent_dim}, eps = tau * D; {args.steps} steps, batch {args.batch}, lr {args.lr:g}, Sinkhorn "
        f"at most {args.sinkhorn_iters} iterations per drift; mean ± std over seeds {seeds[0]}..{seeds[-1]}; accuracy of an RBF "
        "SVC trained on real latents; 1797 generated vs 1797 real points."
    )
    write_markdown(args.name, "Class-conditional drifting on digits", table, protocol)
    fig_cells = {}
    for plan in args.plans:
        for tau in args.tau:
            if pick(plan, tau, "accuracy"):
                _, method, model = load_run(RESULTS / "runs" / args.name / f"{plan}-tau{tau:g}-s{seeds[0]}")
                ref, labels = method.target.eval_set(1797, 10_000)
                fig_cells[plan, tau] = viz.digit_grid(method.target.data.decode(sample_model(method, model, len(ref), labels)), labels)
    if fig_cells:
        viz.plot_image_grid({f"{p} tau={t:g}": img for (p, t), img in fig_cells.items()}, RESULTS / f"{args.name}.png", ncols=len(args.tau))


if __name__ == "__main__":
    main()

"""Sinkhorn flows from Gaussian noise to the 2D toy targets (the paper-scale ones; not the ``ffjord_`` copies): one
row per toy (start, middle, end), every step's Sinkhorn solve converged to the default tolerance.

    python examples/plot_flows_toys.py            # 1500 points, 12 steps per toy
    python examples/plot_flows_toys.py --quick    # 400 points, 6 steps
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import driftops
from driftops.data import TOYS, sample_toy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=Path(__file__).parent / "figures" / "flows_toys.png", type=Path)
    parser.add_argument("--quick", action="store_true", help="small and fast")
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args()
    n, steps = (400, 6) if args.quick else (1500, 12)

    names = [name for name in TOYS if not name.startswith("ffjord_")]
    fig, axes = plt.subplots(len(names), 3, figsize=(7.5, 2.5 * len(names)))
    for row, name in zip(axes, names):
        y = sample_toy(name, n, seed=1)
        x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
        res = driftops.flow(x0, y, steps=steps, step_size=1.0, eps=args.eps, metric_every=steps // 2, progress=False)
        lim = 1.15 * float(torch.cat([y, x0]).abs().max())
        for ax, step in zip(row, res.history["metric_step"]):
            pts = dict(res.snapshots)[step]
            ax.scatter(y[:, 0], y[:, 1], s=2, c="0.85", linewidths=0)
            ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", alpha=0.6, linewidths=0)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
            ax.set_title(f"{name}: step {step}, W2²={res.history['w2'][res.history['metric_step'].index(step)]:.3f}", fontsize=8)
        print(f"{name}: W2^2 {res.history['w2'][0]:.3f} -> {res.history['w2'][-1]:.4f} ({res.seconds:.0f} s)")
    fig.suptitle(f"Sinkhorn flows from N(0, I), eps={args.eps}, {n} points", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

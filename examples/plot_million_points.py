"""A Sinkhorn flow of 1,000,000 points in 2D (block-sparse backend), saved as a density image.

    python examples/plot_million_points.py              # 1M points, 3 steps (long on a CPU)
    python examples/plot_million_points.py --n 20000    # a smaller run
    python examples/plot_million_points.py --quick      # 20,000 points, 2 steps
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm
import torch

import driftops
from driftops.data import sample_toy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=Path(__file__).parent / "figures" / "million_points.png", type=Path)
    parser.add_argument("--quick", action="store_true", help="20,000 points, 2 steps")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--eps", type=float, default=0.05)
    args = parser.parse_args()
    n, steps = (20_000, 2) if args.quick else (args.n, args.steps)

    y = sample_toy("checkerboard", n, seed=1)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    res = driftops.flow(x0, y, steps=steps, step_size=1.0, eps=args.eps, backend="auto", tol=1e-2, metric_points=2000)
    w2 = res.history["w2"]
    print(f"{n} points: W2^2 (2000-point subsets) {w2[0]:.3f} -> {w2[-1]:.4f} in {res.seconds:.0f} s")

    bins = min(400, max(60, int(n**0.5 / 2)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax, pts, title in ((axes[0], y, "target"), (axes[1], res.x, f"after {res.steps} steps, W2²≈{w2[-1]:.3f}")):
        ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=bins, range=[[-4.5, 4.5], [-4.5, 4.5]], cmap="magma_r", norm=LogNorm(vmin=0.5), cmin=1)
        ax.set(aspect="equal", xticks=[], yticks=[], title=title)
    fig.suptitle(f"Sinkhorn flow of {n:,} points, eps={args.eps}", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

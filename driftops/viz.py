"""Figures of particle flows and trained runs (matplotlib, Agg backend; every ``plot_*``/``save_*`` function saves
a file and returns its path).

Flow panels use equal aspect and fixed limits taken from the target (or from the snapshots when no
target is given), small translucent markers, and titles with the step and the W2^2 estimate. Run
figures: generated points over target points, digit grids, and W2^2-vs-step curves with
mean ± std bands over seeds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402

from .errors import DriftopsError  # noqa: E402
from .files import atomic_path  # noqa: E402
from .flows import FlowResult  # noqa: E402

TARGET_STYLE = {"s": 2, "c": "0.7", "alpha": 0.5, "linewidths": 0, "rasterized": True}
PARTICLE_COLOR = "tab:blue"


def _np(points) -> np.ndarray:
    """(n, 2) numpy array of the first two coordinates."""
    arr = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DriftopsError(f"points to plot must have shape (n, D) with D >= 2, got {arr.shape}")
    return arr[:, :2]


def _limits(ref: np.ndarray, margin: float = 0.08) -> tuple[tuple[float, float], tuple[float, float]]:
    """Square axis limits around the 0.5%-99.5% quantile box of ``ref`` (n, 2)."""
    lo, hi = np.quantile(ref, 0.005, axis=0), np.quantile(ref, 0.995, axis=0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2 * (1 + 2 * margin) + 1e-9
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def _marker_size(n: int) -> float:
    return float(np.clip(2e3 / max(n, 1), 0.05, 4.0))


def _setup_axes(ax, lims) -> None:
    ax.set_xlim(*lims[0])
    ax.set_ylim(*lims[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _w2_at(result: FlowResult, step: int) -> float | None:
    hist = result.history
    return hist["w2"][hist["metric_step"].index(step)] if step in hist.get("metric_step", []) else None


def _title(result: FlowResult, step: int) -> str:
    w2 = _w2_at(result, step)
    return f"step {step}" + (f"  W2²={w2:.3g}" if w2 is not None else "")


def _check_result(result: FlowResult) -> None:
    if not isinstance(result, FlowResult) or not result.snapshots:
        raise DriftopsError("pass the FlowResult returned by driftops.flow (with at least one snapshot)")


def _reference(result: FlowResult, target) -> tuple[np.ndarray | None, np.ndarray]:
    """Target points (or None) and the points that fix the axis limits."""
    tgt = None if target is None else _np(target)
    return tgt, tgt if tgt is not None else np.concatenate([_np(s) for _, s in result.snapshots])


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _pick(snapshots: list, count: int) -> list:
    """``count`` snapshots evenly spread over the flow, first and last included."""
    idx = np.unique(np.linspace(0, len(snapshots) - 1, min(count, len(snapshots))).round().astype(int))
    return [snapshots[i] for i in idx]


def plot_snapshots(result: FlowResult, target=None, path="flow.png", panels: int = 6) -> Path:
    """One row of ``panels`` snapshots (first to last) over the target in light grey; returns the path."""
    _check_result(result)
    tgt, ref = _reference(result, target)
    lims = _limits(ref)
    chosen = _pick(result.snapshots, panels)
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.6 * len(chosen), 2.9), squeeze=False)
    for ax, (step, pts) in zip(axes[0], chosen):
        if tgt is not None:
            ax.scatter(tgt[:, 0], tgt[:, 1], **TARGET_STYLE)
        p = _np(pts)
        ax.scatter(p[:, 0], p[:, 1], s=_marker_size(len(p)), c=PARTICLE_COLOR, alpha=0.5, linewidths=0, rasterized=True)
        _setup_axes(ax, lims)
        ax.set_title(_title(result, step), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_trails(result: FlowResult, path="trails.png", n_trails: int = 300, target=None, seed: int = 0) -> Path:
    """Trajectories of ``n_trails`` random particles through the snapshots (start dots grey, end dots red)."""
    _check_result(result)
    stack = np.stack([_np(s) for _, s in result.snapshots])  # (T, n, 2)
    pick = np.random.default_rng(seed).choice(stack.shape[1], min(n_trails, stack.shape[1]), replace=False)
    trails = stack[:, pick]
    tgt, ref = _reference(result, target)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    if tgt is not None:
        ax.scatter(tgt[:, 0], tgt[:, 1], **TARGET_STYLE)
    ax.plot(trails[:, :, 0], trails[:, :, 1], color=PARTICLE_COLOR, alpha=0.35, linewidth=0.6)
    ax.scatter(trails[0, :, 0], trails[0, :, 1], s=5, c="0.4", linewidths=0, label="start")
    ax.scatter(trails[-1, :, 0], trails[-1, :, 1], s=5, c="tab:red", linewidths=0, label="end")
    _setup_axes(ax, _limits(np.concatenate([ref, trails[0]])))
    ax.legend(loc="upper right", fontsize=8, markerscale=2)
    ax.set_title(f"{len(pick)} trajectories over {result.snapshots[-1][0]} steps", fontsize=10)
    return _save(fig, path)


def plot_history(result: FlowResult, path="history.png") -> Path:
    """W2^2 to the target and mean drift norm (log scales) against the step; for Sinkhorn flows also the Sinkhorn
    iterations on the points and the marginal error reached at every step."""
    _check_result(result)
    hist = result.history
    sinkhorn = any(hist["sinkhorn_iterations"])
    fig, axes = plt.subplots(1, 3 if sinkhorn else 2, figsize=(13.5 if sinkhorn else 9, 3.4))
    ax_w, ax_v = axes[:2]
    if hist["w2"]:
        ax_w.plot(hist["metric_step"], hist["w2"], "o-", ms=3)
        ax_w.set_yscale("log")
    ax_w.set(xlabel="step", ylabel="W2² to target", title="W2² (subset estimate)")
    if hist["drift_norm"]:
        ax_v.plot(hist["step"], hist["drift_norm"], color="tab:orange")
        ax_v.set_yscale("log")
    ax_v.set(xlabel="step", ylabel="mean |V|", title="drift norm")
    if sinkhorn:
        ax_i = axes[2]
        ax_i.bar(hist["step"], hist["sinkhorn_iterations"], color="tab:green", alpha=0.6)
        ax_i.set(xlabel="step", ylabel="iterations on the points", title="Sinkhorn per step")
        ax_e = ax_i.twinx()
        ax_e.plot(hist["step"], hist["marginal_error"], ".", color="tab:red", ms=4)
        ax_e.set_yscale("log")
        ax_e.set_ylabel("marginal error (red)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)


def save_gif(result: FlowResult, path="flow.gif", target=None, fps: int = 10, max_points: int = 5000) -> Path:
    """Animated GIF with one frame per snapshot (at most ``max_points`` particles drawn)."""
    _check_result(result)
    tgt, ref = _reference(result, target)
    frames = [(step, _np(pts)[:max_points]) for step, pts in result.snapshots]
    fig, ax = plt.subplots(figsize=(4, 4))
    if tgt is not None:
        ax.scatter(tgt[:, 0], tgt[:, 1], **TARGET_STYLE)
    dots = ax.scatter(frames[0][1][:, 0], frames[0][1][:, 1], s=_marker_size(len(frames[0][1])), c=PARTICLE_COLOR, alpha=0.5, linewidths=0)
    _setup_axes(ax, _limits(ref))
    title = ax.set_title(_title(result, frames[0][0]), fontsize=10)

    def draw(i: int):
        dots.set_offsets(frames[i][1])
        title.set_text(_title(result, frames[i][0]))
        return dots, title

    path = Path(path)
    with atomic_path(path) as tmp:
        FuncAnimation(fig, draw, frames=len(frames), blit=False).save(tmp, writer=PillowWriter(fps=fps), dpi=80)
    plt.close(fig)
    return path


def plot_compare(results: dict[str, FlowResult], target, path="compare.png") -> Path:
    """Final particles of several flows side by side (one panel per name) over the target."""
    if not results:
        raise DriftopsError("results is empty; pass a dict {name: FlowResult}")
    for r in results.values():
        _check_result(r)
    tgt = _np(target)
    lims = _limits(tgt)
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(3 * (len(results) + 1), 3.3), squeeze=False)
    axes[0, 0].scatter(tgt[:, 0], tgt[:, 1], s=_marker_size(len(tgt)), c="0.3", alpha=0.5, linewidths=0, rasterized=True)
    axes[0, 0].set_title("target", fontsize=10)
    _setup_axes(axes[0, 0], lims)
    for ax, (name, r) in zip(axes[0, 1:], results.items()):
        step, pts = r.snapshots[-1]
        p = _np(pts)
        ax.scatter(tgt[:, 0], tgt[:, 1], **TARGET_STYLE)
        ax.scatter(p[:, 0], p[:, 1], s=_marker_size(len(p)), c=PARTICLE_COLOR, alpha=0.5, linewidths=0, rasterized=True)
        _setup_axes(ax, lims)
        ax.set_title(f"{name}\n{_title(r, step)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def scatter_panel(ax, generated, target, title: str = "", lims=None) -> None:
    """Draw generated points (orange) over target points (grey) on ``ax``, first two coordinates, equal aspect."""
    t, g = _np(target), _np(generated)
    ax.scatter(t[:, 0], t[:, 1], **TARGET_STYLE)
    ax.scatter(g[:, 0], g[:, 1], s=_marker_size(len(g)), c="tab:orange", alpha=0.6, linewidths=0, rasterized=True)
    _setup_axes(ax, lims or _limits(t))
    ax.set_title(title, fontsize=9)


def digit_grid(images: np.ndarray | torch.Tensor, labels=None, num_classes: int = 10, per_class: int = 10) -> np.ndarray:
    """A canvas of 8x8 images (K, 8, 8) in [0, 1] with 1-pixel gaps: one row per class when ``labels`` (K,) is given,
    else rows of ``per_class`` images."""
    images = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if labels is None:
        rows = [images[i : i + per_class] for i in range(0, min(len(images), per_class * per_class), per_class)]
    else:
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        rows = [images[lab == k][:per_class] for k in range(num_classes)]
    canvas = np.zeros((9 * len(rows) + 1, 9 * per_class + 1))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas[1 + 9 * r : 9 * r + 9, 1 + 9 * c : 9 * c + 9] = img
    return canvas


def save_run_figures(run_dir, generated, target, records: list[dict], labels=None, decode=None) -> list[Path]:
    """A run's figures in ``run_dir``: ``samples.png`` (generated (N, D) over target (M, D)), ``digits.png`` when
    ``decode`` maps points to (K, 8, 8) images, ``curves.png`` (training loss and W2^2 of the log ``records``,
    dicts with ``step`` and optional ``loss``, ``w2``, as :func:`driftops.train.read_metrics` returns)."""
    run_dir = Path(run_dir)
    fig, ax = plt.subplots(figsize=(4, 4))
    scatter_panel(ax, generated, target, "generated over target" + (" (first 2 coordinates)" if generated.shape[1] > 2 else ""))
    paths = [_save(fig, run_dir / "samples.png")]
    if decode is not None:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(digit_grid(decode(generated), labels), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
        paths.append(_save(fig, run_dir / "digits.png"))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("loss", "w2")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts))
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("training loss" if key == "loss" else "W2² of the evaluated model")
    fig.tight_layout()
    paths.append(_save(fig, run_dir / "curves.png"))
    return paths


def plot_curve_bands(panels: dict[str, dict[str, tuple]], path, xlabel: str | dict[str, str] = "step", ylabel: str = "W2²", ncols: int | None = None) -> Path:
    """Curves with mean ± std bands, one subplot per panel (like the Sinkhorn-drifting paper's Figure 2).

    ``panels``: ``{panel title: {curve label: (x (T,), runs (S, T))}}``; each curve is the mean over
    the S runs with a shaded band of ± one standard deviation; log-scale y; a curve of fewer than 3 points is
    also marked point by point (a line alone would not show one). ``xlabel``: one label, or one per panel title.
    Legends of more than 3 curves sit under their panel, clear of the curves.
    """
    if not panels:
        raise DriftopsError("panels is empty; pass {title: {label: (x, runs)}}")
    ncols = ncols or min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    most = max(len(curves) for curves in panels.values())
    below = most > 3
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, (3.2 + 0.2 * most * below) * nrows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels.items()):
        for label, (x, runs) in curves.items():
            runs = np.atleast_2d(np.asarray(runs, dtype=float))
            mean, std = runs.mean(0), runs.std(0)
            (line,) = ax.plot(x, mean, label=label, lw=1.4, marker="o" if len(mean) < 3 else None, ms=5)
            if len(runs) > 1:
                ax.fill_between(x, np.maximum(mean - std, mean * 1e-3), mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel[title] if isinstance(xlabel, dict) else xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, **(dict(loc="upper center", bbox_to_anchor=(0.5, -0.22)) if below else {}))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_scatter_grid(cells: dict[tuple[str, str], tuple], path, row_names: list[str], col_names: list[str]) -> Path:
    """A grid of generated-over-target scatters: ``cells[(row, col)] = (generated (N, 2), target (M, 2), caption)``.

    Row names label the rows on the left, column names head the columns; each panel's own caption
    (e.g. its W2^2) sits under it, so no title overlaps a neighbour. Missing cells are left blank.
    """
    if not cells:
        raise DriftopsError("cells is empty; pass {(row, col): (generated, target, caption)}")
    fig, axes = plt.subplots(len(row_names), len(col_names), figsize=(2.4 * len(col_names), 2.5 * len(row_names)), squeeze=False)
    for i, row in enumerate(row_names):
        for j, col in enumerate(col_names):
            ax = axes[i, j]
            if (row, col) not in cells:
                ax.axis("off")
                continue
            gen, tgt, caption = cells[row, col]
            scatter_panel(ax, gen, tgt)
            ax.set_xlabel(caption, fontsize=8)
            if i == 0:
                ax.set_title(col, fontsize=10)
            if j == 0:
                ax.set_ylabel(row, fontsize=10)
    fig.tight_layout(h_pad=1.2, w_pad=0.6)
    return _save(fig, path)


def plot_image_grid(images: dict[str, np.ndarray], path, ncols: int = 4) -> Path:
    """Grey-scale images (H, W) in [0, 1] (e.g. :func:`digit_grid` canvases), one titled panel each."""
    if not images:
        raise DriftopsError("images is empty; pass {title: (H, W) array}")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3.3 * nrows), squeeze=False)
    for ax, (title, img) in zip(axes.flat, images.items()):
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)

"""The ``driftops train`` and ``driftops eval`` subcommands, run evaluation and figures.

``driftops train`` exposes every :class:`TrainConfig` field as ``--field-name``; ``driftops eval
RUN_DIR`` samples the EMA model and writes ``eval.json``, ``samples.png``, ``curves.png`` and,
for digits, ``digits.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..backends import BACKENDS
from ..costs import COSTS
from ..metrics import class_metrics, mmd, sinkhorn_w2, train_classifier, w2
from ..plans import PLANS
from . import METHODS, load_run, train
from .common import DTYPES, Target, TrainConfig, atomic_write_text, read_metrics

EXACT_W2_POINTS = 5000

HELP = {
    "method": "training method",
    "target": "toy name (checkerboard, 8gaussians, moons, spiral, swiss_roll, rings), 'digits' or a .npy/.npz file",
    "out": "run folder (None: runs/METHOD-TARGET-PLAN-sSEED)",
    "plan": "transport plan of the drift",
    "eps": "temperature(s); several are normalised and summed (drifting, nsgf)",
    "cost": "cost c(x, y): sqeuclidean (Gaussian kernel) or euclidean (Laplacian kernel)",
    "backend": "reduction backend of the drift",
    "sinkhorn_tol": "Sinkhorn stopping tolerance (L1 marginal error)",
    "sinkhorn_iters": "Sinkhorn iteration cap (20 in the Sinkhorn-drifting paper)",
    "steps": "optimiser steps",
    "batch": "samples per round (drifting: the no-grad drift batch; nsgf: flow particles)",
    "minibatch": "samples per optimiser step (None: batch)",
    "target_batch": "target points per round (None: batch; split over classes when conditional)",
    "flow_steps": "drift steps per round (drifting) or flow steps of the pool (nsgf)",
    "step_size": "drift step size",
    "sample_steps": "Euler steps when sampling an nsgf model (None: flow steps)",
    "scaling": "GeomLoss eps-annealing ratio (sinkhorn_loss)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup": "linear learning-rate warmup steps",
    "grad_clip": "gradient norm clip (0 disables)",
    "ema": "EMA decay of the evaluated weights (0 disables)",
    "noise_dim": "generator noise dimension",
    "hidden": "hidden width of the residual MLP",
    "blocks": "residual blocks of the MLP",
    "latent_dim": "digits only: train on PCA latents of this dimension",
    "conditional": "class-conditional training (per-class drift against class data only)",
    "seed": "random seed",
    "device": "torch device",
    "dtype": "floating point type",
    "threads": "torch CPU threads (1 is fastest on a busy machine)",
    "log_every": "log to metrics.jsonl every this many steps",
    "eval_every": "exact W2^2 of EMA samples every this many steps (0: never)",
    "eval_points": "points of that W2^2 evaluation",
    "checkpoint_every": "checkpoint every this many steps",
}
CHOICES = {"method": list(METHODS), "plan": list(PLANS), "cost": list(COSTS), "backend": list(BACKENDS), "dtype": list(DTYPES)}
TYPES = {"str": str, "int": int, "float": float, "int | None": int, "float | None": float, "list[float]": float}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--field-name`` option per :class:`TrainConfig` field, plus ``--resume`` and ``--no-progress``."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
        elif f.type == "bool":
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
        else:
            default = None if f.name == "out" else (f.default_factory() if callable(f.default_factory) else f.default)
            parser.add_argument(
                flag, type=TYPES[f.type], default=default, choices=CHOICES.get(f.name),
                nargs="+" if f.type.startswith("list") else None, help=HELP[f.name],
            )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return parser


def run_train(args: argparse.Namespace) -> dict:
    """Train from parsed arguments; write figures of the final EMA model; return the summary."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["out"] is None:
        values["out"] = f"runs/{values['method']}-{Path(values['target']).stem}-{values['plan']}-s{values['seed']}"
    cfg = TrainConfig(**values)
    summary = train(cfg, resume=args.resume)
    _, method, model = load_run(cfg.out)
    x, labels = method.target.eval_set(cfg.eval_points, cfg.seed + 1)
    save_figures(cfg.out, method.target, sample_model(method, model, x, labels), x, labels if cfg.conditional else None)
    print(json.dumps(summary, indent=2))
    print(f"run folder: {cfg.out}; evaluate with `driftops eval {cfg.out}`")
    return summary


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``driftops eval RUN_DIR``."""
    parser.add_argument("run_dir", help="a run folder written by `driftops train`")
    parser.add_argument("--n", type=int, default=1000, help="generated and target points (exact W2^2 up to 5000)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the evaluation samples")
    parser.add_argument("--device", default=None, help="torch device (None: the run's)")
    return parser


def run_eval(args: argparse.Namespace) -> dict:
    """Evaluate a run folder from parsed arguments; print and return ``eval.json``'s content."""
    result = evaluate(args.run_dir, args.n, args.seed, args.device)
    print(json.dumps(result, indent=2))
    return result


def sample_model(method, model, x_ref: torch.Tensor, labels: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    """As many samples (N, D) as ``x_ref`` has rows, with its labels when the run is conditional."""
    with torch.no_grad():
        return method.sample(model, len(x_ref), labels if method.cfg.conditional else None, torch.Generator().manual_seed(seed))


def evaluate(run_dir: str | Path, n: int = 1000, seed: int = 1000, device: str | None = None) -> dict:
    """W2^2 (exact for n <= 5000, else Sinkhorn), MMD^2 and, for class data, accuracy/coverage and per-class W2^2.

    Compares n EMA samples with n fresh target points (or min(n, N) data points, labels preserved);
    writes ``eval.json`` and the figures into ``run_dir``.
    """
    cfg, method, model = load_run(run_dir, device)
    target = method.target
    x, labels = target.eval_set(n, seed)
    gen = sample_model(method, model, x, labels, seed)
    exact = len(x) <= EXACT_W2_POINTS
    result = {"n": len(x), "w2": w2(gen, x) if exact else sinkhorn_w2(gen, x), "w2_exact": exact, "mmd": mmd(gen, x)}
    if target.data is not None and target.num_classes >= 2:
        clf = train_classifier(target.data)
        result["classifier_accuracy_on_real"] = clf.accuracy
        if cfg.conditional:
            result.update(class_metrics(gen, labels, clf))
            result["w2_per_class"] = {c: w2(gen[labels == k], x[labels == k]) for k, c in enumerate(target.data.classes)}
        else:
            result["coverage"] = class_metrics(gen, clf.predict(gen), clf)["coverage"]
    atomic_write_text(Path(run_dir) / "eval.json", json.dumps(result, indent=2) + "\n")
    save_figures(run_dir, target, gen, x, labels if cfg.conditional else None)
    return result


def digit_grid(target: Target, points: torch.Tensor, labels: torch.Tensor | None, per_class: int = 10) -> np.ndarray:
    """An image of decoded digits: one row per class (or rows of 10 when unconditional), 8x8 tiles with 1-pixel gaps."""
    images = target.data.decode(points.cpu().float()).numpy()
    if labels is None:
        rows = [images[i : i + per_class] for i in range(0, min(len(images), per_class * per_class), per_class)]
    else:
        rows = [images[(labels == k).cpu().numpy()][:per_class] for k in range(target.num_classes)]
    canvas = np.zeros((9 * len(rows) + 1, 9 * per_class + 1))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas[1 + 9 * r : 9 * r + 9, 1 + 9 * c : 9 * c + 9] = img
    return canvas


def scatter(ax, generated: torch.Tensor, target_pts: torch.Tensor, title: str = "") -> None:
    """Generated points (orange) over target points (grey), first two coordinates."""
    t, g = target_pts.detach().cpu().float().numpy(), generated.detach().cpu().float().numpy()
    ax.scatter(t[:, 0], t[:, 1], s=2, c="0.6", alpha=0.5, label="target")
    ax.scatter(g[:, 0], g[:, 1], s=2, c="tab:orange", alpha=0.6, label="generated")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def save_figures(run_dir: str | Path, target: Target, generated: torch.Tensor, target_pts: torch.Tensor, labels: torch.Tensor | None) -> None:
    """``samples.png`` (scatter over the target), ``digits.png`` for digits, ``curves.png`` (loss, W2^2) in ``run_dir``."""
    run_dir = Path(run_dir)
    fig = Figure(figsize=(4, 4))
    scatter(fig.add_subplot(), generated, target_pts, "generated over target" + (" (first 2 coordinates)" if target.dim > 2 else ""))
    fig.savefig(run_dir / "samples.png", dpi=150, bbox_inches="tight")
    if target.spec == "digits":
        fig = Figure(figsize=(4, 4))
        ax = fig.add_subplot()
        ax.imshow(digit_grid(target, generated, labels), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
        fig.savefig(run_dir / "digits.png", dpi=150, bbox_inches="tight")
    records = read_metrics(run_dir)
    fig = Figure(figsize=(8, 3))
    for ax, key in zip(fig.subplots(1, 2), ("loss", "w2")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts))
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("training loss" if key == "loss" else "W2^2 of EMA samples")
    fig.savefig(run_dir / "curves.png", dpi=150, bbox_inches="tight")

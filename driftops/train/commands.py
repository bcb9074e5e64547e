"""The ``driftops train``, ``driftops eval`` and ``driftops sample`` subcommands.

``driftops train`` exposes every :class:`TrainConfig` field as ``--field-name`` (``--preset paper``
sets the Sinkhorn-drifting paper's protocol; flags given override it) and trains distributed under
``torchrun --nproc-per-node K -m driftops train ...``; ``driftops eval RUN_DIR``
samples the trained model and writes ``eval.json``, ``samples.png``, ``curves.png`` and, for
digits, ``digits.png``; ``driftops sample RUN_DIR --n N --out file.npy`` writes samples.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

from ..backends import BACKENDS
from ..costs import COSTS
from ..data import TOYS, TOY_ALIASES
from ..models import ARCHITECTURES
from ..parallel import Launch
from ..plans import PLANS
from ..viz import save_run_figures
from .api import EXACT_W2_POINTS, METHODS, draw_samples, evaluate, load_run, sample_model, save_samples, train
from .config import DTYPES, PRESETS, TrainConfig
from .storage import read_metrics

HELP = {
    "method": "training method",
    "target": f"toy ({', '.join(TOYS)}; or {', '.join(TOY_ALIASES)}), 'digits' or a .npy/.npz file",
    "source": "nsgf: where the flow starts, 'gaussian' (N(0, I)) or a 2D toy",
    "out": "run folder (None: runs/METHOD-TARGET-PLAN-sSEED)",
    "plan": "transport plan of the drift",
    "eps": "temperature(s); several are normalised and summed (drifting, nsgf)",
    "cost": "cost c(x, y): sqeuclidean (Gaussian kernel) or euclidean (Laplacian kernel)",
    "backend": "reduction backend of the drift",
    "sinkhorn_tol": "Sinkhorn stopping tolerance (L1 marginal error)",
    "sinkhorn_iters": "Sinkhorn iteration cap (20 in the Sinkhorn-drifting paper)",
    "sinkhorn_acceleration": "Sinkhorn over-relaxation: adaptive, fixed or none (see driftops.Sinkhorn)",
    "sinkhorn_newton": "plan entries per row of a sparse Newton finish of Sinkhorn on the points (0: none; None: 128 at low eps for backends auto and sparse in D <= 3, else none; see driftops.Sinkhorn)",
    "sinkhorn_warm": "start each round's Sinkhorn solve from the previous round's potentials carried to the new points "
    "(measured slower than a cold multiscale start at batch 1024: off by default)",
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
    "arch": "generator body: compact (one hidden layer per block) or wide (the paper's h -> 2h -> h blocks)",
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
CHOICES = {"method": list(METHODS), "plan": list(PLANS), "cost": list(COSTS), "backend": list(BACKENDS), "dtype": list(DTYPES), "arch": list(ARCHITECTURES)}
TYPES = {"str": str, "int": int, "float": float, "int | None": int, "float | None": float, "list[float]": float}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--preset``, one ``--field-name`` option per :class:`TrainConfig` field, ``--resume`` and ``--no-progress``.

    Options left out keep the preset's value, or the field's default (shown in the help).
    """
    parser.add_argument("--preset", choices=list(PRESETS), default=None, help="start from named settings: paper = the Sinkhorn-drifting paper's toy protocol")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if callable(f.default_factory) else f.default
        if f.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS, help="hide the progress bar")
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=HELP[f.name])
        else:
            shown = "runs/METHOD-TARGET-PLAN-sSEED" if f.name == "out" else default
            parser.add_argument(
                flag, type=TYPES[f.type], default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                nargs="+" if f.type.startswith("list") else None, help=f"{HELP[f.name]} (default: {shown})",
            )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``driftops train`` arguments: field defaults, then the preset, then the flags given."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values = {**(PRESETS[args.preset] if args.preset else {}), **{k: getattr(args, k) for k in names if hasattr(args, k)}}
    if "out" not in values:
        values["out"] = f"runs/{values.get('method', 'drifting')}-{Path(values.get('target', 'checkerboard')).stem}-{values.get('plan', 'sinkhorn')}-s{values.get('seed', 0)}"
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> dict:
    """Train from parsed arguments; write figures of the final model; return the summary.

    Under ``torchrun --nproc-per-node K`` (or ``--nnodes``) every process joins the launch's group
    (:meth:`Launch.from_env`) and trains its share of each batch; rank 0 writes the folder and the figures.
    """
    cfg = config_from_args(args)
    launch = Launch.from_env(cfg.device)
    with launch.joined() if launch is not None else contextlib.nullcontext():
        summary = train(cfg, resume=args.resume, group=launch)
    if launch is not None and launch.rank != 0:
        return summary
    _, method, model = load_run(cfg.out)
    target = method.target
    x, labels = target.eval_set(cfg.eval_points, cfg.seed + 1)
    generated = sample_model(method, model, len(x), labels)
    save_run_figures(cfg.out, generated, x, read_metrics(cfg.out), labels if cfg.conditional else None, target.data.decode if target.data is not None else None)
    print(json.dumps(summary, indent=2))
    print(f"run folder: {cfg.out}; evaluate with `driftops eval {cfg.out}`")
    return summary


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``driftops eval RUN_DIR``."""
    parser.add_argument("run_dir", help="a run folder written by `driftops train`")
    parser.add_argument("--n", type=int, default=1000, help=f"generated and reference points (exact W2^2 up to {EXACT_W2_POINTS})")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the evaluation samples")
    parser.add_argument("--device", default=None, help="torch device (None: the run's)")
    parser.add_argument(
        "--target-file", default=None,
        help="held-out reference points (.npy, or .npz with one array per class named as the run's classes) instead of the run's target",
    )  # fmt: skip
    return parser


def run_eval(args: argparse.Namespace) -> dict:
    """Evaluate a run folder from parsed arguments; print and return ``eval.json``'s content."""
    result = evaluate(args.run_dir, args.n, args.seed, args.device, args.target_file)
    print(json.dumps(result, indent=2))
    return result


def add_sample_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``driftops sample RUN_DIR --n N --out FILE``."""
    parser.add_argument("run_dir", help="a run folder written by `driftops train`")
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--out", required=True, help="output file: .npy (one (n, D) float32 array) or .npz (one array per class)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator's noise")
    parser.add_argument("--device", default=None, help="torch device (None: the run's)")
    return parser


def run_sample(args: argparse.Namespace) -> int:
    """Write ``args.n`` samples of a trained run to ``args.out``; returns 0."""
    _, method, model = load_run(args.run_dir, args.device)
    points, labels = draw_samples(method, model, args.n, args.seed)
    classes = method.target.data.classes if labels is not None else None
    path = save_samples(args.out, points, labels, classes)
    print(f"wrote {args.n} samples of shape {tuple(points.shape)} to {path}")
    return 0

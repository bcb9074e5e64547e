"""The ``driftops`` command: ``flow``, ``bench``, ``train``, ``eval``, ``sample`` and ``warmup`` subcommands.

Bad arguments print one line ``driftops <cmd>: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import __version__
from .backends import BACKENDS
from .costs import COSTS
from .data import TOY_ALIASES, TOYS, resolve_target
from .errors import DivergenceError, DriftopsError
from .files import atomic_write_bytes, atomic_write_text
from .plans import PLANS
from .sinkhorn import ACCELERATIONS, Sinkhorn

BENCHMARKS = ("drift", "sparse", "flow")
BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
# Default demo: Gaussian noise to the checkerboard (`driftops flow` without arguments), every step's Sinkhorn solve
# converged to tol (max_iter is a safety net): the potentials and the over-relaxation factor carry over from step to step.
DEMO = {"n": 20000, "eps": 0.01, "steps": 20, "step_size": 1.0, "tol": 1e-3, "max_iter": 1000}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {what}, got {text}")
        return value

    return parse


positive_int = _positive(int, "integer")
positive_float = _positive(float, "number")


def _target_spec(text: str) -> str:
    try:
        return resolve_target(text)
    except DriftopsError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_flow(sub) -> None:
    p = sub.add_parser(
        "flow",
        help="run a particle flow toward a target and save figures",
        description="Flow source particles toward a target along the drift field and write config.json, "
        "metrics.json, particles.npy, flow.png, trails.png, history.png and flow.gif into --out. "
        "Without arguments: the checkerboard demo (20,000 points, 20 steps, eps 0.01, every step's Sinkhorn "
        "solve converged to tol 1e-3). Under torchrun (torchrun --nproc-per-node K -m driftops "
        "flow ...) each rank flows its slice of the particles (Gloo on CPU, NCCL on CUDA; local ranks divide the "
        "machine's cores) and rank 0 writes the outputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--target", type=_target_spec, default="checkerboard", help=f"toy ({', '.join(TOYS)}; or {', '.join(TOY_ALIASES)}), 'digits' or a .npy/.npz file")
    p.add_argument("--source", type=lambda s: s if s == "gaussian" else _target_spec(s), default="gaussian", help="'gaussian' (standard normal noise) or a target spec")
    p.add_argument(
        "--n", "--points", dest="n", type=positive_int, default=DEMO["n"],
        help="number of particles and of target points (under torchrun write --points: torchrun reads --n as its own --nnodes)",
    )  # fmt: skip
    p.add_argument("--plan", choices=PLANS, default="sinkhorn", help="transport plan of the drift")
    p.add_argument("--eps", type=positive_float, default=DEMO["eps"], help="temperature")
    p.add_argument("--steps", type=positive_int, default=DEMO["steps"], help="number of Euler steps")
    p.add_argument("--step-size", type=positive_float, default=DEMO["step_size"], help="Euler step size")
    p.add_argument("--cost", choices=COSTS, default="sqeuclidean")
    p.add_argument("--backend", choices=list(BACKENDS), default="auto")
    p.add_argument("--tol", type=positive_float, default=DEMO["tol"], help="Sinkhorn L1 marginal error at which to stop")
    p.add_argument("--max-iter", type=positive_int, default=DEMO["max_iter"], help="Sinkhorn iterations per step at most (a safety net)")
    p.add_argument("--acceleration", choices=ACCELERATIONS, default="adaptive", help="Sinkhorn over-relaxation (see driftops.Sinkhorn)")
    p.add_argument("--newton", type=int, default=None, help="plan entries per row of a sparse Newton finish of Sinkhorn (0: none; default: 128 at low eps for backends auto and sparse in D <= 3, else none; see driftops.Sinkhorn)")
    p.add_argument("--snapshot-every", type=positive_int, default=None, help="steps between snapshots (default: about 50 snapshots)")
    p.add_argument("--metric-every", type=positive_int, default=None, help="steps between W2^2 estimates (default: about 10 of them)")
    p.add_argument("--out", default="runs/flow", help="output folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the source, the target and the metric subsets")
    p.add_argument("--threads", type=positive_int, default=None, help="threads of the reductions (default: one per usable core)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run_flow)


def run_flow(args: argparse.Namespace) -> int:
    """Run ``driftops flow`` with parsed arguments; returns the exit status."""
    from .parallel import Launch

    device = _device(args.device)
    launch = Launch.from_env(device)
    with launch.joined() if launch is not None else contextlib.nullcontext():
        return _flow(args, device, launch)


def _flow(args: argparse.Namespace, device: str, launch) -> int:
    """The flow of ``driftops flow`` on this process (one rank's slices under torchrun; ``launch`` None alone)."""
    from . import viz
    from .backends.formulas import job_formulas, warmup
    from .data import load_target
    from .flows import flow
    from .parallel import Comm
    from .threads import set_threads

    dtype = getattr(torch, args.dtype)
    y = load_target(args.target, args.n, seed=args.seed)[0].to(device=device, dtype=dtype)
    if args.source == "gaussian":
        x0 = torch.randn(args.n, y.shape[1], generator=torch.Generator().manual_seed(args.seed + 1)).to(device=device, dtype=dtype)
    else:
        x0 = load_target(args.source, args.n, seed=args.seed + 1)[0].to(device=device, dtype=dtype)
    if x0.shape[1] != y.shape[1]:
        raise DriftopsError(f"--source has dimension {x0.shape[1]} but --target has {y.shape[1]}; pass clouds of the same dimension")

    group, world = (None, 1) if launch is None else (launch.group, launch.world_size)
    shown = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[:20000].to(y.device)].cpu()
    if launch is not None:
        x0, y = x0.tensor_split(world)[launch.rank], y.tensor_split(world)[launch.rank]
    writer = launch is None or launch.rank == 0
    args.metric_every = args.metric_every or max(1, round(args.steps / 10))  # recorded in config.json as used
    out = Path(args.out)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "func"} | {"device": device, "version": __version__, "world_size": world}
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    if args.threads is not None:
        set_threads(args.threads)
    warmup(job_formulas(y.shape[1], dtype, args.cost, [args.plan], args.backend, device, newton=args.newton), progress=args.progress and writer)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sinkhorn did not reach", RuntimeWarning)  # reported below
        result = flow(
            x0, y, steps=args.steps, step_size=args.step_size, eps=args.eps, plan=args.plan, cost=args.cost, backend=args.backend,
            solver=Sinkhorn(tol=args.tol, max_iter=args.max_iter, acceleration=args.acceleration, newton=args.newton),
            snapshot_every=args.snapshot_every, metric_every=args.metric_every,
            progress=args.progress, seed=args.seed,
            group=group,
        )  # fmt: skip
    wall = time.perf_counter() - start
    particles = Comm(group).gather(result.x)
    if not writer:
        return 0
    metrics = {"final_w2": result.history["w2"][-1], "initial_w2": result.history["w2"][0], "wall_time": wall, "steps": result.steps}
    atomic_write_text(out / "metrics.json", json.dumps(metrics | {"history": result.history}, indent=2) + "\n")
    atomic_write_bytes(out / "particles.npy", lambda fh: np.save(fh, particles.cpu().numpy()))
    paths = [
        viz.plot_snapshots(result, shown, out / "flow.png"),
        viz.plot_trails(result, out / "trails.png", target=shown),
        viz.plot_history(result, out / "history.png"),
        viz.save_gif(result, out / "flow.gif", target=shown),
    ]
    print(f"W2^2 {metrics['initial_w2']:.4g} -> {metrics['final_w2']:.4g} in {result.steps} steps, {wall:.1f} s")
    if args.plan == "sinkhorn":
        errors = result.history["marginal_error"]
        above = sum(e >= args.tol for e in errors)
        its = result.history["sinkhorn_iterations"]
        print(
            f"Sinkhorn: {sum(its)} iterations on the points in all ({max(its)} at most in a step), marginal error "
            f"{max(errors):.2g} at most; {above} of {result.steps} steps stopped above --tol {args.tol:g}"
            + (f" (raise --max-iter {args.max_iter})" if above else "")
        )
    print("wrote " + ", ".join(str(p) for p in [out / "config.json", out / "metrics.json", out / "particles.npy", *paths]))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark script of the repository's benchmarks/ folder",
        description=f"Run benchmarks/bench_<name>.py of the driftops source checkout ({BENCH_DIR}); "
        "arguments after the name (or after --) are passed to the script.",
    )
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for the script (e.g. -- --quick)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/bench_<name>.py`` in a subprocess; returns its exit status."""
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        raise DriftopsError(
            f"benchmark script {script} not found; `driftops bench` needs a source checkout of driftops "
            "(clone the repository and install it with pip install -e .)"
        )
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    return subprocess.call([sys.executable, str(script), *extra])


def _add_warmup(sub) -> None:
    p = sub.add_parser(
        "warmup",
        help="compile the KeOps kernels a job needs (once per machine)",
        description="Compile, once per machine, the KeOps kernels of jobs on D-dimensional clouds (listed in "
        "driftops.backends.formulas), so that no compilation pauses a later run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dim", type=positive_int, nargs="+", default=[2], help="point dimensions")
    p.add_argument("--dtype", choices=("float32", "float64"), nargs="+", default=["float32"])
    p.add_argument("--cost", choices=COSTS, nargs="+", default=["sqeuclidean"])
    p.add_argument("--plan", choices=PLANS, nargs="+", default=list(PLANS), help="plans (masked kernels for one/two-sided)")
    p.add_argument("--backend", choices=[b for b in BACKENDS if b != "dense"], nargs="+", default=["auto"])
    p.add_argument("--grad", action="store_true", help="also the kernels of differentiable drifts (dense-lazy, with their gradient kernels)")
    p.add_argument("--newton", type=int, default=None, help="the top-k kernel of a Newton finish keeping this many entries per row (0: none; default: the solver's, 128 for backends auto and sparse in D <= 3)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=run_warmup)


def run_warmup(args: argparse.Namespace) -> int:
    """Run ``driftops warmup`` with parsed arguments; returns the exit status."""
    from .backends.formulas import job_formulas, warmup

    device = _device(args.device)
    formulas = [
        f for dim in args.dim for dtype in args.dtype for cost in args.cost for backend in args.backend for grad in {False, args.grad}
        for f in job_formulas(dim, dtype, cost, args.plan, backend, device, grad, args.newton)
    ]  # fmt: skip
    done = warmup(formulas)
    print(f"{len(done)} KeOps kernels compiled, {len(set(formulas)) - len(done)} already there")
    return 0


def _device(name: str) -> str:
    """"cpu" or "cuda" for a --device choice ("auto": cuda when available)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DriftopsError("--device cuda was asked but no CUDA device is available; pass --device cpu or auto")
    return name


def _add_training(sub) -> None:
    """Register ``train`` and ``eval`` from driftops.train.commands (or stubs explaining why they are unavailable)."""
    try:
        from .train.commands import add_eval_arguments, add_sample_arguments, add_train_arguments, run_eval, run_sample, run_train
    except Exception as err:  # the rest of the CLI must work even if the training code does not import
        reason = f"{type(err).__name__}: {err}"
        for name in ("train", "eval", "sample"):
            p = sub.add_parser(name, help=f"(unavailable: {reason})", description=f"unavailable: driftops.train.commands failed to import ({reason})")
            p.set_defaults(func=lambda args, reason=reason: _unavailable(reason))
        return
    for name, add, run, text in (
        ("train", add_train_arguments, run_train, "train a generator"),
        ("eval", add_eval_arguments, run_eval, "evaluate a trained run"),
        ("sample", add_sample_arguments, run_sample, "write samples of a trained run to a .npy/.npz file"),
    ):
        p = sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add(p)
        p.set_defaults(func=run)
    train = sub.choices["train"]
    train.set_defaults(device="auto", func=lambda args: run_train(argparse.Namespace(**{**vars(args), "device": _device(args.device)})))


def _unavailable(reason: str) -> int:
    raise DriftopsError(f"this command is unavailable because driftops.train.commands failed to import ({reason}); fix or reinstall driftops")


def build_parser() -> Parser:
    """The ``driftops`` argument parser with all subcommands."""
    parser = Parser(prog="driftops", description="Drift fields, Sinkhorn flows and generator training for point clouds.")
    parser.add_argument("--version", action="version", version=f"driftops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{flow,train,eval,sample,bench,warmup}", parser_class=Parser)
    _add_flow(sub)
    _add_training(sub)
    _add_bench(sub)
    _add_warmup(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``driftops`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except DivergenceError as err:
        print(f"driftops {args.command}: diverged: {err}", file=sys.stderr)
        return 1
    except DriftopsError as err:
        print(f"driftops {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0

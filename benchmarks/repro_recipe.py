"""The paper code's Sinkhorn-drifting recipe beside driftops's Sinkhorn drift: same generator, seeds and metric.

The paper's checkerboard at eps 0.01 (``--target``, ``--eps``), the paper preset's generator and optimiser
(``TrainConfig.from_preset("paper")``: 1.59M parameters, AdamW 2e-4, batch 1024), ``--steps`` steps, seeds 42, ...:

* ``recipe``: the paper code's drift replicated in plain torch (``common.recipe_drift``): dense log-domain Sinkhorn,
  20 alternating updates from zero potentials for the cross and the self plan, loss ``|x - stopgrad(x + V)|²``
  (its log-sum-exps skip ``exp``'s slow path on underflow: the same float32 values, 7x faster);
* ``sinkhorn_converged`` (tol 1e-3) and ``sinkhorn`` (at most 20 iterations), and any other Sinkhorn variant of
  ``repro_toys.py`` named in ``--plans`` (e.g. ``sinkhorn_converged_8192``: the drift on 8192 points, the generator
  fitted in minibatches of 1024): driftops, the runs of ``repro_toys.py --name TOYS`` (its run folders, trained here
  when missing).

Each final generator is scored by exact W2² (POT) over ``--draws`` fresh draws of 1000 vs 1000 points (the paper's
metric) and 3 draws of 4000 vs 4000 points (a 4x lower floor), beside each size's floor (two independent target
draws), and each drift's mean squared norm at model = target (one target batch of the drift's size against
``EQUILIBRIUM_DRAWS`` independent ones: the push a generator that already matches the target still receives). Writes
benchmarks/results/<name>.{json,md} and <name>_curves.png (W2² vs step, mean ± std over seeds).
Resumable; ``--only-seed S`` trains one seed's recipe run, so two processes can share the work.

    python benchmarks/repro_recipe.py --steps 2000 --seeds 3 --threads 1 --toys repro_toys_checker
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings
from pathlib import Path

from common import logsumexp_underflow_free, recipe_drift, recipe_model
from repro_common import RESULTS, Store, curve, floor_draws, grid_parser, late_mean, mean_std, redraw_w2, seed_list, train_resumable, write_markdown
from repro_toys import PLANS, case_config, case_dir, redrawn

import torch

import driftops
from driftops import viz
from driftops.files import atomic_write_bytes
from driftops.metrics import w2
from driftops.train import Target, TrainConfig, read_metrics

EVAL_EVERY = 100
LARGE = 4000  # points per side of the second W2² score
LARGE_DRAWS = 3
EQUILIBRIUM_DRAWS = 8
PROTOCOL_SEEDS = range(42, 47)  # the paper protocol's five seeds, shown apart when more are run


def recipe_case(args: argparse.Namespace, seed: int) -> tuple[TrainConfig, Path]:
    """The recipe run of ``seed``: its training configuration (the paper preset) and its folder."""
    cfg = TrainConfig.from_preset("paper", target=args.target, eps=[args.eps], seed=seed, steps=args.steps)
    return cfg, RESULTS / "runs" / args.name / f"recipe-s{seed}"


def train_recipe(cfg: TrainConfig, target: Target, out: Path) -> dict:
    """Train the recipe run ``cfg`` (``cfg.eps[0]``, ``cfg.steps``), continuing from ``out/recipe.pt`` when present;
    a checkpoint (model, optimiser, curve) every ``EVAL_EVERY`` steps. Returns the final state's summary."""
    path = out / "recipe.pt"
    model = recipe_model(cfg, target.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "seconds": 0.0, "curve_steps": [], "curve_seconds": [], "curve_w2": [], "errors": []}
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    reference, _ = target.eval_set(1000, cfg.seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    while state["step"] < cfg.steps:
        start = time.perf_counter()
        rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["step"])
        x = model(torch.randn(cfg.batch, cfg.noise_dim, generator=rng))
        v, error = recipe_drift(x, target.sample(cfg.batch, rng), cfg.eps[0], logsumexp=logsumexp_underflow_free)
        loss = ((x - (x.detach() + v)) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["seconds"] += time.perf_counter() - start
        state["errors"].append(error)
        state["step"] += 1
        if state["step"] % EVAL_EVERY == 0 or state["step"] == cfg.steps:
            with torch.no_grad():
                score = w2(model.sample(1000, generator=torch.Generator().manual_seed(cfg.seed + 2)), reference)
            for k, value in (("curve_steps", state["step"]), ("curve_seconds", state["seconds"]), ("curve_w2", score)):
                state[k].append(value)
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, buffer)
            atomic_write_bytes(path, lambda fh: fh.write(buffer.getvalue()))
            print(f"recipe s{cfg.seed} step {state['step']}: W2^2 {score:.4g}, {state['seconds'] / state['step']:.3f} s/step", flush=True)
    return state


def recipe_sampler(cfg: TrainConfig, target: Target, out: Path):
    """``sample(n, seed)`` of a finished recipe run."""
    model = recipe_model(cfg, target.dim)
    model.load_state_dict(torch.load(out / "recipe.pt", weights_only=False)["model"])
    model.eval().requires_grad_(False)
    return lambda n, seed: model.sample(n, generator=torch.Generator().manual_seed(seed))


def equilibrium(args: argparse.Namespace, toys: argparse.Namespace, target: Target, plans: list[str]) -> dict[str, float]:
    """Mean squared drift norm per point when the model is the target, for each of ``plans`` ("recipe" or a driftops
    plan, with the trainer's drift options): one batch of target points of the drift's size (seed 0) against
    ``EQUILIBRIUM_DRAWS`` independent target batches of that size."""
    out = {}
    for plan in plans:
        if plan == "recipe":
            batch = TrainConfig.from_preset("paper").batch
            drift = lambda x, y: recipe_drift(x, y, args.eps, logsumexp=logsumexp_underflow_free)[0]  # noqa: E731
        else:
            cfg = case_config(toys, args.target, plan, args.eps, 42)
            batch, opts = cfg.batch, {k: v for k, v in cfg.flow_options().items() if k != "step_size"}
            drift = lambda x, y, opts=opts: driftops.drift(x, y, **opts)  # noqa: E731
        x = target.sample(batch, torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sinkhorn stopped")  # the capped plans
            fields = [drift(x, target.sample(batch, torch.Generator().manual_seed(100 + k))) for k in range(EQUILIBRIUM_DRAWS)]
        out[plan] = float(torch.stack(fields).pow(2).sum(-1).mean())
    return out


def label(plan: str) -> str:
    """A driftops plan's row name: its Sinkhorn stopping rule, and its drift batch when larger than the minibatch."""
    cfg = PLANS[plan]
    name = f"driftops, converged to {cfg['sinkhorn_tol']:g}" if "sinkhorn_tol" in cfg else f"driftops, at most {cfg['sinkhorn_iters']} iterations"
    return name + (f", drift batch {cfg['batch']}" if "batch" in cfg else "")


def main() -> None:
    parser = grid_parser(__doc__, "repro_recipe", seeds=3)
    parser.add_argument("--target", default="checkerboard")
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=10, help="fresh 1000-vs-1000 draws of the final W2^2")
    parser.add_argument("--toys", default="repro_toys", help="the repro_toys.py store whose driftops runs are used")
    parser.add_argument("--plans", nargs="+", choices=[p for p in PLANS if p.startswith("sinkhorn")], default=["sinkhorn_converged", "sinkhorn"],
                        help="driftops's drifts (repro_toys.py plans) set beside the recipe")
    parser.add_argument("--only-seed", type=int, help="train this seed's recipe run only, then stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = Store(args.name)
    seeds = seed_list(args)
    target = Target.from_config(TrainConfig(target=args.target))
    toys = argparse.Namespace(protocol="paper", name=args.toys, steps=args.steps, backend="auto", threads=args.threads)
    for seed in [args.only_seed] if args.only_seed is not None else seeds:
        key = f"recipe|{seed}"
        if key not in store:
            cfg, out = recipe_case(args, seed)
            state = train_recipe(cfg, target, out)
            store.add(key, {"plan": "recipe", "seed": seed, "seconds_per_step": state["seconds"] / state["step"],
                            "marginal_error": statistics.fmean(state["errors"]), **{k: state[k] for k in ("curve_steps", "curve_seconds", "curve_w2")}})  # fmt: skip
    if args.only_seed is not None:
        return
    for plan in args.plans:
        for seed in seeds:
            key = f"{plan}|{seed}"
            if key not in store:
                summary = train_resumable(case_config(toys, args.target, plan, args.eps, seed))
                out = case_dir(args.toys, args.target, plan, args.eps, seed)
                errors = [r["marginal_error"] for r in read_metrics(out) if "marginal_error" in r]
                steps, seconds, w2s = curve(out)
                store.add(key, {"plan": plan, "seed": seed, "seconds_per_step": summary["seconds"] / summary["steps"], "marginal_error": statistics.fmean(errors),
                                "curve_steps": steps, "curve_seconds": seconds, "curve_w2": w2s})  # fmt: skip
    for plan in ("recipe", *args.plans):
        for seed in seeds:
            key = f"score|{plan}|{seed}"
            if key not in store:
                if plan == "recipe":
                    cfg, out = recipe_case(args, seed)
                    sample = recipe_sampler(cfg, target, out)
                    small, large = redraw_w2(sample, target, args.draws), redraw_w2(sample, target, LARGE_DRAWS, LARGE)
                else:
                    out = case_dir(args.toys, args.target, plan, args.eps, seed)
                    small, large = redrawn(out, args.draws), redrawn(out, LARGE_DRAWS, LARGE)
                store.add(key, {"plan": plan, "seed": seed, "w2_1000": small, "w2_4000": large})
    done = store.records.get("equilibrium", {})
    if missing := [p for p in ("recipe", *args.plans) if p not in done]:
        store.add("equilibrium", {**done, **equilibrium(args, toys, target, missing)})
    report(args, store, seeds)


def report(args, store: Store, seeds: list[int]) -> None:
    """The table (mean ± std over seeds, draws pooled) and the W2²-vs-step bands."""
    names = {"recipe": "paper code's recipe (replica)"} | {p: label(p) for p in args.plans}
    runs = {p: [store.records[f"{p}|{s}"] for s in seeds] for p in names}
    scores = {p: [store.records[f"score|{p}|{s}"] for s in seeds] for p in names}
    protocol_idx = [i for i, s in enumerate(seeds) if s in PROTOCOL_SEEDS] if len(seeds) > len(PROTOCOL_SEEDS) else []
    apart = f" W2² at step {args.steps}, seeds {PROTOCOL_SEEDS[0]}-{PROTOCOL_SEEDS[-1]} (the protocol's) |" if protocol_idx else ""
    table = [
        f"| drift | W2² at step {args.steps} (training eval) |{apart} training evals over the last third | final W2², 1000 vs 1000, {args.draws} draws | final W2², {LARGE} vs {LARGE}, {LARGE_DRAWS} draws | s/step | mean marginal error | mean \\|V\\|² at model = target |",
        "|---|---|---|---|---|---|---|---|" + "---|" * bool(apart),
    ]
    for p, name in names.items():
        cell = f" {mean_std([runs[p][i]['curve_w2'][-1] for i in protocol_idx])} |" if apart else ""
        table.append(
            f"| {name} | {mean_std([r['curve_w2'][-1] for r in runs[p]])} |{cell} {mean_std([late_mean(r['curve_steps'], r['curve_w2'], r['curve_steps'][-1]) for r in runs[p]])} | "
            f"{mean_std([v for r in scores[p] for v in r['w2_1000']])} | "
            f"{mean_std([v for r in scores[p] for v in r['w2_4000']], 4)} | {mean_std([r['seconds_per_step'] for r in runs[p]])} | "
            f"{mean_std([r['marginal_error'] for r in runs[p]], 4)} | {store.records['equilibrium'][p]:.4f} |"
        )
    floor = (mean_std(floor_draws(args.target, args.draws)), mean_std(floor_draws(args.target, LARGE_DRAWS, LARGE), 4))
    table.append(f"| two independent target draws (the floor) | | |{' |' * bool(apart)} {floor[0]} | {floor[1]} | | | |")
    protocol = (
        f"The paper's {args.target} at eps {args.eps:g}, the paper preset (wide residual MLP, 1.59M parameters, AdamW 2e-4, "
        f"batch 1024, no EMA, no clipping), {args.steps} steps, seeds {seeds[0]}..{seeds[-1]}, {args.threads} thread(s) per run. "
        "Recipe: the paper code's drift in plain torch (dense log-domain Sinkhorn, 20 alternating updates from zero potentials "
        "for the cross and the self plan); driftops: `driftops.drift` with plan sinkhorn, converged to an L1 marginal error of "
        "1e-3 or capped at 20 iterations; a drift batch of 8192: the drift of 8192 generated vs 8192 target points, the "
        "generator fitted to them in minibatches of 1024 (8 optimiser steps per drift, evaluated at the first step past each "
        "multiple of 100). Training eval: exact W2² of 1000 generated vs 1000 target points at the last step; "
        f"over the last third: each run's mean over its evaluations (every {EVAL_EVERY} steps) after two thirds of the steps. "
        "Final W2²: exact, over fresh draws of generated and target points, pooled over seeds; the floor is the same statistic "
        "between two independent target draws. Mean marginal error: the cross plan's L1 marginal error over the steps. "
        f"Mean |V|² at model = target: one batch of target points of the drift's size against {EQUILIBRIUM_DRAWS} independent target batches, mean "
        "over points and batches (zero for an exact drift of the populations; what remains is sampling noise and bias). s/step "
        "is not a speed comparison: the runs shared the machine with each other (see bench_train_step.py for that)."
    )
    write_markdown(args.name, "The paper code's Sinkhorn-drifting recipe beside driftops", table, protocol)
    curves = {names[p]: (runs[p][0]["curve_steps"], [r["curve_w2"] for r in runs[p]]) for p in names}
    viz.plot_curve_bands({f"{args.target}, eps={args.eps:g}": curves}, RESULTS / f"{args.name}_curves.png", ncols=1)


if __name__ == "__main__":
    main()

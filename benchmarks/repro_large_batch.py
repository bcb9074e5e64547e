"""Do large drift batches pay? Drifting on the paper's checkerboard with drift batches of 1,024 / 8,192 / 65,536 at
the same wall-clock budget each.

Each round draws ``batch`` samples, computes their Sinkhorn drift against ``batch`` target points (the block-sparse
path at large sizes, ``backend=auto``) and fits the generator to the moved points in minibatches of 1024 (so a
round of batch B is B / 1024 optimiser steps). The paper preset otherwise (wide MLP, AdamW 2e-4, no EMA).
Training runs in chunks until its training time reaches ``--budget`` seconds; after each chunk the model is
evaluated by exact W2^2 (POT) of 4000 generated vs 4000 fresh target points. Writes
benchmarks/results/repro_large_batch.{json,md} and repro_large_batch.png (W2^2 vs wall-clock and vs
steps). Resumable after a kill.

    python benchmarks/repro_large_batch.py                                  # 2 eps x 3 batches x 3 seeds, 1800 s each
    python benchmarks/repro_large_batch.py --budget 30 --seeds 1 --batches 1024 8192 --eps 0.01 --name smoke
"""

from __future__ import annotations

import json
from pathlib import Path

from repro_common import RESULTS, Store, grid_parser, late_mean, mean_std, seed_list, train_resumable, write_markdown

from driftops import viz
from driftops.files import atomic_write_text
from driftops.train import TrainConfig, evaluate


def run_case(args, eps: float, batch: int, seed: int) -> dict:
    """Train one case to the time budget in chunks, evaluating after each; returns its curve."""
    out = RESULTS / "runs" / args.name / f"eps{eps:g}-b{batch}-s{seed}"
    progress = Path(out) / "budget_curve.json"
    points = json.loads(progress.read_text()) if progress.exists() else []
    steps_per_round = batch // args.minibatch
    steps = points[-1]["step"] if points else 0
    seconds = points[-1]["seconds"] if points else 0.0
    while seconds < args.budget:
        # Chunks of about budget / chunks seconds, whole rounds, from the speed measured so far.
        rate = seconds / steps if steps else None
        chunk = steps_per_round if rate is None else max(steps_per_round, int(args.budget / args.chunks / rate) // steps_per_round * steps_per_round)
        steps += chunk
        cfg = TrainConfig.from_preset(
            "paper", target="checkerboard", plan="sinkhorn", eps=[eps], seed=seed, steps=steps, batch=batch,
            minibatch=args.minibatch, sinkhorn_iters=args.sinkhorn_iters, sinkhorn_newton=args.newton, backend="auto", threads=args.threads,
            eval_every=0, checkpoint_every=steps_per_round, out=str(out), progress=False,
        )  # fmt: skip
        summary = train_resumable(cfg)
        seconds = summary["seconds"]
        w2 = evaluate(out, n=args.eval_points, seed=10_000 + seed)["w2"]
        points.append({"step": summary["steps"], "seconds": seconds, "w2": w2})
        atomic_write_text(progress, json.dumps(points))
        print(f"eps {eps:g} batch {batch} seed {seed}: step {summary['steps']}, {seconds:.0f} s, W2^2 {w2:.4g}", flush=True)
    return {"eps": eps, "batch": batch, "seed": seed, "curve": points, "w2": points[-1]["w2"], "steps": points[-1]["step"]}


def main() -> None:
    parser = grid_parser(__doc__, "repro_large_batch", seeds=3)
    parser.add_argument("--eps", nargs="+", type=float, default=[0.01, 0.001])
    parser.add_argument("--batches", nargs="+", type=int, default=[1024, 8192, 65536], help="drift batch sizes")
    parser.add_argument("--minibatch", type=int, default=1024, help="generator samples per optimiser step")
    parser.add_argument("--budget", type=float, default=1800.0, help="training seconds per case")
    parser.add_argument("--chunks", type=int, default=12, help="evaluations per case (about)")
    parser.add_argument("--sinkhorn-iters", type=int, default=20, help="Sinkhorn iterations per drift at most")
    parser.add_argument("--newton", type=int, default=None, help="plan entries per row of the Sinkhorn solver's Newton finish (0: none; default: the solver's choice)")
    parser.add_argument("--eval-points", type=int, default=4000, help="exact W2^2 on this many points")
    args = parser.parse_args()
    store = Store(args.name)
    seeds = seed_list(args)
    for key, (eps, batch, seed) in store.pending(lambda e, b, s: f"{e:g}|{b}|{s}|{args.budget:g}", args.eps, args.batches, seeds):
        store.add(key, run_case(args, eps, batch, seed))
    recs = [r for k, r in store.records.items() if k.endswith(f"|{args.budget:g}") and r["eps"] in args.eps and r["batch"] in args.batches and r["seed"] in seeds]
    table = ["| eps | drift batch | W2^2 at the budget | W2^2 over the last third | optimiser steps in the budget |", "|---|---|---|---|---|"]
    for eps in args.eps:
        for batch in args.batches:
            rs = [r for r in recs if (r["eps"], r["batch"]) == (eps, batch)]
            late = [late_mean([p["seconds"] for p in r["curve"]], [p["w2"] for p in r["curve"]], args.budget) for r in rs]
            table.append(f"| {eps:g} | {batch} | {mean_std([r['w2'] for r in rs], 4)} | {mean_std(late, 4)} | {mean_std([r['steps'] for r in rs], 0)} |")
    newton = "" if args.newton is None else ", no Newton finish" if args.newton == 0 else f", Newton finish on {args.newton} plan entries per row"
    protocol = (
        f"Paper checkerboard, Sinkhorn drift (at most {args.sinkhorn_iters} iterations per drift, backend auto{newton}), generator "
        f"minibatch {args.minibatch}, wide MLP, AdamW 2e-4; {args.budget:g} s of training time per case; exact W2^2 of "
        f"{args.eval_points} generated vs {args.eval_points} fresh target points; mean ± std over seeds {seeds[0]}..{seeds[-1]}; "
        "'over the last third': each run's mean over its evaluations after two thirds of the budget (one evaluation "
        "moves by ~0.01 from chunk to chunk)."
    )
    write_markdown(args.name, "Large drift batches at equal wall-clock", table, protocol)
    panels, xlabels = {}, {}
    for axis in ("seconds", "step"):
        for eps in args.eps:
            curves = {}
            for batch in args.batches:
                rs = [r for r in recs if (r["eps"], r["batch"]) == (eps, batch)]
                if rs:
                    n = min(len(r["curve"]) for r in rs)
                    x = [sum(r["curve"][i][axis] for r in rs) / len(rs) for i in range(n)]
                    curves[f"drift batch {batch}"] = (x, [[p["w2"] for p in r["curve"][:n]] for r in rs])
            if curves:
                title = f"eps={eps:g}, W2² vs {'wall-clock' if axis == 'seconds' else 'optimiser steps'}"
                panels[title], xlabels[title] = curves, "training seconds" if axis == "seconds" else "optimiser step"
    if panels:
        viz.plot_curve_bands(panels, RESULTS / f"{args.name}.png", xlabel=xlabels, ncols=len(args.eps))


if __name__ == "__main__":
    main()

"""NSGF (Zhu et al., "Neural Sinkhorn Gradient Flow", arXiv 2401.14069) and the Sinkhorn-loss trainer (Genevay et
al.) on 2D toys, beside the NSGF paper's 2-Wasserstein table (its Table 1) on candidates for the paper's data.

Source N(0, I) to each of ``--targets``, and toy to toy for each of ``--pairs`` (SOURCE:TARGET, nsgf only);
``--method nsgf``: a Sinkhorn particle flow of ``--batch`` particles over ``--flow-steps`` steps builds the
trajectory pool, a velocity field is fitted to it, samples integrate it with as many Euler steps;
``--method sinkhorn_loss``: a one-step generator minimising the Sinkhorn divergence (from noise: no pairs).
Both report the 2-Wasserstein distance W2 (the square root of exact W2^2, POT) between 1000 generated and
1000 fresh target points, mean ± std over seeds. Writes
benchmarks/results/repro_nsgf.{json,md} and a scatter grid of the first seed's samples (_samples.png). Resumable
after a kill.

    python benchmarks/repro_nsgf.py                              # 6 targets x 2 methods + 3 pairs, 3 seeds
    python benchmarks/repro_nsgf.py --name repro_nsgf_runner --steps 20000 --batch 4096 --minibatch 256 \
        --targets cfm_runner_eight_gaussians cfm_runner_moons cfm_runner_s_curve \
        --pairs cfm_runner_eight_gaussians:cfm_runner_moons   # torchcfm runner's data, the paper's step count and batch
    python benchmarks/repro_nsgf.py --steps 20 --seeds 1 --targets moons --name smoke
"""

from __future__ import annotations

import math
from pathlib import Path

from repro_common import RESULTS, Store, floor_draws, grid_parser, mean_std, scatter_source, seed_list, train_resumable, write_markdown

from driftops import viz
from driftops.train import Target, TrainConfig, evaluate, sample_run

# The NSGF paper's Table 1 (arXiv 2401.14069v1, page 6): W2 of NSGF with 10 and 100 Euler steps and of OT-CFM with 10,
# per task of the paper. The paper names its data without defining them: its 8 Gaussians, moons and S-curve are set
# beside two candidates each, the torchcfm package's samplers (cfm_ toys) and torchcfm's experiment runner's data
# (cfm_runner_ toys), and scikit-learn's S-curve; its checkerboard beside the FFJORD one.
PAPER_W2: dict[str, tuple[float, float, float]] = {
    "8 Gaussians": (0.285, 0.278, 0.289), "moons": (0.077, 0.067, 0.088), "8 Gaussians -> moons": (0.144, 0.144, 0.173),
    "S-curve": (0.117, 0.110, 0.149), "checkerboard": (0.252, 0.147, 0.253),
}  # fmt: skip
PAPER_TASK = {
    "cfm_eight_gaussians": "8 Gaussians", "cfm_runner_eight_gaussians": "8 Gaussians", "cfm_moons": "moons", "cfm_runner_moons": "moons",
    "cfm_eight_gaussians>cfm_moons": "8 Gaussians -> moons", "cfm_runner_eight_gaussians>cfm_runner_moons": "8 Gaussians -> moons",
    "s_curve": "S-curve", "cfm_runner_s_curve": "S-curve", "ffjord_checkerboard": "checkerboard",
}  # fmt: skip


def case_key(task: str, method: str, eps: float, seed: int) -> str:
    """The store key of one case."""
    return f"{task}|{method}|{eps:g}|{seed}"


def run_dir(name: str, task: str, method: str, seed: int) -> Path:
    """The run folder of one case; a task is a target or ``SOURCE>TARGET``."""
    return RESULTS / "runs" / name / f"{task.replace('>', '-to-')}-{method}-s{seed}"


def main() -> None:
    parser = grid_parser(__doc__, "repro_nsgf", seeds=3)
    parser.add_argument("--targets", nargs="+", default=["cfm_eight_gaussians", "cfm_moons", "ffjord_eight_gaussians", "ffjord_moons", "ffjord_checkerboard", "s_curve"])
    parser.add_argument("--pairs", nargs="*", default=["cfm_eight_gaussians:cfm_moons", "ffjord_eight_gaussians:ffjord_moons", "ffjord_moons:ffjord_eight_gaussians"],
                        help="SOURCE:TARGET toy pairs flowed by nsgf")
    parser.add_argument("--methods", nargs="+", choices=["nsgf", "sinkhorn_loss"], default=["nsgf", "sinkhorn_loss"])
    parser.add_argument("--eps", type=float, default=0.05, help="Sinkhorn temperature (blur^2 scale, squared-Euclidean cost)")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=1024, help="nsgf: flow particles (the trajectory pool)")
    parser.add_argument("--minibatch", type=int, default=None, help="nsgf: pool triples per optimiser step (default: --batch)")
    parser.add_argument("--loss-batch", type=int, default=256, help="sinkhorn_loss: generated and target points per step")
    parser.add_argument("--flow-steps", type=int, default=10, help="nsgf: Sinkhorn flow steps (and Euler steps at sampling)")
    args = parser.parse_args()
    store = Store(args.name)
    seeds = seed_list(args)
    # A task is a target (from N(0, I)) or "SOURCE>TARGET"; pairs are flowed by nsgf alone.
    tasks = [(t, m) for t in args.targets for m in args.methods] + [(p.replace(":", ">"), "nsgf") for p in args.pairs if "nsgf" in args.methods]
    for key, ((task, method), seed) in store.pending(lambda tm, s: case_key(*tm, args.eps, s), tasks, seeds):
        source, _, target = task.rpartition(">")
        out = run_dir(args.name, task, method, seed)
        cfg = TrainConfig(
            method=method, target=target, source=source or "gaussian", plan="sinkhorn", eps=[args.eps], seed=seed, steps=args.steps,
            batch=args.batch if method == "nsgf" else args.loss_batch, minibatch=args.minibatch if method == "nsgf" else None,
            flow_steps=args.flow_steps, lr=1e-3, hidden=256, blocks=4, threads=args.threads, out=str(out), progress=False,
        )  # fmt: skip
        summary = train_resumable(cfg)
        w2sq = evaluate(out, n=1000, seed=10_000 + seed)["w2"]
        store.add(key, {"target": task, "method": method, "seed": seed, "w2": math.sqrt(w2sq), "seconds": summary["seconds"]})
        print(f"{key}: W2 {math.sqrt(w2sq):.4g}", flush=True)
    table = [
        "| task | " + " | ".join(f"{m} W2" for m in args.methods) + " | floor: W2 of two target draws, 10 times | paper's task | paper: NSGF, 10 / 100 Euler steps | paper: OT-CFM, 10 steps |",
        "|---|" + "---|" * (len(args.methods) + 4),
    ]
    scatters: dict[tuple[str, str], tuple] = {}
    for task in dict.fromkeys(t for t, _ in tasks):
        cells = [mean_std([r["w2"] for r in store.records.values() if (r["target"], r["method"]) == (task, m) and r["seed"] in seeds]) for m in args.methods]
        source, _, target = task.rpartition(">")
        floor = mean_std([math.sqrt(v) for v in floor_draws(target, 10)])
        name = f"{source} → {target}" if source else f"N(0, I) → {target}"
        ours = PAPER_TASK.get(task)
        paper = f"{ours} | {PAPER_W2[ours][0]:.3f} / {PAPER_W2[ours][1]:.3f} | {PAPER_W2[ours][2]:.3f}" if ours else "- | - | -"
        table.append(f"| {name} | " + " | ".join(cells) + f" | {floor} | {paper} |")
        ref, _ = Target.from_config(TrainConfig(target=target)).eval_set(2000, 10_000)
        for m in args.methods:
            out, done = run_dir(args.name, task, m, seeds[0]), store.records.get(case_key(task, m, args.eps, seeds[0]))
            if done and scatter_source(out):
                scatters[name.replace(" → ", " →\n"), m] = (sample_run(out, 2000)[0], ref, f"W2={done['w2']:.3g} (seed {seeds[0]})")
    protocol = (
        f"eps {args.eps:g}; {args.steps} optimiser steps; nsgf: a pool of {args.batch} particles over {args.flow_steps} flow steps "
        f"(sampled with {args.flow_steps} Euler steps), {args.minibatch or args.batch} pool triples per optimiser step; sinkhorn_loss "
        f"batch {args.loss_batch}; residual MLPs hidden 256 x 4 blocks, AdamW 1e-3, EMA 0.999; W2 = "
        f"sqrt(exact W2^2) of 1000 vs 1000 points, mean ± std over seeds {seeds[0]}..{seeds[-1]}; a pair flows the first toy's "
        "samples to the second (sinkhorn_loss, a generator from noise, has no pair runs: '-'). Paper columns: the NSGF paper's "
        "Table 1 (arXiv 2401.14069v1), set beside each candidate for its data (it names them without defining them): the "
        "torchcfm package's samplers (cfm_ toys: 8 Gaussians on radius 5 with covariance sqrt(0.1) I, torchdyn's moons times 3 "
        "minus 1), torchcfm's experiment runner's data (cfm_runner_ toys: torchdyn's 8 Gaussians as it asks them, std 1 around "
        "the unit circle; scikit-learn's moons, noise 0.05, times 2, x minus 1; its S-curve times 1.5), scikit-learn's S-curve "
        "and the FFJORD checkerboard. Its protocol: batch 256, 20,000 training steps, an MLP of 3 hidden layers of 256, W2 on "
        "1024 test samples. Where its numbers sit below the floor column they cannot be the exact W2 between independent draws "
        "of about 1000 points of that data."
    )
    write_markdown(args.name, "NSGF and Sinkhorn-loss generators on 2D toys", table, protocol)
    if scatters:
        rows = list(dict.fromkeys(row for row, _ in scatters))
        print(f"wrote {viz.plot_scatter_grid(scatters, RESULTS / f'{args.name}_samples.png', rows, args.methods)}")


if __name__ == "__main__":
    main()

"""Sharded drifts on 1 to 4 Gloo processes of this machine, in the three communication modes.

For each process count P, dimension D, size N (= M) and mode ("gather", "ring", "mesh"): seconds per one-sided drift
(median of --repeat), bytes this rank sent per drift call and per Sinkhorn iteration (counted by driftops' collective
wrappers, see ``driftops.parallel.Comm.stats``), and peak RSS growth per rank. The ranks divide the machine's cores
(``divide_cores``). Writes benchmarks/results/bench_distributed.json; the scaling model projecting 8 and 64 GPUs is
in benchmarks/results/bench_distributed.md.

    python benchmarks/bench_distributed.py            # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import driftops  # noqa: E402  (this checkout's; before torch, as the driftops command does: see driftops.threads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402
from driftops.parallel import Comm, Sharding, divide_cores  # noqa: E402

from common import print_table, save  # noqa: E402

CASES = {2: (2000, 8000), 128: (1000, 3000)}  # D -> sizes N (= M)
SINKHORN = {"eps": 1.0, "tol": 1e-12}  # never converges: the iteration counts are fixed by max_iter


def _clouds(n: int, dim: int, rank: int, world: int):
    gen = torch.Generator().manual_seed(dim * 1000 + n)
    x, y = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen) + 0.5
    return x.tensor_split(world)[rank], y.tensor_split(world)[rank]


def _traffic(call) -> tuple[int, object]:
    before = Comm.stats.bytes_sent
    out = call()
    return Comm.stats.bytes_sent - before, out


def _run(rank: int, world: int, repeat: int, modes: list[str], out) -> None:
    divide_cores(world)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for dim, sizes in CASES.items():
        for n in sizes:
            for mode in modes if world > 1 else ("single",):
                group = None if world == 1 else Sharding(dist.group.WORLD, mode)
                x, y = _clouds(n, dim, rank, world)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                driftops.drift(x, y, 0.5, plan="one_sided", backend="keops", group=group)  # compile outside the timings
                times = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    sent, _ = _traffic(lambda: driftops.drift(x, y, 0.5, plan="one_sided", backend="keops", group=group))
                    times.append(time.perf_counter() - start)
                counts = []
                for max_iter in (1, 3):
                    sent_k, (_, info) = _traffic(
                        lambda: driftops.drift(x, y, plan="sinkhorn", backend="keops", group=group, max_iter=max_iter, return_info=True, **SINKHORN)
                    )  # fmt: skip
                    counts.append((sent_k, info.iterations))
                per_iter = (counts[1][0] - counts[0][0]) / max(1, counts[1][1] - counts[0][1])
                rows.append({
                    "P": world, "D": dim, "N": n, "mode": mode, "rank": rank, "seconds": statistics.median(times),
                    "MB_per_drift": sent / 1e6, "KB_per_sinkhorn_iter": per_iter / 1e3,
                    "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024,
                })  # fmt: skip
    out[rank] = rows
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--modes", nargs="+", choices=["ring", "gather", "mesh"], default=["ring", "mesh", "gather"], help="run in this order: peak memory is measured as RSS growth, so lighter modes first")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for world in args.ranks:  # P = 1 first: it compiles the KeOps formulas before several ranks need them
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        with tmp.Manager() as manager:
            out = manager.dict()
            tmp.spawn(_run, args=(world, args.repeat, args.modes, out), nprocs=world, join=True)
            per_rank = [out[r] for r in range(world)]
        for cases in zip(*per_rank):  # one row per case: the slowest rank's time, the largest traffic and memory
            row = dict(cases[0])
            row.pop("rank")
            row["seconds"] = max(c["seconds"] for c in cases)
            for key in ("MB_per_drift", "KB_per_sinkhorn_iter", "peak_rss_growth_mib"):
                row[key] = max(c[key] for c in cases)
            rows.append(row)
        print_table(rows, ["P", "D", "N", "mode", "seconds", "MB_per_drift", "KB_per_sinkhorn_iter", "peak_rss_growth_mib"])
        save("bench_distributed", rows, vars(args))  # after every process count: a partial run keeps its rows


if __name__ == "__main__":
    main()

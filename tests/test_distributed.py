"""Sharded calls and distributed training over Gloo process groups equal one process; faults raise on every rank.

Each test spawns its ranks once (process start-up dominates) and runs several cases in them; the single-process
references are computed first in the parent, which also compiles most KeOps formulas before the ranks need them
(a formula first met by several ranks at once is compiled by one while the others wait for it).
"""

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import driftops
from driftops.backends import DenseBackend
from driftops.data import sample_toy
from driftops.parallel import Comm, Launch, Sharding, divide_cores
from driftops.train import METHODS, Drifting, Run, SinkhornLoss, TrainConfig, load_checkpoint, read_metrics, train
from driftops.train.loop import rank_seed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The single-process references on one thread: multi-threaded reductions of these tiny clouds collapse when
    the ranks' processes load the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, job, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    divide_cores(world)
    try:
        job(rank, world, out, *args)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, job, *args) -> dict:
    """Run ``job(rank, world, out, *args)`` on ``world`` Gloo ranks; returns what they stored in ``out``."""
    with tmp.Manager() as manager:
        out = manager.dict()
        tmp.spawn(_worker, args=(world, _free_port(), job, args, out), nprocs=world, join=True)
        return dict(out)


class RecordingBackend(DenseBackend):
    """The dense backend, recording the largest column block it was given."""

    largest = 0

    def lse(self, x, y, *args, **kwargs):
        RecordingBackend.largest = max(RecordingBackend.largest, y.shape[0])
        return super().lse(x, y, *args, **kwargs)

    def weighted_mean(self, x, y, *args, **kwargs):
        RecordingBackend.largest = max(RecordingBackend.largest, y.shape[0])
        return super().weighted_mean(x, y, *args, **kwargs)

    def reduce_lse_mean(self, x, y, *args, **kwargs):
        RecordingBackend.largest = max(RecordingBackend.largest, y.shape[0])
        return super().reduce_lse_mean(x, y, *args, **kwargs)


X_SIZES, Y_SIZES = (10, 23, 17), (20, 5, 16)  # uneven, and N = 50, M = 41 not divisible by 3
SIZES_4 = {"x": (10, 13, 17, 10), "y": (20, 5, 9, 7), "pos": (7, 6, 4, 3), "neg": (5, 2, 10, 4)}  # a 2 x 2 mesh


def _data():
    x, y = sample_toy("moons", sum(X_SIZES), seed=1).double(), sample_toy("checkerboard", sum(Y_SIZES), seed=2).double()
    gen = torch.Generator().manual_seed(3)
    return x, y, torch.rand(len(x), generator=gen, dtype=torch.float64) + 0.5, torch.rand(len(y), generator=gen, dtype=torch.float64) + 0.5


SINK = {"tol": 1e-5, "max_iter": 2000}
EPS = 0.3


POS_SIZES, NEG_SIZES = (7, 6, 7), (5, 2, 14)  # the joint case with explicit negatives: y[:20] positives, y[20:] negatives


def _cases(x, y, wx, wy, pos, neg, group, modes=("gather", "ring", "mesh")) -> dict:
    """name -> result of each call on x, y (weights wx, wy; joint positives pos, negatives neg); ``group``: None
    (one process) or the group every rank passes its slices to, in each sharding mode of ``modes``."""
    out = {}
    for mode in modes:
        g = None if group is None else Sharding(group, mode)
        for plan in ("one_sided", "two_sided", "sinkhorn"):
            out[f"{plan}-{mode}"] = driftops.drift(x, y, EPS, plan=plan, backend="dense", group=g, **SINK)
            out[f"{plan}-weights-eps-{mode}"] = driftops.drift(
                x, y, [EPS, 1.0], plan=plan, backend="keops", group=g, x_weights=wx, y_weights=wy, **SINK
            )  # fmt: skip
        v, info = driftops.drift(x, y, EPS, backend="dense", group=g, return_info=True, **SINK)
        out[f"warm-{mode}"] = driftops.drift(x + 0.5 * v, y, EPS, backend="dense", group=g, warm_start=info, **SINK)
        out[f"far-{mode}"] = driftops.drift(x, y + 40.0, EPS, backend="dense", group=g, x_weights=wx, **SINK)  # x moved onto y
        out[f"barycentric-{mode}"] = driftops.barycentric_map(x, y, EPS, plan="sinkhorn", backend="dense", group=g, y_weights=wy, **SINK)
        out[f"joint-{mode}"] = driftops.joint_drift(x, y, eps=[0.1, 0.3], backend="dense", group=g, pos_weights=wy)
        out[f"joint-neg-{mode}"] = driftops.joint_drift(x, pos, neg, eps=0.2, backend="dense", group=g)
    if "gather" in modes:  # Coarse Sinkhorn levels (annealing temperatures on grid-cell centroids): "sparse" and "auto" backends.
        g = None if group is None else Sharding(group, "gather")
        out["sparse-coarse"] = driftops.drift(x, y, EPS, backend="sparse", group=g, x_weights=wx, **SINK)
        # A Newton finish: the products with the transposed sparse Hessian are summed over ranks.
        out["newton"] = driftops.drift(x, y, EPS, backend="dense", group=g, y_weights=wy, solver=driftops.Sinkhorn(newton=8), **SINK)
    return out


def _sharded_cases(rank, world, out, x, y, wx, wy):
    xs, ys, wxs, wys = x.split(X_SIZES)[rank], y.split(Y_SIZES)[rank], wx.split(X_SIZES)[rank], wy.split(Y_SIZES)[rank]
    results = _cases(xs, ys, wxs, wys, y[:20].split(POS_SIZES)[rank], y[20:].split(NEG_SIZES)[rank], dist.group.WORLD)
    # Ring mode holds its slice and at most two circulating blocks, never a gathered (N, D) cloud.
    gathered = []
    original = Comm.gather
    Comm.gather = lambda self, t, sizes=None: gathered.append(t.dim()) or original(self, t, sizes)
    try:
        driftops.drift(xs, ys, EPS, backend=RecordingBackend(), group=Sharding(dist.group.WORLD, "ring"), **SINK)
    finally:
        Comm.gather = original
    results["ring-largest-block"] = RecordingBackend.largest
    results["ring-gathered-dims"] = sorted(set(gathered))
    for k, v in results.items():
        out[f"{k}/{rank}"] = v


def _assert_sharded_equal(reference: dict, out: dict, world: int) -> None:
    for name, expected in reference.items():
        got = torch.cat([out[f"{name}/{r}"] for r in range(world)])
        assert torch.allclose(got, expected, atol=1e-9, rtol=1e-7), (name, float((got - expected).abs().max()))


def test_sharded_calls_match_one_process_in_every_mode():
    x, y, wx, wy = _data()
    reference = _cases(x, y, wx, wy, y[:20], y[20:], None)
    out = _spawn(3, _sharded_cases, x, y, wx, wy)
    _assert_sharded_equal(reference, out, 3)  # the mesh of 3 ranks is 1 x 3: rows whole, columns split
    for r in range(3):
        assert out[f"ring-largest-block/{r}"] == max(max(X_SIZES), max(Y_SIZES))
        assert out[f"ring-gathered-dims/{r}"] == [1]  # only potentials and per-point vectors are gathered


def _mesh_cases(rank, world, out, x, y, wx, wy):
    part = {k: v.split(SIZES_4[k])[rank] for k, v in (("x", x), ("y", y), ("pos", y[:20]), ("neg", y[20:]))}
    results = _cases(part["x"], part["y"], wx.split(SIZES_4["x"])[rank], wy.split(SIZES_4["y"])[rank], part["pos"], part["neg"], dist.group.WORLD, ("mesh",))
    RecordingBackend.largest = 0
    driftops.drift(part["x"], part["y"], EPS, backend=RecordingBackend(), group=Sharding(dist.group.WORLD, "mesh"), **SINK)
    results["mesh-largest-block"] = RecordingBackend.largest
    for k, v in results.items():
        out[f"{k}/{rank}"] = v


def test_two_by_two_mesh_matches_one_process():
    x, y, wx, wy = _data()
    reference = _cases(x, y, wx, wy, y[:20], y[20:], None, ("mesh",))
    out = _spawn(4, _mesh_cases, x, y, wx, wy)
    _assert_sharded_equal(reference, out, 4)
    # Rank r = (r // 2, r % 2) reduces against its mesh column's slices (ranks r % 2 and r % 2 + 2), never a whole
    # cloud: column 0 holds 20 + 9 of y's 41 points and 10 + 17 of x's 50 (the self problem), column 1 5 + 7 and 13 + 10.
    assert [out[f"mesh-largest-block/{r}"] for r in range(4)] == [29, 23, 29, 23]


def test_auto_mode_gathers_what_fits_else_meshes_else_rings():
    s = Sharding(None, ring_min_bytes=1000)
    assert s.mode_for(2, 10**6, 4, 16) == "gather"  # D <= 3: the block-sparse path and coarse levels need whole clouds
    assert s.mode_for(128, 1, 4, 16) == "gather"  # 512 bytes fit
    assert s.mode_for(128, 3, 4, 16) == "mesh"  # 1536 bytes do not; a 4 x 4 mesh holds half of them
    assert s.mode_for(128, 3, 4, 16, world=False) == "ring"  # the mesh needs the world group
    assert s.mode_for(128, 3, 4, 4) == "ring"  # a 2 x 2 mesh holds as much as the gather
    assert s.mode_for(128, 4, 4, 16) == "ring"  # half of 2048 bytes does not fit
    assert Sharding(None, "mesh").mode_for(2, 10, 4, 3) == "mesh"
    assert Sharding(None, ring_min_bytes=1000, mesh=(2, 3)).mode_for(128, 2, 4, 6) == "mesh"  # 1024 * (1/2 + 1/3) fits
    with pytest.raises(driftops.DriftopsError, match="has 6 cells for 4 ranks"):
        Sharding(None, ring_min_bytes=1000, mesh=(2, 3)).mode_for(128, 3, 4, 4)


def _fault_cases(rank, world, out):
    x, y = sample_toy("moons", 40, seed=rank), sample_toy("checkerboard", 30, seed=rank)
    g = Sharding(dist.group.WORLD, "gather", timeout=20.0)
    if rank == 1:
        x[3, 0] = float("nan")
    for name, call in (
        ("nan", lambda: driftops.drift(x, y, 0.1, backend="dense", group=g)),
        ("eps", lambda: driftops.drift(x.nan_to_num(), y, 0.1 * (rank + 1), backend="dense", group=g)),
        ("plan", lambda: driftops.barycentric_map(x.nan_to_num(), y, plan=("one_sided", "two_sided")[rank], backend="dense", group=g)),
        ("mesh", lambda: driftops.drift(x.nan_to_num(), y, 0.1, backend="dense", group=Sharding(dist.group.WORLD, "mesh", mesh=(2, 2)))),
    ):
        try:
            call()
            out[f"{name}/{rank}"] = "returned"
        except driftops.DriftopsError as err:
            out[f"{name}/{rank}"] = str(err)
    # A flow stopped by one rank's callback stops on every rank at the same step.
    result = driftops.flow(
        x.nan_to_num()[: 20 + rank], y, steps=6, eps=0.2, plan="one_sided", backend="dense", group=g, metric_every=None, progress=False,
        callback=lambda step, xk, info: not (rank == 1 and step == 3),
    )  # fmt: skip
    out[f"stopped/{rank}"] = result.steps
    # A killed rank: the survivor raises a DriftopsError instead of waiting forever.
    if rank == 1:
        os._exit(0)
    start = time.perf_counter()
    try:
        driftops.drift(x.nan_to_num(), y, 0.1, backend="dense", group=Sharding(dist.group.WORLD, timeout=10.0))
        out["dead"] = "returned"
    except driftops.DriftopsError as err:
        out["dead"] = str(err)
    out["dead-seconds"] = time.perf_counter() - start


def test_faults_raise_the_same_error_on_every_rank():
    out = _spawn(2, _fault_cases)
    assert out["nan/0"] == out["nan/1"] and "rank 1 of 2" in out["nan/0"] and "NaN" in out["nan/0"]
    assert out["eps/0"] == out["eps/1"] and "eps: rank 0 [0.1], rank 1 [0.2]" in out["eps/0"]
    assert out["plan/0"] == out["plan/1"] and "plan" in out["plan/0"]
    assert out["mesh/0"] == out["mesh/1"] and "mesh=(2, 2) has 4 cells for 2 ranks" in out["mesh/0"]
    assert out["stopped/0"] == out["stopped/1"] == 3
    assert "another rank exited" in out["dead"] and out["dead-seconds"] < 15


def _flow_case(rank, world, out, x, y):
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    res = driftops.flow(xs, ys, steps=5, eps=0.3, tol=1e-5, backend="dense", group=dist.group.WORLD, metric_every=2, metric_points=30, max_snapshot_points=25, snapshot_every=2, progress=False)
    out[f"x/{rank}"] = res.x
    out[f"history/{rank}"] = {k: res.history[k] for k in ("w2", "drift_norm", "metric_step", "sinkhorn_iterations")}
    out[f"snapshots/{rank}"] = res.snapshots


def test_sharded_flow_equals_one_process():
    x, y = sample_toy("moons", 61, seed=4).double(), sample_toy("spiral", 47, seed=5).double()
    ref = driftops.flow(x, y, steps=5, eps=0.3, tol=1e-5, backend="dense", metric_every=2, metric_points=30, max_snapshot_points=25, snapshot_every=2, progress=False)
    out = _spawn(2, _flow_case, x, y)
    assert torch.allclose(torch.cat([out["x/0"], out["x/1"]]), ref.x, atol=1e-9)
    for r in range(2):
        hist = out[f"history/{r}"]
        assert hist["metric_step"] == ref.history["metric_step"] == [0, 2, 4, 5]
        assert hist["w2"] == pytest.approx(ref.history["w2"], rel=1e-9)
        assert hist["drift_norm"] == pytest.approx(ref.history["drift_norm"], rel=1e-9)
        assert [s for s, _ in out[f"snapshots/{r}"]] == [s for s, _ in ref.snapshots]
        for (_, got), (_, want) in zip(out[f"snapshots/{r}"], ref.snapshots):
            assert torch.allclose(got, want, atol=1e-9)


def test_divide_cores_shares_the_machine():
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert divide_cores(2) == max(1, cores // 2) == torch.get_num_threads()
        assert divide_cores(4 * cores) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_flow_cli_under_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "driftops", "flow",
        "--points", "300", "--steps", "3", "--eps", "0.1", "--max-iter", "20", "--backend", "dense", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("W2^2") == 1  # rank 0 reports, once
    assert "Warning" not in done.stderr, done.stderr[-2000:]  # no deprecated collectives, no stray warnings
    config = __import__("json").loads((tmp_path / "config.json").read_text())
    assert config["world_size"] == 2
    particles = __import__("numpy").load(tmp_path / "particles.npy")
    assert particles.shape == (300, 2)


# Distributed training: the ranks' draws concatenate to a single process's, so the runs are comparable.


def _tiny(out: Path, **overrides) -> TrainConfig:
    """A float64 CPU-cheap configuration (small MLP, dense backend, Sinkhorn converged far below float32 rounding)."""
    base = dict(
        target="8gaussians", out=str(out), batch=32, hidden=16, blocks=1, noise_dim=4, lr=1e-2, eps=[0.5], plan="sinkhorn",
        backend="dense", dtype="float64", sinkhorn_tol=1e-10, sinkhorn_iters=2000, steps=3, log_every=1, ema=0.9,
        eval_points=100, checkpoint_every=100, progress=False, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def _concatenated(method_cls: type, world: int) -> type:
    """``method_cls`` drawing, in one process, the concatenation of what ``world`` ranks draw (each rank's share
    from its own generator, seeded by rank_seed), in rank order."""

    class Concatenated(method_cls):
        def __init__(self, cfg, target, launch=None):
            super().__init__(cfg, target, launch)
            self.rngs = [torch.Generator().manual_seed(rank_seed(cfg.seed, r)) for r in range(world)]

        def draw(self, rng):
            whole = self.batch, self.target_batch
            self.batch, self.target_batch = whole[0] // world, whole[1] // world
            parts = [method_cls.draw(self, g) for g in self.rngs]
            self.batch, self.target_batch = whole
            return torch.cat([z for z, _, _ in parts]), None, {None: torch.cat([p[None] for _, _, p in parts])}

    return Concatenated


def _params(run: Run) -> dict:
    return {k: v.clone() for k, v in run.model.state_dict().items()}


class FolderAccess:
    """Records this process's opens, creations and renames of paths under ``folder`` (an audit hook)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.events = str(folder), []
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple) -> None:
        if event in ("open", "os.mkdir", "os.rename", "os.replace", "os.remove") and any(str(a).startswith(self.folder) for a in args[:2]):
            self.events.append((event, str(args[0])))


def _training_job(rank, world, out, folder):
    access = FolderAccess(folder)
    launch = Launch.of(dist.group.WORLD, timeout=60.0)
    for name, method in (("drifting", "drifting"), ("sinkhorn_loss", "sinkhorn_loss")):
        run = Run.open(_tiny(folder / name, method=method), METHODS[method], launch=launch)
        out[f"{name}/init/{rank}"] = _params(run)
        out[f"{name}/summary/{rank}"] = run.train()
        out[f"{name}/params/{rank}"] = _params(run)
    out[f"access/{rank}"] = access.events


def test_two_rank_training_equals_one_process_on_the_concatenated_batch(tmp_path):
    out = _spawn(2, _training_job, tmp_path / "ranks")
    for name, method_cls in (("drifting", Drifting), ("sinkhorn_loss", SinkhornLoss)):
        run = Run.open(_tiny(tmp_path / "one" / name, method=name), _concatenated(method_cls, 2))
        init = _params(run)
        summary = run.train()
        ref = _params(run)
        for key, want in ref.items():
            a, b = out[f"{name}/params/0"][key], out[f"{name}/params/1"][key]
            assert torch.equal(out[f"{name}/init/0"][key], init[key])  # identical initialisation
            assert torch.equal(a, b), (name, key)  # DDP keeps the ranks identical
            torch.testing.assert_close(a, want, rtol=1e-9, atol=1e-11, msg=f"{name} {key}")
        assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-2  # the runs did move the weights
        assert out[f"{name}/summary/0"]["loss"] == pytest.approx(summary["loss"], rel=1e-9)
    # Rank 0 alone touches the run folders, which hold what a single-process run writes.
    assert out["access/1"] == [] and out["access/0"]
    for name in ("drifting", "sinkhorn_loss"):
        folder = tmp_path / "ranks" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (tmp_path / "one" / name).iterdir())
        config = json.loads((folder / "config.json").read_text())
        assert (config["world_size"], config["rank_batch"], config["batch"]) == (2, 16, 32)
        assert [r["step"] for r in read_metrics(folder)] == [1, 2, 3]  # logged once per step
        assert load_checkpoint(folder)["world_size"] == 2 and len(load_checkpoint(folder)["ranks"]) == 2


def _resume_job(rank, world, out, folder):
    launch = Launch.of(dist.group.WORLD, timeout=60.0)
    for method, extra in (("drifting", {"minibatch": 16}), ("nsgf", {"flow_steps": 3, "plan": "one_sided"})):
        settings = dict(method=method, steps=8, **extra)
        train(_tiny(folder / method / "straight", **settings), group=launch)
        train(_tiny(folder / method / "resumed", **{**settings, "steps": 4}), group=launch)  # stops at step 4
        train(_tiny(folder / method / "resumed", **settings), resume=True, group=launch)


def test_resumed_two_rank_run_continues_like_an_uninterrupted_one(tmp_path):
    _spawn(2, _resume_job, tmp_path)
    for method in ("drifting", "nsgf"):
        a, b = load_checkpoint(tmp_path / method / "straight"), load_checkpoint(tmp_path / method / "resumed")
        assert a["step"] == b["step"] == 8
        for key in ("model", "ema"):
            for name, tensor in a[key].items():
                assert torch.equal(tensor, b[key][name]), (method, key, name)
        logs = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / method / p)] for p in ("straight", "resumed")]
        assert logs[0] == logs[1] and len(logs[0]) >= 4 and logs[0][-1]["step"] == 8  # drifting logs once per round of 2 steps


def _mismatch_job(rank, world, out, folder):
    launch = Launch.of(dist.group.WORLD, timeout=30.0)
    cases = {
        "lr": _tiny(folder / "lr", lr=0.01 * (rank + 1)),
        "batch": _tiny(folder / "batch", batch=33),
        "warm": _tiny(folder / "warm", sinkhorn_warm=True),
        "nan": _tiny(folder / "nan"),
    }
    if rank == 1:  # this rank's loss becomes NaN at the first step
        original = torch.nn.functional.mse_loss
        torch.nn.functional.mse_loss = lambda *a, **k: original(*a, **k) * float("nan")
    for name, cfg in cases.items():
        try:
            train(cfg, group=launch)
            out[f"{name}/{rank}"] = "returned"
        except driftops.DriftopsError as err:
            out[f"{name}/{rank}"] = f"{type(err).__name__}: {err}"


def test_mismatched_settings_and_failures_raise_on_every_rank(tmp_path):
    out = _spawn(2, _mismatch_job, tmp_path)
    for name in ("lr", "batch", "warm", "nan"):
        assert out[f"{name}/0"] == out[f"{name}/1"] != "returned", name
    assert "lr: rank 0 0.01, rank 1 0.02" in out["lr/0"]
    assert "batch (33) is the global batch" in out["batch/0"] and "--batch 32 or 34" in out["batch/0"]
    assert "sinkhorn-warm" in out["warm/0"]
    assert out["nan/0"].startswith("DivergenceError: the loss became nan on rank 1 of 2 at step 0")


def test_train_cli_under_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "driftops", "train",
        "--target", "checkerboard", "--plan", "sinkhorn", "--eps", "0.5", "--steps", "3", "--batch", "64", "--hidden", "16",
        "--blocks", "1", "--backend", "dense", "--sinkhorn-iters", "50", "--eval-points", "200", "--log-every", "1",
        "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 reports, once
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["world_size"], config["rank_batch"]) == (2, 32)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "samples.png").is_file()

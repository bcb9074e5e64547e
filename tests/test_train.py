"""Trainers: they learn, flow-then-fit is the drifting loss, checkpoints are atomic, resume is exact, commands run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import driftops
from driftops.errors import DriftopsError
from driftops.data import load_points
from driftops.train import METHODS, Drifting, Run, TrainConfig, evaluate, load_checkpoint, read_metrics, sample_run, save_samples, train

REPO = Path(__file__).resolve().parents[1]


def tiny(out: Path, **overrides) -> TrainConfig:
    """A CPU-cheap configuration on 8-Gaussians (small MLP, dense backend, one thread)."""
    base = dict(
        target="8gaussians", out=str(out), batch=128, hidden=32, blocks=2, noise_dim=4, lr=3e-3, eps=[1.0],
        backend="dense", sinkhorn_iters=50, eval_points=300, checkpoint_every=50, progress=False, threads=1,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "method, plan, extra",
    [
        ("drifting", "one_sided", {}),
        ("drifting", "sinkhorn", {"minibatch": 64, "steps": 100}),
        ("sinkhorn_loss", "sinkhorn", {"steps": 100}),
        ("nsgf", "sinkhorn", {"flow_steps": 10, "step_size": 1.0}),
    ],
)
def test_trainer_reduces_w2(tmp_path, method, plan, extra):
    cfg = tiny(tmp_path / "run", method=method, plan=plan, **{"steps": 150, **extra})
    run = Run.open(cfg, METHODS[method])
    before = run.evaluate_w2()
    run.train()
    after = run.evaluate_w2()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("plan", ["one_sided", "sinkhorn"])
def test_one_flow_step_fit_is_the_drifting_loss(tmp_path, plan):
    """batch == minibatch, one drift step of size 1: the round's gradient is that of MSE(x, stopgrad(x + V))."""
    cfg = tiny(tmp_path / "run", plan=plan, dtype="float64", batch=64, sinkhorn_tol=1e-9, sinkhorn_iters=200)
    run = Run.open(cfg, Drifting)
    params = list(run.model.parameters())
    state = run.rng.get_state()
    seen = []

    def capture(loss):
        run.model.zero_grad()
        loss.backward()
        seen.append([p.grad.clone() for p in params])
        run.step += 1

    run.optimise = capture
    run.method.round(run)
    run.rng.set_state(state)
    z, labels, positives = run.method.draw(run.rng)
    x = run.model(z, labels)
    v = driftops.drift(x.detach(), positives[None], cfg.eps, plan, backend="dense", tol=1e-9, max_iter=200)
    run.model.zero_grad()
    F.mse_loss(x, (x + v).detach()).backward()
    assert len(seen) == 1
    for got, p in zip(seen[0], params):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp." in p.name]


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    cfg = tiny(tmp_path / "run", plan="one_sided", steps=4, checkpoint_every=2)
    run = Run.open(cfg, Drifting)
    run.train()
    assert _temp_files(run.dir) == []
    good = (run.dir / "checkpoint.pt").read_bytes()

    def crash(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    run.step = 99
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        run.save()
    monkeypatch.undo()
    assert (run.dir / "checkpoint.pt").read_bytes() == good
    assert load_checkpoint(run.dir)["step"] == 4
    assert _temp_files(run.dir) == []


@pytest.mark.parametrize(
    "method, extra",
    [("drifting", {"batch": 64, "minibatch": 32}), ("drifting", {"batch": 64, "sinkhorn_warm": True}), ("nsgf", {"flow_steps": 5})],
)
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, method, extra):
    common = dict(method=method, plan="sinkhorn", steps=12, checkpoint_every=4, log_every=1, **extra)
    train(tiny(tmp_path / "straight", **common))
    method_cls = METHODS[method]
    original = method_cls.round
    calls = []

    def crashing_round(self, run):
        calls.append(run.step)
        if run.step >= 10:
            raise KeyboardInterrupt  # killed between checkpoints (the last one is at step 8)
        return original(self, run)

    monkeypatch.setattr(method_cls, "round", crashing_round)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "resumed", **common))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed")["step"] == 8
    with pytest.raises(DriftopsError, match="resume"):
        train(tiny(tmp_path / "resumed", **common))
    train(tiny(tmp_path / "resumed", **common), resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    log_a, log_b = ([{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / p)] for p in ("straight", "resumed"))
    assert log_a == log_b and len(log_a) >= 6 and log_a[-1]["step"] == 12


def test_resume_reads_checkpoints_that_keep_one_rank_state_at_the_top_level(tmp_path):
    common = dict(plan="one_sided", steps=6, checkpoint_every=3)
    train(tiny(tmp_path / "straight", **common))
    train(tiny(tmp_path / "old", **{**common, "steps": 3}))
    ckpt = load_checkpoint(tmp_path / "old")
    (own,) = ckpt.pop("ranks")
    del ckpt["world_size"]
    torch.save({**ckpt, **own}, tmp_path / "old" / "checkpoint.pt")  # the single-process layout: rng and method on top
    train(tiny(tmp_path / "old", **common), resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "old")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_conditional_digits_training_and_eval(tmp_path):
    cfg = tiny(tmp_path / "run", target="digits", latent_dim=8, conditional=True, plan="one_sided", steps=10, batch=100, target_batch=500, eps=[2.0])
    train(cfg)
    result = evaluate(cfg.out, n=300)
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["coverage"] <= 1
    assert set(result["w2_per_class"]) == {str(k) for k in range(10)}
    assert (Path(cfg.out) / "digits.png").is_file()
    points, labels = sample_run(cfg.out, 25)
    assert points.shape == (25, 8) and labels.tolist() == [k % 10 for k in range(25)]
    save_samples(tmp_path / "s.npz", points, labels, [str(k) for k in range(10)])
    back = load_points(tmp_path / "s.npz")  # one array per class, as the loader reads class data
    assert back.classes == [str(k) for k in range(10)] and torch.allclose(back.per_class()["3"], points[labels == 3])


def test_bad_configurations_raise(tmp_path):
    with pytest.raises(DriftopsError, match="conditional"):
        Run(tiny(tmp_path / "a", conditional=True), Drifting)
    with pytest.raises(DriftopsError, match="multiple of minibatch"):
        tiny(tmp_path / "b", batch=100, minibatch=30)
    with pytest.raises(DriftopsError, match="one eps"):
        train(tiny(tmp_path / "c", method="sinkhorn_loss", eps=[0.1, 1.0]))
    with pytest.raises(DriftopsError, match="unknown target"):
        Run(tiny(tmp_path / "d", target="nonsense"), Drifting)
    with pytest.raises(DriftopsError, match="applies to --method nsgf"):
        tiny(tmp_path / "e", source="moons")
    with pytest.raises(DriftopsError, match="source must be 'gaussian' or a toy"):
        tiny(tmp_path / "f", method="nsgf", source="digits")
    with pytest.raises(DriftopsError, match="a toy source is 2D"):
        Run(tiny(tmp_path / "g", method="nsgf", source="moons", target="digits", latent_dim=8), METHODS["nsgf"])


def test_nsgf_flows_from_a_toy_source(tmp_path):
    """With --source, the pool's first particles and the samples start from the source toy, and the flow learns to
    carry it to the target."""
    cfg = tiny(tmp_path / "run", method="nsgf", source="scurve", flow_steps=10, step_size=1.0, steps=150)
    run = Run.open(cfg, METHODS["nsgf"])
    gen = torch.Generator().manual_seed(5)
    torch.testing.assert_close(run.method.start(64, gen), driftops.data.sample_toy("s_curve", 64, torch.Generator().manual_seed(5)))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 (a velocity field that does not move the points)
    torch.testing.assert_close(run.method.sample(zero, 64, None, torch.Generator().manual_seed(5)), run.method.start(64, torch.Generator().manual_seed(5)))
    before = run.evaluate_w2()
    run.train()
    assert run.method.pool["x"][: cfg.batch].std(0)[1] > 1.0  # the S-curve's spread in z, not N(0, 1)'s
    assert run.evaluate_w2() < 0.5 * before


def test_train_and_eval_commands(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    train_cmd = [
        sys.executable, "-m", "driftops", "train", "--method", "drifting", "--target", "checkerboard", "--plan", "two_sided",
        "--eps", "0.5", "1.0", "--steps", "6", "--batch", "64", "--hidden", "16", "--blocks", "1", "--backend", "dense",
        "--eval-every", "3", "--eval-points", "200", "--threads", "1", "--out", str(out), "--no-progress",
    ]
    subprocess.run(train_cmd, check=True, cwd=tmp_path, env=env, capture_output=True)
    assert json.loads((out / "config.json").read_text())["eps"] == [0.5, 1.0]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    subprocess.run([sys.executable, "-m", "driftops", "eval", str(out), "--n", "200"], check=True, cwd=tmp_path, env=env, capture_output=True)
    result = json.loads((out / "eval.json").read_text())
    assert result["w2"] > 0 and result["w2_exact"]
    for name in ("samples.png", "curves.png"):
        assert (out / name).is_file()


def test_paper_preset_builds_the_protocol(tmp_path):
    cfg = TrainConfig.from_preset("paper", target="8gaussians", plan="sinkhorn", eps=[0.01], out=str(tmp_path / "p"))
    assert (cfg.batch, cfg.steps, cfg.lr, cfg.sinkhorn_iters, cfg.eval_every, cfg.eval_points) == (1024, 5000, 2e-4, 20, 100, 1000)
    assert cfg.target == "eight_gaussians" and cfg.flow_options()["solver"].max_iter == 20
    run = Run(cfg, Drifting)
    assert sum(p.numel() for p in run.model.parameters()) == 1_592_066
    assert run.ema is run.model and not run.cfg.grad_clip  # no EMA copy, no clipping
    assert isinstance(run.optimizer, torch.optim.AdamW) and run.optimizer.param_groups[0]["lr"] == 2e-4
    assert not (tmp_path / "p").exists()  # building a Run writes nothing


def test_one_forward_pass_per_round(tmp_path):
    run = Run.open(tiny(tmp_path / "run", plan="sinkhorn", steps=1), Drifting)
    calls = []
    run.model.register_forward_hook(lambda *a: calls.append(1))
    run.method.round(run)
    assert len(calls) == 1 and run.step == 1


def test_sample_command_and_held_out_eval(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, plan="one_sided", steps=5))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "driftops", "sample", str(out), "--n", "123", "--out", str(tmp_path / "s.npy"), "--seed", "4"]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, capture_output=True)
    points, labels = sample_run(out, 123, seed=4)
    assert labels is None and points.shape == (123, 2)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), points.numpy())
    held_out = tmp_path / "held.npy"
    np.save(held_out, points.numpy()[:100])
    result = evaluate(out, n=100, seed=4, target_file=held_out)  # the same samples as reference: W2^2 is 0
    assert result["n"] == 100 and result["w2"] < 1e-10 and result["target_file"] == str(held_out)
    assert evaluate(out, n=100, seed=5, target_file=held_out)["w2"] > 1e-4

"""The driftops command line, end to end through ``python -m driftops``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from driftops.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "driftops", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_flow_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = cli("flow", "--n", "300", "--steps", "3", "--eps", "0.5", "--backend", "dense", "--dtype", "float64", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "metrics.json", "particles.npy", "flow.png", "trails.png", "history.png", "flow.gif"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["n"] == 300 and config["steps"] == 3 and config["target"] == "checkerboard" and config["device"] == "cpu"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["wall_time"] > 0 and m["history"]["step"] == [1, 2, 3]
    assert m["history"]["metric_step"] == [0, 1, 2, 3]  # about 10 estimates by default, at most one per step
    assert config["metric_every"] == 1
    assert 0 < m["final_w2"] < 0.5 * m["initial_w2"]
    for name in ("flow.png", "trails.png", "history.png"):
        assert (out / name).stat().st_size > 5000
    with Image.open(out / "flow.gif") as im:
        assert im.n_frames == 4
    assert "W2^2" in r.stdout
    above = sum(e >= config["tol"] for e in m["history"]["marginal_error"])
    assert config["max_iter"] == 1000 and config["acceleration"] == "adaptive" and above == 0
    assert "0 of 3 steps stopped above --tol" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["flow", "--target", "banana"], "unknown target 'banana'"),
        (["flow", "--plan", "both"], "invalid choice: 'both'"),
        (["flow", "--eps", "0"], "must be a positive number"),
        (["flow", "--eps", "-1"], "must be a positive number"),
        (["flow", "--n", "0"], "must be a positive integer"),
        (["flow", "--target", "missing.npy"], "does not exist"),
        (["bench", "nope"], "invalid choice: 'nope'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2(args, message, tmp_path, capsys):
    extra = ["--out", str(tmp_path), "--no-progress"] if args[0] == "flow" else []
    try:
        status = main(args + extra)
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [[], ["flow"], ["bench"], ["train"], ["eval"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main(command + ["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith("usage: driftops") and "--help" in out


def test_version_and_bench_script_missing():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "driftops 0.1.0"
    r = cli("bench", "flow") if not (ROOT / "benchmarks" / "bench_flow.py").exists() else None
    if r is not None:
        assert r.returncode == 2 and "bench_flow.py not found" in r.stderr

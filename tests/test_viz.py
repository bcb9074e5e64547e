"""Figures of flows: files written, non-empty, with the expected pixel sizes and frame counts."""

import matplotlib.figure
import pytest
import torch
from PIL import Image

import driftops
from driftops import viz
from driftops.data import sample_toy


@pytest.fixture(scope="module")
def flows():
    y = sample_toy("moons", 150, seed=1, dtype=torch.float64)
    x0 = torch.randn(150, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(steps=4, eps=0.5, backend="dense", tol=1e-2, progress=False, snapshot_every=1)
    return y, {p: driftops.flow(x0, y, plan=p, **kw) for p in ("one_sided", "sinkhorn")}


def test_figures(tmp_path, flows):
    y, res = flows
    r = res["sinkhorn"]
    sizes = {}
    for path in (
        viz.plot_snapshots(r, y, tmp_path / "a" / "flow.png", panels=4),
        viz.plot_trails(r, tmp_path / "trails.png", n_trails=50, target=y),
        viz.plot_history(r, tmp_path / "history.png"),
        viz.plot_compare(res, y, tmp_path / "compare.png"),
    ):
        assert path.is_file() and path.stat().st_size > 5000
        with Image.open(path) as im:
            assert im.format == "PNG"
            sizes[path.name] = im.size
    w, h = sizes["flow.png"]
    assert w > 3 * h  # one row of 4 square panels
    assert sizes["compare.png"][0] > 2 * sizes["compare.png"][1]
    assert abs(sizes["trails.png"][0] - sizes["trails.png"][1]) < 0.2 * sizes["trails.png"][0]


def test_gif(tmp_path, flows):
    y, res = flows
    path = viz.save_gif(res["sinkhorn"], tmp_path / "flow.gif", target=y)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == len(res["sinkhorn"].snapshots) == 5
        assert im.size[0] > 200 and im.size[1] > 200


def test_a_failed_figure_leaves_the_old_file(tmp_path, flows, monkeypatch):
    y, res = flows
    path = viz.plot_history(res["sinkhorn"], tmp_path / "history.png")
    good = path.read_bytes()

    def crash(self, fname, *args, **kwargs):
        open(fname, "wb").write(b"half a figure")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", crash)
    with pytest.raises(OSError, match="simulated"):
        viz.plot_history(res["one_sided"], path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["history.png"]


def test_bad_input(tmp_path):
    with pytest.raises(driftops.DriftopsError, match="FlowResult"):
        viz.plot_history(None, tmp_path / "x.png")
    with pytest.raises(driftops.DriftopsError, match="results is empty"):
        viz.plot_compare({}, torch.zeros(3, 2), tmp_path / "x.png")


def test_run_figures(tmp_path):
    y = sample_toy("checkerboard", 400, seed=1)
    x = sample_toy("checkerboard", 300, seed=2) * 0.9
    runs = torch.rand(3, 5).numpy() + 0.1
    path = viz.plot_curve_bands({"checkerboard eps=0.01": {"sinkhorn": (range(0, 500, 100), runs)}, "b": {"one_sided": (range(5), runs)}}, tmp_path / "curves.png")
    with Image.open(path) as im:
        assert im.size[0] > 1.5 * im.size[1]  # two panels side by side
    cells = {(r, c): (x, y, f"W2²={i:.3f}") for i, (r, c) in enumerate([("one_sided", "eps=0.1"), ("sinkhorn", "eps=0.1"), ("sinkhorn", "eps=0.01")])}
    path = viz.plot_scatter_grid(cells, tmp_path / "grid.png", ["one_sided", "sinkhorn"], ["eps=0.1", "eps=0.01"])
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 300
    canvas = viz.digit_grid(torch.ones(20, 8, 8), torch.arange(20) % 10, per_class=2)
    assert canvas.shape == (91, 19) and canvas.sum() == 20 * 64
    with pytest.raises(driftops.DriftopsError, match="cells is empty"):
        viz.plot_scatter_grid({}, tmp_path / "x.png", [], [])

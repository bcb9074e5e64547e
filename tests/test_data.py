import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from driftops.data import TOYS, load_digits, load_points, load_target, resolve_target, sample_toy
from driftops.errors import DriftopsError


@pytest.mark.parametrize("name", list(TOYS))
def test_toys_seeded_shapes_and_support(name):
    x = sample_toy(name, 1001, seed=3)
    assert x.shape == (1001, 2) and x.dtype == torch.float32
    assert torch.equal(x, sample_toy(name, 1001, seed=3))
    assert not torch.equal(x, sample_toy(name, 1001, seed=4))
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample_toy(name, 50, gen_a), sample_toy(name, 50, gen_b))
    assert not torch.equal(sample_toy(name, 50, gen_a), sample_toy(name, 50, torch.Generator().manual_seed(1)))  # advanced
    # torchcfm's toys are larger (radius 5) and its moons are not centred (mean (0.8, 0.05)).
    bound, centre = (8.0, 1.0) if name.startswith("cfm_") else (5.0, 0.5)
    assert x.abs().max() < bound and x.mean(0).abs().max() < centre


def _uniform_fraction(counts: torch.Tensor) -> torch.Tensor:
    return counts.float() / counts.sum()


def test_eight_gaussians_paper_parameters():
    """Radius 2, std 0.08, equal weights: offsets from the nearest centre have variance 0.08^2 per axis."""
    x = sample_toy("eight_gaussians", 40000, seed=0, dtype=torch.float64)
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 2 * torch.stack([angles.cos(), angles.sin()], 1)
    nearest = torch.cdist(x, centres).argmin(1)
    offsets = x - centres[nearest]
    assert offsets.mean(0).abs().max() < 0.002
    torch.testing.assert_close(offsets.var(0), torch.full((2,), 0.08**2, dtype=torch.float64), rtol=0.03, atol=0)
    assert (_uniform_fraction(torch.bincount(nearest, minlength=8)) - 1 / 8).abs().max() < 0.006
    assert abs(float(x.norm(dim=1).mean()) - 2.0) < 0.01
    ffjord = sample_toy("ffjord_8gaussians", 20000, seed=0)  # alias of ffjord_eight_gaussians
    assert abs(float(ffjord.norm(dim=1).mean()) - 2 * math.sqrt(2)) < 0.05


def test_checkerboard_paper_parameters():
    """4x4 tiles on [-2, 2]^2 (i + j even), equal weights, Gaussian noise 0.05."""
    x = sample_toy("checkerboard", 40000, seed=0, dtype=torch.float64)
    clean = sample_toy(replace(TOYS["checkerboard"], noise=0.0), 40000, seed=0, dtype=torch.float64)
    assert clean.abs().max() <= 2.0 and clean.abs().max() > 1.99
    cells = torch.floor(clean + 2).long()
    assert ((cells.sum(1) % 2) == 0).all()
    tiles, counts = torch.unique(cells, dim=0, return_counts=True)
    assert len(tiles) == 8 and (_uniform_fraction(counts) - 1 / 8).abs().max() < 0.006
    # Same draws but the noise: the noise is the difference, N(0, 0.05^2) per axis.
    noise = x - clean
    torch.testing.assert_close(noise.std(0), torch.full((2,), 0.05, dtype=torch.float64), rtol=0.02, atol=0)
    # Marginals: uniform on [-2, 2] (variance 4/3) plus the noise.
    torch.testing.assert_close(x.var(0), torch.full((2,), 4 / 3 + 0.05**2, dtype=torch.float64), rtol=0.02, atol=0)
    ffjord = sample_toy("ffjord_checkerboard", 5000)
    assert ((torch.floor(ffjord[:, 0] / 2) + torch.floor(ffjord[:, 1] / 2)) % 2 == 0).all() and ffjord.abs().max() <= 4
    with pytest.raises(DriftopsError, match="even number of tiles"):
        replace(TOYS["checkerboard"], tiles=3)


def test_moons_and_spiral_paper_parameters():
    moons = sample_toy("moons", 40000, seed=0, dtype=torch.float64)
    clean = sample_toy(replace(TOYS["moons"], noise=0.0), 40000, seed=0, dtype=torch.float64)
    centre = torch.tensor([0.5, 0.25], dtype=torch.float64)
    upper = ((clean + centre).norm(dim=1) - 1).abs() < 1e-9
    lower = ((clean + centre - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 1).abs() < 1e-9
    assert (upper | lower).all() and abs(float(upper.double().mean()) - 0.5) < 0.01
    torch.testing.assert_close((moons - clean).std(0), torch.full((2,), 0.08, dtype=torch.float64), rtol=0.02, atol=0)
    assert moons.mean(0).abs().max() < 0.01
    spiral = sample_toy("spiral", 40000, seed=0, dtype=torch.float64)
    bare = sample_toy(replace(TOYS["spiral"], noise=0.0), 40000, seed=0, dtype=torch.float64)
    torch.testing.assert_close((spiral - bare).std(0), torch.full((2,), 0.05, dtype=torch.float64), rtol=0.02, atol=0)
    r = bare.norm(dim=1)
    assert r.max() <= 2.0 + 1e-9 and abs(float((r / 2).pow(2).mean()) - 0.5) < 0.01  # s = r / radius, s^2 uniform
    assert bare.mean(0).abs().max() < 0.02  # the two arms mirror each other


def test_s_curve_follows_scikit_learn():
    """Noise-free points lie on (sin t, sign(t)(cos t - 1)) with t uniform on [-3pi/2, 3pi/2]; noise 0.05 per axis;
    moments match scikit-learn's make_s_curve in its (x, z) plane."""
    from sklearn.datasets import make_s_curve

    noisy = sample_toy("scurve", 40000, seed=0, dtype=torch.float64)
    bare = sample_toy(replace(TOYS["s_curve"], noise=0.0), 40000, seed=0, dtype=torch.float64)
    t = 3 * math.pi * (torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5)  # its first draw
    torch.testing.assert_close(torch.stack([t.sin(), t.sign() * (t.cos() - 1)], 1), bare, atol=1e-12, rtol=0)
    torch.testing.assert_close((noisy - bare).std(0), torch.full((2,), 0.05, dtype=torch.float64), rtol=0.02, atol=0)
    ref = torch.from_numpy(make_s_curve(40000, noise=0.05, random_state=0)[0][:, [0, 2]])
    torch.testing.assert_close(noisy.std(0), ref.std(0), rtol=0.02, atol=0)
    assert noisy.mean(0).abs().max() < 0.03


def test_torchcfm_toys_follow_torchcfm():
    """cfm_eight_gaussians: centres k*pi/4 on radius 5, covariance sqrt(0.1) I, equal weights; cfm_moons: torchdyn's
    half-circles moved along (1, 1) by U(0, 0.2), times 3, minus 1."""
    pts = sample_toy("cfm_8gaussians", 40000, seed=0, dtype=torch.float64)
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 5 * torch.stack([angle.cos(), angle.sin()], 1)
    mode = torch.cdist(pts, centres).argmin(1)
    torch.testing.assert_close((pts - centres[mode]).var(0), torch.full((2,), math.sqrt(0.1), dtype=torch.float64), rtol=0.03, atol=0)
    assert (torch.bincount(mode, minlength=8) / 40000 - 1 / 8).abs().max() < 0.01
    moons = sample_toy("cfm_moons", 40000, seed=0, dtype=torch.float64)
    bare = (sample_toy(replace(TOYS["cfm_moons"], shift=0.0), 40000, seed=0, dtype=torch.float64) + 1) / 3
    upper = (bare.norm(dim=1) - 1).abs() < 1e-9
    lower = ((bare - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 1).abs() < 1e-9
    assert (upper | lower).all() and abs(float(upper.double().mean()) - 0.5) < 0.01
    shift = (moons + 1) / 3 - bare
    torch.testing.assert_close(shift[:, 0], shift[:, 1], atol=1e-12, rtol=0)
    assert shift.min() >= 0 and shift.max() <= 0.2 and abs(float(shift[:, 0].mean()) - 0.1) < 0.002
    assert abs(float(shift[:, 0].std()) - 0.2 / math.sqrt(12)) < 0.002


def test_torchcfm_runner_toys_follow_its_data_modules():
    """cfm_runner_moons: make_moons(noise=0.05) times 2, x minus 1; cfm_runner_s_curve: make_s_curve(noise=0.05) in
    (x, z) times 1.5; cfm_runner_eight_gaussians: torchdyn's 8 unit-circle centres at k*pi/4 with std 1."""
    from sklearn.datasets import make_moons, make_s_curve

    moons = sample_toy("cfm_runner_moons", 40000, seed=0, dtype=torch.float64)
    bare = sample_toy(replace(TOYS["cfm_runner_moons"], noise=0.0), 40000, seed=0, dtype=torch.float64)
    unit = (bare + torch.tensor([1.0, 0.0], dtype=torch.float64)) / 2  # back to make_moons' frame
    upper = (unit.norm(dim=1) - 1).abs() < 1e-9
    lower = ((unit - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 1).abs() < 1e-9
    assert (upper | lower).all() and abs(float(upper.double().mean()) - 0.5) < 0.01
    torch.testing.assert_close((moons - bare).std(0), torch.full((2,), 0.1, dtype=torch.float64), rtol=0.02, atol=0)
    ref = torch.from_numpy(make_moons(40000, noise=0.05, random_state=0)[0]) * 2 - torch.tensor([1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(moons.mean(0), ref.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(moons.std(0), ref.std(0), rtol=0.02, atol=0)
    scurve = sample_toy("cfm_runner_scurve", 40000, seed=0, dtype=torch.float64)
    torch.testing.assert_close(scurve, 1.5 * sample_toy("s_curve", 40000, seed=0, dtype=torch.float64), atol=1e-12, rtol=0)
    ref = torch.from_numpy(make_s_curve(40000, noise=0.05, random_state=0)[0][:, [0, 2]]) * 1.5
    torch.testing.assert_close(scurve.std(0), ref.std(0), rtol=0.02, atol=0)
    gauss = sample_toy("cfm_runner_8gaussians", 40000, seed=0, dtype=torch.float64)
    clean = sample_toy(replace(TOYS["cfm_runner_eight_gaussians"], std=0.0), 40000, seed=0, dtype=torch.float64)
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = torch.stack([angle.cos(), angle.sin()], 1)
    mode = torch.cdist(clean, centres).min(1)
    assert mode.values.max() < 1e-12 and (torch.bincount(mode.indices, minlength=8) / 40000 - 1 / 8).abs().max() < 0.01
    torch.testing.assert_close((gauss - clean).std(0), torch.ones(2, dtype=torch.float64), rtol=0.02, atol=0)
    torch.testing.assert_close(gauss.var(0), torch.full((2,), 1.5, dtype=torch.float64), rtol=0.03, atol=0)  # 1/2 + 1


def test_rings_radii():
    r = sample_toy("rings", 4000).norm(dim=1)
    off = (r[:, None] - torch.tensor([0.875, 1.75, 2.625, 3.5])).abs().min(1).values
    assert (off < 0.4).float().mean() > 0.99


def test_one_target_parser():
    assert resolve_target("8gaussians") == "eight_gaussians" and resolve_target("checkerboard") == "checkerboard"
    assert resolve_target("digits") == "digits" and resolve_target("a/b.npz") == "a/b.npz"
    with pytest.raises(DriftopsError, match="unknown target 'banana'.*8gaussians"):
        resolve_target("banana")
    assert torch.equal(sample_toy("8gaussians", 10, seed=1), sample_toy("eight_gaussians", 10, seed=1))
    with pytest.raises(DriftopsError, match="not a toy"):
        sample_toy("digits", 10)


def test_unknown_toy_and_bad_n():
    with pytest.raises(DriftopsError, match="checkerboard"):
        sample_toy("checkerbord", 10)
    with pytest.raises(DriftopsError, match="positive integer"):
        sample_toy("moons", 0)


def test_digits_pixels():
    d = load_digits()
    assert d.x.shape == (1797, 64) and d.x.dtype == torch.float32
    assert d.labels.dtype == torch.int64 and d.classes == [str(i) for i in range(10)]
    assert d.x.min() == 0 and d.x.max() == 1
    groups = d.per_class()
    assert len(groups) == 10 and sum(len(g) for g in groups.values()) == 1797
    assert torch.equal(d.decode(d.x[:3]), d.x[:3].reshape(3, 8, 8))


def test_digits_pca_round_trip():
    full = load_digits(latent_dim=64)
    images = load_digits().x
    assert torch.allclose(full.decode(full.encode(images)).reshape(-1, 64), images, atol=1e-4)
    assert torch.allclose(full.encode(full.decode(full.x[:20])), full.x[:20], atol=1e-3)
    d = load_digits(latent_dim=20)
    assert d.x.shape == (1797, 20)
    assert abs(float(d.x.var(0).mean()) - 1.0) < 1e-3
    recon = d.decode(d.x)
    assert recon.shape == (1797, 8, 8) and recon.min() >= 0 and recon.max() <= 1
    assert float((recon.reshape(-1, 64) - images).pow(2).mean()) < 0.01
    with pytest.raises(DriftopsError, match="latent_dim"):
        load_digits(latent_dim=65)


def test_npy_npz_round_trip(tmp_path):
    a = np.random.default_rng(0).normal(size=(30, 5))
    np.save(tmp_path / "cloud.npy", a)
    d = load_points(tmp_path / "cloud.npy")
    assert d.classes == ["cloud"] and d.decode is None
    assert np.allclose(d.x.numpy(), a, atol=1e-6) and (d.labels == 0).all()

    b = np.random.default_rng(1).normal(size=(12, 5)).astype(np.float32)
    np.savez(tmp_path / "latents.npz", male=a, female=b)
    d = load_points(str(tmp_path / "latents.npz"))
    assert d.classes == ["male", "female"] and d.x.shape == (42, 5)
    assert torch.equal(d.per_class()["female"], torch.from_numpy(b))
    assert d.labels.tolist() == [0] * 30 + [1] * 12


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.npy", None, "does not exist"),
        ("cloud.txt", "1 2", r"\.npy"),
        ("flat.npy", np.zeros(5), "shape"),
        ("nan.npy", np.array([[0.0, np.nan]]), "NaN"),
        ("mixed.npz", {"a": np.zeros((3, 2)), "b": np.zeros((3, 4))}, "dimensions"),
        ("empty.npz", {}, "no arrays"),
        ("broken.npy", b"not numpy", "cannot read"),
    ],
)
def test_bad_point_files(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    with pytest.raises(DriftopsError, match=match):
        load_points(path)


def test_load_target(tmp_path):
    x, labels = load_target("spiral", 64, seed=2)
    assert labels is None and torch.equal(x, sample_toy("spiral", 64, seed=2))
    x, labels = load_target("digits", 100, seed=0)
    assert x.shape == (100, 64) and labels.shape == (100,)
    assert torch.equal(x, load_target("digits", 100, seed=0)[0])
    np.savez(tmp_path / "t.npz", a=np.zeros((5, 3)), b=np.ones((5, 3)))
    x, labels = load_target(str(tmp_path / "t.npz"), 10, seed=0)
    assert torch.equal(x[:, 0], labels.float())
    with pytest.raises(DriftopsError, match="n <= 10"):
        load_target(str(tmp_path / "t.npz"), 11)
    with pytest.raises(DriftopsError, match="digits"):
        load_target("mnist", 10)

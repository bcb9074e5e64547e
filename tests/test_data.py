import math

import numpy as np
import pytest
import torch

from driftops.data import TOYS, load_digits, load_points, load_target, sample_toy
from driftops.errors import DriftopsError


@pytest.mark.parametrize("name", list(TOYS))
def test_toys_seeded_shapes_and_support(name):
    x = sample_toy(name, 1001, seed=3)
    assert x.shape == (1001, 2) and x.dtype == torch.float32
    assert torch.equal(x, sample_toy(name, 1001, seed=3))
    assert not torch.equal(x, sample_toy(name, 1001, seed=4))
    assert torch.equal(TOYS[name](50, torch.Generator().manual_seed(1)), TOYS[name](50, torch.Generator().manual_seed(1)))
    assert x.abs().max() < 5.0
    assert (x.abs() <= 4.0).all(1).float().mean() > 0.99
    assert x.mean(0).abs().max() < 0.5


def test_sample_toy_dtype_device():
    x = sample_toy("rings", 10, seed=0, dtype=torch.float64)
    assert x.dtype == torch.float64 and x.device.type == "cpu"
    assert torch.allclose(x.float(), sample_toy("rings", 10, seed=0))


def test_checkerboard_alternate_squares():
    x = sample_toy("checkerboard", 5000)
    parity = (torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2)) % 2
    assert (parity == 0).all()
    assert (x.abs() <= 4).all()
    # All 8 white squares are populated, each with about 1/8 of the mass.
    cells = torch.unique(torch.floor(x / 2), dim=0, return_counts=True)[1]
    assert len(cells) == 8 and cells.min() > 500


def test_eight_gaussians_near_centres():
    x = sample_toy("eight_gaussians", 4000)
    angles = torch.arange(8) * math.pi / 4
    centres = 2 * math.sqrt(2) * torch.stack([angles.cos(), angles.sin()], 1)
    dist, nearest = torch.cdist(x, centres).min(1)
    assert dist.mean() < 0.5 and (dist < 1.2).float().mean() > 0.99
    assert torch.bincount(nearest, minlength=8).min() > 400


def test_rings_radii():
    r = sample_toy("rings", 4000).norm(dim=1)
    off = (r[:, None] - torch.tensor([0.875, 1.75, 2.625, 3.5])).abs().min(1).values
    assert (off < 0.4).float().mean() > 0.99


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

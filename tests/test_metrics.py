import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from driftops.data import ClassData, load_digits, sample_toy
from driftops.errors import DriftopsError
from driftops.metrics import class_metrics, mmd, sinkhorn_w2, train_classifier, w2


def test_w2_translation_is_exact():
    x = sample_toy("moons", 300, seed=0)
    v = torch.tensor([1.5, -0.5])
    assert w2(x, x + v) == pytest.approx(2.5, rel=1e-6)
    assert w2(x.numpy(), (x + v).double().numpy()) == pytest.approx(2.5, rel=1e-6)
    assert w2(x, x) == pytest.approx(0.0, abs=1e-10)


def test_w2_weights():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 0.0]])
    assert w2(x, y, x_weights=torch.tensor([3.0, 1.0])) == pytest.approx(0.25)
    with pytest.raises(DriftopsError, match="x_weights"):
        w2(x, y, x_weights=np.array([1.0, -1.0]))


def test_w2_gaussians_closed_form():
    g = torch.Generator().manual_seed(0)
    n = 1500
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    m, s = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64)
    y = m + s * torch.randn(n, 2, generator=g, dtype=torch.float64)
    exact = float(m.pow(2).sum() + (1 - s).pow(2).sum())  # 4.25
    assert w2(x, y) == pytest.approx(exact, rel=0.05)


def test_w2_errors():
    with pytest.raises(DriftopsError, match="sinkhorn_w2"):
        w2(torch.zeros(10_001, 2), torch.zeros(5, 2))
    with pytest.raises(DriftopsError, match="dimension"):
        w2(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(DriftopsError, match="NaN"):
        w2(torch.tensor([[float("nan"), 0.0]]), torch.zeros(3, 2))


def test_sinkhorn_w2_close_to_exact():
    x = sample_toy("moons", 250, seed=0)
    y = sample_toy("eight_gaussians", 250, seed=1)
    assert sinkhorn_w2(x, y) == pytest.approx(w2(x, y), rel=0.02)


def test_sinkhorn_w2_grad_mode_and_collapsed_cloud():
    x = torch.zeros(50, 2, requires_grad=True)
    with torch.no_grad():
        assert sinkhorn_w2(x, x) == pytest.approx(0.0, abs=1e-8)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert sinkhorn_w2(x, torch.ones(30, 2)) == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(DriftopsError, match="eps"):
        sinkhorn_w2(x, x, eps=0.0)


def _dense_mmd(x, y, bandwidths):
    x, y = x.double(), y.double()
    n, m = len(x), len(y)

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s**2)) for s in bandwidths) / len(bandwidths)

    kxx, kyy = k(x, x), k(y, y)
    off = lambda kk, p: (kk.sum() - kk.diagonal().sum()) / (p * (p - 1))  # noqa: E731
    return float(off(kxx, n) + off(kyy, m) - 2 * k(x, y).mean())


def test_mmd_matches_dense_and_detects_shift():
    x = sample_toy("spiral", 300, seed=0)
    y = sample_toy("spiral", 200, seed=1)
    bw = (0.1, 0.5, 2.0)
    assert mmd(x, y, bandwidths=bw) == pytest.approx(_dense_mmd(x, y, bw), abs=1e-10)
    same = mmd(sample_toy("spiral", 1000, seed=2), sample_toy("spiral", 1000, seed=3))
    shifted = mmd(sample_toy("spiral", 1000, seed=2), sample_toy("spiral", 1000, seed=3) + 0.5)
    assert abs(same) < 2e-3 and shifted > 10 * abs(same) and shifted > 0.01
    with pytest.raises(DriftopsError, match="at least 2"):
        mmd(x[:1], y)


@pytest.fixture(scope="module")
def digits_split():
    d = load_digits()
    xa, xb, la, lb = train_test_split(d.x, d.labels, test_size=0.25, stratify=d.labels, random_state=0)
    return ClassData(xa, la, d.classes), xb, lb


def test_classifier_and_class_metrics(digits_split):
    train, x_test, l_test = digits_split
    clf = train_classifier(train)
    assert clf.accuracy > 0.9
    real = class_metrics(x_test, l_test, clf)
    assert real["accuracy"] > 0.9 and real["coverage"] == 1.0
    assert sum(real["counts"].values()) == len(x_test)
    assert min(v for v in real["per_class_accuracy"].values()) > 0.8
    # A collapsed "generator" that always outputs the first test image covers one class of ten.
    collapsed = class_metrics(x_test[:1].expand(200, -1), torch.arange(200) % 10, clf)
    assert collapsed["coverage"] == pytest.approx(0.1) and collapsed["accuracy"] == pytest.approx(0.1)
    with pytest.raises(DriftopsError, match="one label per point"):
        class_metrics(x_test[:5], l_test[:4], clf)

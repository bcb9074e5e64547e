"""Evaluation metrics: exact and Sinkhorn W2^2, multi-bandwidth MMD^2, class accuracy/coverage.

Distances use the cost |x - y|^2 (not halved). Inputs are (N, D) / (M, D) torch tensors or numpy
arrays; every metric returns Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import geomloss
import numpy as np
import torch
from pykeops.torch import LazyTensor

from .checks import as_points
from .costs import diameter, geomloss_params
from .data import ClassData
from .errors import DriftopsError

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

MAX_EXACT_POINTS = 10_000


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated, detached (N, D) and (M, D) tensors in float64 on x's device."""
    x = as_points(x, "x").detach()
    y = as_points(y, "y").detach()
    if x.shape[1] != y.shape[1]:
        raise DriftopsError(f"x has dimension D={x.shape[1]} but y has D={y.shape[1]}; both clouds must live in the same space")
    return x.double(), y.to(device=x.device, dtype=torch.float64)


def _weights(w, n: int, name: str) -> np.ndarray:
    """Weights (n,) as a float64 array summing to 1; uniform when ``w`` is None."""
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w.detach().cpu() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DriftopsError(f"{name} must be {n} finite non-negative weights, not all zero (got shape {w.shape})")
    return w / w.sum()


def w2(x, y, x_weights=None, y_weights=None) -> float:
    """Exact squared 2-Wasserstein distance sum_ij P_ij |x_i - y_j|^2 (POT ``emd2``), uniform weights by default.

    Refuses more than 10k points per cloud (the N x M cost matrix and network simplex); use
    :func:`sinkhorn_w2` there.
    """
    x, y = _pair(x, y)
    n, m = len(x), len(y)
    if max(n, m) > MAX_EXACT_POINTS:
        raise DriftopsError(
            f"w2 is exact and limited to {MAX_EXACT_POINTS} points per cloud (got {n} and {m}); "
            "subsample, or use driftops.metrics.sinkhorn_w2 for large clouds"
        )
    a, b = _weights(x_weights, n, "x_weights"), _weights(y_weights, m, "y_weights")
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
    import ot  # imported on first use: POT loads its own OpenMP runtime and takes a second to import

    cost, log = ot.emd2(a, b, ot.dist(x_np, y_np), numItermax=10_000_000, log=True)
    if log["warning"] is not None:
        raise DriftopsError(f"POT emd2 did not solve the transport problem ({log['warning']}); use sinkhorn_w2 instead")
    return float(cost)


def sinkhorn_w2(x, y, eps: float | None = None) -> float:
    """Debiased Sinkhorn estimate of W2^2 (cost |x - y|^2, temperature ``eps``) through GeomLoss.

    ``eps`` defaults to 1e-4 * diameter^2 (bias well below 1% of the diameter squared); annealing
    uses ``scaling=0.9``. Computed without autograd and leaves the grad mode as it found it.
    """
    x, y = _pair(x, y)
    diam = max(diameter(x, y), 1e-6)
    eps = 1e-4 * diam**2 if eps is None else eps
    if not eps > 0:
        raise DriftopsError(f"eps must be positive (got {eps!r}); pass a small temperature such as 1e-3, or None")
    loss = geomloss.SamplesLoss("sinkhorn", **geomloss_params("sqeuclidean", eps), scaling=0.9, diameter=diam)
    with torch.inference_mode():
        # GeomLoss' p=2 cost is |x - y|^2 / 2.
        return 2.0 * float(loss(x, y))


def _offdiag_kernel_sum(a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, gamma: float) -> float:
    """sum_{i, j: ia_i != ib_j} exp(-gamma |a_i - b_j|^2), lazily (pairs are masked by index)."""
    a_i, b_j = LazyTensor(a[:, None, :]), LazyTensor(b[None, :, :])
    ia_i, ib_j = LazyTensor(ia[:, None, None]), LazyTensor(ib[None, :, None])
    kernel = (-gamma * a_i.sqdist(b_j)).exp() * ((ia_i - ib_j).abs() - 0.5).step()
    return float(kernel.sum(dim=1).sum())


def mmd(x, y, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Unbiased MMD^2 with the kernel k(x, y) = mean_s exp(-|x - y|^2 / (2 s^2)) over ``bandwidths``.

    Diagonal terms of the x-x and y-y sums are excluded by index. Lazy (KeOps, float64), O((N+M) D)
    memory; one compiled formula serves every bandwidth and both self and cross sums.
    """
    x, y = _pair(x, y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise DriftopsError(f"the unbiased MMD needs at least 2 points per cloud (got {n} and {m})")
    if len(bandwidths) == 0 or any(not s > 0 for s in bandwidths):
        raise DriftopsError(f"bandwidths must be a non-empty sequence of positive floats, got {bandwidths!r}")
    # Index labels: the cross sum uses disjoint labels, so it keeps every pair.
    ix = torch.arange(n, dtype=torch.float64, device=x.device)
    iy = torch.arange(n, n + m, dtype=torch.float64, device=x.device)
    total = 0.0
    for s in bandwidths:
        gamma = 0.5 / float(s) ** 2
        kxx = _offdiag_kernel_sum(x, x, ix, ix, gamma) / (n * (n - 1))
        kyy = _offdiag_kernel_sum(y, y, iy, iy, gamma) / (m * (m - 1))
        kxy = _offdiag_kernel_sum(x, y, ix, iy, gamma) / (n * m)
        total += kxx + kyy - 2.0 * kxy
    return total / len(bandwidths)


@dataclass
class Classifier:
    """A classifier fitted on real class-labelled points; ``accuracy`` is its held-out accuracy."""

    model: Pipeline
    accuracy: float
    classes: list[str]

    def predict(self, x) -> np.ndarray:
        """Class indices (N,) for points (N, D)."""
        x = as_points(x, "x").detach().cpu().numpy()
        return self.model.predict(x)


def train_classifier(data: ClassData, test_fraction: float = 0.2, seed: int = 0) -> Classifier:
    """Fit a standardised RBF SVC on a stratified split of ``data``; report accuracy on the held-out part."""
    if len(data.classes) < 2:
        raise DriftopsError(f"a classifier needs at least 2 classes, got {data.classes}; pass a .npz with one array per class")
    x, labels = data.x.numpy(), data.labels.numpy()
    from sklearn.model_selection import train_test_split  # imported on first use (slow, own OpenMP runtime)
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    x_fit, x_test, l_fit, l_test = train_test_split(x, labels, test_size=test_fraction, stratify=labels, random_state=seed)
    model = make_pipeline(StandardScaler(), SVC(C=10.0)).fit(x_fit, l_fit)
    return Classifier(model, float(model.score(x_test, l_test)), list(data.classes))


def class_metrics(generated, labels_requested, classifier: Classifier) -> dict:
    """Class accuracy and coverage of conditionally generated points (N, D) with requested labels (N,).

    ``accuracy``: fraction classified as the class they were generated for; ``coverage``: fraction of
    the K classes receiving at least N/(2K) of the predictions; ``counts``: predictions per class name;
    ``per_class_accuracy``: accuracy per requested class (None when it was never requested).
    """
    requested = np.asarray(torch.as_tensor(labels_requested).cpu(), dtype=np.int64).reshape(-1)
    predicted = classifier.predict(generated)
    if len(requested) != len(predicted):
        raise DriftopsError(f"got {len(predicted)} generated points but {len(requested)} labels; pass one label per point")
    k = len(classifier.classes)
    counts = np.bincount(predicted, minlength=k)
    hits = predicted == requested
    per_class = {
        c: (float(hits[requested == i].mean()) if (requested == i).any() else None) for i, c in enumerate(classifier.classes)
    }
    return {
        "accuracy": float(hits.mean()),
        "coverage": float((counts >= len(predicted) / (2 * k)).mean()),
        "counts": dict(zip(classifier.classes, counts.tolist())),
        "per_class_accuracy": per_class,
    }

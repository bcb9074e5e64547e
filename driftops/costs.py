"""Cost and temperature conventions.

driftops writes every kernel as ``exp(-c(x, y) / eps)`` with
``c = |x - y|^2`` (``"sqeuclidean"``, Gaussian kernel) or ``c = |x - y|``
(``"euclidean"``, Laplacian kernel). GeomLoss writes ``exp(-C / blur^p)`` with
``C = |x - y|^p / p``; :func:`geomloss_params` converts between the two.
"""

from __future__ import annotations

import math

import torch

from .errors import DriftopsError

COSTS = ("sqeuclidean", "euclidean")


def check_cost(cost: str) -> str:
    """Return ``cost`` if it is a known cost name, else raise :class:`DriftopsError`."""
    if cost not in COSTS:
        raise DriftopsError(f"unknown cost {cost!r}; pass one of {', '.join(map(repr, COSTS))}")
    return cost


def cost_power(cost: str) -> int:
    """The exponent p of the distance in the cost: 2 for sqeuclidean, 1 for euclidean."""
    return 2 if check_cost(cost) == "sqeuclidean" else 1


def dense_cost(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """The full (N, M) cost matrix, computed without the matmul shortcut (exact to rounding), one coordinate at a
    time (no (N, M, D) temporary)."""
    sq = None
    for d in range(x.shape[1]):
        diff = x[:, d, None] - y[None, :, d]
        sq = diff * diff if sq is None else sq.addcmul_(diff, diff)
    # Clamping at the smallest normal number keeps the gradient of sqrt finite (zero) at coincident points.
    return sq if cost_power(cost) == 2 else sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def diameter(*clouds: torch.Tensor) -> float:
    """Length of the diagonal of the bounding box of all points (an upper bound on any distance)."""
    flat = [c.detach().reshape(-1, c.shape[-1]) for c in clouds]
    lo = torch.stack([c.amin(0) for c in flat]).amin(0)
    hi = torch.stack([c.amax(0) for c in flat]).amax(0)
    return float((hi - lo).norm())


def max_cost(cost: str, *clouds: torch.Tensor) -> float:
    """An upper bound on c(x, y) over the clouds: the starting temperature of eps-annealing."""
    return max(diameter(*clouds), 1e-12) ** cost_power(cost)


def geomloss_params(cost: str, eps: float) -> dict:
    """``SamplesLoss`` keyword arguments (p, blur) for the driftops (cost, eps) convention."""
    p = cost_power(cost)
    # GeomLoss: exp(-|x-y|^p / (p * blur^p)) must equal exp(-|x-y|^p / eps).
    return {"p": p, "blur": (eps / p) ** (1.0 / p)}


def eps_schedule(start: float, stop: float, factor: float) -> list[float]:
    """Geometric temperatures from ``start`` down to (and ending exactly at) ``stop``."""
    if start <= stop:
        return [stop]
    n = int(math.ceil(math.log(stop / start) / math.log(factor)))
    return [start * factor**k for k in range(n)] + [stop]

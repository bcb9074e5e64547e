"""Sinkhorn divergence through GeomLoss, in the driftops (cost, eps) convention."""

from __future__ import annotations

import torch
from geomloss import SamplesLoss

from . import threads
from .checks import as_eps, as_points, as_weights, check_finite, numpy_io
from .costs import check_cost, diameter, geomloss_params
from .errors import DriftopsError

GEOMLOSS_BACKENDS = ("auto", "tensorized", "online", "multiscale")


@numpy_io
@threads.scoped
def sinkhorn_divergence(
    x,
    y,
    eps: float = 0.05,
    cost: str = "sqeuclidean",
    scaling: float = 0.9,
    backend: str = "auto",
    *,
    x_weights=None,
    y_weights=None,
):
    """Debiased Sinkhorn divergence ``S_eps(x, y)`` (a differentiable scalar tensor).

    Computed by ``geomloss.SamplesLoss("sinkhorn", p, blur)`` with ``blur = sqrt(eps/2)``
    for ``sqeuclidean`` (GeomLoss's cost is ``|x-y|^2 / 2``) and ``blur = eps`` for
    ``euclidean``, so ``drift(x, y, plan="sinkhorn") ≈ -N ∇_x S_eps`` for sqeuclidean.
    ``scaling`` is GeomLoss's eps-annealing ratio (0.9+ for accuracy). Gradients flow
    to x and y when they require grad; the caller's grad mode is left as it was.
    """
    x = as_points(x, "x")
    y = as_points(y, "y", like=x)
    (eps,) = as_eps(eps)
    check_cost(cost)
    if backend not in GEOMLOSS_BACKENDS:
        raise DriftopsError(f"unknown GeomLoss backend {backend!r}; pass one of {', '.join(GEOMLOSS_BACKENDS)}")
    if not 0 < scaling < 1:
        raise DriftopsError(f"scaling must lie in (0, 1), got {scaling}; 0.9 is accurate, 0.5 is fast")
    a = as_weights(x_weights, x.shape[0], "x_weights", x)
    b = as_weights(y_weights, y.shape[0], "y_weights", x)
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device) if a is None else torch.softmax(a, 0)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=x.dtype, device=x.device) if b is None else torch.softmax(b, 0)
    # A positive diameter keeps GeomLoss finite when every point coincides.
    loss = SamplesLoss(
        "sinkhorn", **geomloss_params(cost, eps), scaling=scaling, backend=backend,
        diameter=max(diameter(x, y), 1e-6), debias=True,
    )
    grad_mode = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(grad_mode and (x.requires_grad or y.requires_grad))
        value = loss(a, x, b, y)
    finally:
        torch.set_grad_enabled(grad_mode)
    value = value if grad_mode else value.detach()
    return check_finite(value, "the Sinkhorn divergence", "use float64 or a larger eps")

"""driftops: lazy drift fields and Sinkhorn gradient flows for point clouds of any size.

Public API::

    V = driftops.drift(x, y, eps=0.05, plan="sinkhorn")
    T = driftops.barycentric_map(x, y, eps=0.05, plan="two_sided")
    S = driftops.sinkhorn_divergence(x, y, eps=0.05)
    result = driftops.flow(x0, y, steps=100, step_size=1.0, eps=0.05)
    w2sq = driftops.metrics.w2(x, y)

Submodules: ``data`` (toy samplers, digits, loaders), ``metrics``, ``models``,
``viz`` (figures), ``train`` (generator trainers), ``backends``.
"""

from . import data, metrics, models
from .drift import DriftInfo, barycentric_map, drift, joint_drift
from .divergence import sinkhorn_divergence
from .errors import DivergenceError, DriftopsError
from .flows import FlowResult, flow
from .plans import PLANS
from .sinkhorn import Sinkhorn, SinkhornResult

__version__ = "0.1.0"

__all__ = [
    "data",
    "metrics",
    "models",
    "drift",
    "barycentric_map",
    "joint_drift",
    "sinkhorn_divergence",
    "flow",
    "FlowResult",
    "DriftInfo",
    "Sinkhorn",
    "SinkhornResult",
    "PLANS",
    "DriftopsError",
    "DivergenceError",
]

"""driftops: lazy drift fields and Sinkhorn gradient flows for point clouds of any size.

Public API::

    V = driftops.drift(x, y, eps=0.05, plan="sinkhorn")
    T = driftops.barycentric_map(x, y, eps=0.05, plan="two_sided")
    S = driftops.sinkhorn_divergence(x, y, eps=0.05)
"""

from .drift import DriftInfo, barycentric_map, drift, joint_drift
from .divergence import sinkhorn_divergence
from .errors import DivergenceError, DriftopsError
from .plans import PLANS, SinkhornResult

__version__ = "0.1.0"

__all__ = [
    "drift",
    "barycentric_map",
    "joint_drift",
    "sinkhorn_divergence",
    "DriftInfo",
    "SinkhornResult",
    "PLANS",
    "DriftopsError",
    "DivergenceError",
]

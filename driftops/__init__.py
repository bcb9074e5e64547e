"""driftops: lazy drift fields and Sinkhorn gradient flows for point clouds of any size.

Public API::

    V = driftops.drift(x, y, eps=0.05, plan="sinkhorn")
    T = driftops.barycentric_map(x, y, eps=0.05, plan="two_sided")
    S = driftops.sinkhorn_divergence(x, y, eps=0.05)
    result = driftops.flow(x0, y, steps=100, step_size=1.0, eps=0.05)
    w2sq = driftops.metrics.w2(x, y)

Submodules: ``data`` (toy samplers, digits, loaders), ``metrics``, ``models``,
``viz`` (figures), ``train`` (generator trainers), ``backends``, ``threads``.
Threads and compilation: ``driftops.set_threads(n)``, ``driftops.warmup()``.
"""

from . import threads

threads.import_torch()  # first: torch's OpenMP runtime reads its spin count when it loads (see driftops.threads)

from . import backends  # noqa: E402  (before geomloss: pykeops is imported quietly there)
from . import data, metrics, models  # noqa: E402
from .backends.formulas import warmup  # noqa: E402
from .drift import DriftInfo, barycentric_map, drift, joint_drift  # noqa: E402
from .divergence import sinkhorn_divergence  # noqa: E402
from .errors import DivergenceError, DriftopsError  # noqa: E402
from .flows import FlowResult, flow  # noqa: E402
from .plans import PLANS  # noqa: E402
from .sinkhorn import Sinkhorn, SinkhornResult, SolveStatus  # noqa: E402
from .threads import set_threads  # noqa: E402

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
    "SolveStatus",
    "PLANS",
    "DriftopsError",
    "DivergenceError",
    "set_threads",
    "warmup",
]

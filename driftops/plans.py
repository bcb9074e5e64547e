"""Transport plans, written once over the reduction interface.

A plan from a source cloud (rows i) to a destination cloud (columns j) is
represented by column log-weights ``w_j`` such that its row-normalised weights
are ``P_ij = softmax_j(w_j - c(x_i, y_j)/eps)``; the barycentric map is then
one ``weighted_mean``:

* ``one_sided``: ``w_j = log m_j`` (m: destination multiplicities);
* ``two_sided``: ``w_j = log m_j - c_j/2`` with ``c_j = LSE_i(log a_i - c_ij/eps)``,
  i.e. ``P ∝ sqrt(row-softmax · column-softmax)``;
* ``sinkhorn``: ``w_j = log b_j + g_j/eps`` with ``g`` the Sinkhorn potential for the
  marginals a, b (normalised multiplicities), found by log-domain iterations to
  an L1 marginal error below ``tol`` (:mod:`driftops.sinkhorn`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .parallel import Cloud, Geometry

if TYPE_CHECKING:
    from .sinkhorn import SinkhornResult

PLANS = ("one_sided", "two_sided", "sinkhorn")


def column_logweights(
    plan: str,
    src: Cloud,
    dst: Cloud,
    geom: Geometry,
    mask_self: bool,
    potentials: SinkhornResult | None = None,
) -> torch.Tensor | None:
    """(M,) column log-weights of ``plan`` from ``src`` to ``dst`` (see the module docstring).

    ``mask_self`` marks a self interaction (``dst`` is ``src``) whose diagonal is
    excluded; ``potentials`` are required for ``sinkhorn``.
    """
    if plan == "one_sided":
        return dst.logw
    if plan == "two_sided":
        c = dst.gather(geom.lse(dst, src, src.logw, dst.offset if mask_self else None))
        return -0.5 * c if dst.logw is None else dst.logw - 0.5 * c
    return dst.log_marginal() + potentials.g / geom.eps


def barycentric(src: Cloud, dst: Cloud, geom: Geometry, logw: torch.Tensor | None, mask_self: bool) -> torch.Tensor:
    """(n, D) barycentric map ``T(x_i) = sum_j P_ij y_j`` of the local source rows."""
    return geom.weighted_mean(src, dst, logw, src.offset if mask_self else None)

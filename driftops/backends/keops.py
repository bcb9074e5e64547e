"""KeOps backend: symbolic LazyTensor reductions, O((N + M)·D) memory, CPU or GPU (follows the inputs)."""

from __future__ import annotations

import torch
from pykeops.torch import LazyTensor

from ..costs import cost_power
from .base import MASK_PENALTY, Backend


def keops_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    cost: str,
    logw: torch.Tensor | None,
    self_offset: int | None,
    x_index: torch.Tensor | None = None,
    y_index: torch.Tensor | None = None,
) -> LazyTensor:
    """Symbolic (N, M) logits ``logw_j - c_ij/eps``; masked pairs get ``-MASK_PENALTY`` (never -inf).

    ``x_index``/``y_index`` are the original row numbers of the points when they were permuted
    (the block-sparse backend sorts them); by default row i is point i.
    """
    x_i = LazyTensor(x[:, None, :])
    y_j = LazyTensor(y[None, :, :])
    d2 = x_i.sqdist(y_j)
    # -1/eps enters as a parameter tensor: one compiled formula for every temperature (a Python -1.0 would be folded).
    scale = LazyTensor(torch.tensor([-1.0 / eps], dtype=x.dtype, device=x.device))
    s = (d2 if cost_power(cost) == 2 else d2.sqrt()) * scale
    if logw is not None:
        s = s + LazyTensor(logw.reshape(1, -1, 1))
    if self_offset is not None:
        # Pairs j == i + offset are masked by index; indices are exact in float32 below 2^24.
        n, m = x.shape[0], y.shape[0]
        ii = x_index if x_index is not None else torch.arange(n, device=x.device)
        jj = y_index if y_index is not None else torch.arange(m, device=x.device)
        i_f = LazyTensor((ii + self_offset).to(x.dtype).reshape(-1, 1, 1))
        j_f = LazyTensor(jj.to(x.dtype).reshape(1, -1, 1))
        s = s - (0.5 - (i_f - j_f).abs()).step() * MASK_PENALTY
    return s


class KeOpsBackend(Backend):
    """Dense-lazy reductions with pykeops: every pair is visited, none is stored."""

    name = "keops"

    def lse(self, x, y, eps, cost, logw=None, self_offset=None):
        s = keops_logits(x, y, eps, cost, logw, self_offset)
        return s.logsumexp(dim=1).reshape(-1)

    def weighted_mean(self, x, y, eps, cost, values, logw=None, self_offset=None):
        s = keops_logits(x, y, eps, cost, logw, self_offset)
        return s.sumsoftmaxweight(LazyTensor(values[None, :, :]), dim=1)

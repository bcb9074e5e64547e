"""Dense torch reference backend: builds the (N, M) logits explicitly. For small problems and tests."""

from __future__ import annotations

import os

import torch

from ..costs import dense_cost
from ..errors import DriftopsError
from .base import Backend


def _memory_budget(device: torch.device) -> int:
    """Bytes the dense backend may use on ``device``: half the free GPU memory or a third of the RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class DenseBackend(Backend):
    """Plain torch: exact, differentiable, O(N·M) memory. Refuses sizes that would not fit."""

    name = "dense"

    def logits(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        cost: str,
        logw: torch.Tensor | None,
        diag: torch.Tensor | None,
    ) -> torch.Tensor:
        """The (N, M) logits ``logw_j - c_ij/eps`` with the pairs (i, diag_i) set to -inf."""
        n, m = x.shape[0], y.shape[0]
        # The pairwise difference tensor (N, M, D) is the largest temporary.
        needed = n * m * (x.shape[1] + 4) * x.element_size()
        if needed > _memory_budget(x.device):
            raise DriftopsError(
                f"the dense backend would need {needed / 2**30:.1f} GiB for {n} x {m} points; "
                "use backend='keops' (lazy, any size) or backend='sparse' (large clouds in D <= 3)"
            )
        s = -dense_cost(x, y, cost) / eps
        if logw is not None:
            s = s + logw[None, :]
        if diag is not None:
            rows = torch.arange(n, device=x.device)
            s = s.index_put((rows, diag), torch.tensor(-float("inf"), dtype=s.dtype, device=s.device))
        return s

    def reduce_lse(self, x, y, eps, cost, logw, diag):
        return torch.logsumexp(self.logits(x, y, eps, cost, logw, diag), dim=1)

    def reduce_mean(self, x, y, eps, cost, values, logw, diag):
        return torch.softmax(self.logits(x, y, eps, cost, logw, diag), dim=1) @ values

    def reduce_lse_mean(self, x, y, eps, cost, values, logw):
        s = self.logits(x, y, eps, cost, logw, None)
        return torch.logsumexp(s, dim=1), torch.softmax(s, dim=1) @ values

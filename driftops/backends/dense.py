"""Dense torch reference backend: builds the (N, M) logits explicitly. For small problems and tests.

Without gradients and self masks, a reduction keeps its stabilised kernel ``K_ij = exp(S_ij - m_i)`` (S the logits
at log-weights w0, m their row maxima) and evaluates a later call at log-weights w as one matrix-vector product,
``lse_i = m_i + h + log sum_j K_ij exp(w_j - w0_j - h)`` with h the largest change: Sinkhorn iterations change
only the log-weights, and a product costs ~1/20 of the exponentials it replaces. The kernel is rebuilt when the
change spreads over more than KERNEL_SPREAD (an entry floored at EXP_FLOOR could then matter).
"""

from __future__ import annotations

import math
import os
import weakref

import torch

from ..costs import dense_cost
from ..errors import DriftopsError
from .base import Backend, needs_grad

# Logits more than this below their row's maximum are raised to it before exp(): on CPU, exp() is about 10x slower
# on arguments whose float32 result underflows (below -87), and a term e^-80 of the largest changes no row sum at
# float64 precision. Their (zero) gradients are dropped.
EXP_FLOOR = -80.0
# Cost and kernel matrices kept for reuse by one backend instance (a Sinkhorn solve alternates between a few pairs
# of clouds), and the largest one kept, in bytes.
CACHE_ENTRIES = 8
CACHE_MAX_BYTES = 64 << 20
# Largest spread (max - min) of a log-weight change for which a kept kernel is reused: the entries floored at
# EXP_FLOOR then weigh at most M e^(KERNEL_SPREAD + EXP_FLOOR) against a row's largest term.
KERNEL_SPREAD = 30.0


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

    def __init__(self) -> None:
        # (x, x._version, y, y._version, tag, value); x and y held by weak reference, so a freed or modified cloud
        # never matches.
        self._cache: list[tuple] = []

    def _find(self, x: torch.Tensor, y: torch.Tensor, tag: tuple):
        """The value kept for (x, y, tag) while neither cloud was freed or modified, else None."""
        for rx, vx, ry, vy, t, value in self._cache:
            if t == tag and rx() is x and ry() is y and x._version == vx and y._version == vy:
                return value
        return None

    def _keep(self, x: torch.Tensor, y: torch.Tensor, tag: tuple, value, matrix: torch.Tensor) -> None:
        """Keep ``value`` for (x, y, tag), replacing an older one, unless its ``matrix`` exceeds CACHE_MAX_BYTES; the
        oldest entry goes."""
        if matrix.numel() * matrix.element_size() <= CACHE_MAX_BYTES:
            others = [e for e in self._cache if not (e[4] == tag and e[0]() is x and e[2]() is y)]
            self._cache = [(weakref.ref(x), x._version, weakref.ref(y), y._version, tag, value)] + others[: CACHE_ENTRIES - 1]

    def cost(self, x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
        """The (N, M) cost matrix, reused (or transposed) from an earlier call on the same unmodified clouds."""
        if needs_grad(x, y):
            return dense_cost(x, y, cost)
        matrix = self._find(x, y, ("cost", cost))
        if matrix is not None:
            return matrix
        matrix = self._find(y, x, ("cost", cost))
        if matrix is not None:
            return matrix.T
        matrix = dense_cost(x, y, cost)
        self._keep(x, y, ("cost", cost), matrix, matrix)
        return matrix

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
        # The cost, the logits, their exponentials and one coordinate's differences: four (N, M) temporaries.
        needed = 4 * n * m * x.element_size()
        if needed > _memory_budget(x.device):
            raise DriftopsError(
                f"the dense backend would need {needed / 2**30:.1f} GiB for {n} x {m} points; "
                "use backend='keops' (lazy, any size) or backend='sparse' (large clouds in D <= 3)"
            )
        c = self.cost(x, y, cost)
        s = -c / eps if logw is None else torch.add(logw[None, :], c, alpha=-1.0 / eps)
        if diag is not None:
            rows = torch.arange(n, device=x.device)
            s = s.index_put((rows, diag), torch.tensor(-float("inf"), dtype=s.dtype, device=s.device))
        return s

    def _scaled(self, x, y, eps, cost, logw, diag) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(K, shift, e) with the logits' row sums ``exp(shift) * (K @ e)``: K (N, M) a kept stabilised kernel
        (module docstring), shift (N,), e (M,) in (0, 1]; None when gradients or a self mask need the logits."""
        if diag is not None or needs_grad(x, y, logw):
            return None
        tag = ("kernel", cost, float(eps))
        kept = self._find(x, y, tag)
        w = torch.zeros(y.shape[0], dtype=x.dtype, device=x.device) if logw is None else logw.detach()
        if kept is not None:
            w0, shift, kernel = kept
            change = w - w0
            lo, hi = change.aminmax()
            lo_, hi_ = torch.stack([lo, hi]).tolist()
            if math.isfinite(lo_) and math.isfinite(hi_) and hi_ - lo_ <= KERNEL_SPREAD:
                return kernel, shift + hi, (change - hi).exp()
        if not bool(torch.isfinite(w).all()):
            return None
        kernel, _, _, shift = shifted_exp(self.logits(x, y, eps, cost, w, None))
        self._keep(x, y, tag, (w.clone(), shift, kernel), kernel)
        return kernel, shift, torch.ones_like(w)

    def reduce_lse(self, x, y, eps, cost, logw, diag):
        scaled = self._scaled(x, y, eps, cost, logw, diag)
        if scaled is None:
            return shifted_exp(self.logits(x, y, eps, cost, logw, diag))[2]
        kernel, shift, e = scaled
        return shift + (kernel @ e).log()

    def reduce_mean(self, x, y, eps, cost, values, logw, diag):
        scaled = None if needs_grad(values) else self._scaled(x, y, eps, cost, logw, diag)
        if scaled is None:
            p, total, _, _ = shifted_exp(self.logits(x, y, eps, cost, logw, diag))
            return (p @ values) / total
        return _kernel_sums(*scaled, values)[1]

    def reduce_lse_mean(self, x, y, eps, cost, values, logw):
        scaled = self._scaled(x, y, eps, cost, logw, None)
        if scaled is None:
            p, total, lse, _ = shifted_exp(self.logits(x, y, eps, cost, logw, None))
            return lse, (p @ values) / total
        return _kernel_sums(*scaled, values)

    def reduce_topk(self, x, y, eps, cost, logw, k):
        top = torch.topk(self.logits(x, y, eps, cost, logw, None), min(k, y.shape[0]), dim=1)
        return top.values, top.indices


def _kernel_sums(kernel: torch.Tensor, shift: torch.Tensor, e: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row log-sum-exp (N,) and softmax mean of ``values`` (M, E) -> (N, E) of the logits
    ``shift_i + log(K_ij e_j)``, from one product with the E + 1 columns ``[e, e * values]``."""
    columns = torch.cat([e[None, :], e[None, :] * values.T])
    sums = (columns @ kernel.T).T  # (N, E + 1); faster than kernel @ columns.T for a few columns
    return shift + sums[:, 0].log(), sums[:, 1:] / sums[:, :1]


def shifted_exp(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits s (N, M): ``p = exp(max(s - m, EXP_FLOOR))`` (N, M) with m the row maxima, its row sums (N, 1)
    (the softmax is ``p / total``), the row log-sum-exp (N,) (-inf for a row of -inf) and m (N,) (0 for such a
    row)."""
    top = s.amax(1, keepdim=True).detach()
    finite = top.isfinite()
    shift = torch.where(finite, top, torch.zeros_like(top))
    if s.requires_grad:
        p = (s - shift).clamp_min(EXP_FLOOR).exp()
    else:
        p = torch.sub(s, shift).clamp_min_(EXP_FLOOR).exp_()
    total = p.sum(1, keepdim=True)
    return p, total, torch.where(finite, total.log() + shift, top)[:, 0], shift[:, 0]

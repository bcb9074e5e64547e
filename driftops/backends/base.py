"""The reduction interface every backend implements.

All of driftops' mathematics is written against two row reductions over the
logits ``S_ij = logw_j - c(x_i, y_j) / eps`` (x: (N, D), y: (M, D)):

* ``lse(x, y, eps, cost, logw)``: ``log sum_j exp(S_ij)``, shape (N,);
* ``weighted_mean(x, y, eps, cost, values, logw)``: ``sum_j softmax_j(S_ij) values_j``,
  shape (N, E) for values of shape (M, E).

A reduction over the first axis is the same call with x and y swapped.
``self_offset=k`` removes the pairs ``j == i + k`` (the diagonal of a self
interaction: x is a slice of y starting at row k, so ``c(x_i, y_{i+k}) = 0``);
``None`` keeps all pairs.

Backends differ only in how they evaluate three primitive reductions
(``reduce_lse``, ``reduce_mean``, ``reduce_lse_mean``), plus ``reduce_topk`` (the largest logits of each
row, for the sparse Hessian of a Newton finish of Sinkhorn). The self mask is applied
here, once for all of them: the unmasked sums are computed (a cheaper formula)
and the diagonal term ``exp(logw_{i+k})`` is removed from them; rows whose
diagonal term holds more than ``DIAGONAL_SHARE`` of their mass (isolated points,
where the subtraction would cancel) are recomputed with the pair masked by index.
``lse`` and ``weighted_mean`` run under :func:`driftops.threads.call` (the thread count of the load).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from .. import threads
from ..errors import DriftopsError

# A large finite logit penalty: KeOps returns NaN on -inf logits, so masked pairs get this instead.
MASK_PENALTY = 1e30
# Rows whose diagonal term holds more than this share of the row's mass are recomputed with an index
# mask; below it, subtracting the term loses at most a factor 1 / (1 - share) = 2 in relative precision.
DIAGONAL_SHARE = 0.5


def topk_width(k: int) -> int:
    """The number of entries a top-k reduction keeps: k rounded up to a power of two."""
    return 1 << (k - 1).bit_length()


class Backend(ABC):
    """A way to evaluate the two reductions of the module docstring.

    ``diag`` arguments of the primitives: None (keep every pair) or an (N,) int64 tensor,
    the column excluded from each row.
    """

    name: str = "abstract"

    @abstractmethod
    def reduce_lse(self, x, y, eps: float, cost: str, logw: torch.Tensor | None, diag: torch.Tensor | None) -> torch.Tensor:
        """(N,) ``log sum_{j != diag_i} exp(logw_j - c(x_i, y_j)/eps)``; differentiable where the backend is."""

    @abstractmethod
    def reduce_mean(self, x, y, eps: float, cost: str, values, logw: torch.Tensor | None, diag: torch.Tensor | None) -> torch.Tensor:
        """(N, E) ``sum_{j != diag_i} softmax_j(S_ij) values_j``; differentiable where the backend is."""

    @abstractmethod
    def reduce_lse_mean(self, x, y, eps: float, cost: str, values, logw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The unmasked ``reduce_lse`` and ``reduce_mean`` from one pass over the pairs (no autograd needed)."""

    def reduce_topk(self, x, y, eps: float, cost: str, logw: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest logits of each row, (N, k), and their columns, (N, k) int64, in no particular order; a row with
        fewer than k candidates (block-sparse) pads with logit -inf (at some column). No gradients."""
        raise DriftopsError(f"the {self.name} backend has no top-k reduction: use Sinkhorn(newton=0)")

    def topk(self, x: torch.Tensor, y: torch.Tensor, eps: float, cost: str, logw: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``reduce_topk`` with k at most M, under the thread settings of :func:`driftops.threads.call`: the reduction
        keeps :func:`topk_width` entries (one compiled formula per octave of k), of which the k largest are returned."""
        k = min(k, y.shape[0])
        width = topk_width(k)
        args = (x.detach(), y.detach(), eps, cost, None if logw is None else logw.detach(), width)
        top, cols = threads.call(lambda: self.reduce_topk(*args), x.device.type == "cpu")
        if top.shape[1] == k:
            return top, cols
        best = top.topk(k, dim=1).indices
        return top.gather(1, best), cols.gather(1, best)

    def lse(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        cost: str,
        logw: torch.Tensor | None = None,
        self_offset: int | None = None,
    ) -> torch.Tensor:
        """``log sum_j exp(logw_j - c(x_i, y_j)/eps)`` over unmasked j, shape (N,)."""
        return threads.call(lambda: self._lse(x, y, eps, cost, logw, self_offset), x.device.type == "cpu")

    def _lse(self, x, y, eps, cost, logw, self_offset) -> torch.Tensor:
        full = self.reduce_lse(x, y, eps, cost, logw, None)
        if self_offset is None:
            return full
        diag = _diagonal(x, self_offset)
        share = _diagonal_share(full, logw, diag)
        out = full + torch.log1p(-share.clamp_max(DIAGONAL_SHARE))
        return _redo_rows(out, share, lambda rows: self.reduce_lse(x[rows], y, eps, cost, logw, diag[rows]))

    def weighted_mean(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        cost: str,
        values: torch.Tensor,
        logw: torch.Tensor | None = None,
        self_offset: int | None = None,
    ) -> torch.Tensor:
        """``sum_j softmax_j(logw_j - c(x_i, y_j)/eps) values_j`` over unmasked j, shape (N, E)."""
        return threads.call(lambda: self._weighted_mean(x, y, eps, cost, values, logw, self_offset), x.device.type == "cpu")

    def _weighted_mean(self, x, y, eps, cost, values, logw, self_offset) -> torch.Tensor:
        if self_offset is None:
            return self.reduce_mean(x, y, eps, cost, values, logw, None)
        diag = _diagonal(x, self_offset)
        if needs_grad(x, y, values, logw):
            return self.reduce_mean(x, y, eps, cost, values, logw, diag)
        full, mean = self.reduce_lse_mean(x, y, eps, cost, values, logw)
        share = _diagonal_share(full, logw, diag)
        kept = share.clamp_max(DIAGONAL_SHARE)[:, None]
        out = (mean - kept * values[diag]) / (1 - kept)
        return _redo_rows(out, share, lambda rows: self.reduce_mean(x[rows], y, eps, cost, values, logw, diag[rows]))

    def iterations(self) -> Backend:
        """The backend for reductions repeated on the same clouds with changing log-weights (the iterations of a
        Sinkhorn solve); this one unless a backend chooses per reduction (:class:`driftops.backends.AutoBackend`)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd is on and one of the tensors requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _diagonal(x: torch.Tensor, offset: int) -> torch.Tensor:
    """(N,) column index ``i + offset`` of each row's own point."""
    return torch.arange(offset, offset + x.shape[0], device=x.device)


def _diagonal_share(full_lse: torch.Tensor, logw: torch.Tensor | None, diag: torch.Tensor) -> torch.Tensor:
    """(N,) share ``exp(S_ii - LSE_i)`` of each row's mass held by its own point (whose cost is 0)."""
    own = logw[diag] if logw is not None else torch.zeros_like(full_lse)
    return (own - full_lse).exp()


def _redo_rows(out: torch.Tensor, share: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``out`` with the rows whose diagonal share exceeds DIAGONAL_SHARE replaced by ``exact(rows)``."""
    rows = (share > DIAGONAL_SHARE).nonzero()[:, 0]
    if rows.numel() == 0:
        return out
    return out.index_put((rows,), exact(rows))

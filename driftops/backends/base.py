"""The reduction interface every backend implements.

All of driftops' mathematics is written against two row reductions over the
logits ``S_ij = logw_j - c(x_i, y_j) / eps`` (x: (N, D), y: (M, D)):

* ``lse(x, y, eps, cost, logw)``: ``log sum_j exp(S_ij)``, shape (N,);
* ``weighted_mean(x, y, eps, cost, values, logw)``: ``sum_j softmax_j(S_ij) values_j``,
  shape (N, E) for values of shape (M, E).

A reduction over the first axis is the same call with x and y swapped.
``self_offset=k`` removes the pairs ``j == i + k`` (the diagonal of a self
interaction when x is a slice of y starting at row k); ``None`` keeps all
pairs. Backends differ only in how they evaluate these sums.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

# A large finite logit penalty: KeOps returns NaN on -inf logits, so masked pairs get this instead.
MASK_PENALTY = 1e30


class Backend(ABC):
    """A way to evaluate the two reductions of the module docstring."""

    name: str = "abstract"

    @abstractmethod
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

    @abstractmethod
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

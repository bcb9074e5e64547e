"""Splitting point clouds across ``torch.distributed`` ranks.

Each rank owns a slice of the rows of x and of y. Reductions run on the local
rows against the gathered full cloud; potentials are gathered after every
update. With ``group=None`` everything is local and no communication happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class Comm:
    """Gather and sum over a process group (identity for ``group=None``)."""

    def __init__(self, group=None) -> None:
        self.group = group
        if group is None:
            self.rank, self.size = 0, 1
        else:
            import torch.distributed as dist

            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 in rank order (slices may differ in length)."""
        if self.group is None:
            return t
        import torch.distributed as dist

        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s) for s in sizes]
        padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def offset(self, n_local: int, device: torch.device) -> int:
        """Index of this rank's first row in the gathered cloud."""
        if self.group is None:
            return 0
        sizes = self.gather(torch.tensor([n_local], device=device))
        return int(sizes[: self.rank].sum())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks."""
        if self.group is None:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t


@dataclass
class Cloud:
    """A point cloud split over ranks.

    local: (n, D) rows owned by this rank; full: (N, D) all rows; offset: index of
    ``local[0]`` in ``full``; logw: (N,) log multiplicities of the full cloud or
    None for unit weights.
    """

    local: torch.Tensor
    full: torch.Tensor
    offset: int
    logw: torch.Tensor | None = None

    @classmethod
    def split(cls, local: torch.Tensor, comm: Comm, logw_local: torch.Tensor | None = None) -> "Cloud":
        full = comm.gather(local)
        logw = None if logw_local is None else comm.gather(logw_local)
        return cls(local, full, comm.offset(local.shape[0], local.device), logw)

    def log_marginal(self) -> torch.Tensor:
        """(N,) log-weights normalised to a probability vector (uniform when no weights)."""
        if self.logw is None:
            n = self.full.shape[0]
            return torch.full((n,), -math.log(n), dtype=self.full.dtype, device=self.full.device)
        return self.logw - torch.logsumexp(self.logw, 0)

    def local_part(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of a full-cloud tensor that belong to this rank."""
        return t[self.offset : self.offset + self.local.shape[0]]

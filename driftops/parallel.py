"""Splitting point clouds across ``torch.distributed`` ranks.

Each rank owns a slice of the rows of x and of y and gets back the result for
its rows of x. Vectors of the global size (weights, Sinkhorn potentials) are
gathered on every rank; the points are reduced in one of two modes
(:class:`Sharding`):

* ``"gather"``: the column cloud is all-gathered once per call and every rank reduces
  its rows against it (memory O(N·D) per rank; one collective per call);
* ``"ring"``: each rank keeps only its slice; the P column blocks circulate around the
  ranks with ``isend``/``irecv``, the next block in flight while the block in hand is
  reduced, and the per-block log-sum-exps and softmax-weighted means are merged in a
  streaming form that is exact to rounding (:func:`merge_lse_mean`). Peak memory per
  rank: its slice plus two blocks. The coarse Sinkhorn levels (D <= 3, "auto" and
  "sparse" backends) need the whole cloud and are skipped in this mode; gradients do
  not cross ranks in this mode (use ``"gather"`` to differentiate).

* ``"mesh"``: the ranks form an a x b grid (``torch.distributed.device_mesh``); rank (i, j) holds the rows of
  its mesh row's b slices and, as columns, the slices of its mesh column's a ranks. It reduces that block, and
  the b partial log-sum-exps (and softmax-weighted means) of a row are merged by an all-reduce of their maximum
  and then of their rescaled sums over the mesh row. The points never move after the call's start; each
  reduction sends O(N/a) numbers (O(N·D/a) for a barycentric map) instead of the ring's O(M·D). Memory per
  rank: O((N/a + M/b)·D) per cloud. Coarse levels and gradients as in ``"ring"``.

``"auto"`` picks ``"ring"`` when D > ``RING_MIN_DIM`` and the gathered clouds would
exceed ``ring_min_bytes``, unless the mesh's share of them fits (see :meth:`Sharding.mode_for`).

Faults: every public call compares a signature of its arguments across ranks and agrees
on an ok-flag before any rank raises (:meth:`Comm.checked`), so a bad input on one rank
raises the same :class:`DriftopsError` on all ranks instead of a deadlock; every
collective waits at most ``Sharding.timeout`` seconds, after which (or as soon as a
peer's connection drops) it raises :class:`DriftopsError`.
"""

from __future__ import annotations

import datetime
import math
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

from .backends.base import Backend, needs_grad
from .errors import DriftopsError

MODES = ("auto", "gather", "ring", "mesh")
# The block-sparse backend and the coarse Sinkhorn levels (D <= 3) need the whole cloud: "auto" never rings there.
RING_MIN_DIM = 3


@dataclass(frozen=True)
class Sharding:
    """How a call is spread over a process group; pass it as ``group=`` (a bare process group means the defaults).

    group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all ranks).
    mode: ``"gather"``, ``"ring"``, ``"mesh"`` or ``"auto"`` (see the module docstring).
    timeout: seconds a rank waits in one collective before raising (a dead peer is reported at once).
    mesh: ``(a, b)`` grid of the ``"mesh"`` mode, a * b = the number of ranks; None: the most square grid with a <= b.
    ring_min_bytes: in ``"auto"`` mode, the points (in bytes) a rank may hold: the whole clouds ("gather") when they
    fit, else the mesh's rows and columns when they fit, else only its slice ("ring"); see :meth:`mode_for`.
    Measured on 2-4 Gloo CPU processes (benchmarks/bench_distributed.py): the three modes take about the same time
    per drift in D = 128 (ring and mesh 0.8-1.2x the gather; 1.1-1.8x in D = 2, where blocks are small), and per
    Sinkhorn update the ring sends the points where the gather and the mesh send potentials (1935 KB against 15 KB
    and 35 KB at D = 128, N = 3000, 4 ranks). So the mode that moves the fewest points within the memory allowed wins.
    """

    group: Any = None
    mode: str = "auto"
    timeout: float = 300.0
    ring_min_bytes: int = 1 << 28
    mesh: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DriftopsError(f"unknown sharding mode {self.mode!r}; pass one of {', '.join(map(repr, MODES))}")
        if self.mesh is not None and not (len(self.mesh) == 2 and all(isinstance(k, int) and k > 0 for k in self.mesh)):
            raise DriftopsError(f"mesh must be (rows, cols), two positive integers whose product is the number of ranks, got {self.mesh!r}")
        if not self.timeout > 0:
            raise DriftopsError(f"the sharding timeout must be a positive number of seconds, got {self.timeout!r}")

    def mode_for(self, dim: int, points: int, itemsize: int, ranks: int = 1, world: bool = True) -> str:
        """The mode for ``points`` (global N + M) points of dimension ``dim`` over ``ranks`` ranks (``world``: the group
        is the world group, which the mesh needs). ``"auto"``: ``"gather"`` when D <= RING_MIN_DIM or the whole
        clouds fit in ``ring_min_bytes`` per rank; else ``"mesh"`` when its rows and columns, (N + M)·D·(1/a + 1/b)
        values, fit (less than the whole clouds from a 2 x 3 grid on); else ``"ring"``."""
        if self.mode != "auto":
            return self.mode
        whole = points * dim * itemsize
        if dim <= RING_MIN_DIM or whole <= self.ring_min_bytes:
            return "gather"
        a, b = mesh_shape(ranks, self.mesh)
        return "mesh" if world and whole * (1 / a + 1 / b) <= self.ring_min_bytes else "ring"


def mesh_shape(ranks: int, mesh: tuple[int, int] | None = None) -> tuple[int, int]:
    """(a, b): ``mesh`` (checked against ``ranks``), or the most square a x b = ranks grid with a <= b."""
    if mesh is not None:
        a, b = mesh
        if a * b != ranks:
            raise DriftopsError(f"mesh={mesh} has {a * b} cells for {ranks} ranks; pass (a, b) with a * b = {ranks}")
        return a, b
    a = max(k for k in range(1, math.isqrt(ranks) + 1) if ranks % k == 0)
    return a, ranks // a


# Device meshes of the "mesh" mode, by shape and world group (building one is a collective: every rank builds the same
# ones in the same order).
_MESHES: dict[tuple[tuple[int, int], int], Any] = {}


@dataclass
class CommStats:
    """Bytes this rank sent (payload of collectives and point-to-point sends) and collectives it entered."""

    bytes_sent: int = 0
    calls: int = 0


class Comm:
    """Collectives over a process group (identities for ``group=None``), each bounded by the sharding's timeout.

    ``stats`` counts this rank's traffic: a collective over P ranks counts the bytes this rank contributes
    times (P - 1) for gathers and all-reduces (what a ring algorithm sends), a point-to-point send its payload.
    """

    stats = CommStats()  # shared by every Comm of the process; benchmarks reset it

    def __init__(self, group=None) -> None:
        self.sharding = group if isinstance(group, Sharding) else Sharding(group)
        self.group = self.sharding.group
        self.mode = "gather"
        self.device = torch.device("cpu")  # where small control tensors live (NCCL needs them on the GPU)
        if self.group is None:
            self.rank, self.size = 0, 1
        else:
            import torch.distributed as dist

            self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
            if dist.get_backend(self.group) == "nccl":
                self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def ring(self) -> bool:
        return self.mode == "ring" and self.size > 1

    @property
    def mesh(self) -> bool:
        return self.mode == "mesh" and self.size > 1

    @property
    def world(self) -> bool:
        """Whether the group spans every process (the mesh mode builds its grid over all of them)."""
        import torch.distributed as dist

        return self.group is None or self.size == dist.get_world_size()

    def mesh_shape(self) -> tuple[int, int]:
        """(a, b): the grid of this group's ranks in "mesh" mode (see :func:`mesh_shape`)."""
        return mesh_shape(self.size, self.sharding.mesh)

    def mesh_comms(self) -> tuple["Comm", "Comm"]:
        """(row, column) sub-communicators of this rank in the ``mesh_shape()`` grid, rank r at (r // b, r % b): the row's
        b ranks share its rows, the column's a ranks its columns. The grid is built once per shape (a collective)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not self.world:
            raise DriftopsError("the mesh mode needs the default (world) process group; pass group=Sharding(torch.distributed.group.WORLD, 'mesh')")
        key = (self.mesh_shape(), id(dist.group.WORLD))  # a new world group (after a re-initialisation) builds anew
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(self.device.type, key[0])
        grid = _MESHES[key]
        return tuple(Comm(Sharding(grid.get_group(dim), "gather", self.sharding.timeout)) for dim in (1, 0))

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.sharding.timeout))
        except RuntimeError as err:
            raise DriftopsError(
                f"rank {self.rank}: {what} over {self.size} ranks failed ({str(err).splitlines()[0][:200]}): another rank "
                f"exited, or did not reach the same call within the timeout of {self.sharding.timeout:g} s; check the other "
                "ranks' logs, or raise Sharding(timeout=...) if a rank is legitimately slower"
            ) from err

    def _count(self, t: torch.Tensor, factor: int) -> None:
        Comm.stats.bytes_sent += t.numel() * t.element_size() * factor
        Comm.stats.calls += 1

    def sizes(self, n_local: int, device: torch.device) -> tuple[int, ...]:
        """Row counts of every rank's slice (one small collective)."""
        if self.group is None:
            return (n_local,)
        return tuple(int(s) for s in self.all_gather(torch.tensor([n_local], device=device)))

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(P * n, ...) concatenation of every rank's ``t`` of identical shape (n, ...), in rank order."""
        if self.group is None:
            return t
        import torch.distributed as dist

        t = t.contiguous()
        out = t.new_empty((self.size * t.shape[0],) + tuple(t.shape[1:]))
        self._count(t, self.size - 1)
        # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there).
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._wait(gather_into(out, t, group=self.group, async_op=True), "all_gather")
        return out

    def gather(self, t: torch.Tensor, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 in rank order; ``sizes``: every rank's row count when known.

        Differentiable (through ``torch.distributed.nn``) when ``t`` requires a gradient: every rank's rows then
        receive the gradient of every rank's use of them.
        """
        if self.group is None:
            return t
        sizes = sizes if sizes is not None else self.sizes(t.shape[0], t.device)
        width = max(sizes)
        padded = torch.cat([t, t.new_zeros((width - t.shape[0],) + tuple(t.shape[1:]))]) if t.shape[0] < width else t
        if needs_grad(t):
            from torch.distributed.nn.functional import all_gather

            self._count(padded, self.size - 1)
            parts = all_gather(padded.contiguous(), group=self.group)
            return torch.cat([p[:s] for p, s in zip(parts, sizes)])
        whole = self.all_gather(padded).reshape((self.size, width) + tuple(t.shape[1:]))
        return torch.cat([whole[r, :s] for r, s in enumerate(sizes)])

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``t`` reduced over ranks with ``op`` ("sum", "min" or "max"); ``t`` is not modified."""
        if self.group is None:
            return t
        import torch.distributed as dist

        t = t.clone()
        self._count(t, self.size - 1)
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        self._wait(dist.all_reduce(t, ops[op], group=self.group, async_op=True), f"all_reduce({op})")
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks."""
        return self.all_reduce(t, "sum")

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        return bool(self.all_reduce(torch.tensor([int(flag)], device=self.device), "max")[0])

    def broadcast_float(self, value: float | None) -> float:
        """Rank 0's ``value`` on every rank (the other ranks pass anything)."""
        if self.group is None:
            return float(value)
        t = torch.tensor([value if self.rank == 0 else 0.0], dtype=torch.float64, device=self.device)
        return float(self.all_reduce(t, "sum")[0])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank (the other ranks pass anything)."""
        if self.group is None:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group, device=self.device)
        return box[0]

    def gather_objects(self, obj: Any) -> list | None:
        """Every rank's picklable ``obj`` in rank order on rank 0; None on the other ranks."""
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        everyone = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, everyone, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return everyone

    def agree(self, signature: dict, error: DriftopsError | None, points: int = 0) -> int:
        """Raise the same :class:`DriftopsError` on every rank when some rank failed (``error``) or the ranks'
        ``signature`` dicts differ; else return the sum of ``points`` over ranks. One small collective when all is
        well."""
        if self.group is None:
            if error is not None:
                raise error
            return points
        import torch.distributed as dist

        code = zlib.crc32(repr(sorted(signature.items())).encode())
        flags = self.all_gather(torch.tensor([[int(error is None), code, points]], dtype=torch.int64, device=self.device))
        if bool(flags[:, 0].all()) and bool((flags[:, 1] == code).all()):
            return int(flags[:, 2].sum())
        mine = (signature, None if error is None else str(error))
        everyone: list = [None] * self.size
        dist.all_gather_object(everyone, mine, group=self.group)
        failed = [(r, msg) for r, (_, msg) in enumerate(everyone) if msg is not None]
        if failed:
            rank, msg = failed[0]
            raise DriftopsError(f"rank {rank} of {self.size}: {msg}") from error
        differ = sorted(k for k in signature if len({repr(sig.get(k)) for sig, _ in everyone}) > 1)
        values = "; ".join(f"{k}: " + ", ".join(f"rank {r} {sig.get(k)!r}" for r, (sig, _) in enumerate(everyone)) for k in differ)
        raise DriftopsError(f"the ranks passed different arguments ({values}); every rank must pass the same settings and dimension")

    @contextmanager
    def checked(self) -> Iterator["Check"]:
        """Run a block that validates this rank's inputs and fills the yielded :class:`Check`; on leaving it, the
        ranks agree (:meth:`agree`): all raise if one raised :class:`DriftopsError` or the signatures differ, and
        ``Check.total`` becomes the sum of ``Check.points`` over ranks."""
        check = Check()
        if self.group is None:
            yield check
            check.total = check.points
            return
        error = None
        try:
            yield check
        except DriftopsError as err:
            error = err
        check.total = self.agree(check.signature, error, check.points)


@dataclass
class Check:
    """What the ranks compare at the start of a call: ``signature`` (settings that must be equal on every rank) and
    ``points`` (this rank's point count, summed over ranks into ``total``)."""

    signature: dict = field(default_factory=dict)
    points: int = 0
    total: int = 0


@dataclass(frozen=True)
class MeshPart:
    """What a rank of the "mesh" mode holds of a cloud.

    rows: (n_i, D) the slices of its mesh row's ranks, whole-cloud rows ``[row_offset, row_offset + n_i)``;
    cols: (m_j, D) the slices of its mesh column's ranks, made of the whole-cloud runs ``col_runs`` = ((start,
    size), ...) in order; col_index: (m_j,) int64 whole-cloud index of each row of ``cols``; row_comm: the ranks of
    its mesh row, over which partial reductions of ``rows`` are merged.
    """

    rows: torch.Tensor
    row_offset: int
    cols: torch.Tensor
    col_runs: tuple[tuple[int, int], ...]
    col_index: torch.Tensor
    row_comm: Comm = field(repr=False)

    @classmethod
    def of(cls, local: torch.Tensor, comm: Comm, sizes: tuple[int, ...]) -> "MeshPart":
        """Gather this rank's part over its mesh row and column (two sub-group gathers)."""
        row_comm, col_comm = comm.mesh_comms()
        b = comm.mesh_shape()[1]
        i, j = divmod(comm.rank, b)
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        row_ranks, col_ranks = range(i * b, (i + 1) * b), range(j, len(sizes), b)
        runs = tuple((starts[r], sizes[r]) for r in col_ranks)
        index = torch.cat([torch.arange(s, s + k, device=local.device) for s, k in runs])
        rows = row_comm.gather(local, tuple(sizes[r] for r in row_ranks))
        return cls(rows, starts[i * b], col_comm.gather(local, tuple(k for _, k in runs)), runs, index, row_comm)

    def row_runs(self, shift: int | None) -> list[tuple[int, int, int | None]]:
        """``(start, stop, self_offset)`` runs covering ``rows``: the rows whose own point (whole-cloud column ``row +
        shift``; ``shift=None``: no mask) lies in ``cols`` get the self offset of ``rows[start:stop]`` within ``cols``."""
        n, o = self.rows.shape[0], self.row_offset
        if shift is None:
            return [(0, n, None)]
        masked, position = [], 0
        for start, size in self.col_runs:
            lo, hi = max(o, start - shift), min(o + n, start + size - shift)
            if lo < hi:
                masked.append((lo - o, hi - o, position + shift - start + lo))
            position += size
        out, row = [], 0
        for lo, hi, off in masked:
            out += [(row, lo, None)] if row < lo else []
            out.append((lo, hi, off))
            row = hi
        return out + ([(row, n, None)] if row < n else [])


@dataclass
class Cloud:
    """A point cloud split over ranks.

    local: (n, D) rows owned by this rank; full: (N, D) all rows ("gather" mode, or a cloud held whole by every
    rank) or None ("ring" and "mesh" modes); offset: index of ``local[0]`` in the whole cloud; logw: (N,) log
    multiplicities of the whole cloud or None for unit weights; sizes: every rank's row count (None: ``(N,)``,
    held whole); mesh: this rank's :class:`MeshPart` in "mesh" mode.
    """

    local: torch.Tensor
    full: torch.Tensor | None
    offset: int
    logw: torch.Tensor | None = None
    sizes: tuple[int, ...] | None = None
    comm: Comm | None = field(default=None, repr=False)
    mesh: MeshPart | None = field(default=None, repr=False)

    @classmethod
    def split(cls, local: torch.Tensor, comm: Comm, logw_local: torch.Tensor | None = None) -> "Cloud":
        """Wrap this rank's slice (one size exchange; the points are gathered whole only in "gather" mode)."""
        if comm.group is None:
            return cls(local, local, 0, logw_local)
        sizes = comm.sizes(local.shape[0], local.device)
        full = None if comm.ring or comm.mesh else comm.gather(local, sizes)
        logw = None if logw_local is None else comm.gather(logw_local, sizes)
        mesh = MeshPart.of(local, comm, sizes) if comm.mesh else None
        return cls(local, full, sum(sizes[: comm.rank]), logw, sizes, comm, mesh)

    @property
    def n(self) -> int:
        """Number of points of the whole cloud."""
        return self.full.shape[0] if self.full is not None else sum(self.sizes)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(N, ...) whole-cloud tensor from this rank's (n, ...) rows of it (sizes known: one collective)."""
        if self.local is self.full:
            return t
        return self.comm.gather(t, self.sizes)

    def box(self) -> torch.Tensor:
        """(2, D) smallest and largest coordinates over the whole cloud."""
        pts = self.local.detach()
        low, high = pts.amin(0), pts.amax(0)
        if self.local is not self.full and self.comm is not None:
            low, high = self.comm.all_reduce(low, "min"), self.comm.all_reduce(high, "max")
        return torch.stack([low, high])

    def mean(self) -> torch.Tensor:
        """(D,) unweighted mean of the whole cloud's points (detached)."""
        if self.full is not None:
            return self.full.detach().mean(0)
        return self.comm.sum(self.local.detach().sum(0)) / self.n

    def shifted(self, t: torch.Tensor) -> "Cloud":
        """The same cloud with every point moved by ``t`` (D,); weights, split and autograd graph kept."""
        local = self.local + t
        full = local if self.full is self.local else None if self.full is None else self.full + t
        mesh = None if self.mesh is None else replace(self.mesh, rows=self.mesh.rows + t, cols=self.mesh.cols + t)
        return replace(self, local=local, full=full, mesh=mesh)

    def log_marginal(self) -> torch.Tensor:
        """(N,) log-weights normalised to a probability vector (uniform when no weights)."""
        if self.logw is None:
            return torch.full((self.n,), -math.log(self.n), dtype=self.local.dtype, device=self.local.device)
        return self.logw - torch.logsumexp(self.logw, 0)

    def local_part(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of a whole-cloud tensor that belong to this rank."""
        return t[self.offset : self.offset + self.local.shape[0]]

    def blocks(self) -> Iterator[tuple[torch.Tensor, int]]:
        """Every rank's slice as ``(points, offset)``, the own slice first, the others passed around the ring.

        While a block is being used, the next one is already in flight: each step sends the block in hand to the
        next rank and receives the following one from the previous rank into a second buffer, so at most the
        own slice and two blocks are held. Every rank must consume every block.
        """
        import torch.distributed as dist

        comm, p = self.comm, self.comm.size
        width = max(self.sizes)
        buffers = [self.local.new_empty((width, self.local.shape[1])) for _ in range(2)]
        hand = self.local.contiguous()
        for step in range(p):
            owner = (comm.rank - step) % p
            works = []
            if step < p - 1:
                nxt = buffers[step % 2][: self.sizes[(owner - 1) % p]]
                comm._count(hand, 1)
                works = [
                    dist.isend(hand, dist.get_global_rank(comm.group, (comm.rank + 1) % p), group=comm.group),
                    dist.irecv(nxt, dist.get_global_rank(comm.group, (comm.rank - 1) % p), group=comm.group),
                ]
            yield hand, sum(self.sizes[:owner])
            for work in works:
                comm._wait(work, "ring pass")
            if works:
                hand = nxt


def merge_lse_mean(
    acc: tuple[torch.Tensor, torch.Tensor | None] | None, lse: torch.Tensor, mean: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge per-block row log-sum-exps (n,) and softmax-weighted means (n, E) (or None) into running ones.

    With ``L = logaddexp(L_a, L_b)``: ``mean = mean_a e^(L_a - L) + mean_b e^(L_b - L)``; both factors are <= 1
    and sum to 1, so the merge neither overflows nor loses mass.
    """
    if acc is None:
        return lse, mean
    total = torch.logaddexp(acc[0], lse)
    if mean is None:
        return total, None
    return total, acc[1] * (acc[0] - total).exp()[:, None] + mean * (lse - total).exp()[:, None]


@dataclass
class Geometry:
    """What every reduction needs besides the points: temperature, cost, backend, process group."""

    eps: float
    cost: str
    backend: Backend
    comm: Comm

    def lse(self, rows: Cloud, cols: Cloud, logw: torch.Tensor | None, self_offset: int | None, eps: float | None = None) -> torch.Tensor:
        """(n,) ``LSE_j(logw_j - c(rows_i, cols_j)/eps)`` for this rank's rows over the whole column cloud; ``logw``:
        (N,) or None; ``self_offset``: the whole-cloud column of ``rows.local[0]``'s own point (masked), or None."""
        e = eps or self.eps
        if cols.full is not None:
            return self.backend.lse(rows.local, cols.full, e, self.cost, logw, self_offset)
        return self._split(rows, cols, logw, self_offset, lambda x, y, w, off: (self.backend.lse(x, y, e, self.cost, w, off), None))[0]

    def topk(self, rows: Cloud, cols: Cloud, logw: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest logits (n, k) of this rank's rows over the whole column cloud and their whole-cloud columns
        (n, k) int64 (see ``Backend.reduce_topk``); needs the column cloud held whole (not "ring" or "mesh")."""
        return self.backend.topk(rows.local, cols.full, self.eps, self.cost, logw, k)

    def weighted_mean(self, rows: Cloud, cols: Cloud, logw: torch.Tensor | None, self_offset: int | None) -> torch.Tensor:
        """(n, D) softmax-weighted mean of the whole column cloud's points for this rank's rows."""
        if cols.full is not None:
            return self.backend.weighted_mean(rows.local, cols.full, self.eps, self.cost, cols.full, logw, self_offset)

        def block(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, off: int | None):
            if off is None:
                return self.backend.reduce_lse_mean(x, y, self.eps, self.cost, y, w)
            return self.backend.lse(x, y, self.eps, self.cost, w, off), self.backend.weighted_mean(x, y, self.eps, self.cost, y, w, off)

        return self._split(rows, cols, logw, self_offset, block)[1]

    def _split(self, rows: Cloud, cols: Cloud, logw: torch.Tensor | None, self_offset: int | None, reduce: Callable):
        """``reduce(points, block, block_logw, block_self_offset) -> (lse, mean or None)`` over a column cloud that no
        rank holds whole, merged: over the circulating blocks ("ring") or over the mesh row ("mesh")."""
        if needs_grad(rows.local, logw):
            raise DriftopsError(f"gradients do not cross ranks in the {self.comm.mode} mode; pass group=Sharding(group, mode='gather') to differentiate")
        if cols.mesh is None:
            acc = None
            for y, start in cols.blocks():
                w = None if logw is None else logw[start : start + y.shape[0]]
                # The self mask removes j == i + self_offset, which lies in this block only if it is the rows' own slice.
                off = self_offset - start if self_offset is not None and start <= self_offset < start + y.shape[0] else None
                acc = merge_lse_mean(acc, *reduce(rows.local, y, w, off))
            return acc
        part = rows.mesh
        w = None if logw is None else logw[cols.mesh.col_index]
        shift = None if self_offset is None else self_offset - rows.offset
        pieces = [reduce(part.rows[a:b], cols.mesh.cols, w, off) for a, b, off in part.row_runs(shift)]
        lse = torch.cat([p[0] for p in pieces])
        mean = None if pieces[0][1] is None else torch.cat([p[1] for p in pieces])
        lse, mean = _merge_over(part.row_comm, lse, mean)
        mine = slice(rows.offset - part.row_offset, rows.offset - part.row_offset + rows.local.shape[0])
        return lse[mine], None if mean is None else mean[mine]


def _merge_over(comm: Comm, lse: torch.Tensor, mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row log-sum-exps (n,) and softmax-weighted means (n, E) (or None) of column parts held by the ranks of ``comm``,
    merged into those over all the columns: an all-reduce of the maxima, then one of the rescaled sums."""
    top = comm.all_reduce(lse, "max")
    scale = torch.where(torch.isfinite(lse), (lse - top).exp(), torch.zeros_like(lse))[:, None]
    parts = scale if mean is None else torch.cat([scale, torch.where(scale > 0, mean * scale, torch.zeros_like(mean))], 1)
    total = comm.all_reduce(parts, "sum")
    return top + total[:, 0].log(), None if mean is None else total[:, 1:] / total[:, :1]


def divide_cores(local_ranks: int) -> int:
    """Give this process its share of the machine's cores when ``local_ranks`` processes share it: sets torch's
    intra-op threads and the OpenMP threads (KeOps' CPU loops) to ``max(1, cores // local_ranks)``; returns it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // max(1, local_ranks))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # OpenMP runtimes loaded later (KeOps' compiled formulas)
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    from .threads import set_threads

    threadpool_limits(threads, user_api="openmp")  # OpenMP runtimes already loaded
    set_threads(threads)  # driftops's reductions
    return threads


@dataclass(frozen=True)
class Launch:
    """The process group a job runs on: this process's rank in it, the group's size, the local (same machine) rank
    and count, and the timeout of every collective. ``torchrun`` launches join it with :meth:`from_env` (Gloo on
    CPU, NCCL on CUDA); a group the caller already joined is wrapped by :meth:`of`."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    group: Any
    timeout: float = Sharding.timeout

    @property
    def sharding(self) -> Sharding:
        """The group with this launch's timeout, as ``group=`` of the sharded calls."""
        return Sharding(self.group, timeout=self.timeout)

    @classmethod
    def of(cls, group: Any, timeout: float = Sharding.timeout) -> "Launch":
        """A process group every rank of which makes the same calls (``torch.distributed.group.WORLD`` for all):
        ranks and size within the group. The local fields repeat them: nothing is divided here (see :func:`divide_cores`)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise DriftopsError("group= needs an initialised torch.distributed process group; call torch.distributed.init_process_group first, or pass None")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise DriftopsError("this process is not a member of the group passed as group=; pass a group that contains it")
        return cls(rank, world, rank, world, group, timeout)

    @classmethod
    def from_env(cls, device: str, sharding: Sharding = Sharding()) -> "Launch | None":
        """Join the group described by torchrun's environment (None when not launched by torchrun with >1 process);
        divides the cores between the local ranks and on CUDA selects this rank's device. The ranks share KeOps's
        build folder: a formula compiled by one is loaded by the others (:func:`driftops.backends.keops.compiled_once`)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            return None
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        else:
            divide_cores(local_world)
        if not dist.is_initialized():
            backend = "nccl" if device == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=sharding.timeout))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dist.group.WORLD, sharding.timeout)

    @contextmanager
    def joined(self) -> Iterator["Launch"]:
        """The block's work on this group, then the group destroyed; after a barrier when the block ended normally on
        this rank, so that no rank closes its connections while another still receives its last messages (a Gloo
        rank torn down early aborts its peers)."""
        import torch.distributed as dist

        try:
            yield self
            dist.barrier(group=self.group)
        finally:
            dist.destroy_process_group()

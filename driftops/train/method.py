"""What a training method is (:class:`Method`, :class:`GeneratorMethod`) and the one place trainers move points
along the drift (:func:`drift_flow`, through :func:`driftops.flow`).

Distributed runs (a :class:`~driftops.parallel.Launch`): each rank draws its share of every batch (the sizes of
:meth:`TrainConfig.rank_sizes`) and the drifts are those of the whole batch (``group=``), so a rank's targets are
the ones a single process would compute for the same points.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..drift import DriftInfo
from ..flows import FlowResult, flow
from ..models import Generator
from ..parallel import Comm, Launch, Sharding
from .config import TrainConfig
from .targets import Target

if TYPE_CHECKING:
    from .loop import Run


def drift_flow(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    steps: int,
    callback: Callable[[int, torch.Tensor, object], None] | None = None,
    warm_start: DriftInfo | None = None,
    group: Sharding | None = None,
) -> FlowResult:
    """Move x (N, D) by ``steps`` drift steps ``x <- x + step_size * V(x)`` toward y (M, D) with :func:`driftops.flow`.

    Every drift of every trainer goes through here, with the drift and Sinkhorn solver settings of
    ``cfg.flow_options()``; Sinkhorn potentials are warm-started from step to step, and from ``warm_start`` (the
    ``info`` of an earlier result, e.g. the previous round's, carried over to the new points). Unconverged
    (capped) Sinkhorn loops do not warn: ``result.history["marginal_error"]`` records them.
    ``callback(step, x, info)`` sees the points after each step (step counts from 1; x is updated in
    place afterwards, so clone what you keep). ``group``: x and y are this rank's slices of the clouds.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sinkhorn did not reach", RuntimeWarning)
        return flow(
            x, y, steps, **cfg.flow_options(), callback=callback, warm_start=warm_start, progress=False, metric_every=None, group=group,
            snapshot_every=steps, max_snapshot_points=1,
        )  # fmt: skip


class Method:
    """A training method: builds its model, runs rounds of optimiser steps, samples.

    Subclasses set ``name`` and implement ``build_model``, ``round`` and ``sample``; methods with
    state beyond the model (e.g. NSGF's trajectory pool) override ``state_dict``/``load_state_dict``
    (in distributed runs that state is this rank's, and checkpoints keep every rank's).

    ``launch``: the process group of a distributed run (None: one process). ``batch``, ``fit_batch`` and
    ``target_batch`` are this rank's shares of the configured global sizes; ``group`` is what the sharded calls
    take (None alone) and ``comm`` its collectives.
    """

    name = ""

    def __init__(self, cfg: TrainConfig, target: Target, launch: Launch | None = None) -> None:
        self.cfg, self.target = cfg, target
        self.rank, self.world = (0, 1) if launch is None else (launch.rank, launch.world_size)
        self.group = None if launch is None else launch.sharding
        self.comm = Comm(self.group)
        self.batch, self.fit_batch, self.target_batch = cfg.rank_sizes(self.world)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def round(self, run: Run) -> dict[str, float]:
        """Perform at least one optimiser step through ``run.optimise``; return values to log."""
        raise NotImplementedError

    def sample(self, model: nn.Module, n: int, labels: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor:
        """(n, D) samples of ``model`` (labels (n,) for conditional runs), randomness from ``rng``; call under no_grad."""
        raise NotImplementedError

    def noise(self, n: int, dim: int, rng: torch.Generator) -> torch.Tensor:
        """(n, dim) standard normal noise drawn on the run's device from ``rng`` (a generator on that device)."""
        return torch.randn(n, dim, generator=rng, device=self.cfg.device, dtype=self.cfg.torch_dtype)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GeneratorMethod(Method):
    """A method that trains a (class-conditional) :class:`~driftops.models.Generator` from noise z ~ N(0, I)."""

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return Generator(cfg.noise_dim, self.target.dim, cfg.hidden, cfg.blocks, self.num_classes, cfg.arch)

    @property
    def num_classes(self) -> int:
        """K for class-conditional runs, 0 otherwise."""
        return self.target.num_classes if self.cfg.conditional else 0

    def sample(self, model: nn.Module, n: int, labels: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor:
        return model(self.noise(n, self.cfg.noise_dim, rng), labels)

    def draw(self, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, dict[int | None, torch.Tensor]]:
        """This rank's share of one round: noise z (batch, noise_dim), labels (batch,) or None, and target points,
        all on the run's device (``batch``, ``target_batch``: the rank's sizes).

        Target points: ``{None: (target_batch, D)}``, or per class ``{c: (n_c, D)}`` with
        n_c = min(max(2, target_batch // K), class size) when conditional. Labels cycle through the classes along
        the global batch, so the ranks' labels concatenate to those of one process.
        """
        cfg, k = self.cfg, self.num_classes
        z = self.noise(self.batch, cfg.noise_dim, rng)
        labels = (torch.arange(self.batch, device=cfg.device) + self.rank * self.batch) % k if k else None
        n = self.target_batch
        if not k:
            return z, labels, {None: self.target.sample(n, rng)}
        return z, labels, {c: self.target.sample(max(2, n // k), rng, c) for c in range(k)}

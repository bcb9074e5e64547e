"""The configuration of a training run (:class:`TrainConfig`, saved as ``config.json``) and its presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checks import as_eps, check_choice
from ..costs import check_cost
from ..data import TOYS, resolve_target
from ..errors import DriftopsError
from ..files import atomic_write_text
from ..models import ARCHITECTURES
from ..plans import PLANS
from ..sinkhorn import Sinkhorn

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE = ("steps", "out", "device", "threads", "log_every", "eval_every", "checkpoint_every", "progress")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json``.

    ``steps`` counts optimiser steps. Drifting: each round draws ``batch`` samples, moves them by
    ``flow_steps`` drift steps of ``step_size`` against ``target_batch`` target points and fits the
    generator to them in ``batch / minibatch`` steps. NSGF: one Sinkhorn flow of ``batch`` particles drawn from
    ``source`` (``"gaussian"``: N(0, I); or a toy) over ``flow_steps`` steps builds the pool; sampling starts from
    ``source`` too and takes ``sample_steps`` Euler steps.
    """

    method: str = "drifting"
    target: str = "checkerboard"
    source: str = "gaussian"
    out: str = "runs/run"
    plan: str = "sinkhorn"
    eps: list[float] = field(default_factory=lambda: [0.05])
    cost: str = "sqeuclidean"
    backend: str = "auto"
    sinkhorn_tol: float = 1e-3
    sinkhorn_iters: int = 1000
    sinkhorn_acceleration: str = "adaptive"
    sinkhorn_newton: int | None = None
    sinkhorn_warm: bool = False
    steps: int = 2000
    batch: int = 1024
    minibatch: int | None = None
    target_batch: int | None = None
    flow_steps: int = 1
    step_size: float = 1.0
    sample_steps: int | None = None
    scaling: float = 0.9
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup: int = 0
    grad_clip: float | None = 1.0
    ema: float = 0.999
    arch: str = "compact"
    noise_dim: int = 16
    hidden: int = 256
    blocks: int = 6
    latent_dim: int | None = None
    conditional: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 0
    eval_points: int = 1000
    checkpoint_every: int = 200
    progress: bool = True

    def __post_init__(self) -> None:
        self.eps = as_eps(self.eps)
        check_choice(self.plan, PLANS, "plan")
        check_cost(self.cost)
        check_choice(self.dtype, list(DTYPES), "dtype")
        check_choice(self.arch, list(ARCHITECTURES), "arch")
        self.target = resolve_target(self.target)
        if self.source != "gaussian":
            source = resolve_target(self.source)
            if source not in TOYS:
                raise DriftopsError(f"source must be 'gaussian' or a toy ({', '.join(TOYS)}), got {self.source!r}")
            if self.method != "nsgf":
                raise DriftopsError(f"a source other than 'gaussian' applies to --method nsgf (a flow from one cloud to another), not {self.method!r}")
            self.source = source
        positive = {"steps": self.steps, "batch": self.batch, "flow_steps": self.flow_steps, "eval_points": self.eval_points}
        positive.update({k: v for k, v in (("minibatch", self.minibatch), ("target_batch", self.target_batch), ("sample_steps", self.sample_steps), ("threads", self.threads)) if v is not None})
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DriftopsError(f"{name} must be a positive integer, got {value!r}")
        if self.batch % self.fit_batch:
            raise DriftopsError(f"batch ({self.batch}) must be a multiple of minibatch ({self.minibatch}); pass e.g. --minibatch {self.batch}")
        if not self.lr > 0 or not self.step_size > 0:
            raise DriftopsError(f"lr and step_size must be positive, got lr={self.lr}, step_size={self.step_size}")
        self.solver  # raises on bad Sinkhorn settings
        if not 0 <= self.ema < 1:
            raise DriftopsError(f"ema must lie in [0, 1) (0 disables it), got {self.ema}")

    @property
    def fit_batch(self) -> int:
        """Samples per optimiser step (``minibatch``, defaulting to ``batch``)."""
        return self.minibatch or self.batch

    def rank_sizes(self, world: int) -> tuple[int, int, int]:
        """Per-rank ``(batch, fit_batch, target_batch)`` of a run over ``world`` ranks.

        ``batch``, ``minibatch`` and ``target_batch`` are global: each rank draws ``1 / world`` of each, so that
        every optimiser step sees the same number of samples whatever the number of ranks.
        """
        sizes = {"batch": self.batch, "minibatch": self.fit_batch, "target_batch": self.target_batch or self.batch}
        for name, value in sizes.items():
            if value % world:
                below, above = value // world * world, (value // world + 1) * world
                raise DriftopsError(
                    f"{name} ({value}) is the global {name.replace('_', ' ')}, split evenly over the {world} ranks; "
                    f"pass a multiple of {world}, e.g. --{name.replace('_', '-')} {below or above} or {above}"
                )
        return self.batch // world, self.fit_batch // world, (self.target_batch or self.batch) // world

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def flow_options(self) -> dict:
        """Keyword arguments of :func:`driftops.flow` for the trainers' drift steps: step size, temperatures, plan,
        cost, backend and the Sinkhorn solver (``sinkhorn_tol``, ``sinkhorn_iters``, ``sinkhorn_acceleration``,
        ``sinkhorn_newton``)."""
        return dict(step_size=self.step_size, eps=self.eps, plan=self.plan, cost=self.cost, backend=self.backend, solver=self.solver)

    @property
    def solver(self) -> Sinkhorn:
        """The Sinkhorn solver of the drift steps."""
        return Sinkhorn(tol=self.sinkhorn_tol, max_iter=self.sinkhorn_iters, acceleration=self.sinkhorn_acceleration, newton=self.sinkhorn_newton)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> TrainConfig:
        """A config from the named :data:`PRESETS` entry, with ``overrides`` applied on top."""
        check_choice(preset, list(PRESETS), "preset")
        return cls(**{**PRESETS[preset], **overrides})

    def save(self, path: Path, **extra) -> None:
        """Write the fields, and ``extra`` facts of the run (e.g. its world size, which :meth:`load` ignores), as JSON."""
        atomic_write_text(path, json.dumps(dataclasses.asdict(self) | extra, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise DriftopsError(f"{path} does not exist; pass a run folder written by `driftops train`")
        values = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})



# Named settings. "paper": the Sinkhorn-drifting paper's toy protocol (its Section 5.2 and toy code): the wide
# residual generator (hidden 256, 6 blocks, noise 16; 1.59M parameters), AdamW lr 2e-4, batch 1024, 5000 steps,
# no EMA, no gradient clipping, one drift step per optimiser step with at most 20 Sinkhorn iterations, exact W2^2
# of 1000 samples every 100 steps. Choose target, plan, eps and seed on top.
PRESETS: dict[str, dict] = {
    "paper": dict(
        method="drifting", arch="wide", hidden=256, blocks=6, noise_dim=16, lr=2e-4, batch=1024, steps=5000,
        ema=0.0, grad_clip=None, warmup=0, flow_steps=1, step_size=1.0, sinkhorn_iters=20, eval_every=100,
        eval_points=1000,
    ),
}

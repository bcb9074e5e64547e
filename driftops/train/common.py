"""What every trainer shares: configuration, targets, the run folder and the training loop.

A run folder holds ``config.json`` (a :class:`TrainConfig`), ``metrics.jsonl`` (one JSON record
per logged step), ``checkpoint.pt`` (model, EMA, optimiser, step, RNG and method states, written
atomically) and, when training ends, ``metrics.json`` (a summary). All randomness of a run is
drawn from one checkpointed ``torch.Generator``, so ``resume=True`` continues a killed run to the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import as_eps, check_choice
from ..costs import check_cost
from ..data import TOYS, ClassData, load_digits, load_points, sample_toy
from ..drift import DriftInfo, drift
from ..errors import DivergenceError, DriftopsError
from ..metrics import w2
from ..models import Generator
from ..plans import PLANS

CHECKPOINT = "checkpoint.pt"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOY_ALIASES = {"8gaussians": "eight_gaussians", "swissroll": "swiss_roll"}
# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE = ("steps", "out", "device", "threads", "log_every", "eval_every", "checkpoint_every", "progress")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json``.

    ``steps`` counts optimiser steps. Drifting: each round draws ``batch`` samples, moves them by
    ``flow_steps`` drift steps of ``step_size`` against ``target_batch`` target points and fits the
    generator to them in ``batch / minibatch`` steps. NSGF: one Sinkhorn flow of ``batch`` particles
    over ``flow_steps`` steps builds the pool; sampling uses ``sample_steps`` Euler steps.
    """

    method: str = "drifting"
    target: str = "checkerboard"
    out: str = "runs/run"
    plan: str = "sinkhorn"
    eps: list[float] = field(default_factory=lambda: [0.05])
    cost: str = "sqeuclidean"
    backend: str = "auto"
    sinkhorn_tol: float = 1e-3
    sinkhorn_iters: int = 1000
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
        positive = {"steps": self.steps, "batch": self.batch, "flow_steps": self.flow_steps, "eval_points": self.eval_points}
        positive.update({k: v for k, v in (("minibatch", self.minibatch), ("target_batch", self.target_batch), ("sample_steps", self.sample_steps), ("threads", self.threads)) if v is not None})
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DriftopsError(f"{name} must be a positive integer, got {value!r}")
        if self.batch % self.fit_batch:
            raise DriftopsError(f"batch ({self.batch}) must be a multiple of minibatch ({self.minibatch}); pass e.g. --minibatch {self.batch}")
        if not self.lr > 0 or not self.step_size > 0:
            raise DriftopsError(f"lr and step_size must be positive, got lr={self.lr}, step_size={self.step_size}")
        if not 0 <= self.ema < 1:
            raise DriftopsError(f"ema must lie in [0, 1) (0 disables it), got {self.ema}")

    @property
    def fit_batch(self) -> int:
        """Samples per optimiser step (``minibatch``, defaulting to ``batch``)."""
        return self.minibatch or self.batch

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise DriftopsError(f"{path} does not exist; pass a run folder written by `driftops train`")
        values = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def resolve_target_name(spec: str) -> str:
    """Canonical toy name for aliases such as ``8gaussians``; other specs unchanged."""
    return TOY_ALIASES.get(spec, spec)


@dataclass
class Target:
    """The distribution a run learns: a toy sampler (``data=None``) or a fixed, possibly labelled, point set."""

    spec: str
    dim: int
    data: ClassData | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Target:
        """``cfg.target``: a toy name (see :data:`driftops.data.TOYS`), ``digits`` (``latent_dim``: PCA) or a .npy/.npz path."""
        spec = resolve_target_name(cfg.target)
        if spec in TOYS:
            if cfg.latent_dim is not None:
                raise DriftopsError("latent_dim applies to digits only; drop --latent-dim for 2D toys")
            target = cls(spec, 2, None, cfg.device, cfg.torch_dtype)
        elif spec == "digits":
            data = load_digits(cfg.latent_dim, cfg.seed)
            target = cls(spec, data.x.shape[1], data, cfg.device, cfg.torch_dtype)
        elif Path(spec).suffix in (".npy", ".npz"):
            data = load_points(spec)
            target = cls(spec, data.x.shape[1], data, cfg.device, cfg.torch_dtype)
        else:
            raise DriftopsError(f"unknown target {cfg.target!r}; pass a toy ({', '.join(TOYS)}, or 8gaussians), 'digits' or a .npy/.npz path")
        if cfg.conditional and target.num_classes < 2:
            raise DriftopsError(f"--conditional needs class-labelled data with 2+ classes; {cfg.target!r} has none (use digits or a .npz with one array per class)")
        return target

    @property
    def num_classes(self) -> int:
        return 0 if self.data is None else len(self.data.classes)

    def sample(self, n: int, rng: torch.Generator, label: int | None = None) -> torch.Tensor:
        """(n', D) target points: n fresh toy samples, or a random subset of min(n, N) data points (of class ``label``)."""
        if self.data is None:
            return sample_toy(self.spec, n, rng, self.dtype, self.device)
        pts = self.data.x if label is None else self.data.x[self.data.labels == label]
        return pts[torch.randperm(len(pts), generator=rng)[:n]].to(self.device, self.dtype)

    def eval_set(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A fixed evaluation set (n', D) and its labels: n fresh toy points, or min(n, N) data points."""
        rng = torch.Generator().manual_seed(seed)
        if self.data is None:
            return self.sample(n, rng), None
        idx = torch.randperm(len(self.data.x), generator=rng)[:n]
        return self.data.x[idx].to(self.device, self.dtype), self.data.labels[idx].to(self.device)


def drift_flow(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    steps: int,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, DriftInfo | None]:
    """Move x (N, D) by ``steps`` explicit steps ``x <- x + step_size * V(x)`` toward y (M, D).

    Sinkhorn potentials are warm-started from step to step; unconverged Sinkhorn loops do not warn
    (trainers log ``info.marginal_error`` instead). ``on_step(k, x_k, V(x_k))`` sees each step.
    Returns the final points and the last step's :class:`DriftInfo`.
    """
    info = None
    for k in range(steps):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sinkhorn stopped", category=RuntimeWarning)
            v, info = drift(
                x, y, cfg.eps, cfg.plan, cfg.cost, backend=cfg.backend, tol=cfg.sinkhorn_tol,
                max_iter=cfg.sinkhorn_iters, warm_start=info, return_info=True,
            )
        if on_step is not None:
            on_step(k, x, v)
        x = x + cfg.step_size * v
    return x, info


def atomic_write_bytes(path: Path, write: Callable[[object], None]) -> None:
    """Write a file atomically: ``write(fileobj)`` into a temp file in the same folder, fsync, ``os.replace``.

    A crash at any point leaves either the old file or the new one, and no temp file on exceptions.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def load_checkpoint(run_dir: str | Path, device: str = "cpu") -> dict:
    """The checkpoint dictionary of a run folder (keys: model, ema, optimizer, step, rng, method, config)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise DriftopsError(f"no {CHECKPOINT} in {run_dir}; pass a run folder written by `driftops train`")
    # Our own file: it holds numpy RNG states, which the weights-only unpickler refuses.
    return torch.load(path, map_location=device, weights_only=False)


class Method:
    """A training method: builds its model, runs rounds of optimiser steps, samples.

    Subclasses set ``name`` and implement ``build_model``, ``round`` and ``sample``; methods with
    state beyond the model (e.g. NSGF's trajectory pool) override ``state_dict``/``load_state_dict``.
    """

    name = ""

    def __init__(self, cfg: TrainConfig, target: Target) -> None:
        self.cfg, self.target = cfg, target

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def round(self, run: Run) -> dict[str, float]:
        """Perform at least one optimiser step through ``run.optimise``; return values to log."""
        raise NotImplementedError

    def sample(self, model: nn.Module, n: int, labels: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor:
        """(n, D) samples of ``model`` (labels (n,) for conditional runs), randomness from ``rng``; call under no_grad."""
        raise NotImplementedError

    def noise(self, n: int, dim: int, rng: torch.Generator) -> torch.Tensor:
        """(n, dim) standard normal noise drawn on the CPU from ``rng`` (device independent), moved to the run's device."""
        return torch.randn(n, dim, generator=rng).to(self.cfg.device, self.cfg.torch_dtype)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GeneratorMethod(Method):
    """A method that trains a (class-conditional) :class:`~driftops.models.Generator` from noise z ~ N(0, I)."""

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return Generator(cfg.noise_dim, self.target.dim, cfg.hidden, cfg.blocks, self.num_classes)

    @property
    def num_classes(self) -> int:
        """K for class-conditional runs, 0 otherwise."""
        return self.target.num_classes if self.cfg.conditional else 0

    def sample(self, model: nn.Module, n: int, labels: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor:
        return model(self.noise(n, self.cfg.noise_dim, rng), labels)

    def draw(self, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, dict[int | None, torch.Tensor]]:
        """One round's noise z (batch, noise_dim), labels (batch,) or None, and target points.

        Target points: ``{None: (target_batch, D)}``, or per class ``{c: (n_c, D)}`` with
        n_c = min(target_batch // K, class size) when conditional.
        """
        cfg, k = self.cfg, self.num_classes
        z = self.noise(cfg.batch, cfg.noise_dim, rng)
        labels = torch.arange(cfg.batch, device=cfg.device) % k if k else None
        n = cfg.target_batch or cfg.batch
        if not k:
            return z, labels, {None: self.target.sample(n, rng)}
        return z, labels, {c: self.target.sample(max(2, n // k), rng, c) for c in range(k)}


class Run:
    """A training run in a folder: model, EMA copy, AdamW (linear warmup, gradient clipping), RNG, logging.

    ``Run(cfg, method_cls, resume)`` creates the folder or, with ``resume=True``, restores the last
    checkpoint; :meth:`train` runs rounds until ``cfg.steps`` optimiser steps are done.
    """

    def __init__(self, cfg: TrainConfig, method_cls: type[Method], resume: bool = False) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.dir / CHECKPOINT
        if ckpt_path.exists() and not resume:
            raise DriftopsError(f"{self.dir} already holds a run; pass resume=True (--resume) to continue it or choose another out folder")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.target = Target.from_config(cfg)
        self.method = method_cls(cfg, self.target)
        self.model = self.method.build_model().to(cfg.device, cfg.torch_dtype)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.eval_x, self.eval_labels = self.target.eval_set(cfg.eval_points, cfg.seed + 1)
        for stale in self.dir.glob(f".{CHECKPOINT}.*.tmp"):  # left by a process killed mid-write
            stale.unlink()
        if resume and ckpt_path.exists():
            self._restore(load_checkpoint(self.dir, cfg.device))
        else:
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        cfg.save(self.dir / "config.json")

    def _restore(self, ckpt: dict) -> None:
        old = ckpt["config"]
        diff = {k: (old.get(k), v) for k, v in dataclasses.asdict(self.cfg).items() if k not in RESUMABLE and old.get(k) != v}
        if diff:
            raise DriftopsError(f"cannot resume {self.dir} with a different configuration {diff} (old, new); resume with the same settings or start a new out folder")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])
        self.step = ckpt["step"]
        rng = ckpt["rng"]
        self.rng.set_state(rng["train"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        # Drop log records written after the checkpoint, so the resumed log matches an uninterrupted one.
        log = self.dir / "metrics.jsonl"
        if log.exists():
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            atomic_write_text(log, "".join(line + "\n" for line in kept))

    def save(self) -> None:
        """Write ``checkpoint.pt`` atomically."""
        state = {
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "rng": {"train": self.rng.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        atomic_write_bytes(self.dir / CHECKPOINT, lambda fh: torch.save(state, fh))

    def optimise(self, loss: torch.Tensor) -> None:
        """One AdamW step on ``loss`` (warmup, clipping), then the EMA update; raises on a non-finite loss."""
        if not bool(torch.isfinite(loss)):
            raise DivergenceError(f"the loss became {float(loss)} at step {self.step}; lower the learning rate (--lr) or the step size")
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        # Warmup-corrected decay, so that short runs are not dominated by the initial weights.
        decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)

    @property
    def remaining(self) -> int:
        return self.cfg.steps - self.step

    def evaluate_w2(self) -> float:
        """Exact W2^2 between ``eval_points`` EMA samples (fixed noise) and the fixed evaluation set."""
        labels = self.eval_labels if self.cfg.conditional else None
        with torch.no_grad():
            x = self.method.sample(self.ema, len(self.eval_x), labels, torch.Generator().manual_seed(self.cfg.seed + 2))
        return w2(x, self.eval_x)

    def _log(self, record: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def train(self) -> dict:
        """Run rounds until ``cfg.steps`` optimiser steps are done; checkpoint, log, write ``metrics.json``."""
        cfg = self.cfg
        start = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.method.name} {cfg.target}", disable=not cfg.progress, dynamic_ncols=True)

        def crossed(every: int, before: int) -> bool:
            return every > 0 and self.step // every > before // every

        record: dict = {}
        while self.step < cfg.steps:
            before = self.step
            record = self.method.round(self)
            record = {"step": self.step, **record}
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            if crossed(cfg.eval_every, before) or (cfg.eval_every and self.step >= cfg.steps):
                record["w2"] = self.evaluate_w2()
            if crossed(cfg.log_every, before) or "w2" in record or self.step >= cfg.steps:
                self._log(record)
            if crossed(cfg.checkpoint_every, before):
                self.save()
            bar.update(self.step - before)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "w2")})
        bar.close()
        self.save()
        summary = {"steps": self.step, "seconds_this_session": time.perf_counter() - start, **{k: v for k, v in record.items() if k != "step"}}
        atomic_write_text(self.dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        return summary


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and random generators (model initialisation uses them)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in a run folder (empty if there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


__all__ = [
    "TrainConfig", "Target", "Method", "GeneratorMethod", "Run", "drift_flow", "atomic_write_bytes",
    "load_checkpoint", "read_metrics", "seed_everything",
]

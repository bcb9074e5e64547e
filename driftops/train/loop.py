"""The training loop: a :class:`Run` holds the model, its EMA copy, AdamW, the RNG and the step counter, and runs a
method's rounds with logging, periodic evaluation and atomic checkpoints.

All randomness of a run is drawn from one ``torch.Generator`` on the run's device, saved in the
checkpoint, so ``resume=True`` continues a killed run to the same parameters as an uninterrupted one.

Distributed runs (``launch``, a :class:`~driftops.parallel.Launch`) are the same loop on every rank: the model is
initialised identically on every rank and wrapped in ``DistributedDataParallel`` (:attr:`Run.net`), each rank
draws its share of every batch from its own generator (seeded by :func:`rank_seed`), and rank 0 alone writes the
folder (config, metrics, checkpoints, progress bar). A checkpoint holds every rank's generator and method state,
gathered on rank 0; on resume rank 0 reads it and sends it to every rank, which restores its own states, so a
resumed run continues exactly (on the same number of ranks). The ranks first compare their configurations and
every failure of the set-up raises on every rank (:meth:`~driftops.parallel.Comm.checked`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DivergenceError, DriftopsError
from ..files import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from ..metrics import w2
from ..parallel import Comm, Launch
from .config import RESUMABLE, TrainConfig
from .method import Method
from .storage import CHECKPOINT, METRICS_LOG, append_metrics, parse_checkpoint, read_checkpoint, truncate_metrics
from .targets import Target


class Run:
    """A training run: model, EMA copy (the model itself when ``cfg.ema == 0``), AdamW (linear warmup, optional
    gradient clipping), the run's RNG and step counter, in memory.

    ``Run(cfg, method_cls, launch)`` only builds them; :meth:`open` also prepares the folder ``cfg.out`` (a new
    run, or the last checkpoint restored with ``resume=True``); :meth:`train` runs rounds until
    ``cfg.steps`` optimiser steps are done, writing the folder. ``launch``: the process group of a distributed
    run (None: one process). Methods call :attr:`net` for forward passes that train (the DDP wrapper of
    :attr:`model` when distributed, the model itself otherwise) and :attr:`model` for the others.
    """

    def __init__(self, cfg: TrainConfig, method_cls: type[Method], launch: Launch | None = None) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.comm = Comm(None if launch is None else launch.sharding)
        self.rank, self.world = self.comm.rank, self.comm.size
        self.writer = self.rank == 0
        with self.comm.checked() as check:
            check.signature.update(dataclasses.asdict(cfg))
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            seed_everything(cfg.seed)  # the same initial weights on every rank
            self.target = Target.from_config(cfg)
            self.method = method_cls(cfg, self.target, launch)
            self.model = self.method.build_model().to(cfg.device, cfg.torch_dtype)
        self.net: nn.Module = self.model if launch is None else _parallel(self.model, launch)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = torch.Generator(device=cfg.device).manual_seed(rank_seed(cfg.seed, self.rank))
        self.step = 0
        self.seconds = 0.0  # training time of all sessions, evaluations excluded
        self.eval_x, self.eval_labels = self.target.eval_set(cfg.eval_points, cfg.seed + 1)

    @classmethod
    def open(cls, cfg: TrainConfig, method_cls: type[Method], resume: bool = False, launch: Launch | None = None) -> Run:
        """A run in the folder ``cfg.out``: new (refused if the folder holds a checkpoint and not ``resume``) or
        restored from its checkpoint; writes ``config.json`` (with ``world_size`` and ``rank_batch``, the
        per-rank batch). Distributed: rank 0 reads the folder and sends the checkpoint to the other ranks."""
        run = cls(cfg, method_cls, launch)
        data = None
        with run.comm.checked() as check:
            check.signature["resume"] = resume
            if run.writer:
                run.dir.mkdir(parents=True, exist_ok=True)
                has_checkpoint = (run.dir / CHECKPOINT).exists()
                if has_checkpoint and not resume:
                    raise DriftopsError(f"{run.dir} already holds a run; pass resume=True (--resume) to continue it or choose another out folder")
                remove_stale_temporaries(run.dir)
                data = read_checkpoint(run.dir) if has_checkpoint else None
        data = run.comm.broadcast_object(data)
        if data is not None:
            with run.comm.checked():
                run.restore(parse_checkpoint(data, cfg.device))
        if run.writer:
            if data is not None:
                truncate_metrics(run.dir, run.step)  # records logged after the checkpoint are logged again
            else:
                (run.dir / METRICS_LOG).unlink(missing_ok=True)
            cfg.save(run.dir / "config.json", world_size=run.world, rank_batch=run.method.batch)
        return run

    def restore(self, ckpt: dict) -> None:
        """Load a checkpoint dictionary written by :meth:`save` with the same configuration (RESUMABLE fields aside)
        and world size; this rank takes its own generator and method states."""
        old = ckpt["config"]
        diff = {k: (old.get(k), v) for k, v in dataclasses.asdict(self.cfg).items() if k not in RESUMABLE and old.get(k) != v}
        if diff:
            raise DriftopsError(f"cannot resume {self.dir} with a different configuration {diff} (old, new); resume with the same settings or start a new out folder")
        world = ckpt.get("world_size", 1)
        if world != self.world:
            raise DriftopsError(
                f"{self.dir} was trained on {world} rank(s) and this run has {self.world}; resume it on {world} "
                f"({'torchrun --nproc-per-node ' + str(world) if world > 1 else 'one process'}): every rank continues from its own saved random state"
            )
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.seconds = ckpt["step"], ckpt["seconds"]
        # Single-process checkpoints written before the per-rank list keep their one rank's states at the top level.
        own = ckpt.get("ranks", [ckpt])[self.rank]
        self.method.load_state_dict(own["method"])
        rng = own["rng"]
        self.rng.set_state(rng["train"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])

    def save(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0; the other ranks send it their generator and method states)."""
        own = {
            "method": self.method.state_dict(),
            "rng": {"train": self.rng.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        ranks = self.comm.gather_objects(own)
        if not self.writer:
            return
        state = {
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "seconds": self.seconds,
            "world_size": self.world,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ranks": ranks,
        }
        atomic_write_bytes(self.dir / CHECKPOINT, lambda fh: torch.save(state, fh))

    def optimise(self, loss: torch.Tensor) -> None:
        """One AdamW step on ``loss`` (warmup, clipping), then the EMA update; raises on a non-finite loss (on every
        rank when it is non-finite on one)."""
        losses = self.comm.all_gather(loss.detach().reshape(1)).tolist()  # every rank's loss
        bad = [r for r, value in enumerate(losses) if not math.isfinite(value)]
        if bad:
            where = f" on rank {bad[0]} of {self.world}" if self.world > 1 else ""
            raise DivergenceError(f"the loss became {losses[bad[0]]}{where} at step {self.step}; lower the learning rate (--lr) or the step size")
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        if cfg.ema:
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
            gen = torch.Generator(device=self.cfg.device).manual_seed(self.cfg.seed + 2)
            x = self.method.sample(self.ema, len(self.eval_x), labels, gen)
        return w2(x, self.eval_x)

    def train(self) -> dict:
        """Run rounds until ``cfg.steps`` optimiser steps are done; checkpoint, log, write ``metrics.json``.

        Log records: ``step``, the method's values (e.g. ``loss``; averaged over the ranks), ``lr``, ``seconds``
        (training time so far, evaluations excluded) and, every ``eval_every`` steps, ``w2``. Only rank 0 writes,
        evaluates and shows the progress bar; every rank returns the summary.
        """
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps, initial=self.step, desc=f"{self.method.name} {cfg.target}", disable=not cfg.progress or not self.writer, dynamic_ncols=True,
        )  # fmt: skip

        def crossed(every: int, before: int) -> bool:
            return every > 0 and self.step // every > before // every

        record: dict = {}
        while self.step < cfg.steps:
            before, tick = self.step, time.perf_counter()
            record = {"step": 0, **self.mean(self.method.round(self))}
            self.seconds += time.perf_counter() - tick
            record.update(step=self.step, lr=self.optimizer.param_groups[0]["lr"], seconds=self.seconds)
            if self.writer and (crossed(cfg.eval_every, before) or (cfg.eval_every and self.step >= cfg.steps)):
                record["w2"] = self.evaluate_w2()
            if self.writer and (crossed(cfg.log_every, before) or "w2" in record or self.step >= cfg.steps):
                append_metrics(self.dir, record)
            if crossed(cfg.checkpoint_every, before):
                self.save()
            bar.update(self.step - before)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "w2")})
        bar.close()
        self.save()
        summary = {"steps": self.step, **{k: v for k, v in record.items() if k != "step"}, "seconds": self.seconds}
        if self.writer:
            atomic_write_text(self.dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The ranks' mean of each value (the values themselves in one process)."""
        total = self.comm.sum(torch.tensor(list(values.values()), dtype=torch.float64, device=self.comm.device))
        return dict(zip(values, (total / self.world).tolist()))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generator: ``seed`` itself on rank 0 (and in one process), distinct low 32 bits
    (which CPU generators keep) on every other rank."""
    return seed + rank * 0x9E3779B9


def _parallel(model: nn.Module, launch: Launch) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` over the launch's group (on this rank's GPU for CUDA models)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, process_group=launch.group)


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and random generators (model initialisation uses them)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

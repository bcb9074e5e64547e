"""The training loop: a :class:`Run` holds the model, its EMA copy, AdamW, the RNG and the step counter, and runs a
method's rounds with logging, periodic evaluation and atomic checkpoints.

All randomness of a run is drawn from one ``torch.Generator`` on the run's device, saved in the
checkpoint, so ``resume=True`` continues a killed run to the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DivergenceError, DriftopsError
from ..metrics import w2
from .config import RESUMABLE, TrainConfig
from .method import Method
from .storage import (
    CHECKPOINT, METRICS_LOG, append_metrics, atomic_write_bytes, atomic_write_text, load_checkpoint,
    remove_stale_temporaries, truncate_metrics,
)  # fmt: skip
from .targets import Target


class Run:
    """A training run: model, EMA copy (the model itself when ``cfg.ema == 0``), AdamW (linear warmup, optional
    gradient clipping), the run's RNG and step counter, in memory.

    ``Run(cfg, method_cls)`` only builds them; :meth:`open` also prepares the folder ``cfg.out`` (a new
    run, or the last checkpoint restored with ``resume=True``); :meth:`train` runs rounds until
    ``cfg.steps`` optimiser steps are done, writing the folder.
    """

    def __init__(self, cfg: TrainConfig, method_cls: type[Method]) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.out)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.target = Target.from_config(cfg)
        self.method = method_cls(cfg, self.target)
        self.model = self.method.build_model().to(cfg.device, cfg.torch_dtype)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        self.step = 0
        self.seconds = 0.0  # training time of all sessions, evaluations excluded
        self.eval_x, self.eval_labels = self.target.eval_set(cfg.eval_points, cfg.seed + 1)

    @classmethod
    def open(cls, cfg: TrainConfig, method_cls: type[Method], resume: bool = False) -> Run:
        """A run in the folder ``cfg.out``: new (refused if the folder holds a checkpoint and not ``resume``) or
        restored from its checkpoint; writes ``config.json``."""
        run = cls(cfg, method_cls)
        run.dir.mkdir(parents=True, exist_ok=True)
        has_checkpoint = (run.dir / CHECKPOINT).exists()
        if has_checkpoint and not resume:
            raise DriftopsError(f"{run.dir} already holds a run; pass resume=True (--resume) to continue it or choose another out folder")
        remove_stale_temporaries(run.dir)
        if has_checkpoint:
            run.restore(load_checkpoint(run.dir, cfg.device))
            truncate_metrics(run.dir, run.step)  # records logged after the checkpoint are logged again
        else:
            (run.dir / METRICS_LOG).unlink(missing_ok=True)
        cfg.save(run.dir / "config.json")
        return run

    def restore(self, ckpt: dict) -> None:
        """Load a checkpoint dictionary written by :meth:`save` with the same configuration (RESUMABLE fields aside)."""
        old = ckpt["config"]
        diff = {k: (old.get(k), v) for k, v in dataclasses.asdict(self.cfg).items() if k not in RESUMABLE and old.get(k) != v}
        if diff:
            raise DriftopsError(f"cannot resume {self.dir} with a different configuration {diff} (old, new); resume with the same settings or start a new out folder")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])
        self.step, self.seconds = ckpt["step"], ckpt["seconds"]
        rng = ckpt["rng"]
        self.rng.set_state(rng["train"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])

    def save(self) -> None:
        """Write ``checkpoint.pt`` atomically."""
        state = {
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "seconds": self.seconds,
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

        Log records: ``step``, the method's values (e.g. ``loss``), ``lr``, ``seconds`` (training time so
        far, evaluations excluded) and, every ``eval_every`` steps, ``w2``.
        """
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.method.name} {cfg.target}", disable=not cfg.progress, dynamic_ncols=True)

        def crossed(every: int, before: int) -> bool:
            return every > 0 and self.step // every > before // every

        record: dict = {}
        while self.step < cfg.steps:
            before, tick = self.step, time.perf_counter()
            record = {"step": 0, **self.method.round(self)}
            self.seconds += time.perf_counter() - tick
            record.update(step=self.step, lr=self.optimizer.param_groups[0]["lr"], seconds=self.seconds)
            if crossed(cfg.eval_every, before) or (cfg.eval_every and self.step >= cfg.steps):
                record["w2"] = self.evaluate_w2()
            if crossed(cfg.log_every, before) or "w2" in record or self.step >= cfg.steps:
                append_metrics(self.dir, record)
            if crossed(cfg.checkpoint_every, before):
                self.save()
            bar.update(self.step - before)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "w2")})
        bar.close()
        self.save()
        summary = {"steps": self.step, **{k: v for k, v in record.items() if k != "step"}, "seconds": self.seconds}
        atomic_write_text(self.dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        return summary


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and random generators (model initialisation uses them)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

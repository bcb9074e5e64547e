"""Training compact generators from drift fields and Sinkhorn divergences.

Methods (``TrainConfig.method``): ``drifting`` (flow-then-fit, :mod:`.drifting`), ``sinkhorn_loss``
(Genevay et al., :mod:`.sinkhorn_loss`) and ``nsgf`` (velocity matching, :mod:`.nsgf`)::

    from driftops.train import TrainConfig, train
    summary = train(TrainConfig(method="drifting", target="checkerboard", plan="sinkhorn", eps=[0.05], out="runs/a"))
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checks import check_choice
from .common import CHECKPOINT, GeneratorMethod, Method, Run, Target, TrainConfig, load_checkpoint, read_metrics
from .drifting import Drifting, drift_targets
from .nsgf import NSGF
from .sinkhorn_loss import SinkhornLoss

METHODS: dict[str, type[Method]] = {m.name: m for m in (Drifting, SinkhornLoss, NSGF)}


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train in ``cfg.out`` (continuing its checkpoint when ``resume``); returns the ``metrics.json`` summary."""
    check_choice(cfg.method, list(METHODS), "method")
    return Run(cfg, METHODS[cfg.method], resume).train()


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[TrainConfig, Method, nn.Module]:
    """A trained run's config, method and EMA model (eval mode) from its folder."""
    cfg = TrainConfig.load(Path(run_dir) / "config.json")
    if device is not None:
        cfg.device = device
    method = METHODS[check_choice(cfg.method, list(METHODS), "method")](cfg, Target.from_config(cfg))
    model = method.build_model().to(cfg.device, cfg.torch_dtype)
    model.load_state_dict(load_checkpoint(run_dir, cfg.device)["ema"])
    return cfg, method, model.eval().requires_grad_(False)


__all__ = [
    "TrainConfig", "Target", "Run", "Method", "GeneratorMethod", "Drifting", "SinkhornLoss", "NSGF",
    "METHODS", "train", "load_run", "drift_targets", "read_metrics", "CHECKPOINT",
]

"""Training compact generators from drift fields and Sinkhorn divergences.

Methods (``TrainConfig.method``): ``drifting`` (flow-then-fit, :mod:`.drifting`), ``sinkhorn_loss``
(Genevay et al., :mod:`.sinkhorn_loss`) and ``nsgf`` (velocity matching, :mod:`.nsgf`). Modules by
job: :mod:`.config` (TrainConfig, presets), :mod:`.targets` (what a run learns), :mod:`.storage`
(the run folder: checkpoint, metrics log), :mod:`.method` (the method interface and
the trainers' one drift call), :mod:`.loop` (the Run and its training loop), :mod:`.api` (train,
load, sample, evaluate)::

    from driftops.train import TrainConfig, train, sample_run
    summary = train(TrainConfig(method="drifting", target="checkerboard", plan="sinkhorn", eps=[0.05], out="runs/a"))
    summary = train(TrainConfig.from_preset("paper", target="checkerboard", eps=[0.01], out="runs/paper"))
    points, labels = sample_run("runs/a", 10_000)   # (10000, 2) samples of the trained generator
"""

from __future__ import annotations

from .api import METHODS, draw_samples, evaluate, evaluation_set, load_run, sample_model, sample_run, save_samples, train
from .config import PRESETS, TrainConfig
from .drifting import Drifting, drift_targets
from .loop import Run
from .method import GeneratorMethod, Method, drift_flow
from .nsgf import NSGF
from .sinkhorn_loss import SinkhornLoss
from .storage import CHECKPOINT, load_checkpoint, read_metrics
from .targets import Target

__all__ = [
    "TrainConfig", "PRESETS", "Target", "Run", "Method", "GeneratorMethod", "Drifting", "SinkhornLoss", "NSGF",
    "METHODS", "train", "load_run", "sample_model", "draw_samples", "sample_run", "save_samples", "evaluate", "evaluation_set",
    "drift_targets", "drift_flow", "read_metrics", "load_checkpoint", "CHECKPOINT",
]

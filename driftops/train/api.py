"""Training, loading, sampling and evaluating runs from Python (the commands call these).

::

    from driftops.train import TrainConfig, train, sample_run, evaluate
    train(TrainConfig.from_preset("paper", target="checkerboard", plan="sinkhorn", eps=[0.01], out="runs/a"))
    train(cfg, group=torch.distributed.group.WORLD)           # on every rank of an initialised process group
    x = sample_run("runs/a", 10_000)                          # (10000, 2) tensor
    evaluate("runs/a", n=2000, target_file="held_out.npy")   # W2^2 against held-out points
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checks import check_choice
from ..data import load_points
from ..errors import DriftopsError
from ..files import atomic_write_bytes, atomic_write_text
from ..metrics import class_metrics, mmd, sinkhorn_w2, train_classifier, w2
from ..parallel import Launch
from .config import TrainConfig
from .drifting import Drifting
from .loop import Run
from .method import Method
from .nsgf import NSGF
from .sinkhorn_loss import SinkhornLoss
from .storage import CHECKPOINT, load_checkpoint, read_metrics
from .targets import Target

METHODS: dict[str, type[Method]] = {m.name: m for m in (Drifting, SinkhornLoss, NSGF)}
EXACT_W2_POINTS = 5000


def train(cfg: TrainConfig, resume: bool = False, group=None) -> dict:
    """Train in ``cfg.out`` (continuing its checkpoint when ``resume``); returns the ``metrics.json`` summary.

    ``group``: None (one process), a ``torch.distributed`` process group every rank of which calls ``train`` with
    the same ``cfg``, or a :class:`~driftops.parallel.Launch` (e.g. ``Launch.from_env``). ``cfg.batch`` (and
    ``minibatch``, ``target_batch``) stay global: each rank draws its share, and rank 0 writes the folder.
    """
    check_choice(cfg.method, list(METHODS), "method")
    launch = group if group is None or isinstance(group, Launch) else Launch.of(group)
    return Run.open(cfg, METHODS[cfg.method], resume, launch).train()


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[TrainConfig, Method, nn.Module]:
    """A trained run's config, method and evaluated model (the EMA weights; eval mode, no gradients)."""
    cfg = TrainConfig.load(Path(run_dir) / "config.json")
    if device is not None:
        cfg.device = device
    method = METHODS[check_choice(cfg.method, list(METHODS), "method")](cfg, Target.from_config(cfg))
    model = method.build_model().to(cfg.device, cfg.torch_dtype)
    model.load_state_dict(load_checkpoint(run_dir, cfg.device)["ema"])
    return cfg, method, model.eval().requires_grad_(False)


def sample_model(method: Method, model: nn.Module, n: int, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` samples (n, D) of a loaded model, with ``labels`` (n,) when the run is conditional, from ``seed``."""
    with torch.no_grad():
        gen = torch.Generator(device=method.cfg.device).manual_seed(seed)
        return method.sample(model, n, labels if method.cfg.conditional else None, gen)


def draw_samples(method: Method, model: nn.Module, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples (n, D) of a loaded model and their labels (n,): classes in turn (k % K) for conditional runs,
    None otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DriftopsError(f"n must be a positive integer number of samples, got {n!r}")
    labels = torch.arange(n, device=method.cfg.device) % method.target.num_classes if method.cfg.conditional else None
    return sample_model(method, model, n, labels, seed), labels


def sample_run(run_dir: str | Path, n: int, seed: int = 0, device: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples (n, D) of the trained run in ``run_dir`` and their labels (see :func:`draw_samples`);
    ``driftops sample RUN --n N --out file.npy`` writes them."""
    _, method, model = load_run(run_dir, device)
    return draw_samples(method, model, n, seed)


def save_samples(path: str | Path, points: torch.Tensor, labels: torch.Tensor | None = None, classes: list[str] | None = None) -> Path:
    """Write samples atomically: ``.npy`` one (n, D) float32 array; ``.npz`` one (n_c, D) array per class name
    (``classes[k]`` for label k; a single ``samples`` array without labels), as :func:`driftops.data.load_points` reads."""
    path = Path(path)
    pts = points.detach().cpu().float().numpy()
    if path.suffix == ".npy":
        atomic_write_bytes(path, lambda fh: np.save(fh, pts))
    elif path.suffix == ".npz":
        if labels is None:
            arrays = {"samples": pts}
        else:
            lab = labels.cpu().numpy()
            arrays = {classes[k]: pts[lab == k] for k in range(len(classes))}
        atomic_write_bytes(path, lambda fh: np.savez(fh, **arrays))
    else:
        raise DriftopsError(f"cannot write samples to {path}; pass a .npy (one array) or .npz (one array per class) path")
    return path


def evaluation_set(target: Target, n: int, seed: int, target_file: str | Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference points (n', D) and labels for evaluation: fresh target points, or min(n, N) points of ``target_file``
    (a .npy/.npz point file; classes are matched to the run's by name for conditional runs)."""
    if target_file is None:
        return target.eval_set(n, seed)
    data = load_points(target_file)
    if data.x.shape[1] != target.dim:
        raise DriftopsError(f"{target_file} holds points of dimension {data.x.shape[1]} but the run generates {target.dim}; pass held-out points of the run's data")
    idx = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))[:n]
    x = data.x[idx].to(target.device, target.dtype)
    if target.data is None or target.num_classes < 2:
        return x, None
    unknown = sorted(set(data.classes) - set(target.data.classes))
    if unknown:
        raise DriftopsError(f"{target_file} has classes {unknown} that the run does not know; name its arrays after the run's classes {target.data.classes}")
    relabel = torch.tensor([target.data.classes.index(c) for c in data.classes])
    return x, relabel[data.labels[idx]].to(target.device)


def evaluate(run_dir: str | Path, n: int = 1000, seed: int = 1000, device: str | None = None, target_file: str | Path | None = None) -> dict:
    """W2^2 (exact for n <= 5000, else Sinkhorn), MMD^2 and, for class data, accuracy/coverage and per-class W2^2.

    Compares n samples of the run with n fresh target points (or min(n, N) data points, labels
    preserved), or with min(n, N) points of ``target_file``; writes ``eval.json`` and the figures
    (see :func:`driftops.viz.save_run_figures`) into ``run_dir``.
    """
    from ..viz import save_run_figures

    cfg, method, model = load_run(run_dir, device)
    target = method.target
    x, labels = evaluation_set(target, n, seed, target_file)
    gen = sample_model(method, model, len(x), labels, seed)
    exact = len(x) <= EXACT_W2_POINTS
    result = {"n": len(x), "w2": w2(gen, x) if exact else sinkhorn_w2(gen, x), "w2_exact": exact, "mmd": mmd(gen, x)}
    if target_file is not None:
        result["target_file"] = str(target_file)
    if target.data is not None and target.num_classes >= 2:
        clf = train_classifier(target.data)
        result["classifier_accuracy_on_real"] = clf.accuracy
        if cfg.conditional:
            result.update(class_metrics(gen, labels, clf))
            result["w2_per_class"] = {c: w2(gen[labels == k], x[labels == k]) for k, c in enumerate(target.data.classes) if bool((labels == k).any())}
        else:
            result["coverage"] = class_metrics(gen, clf.predict(gen), clf)["coverage"]
    atomic_write_text(Path(run_dir) / "eval.json", json.dumps(result, indent=2) + "\n")
    decode = target.data.decode if target.data is not None else None
    save_run_figures(run_dir, gen, x, read_metrics(run_dir), labels if cfg.conditional else None, decode)
    return result


__all__ = ["METHODS", "train", "load_run", "sample_model", "draw_samples", "sample_run", "save_samples", "evaluate", "evaluation_set", "CHECKPOINT"]

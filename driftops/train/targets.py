"""The distribution a run learns (:class:`Target`): a toy sampler or a fixed, possibly labelled, point set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import TOYS, ClassData, load_digits, load_points, resolve_target, sample_toy
from ..errors import DriftopsError
from .config import TrainConfig


@dataclass
class Target:
    """The distribution a run learns: a toy sampler (``data=None``) or a fixed, possibly labelled, point set
    (``data`` on the CPU as loaded; ``x`` (N, D) and ``labels`` (N,) its copies on the run's device and dtype)."""

    spec: str
    dim: int
    data: ClassData | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    x: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Target:
        """``cfg.target``: a toy name (see :data:`driftops.data.TOYS`), ``digits`` (``latent_dim``: PCA) or a .npy/.npz path."""
        spec = resolve_target(cfg.target)
        if spec in TOYS:
            if cfg.latent_dim is not None:
                raise DriftopsError("latent_dim applies to digits only; drop --latent-dim for 2D toys")
            target = cls(spec, 2, None, cfg.device, cfg.torch_dtype)
        elif spec == "digits":
            target = cls.from_data(spec, load_digits(cfg.latent_dim, cfg.seed), cfg)
        else:
            target = cls.from_data(spec, load_points(spec), cfg)
        if cfg.conditional and target.num_classes < 2:
            raise DriftopsError(f"--conditional needs class-labelled data with 2+ classes; {cfg.target!r} has none (use digits or a .npz with one array per class)")
        return target

    @classmethod
    def from_data(cls, spec: str, data: ClassData, cfg: TrainConfig) -> Target:
        """A point-set target whose points and labels live on the run's device and dtype."""
        x, labels = data.x.to(cfg.device, cfg.torch_dtype), data.labels.to(cfg.device)
        return cls(spec, data.x.shape[1], data, cfg.device, cfg.torch_dtype, x, labels)

    @property
    def num_classes(self) -> int:
        return 0 if self.data is None else len(self.data.classes)

    def sample(self, n: int, rng: torch.Generator, label: int | None = None) -> torch.Tensor:
        """(n', D) target points drawn on the target's device from ``rng`` (a generator on that device): n fresh toy
        samples, or a random subset of min(n, N) data points (of class ``label``)."""
        if self.data is None:
            return sample_toy(self.spec, n, rng, self.dtype, self.device)
        pts = self.x if label is None else self.x[self.labels == label]
        return pts[torch.randperm(len(pts), generator=rng, device=self.device)[:n]]

    def eval_set(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A fixed evaluation set (n', D) and its labels: n fresh toy points, or min(n, N) data points."""
        rng = torch.Generator(device=self.device).manual_seed(seed)
        if self.data is None:
            return self.sample(n, rng), None
        idx = torch.randperm(len(self.x), generator=rng, device=self.device)[:n]
        return self.x[idx], self.labels[idx]

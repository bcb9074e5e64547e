"""Compact networks: a (class-conditional) residual-MLP generator and a time-conditioned velocity field."""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import check_choice
from .errors import DriftopsError


def _check_width(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != width:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise DriftopsError(f"{name} must be a tensor of shape (N, {width}), got {shape}")
    return t


class ResidualMLP(nn.Module):
    """Linear(in, hidden) -> ``blocks`` x [h + Linear(SiLU(LayerNorm(h)))] -> LayerNorm, SiLU, Linear(hidden, out).

    ``forward(inp, cond=None)``: inp (N, in_dim); cond (N, hidden) is added to the hidden state
    after the input layer; returns (N, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, blocks: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, inp: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(inp)
        if cond is not None:
            h = h + cond
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class WideResidualMLP(nn.Module):
    """The Sinkhorn-drifting paper's generator body: Linear(in, hidden), LayerNorm -> ``blocks`` x
    [h + residual_scale * LayerNorm(Linear(2h, h)(SiLU(LayerNorm(Linear(h, 2h)(h)))))] -> Linear(hidden, out),
    the output layer initialised with weights of std ``out_init_std`` and zero bias (samples start near 0).

    hidden 256, 6 blocks, 16 inputs and 2 outputs: 1,592,066 parameters. ``forward(inp, cond=None)`` as
    :class:`ResidualMLP` (cond (N, hidden) is added after the input LayerNorm).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, blocks: int, residual_scale: float = 0.9, out_init_std: float = 1e-3):
        super().__init__()
        self.residual_scale = residual_scale
        self.inp = nn.Linear(in_dim, hidden)
        self.inp_norm = nn.LayerNorm(hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden), nn.LayerNorm(hidden))
            for _ in range(blocks)
        )
        self.out = nn.Linear(hidden, out_dim)
        nn.init.normal_(self.out.weight, std=out_init_std)
        nn.init.zeros_(self.out.bias)

    def forward(self, inp: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp_norm(self.inp(inp))
        if cond is not None:
            h = h + cond
        for block in self.blocks:
            h = h + self.residual_scale * block(h)
        return self.out(h)


# Generator bodies by name: "compact" (pre-norm blocks of one hidden x hidden layer) and "wide" (the
# Sinkhorn-drifting paper's blocks of hidden -> 2 hidden -> hidden, about 4x the parameters at equal width).
ARCHITECTURES = {"compact": ResidualMLP, "wide": WideResidualMLP}


class Generator(nn.Module):
    """Maps noise z (N, noise_dim) ~ N(0, I) to samples (N, out_dim).

    With ``num_classes > 0`` it is class-conditional: ``labels`` (N,) int64 in [0, num_classes)
    select a learned embedding added to the hidden state, and are then required. ``arch`` names the
    body (a key of :data:`ARCHITECTURES`: "compact" or the paper's "wide").
    """

    def __init__(self, noise_dim: int = 16, out_dim: int = 2, hidden: int = 256, blocks: int = 6, num_classes: int = 0, arch: str = "compact"):
        super().__init__()
        check_choice(arch, list(ARCHITECTURES), "arch")
        self.noise_dim, self.out_dim, self.num_classes = noise_dim, out_dim, num_classes
        self.net = ARCHITECTURES[arch](noise_dim, out_dim, hidden, blocks)
        self.embed = nn.Embedding(num_classes, hidden) if num_classes > 0 else None

    def _cond(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if self.embed is None:
            if labels is not None:
                raise DriftopsError("labels were given to an unconditional Generator; pass labels=None or build it with num_classes > 0")
            return None
        if labels is None:
            raise DriftopsError(f"this Generator is conditioned on {self.num_classes} classes; pass labels (N,) with values in [0, {self.num_classes})")
        if labels.shape != (n,) or labels.dtype not in (torch.int32, torch.int64):
            raise DriftopsError(f"labels must be an integer tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DriftopsError(f"labels must lie in [0, {self.num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]")
        return self.embed(labels.to(self.embed.weight.device))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Samples (N, out_dim) from noise z (N, noise_dim) and optional labels (N,)."""
        _check_width(z, self.noise_dim, "z")
        return self.net(z, self._cond(labels, z.shape[0]))

    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples (n, out_dim), z ~ N(0, I) drawn on the module's device and dtype."""
        weight = self.net.inp.weight
        z = torch.randn(n, self.noise_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self(z, labels)


def _sinusoidal_frequencies(n: int) -> torch.Tensor:
    """Geometric frequencies from 1 to 1000 (transformer positional encoding)."""
    return torch.logspace(0, 3, n)


def _fourier_frequencies(n: int) -> torch.Tensor:
    """Random Gaussian frequencies of std 4 (random Fourier features), fixed at construction."""
    return 4.0 * torch.randn(n)


TIME_EMBEDDINGS = {"sinusoidal": _sinusoidal_frequencies, "fourier": _fourier_frequencies}


class VelocityField(nn.Module):
    """Time-conditioned velocity v(x, t): x (N, dim), t in [0, 1] a float, 0-d or (N,) tensor -> (N, dim).

    t enters as features [sin(2 pi f t), cos(2 pi f t)] over ``time_features`` frequencies f
    (``time_embedding`` "sinusoidal": geometric 1..1000; "fourier": random N(0, 4^2)), projected
    and added to the hidden state.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, blocks: int = 4, time_embedding: str = "sinusoidal", time_features: int = 32):
        super().__init__()
        check_choice(time_embedding, list(TIME_EMBEDDINGS), "time_embedding")
        self.dim = dim
        self.register_buffer("freqs", 2 * math.pi * TIME_EMBEDDINGS[time_embedding](time_features))
        self.time_proj = nn.Linear(2 * time_features, hidden)
        self.net = ResidualMLP(dim, dim, hidden, blocks)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Velocity (N, dim) at points x (N, dim) and times t (scalar or (N,))."""
        n = _check_width(x, self.dim, "x").shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise DriftopsError(f"t must be a float, a 0-d tensor or a tensor of shape ({n},), got shape {tuple(t.shape)}")
        angles = t[:, None] * self.freqs.to(x.dtype)
        return self.net(x, self.time_proj(torch.cat([angles.sin(), angles.cos()], 1)))

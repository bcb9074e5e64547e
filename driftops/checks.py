"""Input validation shared by the public functions."""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import DriftopsError

FLOAT_DTYPES = (torch.float32, torch.float64)


def as_points(p, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """Check that ``p`` is a finite, non-empty (N, D) float32/float64 tensor matching ``like``."""
    if isinstance(p, np.ndarray):
        p = torch.from_numpy(p)
    if not isinstance(p, torch.Tensor):
        raise DriftopsError(f"{name} must be a torch tensor or numpy array of shape (N, D), got {type(p).__name__}")
    if p.dim() != 2:
        raise DriftopsError(f"{name} must have shape (N, D), got shape {tuple(p.shape)}; reshape a single cloud with .reshape(-1, D)")
    if p.shape[0] == 0:
        raise DriftopsError(f"{name} is empty (shape {tuple(p.shape)}); pass at least one point")
    if p.dtype not in FLOAT_DTYPES:
        raise DriftopsError(f"{name} has dtype {p.dtype}; pass float32 or float64 (convert with .float() or .double())")
    if like is not None:
        if p.shape[1] != like.shape[1]:
            raise DriftopsError(f"{name} has dimension D={p.shape[1]} but x has D={like.shape[1]}; both clouds must live in the same space")
        if p.dtype != like.dtype:
            raise DriftopsError(f"{name} has dtype {p.dtype} but x has {like.dtype}; convert both to the same dtype")
        if p.device != like.device:
            raise DriftopsError(f"{name} is on {p.device} but x is on {like.device}; move both to the same device")
    if not bool(torch.isfinite(p).all()):
        bad = int((~torch.isfinite(p)).any(1).sum())
        raise DriftopsError(f"{name} contains NaN or inf in {bad} of its {p.shape[0]} points; remove or fix them")
    return p


def as_weights(w, n: int, name: str, like: torch.Tensor) -> torch.Tensor | None:
    """Check non-negative per-sample weights (multiplicities) of shape (n,) and return their logarithms."""
    if w is None:
        return None
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(w)
    if not isinstance(w, torch.Tensor) or w.shape != (n,):
        shape = tuple(w.shape) if hasattr(w, "shape") else type(w).__name__
        raise DriftopsError(f"{name} must be a tensor of shape ({n},), got {shape}")
    w = w.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise DriftopsError(f"{name} must be finite, non-negative and not all zero")
    return w.log()


def as_eps(eps) -> list[float]:
    """Return the temperatures as a list of positive floats (one float or a sequence of them)."""
    values = list(eps) if isinstance(eps, (Sequence, np.ndarray)) else [eps]
    if not values:
        raise DriftopsError("eps is an empty sequence; pass a positive float or a list of them")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v <= 0:
            raise DriftopsError(f"eps must be a positive finite number (got {v!r}); typical values are 0.01 to 1")
    return [float(v) for v in values]


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a message listing them."""
    if value not in choices:
        raise DriftopsError(f"unknown {name} {value!r}; pass one of {', '.join(map(repr, choices))}")
    return value


def check_finite(t: torch.Tensor, what: str, hint: str) -> torch.Tensor:
    """Raise if a result contains NaN or inf, so that no NaN leaves the library silently."""
    if not bool(torch.isfinite(t).all()):
        raise DriftopsError(f"{what} is not finite; {hint}")
    return t


def numpy_io(fn: Callable) -> Callable:
    """Let a function of (N, D) tensors accept numpy arrays; numpy in gives numpy out."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not any(isinstance(a, np.ndarray) for a in list(args[:2]) + [kwargs.get("x"), kwargs.get("y")]):
            return fn(*args, **kwargs)
        args = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
        kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.detach().cpu().numpy()
        if isinstance(out, tuple):
            return tuple(o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else o for o in out)
        return out

    return wrapper

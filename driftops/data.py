"""Targets: seeded 2D toy samplers, scikit-learn digits and .npy/.npz point files.

Every sampler returns a float32 (N, 2) tensor roughly inside [-4, 4]^2. Class-labelled
data comes as a :class:`ClassData` (points (N, D), labels (N,), class names, optional decoder).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checks import check_choice
from .errors import DriftopsError

Seed = torch.Generator | int


def _rng(seed: Seed) -> np.random.Generator:
    """A numpy generator from an int seed or from a draw of a torch generator."""
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seed))
    return np.random.default_rng(seed)


def _sk_seed(rng: np.random.Generator) -> int:
    """An int ``random_state`` for scikit-learn drawn from ``rng``."""
    return int(rng.integers(2**31 - 1))


def eight_gaussians(n: int, seed: Seed = 0) -> torch.Tensor:
    """Eight isotropic Gaussians (std 0.35) centred on the circle of radius 2*sqrt(2); (n, 2)."""
    rng = _rng(seed)
    angles = rng.integers(8, size=n) * (math.pi / 4)
    centres = 2 * math.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], 1)
    return torch.as_tensor(centres + 0.35 * rng.standard_normal((n, 2)), dtype=torch.float32)


def checkerboard(n: int, seed: Seed = 0) -> torch.Tensor:
    """Uniform on the 2x2 squares of [-4, 4]^2 where floor(x/2) + floor(y/2) is even; (n, 2)."""
    rng = _rng(seed)
    x = rng.uniform(-4, 4, n)
    y = rng.uniform(0, 2, n) + 2 * (2 * rng.integers(2, size=n) - 2 + np.floor(x / 2) % 2)
    return torch.as_tensor(np.stack([x, y], 1), dtype=torch.float32)


def moons(n: int, seed: Seed = 0) -> torch.Tensor:
    """scikit-learn two moons (noise 0.05), centred and scaled by 2.5; (n, 2)."""
    import sklearn.datasets  # imported on first use (slow, own OpenMP runtime)

    pts, _ = sklearn.datasets.make_moons(n, noise=0.05, random_state=_sk_seed(_rng(seed)))
    return torch.as_tensor((pts - [0.5, 0.25]) * 2.5, dtype=torch.float32)


def spiral(n: int, seed: Seed = 0) -> torch.Tensor:
    """Two interleaved spiral arms (1.5 turns, noise 0.1); (n, 2)."""
    rng = _rng(seed)
    t = np.sqrt(rng.uniform(size=n)) * 3 * math.pi
    arm = np.stack([-np.cos(t) * t, np.sin(t) * t], 1) + rng.uniform(0, 0.5, (n, 2))
    sign = 2.0 * rng.integers(2, size=(n, 1)) - 1
    return torch.as_tensor(sign * arm / 3 + 0.1 * rng.standard_normal((n, 2)), dtype=torch.float32)


def swiss_roll(n: int, seed: Seed = 0) -> torch.Tensor:
    """scikit-learn swiss roll (noise 0.5) projected on its (x, z) plane, centred, scaled by 1/3.6; (n, 2)."""
    import sklearn.datasets  # imported on first use (slow, own OpenMP runtime)

    pts, _ = sklearn.datasets.make_swiss_roll(n, noise=0.5, random_state=_sk_seed(_rng(seed)))
    return torch.as_tensor((pts[:, [0, 2]] - [1.6, 1.5]) / 3.6, dtype=torch.float32)


def rings(n: int, seed: Seed = 0) -> torch.Tensor:
    """Four concentric circles of radii 0.875, 1.75, 2.625, 3.5 (equal mass, noise 0.08); (n, 2)."""
    rng = _rng(seed)
    radius = 0.875 * (1 + rng.integers(4, size=n))
    angle = rng.uniform(0, 2 * math.pi, n)
    pts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return torch.as_tensor(pts + 0.08 * rng.standard_normal((n, 2)), dtype=torch.float32)


TOYS: dict[str, Callable[[int, Seed], torch.Tensor]] = {
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "moons": moons,
    "spiral": spiral,
    "swiss_roll": swiss_roll,
    "rings": rings,
}


def _check_count(n, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise DriftopsError(f"{name} must be a positive integer number of points, got {n!r}")
    return int(n)


def sample_toy(
    name: str, n: int, seed: Seed = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``n`` points (n, 2) of the toy distribution ``name`` (a key of :data:`TOYS`), reproducible from ``seed``."""
    check_choice(name, list(TOYS), "toy distribution")
    return TOYS[name](_check_count(n), seed).to(dtype=dtype, device=device)


@dataclass
class ClassData:
    """Class-labelled points.

    ``x`` (N, D) float32; ``labels`` (N,) int64 indexing ``classes``; ``decode`` maps (K, D) points
    back to data space (digits: images (K, 8, 8) in [0, 1]) and ``encode`` is its inverse, or None.
    """

    x: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def per_class(self) -> dict[str, torch.Tensor]:
        """The points of each class: name -> (N_c, D) tensor."""
        return {c: self.x[self.labels == k] for k, c in enumerate(self.classes)}


def load_digits(latent_dim: int | None = None, seed: int = 0) -> ClassData:
    """scikit-learn's 1797 8x8 digits, pixels scaled to [0, 1] (D = 64).

    With ``latent_dim`` the points are PCA latents divided by one global scale (so that their
    mean per-dimension variance is 1, keeping Euclidean geometry); ``decode`` inverts both and
    clips to [0, 1].
    """
    import sklearn.datasets  # imported on first use (slow, own OpenMP runtime)
    from sklearn.decomposition import PCA

    digits = sklearn.datasets.load_digits()
    pixels = digits.data.astype(np.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    classes = [str(c) for c in digits.target_names]
    if latent_dim is None:
        return ClassData(
            torch.from_numpy(pixels),
            labels,
            classes,
            decode=lambda z: z.reshape(-1, 8, 8).clamp(0, 1),
            encode=lambda img: img.reshape(-1, 64),
        )
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, numbers.Integral) or not 1 <= latent_dim <= 64:
        raise DriftopsError(f"latent_dim must be an integer in 1..64 (or None for raw pixels), got {latent_dim!r}")
    pca = PCA(n_components=int(latent_dim), random_state=seed).fit(pixels)
    latents = pca.transform(pixels)
    scale = float(np.sqrt(latents.var(0).mean()))

    def encode(img: torch.Tensor) -> torch.Tensor:
        flat = img.detach().reshape(-1, 64).cpu().numpy()
        return torch.as_tensor(pca.transform(flat) / scale, dtype=img.dtype, device=img.device)

    def decode(z: torch.Tensor) -> torch.Tensor:
        flat = pca.inverse_transform(z.detach().cpu().double().numpy() * scale)
        return torch.as_tensor(flat.reshape(-1, 8, 8), dtype=z.dtype, device=z.device).clamp(0, 1)

    return ClassData(torch.as_tensor(latents / scale, dtype=torch.float32), labels, classes, decode, encode)


def _points_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DriftopsError(f"{what} has shape {arr.shape}; each array must be a non-empty (N, D) array of points")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DriftopsError(f"{what} has dtype {arr.dtype}; store real numbers (float32 or float64)")
    if not np.isfinite(arr).all():
        raise DriftopsError(f"{what} contains NaN or inf in {int((~np.isfinite(arr)).any(1).sum())} rows; remove them")
    return arr.astype(np.float32)


def load_points(path: str | Path) -> ClassData:
    """Points from ``.npy`` (one (N, D) array: a single class named after the file stem) or ``.npz``
    (one (N_c, D) array per class, keyed by class name, as the FFHQ-ALAE latents are stored)."""
    path = Path(path)
    if path.suffix not in (".npy", ".npz"):
        raise DriftopsError(f"{path} is not a point file; pass a .npy (N, D) array or a .npz with one (N_c, D) array per class")
    if not path.is_file():
        raise DriftopsError(f"point file {path} does not exist; pass the path of an existing .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DriftopsError(f"cannot read {path} as {path.suffix} ({err}); write it with np.save / np.savez") from err
    if path.suffix == ".npy":
        arrays = {path.stem: _points_array(loaded, str(path))}
    else:
        with loaded:
            arrays = {k: _points_array(loaded[k], f"{path}[{k!r}]") for k in loaded.files}
        if not arrays:
            raise DriftopsError(f"{path} holds no arrays; save one (N_c, D) array per class with np.savez")
        dims = {k: a.shape[1] for k, a in arrays.items()}
        if len(set(dims.values())) > 1:
            raise DriftopsError(f"the classes of {path} have different dimensions {dims}; all must share one D")
    x = torch.from_numpy(np.concatenate(list(arrays.values())))
    labels = torch.cat([torch.full((len(a),), k, dtype=torch.int64) for k, a in enumerate(arrays.values())])
    return ClassData(x, labels, list(arrays))


def load_target(spec: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` target points (n, D) and their labels (n,) (None for toys) from a toy name, "digits" or a
    .npy/.npz path; data sets are subsampled without replacement, reproducibly from ``seed``."""
    n = _check_count(n)
    if spec in TOYS:
        return sample_toy(spec, n, seed), None
    if spec == "digits":
        data = load_digits(seed=seed)
    elif Path(spec).suffix in (".npy", ".npz"):
        data = load_points(spec)
    else:
        raise DriftopsError(f"unknown target {spec!r}; pass a toy ({', '.join(TOYS)}), 'digits' or a .npy/.npz path")
    if n > len(data.x):
        raise DriftopsError(f"target {spec!r} has {len(data.x)} points but n={n} were asked; pass n <= {len(data.x)}")
    idx = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))[:n]
    return data.x[idx], data.labels[idx]

"""Targets: seeded 2D toy samplers, scikit-learn digits and .npy/.npz point files.

The toys without prefix follow the Sinkhorn-drifting paper (its toy code): ``eight_gaussians``
(radius 2, std 0.08), ``checkerboard`` (4x4 tiles on [-2, 2]^2, noise 0.05), ``moons`` (noise
0.08) and ``spiral`` (noise 0.05); the FFJORD-scale versions are ``ffjord_eight_gaussians``,
``ffjord_checkerboard``, ``ffjord_moons`` and ``ffjord_spiral``; ``cfm_eight_gaussians`` and ``cfm_moons`` are
the torchcfm package's samplers, ``cfm_runner_moons``, ``cfm_runner_s_curve`` and ``cfm_runner_eight_gaussians`` the
data of torchcfm's experiment runner (Tong et al.'s 2D runs); ``s_curve`` is scikit-learn's S-curve seen in its (x, z)
plane. Each toy is a small frozen
dataclass whose fields are its documented parameters; override them with
``dataclasses.replace(TOYS["checkerboard"], noise=0.0)`` and pass the instance to
:func:`sample_toy`. Samplers draw with torch on the requested device from a ``torch.Generator``
(or an int seed), so training batches never leave the model's device. Class-labelled data comes
as a :class:`ClassData` (points (N, D), labels (N,), class names, optional decoder).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import DriftopsError

Seed = torch.Generator | int
# Other spellings accepted wherever a target name is (FFJORD's and the paper code's names).
TOY_ALIASES = {
    "8gaussians": "eight_gaussians", "swissroll": "swiss_roll", "scurve": "s_curve", "ffjord_8gaussians": "ffjord_eight_gaussians",
    "2spirals": "ffjord_spiral", "cfm_8gaussians": "cfm_eight_gaussians", "cfm_runner_8gaussians": "cfm_runner_eight_gaussians",
    "cfm_runner_scurve": "cfm_runner_s_curve",
}  # fmt: skip


class Toy:
    """A 2D toy distribution: ``draw(n, gen, dtype, device)`` returns (n, 2) points drawn from ``gen``."""

    def draw(self, n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _rand(gen, dtype, device, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype, device=device)

    @staticmethod
    def _randn(gen, dtype, device, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype, device=device)

    @staticmethod
    def _randint(gen, device, high: int, n: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=gen, device=device)


def _half_circles(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """scikit-learn's moons without noise (n, 2): unit half-circles, the upper centred at 0, the lower at (1, 0.5),
    equal weights, uniform in angle."""
    t = math.pi * Toy._rand(gen, dtype, device, n)
    lower = Toy._randint(gen, device, 2, n).bool()
    outer = torch.stack([t.cos(), t.sin()], 1)
    inner = torch.stack([1 - t.cos(), 0.5 - t.sin()], 1)
    return torch.where(lower[:, None], inner, outer)


@dataclass(frozen=True)
class EightGaussians(Toy):
    """Eight isotropic Gaussians of std ``std`` with equal weights, centred at angles k*pi/4 on the circle of ``radius``."""

    radius: float = 2.0
    std: float = 0.08

    def draw(self, n, gen, dtype, device):
        angle = self._randint(gen, device, 8, n).to(dtype) * (math.pi / 4)
        centres = self.radius * torch.stack([angle.cos(), angle.sin()], 1)
        return centres + self.std * self._randn(gen, dtype, device, n, 2)


@dataclass(frozen=True)
class Checkerboard(Toy):
    """Uniform on the ``tiles**2 / 2`` tiles (i + j even, i and j counted from the lower left) of a ``tiles`` x ``tiles``
    board on [-half_width, half_width]^2, plus isotropic Gaussian noise of std ``noise``; tiles have equal weights."""

    tiles: int = 4
    half_width: float = 2.0
    noise: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.tiles, bool) or not isinstance(self.tiles, int) or self.tiles < 2 or self.tiles % 2:
            raise DriftopsError(f"a checkerboard needs an even number of tiles per side (2, 4, 6, ...), got {self.tiles!r}")

    def draw(self, n, gen, dtype, device):
        i = self._randint(gen, device, self.tiles, n)
        j = 2 * self._randint(gen, device, self.tiles // 2, n) + i % 2
        side = 2 * self.half_width / self.tiles
        cell = torch.stack([i, j], 1).to(dtype)
        pts = -self.half_width + side * (cell + self._rand(gen, dtype, device, n, 2))
        return pts + self.noise * self._randn(gen, dtype, device, n, 2)


@dataclass(frozen=True)
class Moons(Toy):
    """scikit-learn's two moons (unit half-circles, the second shifted by (1, -0.5), equal weights) minus their centre
    (0.5, 0.25), times ``scale``, plus Gaussian noise of std ``noise`` (added before scaling, as in make_moons), plus
    ``centre`` (where the moons' centre lands)."""

    noise: float = 0.08
    scale: float = 1.0
    centre: tuple[float, float] = (0.0, 0.0)

    def draw(self, n, gen, dtype, device):
        pts = _half_circles(n, gen, dtype, device) - torch.tensor([0.5, 0.25], dtype=dtype, device=device)
        noisy = self.scale * (pts + self.noise * self._randn(gen, dtype, device, n, 2))
        return noisy + torch.tensor(self.centre, dtype=dtype, device=device)


@dataclass(frozen=True)
class ShiftedMoons(Toy):
    """torchdyn's moons as torchcfm (Tong et al.) samples them: unit half-circles (the second centred at (1, 0.5),
    equal weights), both coordinates moved by one U(0, ``shift``) draw per point, times ``scale``, minus ``offset``.
    Angles are uniform in [0, pi] (torchdyn spaces a draw's angles evenly: the same distribution)."""

    shift: float = 0.2
    scale: float = 3.0
    offset: float = 1.0

    def draw(self, n, gen, dtype, device):
        pts = _half_circles(n, gen, dtype, device) + self.shift * self._rand(gen, dtype, device, n, 1)
        return self.scale * pts - self.offset


@dataclass(frozen=True)
class Spiral(Toy):
    """Two point-symmetric Archimedean arms r = ``radius`` * s, angle 3*pi*s (1.5 turns), s = sqrt(u) with u uniform
    (uniform density along the area swept), equal weights, plus Gaussian noise of std ``noise``."""

    radius: float = 2.0
    noise: float = 0.05

    def draw(self, n, gen, dtype, device):
        s = self._rand(gen, dtype, device, n).sqrt()
        sign = 2 * self._randint(gen, device, 2, n).to(dtype) - 1
        angle = 3 * math.pi * s
        arm = self.radius * s[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
        return sign[:, None] * arm + self.noise * self._randn(gen, dtype, device, n, 2)


@dataclass(frozen=True)
class FfjordSpiral(Toy):
    """FFJORD's ``2spirals``: two arms t = sqrt(u) * 3*pi, (-t cos t, t sin t) + U(0, 0.5)^2, mirrored, divided by
    3, plus Gaussian noise of std ``noise``."""

    noise: float = 0.1

    def draw(self, n, gen, dtype, device):
        t = self._rand(gen, dtype, device, n).sqrt() * 3 * math.pi
        arm = torch.stack([-t.cos() * t, t.sin() * t], 1) + 0.5 * self._rand(gen, dtype, device, n, 2)
        sign = 2 * self._randint(gen, device, 2, n).to(dtype) - 1
        return sign[:, None] * arm / 3 + self.noise * self._randn(gen, dtype, device, n, 2)


@dataclass(frozen=True)
class SwissRoll(Toy):
    """scikit-learn's swiss roll t = 1.5*pi*(1 + 2u), (t cos t, t sin t) with Gaussian noise ``noise`` (its (x, z)
    plane), minus (1.6, 1.5), divided by 3.6."""

    noise: float = 0.5

    def draw(self, n, gen, dtype, device):
        t = 1.5 * math.pi * (1 + 2 * self._rand(gen, dtype, device, n))
        pts = torch.stack([t * t.cos(), t * t.sin()], 1) + self.noise * self._randn(gen, dtype, device, n, 2)
        return (pts - torch.tensor([1.6, 1.5], dtype=dtype, device=device)) / 3.6


@dataclass(frozen=True)
class SCurve(Toy):
    """scikit-learn's S-curve in its (x, z) plane: t = 3*pi*(u - 1/2), (sin t, sign(t) * (cos t - 1)) (x in [-1, 1],
    z in [-2, 2], uniform in t), times ``scale``, plus Gaussian noise of std ``noise`` (added before scaling, as in
    make_s_curve)."""

    noise: float = 0.05
    scale: float = 1.0

    def draw(self, n, gen, dtype, device):
        t = 3 * math.pi * (self._rand(gen, dtype, device, n) - 0.5)
        pts = torch.stack([t.sin(), t.sign() * (t.cos() - 1)], 1)
        return self.scale * (pts + self.noise * self._randn(gen, dtype, device, n, 2))


@dataclass(frozen=True)
class Rings(Toy):
    """``count`` concentric circles of radii k * ``spacing`` (k = 1..count, equal mass), plus Gaussian noise ``noise``."""

    count: int = 4
    spacing: float = 0.875
    noise: float = 0.08

    def draw(self, n, gen, dtype, device):
        radius = self.spacing * (1 + self._randint(gen, device, self.count, n)).to(dtype)
        angle = 2 * math.pi * self._rand(gen, dtype, device, n)
        pts = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
        return pts + self.noise * self._randn(gen, dtype, device, n, 2)


TOYS: dict[str, Toy] = {
    "eight_gaussians": EightGaussians(),
    "checkerboard": Checkerboard(),
    "moons": Moons(),
    "spiral": Spiral(),
    "swiss_roll": SwissRoll(),
    "rings": Rings(),
    "s_curve": SCurve(),
    # FFJORD scale (Grathwohl et al.): 8 Gaussians on radius 2*sqrt(2), std 0.5/sqrt(2); checkerboard of 2x2 squares
    # on [-4, 4]^2 without noise; moons scaled by 2.5 with noise 0.05; two spirals with noise 0.1.
    "ffjord_eight_gaussians": EightGaussians(radius=2 * math.sqrt(2), std=0.5 / math.sqrt(2)),
    "ffjord_checkerboard": Checkerboard(tiles=4, half_width=4.0, noise=0.0),
    "ffjord_moons": Moons(noise=0.05, scale=2.5),
    "ffjord_spiral": FfjordSpiral(),
    # The torchcfm package's samplers (Tong et al.): 8 Gaussians on radius 5 with covariance sqrt(0.1) I (std
    # 0.1 ** 0.25), torchdyn's moons with a U(0, 0.2) diagonal shift, times 3, minus 1.
    "cfm_eight_gaussians": EightGaussians(radius=5.0, std=0.1**0.25),
    "cfm_moons": ShiftedMoons(),
    # torchcfm's experiment runner (its 2D data modules): scikit-learn's moons with noise 0.05, times 2, x minus 1;
    # scikit-learn's S-curve with noise 0.05 in its (x, z) plane, times 1.5; torchdyn's 8 Gaussians as the runner asks
    # them (radius 5, std 1), which torchdyn places on the unit circle whatever the radius.
    "cfm_runner_moons": Moons(noise=0.05, scale=2.0, centre=(0.0, 0.5)),
    "cfm_runner_s_curve": SCurve(noise=0.05, scale=1.5),
    "cfm_runner_eight_gaussians": EightGaussians(radius=1.0, std=1.0),
}


def resolve_target(spec: str) -> str:
    """The canonical target name: a toy (a key of :data:`TOYS` or an alias such as ``8gaussians``), ``digits`` or a
    .npy/.npz path; raises :class:`DriftopsError` naming the choices otherwise. Used by the API and every command."""
    if not isinstance(spec, (str, Path)):
        raise DriftopsError(f"a target must be a name or a path, got {type(spec).__name__}")
    spec = str(spec)
    name = TOY_ALIASES.get(spec, spec)
    if name in TOYS or name == "digits" or Path(name).suffix in (".npy", ".npz"):
        return name
    raise DriftopsError(f"unknown target {spec!r}; pass a toy ({', '.join(TOYS)}; or {', '.join(TOY_ALIASES)}), 'digits' or a .npy/.npz path")


def _generator(seed: Seed, device: torch.device) -> torch.Generator:
    """``seed`` itself when it is a generator on ``device``; a new generator on ``device`` seeded with the int."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != device.type:
            raise DriftopsError(f"the generator is on {seed.device} but the points are asked on {device}; pass a generator created with torch.Generator(device={str(device)!r})")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DriftopsError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator(device=device).manual_seed(int(seed))


def _check_count(n, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise DriftopsError(f"{name} must be a positive integer number of points, got {n!r}")
    return int(n)


def sample_toy(
    toy: str | Toy, n: int, seed: Seed = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``n`` points (n, 2) of a toy (a name of :data:`TOYS`, an alias, or a :class:`Toy` instance with overridden
    parameters), drawn on ``device`` from ``seed`` (an int, or a torch.Generator on that device that is advanced)."""
    if not isinstance(toy, Toy):
        name = resolve_target(toy)
        if name not in TOYS:
            raise DriftopsError(f"{toy!r} is not a toy distribution; pass one of {', '.join(TOYS)}")
        toy = TOYS[name]
    device = torch.device(device)
    return toy.draw(_check_count(n), _generator(seed, device), dtype, device)


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
    name = resolve_target(spec)
    if name in TOYS:
        return sample_toy(name, n, seed), None
    data = load_digits(seed=seed) if name == "digits" else load_points(name)
    if n > len(data.x):
        raise DriftopsError(f"target {spec!r} has {len(data.x)} points but n={n} were asked; pass n <= {len(data.x)}")
    idx = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))[:n]
    return data.x[idx], data.labels[idx]

"""Every KeOps formula driftops compiles, listed in one place, and a warm-up that compiles a job's formulas up front.

All of driftops's KeOps reductions are built by :func:`driftops.backends.keops.keops_logits` and are one of two
*reduction shapes* over the logits ``S_ij = logw_j - c(x_i, y_j) * (-1/eps)`` (or ``d(x_i, y_j)`` for the
euclidean cost):

* ``"lse"``: ``Max_SumShiftExpWeight`` with weight 1 (a log-sum-exp);
* ``"mean"``: ``Max_SumShiftExpWeight`` with weights ``[1, values]`` (softmax-weighted mean; log-sum-exp and mean in one
  pass, the arithmetic of KeOps's ``sumsoftmaxweight``).

The Newton finish of Sinkhorn (``Sinkhorn(newton=k)``; by default k = 128 at low eps in D <= 3 on the "auto" and
"sparse" backends) adds a third shape, ``KMin_ArgKMin`` of the negated logits (the k largest logits of each row and
their columns), one kernel per k and path, listed for the Sinkhorn plan (``job_formulas(newton=...)``).

``-1/eps`` is a parameter and the column log-weights always a variable (zeros when absent), so no temperature,
weight or offset is compiled in. The variants are: the cost (2), the self mask (the pair ``(i, diag_i)``
penalised by exact integer index parts, or none), the path (dense-lazy, or block-sparse with KeOps ranges, a
separate compiled loop), the point dimension D (values have dimension D), the dtype and the device. A job
on D-dimensional float32 clouds with one cost on one device thus compiles at most 2 x 2 x 2 = 8 kernels.
Gradients through a dense-lazy reduction compile one more kernel per differentiated input (KeOps's
``Grad_WithSavedForward`` of the reduction): x, y and the log-weights for ``"lse"``, and the values too for
``"mean"`` (:data:`GRAD_INPUTS`), listed with ``job_formulas(grad=True)``: at most 2 x 7 = 14 more per cost.
KeOps compiles each once per machine into its cache folder (6-20 s each on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..costs import check_cost
from ..errors import DriftopsError
from ..files import atomic_write_text
from .base import topk_width

SHAPES = ("lse", "mean")
# The inputs of each reduction shape that a gradient can reach; KeOps compiles one gradient kernel per input.
GRAD_INPUTS = {"lse": ("x", "y", "logw"), "mean": ("x", "y", "logw", "values")}


@dataclass(frozen=True)
class Formula:
    """One compiled KeOps kernel: reduction ``shape`` (see SHAPES, or ``"top<k>"``: the k largest logits of the Newton
    finish), ``cost``, ``masked`` (self mask), ``sparse`` (block-sparse ranges) or dense-lazy, point dimension ``dim``,
    ``dtype``, ``device`` type, and ``grad``: the input (see GRAD_INPUTS) whose gradient kernel this is, or "" for the
    reduction itself."""

    shape: str
    cost: str
    masked: bool
    sparse: bool
    dim: int
    dtype: str = "float32"
    device: str = "cpu"
    grad: str = ""

    def __str__(self) -> str:
        path = "sparse" if self.sparse else "keops"
        grad = f" d/d{self.grad}" if self.grad else ""
        return f"{self.shape}{' masked' if self.masked else ''}{grad} {self.cost} {path} D={self.dim} {self.dtype} {self.device}"

    def run(self) -> None:
        """Evaluate the formula once on a few points (compiling it if KeOps has not yet); a gradient kernel by the
        reduction with its input alone requiring a gradient (the forward pass compiles the kernels its backward pass
        will load: :func:`driftops.backends.keops.differentiable_once`)."""
        from .keops import KeOpsBackend
        from .sparse import SparseBackend

        gen = torch.Generator().manual_seed(0)
        opts = {"dtype": getattr(torch, self.dtype)}
        x, y, values = (torch.randn(n, self.dim, generator=gen, **opts).to(self.device) for n in (8, 6, 6))
        inputs = {"x": x, "y": y, "logw": torch.zeros(6, **opts, device=self.device), "values": values}
        if self.grad:
            inputs[self.grad].requires_grad_()
        diag = torch.arange(8, device=self.device) % 6 if self.masked else None
        backend = SparseBackend() if self.sparse else KeOpsBackend()
        with torch.set_grad_enabled(bool(self.grad)):
            if self.shape.startswith("top"):
                backend.reduce_topk(x, y, 1.0, self.cost, inputs["logw"], int(self.shape[3:]))
            elif self.shape == "lse":
                backend.reduce_lse(x, y, 1.0, self.cost, inputs["logw"], diag)
            else:  # the kernel of reduce_lse_mean too
                backend.reduce_mean(x, y, 1.0, self.cost, values, inputs["logw"], diag)


def job_formulas(
    dim: int,
    dtype: torch.dtype | str = "float32",
    cost: str = "sqeuclidean",
    plans: Sequence[str] = ("one_sided", "two_sided", "sinkhorn"),
    backend: str = "auto",
    device: torch.device | str = "cpu",
    grad: bool = False,
    newton: int | None = None,
) -> list[Formula]:
    """The formulas a job with these settings can compile (``grad``: gradients through the drift are needed, which adds
    the gradient kernels of the dense-lazy reductions; ``newton``: the Newton finish's k as in
    :class:`driftops.Sinkhorn` (None: its default for this backend and dimension, at low eps), whose top-k kernel is
    listed for Sinkhorn plans).

    The path follows :class:`driftops.backends.AutoBackend`: block-sparse on CPU for D <= 3 without gradients,
    dense-lazy otherwise; the ``"dense"`` backend needs none. Masked variants only for one- and two-sided plans.
    """
    from . import SPARSE_MAX_DIM

    check_cost(cost)
    device = torch.device(device).type
    dtype = str(dtype).replace("torch.", "")
    if backend == "dense":
        return []
    if backend == "auto":
        sparse = device == "cpu" and dim <= SPARSE_MAX_DIM and not grad
    elif backend in ("keops", "sparse"):
        sparse = backend == "sparse"
    else:
        raise DriftopsError(f"unknown backend {backend!r}; pass 'auto', 'keops', 'sparse' or 'dense'")
    masks = [False] + ([True] if set(plans) - {"sinkhorn"} else [])
    out = [Formula(shape, cost, masked, sparse, dim, dtype, device) for masked in masks for shape in SHAPES]
    if grad and not sparse:
        out += [Formula(f.shape, cost, f.masked, False, dim, dtype, device, wrt) for f in out for wrt in GRAD_INPUTS[f.shape]]
    if newton is None:
        from ..sinkhorn import NEWTON_K, low_dim_path
        from . import get_backend

        newton = NEWTON_K if low_dim_path(get_backend(backend), dim) else 0
    if newton and "sinkhorn" in plans:
        out.append(Formula(f"top{topk_width(newton)}", cost, False, sparse, dim, dtype, device))
    return out


def manifest_path() -> Path:
    """The file listing the formulas the warm-up has compiled: in KeOps's build folder, one per set of compiler flags
    (KeOps keys its libraries on them: new flags, or a CPU of another kind, compile every formula anew)."""
    from .keops import LazyTensor  # noqa: F401  (imports pykeops quietly)
    import keopscore
    import pykeops

    flags = hashlib.sha1(keopscore.config.get_cpp_flags().encode()).hexdigest()[:12]
    return Path(pykeops.get_build_folder()) / f"driftops-warmup-{flags}.json"


def _manifest(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        return set()


def warmup(formulas: Iterable[Formula] | None = None, progress: bool = True) -> list[Formula]:
    """Compile ``formulas`` (default: every formula of 2D float32 CPU jobs) that the warm-up has not compiled on
    this machine yet, announcing them in one line (and a progress bar unless ``progress`` is False). Returns
    the formulas it ran."""
    import pykeops
    from tqdm.auto import tqdm

    formulas = list(job_formulas(2) if formulas is None else formulas)
    path = manifest_path()
    done = _manifest(path)
    todo = [f for f in dict.fromkeys(formulas) if json.dumps(asdict(f), sort_keys=True) not in done]
    if not todo:
        return []
    print(f"driftops: compiling {len(todo)} KeOps kernel{'s' * (len(todo) > 1)}, once per machine (cache: {path.parent})", flush=True)
    verbose = pykeops.verbose
    pykeops.set_verbose(False)
    start = time.perf_counter()
    try:
        for f in tqdm(todo, disable=not progress, unit="kernel", desc="KeOps"):
            f.run()
            done.add(json.dumps(asdict(f), sort_keys=True))
            atomic_write_text(path, json.dumps(sorted(done), indent=1))
    finally:
        pykeops.set_verbose(verbose)
    print(f"driftops: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    return todo

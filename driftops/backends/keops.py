"""KeOps backend: symbolic LazyTensor reductions, O((N + M)·D) memory, CPU or GPU (follows the inputs)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, TypeVar

import torch

from .. import threads
from ..costs import cost_power
from .base import MASK_PENALTY, Backend, needs_grad


# Compiler flags of KeOps's CPU formulas when the user set no CXXFLAGS (x86-64 Linux with g++ or clang): code for
# this machine's CPU (FMA, AVX-512 where present): 8192-point 2D drifts at eps 0.1 4-15% faster (the load table of
# benchmarks/bench_drift.py, environments default and generic). KeOps keys its cache on the flags, so
# :func:`native_cxxflags` names the CPU in them: a cache folder shared by machines with different CPUs (one home
# directory, a resized virtual machine keeping its host name) never loads a library built for instructions the
# CPU lacks.
NATIVE_CXXFLAGS = "-march=native"
# Added to the flags of every formula driftops compiles with its own loops (:func:`_own_loops`): KeOps keys its
# cache on the flags, so these libraries and KeOps's own never mix in one build folder.
LOOPS_MACRO = "-DDRIFTOPS_LOOPS=dynamic_tiled_floored"
# Flags that let the tiled loops (:data:`TILE`) call glibc's vectorised exp (libmvec) where it is installed: the
# macro declares its SIMD variants, errno is never read, and every library links it.
VECTOR_EXP_FLAGS = "-DDRIFTOPS_VECTOR_EXP -fno-math-errno -Wl,--no-as-needed -lmvec"
# KeOps's CPU loops (keopscore's code templates) as driftops compiles them: (template class, pattern, replacement).
# The block-sparse loop opens one parallel region per row cluster, each splitting the cluster's rows statically;
# here one region per call hands out whole row clusters to the threads as they come free (the inner region stays
# for batched reductions, which driftops does not use). The dense-lazy loop splits its rows statically; here in
# chunks of 32 handed out as they come free. A thread that shares its core with another process then takes fewer
# rows instead of holding up the others, so KeOps's loops keep every core's share beside other work.
LOOP_SCHEDULES = (
    ("CpuReduc_ranges", r"(?=\n[ \t]*for \(signed long int range_index = 0; range_index < nranges; range_index\+\+\))",
     "\n    #pragma omp parallel for schedule(dynamic) if(nbatchdims == 0)"),
    ("CpuReduc_ranges", r"#pragma omp parallel for[ \t]*(?=\n[ \t]*for \(signed long int i = start_x;)",
     "#pragma omp parallel for if(nbatchdims > 0)"),
    ("CpuReduc", r"#pragma omp parallel for[ \t]*(?=\n[ \t]*for \(signed long int i = 0; i < nx; i\+\+\))",
     "#pragma omp parallel for schedule(dynamic, 32)"),
)  # fmt: skip
# Log-sum-exp and softmax reductions (KeOps's Max_SumShiftExpWeight) with at most TILE_MAX_WEIGHTS weights per
# column sum their columns in tiles of TILE: the logits and weights of a tile first, then the tile's maximum and its
# exponentials and weighted sums (two SIMD loops), then one update of the row's running maximum and sums, where KeOps
# updates them (a branch and a scalar exp) per column. 8192-point 2D drifts 3-5x faster (benchmarks/bench_drift.py);
# a softmax mean of 64-dimensional values was 2x slower in tiles (their transposed copy), 32 about even, 16 faster.
# (An `omp simd` on the first loop made it 1.5-2.5x slower: left to the compiler.)
TILE = 64
TILE_MAX_WEIGHTS = 17
# The tiles' exponential per C type, and the floor of its argument (the logit less the tile's maximum): below it the
# result underflows and glibc's SIMD exp leaves its vector path for a scalar one on the whole vector (a dense-lazy
# softmax at eps 0.01, where most arguments underflow, ran 6-7x slower). A floored term weighs e^-80 (float:
# 1.8e-35) or e^-700 (double: 1e-304) of the tile's largest one instead of less, far below either type's rounding.
# float32 uses expf: the drifts 1.25-1.4x faster than with the double exp.
TILE_EXP = {"float": ("expf", -80), "double": ("exp", -700)}
# The column loop of each CPU template as rendered (its first occurrence: the unbatched one) and its bounds.
COLUMN_LOOPS = {
    "CpuReduc_ranges": ("for (signed long int j = start_y; j < end_y; j++) {", "start_y", "end_y"),
    "CpuReduc": ("for (signed long int j = 0; j < ny; j++) {", "0", "ny"),
}
# SIMD variants of glibc's exp for the tiles' exponentials (with VECTOR_EXP_FLAGS).
VECTOR_EXP = """
#ifdef DRIFTOPS_VECTOR_EXP
#pragma omp declare simd notinbranch
extern "C" float expf(float) noexcept;
#pragma omp declare simd notinbranch
extern "C" double exp(double) noexcept;
#endif
"""
# Whether KeOps's CPU loops are compiled with LOOP_SCHEDULES and tiles (set at import: :func:`_import_pykeops`).
DYNAMIC = False


def native_cxxflags(cpuinfo: str) -> str:
    """:data:`NATIVE_CXXFLAGS` and a macro naming the CPU: a hash of the model name and instruction-set flags of
    ``cpuinfo`` (the text of ``/proc/cpuinfo``; its first processor)."""
    first = cpuinfo.split("\n\n")[0]
    fields = [line.split(":", 1)[1].strip() for line in first.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    key = hashlib.sha1("|".join(fields).encode()).hexdigest()[:12]
    return f"{NATIVE_CXXFLAGS} -DDRIFTOPS_CPU={key}"


def _x86_64_linux() -> bool:
    """Whether this is x86-64 Linux, where driftops chooses KeOps's compiler flags (g++ or clang, glibc)."""
    return sys.platform == "linux" and platform.machine() == "x86_64"


def _native_flags() -> str | None:
    """:func:`native_cxxflags` on x86-64 Linux with a readable ``/proc/cpuinfo``, else None (KeOps's own flags)."""
    if not _x86_64_linux():
        return None
    try:
        return native_cxxflags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def _templates() -> dict[str, type]:
    """keopscore's CPU code template classes named in :data:`LOOP_SCHEDULES`."""
    from keopscore.mapreduce.cpu.CpuReduc import CpuReduc
    from keopscore.mapreduce.cpu.CpuReduc_ranges import CpuReduc_ranges

    return {"CpuReduc": CpuReduc, "CpuReduc_ranges": CpuReduc_ranges}


def _vector_exp_flags() -> str | None:
    """:data:`VECTOR_EXP_FLAGS` on x86-64 Linux where glibc's libmvec is installed, else None."""
    import ctypes.util

    return VECTOR_EXP_FLAGS if _x86_64_linux() and ctypes.util.find_library("mvec") is not None else None


def _loop_end(code: str, start: int) -> int:
    """Index just past the brace closing the first block opened at or after ``start`` in ``code``."""
    depth = 0
    for k in range(code.index("{", start), len(code)):
        depth += {"{": 1, "}": -1}.get(code[k], 0)
        if depth == 0:
            return k + 1
    raise ValueError("unbalanced braces in generated code")


def _tiled_columns(gen, name: str) -> None:
    """Rewrite the unbatched column loop of ``gen`` (a keopscore CPU template instance whose ``code`` is rendered) in
    tiles of :data:`TILE` columns when its reduction is a log-sum-exp / softmax one with at most
    :data:`TILE_MAX_WEIGHTS` weights; other reductions are left as they are. Each tile's ``(max, sums)`` enters the
    row's accumulator as one term of KeOps's own pair update."""
    from keopscore.formulas.reductions.Max_SumShiftExpWeight_Reduction import Max_SumShiftExpWeight_Reduction
    from keopscore.utils.code_gen_utils import c_array, neg_infinity

    dtype, dim = gen.fout.dtype, gen.fout.dim
    if not isinstance(gen.red_formula, Max_SumShiftExpWeight_Reduction) or dim - 1 > TILE_MAX_WEIGHTS or dtype not in TILE_EXP:
        return
    head, first, last = COLUMN_LOOPS[name]
    exp, exp_floor = TILE_EXP[dtype]
    fout, part = c_array(dtype, dim, "fout"), c_array(gen.acc.dtype, dim, "part")
    if name == "CpuReduc_ranges":
        yj = c_array(dtype, gen.varloader.dimy, "yj")
        load = yj.declare() + gen.varloader.load_vars("j", yj, gen.args, row_index=gen.j)
        table = gen.varloader.table(gen.xi, yj, gen.param_loc)
    else:
        load, table = "", gen.varloader.direct_table(gen.args, gen.i, gen.j)
    sums = [f"tile_sum_{k}" for k in range(1, dim)]
    tiled = f"""
for (signed long int j0 = {first}; j0 < {last}; j0 += {TILE}) {{
    signed long int width = ({last} - j0 < {TILE}) ? {last} - j0 : {TILE};
    {dtype} tile[{TILE * dim}];  // tile[k * TILE + t]: coordinate k of the formula at column j0 + t
    for (signed long int t = 0; t < width; t++) {{
        signed long int j = j0 + t;
        {fout.declare()}
        {load}
        {gen.red_formula.formula(fout, table)}
        {"".join(f"tile[{k * TILE} + t] = fout[{k}];" for k in range(dim))}
    }}
    {dtype} tile_max = {neg_infinity(dtype).id};
    #pragma omp simd reduction(max:tile_max)
    for (signed long int t = 0; t < width; t++) {{ tile_max = tile[t] > tile_max ? tile[t] : tile_max; }}
    {dtype} {", ".join(f"{s} = 0" for s in sums)};
    // tile_max - tile_max (0, NaN for an all -inf tile as below): a floor the compiler cannot fold into the exp, which
    // would split the loop into branches and keep it from vectorising.
    const {dtype} tile_floor = (tile_max - tile_max) + ({exp_floor});
    #pragma omp simd reduction(+:{", ".join(sums)})
    for (signed long int t = 0; t < width; t++) {{
        {dtype} d = tile[t] - tile_max;
        d = d > tile_floor ? d : tile_floor;
        {dtype} e = {exp}(d);
        {"".join(f"{s} += e * tile[{k * TILE} + t];" for k, s in enumerate(sums, 1))}
    }}
    {part.declare()}
    part[0] = tile_max;
    {"".join(f"part[{k}] = {s};" for k, s in enumerate(sums, 1))}
    {gen.sum_scheme.accumulate_result(gen.acc, part, gen.j)}
}}
"""
    start = gen.code.index(head)
    gen.code = gen.code[:start] + tiled + gen.code[_loop_end(gen.code, start):]
    gen.code = gen.code.replace("#include <cmath>", "#include <cmath>" + VECTOR_EXP, 1)


def _own_loops() -> bool:
    """Make keopscore generate its CPU loops with :data:`LOOP_SCHEDULES` and tiled softmax columns
    (:func:`_tiled_columns`); False (nothing changed) unless each pattern occurs exactly once and each column loop
    at least once in its template's source (another KeOps version, or no source to read)."""
    import inspect
    import re

    templates = _templates()
    try:
        sources = {name: inspect.getsource(cls.get_code) for name, cls in templates.items()}
    except (OSError, TypeError):
        return False
    if any(len(re.findall(pattern, sources[name])) != 1 for name, pattern, _ in LOOP_SCHEDULES):
        return False
    if any(head.replace("{", "{{") not in sources[name] for name, (head, _, _) in COLUMN_LOOPS.items()):
        return False
    for name, cls in templates.items():
        rules = [(pattern, text) for owner, pattern, text in LOOP_SCHEDULES if owner == name]

        def get_code(self, _generate=cls.get_code, _rules=rules, _name=name) -> None:
            _generate(self)
            for pattern, text in _rules:
                self.code = re.sub(pattern, lambda _: text, self.code, count=1)
            _tiled_columns(self, _name)

        cls.get_code = get_code
    return True


def _import_pykeops() -> None:
    """Import pykeops, and where keopscore is not imported yet (it reads ``CXXFLAGS`` once, at import): with
    ``CXXFLAGS`` in the environment during the import set to the user's, or where they set none (an empty one
    counts) :func:`_native_flags`, followed by :data:`LOOPS_MACRO` and :func:`_vector_exp_flags`, and with
    driftops's loops (:func:`_own_loops`); the
    environment is restored right after (subprocesses see the user's). Without its "CUDA libraries not found"
    notice when torch sees no CUDA device (the notice then says nothing new); every other line it prints passes
    through."""
    global DYNAMIC
    printed = io.StringIO()
    own = "keopscore" not in sys.modules
    user = os.environ.get("CXXFLAGS")
    if own:
        os.environ["CXXFLAGS"] = " ".join(
            f for f in (user if user is not None else _native_flags(), LOOPS_MACRO, _vector_exp_flags()) if f
        )
    try:
        with contextlib.redirect_stdout(printed):
            import pykeops.torch  # noqa: F401
        DYNAMIC = own and _own_loops()
    finally:
        if own and user is None:
            del os.environ["CXXFLAGS"]
        elif own:
            os.environ["CXXFLAGS"] = user
    quiet = not torch.cuda.is_available()
    for line in printed.getvalue().splitlines():
        if not (quiet and "CUDA libraries not found" in line):
            print(line)


_import_pykeops()
from pykeops.torch import LazyTensor, Vi, Vj  # noqa: E402

T = TypeVar("T")
# Kinds of reduction (see ``compiled_once``) this process has run at least once.
_RUN: set[Kind | tuple[Kind, str]] = set()


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Hold an exclusive lock on ``driftops.lock`` in KeOps's build folder (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    import pykeops

    folder = Path(pykeops.get_build_folder())
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "driftops.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def compiled_once(kind: Kind, run: Callable[[], T]) -> T:
    """``run()``, a KeOps reduction of this ``kind`` (everything that selects its compiled formula), on the threads
    of :func:`driftops.threads.loop` where KeOps's loops are scheduled dynamically (:data:`DYNAMIC`).

    KeOps writes a new formula's library in place, so a process sharing the build folder (another rank, another
    experiment) can load it half-written. The first run of each kind in this process therefore holds the build
    folder's lock: a second process compiling the same formula waits, then loads the finished library.
    """
    if DYNAMIC:
        run = functools.partial(threads.loop, run, kind.device == "cpu")
    if kind in _RUN:
        return run()
    with _build_lock():
        out = run()
    _RUN.add(kind)
    return out


def differentiable_once(kind: Kind, reduce: Callable[..., T], **inputs: torch.Tensor | None) -> T:
    """``reduce(**inputs)`` through :func:`compiled_once`; first, where autograd will reach some of the ``inputs``
    (row-aligned tensors or None), the gradient kernels a backward pass from it loads (one per such input) are
    compiled under the build folder's lock too, by a backward pass on two points of each input: KeOps would
    otherwise compile them in that backward pass, outside the lock."""
    wanted = [name for name, t in inputs.items() if needs_grad(t) and (kind, name) not in _RUN]
    if wanted:
        with _build_lock():
            for name in wanted:
                few = {k: None if t is None else t.detach()[:2].requires_grad_(k == name) for k, t in inputs.items()}
                out = reduce(**few)
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.grad(sum(o.sum() for o in outs), few[name], allow_unused=True)
                _RUN.add((kind, name))
    return compiled_once(kind, lambda: reduce(**inputs))


class Kind(NamedTuple):
    """The settings that select a reduction's compiled formula (for :func:`compiled_once`)."""

    name: str
    cost: str
    masked: bool
    dim: int
    values: int | None
    dtype: torch.dtype
    device: str


def reduction_kind(name: str, x: torch.Tensor, values: torch.Tensor | None, cost: str, diag: torch.Tensor | None) -> Kind:
    """The :class:`Kind` of a reduction ``name`` from x (N, D) with ``values`` (M, E) or None and self mask ``diag``."""
    return Kind(name, cost, diag is not None, x.shape[1], None if values is None else values.shape[1], x.dtype, x.device.type)


# Indices enter KeOps formulas as floats of the inputs' dtype: split into two parts below 2^24 (exact in
# float32) they stay exact up to 2^48 points.
INDEX_BASE = 1 << 24


def index_parts(index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 2) exact float form of int64 indices (n,): ``[index // INDEX_BASE, index % INDEX_BASE]``."""
    return torch.stack([index // INDEX_BASE, index % INDEX_BASE], 1).to(dtype)


def keops_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    cost: str,
    logw: torch.Tensor | None,
    diag: torch.Tensor | None,
    y_index: torch.Tensor | None = None,
) -> LazyTensor:
    """Symbolic (N, M) logits ``logw_j - c_ij/eps``.

    ``diag`` (N,) int64: the column masked in each row (penalty ``-MASK_PENALTY``, never -inf, as for zero
    weights), in the numbering of ``y_index`` (M,), the original row numbers of y's points when they were
    permuted (the block-sparse backend sorts them); by default column j is point j.
    """
    # Vi / Vj mark per-point variables even for a single row or column (a (1, 1, D) LazyTensor would be taken
    # for a parameter: another compiled formula).
    x_i, y_j = Vi(x), Vj(y)
    d2 = x_i.sqdist(y_j)
    # -1/eps enters as a parameter tensor: one compiled formula for every temperature (a Python -1.0 would be folded).
    scale = LazyTensor(torch.tensor([-1.0 / eps], dtype=x.dtype, device=x.device))
    s = (d2 if cost_power(cost) == 2 else d2.sqrt()) * scale
    # Log-weights are always a variable (zeros when absent): one compiled formula for weighted and plain sums. A zero
    # weight (log-weight -inf, on which KeOps returns NaN) enters as the finite -MASK_PENALTY: its terms are exactly 0.
    lw = logw.clamp_min(-MASK_PENALTY) if logw is not None else torch.zeros(y.shape[0], dtype=x.dtype, device=x.device)
    s = s + Vj(lw.reshape(-1, 1))
    if diag is not None:
        jj = y_index if y_index is not None else torch.arange(y.shape[0], device=x.device)
        i_f, j_f = Vi(index_parts(diag, x.dtype)), Vj(index_parts(jj, x.dtype))
        s = s - (0.5 - (i_f - j_f).abs().sum()).step() * MASK_PENALTY
    return s


def lse_and_mean(s: LazyTensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row log-sum-exp (N,) and softmax-weighted mean (N, E) of ``values`` (M, E) from one reduction.

    The arithmetic of ``sumsoftmaxweight`` (weights ``[1, values]``), which keeps only the ratio: here the row
    maximum and normaliser are read too. Every mean reduction goes through here: ``sumsoftmaxweight`` spells the
    formula with other spacing, which KeOps would compile as a second kernel.
    """
    weights = LazyTensor(1).concat(Vj(values))
    out = s.reduction("Max_SumShiftExpWeight", other=weights, dim=1)
    return out[:, 0] + out[:, 1].log(), out[:, 2:] / out[:, 1:2]


def top_logits(s: LazyTensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row of ``s`` (N, k) and their columns (N, k) int64 (logit -inf: missing)."""
    low, cols = (-s).Kmin_argKmin(K=k, dim=1)  # a missing entry keeps its initial value +inf
    return -low, cols.masked_fill(low.isinf(), 0)


class KeOpsBackend(Backend):
    """Dense-lazy reductions with pykeops: every pair is visited, none is stored."""

    name = "keops"

    def reduce_lse(self, x, y, eps, cost, logw, diag):
        return differentiable_once(
            reduction_kind("lse", x, None, cost, diag),
            lambda x, y, logw, diag: keops_logits(x, y, eps, cost, logw, diag).logsumexp(dim=1).reshape(-1),
            x=x, y=y, logw=logw, diag=diag,
        )

    def reduce_mean(self, x, y, eps, cost, values, logw, diag):
        return differentiable_once(
            reduction_kind("mean", x, values, cost, diag),
            lambda x, y, values, logw, diag: lse_and_mean(keops_logits(x, y, eps, cost, logw, diag), values)[1],
            x=x, y=y, values=values, logw=logw, diag=diag,
        )

    def reduce_lse_mean(self, x, y, eps, cost, values, logw):
        return differentiable_once(
            reduction_kind("mean", x, values, cost, None),
            lambda x, y, values, logw: lse_and_mean(keops_logits(x, y, eps, cost, logw, None), values),
            x=x, y=y, values=values.detach(), logw=logw,
        )

    def reduce_topk(self, x, y, eps, cost, logw, k):
        return compiled_once(reduction_kind(f"top{k}", x, None, cost, None), lambda: top_logits(keops_logits(x, y, eps, cost, logw, None), k))

"""Thread settings, lazy imports, the KeOps warm-up, auto's per-device choice and indices past 2^24."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import driftops
from driftops import threads
from driftops.backends import AutoBackend, DenseBackend, keops
from driftops.backends.formulas import Formula, job_formulas
from driftops.backends.keops import INDEX_BASE, NATIVE_CXXFLAGS, LOOPS_MACRO, KeOpsBackend, _build_lock, keops_logits, native_cxxflags
from driftops.backends.sparse import cluster_ranges
from driftops.costs import diameter

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout first on the path, no OpenMP variables and no CXXFLAGS."""
    base = {k: v for k, v in os.environ.items() if k != "CXXFLAGS" and not k.startswith(("OMP_", "GOMP_"))}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, timeout=300, check=True)


def test_import_is_lazy_and_sets_the_spin_count_and_restores_the_environment():
    code = (
        "import os, sys, json, driftops\n"
        "print(json.dumps({'heavy': [m for m in ('sklearn', 'ot', 'matplotlib') if m in sys.modules],"
        " 'env': os.environ.get('GOMP_SPINCOUNT'), 'spins': driftops.threads.settings()['spin_count']}))"
    )
    run = _python(code, OMP_DISPLAY_ENV="VERBOSE")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"heavy": [], "env": None, "spins": threads.SPIN_COUNT}
    # libgomp prints its settings at initialisation: the runtime itself got driftops's spin count.
    assert _spincount(run.stderr) == threads.SPIN_COUNT
    assert "CUDA libraries not found" not in run.stdout or torch.cuda.is_available()


@pytest.mark.parametrize("policy", ["PASSIVE", " passive "])
def test_passive_policy_gets_the_short_spin_count(policy):
    code = (
        "import os, json, driftops; print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), os.environ['OMP_WAIT_POLICY'],"
        " driftops.threads.settings()['spin_count']]))"
    )
    run = _python(code, OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY=policy)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [None, policy, threads.SPIN_COUNT]
    assert _spincount(run.stderr) == threads.SPIN_COUNT  # not libgomp's 0 for a passive policy


def _spincount(stderr: str) -> int:
    """libgomp's spin count, from its OMP_DISPLAY_ENV=VERBOSE report."""
    line = next(line for line in stderr.splitlines() if "GOMP_SPINCOUNT" in line)
    return int(line.split("=")[1].strip().strip("'"))


@pytest.mark.parametrize(
    "code, env, spins",
    [
        ("import torch, driftops", {}, 300_000),  # torch first: its runtime is initialised already (libgomp's default)
        ("import driftops", {"OMP_WAIT_POLICY": "ACTIVE"}, 30_000_000_000),  # the user's choice is kept
        ("import driftops", {"GOMP_SPINCOUNT": "50"}, 50),
        ("import driftops", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, 0),  # strictly passive
    ],
)
def test_wait_policy_left_alone(code, env, spins):
    run = _python(code + "; print(driftops.threads.settings()['spin_count'])", OMP_DISPLAY_ENV="VERBOSE", **env)
    assert run.stdout.strip().splitlines()[-1] == "None"
    assert _spincount(run.stderr) == spins


@pytest.mark.parametrize("env", [{}, {"CXXFLAGS": "-O2"}, {"CXXFLAGS": ""}])
def test_keops_compiles_for_this_cpu_unless_the_user_set_cxxflags(env):
    code = "import os, json, driftops, keopscore; print(json.dumps([keopscore.config.get_cpp_flags(), os.environ.get('CXXFLAGS')]))"
    flags, seen = json.loads(_python(code, **env).stdout.strip().splitlines()[-1])
    native = not env and sys.platform == "linux" and platform.machine() == "x86_64"
    assert (NATIVE_CXXFLAGS in flags.split()) == native
    assert LOOPS_MACRO in flags.split()  # driftops's loops: never mixed with KeOps's own in a cache
    vector = keops._vector_exp_flags()
    assert vector is None or f" {vector} " in f" {' '.join(flags.split())} "  # libmvec, where installed
    if env.get("CXXFLAGS"):
        assert flags.split()[0] == env["CXXFLAGS"]  # the user's flags, first
    assert seen == env.get("CXXFLAGS")  # the environment as the user left it


def test_keops_loops_hand_out_rows_as_threads_come_free():
    """The generated CPU loops (here rendered, not compiled): one region per block-sparse call over row clusters, the
    dense-lazy rows in chunks, both scheduled dynamically; batched reductions keep KeOps's inner region."""
    assert keops.DYNAMIC and threads.settings()["keops_loops"] == "dynamic"
    pragmas = {}
    for name, cls in keops._templates().items():
        loop = cls("Sum_Reduction(Var(0,1,0)*Var(1,1,1),0)", [], 2, "float", "float", "block_sum", 0, 0, 0, 0, 0, -1)
        loop.get_code()
        pragmas[name] = [line.strip() for line in loop.code.splitlines() if "#pragma omp" in line]
    assert pragmas == {
        "CpuReduc": ["#pragma omp parallel for schedule(dynamic, 32)"],
        "CpuReduc_ranges": ["#pragma omp parallel for schedule(dynamic) if(nbatchdims == 0)", "#pragma omp parallel for if(nbatchdims > 0)"],
    }


def test_keops_softmax_columns_are_summed_in_tiles():
    """Log-sum-exp / softmax reductions (rendered, not compiled) with few weights sum their unbatched columns in tiles
    with the vectorised exp declared; wider ones, batched block-sparse columns and other reductions keep KeOps's loop."""
    for name, cls in keops._templates().items():
        head = keops.COLUMN_LOOPS[name][0]
        wide = keops.TILE_MAX_WEIGHTS  # the constant 1 and `wide` values: one weight too many
        for formula, tiled in [("Max_SumShiftExpWeight_Reduction(Var(0,1,0)*Var(1,1,1),0,Concat(IntCst(1),Var(2,2,1)))", True),
                               (f"Max_SumShiftExpWeight_Reduction(Var(0,1,0)*Var(1,1,1),0,Concat(IntCst(1),Var(2,{wide},1)))", False),
                               ("Sum_Reduction(Var(0,1,0)*Var(1,1,1),0)", False)]:  # fmt: skip
            for dtype, (exp, floor) in keops.TILE_EXP.items():
                loop = cls(formula, [], 3, dtype, dtype, "block_sum", 0, 0, 0, 0, 0, -1)
                loop.get_code()
                assert loop.code.count(f"j0 += {keops.TILE}") == tiled
                assert loop.code.count("#pragma omp simd") == 2 * tiled
                assert loop.code.count(head) == (1 if name == "CpuReduc" else 2) - tiled  # the batched one stays
                assert ("DRIFTOPS_VECTOR_EXP" in loop.code) == tiled
                assert (f"= {exp}(d);" in loop.code and f"(tile_max - tile_max) + ({floor});" in loop.code) == tiled


def test_keops_imported_first_keeps_its_own_flags_and_loops():
    code = "import json, keopscore, driftops; print(json.dumps([keopscore.config.get_cpp_flags(), driftops.threads.settings()]))"
    flags, settings = json.loads(_python(code).stdout.strip().splitlines()[-1])
    assert LOOPS_MACRO not in flags.split() and NATIVE_CXXFLAGS not in flags.split()
    assert settings["keops_loops"] == "static"


def test_native_flags_name_the_cpu():
    """KeOps keys its cache on the flags: libraries built for one CPU's instruction set are never loaded on another."""
    def cpuinfo(model, flags):
        return "".join(f"processor\t: {i}\nmodel name\t: {model}\nflags\t\t: {flags}\nbogomips\t: {i}\n\n" for i in range(2))

    avx2 = native_cxxflags(cpuinfo("AMD EPYC", "fpu sse2 avx avx2 fma"))
    assert avx2.split()[0] == NATIVE_CXXFLAGS
    assert avx2 == native_cxxflags(cpuinfo("AMD EPYC", "fpu sse2 avx avx2 fma").replace("bogomips\t: 1", "bogomips\t: 7"))
    assert avx2 != native_cxxflags(cpuinfo("AMD EPYC", "fpu sse2 avx avx2 fma avx512f"))  # same model, more instructions
    assert avx2 != native_cxxflags(cpuinfo("Intel(R) Xeon(R)", "fpu sse2 avx avx2 fma"))


def _counts() -> set[int]:
    """The thread counts in force on this thread: torch's and every ``libgomp.so.1`` runtime's."""
    return {torch.get_num_threads()} | {lib.omp_get_max_threads() for lib in threads.openmp_runtimes()}


class _Spy(DenseBackend):
    """Records the thread counts seen inside a reduction."""

    seen: list[set[int]] = []

    def reduce_lse(self, x, y, eps, cost, logw, diag):
        self.seen.append(_counts())
        return super().reduce_lse(x, y, eps, cost, logw, diag)


def test_set_threads_applies_inside_calls_and_restores_the_callers_settings(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads.other_load, "cores", 0.0)  # an idle machine
    monkeypatch.setattr(threads.other_load, "last", (float("inf"), 0.0, 0.0))
    before = torch.get_num_threads()
    other = 3 if before != 3 else 2
    x = torch.randn(5, 2)
    spy = _Spy()
    try:
        torch.set_num_threads(other)
        driftops.set_threads(1)
        spy.lse(x, x, 0.5, "sqeuclidean")
        assert spy.seen[-1] == {1}
        assert _counts() == {other}
        driftops.set_threads(None)
        spy.lse(x, x, 0.5, "sqeuclidean")
        assert spy.seen[-1] == {other}
    finally:
        driftops.set_threads(None)
        torch.set_num_threads(before)


def test_reductions_leave_the_cores_other_processes_keep_busy(monkeypatch):
    before = torch.get_num_threads()
    x = torch.randn(5, 2)
    spy = _Spy()
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    try:
        torch.set_num_threads(4)
        for busy, expected in [(0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (9.0, 1)]:
            monkeypatch.setattr(threads.other_load, "cores", busy)
            monkeypatch.setattr(threads.other_load, "last", (float("inf"), 0.0, 0.0))  # no re-measurement
            spy.lse(x, x, 0.5, "sqeuclidean")
            assert spy.seen[-1] == {expected}
            assert torch.get_num_threads() == 4
        monkeypatch.setattr(threads.other_load, "cores", 1.0)
        assert threads.scoped(_counts)() == {3} and torch.get_num_threads() == 4  # a public call's own torch work too
        driftops.set_threads(2)  # a fixed count ignores the load
        spy.lse(x, x, 0.5, "sqeuclidean")
        assert spy.seen[-1] == {2}
    finally:
        driftops.set_threads(None)
        torch.set_num_threads(before)


def test_keops_loops_run_on_the_callers_threads_whatever_the_load(monkeypatch):
    """Beside other work a reduction's torch work drops to the free cores; its dynamically scheduled KeOps loop keeps
    the caller's count (set_threads's where set); GPU loops are left alone; every count restored afterwards."""
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads.other_load, "cores", 2.6)
    monkeypatch.setattr(threads.other_load, "last", (float("inf"), 0.0, 0.0))
    before = torch.get_num_threads()
    x = torch.randn(3, 2)

    def reduction(device: str) -> tuple[set[int], set[int]]:
        kind = keops.reduction_kind("counts", x, None, "sqeuclidean", None)._replace(device=device)
        return threads.call(lambda: (_counts(), keops.compiled_once(kind, _counts)))

    try:
        torch.set_num_threads(4)
        assert reduction("cpu") == ({1}, {4})
        assert reduction("cuda") == ({1}, {1})
        driftops.set_threads(2)
        assert reduction("cpu") == ({2}, {2})
        driftops.set_threads(None)
        monkeypatch.setattr(keops, "DYNAMIC", False)  # KeOps's own static loops: the reduced count
        assert reduction("cpu") == ({1}, {1})
        assert _counts() == {4}
    finally:
        driftops.set_threads(None)
        torch.set_num_threads(before)


def test_other_load_is_the_busy_time_of_other_processes(monkeypatch):
    real = threads.OtherLoad.sample(5.0)
    assert real is None or (real[0] == 5.0 and real[1] > 0 and real[2] > 0)
    samples = iter([(0.0, 100.0, 10.0), (1.0, 101.5, 10.5), (2.0, 102.0, 11.0)])
    monkeypatch.setattr(threads.OtherLoad, "sample", staticmethod(lambda now: next(samples)))
    clock = iter([0.0, 1.0, 1.1, 2.0])
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    load = threads.OtherLoad()
    assert load() == 0.0  # one measurement: nothing known yet
    assert load() == pytest.approx(1.0)  # 1.5 busy CPU-seconds in 1 s, 0.5 of them this process's
    assert load() == pytest.approx(1.0)  # within LOAD_INTERVAL: not re-measured
    assert load() == 0.0  # (102 - 101.5 - 0.5) / 1: clamped at 0


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_set_threads_rejects_bad_counts(bad):
    with pytest.raises(driftops.DriftopsError, match="positive integer"):
        driftops.set_threads(bad)


class _FakeCuda:
    """Stands for a CUDA tensor: AutoBackend.pick reads only its shape, device and requires_grad."""

    def __init__(self, n: int, d: int, grad: bool = False):
        self.shape, self.device, self.requires_grad = (n, d), torch.device("cuda", 0), grad


def test_auto_prefers_keops_on_cuda_and_sparse_on_cpu():
    auto = AutoBackend()
    assert auto.pick(_FakeCuda(50_000, 2), _FakeCuda(50_000, 2)) is auto.keops
    assert auto.pick(_FakeCuda(100, 2), _FakeCuda(100, 2)) is auto.dense
    iterating = auto.iterations()  # dense iterations are measured on the CPU only
    assert iterating.pick(_FakeCuda(3000, 2), _FakeCuda(3000, 2)) is iterating.keops
    cpu = torch.empty(50_000, 2)
    assert auto.pick(cpu, cpu) is auto.sparse
    assert auto.pick(torch.empty(50_000, 8), torch.empty(50_000, 8)) is auto.keops
    with torch.enable_grad():
        assert auto.pick(cpu.requires_grad_(), cpu) is auto.keops
    assert job_formulas(2, device="cuda")[0].sparse is False and job_formulas(2)[0].sparse is True


def test_job_formulas_lists_masked_kernels_for_one_and_two_sided_only():
    # Sinkhorn in D <= 3 on the auto/sparse path: the default Newton finish's top-128 kernel too; elsewhere none.
    assert [(f.shape, f.masked) for f in job_formulas(3, plans=["sinkhorn"])] == [("lse", False), ("mean", False), ("top128", False)]
    assert [f.shape for f in job_formulas(3, plans=["sinkhorn"], backend="keops")] == ["lse", "mean"]
    assert [f.shape for f in job_formulas(8, plans=["sinkhorn"])] == ["lse", "mean"]
    assert [f.shape for f in job_formulas(2, plans=["sinkhorn"], newton=0)] == ["lse", "mean"]
    assert len(job_formulas(2, plans=["one_sided"], cost="euclidean", dtype=torch.float64)) == 4
    assert job_formulas(2, backend="dense") == []
    # Gradients: the dense-lazy path, each reduction with one kernel per input its gradient reaches.
    grads = job_formulas(2, plans=["one_sided"], grad=True)
    assert not any(f.sparse for f in grads) and len(grads) == 4 + 2 * (3 + 4)
    assert sorted(f.grad for f in grads if f.shape == "lse" and f.masked) == ["", "logw", "x", "y"]
    assert str(grads[-1]) == "mean masked d/dvalues sqeuclidean keops D=2 float32 cpu"
    # The Newton finish's top-k kernel, unmasked, for Sinkhorn plans only.
    assert [f.shape for f in job_formulas(2, plans=["sinkhorn", "one_sided"], newton=64)].count("top64") == 1
    assert "top64" not in [f.shape for f in job_formulas(2, plans=["one_sided"], newton=64)]
    assert [f.shape for f in job_formulas(2, plans=["sinkhorn"], newton=40)][-1] == "top64"  # k rounded up to a power of two
    Formula("top16", "sqeuclidean", False, False, 2, "float64").run()  # parses k from the shape (a kernel the tests compile)
    with pytest.raises(driftops.DriftopsError, match="unknown backend"):
        job_formulas(2, backend="gpu")


def test_warmup_compiles_the_listed_formulas_once(tmp_path):
    code = (
        "import glob, json, torch, driftops\n"
        "from driftops.backends.formulas import Formula\n"
        "from driftops.backends.keops import KeOpsBackend\n"
        "todo = [Formula('mean', 'sqeuclidean', False, False, 1)]\n"
        "first = driftops.warmup(todo); second = driftops.warmup(todo)\n"
        "x = torch.randn(5, 1)\n"
        "KeOpsBackend().reduce_lse_mean(x, x, 1.0, 'sqeuclidean', x, torch.zeros(5))\n"  # the mean kernel, no other
        "print(json.dumps([len(first), len(second), len(glob.glob('%s/**/*.so', recursive=True))]))" % tmp_path
    )
    run = _python(code, KEOPS_CACHE_FOLDER=str(tmp_path))
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [1, 0, 1]
    assert "compiling 1 KeOps kernel, once per machine" in run.stdout
    # Other compiler flags (the user's, or another CPU's) make other libraries: their warm-up starts afresh.
    code = "from driftops.backends.formulas import manifest_path; print(manifest_path())"
    paths = {flags: _python(code, KEOPS_CACHE_FOLDER=str(tmp_path), **env).stdout.strip().splitlines()[-1] for flags, env in
             [("native", {}), ("-O2", {"CXXFLAGS": "-O2"})]}  # fmt: skip
    assert Path(paths["native"]).is_file() and not Path(paths["-O2"]).exists()


def test_first_reduction_of_a_kind_waits_for_the_build_folder_lock():
    """A process sharing KeOps's build folder never runs a new kind of reduction while another holds the lock (it
    might be compiling that formula); once the lock is free it runs, and later calls of that kind do not lock."""
    code = (
        "import sys, torch, driftops\n"
        "from driftops.backends.keops import KeOpsBackend\n"
        "x = torch.zeros(3, 2)\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "print(KeOpsBackend().lse(x, x, 1.0, 'sqeuclidean').tolist(), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with _build_lock():
            assert child.stdout.readline().strip() == "ready"
            child.stdin.write("go\n")
            child.stdin.flush()
            with pytest.raises(subprocess.TimeoutExpired):
                child.wait(timeout=3)
        out, _ = child.communicate(timeout=300)
    finally:
        child.kill()
    assert json.loads(out.strip().splitlines()[-1]) == pytest.approx([math.log(3)] * 3)
    x = torch.randn(4, 5)
    backend = KeOpsBackend()
    backend.lse(x, x, 1.0, "sqeuclidean")
    with _build_lock():  # held here: a kind already run does not wait for it (flock would block this thread)
        assert backend.lse(x, x, 1.0, "sqeuclidean").shape == (4,)


def test_cluster_ranges_are_exact_past_2_pow_24():
    n = (1 << 24) + 5
    labels = torch.zeros(n, dtype=torch.long)
    labels[-5:] = 1
    ranges, centroids, counts = cluster_ranges(labels, torch.ones(1, 1).expand(n, 1), 2)
    assert ranges.dtype == torch.int64 and ranges.tolist() == [[0, 1 << 24], [1 << 24, n]]
    assert counts.tolist() == [1 << 24, 5] and centroids.flatten().tolist() == [1.0, 1.0]


def test_self_mask_distinguishes_indices_past_2_pow_24():
    # float32 cannot tell 2^24 from 2^24 + 1: the mask must compare exact integer parts.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    y_index = torch.tensor([INDEX_BASE, INDEX_BASE + 1, INDEX_BASE + 2])
    diag = torch.tensor([INDEX_BASE + 1, INDEX_BASE + 2])
    got = keops_logits(x, y, 1.0, "sqeuclidean", None, diag, y_index).logsumexp(dim=1).reshape(-1)
    cost = torch.cdist(x.double(), y.double()) ** 2
    keep = torch.tensor([[True, False, True], [True, True, False]])
    want = torch.logsumexp((-cost).masked_fill(~keep, -torch.inf), 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_diameter_reduces_each_cloud():
    x, y = torch.tensor([[0.0, 1.0], [2.0, -1.0]]), torch.tensor([[-1.0, 0.5]])
    assert diameter(x, y) == pytest.approx(((3.0**2) + (2.0**2)) ** 0.5)
    assert diameter(x) == pytest.approx(8.0**0.5)


def test_cli_warmup_and_train_device_default(capsys):
    from driftops.cli import build_parser, main

    assert build_parser().parse_args(["train"]).device == "auto"
    assert build_parser().parse_args(["flow", "--threads", "1"]).threads == 1
    if not torch.cuda.is_available():
        assert main(["warmup", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err

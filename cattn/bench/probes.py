"""Probes of the machine: the GEMM and streaming-read ceilings, peak memory in a fresh
process, BLAS on the kernel's block shapes, and what the CPU and the builds are."""
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.peers import (MAKERS, THREAD_CONTROL, Skip, blas_threads, optional,
                               peer_isa, torch_threads)
from cattn.bench.results import BlockGemmRow, Case, MemoryRow, SkippedRun
from cattn.bench.specs import Spec, make_inputs
from cattn.bench.timing import Runner, median, time_round_robin

# --------------------------------------------------------------- ceilings: GEMM, stream

_GEMM_OPERANDS: Dict[tuple, tuple] = {}


def make_gemm(dtype, n: int, threads: int):
    """The ceiling: a large n x n x n GEMM through SciPy's BLAS (2*n^3 flops)."""
    from scipy.linalg import blas
    dtype = np.dtype(dtype)
    key = (dtype.name, n)
    if key not in _GEMM_OPERANDS:
        rng = np.random.default_rng(1)
        a = np.asfortranarray(rng.standard_normal((n, n)).astype(dtype))
        b = np.asfortranarray(rng.standard_normal((n, n)).astype(dtype))
        _GEMM_OPERANDS[key] = (a, b)
    a, b = _GEMM_OPERANDS[key]
    gemm = blas.sgemm if dtype == np.float32 else blas.dgemm
    limiter = blas_threads()

    def fn():
        return gemm(1.0, a, b)
    return fn, (lambda: limiter.limit(threads))


_STREAM_ARRAYS: Dict[int, np.ndarray] = {}


def blas_idle_cores(product: Callable[[], Any], idle_s: float = 0.02,
                    repeats: int = 3) -> float:
    """How many cores the process keeps busy while its main thread sleeps right after
    `product` (a BLAS call): the BLAS workers' idle wait. OpenBLAS's pthreads workers spin
    (yielding) for about 2**28 cycles, ~0.1 s, after each call before they sleep, unless
    OPENBLAS_THREAD_TIMEOUT (read at load) shortens it; in a decoder loop that spin takes
    the cores the next attention call runs on. The median of `repeats` measurements."""
    busy = []
    for _ in range(repeats):
        product()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(idle_s)
        busy.append((time.process_time() - cpu0) / (time.perf_counter() - wall0))
    return median(busy)


def stream_array(mib: int) -> np.ndarray:
    """A float32 array of `mib` MiB, every page touched (kept for the whole run)."""
    if mib not in _STREAM_ARRAYS:
        x = np.empty(mib * 2**20 // 4, dtype=np.float32)
        x.fill(1.0)
        _STREAM_ARRAYS[mib] = x
    return _STREAM_ARRAYS[mib]


_POOL: Dict[int, Any] = {}


def _thread_pool(n: int):
    if n not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[n] = ThreadPoolExecutor(max_workers=n)
    return _POOL[n]


def make_stream_probes(threads: int, mib: int):
    """[(name, fn, setup)]: read-only passes over a `mib` MiB float32 array."""
    x = stream_array(mib)
    probes: List[Tuple[str, Callable[[], Any], Optional[Callable[[], Callable[[], None]]]]] = []
    try:
        from cattn import _kernel
        stream_sum = getattr(_kernel, "stream_sum", None)
    except Exception:
        stream_sum = None
    if stream_sum is not None:
        probes.append(("stream_sum", lambda: stream_sum(x, threads), None))
    if threads == 1:
        probes.append(("np.sum", lambda: np.sum(x), None))
    else:
        chunks = np.array_split(x, threads)
        pool = _thread_pool(threads)

        def threaded_sum():
            return sum(pool.map(np.sum, chunks))
        probes.append((f"np.sum x{threads} py-threads", threaded_sum, None))
    torch = optional("torch")
    if torch is not None:
        tx = torch.from_numpy(x)
        probes.append(("torch.sum", lambda: tx.sum(), lambda: torch_threads(threads)))
    return probes


# ------------------------------------------------------------------ peak memory (RSS)
#
# tracemalloc sees only NumPy's allocations. For a figure that covers every
# implementation alike (PyTorch's and ORT's allocators included), each implementation
# runs in a fresh process: after imports, inputs and the ORT session exist, the kernel's
# peak-RSS counter is reset (/proc/self/clear_refs, Linux), two calls run, and the peak
# RSS above that baseline is the extra memory (output array and one-time allocations such
# as ORT's arena included).

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def memprobe(impl: str, spec: Spec, threads: int, config: BenchConfig):
    """Run in a fresh process (see rss_peak): peak extra RSS in MiB of two calls."""
    q, k, v = make_inputs(spec)
    fn, _, setup, _ = MAKERS[impl](spec, q, k, v, threads, config)
    if setup is not None:
        setup()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    fn()
    rss = (_status_kib("VmHWM") - base) / 1024.0
    traced = None
    if impl in ("cattn", "numpy"):
        gc.collect()
        tracemalloc.start()
        t0 = tracemalloc.get_traced_memory()[0]
        fn()
        traced = (tracemalloc.get_traced_memory()[1] - t0) / 2**20
        tracemalloc.stop()
    return rss, traced


def rss_peak(impl: str, spec: Spec, threads: int, config: BenchConfig,
             timeout: float = 900) -> Dict[str, Any]:
    """{"rss_mib", "traced_mib"} of `impl` on `spec`, measured in a fresh process, or
    {"rss_mib": None, "reason": ...} (not Linux, implementation skipped, failure)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {"rss_mib": None, "reason": "needs Linux /proc/self/clear_refs"}
    arg = json.dumps({"impl": impl, "spec": spec.to_json(), "threads": threads,
                      "ort_op": config.ort_op})
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, "-m", "cattn.bench", "--memprobe", arg],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rss_mib": None, "reason": "timed out"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"rss_mib": None,
                "reason": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def memprobe_main(arg: str) -> None:
    """The fresh process's side of rss_peak: prints one JSON line."""
    d = json.loads(arg)
    config = BenchConfig(ort_op=d.get("ort_op", "auto"))
    spec = Spec.from_json(d["spec"])
    try:
        rss, traced = memprobe(d["impl"], spec, d["threads"], config)
        print(json.dumps({"rss_mib": rss, "traced_mib": traced}))
    except Skip as exc:
        print(json.dumps({"rss_mib": None, "reason": str(exc)}))


def run_memory_case(name: str, spec_list: List[Spec], impls, threads: int = 1,
                    config: Optional[BenchConfig] = None) -> Case:
    """Peak extra memory of each implementation (fresh process each; no timing)."""
    config = config or BenchConfig()
    rows, skipped = [], []
    t0 = time.perf_counter()
    for spec in spec_list:
        for impl in impls:
            res = rss_peak(impl, spec, threads, config)
            label = f"{impl}/{threads}t/{spec.options()}"
            if res.get("rss_mib") is None:
                skipped.append(SkippedRun(label, impl, threads, spec.options(),
                                          res.get("reason") or "failed"))
                continue
            rows.append(MemoryRow(label, impl, threads, "memory", spec.options(),
                                  res["rss_mib"], res.get("traced_mib")))
            config.log(".")
    elapsed = time.perf_counter() - t0
    config.log(f"  {name}: {elapsed:.1f}s\n")
    return Case(name, "memory", spec_list[0].to_json(), [s.options() for s in spec_list],
                [threads], rows, skipped=skipped, timing_s=elapsed,
                method="peak RSS above the baseline (after imports, inputs, ORT session) "
                       "over two calls, in a fresh process per implementation; traced = "
                       "tracemalloc peak of a third call (NumPy allocations only)")


# ------------------------------------------------------------- GEMM on the block shapes

BLOCK_SHAPES = [  # (m, k, n): scores Q_blk·K_blkᵀ (bq, E, bk) and P·V_blk (bq, bk, E), E=64
    (128, 64, 64), (128, 64, 128), (128, 64, 256), (128, 64, 512),
    (128, 64, 64), (128, 128, 64), (128, 256, 64), (128, 512, 64),
    (64, 64, 256), (256, 64, 256), (64, 256, 64), (256, 256, 64)]


def run_block_gemm_case(name: str, threads: int = 1, reps: int = 7, warmup: int = 1,
                        gemm_n: int = 2048, flops_per_call: float = 2e8,
                        config: Optional[BenchConfig] = None) -> Case:
    """How fast BLAS (NumPy's OpenBLAS, batched matmul: one C loop of BLAS calls) runs the
    small GEMMs of the kernel's blocks, against the large square sgemm, one round-robin."""
    log = (config or BenchConfig()).log
    rng = np.random.default_rng(2)
    limiter = blas_threads()
    runners = []
    for m, k, n in dict.fromkeys(BLOCK_SHAPES):
        count = max(1, int(flops_per_call / (2.0 * m * k * n)))
        a = rng.standard_normal((count, m, k), dtype=np.float32)
        bb = rng.standard_normal((count, k, n), dtype=np.float32)
        c = np.empty((count, m, n), dtype=np.float32)
        fn = (lambda a=a, bb=bb, c=c: np.matmul(a, bb, out=c))
        r = Runner(f"{m}x{k}x{n}", "block", threads, "blockgemm", fn,
                   (lambda: limiter.limit(threads)), work=2.0 * m * k * n * count,
                   note=f"{count} GEMMs (m, k, n) = ({m}, {k}, {n}) per call")
        r.call(1)
        runners.append(r)
    fn, setup = make_gemm(np.float32, gemm_n, threads)
    fn()
    runners.append(Runner(f"sgemm/{threads}t", "sgemm", threads, "gemm", fn, setup,
                          work=2.0 * gemm_n ** 3))
    t0 = time.perf_counter()
    log(f"  {name}: {len(runners)} runners ")
    time_round_robin(runners, reps, warmup, log=log)
    log(f" {time.perf_counter() - t0:.1f}s\n")
    big = runners[-1].work / median(runners[-1].times) / 1e9
    rows = []
    for r in runners:
        g = r.work / median(r.times) / 1e9
        rows.append(BlockGemmRow(r.label, r.impl, threads, r.kind, median(r.times), r.times,
                                 g, 100.0 * g / big, r.note))
    return Case(name, "blockgemm", {"dtype": "float32"}, [], [threads], rows,
                gemm_gflops={str(threads): big}, timing_s=time.perf_counter() - t0)


# ------------------------------------------------------------------- machine info

SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f")


def cpu_description() -> Dict[str, Any]:
    """{"cpu_model", "cpu_flags", "simd_flags"} from /proc/cpuinfo, else lscpu, else
    platform.processor(); missing pieces are left out rather than guessed."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        try:
            text = subprocess.run(["lscpu"], capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif flags is None and key in ("flags", "features"):
            flags = value.split()
    info: Dict[str, Any] = {"cpu_model": model or platform.processor() or None}
    if flags is not None:
        info["cpu_flags"] = flags
        info["simd_flags"] = [f for f in SIMD_FLAGS if f in flags]
    return info


def cattn_isa(config: Dict[str, Any]) -> Optional[str]:
    """The instruction set cattn's kernel runs on, as show_config reports it (marked when
    the build emulates it: a test build, whose bfloat16 figures mean nothing)."""
    if not isinstance(config, dict):
        return None
    isa = config.get("isa", config.get("simd"))
    if config.get("isa_emulated"):
        return f"{isa} (EMULATED in software: a test build, not for measuring)"
    return isa


PEAK_PATHS = ("avx512", "avx2")


def fma_peaks(threads: List[int]) -> Dict[str, float]:
    """{"float32 avx512 1t": GFLOP/s, ...}: the register-only multiply-add peak of each
    vector path cattn runs on this CPU, per precision and thread count (measured now, a
    few seconds). What no kernel can pass, whatever the library sgemm reaches."""
    try:
        from cattn import _kernel
        fma_peak = _kernel.fma_peak
    except (ImportError, AttributeError):
        return {}
    peaks = {}
    for dtype in ("float32", "float64"):
        for path in PEAK_PATHS:
            if path not in _kernel.supported_isa_paths():
                continue
            for n in threads:
                peaks[f"{dtype} {path} {n}t"] = fma_peak(path, dtype == "float64", n)
    return peaks


def gemm_libraries() -> List[Dict[str, Any]]:
    """The BLAS libraries loaded (threadpoolctl), with the core type OpenBLAS runs its
    kernels for ("architecture"): OPENBLAS_CORETYPE can force an older one, which slows
    the library sgemm (the ceiling) but not cattn's own kernels."""
    tpc = optional("threadpoolctl")
    if tpc is None:
        return []
    return [{k: d.get(k) for k in ("internal_api", "prefix", "version", "architecture",
                                   "threading_layer", "num_threads", "filepath")}
            for d in tpc.threadpool_info() if d.get("user_api") == "blas"]


def machine_info(impls=None, threads: Optional[List[int]] = None) -> Dict[str, Any]:
    """The machine, the versions and the thread control of this run (for the JSON)."""
    info: Dict[str, Any] = {"python": sys.version.split()[0],
                            "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "date": datetime.datetime.now().isoformat(timespec="seconds"),
                            "argv": sys.argv}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    info.update(cpu_description())
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    versions: Dict[str, Optional[str]] = {"numpy": np.__version__}
    from importlib import metadata  # not importing torch & co. just for their versions
    for mod in ("scipy", "torch", "onnxruntime", "onnx", "matplotlib", "threadpoolctl"):
        try:
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            versions[mod] = None
    info["versions"] = versions
    try:
        import cattn
        info["cattn_config"] = cattn.show_config()
    except Exception as exc:
        info["cattn_config"] = f"unavailable: {exc}"
    isa = {"cattn": cattn_isa(info["cattn_config"])}
    if impls is None or "torch" in impls:
        isa.update(peer_isa())
    info["isa"] = isa
    tpc = optional("threadpoolctl")
    if tpc is not None:
        info["threadpools"] = [{k: d.get(k) for k in ("internal_api", "prefix", "version",
                                                      "num_threads", "filepath")}
                               for d in tpc.threadpool_info()]
    info["thread_control"] = dict(THREAD_CONTROL, blas=blas_threads().method)
    info["gemm_libraries"] = gemm_libraries()
    if "OPENBLAS_CORETYPE" in os.environ:
        info["openblas_coretype"] = os.environ["OPENBLAS_CORETYPE"]
    info["fma_peak_gflops"] = fma_peaks(threads or [1])
    return info

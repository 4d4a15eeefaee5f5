"""The cattn benchmark: cattn against the NumPy reference, PyTorch and ONNX Runtime.

    python -m cattn.bench --quick                      # the whole suite, small, < 1 minute
    python -m cattn.bench                              # the whole suite (the RESULTS.md run)
    python -m cattn.bench --shape 1,8,2048,2048,64 --threads 1,2 [--causal] [--dtype float64]

How it measures (so the numbers can be trusted on a shared, noisy machine):

* Every implementation gets the SAME input arrays (B, H, L, E) and its output is checked
  against the NumPy reference (float64 ground truth, on a slice of rows for big shapes)
  before it is timed; a peer that computes something else is reported and never timed.
* One "case" is a list of runners (implementation x thread count x options) plus, as the
  ceiling, the machine's own large GEMM (sgemm for float32, dgemm for float64) at every
  thread count. All runners of a case are timed round-robin, rep after rep, with the start
  of the round rotated every rep, so that a burst of load from other processes hits every
  runner alike; the result is the median of the timed reps (after untimed warm-up reps).
  Ratios (cattn / peer, % of GEMM, 2 threads / 1 thread) are computed within a case.
* A timing that would be shorter than `min_timing` (tiny inputs) runs the call `number`
  times in a loop and reports the time per call (Python overhead included).
* Threads: cattn through `num_threads=`; PyTorch through `torch.set_num_threads`; ONNX
  Runtime through the session's `intra_op_num_threads` (one session per thread count,
  spinning disabled so idle ORT threads don't steal the core from the next runner);
  NumPy (the reference) and the GEMM ceiling through threadpoolctl's BLAS limit, or, when
  threadpoolctl is absent, SciPy's OpenBLAS `openblas_set_num_threads` (NumPy's own BLAS
  is then not limited; the JSON says so).
* FLOPs: 4*B*H*L*S*E (two GEMMs of 2*L*S*E each). For causal and windowed attention the
  GFLOP/s is "dense-equivalent" (same count as non-causal, so it measures time); the
  "useful" GFLOP/s counts only the visible (query, key) pairs.
* Decode (one query against a long cache) is memory-bound: it is reported as GB/s of K and
  V read (2*H*S*E*itemsize bytes / time) against the machine's streaming read rate measured
  in the same round-robin: the fastest of `cattn._kernel.stream_sum` (if the build has it),
  NumPy sums over one chunk per thread, and `torch.sum`, over a 512 MiB float32 array.
* Peak extra memory: tracemalloc around the first (checking) call; it sees NumPy
  allocations (the reference, cattn's output and scratch), not PyTorch's or ORT's own
  allocators (reported as n/a). It includes the output array.
"""
import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

# ------------------------------------------------------------------- optional packages


def _try_import(name):
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # ImportError, or a broken install
        return None


_OPTIONAL = {}


def _optional(name):
    if name not in _OPTIONAL:
        _OPTIONAL[name] = _try_import(name)
    return _OPTIONAL[name]


ALL_IMPLS = ("cattn", "numpy", "torch", "ort")
PEERS = ("torch", "ort")


class Skip(Exception):
    """An implementation that cannot run this case (not installed, unsupported option)."""


# ------------------------------------------------------------------------ thread control

class BlasThreads:
    """Limits BLAS threads for the NumPy reference and the GEMM ceiling."""

    def __init__(self):
        tpc = _optional("threadpoolctl")
        self._controller = None
        self._openblas = None
        if tpc is not None:
            try:
                self._controller = tpc.ThreadpoolController()
            except Exception:
                self._controller = None
        if self._controller is not None:
            self.method = "threadpoolctl (all BLAS libraries: NumPy's and SciPy's OpenBLAS)"
        else:
            try:
                from cattn._blas_threads import _find_openblas
                self._openblas = _find_openblas()
            except Exception:
                self._openblas = None
            if self._openblas is not None:
                self.method = ("SciPy's openblas_set_num_threads (threadpoolctl not installed: "
                               "NumPy's own BLAS is NOT limited)")
            else:
                self.method = "none (threadpoolctl not installed, no OpenBLAS found)"

    def limit(self, n):
        """Set BLAS to n threads; returns the function that restores the previous setting."""
        if self._controller is not None:
            lim = self._controller.limit(limits=n, user_api="blas")
            return lim.restore_original_limits
        if self._openblas is not None:
            get, set_ = self._openblas
            old = get()
            set_(n)
            return lambda: set_(old)
        return lambda: None


_BLAS = None


def blas_threads():
    global _BLAS
    if _BLAS is None:
        _BLAS = BlasThreads()
    return _BLAS


def _torch_threads(n):
    torch = _optional("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return lambda: torch.set_num_threads(old)


THREAD_CONTROL = {
    "cattn": "num_threads= argument (BLAS inside the kernel is kept on 1 thread by cattn)",
    "numpy": "BLAS limit (see blas)",
    "torch": "torch.set_num_threads(n) before each timing",
    "ort": "SessionOptions.intra_op_num_threads=n, inter_op_num_threads=1, "
           "session.intra_op.allow_spinning=0 (one session per thread count)",
    "gemm": "BLAS limit (see blas)",
}


# ------------------------------------------------------------------------------ a case

class Spec:
    """One attention problem: shape, dtype and the options that define what is computed."""

    def __init__(self, B, H, L, S, E, dtype="float32", causal=False, window=None,
                 return_weights=False):
        self.B, self.H, self.L, self.S, self.E = (int(B), int(H), int(L), int(S), int(E))
        self.dtype = np.dtype(dtype)
        self.causal = bool(causal)
        self.window = None if window is None else tuple(window)
        self.return_weights = bool(return_weights)

    @property
    def shape(self):
        return (self.B, self.H, self.L, self.S, self.E)

    def options(self):
        """The option part of the label."""
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append("window=%s,%s" % self.window)
        if self.return_weights:
            parts.append("weights")
        return "+".join(parts) or "full"

    def flops(self):
        """Dense-equivalent flops: 4*B*H*L*S*E."""
        return 4.0 * self.B * self.H * self.L * self.S * self.E

    def visible_pairs(self):
        """How many (query, key) pairs are visible (per batch item and head)."""
        if not self.causal and self.window is None:
            return float(self.L) * self.S
        from cattn.reference import visible_keys
        # Count by rows in chunks so an 8192 x 8192 mask is never built at once.
        total = 0
        for r0 in range(0, self.L, 512):
            vis = self._visible_rows(r0, min(self.L, r0 + 512), visible_keys)
            total += int(vis.sum())
        return float(total)

    def _visible_rows(self, r0, r1, visible_keys):
        full = visible_keys(self.L, self.S, self.causal, self.window)
        return full[r0:r1]

    def useful_flops(self):
        return 4.0 * self.B * self.H * self.E * self.visible_pairs()

    def kv_bytes(self):
        return 2.0 * self.B * self.H * self.S * self.E * self.dtype.itemsize

    def to_json(self):
        return {"B": self.B, "H": self.H, "L": self.L, "S": self.S, "E": self.E,
                "dtype": self.dtype.name, "causal": self.causal,
                "window": None if self.window is None else list(self.window),
                "return_weights": self.return_weights, "options": self.options()}


def make_inputs(spec, seed=0):
    """q, k, v: C-contiguous (B, H, L|S, E) arrays of spec.dtype, N(0, 1) entries."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((spec.B, spec.H, spec.L, spec.E), dtype=np.float32)
    k = rng.standard_normal((spec.B, spec.H, spec.S, spec.E), dtype=np.float32)
    v = rng.standard_normal((spec.B, spec.H, spec.S, spec.E), dtype=np.float32)
    return tuple(x.astype(spec.dtype, copy=False) for x in (q, k, v))


# ------------------------------------------------------------- checking against the truth

CHECK_ROWS = 1024  # rows of one (batch, head) item checked against the float64 reference


def reference_check_slice(spec, q, k, v):
    """(rows, expected): the float64 reference for item (0, 0) and a set of query rows
    (all rows when L <= CHECK_ROWS, else the first and the last CHECK_ROWS/2 rows, where
    a causal query sees the most keys). Built with an explicit mask so slicing rows keeps
    the causal/window diagonal in place."""
    from cattn.reference import scaled_dot_product_attention as ref, visible_keys
    L = spec.L
    if L <= CHECK_ROWS:
        rows = np.arange(L)
    else:
        half = CHECK_ROWS // 2
        rows = np.concatenate([np.arange(half), np.arange(L - half, L)])
    q64 = q[0, 0, rows].astype(np.float64)
    k64 = k[0, 0].astype(np.float64)
    v64 = v[0, 0].astype(np.float64)
    mask = None
    if spec.causal or spec.window is not None:
        mask = visible_keys(L, spec.S, spec.causal, spec.window)[rows]
    scale = 1.0 / math.sqrt(spec.E)
    return rows, ref(q64, k64, v64, attn_mask=mask, scale=scale)


def max_abs_diff(out, rows, expected):
    got = np.asarray(out)[0, 0, rows].astype(np.float64)
    return float(np.max(np.abs(got - expected))) if got.size else 0.0


def tolerance(dtype):
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10


# --------------------------------------------------------------- the implementations
#
# make_<impl>(spec, q, k, v, threads) -> (fn, to_output, setup, note)
#   fn():            the timed call
#   to_output(res):  fn's result as a (B, H, L, E) NumPy array (outside timing)
#   setup():         called before each timing (thread settings); returns a restore callable

def _sdpa_options(spec):
    """Keyword options of cattn's (and the reference's) call for this spec."""
    opts = {"is_causal": spec.causal}
    if spec.window is not None:
        opts["window"] = spec.window
    if spec.return_weights:
        opts["return_weights"] = True
    return opts


def _first_output(res):
    return res[0] if isinstance(res, tuple) else res


def make_cattn(spec, q, k, v, threads):
    import cattn
    opts = _sdpa_options(spec)
    sdpa = cattn.scaled_dot_product_attention

    def fn():
        return sdpa(q, k, v, num_threads=threads, **opts)
    return fn, _first_output, None, ""


def make_numpy(spec, q, k, v, threads):
    from cattn import reference
    opts = _sdpa_options(spec)
    sdpa = reference.scaled_dot_product_attention

    def fn():
        return sdpa(q, k, v, **opts)
    limiter = blas_threads()
    return fn, _first_output, (lambda: limiter.limit(threads)), ""


def make_torch(spec, q, k, v, threads):
    torch = _optional("torch")
    if torch is None:
        raise Skip("torch not installed (pip install 'cattn[torch]')")
    if spec.window is not None:
        raise Skip("PyTorch SDPA has no sliding window (only through a dense mask)")
    if spec.return_weights:
        raise Skip("PyTorch SDPA does not return weights")
    import torch.nn.functional as F
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # zero-copy views
    sdpa = F.scaled_dot_product_attention
    causal = spec.causal

    def fn():  # the inputs don't require grad: no autograd context needed (or timed)
        return sdpa(tq, tk, tv, is_causal=causal)

    def to_output(res):
        return res.numpy()
    return fn, to_output, (lambda: _torch_threads(threads)), ""


_ORT_SESSIONS = {}


def _ort_session(op, dtype, num_heads, causal, threads):
    key = (op, np.dtype(dtype).name, num_heads, causal, threads)
    if key in _ORT_SESSIONS:
        return _ORT_SESSIONS[key]
    ort = _optional("onnxruntime")
    from onnx import TensorProto, helper
    elem = TensorProto.FLOAT if np.dtype(dtype) == np.float32 else TensorProto.DOUBLE
    if op == "mha":
        node = helper.make_node("MultiHeadAttention", ["Q", "K", "V"], ["Y"],
                                domain="com.microsoft", num_heads=num_heads,
                                unidirectional=int(causal))
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    else:
        node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=int(causal))
        opsets = [helper.make_opsetid("", 23)]
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info(n, elem, None) for n in ("Q", "K", "V")],
        [helper.make_tensor_value_info("Y", elem, None)])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    _ORT_SESSIONS[key] = sess
    return sess


ORT_OP = "auto"  # "mha" (com.microsoft MultiHeadAttention), "attention" (opset 23), "auto"


def make_ort(spec, q, k, v, threads):
    if _optional("onnxruntime") is None or _optional("onnx") is None:
        raise Skip("onnxruntime/onnx not installed (pip install 'cattn[onnx]')")
    if spec.window is not None:
        raise Skip("no sliding window in ORT's attention ops")
    if spec.return_weights:
        raise Skip("ORT's attention ops do not return weights here")
    op = ORT_OP
    if op == "auto":  # MultiHeadAttention is float32 only: opset-23 Attention for float64
        op = "mha" if spec.dtype == np.float32 else "attention"
    B, H, L, S, E = spec.shape
    try:
        sess = _ort_session(op, spec.dtype, H, spec.causal, threads)
    except Exception as exc:
        raise Skip(f"ORT cannot build {op}: {str(exc)[:160]}")
    if op == "mha":
        # ORT's natural layout (B, L, H*E): the transposes are done once, outside timing.
        def bsh(x):
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B, -1, H * E))
        feeds = {"Q": bsh(q), "K": bsh(k), "V": bsh(v)}

        def to_output(res):
            return res[0].reshape(B, L, H, E).transpose(0, 2, 1, 3)
        note = ("com.microsoft MultiHeadAttention on (B, L, H*E) inputs "
                "(layout transposes done once, not timed)")
    else:
        feeds = {"Q": q, "K": k, "V": v}

        def to_output(res):
            return res[0]
        note = "opset-23 Attention on (B, H, L, E) inputs"
    run = sess.run

    def fn():
        return run(None, feeds)
    return fn, to_output, None, note


MAKERS = {"cattn": make_cattn, "numpy": make_numpy, "torch": make_torch, "ort": make_ort}


# --------------------------------------------------------------- ceilings: GEMM, stream

_GEMM_OPERANDS = {}


def make_gemm(dtype, n, threads):
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


_STREAM_ARRAY = {}
STREAM_MIB = 512


def _stream_array():
    if "x" not in _STREAM_ARRAY:
        n = STREAM_MIB * 2**20 // 4
        x = np.empty(n, dtype=np.float32)
        x.fill(1.0)  # touch every page
        _STREAM_ARRAY["x"] = x
    return _STREAM_ARRAY["x"]


_POOL = {}


def _thread_pool(n):
    if n not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[n] = ThreadPoolExecutor(max_workers=n)
    return _POOL[n]


def make_stream_probes(threads):
    """[(name, fn, setup)]: read-only passes over a 512 MiB float32 array."""
    x = _stream_array()
    probes = []
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
    torch = _optional("torch")
    if torch is not None:
        tx = torch.from_numpy(x)
        probes.append(("torch.sum", lambda: tx.sum(), lambda: _torch_threads(threads)))
    return probes


# ------------------------------------------------------------------ peak memory (RSS)
#
# tracemalloc sees only NumPy's allocations. For a figure that covers every
# implementation alike (PyTorch's and ORT's allocators included), each implementation
# runs in a fresh process: after imports, inputs and the ORT session exist, the kernel's
# peak-RSS counter is reset (/proc/self/clear_refs, Linux), two calls run, and the peak
# RSS above that baseline is the extra memory (output array and one-time allocations such
# as ORT's arena included).

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def memprobe(impl, spec, threads):
    """Run in a fresh process (see rss_peak_mib): peak extra RSS in MiB of two calls."""
    q, k, v = make_inputs(spec)
    fn, _, setup, _ = MAKERS[impl](spec, q, k, v, threads)
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


def rss_peak(impl, spec, threads, timeout=900):
    """{"rss_mib", "traced_mib"} of `impl` on `spec`, measured in a fresh process, or
    {"rss_mib": None, "reason": ...} (not Linux, implementation skipped, failure)."""
    import subprocess
    if not os.path.exists("/proc/self/clear_refs"):
        return {"rss_mib": None, "reason": "needs Linux /proc/self/clear_refs"}
    arg = json.dumps({"impl": impl, "spec": spec.to_json(), "threads": threads,
                      "ort_op": ORT_OP})
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _memprobe_main(arg):
    global ORT_OP
    d = json.loads(arg)
    ORT_OP = d.get("ort_op", "auto")
    s = d["spec"]
    spec = Spec(s["B"], s["H"], s["L"], s["S"], s["E"], s["dtype"], s["causal"],
                s["window"], s["return_weights"])
    try:
        rss, traced = memprobe(d["impl"], spec, d["threads"])
        print(json.dumps({"rss_mib": rss, "traced_mib": traced}))
    except Skip as exc:
        print(json.dumps({"rss_mib": None, "reason": str(exc)}))


def run_memory_case(name, spec_list, impls, threads=1, log=None):
    """Peak extra memory of each implementation (fresh process each; no timing)."""
    log = log or (lambda s: None)
    rows, skipped = [], []
    t0 = time.perf_counter()
    for spec in spec_list:
        for impl in impls:
            res = rss_peak(impl, spec, threads)
            label = f"{impl}/{threads}t/{spec.options()}"
            if res.get("rss_mib") is None:
                skipped.append({"label": label, "impl": impl, "threads": threads,
                                "options": spec.options(), "reason": res.get("reason")})
                continue
            rows.append({"label": label, "impl": impl, "threads": threads, "kind": "memory",
                         "options": spec.options(), "peak_rss_mib": res["rss_mib"],
                         "peak_traced_mib": res.get("traced_mib")})
            log(".")
    elapsed = time.perf_counter() - t0
    log(f"  {name}: {elapsed:.1f}s\n")
    return {"name": name, "kind": "memory", "spec": spec_list[0].to_json(),
            "options": [s.options() for s in spec_list], "threads": [threads], "rows": rows,
            "gemm_gflops": {}, "stream_gbps": {}, "skipped": skipped, "wrong_output": [],
            "timing_s": elapsed,
            "method": "peak RSS above the baseline (after imports, inputs, ORT session) over "
                      "two calls, in a fresh process per implementation; traced = "
                      "tracemalloc peak of a third call (NumPy allocations only)"}


def format_memory_case(case):
    spec = case["spec"]
    out = [f"== {case['name']}: B={spec['B']} H={spec['H']} L={spec['L']} S={spec['S']} "
           f"E={spec['E']} {spec['dtype']}, peak extra memory (fresh process per impl)",
           f"   {'impl':<7}{'thr':>4} {'options':<16}{'RSS MiB':>9}{'traced MiB':>12}"]
    for r in case["rows"]:
        out.append(f"   {r['impl']:<7}{r['threads']:>4} {r['options']:<16}"
                   f"{r['peak_rss_mib']:>9.1f}{_fmt(r['peak_traced_mib'], '{:.1f}', 'n/a'):>12}")
    for s in case["skipped"]:
        out.append(f"   skipped {s['label']}: {s['reason']}")
    out.append("   (RSS: peak resident memory above inputs/imports over two calls, output "
               "and one-time allocations such as ORT's arena included; traced: tracemalloc, "
               "NumPy allocations only)")
    return "\n".join(out)


# ------------------------------------------------------------- GEMM on the block shapes

BLOCK_SHAPES = [  # (m, k, n): scores Q_blk·K_blkᵀ (bq, E, bk) and P·V_blk (bq, bk, E), E=64
    (128, 64, 64), (128, 64, 128), (128, 64, 256), (128, 64, 512),
    (128, 64, 64), (128, 128, 64), (128, 256, 64), (128, 512, 64),
    (64, 64, 256), (256, 64, 256), (64, 256, 64), (256, 256, 64)]


def run_block_gemm_case(name, threads=1, reps=7, warmup=1, gemm_n=2048, flops_per_call=2e8,
                        log=None):
    """How fast BLAS (NumPy's OpenBLAS, batched matmul: one C loop of BLAS calls) runs the
    small GEMMs of the kernel's blocks, against the large square sgemm, one round-robin."""
    log = log or (lambda s: None)
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
    time_round_robin(runners, reps, warmup, 0.02, log=log)
    log(f" {time.perf_counter() - t0:.1f}s\n")
    big = runners[-1].work / median(runners[-1].times) / 1e9
    rows = []
    for r in runners:
        g = r.work / median(r.times) / 1e9
        rows.append({"label": r.label, "impl": r.impl, "threads": threads, "kind": r.kind,
                     "median_s": median(r.times), "times_s": r.times, "gflops": g,
                     "pct_of_gemm": 100.0 * g / big, "note": r.note})
    return {"name": name, "kind": "blockgemm", "spec": {"dtype": "float32"},
            "options": [], "threads": [threads], "rows": rows,
            "gemm_gflops": {str(threads): big}, "stream_gbps": {}, "skipped": [],
            "wrong_output": [], "timing_s": time.perf_counter() - t0}


def format_block_gemm_case(case):
    out = [f"== {case['name']}: BLAS on the kernel's block shapes (m x k x n), "
           f"{case['threads'][0]} thread, vs the large sgemm of the same round-robin",
           f"   {'m x k x n':<14}{'GFLOP/s':>9}{'%sgemm':>8}"]
    for r in case["rows"]:
        out.append(f"   {r['label']:<14}{r['gflops']:>9.1f}{r['pct_of_gemm']:>7.0f}%")
    return "\n".join(out)

# ----------------------------------------------------------------------------- timing

class Runner:
    def __init__(self, label, impl, threads, kind, fn, setup=None, spec=None,
                 to_output=None, note="", work=None):
        self.label, self.impl, self.threads, self.kind = label, impl, threads, kind
        self.fn, self.setup, self.spec, self.to_output = fn, setup, spec, to_output
        self.note, self.work = note, work  # work: flops (gemm/attention) or bytes (stream)
        self.number = 1
        self.times = []
        self.first_call = None
        self.peak_bytes = None
        self.max_abs_diff = None

    def call(self, number=1):
        restore = self.setup() if self.setup is not None else None
        try:
            t0 = time.perf_counter()
            for _ in range(number):
                self.fn()
            return time.perf_counter() - t0
        finally:
            if restore is not None:
                restore()


def _first_call(runner, trace_memory):
    """The untimed first call: output (for the check), peak traced memory, call time."""
    restore = runner.setup() if runner.setup is not None else None
    try:
        gc.collect()
        if trace_memory:
            tracemalloc.start()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        res = runner.fn()
        t = time.perf_counter() - t0
        if trace_memory:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            runner.peak_bytes = max(0, peak - base)
    finally:
        if restore is not None:
            restore()
    return res, t


# Seconds of idling before each timed call (see time_round_robin).
IDLE_BEFORE_TIMING = 0.1


def time_round_robin(runners, reps, warmup, min_timing, log=None):
    """Time all runners interleaved; each runner's .times gets `reps` seconds-per-call."""
    n = len(runners)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(warmup + reps):
            k = rep % n
            for r in runners[k:] + runners[:k]:
                # Let the previous runner's thread pools go idle first: OpenBLAS and OpenMP
                # workers busy-wait for a while after a call and would steal the cores of
                # whichever runner comes next.
                time.sleep(IDLE_BEFORE_TIMING)
                t = r.call(r.number) / r.number
                if rep >= warmup:
                    r.times.append(t)
            gc.collect()
            if log is not None:
                log(".")
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(runner, t_single, min_timing):
    if t_single < min_timing:
        # Re-measure a short loop: the first call is cold and overestimates.
        n = 1
        while True:
            t = runner.call(n)
            if t >= min_timing / 10 or n >= 1 << 20:
                break
            n *= 4
        per_call = max(t / n, 1e-9)
        runner.number = max(1, int(math.ceil(min_timing / per_call)))


def median(xs):
    return float(np.median(xs)) if len(xs) else float("nan")


# ------------------------------------------------------------------------- running a case

def run_case(name, spec_list, threads, impls, *, reps=7, warmup=1, min_timing=0.02,
             gemm_n=2048, ceiling=True, check=True, trace_memory=True, stream=False,
             seed=0, log=None, kind="attention"):
    """Time every implementation on every spec in spec_list (same shape, same inputs,
    different options) at every thread count, plus the GEMM ceiling (and, with stream,
    the streaming-read probes), all in one round-robin. Returns the case's result dict."""
    log = log or (lambda s: None)
    base = spec_list[0]
    q, k, v = make_inputs(base, seed)
    runners, skipped, wrong = [], [], []
    checks = {}
    for spec in spec_list:
        expected = reference_check_slice(spec, q, k, v) if check else None
        for impl in impls:
            for t in threads:
                label = f"{impl}/{t}t/{spec.options()}"
                try:
                    fn, to_output, setup, note = MAKERS[impl](spec, q, k, v, t)
                except Skip as exc:
                    skipped.append({"label": label, "impl": impl, "threads": t,
                                    "options": spec.options(), "reason": str(exc)})
                    continue
                r = Runner(label, impl, t, kind, fn, setup, spec, to_output, note,
                           work=spec.flops())
                res, t_single = _first_call(r, trace_memory and impl in ("cattn", "numpy"))
                if check:
                    rows, exp = expected
                    r.max_abs_diff = max_abs_diff(to_output(res), rows, exp)
                    checks[label] = r.max_abs_diff
                    if not (r.max_abs_diff <= tolerance(spec.dtype)):
                        wrong.append({"label": label, "impl": impl, "threads": t,
                                      "options": spec.options(),
                                      "max_abs_diff": r.max_abs_diff})
                        log(f"\n  !! {label}: max abs diff {r.max_abs_diff:.3g} vs the "
                            f"float64 reference (tolerance {tolerance(spec.dtype):g}): "
                            f"NOT timed\n")
                        continue
                del res
                _calibrate(r, t_single, min_timing)
                runners.append(r)
    if ceiling:
        gname = "sgemm" if base.dtype == np.float32 else "dgemm"
        for t in threads:
            fn, setup = make_gemm(base.dtype, gemm_n, t)
            r = Runner(f"{gname}/{t}t", gname, t, "gemm", fn, setup, work=2.0 * gemm_n ** 3,
                       note=f"{gemm_n}x{gemm_n}x{gemm_n} {gname} through scipy.linalg.blas")
            fn()  # warm
            runners.append(r)
    if stream:
        for t in threads:
            for pname, fn, setup in make_stream_probes(t):
                r = Runner(f"stream:{pname}/{t}t", "stream:" + pname, t, "stream", fn, setup,
                           work=float(_stream_array().nbytes),
                           note=f"read-only pass over {STREAM_MIB} MiB float32")
                r.call(1)
                runners.append(r)
    log(f"  {name}: {len(runners)} runners ")
    t0 = time.perf_counter()
    time_round_robin(runners, reps, warmup, min_timing, log=log)
    elapsed = time.perf_counter() - t0
    log(f" {elapsed:.1f}s\n")
    case = _summarize(name, base, spec_list, threads, runners, skipped, wrong, kind)
    case["timing_s"] = elapsed
    return case


def _summarize(name, base, spec_list, threads, runners, skipped, wrong, kind):
    rows = []
    ceilings = {}
    streams, stream_probe = {}, {}
    for r in runners:
        med = median(r.times)
        row = {"label": r.label, "impl": r.impl, "threads": r.threads, "kind": r.kind,
               "median_s": med, "min_s": float(min(r.times)), "times_s": r.times,
               "calls_per_timing": r.number, "note": r.note}
        if r.kind == "gemm":
            row["gflops"] = r.work / med / 1e9
            ceilings[r.threads] = row["gflops"]
        elif r.kind == "stream":
            row["gbps"] = r.work / med / 1e9
            if row["gbps"] > streams.get(r.threads, 0.0):
                streams[r.threads] = row["gbps"]
                stream_probe[r.threads] = r.impl[len("stream:"):]
        else:
            row["options"] = r.spec.options()
            row["gflops"] = r.work / med / 1e9
            row["gflops_useful"] = r.spec.useful_flops() / med / 1e9
            row["max_abs_diff"] = r.max_abs_diff
            row["peak_extra_mib"] = (None if r.peak_bytes is None
                                     else r.peak_bytes / 2**20)
            if kind == "decode":
                row["kv_gbps"] = r.spec.kv_bytes() / med / 1e9
        rows.append(row)
    by = {(r["impl"], r["threads"], r.get("options")): r for r in rows}
    for r in rows:
        if r["kind"] in ("attention", "decode"):
            c = ceilings.get(r["threads"])
            r["pct_of_gemm"] = None if c is None else 100.0 * r["gflops"] / c
            if kind == "decode" and streams.get(r["threads"]):
                r["pct_of_stream"] = 100.0 * r["kv_gbps"] / streams[r["threads"]]
            mine = by.get(("cattn", r["threads"], r["options"]))
            r["cattn_speedup"] = (None if mine is None
                                  else r["median_s"] / mine["median_s"])
            one = by.get((r["impl"], 1, r["options"]))
            r["speedup_vs_1t"] = (None if one is None or r["threads"] == 1
                                  else one["median_s"] / r["median_s"])
    return {"name": name, "kind": kind, "spec": base.to_json(),
            "options": [s.options() for s in spec_list], "threads": list(threads),
            "rows": rows, "gemm_gflops": {str(t): g for t, g in ceilings.items()},
            "stream_gbps": {str(t): g for t, g in streams.items()},
            "stream_probe": {str(t): p for t, p in stream_probe.items()},
            "skipped": skipped, "wrong_output": wrong}


# ------------------------------------------------------------------------ printing

def _fmt(x, spec="{:.1f}", none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def format_case(case):
    spec = case["spec"]
    out = []
    shape = f"B={spec['B']} H={spec['H']} L={spec['L']} S={spec['S']} E={spec['E']}"
    out.append(f"== {case['name']}: {shape} {spec['dtype']}")
    extras = []
    for t, g in case["gemm_gflops"].items():
        extras.append(f"{'sgemm' if spec['dtype'] == 'float32' else 'dgemm'} {t}t "
                      f"{g:.1f} GFLOP/s")
    for t, g in case["stream_gbps"].items():
        extras.append(f"stream read {t}t {g:.1f} GB/s ({case['stream_probe'][t]})")
    if extras:
        out.append("   ceiling (same run): " + ", ".join(extras))
    decode = case["kind"] == "decode"
    head = (f"   {'impl':<7}{'thr':>4} {'options':<16}{'median':>11}"
            + (f"{'KV GB/s':>9}{'%strm':>7}" if decode else
               f"{'GFLOP/s':>9}{'%gemm':>7}{'useful':>8}")
            + f"{'cattn x':>8}{'vs 1t':>7}{'maxdiff':>10}{'peakMiB':>9}")
    out.append(head)
    rows = [r for r in case["rows"] if r["kind"] != "gemm" and r["kind"] != "stream"]
    rows.sort(key=lambda r: (r["options"], r["threads"], ALL_IMPLS.index(r["impl"])))
    for r in rows:
        line = f"   {r['impl']:<7}{r['threads']:>4} {r['options']:<16}{_fmt_time(r['median_s']):>11}"
        if decode:
            line += f"{_fmt(r['kv_gbps']):>9}{_fmt(r.get('pct_of_stream'), '{:.0f}%'):>7}"
        else:
            useful = r["gflops_useful"] if r["options"] != "full" else None
            line += (f"{_fmt(r['gflops']):>9}{_fmt(r['pct_of_gemm'], '{:.0f}%'):>7}"
                     f"{_fmt(useful):>8}")
        sp = r["cattn_speedup"] if r["impl"] != "cattn" else None
        line += (f"{_fmt(sp, '{:.2f}x'):>8}{_fmt(r['speedup_vs_1t'], '{:.2f}x'):>7}"
                 f"{_fmt(r['max_abs_diff'], '{:.1e}'):>10}"
                 f"{_fmt(r['peak_extra_mib'], '{:.1f}', 'n/a'):>9}")
        out.append(line)
    for s in case["skipped"]:
        out.append(f"   skipped {s['label']}: {s['reason']}")
    for w in case["wrong_output"]:
        out.append(f"   WRONG OUTPUT (not timed) {w['label']}: max abs diff "
                   f"{w['max_abs_diff']:.3g} > tolerance {tolerance(spec['dtype']):g}"
                   + (" (less precise than float64)" if spec["dtype"] == "float64" else ""))
    if any(r["options"] != "full" for r in rows) and not decode:
        out.append("   (GFLOP/s is dense-equivalent 4*B*H*L*S*E for masked options; "
                   "'useful' counts visible pairs only)")
    out.append("   (cattn x = peer time / cattn time at the same threads and options)")
    return "\n".join(out)


# ------------------------------------------------------------------- machine info

def machine_info():
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                      if line.startswith("flags")), [])
        info["simd_flags"] = [f for f in ("avx", "avx2", "fma", "avx512f") if f in flags]
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    versions = {"numpy": np.__version__}
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
    tpc = _optional("threadpoolctl")
    if tpc is not None:
        info["threadpools"] = [{k: d.get(k) for k in ("internal_api", "prefix", "version",
                                                      "num_threads", "filepath")}
                               for d in tpc.threadpool_info()]
    info["thread_control"] = dict(THREAD_CONTROL, blas=blas_threads().method)
    return info


# ------------------------------------------------------------------ single shape

def bench_shape(B, H, L, S, E, dtype="float32", causal=False, threads=(1,),
                impls=ALL_IMPLS, reps=7, warmup=1, gemm_n=2048, ceiling=True, check=True,
                seed=0, verbose=True):
    """Priority-1 entry point: one shape, one dtype, causal or not, at each thread count.
    Returns the case dict (see run_case); prints the table when verbose."""
    spec = Spec(B, H, L, S, E, dtype, causal)
    log = (lambda s: (sys.stderr.write(s), sys.stderr.flush())) if verbose else None
    case = run_case("shape", [spec], list(threads), list(impls), reps=reps, warmup=warmup,
                    gemm_n=gemm_n, ceiling=ceiling, check=check, seed=seed, log=log)
    if verbose:
        print(format_case(case))
    return case


# -------------------------------------------------------------------------- markdown

def format_markdown(result):
    """The run as Markdown (for benchmarks/RESULTS.md): machine, tables, targets."""
    m = result["machine"]
    v = m.get("versions", {})
    lines = [f"Command: `{' '.join(['python -m cattn.bench'] + m.get('argv', [])[1:])}`  ",
             f"Date: {m.get('date')}, elapsed {result.get('elapsed_s', 0):.0f} s, "
             f"load average at start/end {_fmt_load(m.get('loadavg_start'))} / "
             f"{_fmt_load(m.get('loadavg_end'))}  ",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cpus')} cores, "
             f"{'+'.join(m.get('simd_flags', []))}  ",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "  ",
             f"cattn: `{m.get('cattn_config')}`  ",
             f"Reps: median of {result.get('reps')} timed round-robin reps per case; GEMM "
             f"ceiling {result.get('gemm_n')}^3.", ""]
    for case in result["cases"]:
        spec = case["spec"]
        if "B" in spec:
            lines.append(f"### {case['name']} (B={spec['B']} H={spec['H']} L={spec['L']} "
                         f"S={spec['S']} E={spec['E']} {spec['dtype']})")
        else:
            lines.append(f"### {case['name']} ({spec['dtype']})")
        lines.append("")
        ceil = [f"{'sgemm' if spec['dtype'] == 'float32' else 'dgemm'} {t}t "
                f"{g:.1f} GFLOP/s" for t, g in case["gemm_gflops"].items()]
        ceil += [f"stream read {t}t {g:.1f} GB/s ({case['stream_probe'][t]})"
                 for t, g in case["stream_gbps"].items()]
        if ceil:
            lines += ["Same-run ceiling: " + ", ".join(ceil), ""]
        if case["kind"] == "blockgemm":
            lines += ["| m x k x n | GFLOP/s | % of the large sgemm |", "|---|---|---|"]
            lines += [f"| {r['label']} | {r['gflops']:.1f} | {r['pct_of_gemm']:.0f}% |"
                      for r in case["rows"]]
        elif case["kind"] == "memory":
            lines += ["| impl | threads | options | peak extra RSS MiB | traced MiB |",
                      "|---|---|---|---|---|"]
            for r in case["rows"]:
                lines.append(f"| {r['impl']} | {r['threads']} | {r['options']} | "
                             f"{r['peak_rss_mib']:.1f} | "
                             f"{_fmt(r['peak_traced_mib'], '{:.1f}', 'n/a')} |")
        else:
            decode = case["kind"] == "decode"
            lines += [("| impl | threads | options | median | "
                       + ("KV GB/s | % stream" if decode else "GFLOP/s | % gemm")
                       + " | cattn speedup | vs 1 thread | max abs diff |"),
                      "|---|---|---|---|---|---|---|---|---|"]
            rows = sorted((r for r in case["rows"] if r["kind"] not in ("gemm", "stream")),
                          key=lambda r: (r["options"], r["threads"],
                                         ALL_IMPLS.index(r["impl"])))
            for r in rows:
                a, b = ((r["kv_gbps"], r.get("pct_of_stream")) if decode
                        else (r["gflops"], r["pct_of_gemm"]))
                sp = r["cattn_speedup"] if r["impl"] != "cattn" else None
                lines.append(f"| {r['impl']} | {r['threads']} | {r['options']} | "
                             f"{_fmt_time(r['median_s'])} | {_fmt(a)} | "
                             f"{_fmt(b, '{:.0f}%')} | {_fmt(sp, '{:.2f}x')} | "
                             f"{_fmt(r['speedup_vs_1t'], '{:.2f}x')} | "
                             f"{_fmt(r['max_abs_diff'], '{:.1e}')} |")
        if case["kind"] == "attention" and any(o != "full" for o in case["options"]):
            lines.append("\nGFLOP/s of masked options (causal, window) is dense-equivalent "
                         "(4·B·H·L·S·E / time); the JSON also has the useful GFLOP/s.")
        for s in case["skipped"]:
            lines.append(f"\nSkipped {s['label']}: {s['reason']}")
        for w in case["wrong_output"]:
            lines.append(f"\nWrong output, not timed: {w['label']} (max abs diff "
                         f"{w['max_abs_diff']:.3g})")
        lines.append("")
    if result.get("targets"):
        lines += ["### Targets", "", "| id | target | measured | verdict |", "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['id']} | {t['target']} | {t['measured']} | {t['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def _fmt_load(x):
    return "-" if not x else "/".join(f"{v:.1f}" for v in x)

# ------------------------------------------------------------------------------ CLI

def _ints(s):
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cattn.bench",
        description="Benchmark cattn against the NumPy reference, PyTorch SDPA and ONNX "
                    "Runtime, interleaved in one run, with the machine's GEMM ceiling.")
    p.add_argument("--quick", action="store_true",
                   help="the small suite (< 1 minute on 2 cores)")
    p.add_argument("--preset", default=None,
                   help="comma-separated workloads: " + ", ".join(PRESET_NAMES))
    p.add_argument("--shape", default=None, metavar="B,H,L,S,E",
                   help="benchmark this one shape only (issue 2's single-shape benchmark)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--causal", action="store_true", help="with --shape: causal")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1 and all cores)")
    p.add_argument("--impls", default=",".join(ALL_IMPLS),
                   help="comma-separated subset of " + ",".join(ALL_IMPLS))
    p.add_argument("--reps", type=int, default=None, help="timed reps (median; >= 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed round-robin reps before the timed ones (default 1, 0 with "
                        "--quick; every runner's first call, the output check, is untimed "
                        "anyway)")
    p.add_argument("--gemm-n", type=int, default=None,
                   help="size of the square GEMM ceiling (default 2048, 1024 with --quick)")
    p.add_argument("--ort-op", default="auto", choices=("auto", "mha", "attention"),
                   help="ORT op: com.microsoft MultiHeadAttention (float32 only), opset-23 "
                        "Attention, or auto (MHA for float32, Attention for float64)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check against the reference (not recommended)")
    p.add_argument("--json", default=None, help="JSON output path "
                   "(default benchmarks/out/bench-<preset>-<time>.json; '-' for none)")
    p.add_argument("--plot", default=None, help="PNG plot path (default next to the JSON; "
                   "'-' for none)")
    p.add_argument("--markdown", default=None,
                   help="also write the run as Markdown (tables and targets) to this path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memprobe", default=None, help=argparse.SUPPRESS)
    return p


def _default_threads():
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return [1] if n == 1 else [1, n]


def _out_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(here, "benchmarks", "out")
    if not os.path.isdir(os.path.join(here, "benchmarks")):
        d = os.path.join(os.getcwd(), "benchmarks", "out")
    return d


def write_json(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)


PRESET_NAMES = ()  # filled in below

def main(argv=None):
    global ORT_OP
    args = build_parser().parse_args(argv)
    if args.memprobe:
        return _memprobe_main(args.memprobe)
    ORT_OP = args.ort_op
    threads = _ints(args.threads) if args.threads else _default_threads()
    impls = [i for i in _ints_or_names(args.impls)]
    for i in impls:
        if i not in ALL_IMPLS:
            raise SystemExit(f"unknown implementation {i!r}; choose from {ALL_IMPLS}")
    reps = args.reps if args.reps is not None else (5 if args.quick else 7)
    if reps < 1:
        raise SystemExit("--reps must be >= 1")
    gemm_n = args.gemm_n or (1024 if args.quick else 2048)
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    info = machine_info()
    if args.shape:
        shape = _ints(args.shape)
        if len(shape) != 5:
            raise SystemExit("--shape takes B,H,L,S,E")
        case = bench_shape(*shape, dtype=args.dtype, causal=args.causal, threads=threads,
                           impls=impls, reps=reps, warmup=args.warmup, gemm_n=gemm_n,
                           check=not args.no_check, seed=args.seed)
        result = {"machine": info, "mode": "shape", "cases": [case]}
        tag = "shape"
    else:
        result = run_suite(args, threads, impls, reps, gemm_n, info)
        tag = "quick" if args.quick else (args.preset or "full").replace(",", "+")
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    result["elapsed_s"] = time.perf_counter() - t_start
    json_path = args.json or os.path.join(_out_dir(), f"bench-{tag}-{stamp}.json")
    if json_path != "-":
        write_json(result, json_path)
        print(f"\nJSON: {json_path}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(result) + "\n")
        print(f"Markdown: {args.markdown}")
    if args.plot != "-" and not args.shape:
        plot_path = args.plot or (os.path.splitext(json_path)[0] + ".png"
                                  if json_path != "-" else
                                  os.path.join(_out_dir(), f"bench-{tag}-{stamp}.png"))
        msg = plot(result, plot_path)
        print(msg)
    print(f"elapsed: {result['elapsed_s']:.1f} s")
    return result


def _ints_or_names(s):
    return [x for x in s.replace(" ", "").split(",") if x]


# ------------------------------------------------------------------------------ the suite
#
# A workload is a list of cases; a case is (name, [Spec, ...], options for run_case).
# Specs of one case share shape and inputs and are timed in the same round-robin (so
# causal vs non-causal, window vs full, weights vs none are same-run ratios).

PREFILL_LENGTHS = {"full": (512, 1024, 2048, 4096, 8192), "quick": (256, 1024)}
REF_MAX_LEN = 4096  # the NumPy reference materializes (B, H, L, S) scores: skipped above


def _prefill_cases(mode, dtype="float32"):
    cases = []
    lengths = PREFILL_LENGTHS[mode]
    if dtype == "float64":
        lengths = (1024, 2048, 4096) if mode == "full" else (512,)
    for L in lengths:
        specs = [Spec(1, 8, L, L, 64, dtype, causal=False)]
        if dtype == "float32":
            specs.append(Spec(1, 8, L, L, 64, dtype, causal=True))
        name = f"prefill{'' if dtype == 'float32' else '-f64'} L={L}"
        cases.append((name, specs, {"kind": "attention", "ref": L <= REF_MAX_LEN,
                                    "reps_cap": 5 if L >= 4096 else None}))
    return cases


def _encoder_cases(mode):
    lengths = (128, 384) if mode == "full" else (128,)
    return [(f"encoder L={L}", [Spec(8, 12, L, L, 64)], {"kind": "attention"})
            for L in lengths]


def _decode_cases(mode):
    return [("decode S=4096", [Spec(1, 32, 1, 4096, 128)],
             {"kind": "decode", "stream": True, "ceiling": False})]


def _tiny_cases(mode):
    return [("tiny L=S=5", [Spec(1, 1, 5, 5, 64)], {"kind": "attention", "ceiling": False})]


def _variant_cases(mode):
    """Issue 3's same-run ratios: a 256 window vs full at 8192, weights vs none at 1024
    (causal vs full at 4096 comes from the prefill workload)."""
    L = 8192 if mode == "full" else 1024
    cases = [(f"window L={L}", [Spec(1, 8, L, L, 64), Spec(1, 8, L, L, 64, window=(256, 0))],
              {"kind": "attention", "impls": ("cattn",), "reps_cap": 5}),
             ("weights L=1024" if mode == "full" else "weights L=512",
              [Spec(1, 8, 1024 if mode == "full" else 512, 1024 if mode == "full" else 512,
                    64),
               Spec(1, 8, 1024 if mode == "full" else 512, 1024 if mode == "full" else 512,
                    64, return_weights=True)],
              {"kind": "attention", "impls": ("cattn", "numpy")})]
    return cases


def _memory_cases(mode):
    """Peak extra memory per implementation (fresh processes, no timing); issue 2's
    L = S = 16384, one head, E = 64 (cattn and the peers; not the reference: 1 GiB scores)."""
    if mode != "full":  # --quick: the tables' tracemalloc column only
        return []
    return [("memory L=4096", [Spec(1, 8, 4096, 4096, 64)], {"kind": "memory"}),
            ("memory L=16384", [Spec(1, 1, 16384, 16384, 64)],
             {"kind": "memory", "ref": False})]


WORKLOADS = {
    "prefill": lambda mode: _prefill_cases(mode),
    "encoder": _encoder_cases,
    "decode": _decode_cases,
    "tiny": _tiny_cases,
    "float64": lambda mode: _prefill_cases(mode, "float64"),
    "variants": _variant_cases,
    "memory": _memory_cases,
    "blocks": lambda mode: [("blocks", [], {"kind": "blockgemm"})],
}
PRESET_NAMES = tuple(WORKLOADS)


def run_suite(args, threads, impls, reps, gemm_n, info):
    global STREAM_MIB
    mode = "quick" if args.quick else "full"
    if args.quick:
        STREAM_MIB = 256
    names = _ints_or_names(args.preset) if args.preset else list(WORKLOADS)
    for n in names:
        if n not in WORKLOADS:
            raise SystemExit(f"unknown preset {n!r}; choose from {', '.join(WORKLOADS)}")
    log = lambda s: (sys.stderr.write(s), sys.stderr.flush())  # noqa: E731
    cases = []
    for wname in names:
        for name, specs, opts in WORKLOADS[wname](mode):
            case_impls = [i for i in impls if i in opts.get("impls", ALL_IMPLS)]
            if not opts.get("ref", True):
                case_impls = [i for i in case_impls if i != "numpy"]
            if not case_impls and opts["kind"] != "blockgemm":
                continue
            case_threads = threads if opts.get("threads") != "all" else threads[-1:]
            case_reps = reps if opts.get("reps_cap") is None else min(reps, opts["reps_cap"])
            if opts["kind"] == "blockgemm":
                case = run_block_gemm_case(name, 1, reps=reps, warmup=args.warmup,
                                           gemm_n=gemm_n,
                                           flops_per_call=5e7 if args.quick else 2e8,
                                           log=log)
                case["workload"] = wname
                print(format_block_gemm_case(case))
                print(flush=True)
                cases.append(case)
                continue
            if opts["kind"] == "memory":
                case = run_memory_case(name, specs, case_impls, 1, log=log)
                case["workload"] = wname
                print(format_memory_case(case))
                print(flush=True)
                cases.append(case)
                continue
            case = run_case(name, specs, case_threads, case_impls, reps=case_reps,
                            warmup=opts.get("warmup", args.warmup), gemm_n=gemm_n,
                            ceiling=opts.get("ceiling", True), check=not args.no_check,
                            stream=opts.get("stream", False), seed=args.seed, log=log,
                            kind=opts["kind"])
            case["workload"] = wname
            if not opts.get("ref", True) and "numpy" in impls:
                case["skipped"].append({"label": "numpy", "impl": "numpy", "threads": None,
                                        "options": None,
                                        "reason": f"reference skipped above L={REF_MAX_LEN} "
                                                  "(it materializes the L x S scores)"})
            print(format_case(case))
            print(flush=True)
            cases.append(case)
    result = {"machine": info, "mode": mode, "presets": names, "reps": reps,
              "gemm_n": gemm_n, "threads": threads, "cases": cases}
    result["targets"] = check_targets(result)
    print(format_targets(result["targets"]))
    return result


# --------------------------------------------------------------------------- targets

def _rows(result, workload=None, name_prefix=None, **match):
    for case in result["cases"]:
        if workload is not None and case.get("workload") != workload:
            continue
        if name_prefix is not None and not case["name"].startswith(name_prefix):
            continue
        for r in case["rows"]:
            if all(r.get(k) == v for k, v in match.items()):
                yield case, r


def _target(tid, text, checks, unit="x", indicative=False):
    """checks: [(where, value, threshold, higher_is_better)] -> one target row.
    indicative: measured on other shapes than the target's (a --quick run): no verdict."""
    if not checks:
        return {"id": tid, "target": text, "measured": "n/a (not in this run)",
                "verdict": "n/a", "details": []}
    details = []
    ok = True
    for where, value, need, higher in checks:
        passed = value is not None and (value >= need if higher else value <= need)
        ok &= passed
        details.append({"where": where, "value": value, "need": need, "pass": passed})
    vals = [d for d in details if d["value"] is not None]
    worst = (min(vals, key=lambda d: d["value"] / d["need"]) if checks[0][3]
             else max(vals, key=lambda d: d["value"] / d["need"])) if vals else None
    measured = ("n/a" if worst is None else
                f"worst {worst['value']:.2f}{unit} ({worst['where']})")
    verdict = "PASS" if ok else "FAIL"
    if indicative:
        verdict = f"({verdict.lower()})"
        measured += " [other shape]"
    return {"id": tid, "target": text, "measured": measured, "verdict": verdict,
            "indicative": indicative, "details": details}


def _speedup(case, r, peers):
    """cattn's speedup over the fastest of `peers` in the same case/threads/options."""
    best = None
    for p in case["rows"]:
        if (p["impl"] in peers and p["threads"] == r["threads"]
                and p.get("options") == r["options"]):
            best = p["median_s"] if best is None else min(best, p["median_s"])
    return None if best is None else best / r["median_s"]


def check_targets(result):
    T = []
    f32 = dict(workload="prefill", impl="cattn")
    mid = lambda c: c["spec"]["L"] in (1024, 2048, 4096)  # noqa: E731

    # 1. Non-causal prefill 1024..4096: >= 80% sgemm, >= 1.15x the faster peer.
    checks = [(f"L={c['spec']['L']} {r['threads']}t", r["pct_of_gemm"], 80.0, True)
              for c, r in _rows(result, options="full", **f32) if mid(c)]
    T.append(_target("5.1a", "non-causal prefill L=S 1024-4096, 1 and 2 threads: >=80% of "
                     "sgemm", checks, "%"))
    checks = [(f"L={c['spec']['L']} {r['threads']}t", _speedup(c, r, PEERS), 1.15, True)
              for c, r in _rows(result, options="full", **f32) if mid(c)
              and _speedup(c, r, PEERS) is not None]
    T.append(_target("5.1b", "non-causal prefill L=S 1024-4096, 1 and 2 threads: >=1.15x "
                     "the faster of torch and ORT", checks))
    # 2. Causal prefill: >= 1.15x torch.
    checks = [(f"L={c['spec']['L']} {r['threads']}t", _speedup(c, r, ("torch",)), 1.15, True)
              for c, r in _rows(result, options="causal", **f32) if mid(c)
              and _speedup(c, r, ("torch",)) is not None]
    T.append(_target("5.2", "causal prefill L=S 1024-4096: >=1.15x torch SDPA", checks))
    # 3. Encoder batches: >= 1.2x torch, >= 1.0x ORT.
    checks = []
    for c, r in _rows(result, workload="encoder", impl="cattn"):
        for peer, need in (("torch", 1.2), ("ort", 1.0)):
            sp = _speedup(c, r, (peer,))
            if sp is not None:
                checks.append((f"L={c['spec']['L']} {r['threads']}t vs {peer}", sp, need, True))
    T.append(_target("5.3", "encoder B=8 H=12 L=128/384: >=1.2x torch and >=1.0x ORT", checks,
                     indicative=not any(c["spec"]["L"] == 384 for c, _ in
                                        _rows(result, workload="encoder"))))
    # 4. Two threads >= 1.85x one thread at L=S=2048.
    checks = [(f"L=2048 {r['threads']}t", r["speedup_vs_1t"], 1.85, True)
              for c, r in _rows(result, options="full", **f32)
              if c["spec"]["L"] == 2048 and r["speedup_vs_1t"] is not None]
    T.append(_target("5.4", "2 threads >= 1.85x 1 thread at L=S=2048 (non-causal)", checks))
    # 5. Tiny case < 10 us per call.
    checks = [(f"{r['threads']}t", r["median_s"] * 1e6, 10.0, False)
              for c, r in _rows(result, workload="tiny", impl="cattn")]
    T.append(_target("5.5", "tiny case L=S=5 E=64: < 10 us per call", checks, " us"))
    # 6. Float64 >= 80% dgemm.
    checks = [(f"L={c['spec']['L']} {r['threads']}t", r["pct_of_gemm"], 80.0, True)
              for c, r in _rows(result, workload="float64", impl="cattn")]
    T.append(_target("5.6", "float64 prefill L=S 1024-4096: >=80% of dgemm", checks, "%",
                     indicative=not any(mid(c) for c, _ in _rows(result, workload="float64"))))
    # 7. Decode (issue 4): >= 80% of the streaming read rate, faster than torch and ORT.
    checks = []
    for c, r in _rows(result, workload="decode", impl="cattn"):
        if r.get("pct_of_stream") is not None:
            checks.append((f"{r['threads']}t %stream", r["pct_of_stream"], 80.0, True))
        for peer in PEERS:
            sp = _speedup(c, r, (peer,))
            if sp is not None:
                checks.append((f"{r['threads']}t vs {peer} (x100)", sp * 100, 100.0, True))
    T.append(_target("5.7", "decode H=32 S=4096 E=128: K+V read >=80% of stream rate, "
                     "faster than torch and ORT (issue 4), in %", checks, "%"))
    # Issue 2: (1,8,2048,2048,64): >= 1.6x NumPy, >= 0.9x torch, 1 and 2 threads.
    checks = []
    for c, r in _rows(result, options="full", **f32):
        if c["spec"]["L"] == 2048:
            for peer, need in (("numpy", 1.6), ("torch", 0.9)):
                sp = _speedup(c, r, (peer,))
                if sp is not None:
                    checks.append((f"{r['threads']}t vs {peer}", sp, need, True))
    T.append(_target("2", "(1,8,2048,2048,64) float32: >=1.6x NumPy ref, >=0.9x torch",
                     checks))
    checks = [(f"{r['threads']}t RSS", r["peak_rss_mib"], 64.0, False)
              for c, r in _rows(result, workload="memory", impl="cattn")
              if c["spec"]["L"] == 16384]
    T.append(_target("2m", "extra memory at L=S=16384, 1 head, E=64: < 64 MiB (incl. the "
                     "4 MiB output)", checks, " MiB"))
    # Issue 3: causal >= 1.8x faster than non-causal at 4096; window >= 10x; weights <= 2x.
    checks = []
    for c, r in _rows(result, options="causal", **f32):
        if c["spec"]["L"] == 4096:
            full = next((x for x in c["rows"] if x["impl"] == "cattn" and x["options"] == "full"
                         and x["threads"] == r["threads"]), None)
            if full:
                checks.append((f"{r['threads']}t", full["median_s"] / r["median_s"], 1.8, True))
    T.append(_target("3c", "causal >=1.8x faster than non-causal, L=S=4096 H=8 E=64", checks))
    for tid, prefix, opt, need, text, higher, target_L in (
            ("3w", "window", "window=256,0", 10.0,
             "window (256, 0) >=10x faster than full attention at L=S=8192", True, 8192),
            ("3r", "weights", "weights", 2.0,
             "return_weights <= 2x the cost without, L=S=1024", False, 1024)):
        checks = []
        for c, r in _rows(result, workload="variants", name_prefix=prefix, impl="cattn",
                          options=opt):
            full = next((x for x in c["rows"] if x["impl"] == "cattn" and x["options"] == "full"
                         and x["threads"] == r["threads"]), None)
            if full:
                ratio = (full["median_s"] / r["median_s"] if higher
                         else r["median_s"] / full["median_s"])
                checks.append((f"L={c['spec']['L']} {r['threads']}t", ratio, need, higher))
        other = any(c["spec"]["L"] != target_L for c, _ in
                    _rows(result, workload="variants", name_prefix=prefix))
        T.append(_target(tid, text, checks, indicative=other))
    return T


def format_targets(targets):
    lines = ["== targets (issue 5: 5.x; issue 2: 2, 2m; issue 3: 3x)",
             f"   {'id':<4} {'verdict':<7} {'measured':<44} target"]
    for t in targets:
        lines.append(f"   {t['id']:<4} {t['verdict']:<7} {t['measured']:<44} {t['target']}")
    if any(t.get("indicative") for t in targets):
        lines.append("   (verdicts in parentheses: measured on smaller shapes than the "
                     "target's, e.g. --quick; indicative only)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plot

def plot(result, path):
    """GFLOP/s against sequence length (prefill, float32) per thread count, with the sgemm
    ceiling of the same run. Returns a message (matplotlib is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "plot: skipped (matplotlib not installed: pip install 'cattn[plot]')"
    cases = [c for c in result["cases"] if c.get("workload") == "prefill"]
    if not cases:
        return "plot: skipped (no prefill cases in this run)"
    threads = sorted({r["threads"] for c in cases for r in c["rows"]})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads) + 1.5, 4.5),
                             squeeze=False)  # own y scale: 2 threads reach ~2x
    colors = {"cattn": "C0", "numpy": "C1", "torch": "C2", "ort": "C3"}
    for ax, t in zip(axes[0], threads):
        for impl in ALL_IMPLS:
            for opt, style, key in (("full", "-", "gflops"),
                                    ("causal", "--", "gflops_useful")):
                pts = sorted((c["spec"]["L"], r[key]) for c in cases for r in c["rows"]
                             if r["impl"] == impl and r["threads"] == t
                             and r.get("options") == opt)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colors[impl],
                            label=f"{impl} {opt}")

        ceil = sorted((c["spec"]["L"], c["gemm_gflops"][str(t)]) for c in cases
                      if c["gemm_gflops"].get(str(t)))
        if ceil:
            g = float(np.median([x[1] for x in ceil]))
            ax.axhline(g, color="k", linestyle=":", label=f"sgemm {result.get('gemm_n')}^3 "
                       f"(median {g:.0f})")
            ax.plot(*zip(*ceil), "k:", marker="x", alpha=0.5,
                    label="sgemm, each case's round-robin")
        ax.set_xscale("log", base=2)
        lengths = sorted({c["spec"]["L"] for c in cases})
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(x) for x in lengths])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length L = S (B=1, H=8, E=64, float32)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("GFLOP/s (4*B*H*E*visible pairs / time)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    cpu = result["machine"].get("cpu_model", "")
    fig.suptitle(f"cattn benchmark ({result.get('mode')}), {cpu}: B=1 H=8 E=64 float32; "
                 "causal counts only visible (query, key) pairs", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"

if __name__ == "__main__":
    main()

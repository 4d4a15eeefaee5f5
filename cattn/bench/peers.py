"""The implementations compared: cattn, the NumPy reference, PyTorch SDPA, ONNX Runtime;
and how each one's thread count is set.

make_<impl>(spec, q, k, v, threads, config) -> (fn, to_output, setup, note)
  fn():            the timed call
  to_output(res):  fn's result as a (B, H, L, E) NumPy array (outside timing)
  setup():         called before each timing (thread settings); returns a restore callable
"""
from typing import Any, Callable, Dict, Optional

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.specs import Spec, narrow_inputs, sink_logits

# "cattn-avx2": cattn capped to its AVX2 path in the same run, on CPUs whose best path is
# wider (AVX-512): the per-path figures side by side. It skips where "cattn" is already AVX2.
ALL_IMPLS = ("cattn", "cattn-avx2", "numpy", "torch", "ort")
PEERS = ("torch", "ort")

_OPTIONAL: Dict[str, Any] = {}


def _try_import(name: str) -> Any:
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # ImportError, or a broken install
        return None


def optional(name: str) -> Any:
    """The module `name`, or None when it is not installed (imported once)."""
    if name not in _OPTIONAL:
        _OPTIONAL[name] = _try_import(name)
    return _OPTIONAL[name]


class Skip(Exception):
    """An implementation that cannot run this case (not installed, unsupported option)."""


# ------------------------------------------------------------------------ thread control

class BlasThreads:
    """Limits BLAS threads for the NumPy reference and the GEMM ceiling.

    threadpoolctl when installed (it reaches NumPy's BLAS too); otherwise the OpenBLAS
    handle that cattn itself uses to keep BLAS on one thread (cattn._blas_threads).
    """

    def __init__(self) -> None:
        tpc = optional("threadpoolctl")
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

    def limit(self, n: int) -> Callable[[], None]:
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


_BLAS: Optional[BlasThreads] = None


def blas_threads() -> BlasThreads:
    global _BLAS  # one limiter per process, built on first use (threadpoolctl is slow)
    if _BLAS is None:
        _BLAS = BlasThreads()
    return _BLAS


def torch_threads(n: int) -> Callable[[], None]:
    torch = optional("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return lambda: torch.set_num_threads(old)


THREAD_CONTROL = {
    "cattn": "num_threads= argument (BLAS inside the kernel is kept on 1 thread by cattn)",
    "cattn-avx2": "as cattn",
    "numpy": "BLAS limit (see blas)",
    "torch": "torch.set_num_threads(n) before each timing",
    "ort": "SessionOptions.intra_op_num_threads=n, inter_op_num_threads=1, "
           "session.intra_op.allow_spinning=0 (one session per thread count)",
    "gemm": "BLAS limit (see blas)",
}


# --------------------------------------------------------------- the implementations

def _sdpa_options(spec: Spec) -> Dict[str, Any]:
    """Keyword options of cattn's (and the reference's) call for this spec."""
    opts: Dict[str, Any] = {"is_causal": spec.causal}
    if spec.grouped:
        opts["enable_gqa"] = True
    if spec.window is not None:
        opts["window"] = spec.window
    if spec.return_weights:
        opts["return_weights"] = True
    if spec.sinks:
        opts["sinks"] = sink_logits(spec)
    return opts


def _first_output(res):
    return res[0] if isinstance(res, tuple) else res


def _cattn_inputs(spec: Spec, q, k, v):
    """The inputs as the spec stores them, and the options of the call (int8's scales)."""
    if spec.kv == "bfloat16" and optional("ml_dtypes") is None:
        raise Skip("bfloat16 needs ml_dtypes (pip install 'cattn[bf16]')")
    q, k, v, scales = narrow_inputs(spec, q, k, v)
    return q, k, v, dict(_sdpa_options(spec), **scales)


def make_cattn(spec: Spec, q, k, v, threads: int, config: BenchConfig):
    import cattn
    q, k, v, opts = _cattn_inputs(spec, q, k, v)
    if spec.page_size is not None:
        return _make_cattn_paged(spec, q, k, v, threads, opts)
    sdpa = cattn.scaled_dot_product_attention

    def fn():
        return sdpa(q, k, v, num_threads=threads, **opts)
    return fn, _first_output, None, ""


_page_pools: Dict[Any, Any] = {}  # the last inputs' pools, one per page size


def paged_pools(k, v, page_size: int, seed: int = 0):
    """k, v (B, H, S, E) copied into pools of pages (num_blocks, H, page_size, E), each
    sequence's pages in shuffled order (as a cache that served many requests holds them),
    and the block table."""
    key = (id(k), id(v), page_size)
    if key not in _page_pools:
        B, H, S, E = k.shape
        per_seq = -(-S // page_size)
        table = np.random.default_rng(seed).permutation(B * per_seq).astype(np.int32)
        table = table.reshape(B, per_seq)
        pools = []
        for x in (k, v):
            pool = np.zeros((B * per_seq, H, page_size, x.shape[-1]), dtype=x.dtype)
            padded = np.zeros((B, H, per_seq * page_size, x.shape[-1]), dtype=x.dtype)
            padded[:, :, :S] = x
            pool[table] = padded.reshape(B, H, per_seq, page_size, -1).transpose(0, 2, 1, 3, 4)
            pools.append(pool)
        _page_pools.clear()
        _page_pools[key] = (pools[0], pools[1], table)
    return _page_pools[key]


def _make_cattn_paged(spec: Spec, q, k, v, threads: int, opts):
    import cattn
    page_size = int(spec.page_size or 1)
    k_pool, v_pool, table = paged_pools(k, v, page_size)
    seq_lens = np.full(spec.B, spec.S)
    opts.pop("return_weights", None)

    def fn():
        return cattn.paged_attention(q, k_pool, v_pool, table, seq_lens, num_threads=threads,
                                     **opts)
    return fn, _first_output, None, f"pages of {page_size} in shuffled order"


def make_cattn_avx2(spec: Spec, q, k, v, threads: int, config: BenchConfig):
    import cattn
    from cattn import _kernel
    if _kernel.isa_path() in ("avx2", "portable") or "avx2" not in _kernel.supported_isa_paths():
        raise Skip(f"cattn's own path here is {_kernel.isa_path()}: see the cattn row")
    q, k, v, opts = _cattn_inputs(spec, q, k, v)
    sdpa = cattn.scaled_dot_product_attention

    def fn():
        return sdpa(q, k, v, num_threads=threads, _isa="avx2", **opts)
    return fn, _first_output, None, "AVX2 path"


def make_numpy(spec: Spec, q, k, v, threads: int, config: BenchConfig):
    if spec.kv is not None:
        raise Skip("the NumPy reference computes in its inputs' float32/float64")
    from cattn import reference
    opts = _sdpa_options(spec)
    if spec.Hkv == 1:  # one K/V head broadcasts over the query heads: not H copies of it
        opts.pop("enable_gqa", None)
    sdpa = reference.scaled_dot_product_attention

    def fn():
        return sdpa(q, k, v, **opts)
    limiter = blas_threads()
    return fn, _first_output, (lambda: limiter.limit(threads)), ""


def make_torch(spec: Spec, q, k, v, threads: int, config: BenchConfig):
    torch = optional("torch")
    if torch is None:
        raise Skip("torch not installed (pip install 'cattn[torch]')")
    if spec.window is not None:
        raise Skip("PyTorch SDPA has no sliding window (only through a dense mask)")
    if spec.return_weights:
        raise Skip("PyTorch SDPA does not return weights")
    if spec.sinks:
        raise Skip("PyTorch SDPA has no attention sinks")
    if spec.kv == "int8":
        raise Skip("int8 keys and values: compared with cattn's own float32 row")
    import torch.nn.functional as F
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # zero-copy views
    if spec.kv is not None:  # SDPA in the same dtype (converted once, not timed)
        half = torch.float16 if spec.kv == "float16" else torch.bfloat16
        tq, tk, tv = (x.to(half) for x in (tq, tk, tv))
    sdpa = F.scaled_dot_product_attention
    causal = spec.causal
    gqa: Dict[str, Any] = {"enable_gqa": True} if spec.grouped else {}  # (PyTorch >= 2.5)
    if spec.grouped or spec.Ev != spec.E:
        try:  # one key of the same heads and widths: whether this PyTorch takes them
            sdpa(torch.zeros(1, spec.H, 1, spec.E), torch.zeros(1, spec.Hkv, 1, spec.E),
                 torch.zeros(1, spec.Hkv, 1, spec.Ev), **gqa)
        except (TypeError, RuntimeError) as exc:
            raise Skip(f"PyTorch SDPA refuses {spec.Hkv} K/V heads for {spec.H} query heads"
                       f" with values {spec.Ev} wide: {str(exc)[:160]}")

    def fn():  # the inputs don't require grad: no autograd context needed (or timed)
        return sdpa(tq, tk, tv, is_causal=causal, **gqa)

    def to_output(res):
        return res.float().numpy()
    note = ("" if spec.Ev == spec.E else
            "math path (PyTorch's fused CPU kernel needs values as wide as the keys)")
    return fn, to_output, (lambda: torch_threads(threads)), note


_ORT_SESSIONS: Dict[tuple, Any] = {}


def _ort_session(op: str, dtype, num_heads: int, causal: bool, threads: int):
    key = (op, np.dtype(dtype).name, num_heads, causal, threads)
    if key in _ORT_SESSIONS:
        return _ORT_SESSIONS[key]
    ort = optional("onnxruntime")
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


def make_ort(spec: Spec, q, k, v, threads: int, config: BenchConfig):
    if optional("onnxruntime") is None or optional("onnx") is None:
        raise Skip("onnxruntime/onnx not installed (pip install 'cattn[onnx]')")
    if spec.window is not None:
        raise Skip("no sliding window in ORT's attention ops")
    if spec.return_weights:
        raise Skip("ORT's attention ops do not return weights here")
    if spec.sinks:
        raise Skip("no attention sinks in ORT's attention ops here")
    if spec.kv is not None:
        raise Skip("ORT's CPU attention ops compute float32/float64 here")
    own_kv = not spec.grouped and spec.value_width is None
    op = config.ort_op
    if op == "auto":  # MultiHeadAttention is float32 only, and one K/V head per query head
        # with values as wide as the keys: opset-23 Attention for the others
        op = "mha" if spec.dtype == np.float32 and own_kv else "attention"
    if op == "mha" and not own_kv:
        raise Skip("ORT's MultiHeadAttention takes one K/V head per query head and "
                   "values as wide as the keys (--ort-op auto: opset-23 Attention)")
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
        # ORT reads contiguous inputs: values that are a view of the keys are copied once
        # (not timed), or every call would copy them
        feeds = {"Q": q, "K": k, "V": np.ascontiguousarray(v)}

        def to_output(res):
            return res[0]
        note = "opset-23 Attention on (B, H, L, E) inputs" + (
            "" if v.flags.c_contiguous else ", values copied from the keys once (not timed)")
    run = sess.run

    def fn():
        return run(None, feeds)
    return fn, to_output, None, note


MAKERS = {"cattn": make_cattn, "cattn-avx2": make_cattn_avx2, "numpy": make_numpy,
          "torch": make_torch, "ort": make_ort}


def peer_isa() -> Dict[str, Optional[str]]:
    """The instruction set each installed peer's CPU kernels dispatch to, when it says."""
    isa: Dict[str, Optional[str]] = {}
    torch = optional("torch")
    if torch is not None:
        try:
            isa["torch"] = str(torch.backends.cpu.get_cpu_capability())
        except Exception:
            isa["torch"] = None
    return isa

"""cattn: exact, fast self-attention on the CPU.

>>> import numpy as np
>>> import cattn
>>> q = k = v = np.ones((1, 2, 4, 8), dtype=np.float32)   # (batch, heads, length, features)
>>> cattn.scaled_dot_product_attention(q, k, v, is_causal=True).shape
(1, 2, 4, 8)

How the package is layered, from what a user calls down to the compiled loop nest:

    cattn.models      real models on the layers: a BERT encoder, MiniLM sentence embeddings
        |
    cattn.layers      MultiHeadAttention (projections, masks, grouped-query heads); the
        |             caches in cattn._cache (KVCache, and PagedKVCache: pages of a shared
        |             pool, read by cattn._paged's paged_attention)
    cattn._api        the validating front: every check happens here, once per call; the
        |             call becomes a plan (one table row of offsets per batch/head item)
    cattn._kernel     the tiled loop nest (Cython + OpenMP): online softmax over key blocks,
        |             block GEMMs through BLAS or its own micro-kernels; it never raises
    src/*.h           C: SIMD exp and row operations, the GEMM micro-kernels, CPU features

Beside them: `cattn.reference` is the readable float64 NumPy definition that everything is
tested against, `cattn.bench` the benchmark (`python -m cattn.bench`), and `cattn.dask`
attention on Dask arrays, on one machine or a cluster (the optional dask extra).

The compiled core and NumPy/SciPy are loaded on first use of the API, not by
`import cattn`, so that importing the package stays cheap.
"""
import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.1.0"

if importlib.util.find_spec("cattn._kernel") is None:  # the source tree without its build
    raise ImportError(
        "cattn's compiled core (cattn._kernel) is missing next to "
        f"{__file__}: this is the source tree. Build it in place with `pip install -e .`, "
        "or run from another directory to use an installed cattn.")

if TYPE_CHECKING:  # what the lazy loader below provides, for type checkers
    from cattn import reference
    from cattn._api import merge_attention, scaled_dot_product_attention
    from cattn._varlen import varlen_attention
    from cattn._shared_prefix import shared_prefix_attention
    from cattn._dtypes import quantize_kv
    from cattn._kernel import openmp_enabled
    from cattn._cache import KVCache, PagedKVCache
    from cattn._paged import paged_attention
    from cattn._position_bias import RelativePositionBias
    from cattn._runtime import get_num_threads, set_num_threads, threads
    from cattn.layers import MultiHeadAttention

# Public name -> the module that defines it (None: the name is that submodule).
_LAZY = {
    "scaled_dot_product_attention": "cattn._api",
    "merge_attention": "cattn._api",
    "varlen_attention": "cattn._varlen",
    "shared_prefix_attention": "cattn._shared_prefix",
    "quantize_kv": "cattn._dtypes",
    "MultiHeadAttention": "cattn.layers",
    "KVCache": "cattn._cache",
    "paged_attention": "cattn._paged",
    "PagedKVCache": "cattn._cache",
    "RelativePositionBias": "cattn._position_bias",
    "openmp_enabled": "cattn._kernel",
    "set_num_threads": "cattn._runtime",
    "get_num_threads": "cattn._runtime",
    "threads": "cattn._runtime",
    "reference": None,
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cattn' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        value = importlib.import_module(f"cattn.{name}")
    else:
        # The thread runtime first: it decides how the compiled core is loaded.
        importlib.import_module("cattn._runtime")
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))


def _block_gemm(kernel: Any) -> str:
    path = kernel.isa_path()
    if kernel.calls_blas():
        return "blas"
    if path in ("amx", "avx512_bf16"):
        return f"avx512 micro-kernels, bfloat16 products on {path}"
    return f"{path} micro-kernels"


def show_config() -> Dict[str, Any]:
    """How this build runs: OpenMP, threads, the instruction-set path the kernels take
    (CATTN_ISA caps it), who computes the block GEMMs, the BLAS limiter.

    Returns
    -------
    dict
        ``version``; ``openmp`` (False: a serial build, every call on one thread);
        ``default_num_threads`` (OpenMP's default team); ``isa`` (the path calls take:
        "amx", "avx512_bf16", "avx512", "avx2" or "portable"; the first two add native
        bfloat16 products to AVX-512) and ``isa_supported`` (every path this CPU can
        run); ``isa_emulated`` (True only in a test build that runs the bfloat16 levels'
        instructions in software, CATTN_EMULATE_ISA=1: slow, never to measure); ``block_gemm`` (BLAS or cattn's own micro-kernels); ``blas_thread_control``
        (how BLAS is kept on one thread inside the kernel's threads); ``openmp_wait_policy``
        (how idle OpenMP workers wait, and who chose it); ``small_calls`` (below how
        much work a call runs on the calling thread alone: a few wake-ups of a sleeping
        worker, as measured in this process); ``bfloat16_products`` (the path
        bfloat16 block products take by default, and why: on a CPU with AVX512-BF16 but
        no AMX, measured against the widened float32 products at the first call).

    Raises
    ------
    ImportError
        When the compiled core cannot be loaded (a source tree without its build).

    See Also
    --------
    get_num_threads : the thread count a call from this thread uses by default.

    Examples
    --------
    >>> import cattn
    >>> config = cattn.show_config()
    >>> config["isa"] in config["isa_supported"]
    True
    >>> sorted(config)[:3]
    ['bfloat16_products', 'blas_thread_control', 'block_gemm']
    """
    from cattn import _runtime, _kernel
    from cattn._blas_threads import single_threaded_blas
    return {
        "version": __version__,
        "openmp": _kernel.openmp_enabled(),
        "default_num_threads": _kernel.default_num_threads(),
        "isa": _kernel.isa_path(),
        "isa_supported": list(_kernel.supported_isa_paths()),
        "isa_emulated": _kernel.isa_emulated(),
        "block_gemm": _block_gemm(_kernel),
        "blas_thread_control": single_threaded_blas.backend,
        "openmp_wait_policy": _runtime.WAIT_POLICY,
        "small_calls": _kernel.small_call_rule(),
        "bfloat16_products": dict(zip(("path", "reason"), _runtime.bf16_products())),
    }


__all__ = ["scaled_dot_product_attention", "merge_attention", "varlen_attention",
           "shared_prefix_attention", "quantize_kv", "reference",
           "MultiHeadAttention", "KVCache", "paged_attention", "PagedKVCache",
           "RelativePositionBias",
           "set_num_threads", "get_num_threads", "threads",
           "openmp_enabled", "show_config", "__version__"]

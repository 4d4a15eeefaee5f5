"""cattn: exact, fast self-attention on the CPU.

    import cattn
    out = cattn.scaled_dot_product_attention(query, key, value, is_causal=True)

`cattn.reference` holds the readable NumPy definition the kernel is tested against.
"""
try:
    from cattn._kernel import openmp_enabled
except ImportError as exc:  # the source tree without its compiled core
    raise ImportError(
        "cattn's compiled core (cattn._kernel) is missing next to "
        f"{__file__}: this is the source tree. Build it in place with `pip install -e .`, "
        "or run from another directory to use an installed cattn.") from exc
from cattn._api import merge_attention, scaled_dot_product_attention
from cattn._runtime import get_num_threads, set_num_threads, threads
from cattn import reference
from cattn.layers import KVCache, MultiHeadAttention

__version__ = "0.1.0"


def show_config():
    """How this build runs: OpenMP, threads, the instruction-set path the kernels take
    (CATTN_ISA caps it), who computes the block GEMMs, the BLAS limiter."""
    from cattn import _kernel
    from cattn._blas_threads import single_threaded_blas
    return {
        "version": __version__,
        "openmp": _kernel.openmp_enabled(),
        "default_num_threads": _kernel.default_num_threads(),
        "isa": _kernel.isa_path(),
        "isa_supported": list(_kernel.supported_isa_paths()),
        "block_gemm": "blas" if _kernel.calls_blas() else f"{_kernel.isa_path()} micro-kernels",
        "blas_thread_control": single_threaded_blas.backend,
    }


__all__ = ["scaled_dot_product_attention", "merge_attention", "reference",
           "MultiHeadAttention", "KVCache",
           "set_num_threads", "get_num_threads", "threads",
           "openmp_enabled", "show_config", "__version__"]

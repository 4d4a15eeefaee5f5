"""The validating front of the kernel: every check happens here, once per call.

A call is turned into a small plan for `cattn._kernel.attention`: one table row per
(batch..., head) item with the element offsets of its query, key, value, mask and output
matrices, its key length and where its causal diagonal lies. Broadcasting, grouped-query
heads and arbitrary strides are all expressed as offsets, so nothing is copied or
expanded, except a matrix whose last axis is not contiguous (BLAS needs unit stride there).

`scaled_dot_product_attention` runs as named steps, each one checking what it turns into
a part of the plan: operands, options, batch shape, mask, key lengths and diagonal,
window, outputs, launch.
"""
import contextlib
import math

import numpy as np

from cattn import _runtime, _kernel  # _runtime first: it loads OpenMP (wait policy)
from cattn import _dtypes
from cattn._blas_threads import single_threaded_blas
from cattn._interop import from_dlpack
from cattn._validation import (FLOAT_DTYPES as _FLOAT_DTYPES, broadcasts_to as _broadcasts_to,
                               check_flag as _check_flag,
                               check_int as _check_int, check_ndarray as _check_ndarray,
                               check_no_dropout as _check_no_dropout,
                               check_positive_float as _check_positive_float,
                               reject_masked as _reject_masked, window_pair as _window_pair)

_INT32_MAX = 2**31 - 1
# "No limit" for window sides: far beyond any index, far below int64 overflow.
_UNBOUNDED = 2**60
_ALIGNMENTS = ("top_left", "bottom_right")
_NO_LIMIT = contextlib.nullcontext()
# The kernel's MaskKind members as plain ints: an enum member lookup costs more than a tiny
# call can spare.
_MASK_NONE, _MASK_BOOL, _MASK_ADDITIVE = (int(_kernel.MaskKind.MASK_NONE),
                                         int(_kernel.MaskKind.MASK_BOOL),
                                         int(_kernel.MaskKind.MASK_ADDITIVE))
_Column = _kernel.Column
_FLOAT32, _FLOAT64 = _FLOAT_DTYPES


# ------------------------------------------------------------------ validation helpers

def _as_ndarray(x, name):
    """x, or a zero-copy NumPy view of it when it exports DLPack (a CPU torch tensor)."""
    return x if x is None or isinstance(x, np.ndarray) else from_dlpack(x, name)


def _check_array(x, name, narrow=None):
    """An array of float32 or float64; with `narrow` (an input of the attention), of float16
    or bfloat16 too, and int8 when narrow == "int8"."""
    if type(x) is not np.ndarray:  # (an exact ndarray needs neither check: the fast path)
        _check_ndarray(x, name, " of float32 or float64")
        _reject_masked(x, name)
    if x.dtype not in _FLOAT_DTYPES and not (
            narrow and (_dtypes.is_half(x.dtype) or (narrow == "int8" and
                                                     x.dtype == _dtypes.INT8))):
        kinds = ("float32 or float64" if not narrow else
                 "float32, float64, float16, bfloat16 or int8" if narrow == "int8" else
                 "float32, float64, float16 or bfloat16")
        raise TypeError(f"{name} must have dtype {kinds}, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., length, features), "
                         f"got shape {x.shape}")


def _check_softcap(x, dtype):
    """The kernel divides scores by the softcap: its reciprocal must be finite in the
    dtype too (a subnormal softcap would turn a zero score into 0·inf = NaN)."""
    x = _check_positive_float(x, "softcap", dtype)
    with np.errstate(over="ignore", divide="ignore"):
        reciprocal = dtype.type(1) / dtype.type(x)
    if not np.isfinite(reciprocal):
        raise ValueError(f"softcap must be at least about {1 / float(np.finfo(dtype).max):.3g} "
                         f"in {dtype} (1/softcap must be finite), got {x}")
    return x


def _broadcast_batch(shapes, names):
    if shapes[0] == shapes[1] == shapes[2]:  # the common case, without NumPy's machinery
        return shapes[0]
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError as e:  # incompatible sizes, or a result too large
        listed = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise ValueError(f"leading (batch) dimensions do not broadcast: {listed} ({e})"
                         ) from None


def _broadcasts_to(shape, target):
    """Whether an array of `shape` broadcasts to exactly `target`."""
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _element_strides(x):
    """Strides in elements; None when some stride is not a whole number of elements."""
    item = x.itemsize
    strides = x.strides
    for st in strides:
        if st % item:
            return None
    return tuple([st // item for st in strides])


def _blas_ready(x):
    """(x or a contiguous copy, its row stride): matrices GEMM can read in place."""
    row_stride = _kernel.gemm_row_stride(x)
    if row_stride < 0 or not x.flags.aligned:
        x = np.require(x, requirements="CA")  # (ascontiguousarray keeps misaligned data)
        row_stride = _kernel.gemm_row_stride(x)
    return x, row_stride


def _overlaps(a, b):
    """Whether a and b share memory; undecidable cases count as sharing."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return np.shares_memory(a, b, max_work=10**5)
    except np.exceptions.TooHardError:
        return True


def _has_internal_overlap(x):
    """Whether two distinct elements of x share memory (undecidable cases count as yes).

    Two elements overlap when their offsets differ by sum(d_i * stride_i) = 0 for index
    differences |d_i| < shape_i, not all 0. Most layouts are ruled out at once: sorted by
    stride, each stride exceeds the span of the smaller ones. Otherwise, an overlap whose
    last nonzero difference is on axis k is also one between x[..., 1:, 0, ..., 0] and
    x[..., :1, 0, ..., 0] (slicing axis k, later axes at 0; offsets are translation
    invariant), which NumPy's exact shares_memory decides."""
    axes = [(abs(st), n) for st, n in zip(x.strides, x.shape) if n > 1]
    if x.size == 0 or not axes:
        return False
    span = 0
    for stride, n in sorted(axes):
        if stride < x.itemsize + span:
            break
        span += stride * (n - 1)
    else:
        return False
    for k in range(x.ndim):
        if x.shape[k] < 2:
            continue
        later = (0,) * (x.ndim - k - 1)
        if _overlaps(x[(Ellipsis, slice(1, None)) + later],
                     x[(Ellipsis, slice(0, 1)) + later]):
            return True
    return False


def _per_item_integers(x, name, batch_shape, low, high, high_name=None):
    """An int, or an integer array whose axes index the leading batch axes from the left:
    one intp value per item (flattened), or the plain int when x is a scalar."""
    _reject_masked(x, name)
    values = np.asarray(x)
    if values.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {values.dtype}")
    if values.ndim > len(batch_shape) or values.shape != batch_shape[:values.ndim]:
        raise ValueError(f"{name} of shape {values.shape} must match the leading batch "
                         f"axes {batch_shape} from the left (e.g. one per sequence)")
    if values.size and (values.min() < low or values.max() > high):
        bound = high if high_name is None else f"{high_name}={high}"
        raise ValueError(f"{name} must lie in [{low}, {bound}], got values from "
                         f"{values.min()} to {values.max()}")
    if values.ndim == 0:
        return int(values)
    values = values.astype(np.intp).reshape(
        values.shape + (1,) * (len(batch_shape) - values.ndim))
    return np.broadcast_to(values, batch_shape).reshape(-1)


# Positions stay far from int64 overflow once windows (up to _UNBOUNDED) are added.
_MAX_OFFSET = 2**48 - 1


def _offset(x, name, batch_shape):
    return 0 if x is None else _per_item_integers(x, name, batch_shape, -_MAX_OFFSET,
                                                  _MAX_OFFSET)


# ---------------------------------------------------------------------- the public API

def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False,
                                 scale=None, *, enable_gqa=False, window=None,
                                 alignment="top_left", key_lengths=None, q_offset=None,
                                 k_offset=None, softcap=None, sinks=None, keep_first=None,
                                 return_lse=False, return_weights=False, out=None,
                                 num_threads=None, dropout_p=0.0, k_scale=None, v_scale=None,
                                 out_dtype=None, _block_sizes=None, _isa=None):
    """Exact attention softmax(Q·Kᵀ·scale + mask)·V, computed tile by tile.

    Parameters
    ----------
    query : ndarray (..., L, E), float32 or float64 (or float16, bfloat16)
    key : ndarray (..., S, E), same dtype (or float16, bfloat16, int8)
    value : ndarray (..., S, Ev), same dtype (or float16, bfloat16, int8)
        float64 inputs compute in float64. Any mix of float32, float16 and bfloat16
        (`ml_dtypes.bfloat16`) computes in float32: scores, softmax and sums in float32,
        keys and values read in their own type (half the bytes of float32), the query
        converted. int8 keys or values need their scales (`k_scale`, `v_scale`).
        Leading dimensions broadcast as in NumPy. Any strides are accepted. Objects with
        `__dlpack__` (CPU PyTorch tensors; also for attn_mask and out) are used in place,
        without a copy.
    attn_mask : ndarray, optional
        Broadcastable to (..., L, S). Boolean: True means the key takes part (as in
        PyTorch). Float: added to the scaled scores (-inf excludes a key). Never expanded.
    is_causal : bool
        Mask keys after the query's position, on the diagonal chosen by `alignment`.
    scale : float, optional
        Multiplies Q·Kᵀ; defaults to 1/sqrt(E).
    enable_gqa : bool
        Grouped-query attention: query heads (axis -3) Hq, key/value heads Hkv with
        Hq % Hkv == 0; query head h uses key/value head h // (Hq // Hkv). Nothing is copied.
    window : (left, right), optional
        Sliding-window attention: query i sees keys j with i - left <= j <= i + right
        (relative to the diagonal); either side may be None for no limit.
    alignment : "top_left" or "bottom_right"
        Where the diagonal of `is_causal` and `window` lies when L != S. "top_left"
        (PyTorch's is_causal): query i is aligned with key i. "bottom_right": the last
        query is aligned with the last (valid) key, as a KV cache or chunked prefill needs.
    key_lengths : int or integer array, optional
        Valid keys per batch item; keys at or past the length are ignored. Its axes index
        the leading batch axes from the left, so a (B,) array with (B, H, L, E) queries
        gives one length per sequence. With "bottom_right", the diagonal follows each
        item's own length.
    q_offset, k_offset : int or integer array, optional
        Global positions of the first query and of the first key (default 0), for a block
        cut from a longer sequence: `is_causal` and `window` then compare global positions,
        so query i sees key j when k_offset + j lies in [q_offset + i - left,
        q_offset + i + right]. Broadcast like key_lengths (one per sequence, say); any
        integers, negative ones included, of magnitude below 2**48. They need
        alignment="top_left" (the diagonal they give is global: for a bottom-right one,
        add the item's key length minus L to q_offset).
    softcap : float, optional
        Scores become softcap·tanh(scores/softcap) before the mask (Gemma 2).
    sinks : array, optional
        Attention sinks (gpt-oss): one logit per query head, shape (Hq,), or any shape
        that broadcasts to the batch shape (..., Hq). Each row's softmax denominator gains
        exp(sink - max): the sink takes probability mass but adds no value, so weights
        rows sum to less than 1 and a row that sees no key gets output 0 and lse = sink.
        The sink is compared with the final scores (scaled, capped, masked); the softcap
        does not apply to it. -inf means no sink for that head.
    keep_first : int, optional
        StreamingLLM's sink tokens: the first keep_first keys of the sequence (global
        positions 0 .. keep_first - 1, see k_offset) stay visible to every query whatever
        the left side of `window`; the right side (and is_causal) still applies.
    return_lse : bool
        Also return the natural-log sum of exp of each row's scores, shape (..., L).
    return_weights : bool
        Also return the attention weights (..., L, S); each visible row sums to 1.
    out : ndarray, optional
        Preallocated output of shape (..., L, Ev) and the inputs' dtype (any strides).
    num_threads : int, optional
        Threads for this call; defaults to OpenMP's (OMP_NUM_THREADS or all cores).
    dropout_p : float
        Accepted for PyTorch compatibility; must be 0 (cattn computes inference).
    k_scale, v_scale : ndarray, optional
        With int8 keys (values): float32 scales broadcastable to key.shape[:-1] (...,
        S), one per key and head; key j stands for key[..., j, :] * k_scale[..., j]
        (`cattn.quantize_kv` returns both). The kernel applies them to the scores and the
        probabilities, never dequantizing the keys or values.
    out_dtype : dtype, optional
        The output's dtype when computing in float32: float32, float16 or bfloat16
        (default: the query's, or `out`'s). Weights take it too; lse is float32.

    Returns
    -------
    out : ndarray (..., L, Ev)
        Alone, or first of a tuple (out, weights), (out, lse) or (out, weights, lse) when
        `return_weights` and/or `return_lse` ask for them.

    A query row that sees no key at all (fully masked) gets output 0 and lse -inf.
    Ctrl-C interrupts a long call within about 0.1 s with KeyboardInterrupt; `out` then
    holds NaN, never a partial result.

    `_block_sizes=(block_q, block_k)` and `_isa="avx512"|"avx2"|"portable"` are private
    hooks for the tests: the result must not depend on either, beyond rounding.

    Raises
    ------
    TypeError
        An input that is not an array of float32 or float64, dtypes that differ, an option
        of the wrong type; each message says what was expected and what came.
    ValueError
        Shapes that do not fit together or do not broadcast, an option out of its range
        (a window side below 0, a key length past S, dropout_p other than 0, ...).
    MemoryError
        When the output or the scratch cannot be allocated.

    See Also
    --------
    merge_attention : combine results over chunks of keys (with `return_lse=True`).
    MultiHeadAttention : the layer with projections, PyTorch's masks and a KV cache.
    cattn.reference.scaled_dot_product_attention : the readable NumPy definition.

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 6, 8), dtype=np.float32)  # (batch, heads, L, E)
    >>> k = rng.standard_normal((2, 4, 6, 8), dtype=np.float32)
    >>> v = rng.standard_normal((2, 4, 6, 8), dtype=np.float32)
    >>> out = cattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape, out.dtype
    ((2, 4, 6, 8), dtype('float32'))

    The first query sees only the first key, so its output is the first value:

    >>> bool(np.allclose(out[..., 0, :], v[..., 0, :]))
    True

    Weights and log-sum-exp come with the output when asked for; each row sums to 1:

    >>> out, weights, lse = cattn.scaled_dot_product_attention(
    ...     q, k, v, window=(2, 0), return_weights=True, return_lse=True)
    >>> weights.shape, lse.shape, bool(np.allclose(weights.sum(axis=-1), 1))
    ((2, 4, 6, 6), (2, 4, 6), True)
    """
    query, key, value, L, S, E, Ev = _operands(query, key, value)
    dtype = query.dtype
    out = _as_ndarray(out, "out")
    narrow = None
    if not (key.dtype is dtype and value.dtype is dtype and k_scale is None and  # (fast)
            v_scale is None and out_dtype is None and out is None and
            (dtype is _FLOAT32 or dtype is _FLOAT64)):
        if (key.dtype != dtype or value.dtype != dtype or dtype not in _FLOAT_DTYPES
                or k_scale is not None or v_scale is not None or out_dtype is not None
                or (isinstance(out, np.ndarray) and _dtypes.is_half(out.dtype))):
            query, narrow = _narrow_storage(query, key, value, k_scale, v_scale, out_dtype,
                                            out)
            dtype = query.dtype
    (is_causal, enable_gqa, return_lse, return_weights, scale, softcap,
     num_threads) = _options(is_causal, enable_gqa, return_lse, return_weights, dropout_p,
                             scale, softcap, alignment, num_threads, dtype, E, S)
    batch_shape, group = _batch_shape(query, key, value, enable_gqa)
    attn_mask = _as_ndarray(attn_mask, "attn_mask")
    mask_plan = _mask_plan(attn_mask, batch_shape, L, S, dtype)
    kv_len, diag = _key_lengths_and_diagonal(key_lengths, q_offset, k_offset, alignment,
                                             batch_shape, L, S)
    win_left, win_right = _window(window, is_causal)
    keep = 0 if keep_first is None else _kept_first_keys(keep_first, k_offset, batch_shape, S)
    sink_logits = None if sinks is None else _sink_logits(sinks, batch_shape, dtype)
    user_out = None
    if narrow is not None and narrow.result_dtype != dtype:
        # the kernel writes float32, rounded once to the result's dtype afterwards
        if out is not None:
            _check_out(out, batch_shape + (L, Ev), narrow.result_dtype,
                       (query, key, value, attn_mask))
        user_out, out = out, None
    out, out_rs, out_cs, lse, weights = _outputs(
        out, batch_shape, L, S, Ev, dtype, return_lse, return_weights,
        (query, key, value, attn_mask))
    _launch(query, key, value, out, lse, weights, mask_plan, batch_shape, group, kv_len,
            diag, out_rs, out_cs, win_left, win_right, scale, softcap, num_threads,
            return_weights, _block_sizes, _isa, keep, sink_logits, narrow)
    if narrow is not None and narrow.result_dtype != dtype:
        out, weights = narrow.results(out, weights, user_out)
    return _results(out, weights, lse)


def _results(out, weights, lse):
    """out alone, or the tuple of out with the weights and/or lse that were asked for."""
    if weights is None:
        return out if lse is None else (out, lse)
    return (out, weights) if lse is None else (out, weights, lse)


# ------------------------------------------------------------------------- the steps

def _operands(query, key, value):
    """query, key and value as arrays of one float dtype whose sizes fit together, and
    those sizes: (query, key, value, L, S, E, Ev)."""
    query = _as_ndarray(query, "query")
    key = _as_ndarray(key, "key")
    value = _as_ndarray(value, "value")
    _check_array(query, "query", "half")
    _check_array(key, "key", "int8")
    _check_array(value, "value", "int8")
    L, E = query.shape[-2:]
    S, E_k = key.shape[-2:]
    S_v, Ev = value.shape[-2:]
    if E_k != E:
        raise ValueError(f"query and key must have the same feature size E (last axis), "
                         f"got query {query.shape} and key {key.shape}")
    if S_v != S:
        raise ValueError(f"key and value must have the same number of keys S (axis -2), "
                         f"got key {key.shape} and value {value.shape}")
    if E == 0 or Ev == 0:
        raise ValueError(f"query/key and value need at least one feature (last axis), got "
                         f"E = {E} and Ev = {Ev}")
    if E > _INT32_MAX or Ev > _INT32_MAX:  # before anything is allocated or copied
        raise ValueError(f"feature sizes must be < 2**31 (BLAS dimensions are 32-bit ints), "
                         f"got E = {E} and Ev = {Ev}")
    return query, key, value, L, S, E, Ev


class _NarrowStorage:
    """A float32 computation on float16, bfloat16 or int8 keys/values or queries: how the
    kernel reads K and V, int8's scales, and the dtype of the result."""

    def __init__(self, key, value, k_scale, v_scale, result_dtype, query_bf16=False):
        self.k_scale = _dtypes.scales_for(k_scale, "k_scale", key, "key")
        self.v_scale = _dtypes.scales_for(v_scale, "v_scale", value, "value")
        self.kv_storage = (_dtypes.element_code(key.dtype), _dtypes.element_code(value.dtype),
                           self.k_scale, self.v_scale)
        self.result_dtype = result_dtype
        self.query_bf16 = query_bf16  # (its float32 copy is exact in bfloat16 products)

    def results(self, out, weights, user_out):
        """The float32 output (and weights) rounded to the result dtype (into user_out)."""
        if user_out is not None:
            np.copyto(user_out, out, casting="unsafe")
            out = user_out
        else:
            out = out.astype(self.result_dtype)
        if weights is not None:
            weights = weights.astype(self.result_dtype)
        return out, weights


def _narrow_storage(query, key, value, k_scale, v_scale, out_dtype, out):
    """(query as float32, _NarrowStorage) for inputs that mix float32, float16, bfloat16
    and int8 (or ask for such an output); float64 never mixes."""
    dtypes = (query.dtype, key.dtype, value.dtype)
    if any(d == np.float64 for d in dtypes):
        if not dtypes[0] == dtypes[1] == dtypes[2]:
            raise TypeError(f"query, key and value must have the same dtype, got "
                            f"{dtypes[0]}, {dtypes[1]} and {dtypes[2]} (float64 does not "
                            f"mix; float32, float16, bfloat16 and int8 may)")
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale and v_scale are only for int8 keys and values, got "
                             "float64 ones")
        if out_dtype is not None and _dtypes.result_dtype_or_none(out_dtype) != np.float64:
            raise TypeError(f"float64 inputs give a float64 output, got out_dtype "
                            f"{out_dtype!r}")
        if isinstance(out, np.ndarray) and _dtypes.is_half(out.dtype):
            raise TypeError(f"out must have dtype float64 with float64 inputs, got "
                            f"{out.dtype}")
        return query, None
    _dtypes.check_input_dtype(query, "query", False)
    if out_dtype is not None:
        result = _dtypes.result_dtype(out_dtype, "out_dtype")
        if out is not None and isinstance(out, np.ndarray) and out.dtype != result:
            raise ValueError(f"out has dtype {out.dtype} but out_dtype is {result}: give "
                             f"one of them, or the same")
    elif isinstance(out, np.ndarray):
        result = _dtypes.result_dtype(out.dtype, "out's dtype")
    else:
        result = query.dtype
    narrow = _NarrowStorage(key, value, k_scale, v_scale, result,
                            query_bf16=_dtypes.is_bfloat16(query.dtype))
    return query.astype(np.float32, copy=False), narrow


def _options(is_causal, enable_gqa, return_lse, return_weights, dropout_p, scale, softcap,
             alignment, num_threads, dtype, E, S):
    """The flags as bools, the scale and softcap as floats, the thread count as an int."""
    # (the checks run only for values other than False, the default: a tiny call's cost)
    if is_causal is not False:
        is_causal = _check_flag(is_causal, "is_causal")
    if enable_gqa is not False:
        enable_gqa = _check_flag(enable_gqa, "enable_gqa")
    if return_lse is not False:
        return_lse = _check_flag(return_lse, "return_lse")
    if return_weights is not False:
        return_weights = _check_flag(return_weights, "return_weights")
    _check_no_dropout(dropout_p)
    if return_weights and S > _INT32_MAX:
        raise ValueError(f"return_weights needs S < 2**31 keys (a weights row is one BLAS "
                         f"matrix with 32-bit dimensions), got S = {S}")
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    else:
        scale = _check_positive_float(scale, "scale", dtype)
    softcap = 0.0 if softcap is None else _check_softcap(softcap, dtype)
    if not isinstance(alignment, str) or alignment not in _ALIGNMENTS:
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    if num_threads is None:
        num_threads = _runtime.get_num_threads()
    else:
        num_threads = _check_int(num_threads, "num_threads", 1)
    return is_causal, enable_gqa, return_lse, return_weights, scale, softcap, num_threads


def _batch_shape(query, key, value, enable_gqa):
    """The broadcast batch shape of the items (heads last with enable_gqa) and the number
    of query heads per key/value head."""
    names = ("query", "key", "value")
    if not enable_gqa:
        return _broadcast_batch([x.shape[:-2] for x in (query, key, value)], names), 1
    for name, x in zip(names, (query, key, value)):
        if x.ndim < 3:
            raise ValueError(f"enable_gqa needs a head axis (-3): {name} has shape "
                             f"{x.shape}")
    Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if Hk != Hv:
        raise ValueError(f"key and value must have the same number of heads, got "
                         f"{Hk} and {Hv}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"enable_gqa needs query heads to be a multiple of key/value "
                         f"heads, got {Hq} query heads and {Hk} key/value heads")
    outer = _broadcast_batch([x.shape[:-3] for x in (query, key, value)], names)
    return outer + (Hq,), Hq // Hk


def _mask_plan(attn_mask, batch_shape, L, S, dtype):
    """(mask array or None, its MaskKind, its row and column strides in elements): a
    boolean mask is read as bytes, a float one in the inputs' dtype; neither is expanded."""
    if attn_mask is None:
        return None, _MASK_NONE, 0, 0
    _check_ndarray(attn_mask, "attn_mask", " (bool or float)")
    _reject_masked(attn_mask, "attn_mask")
    full = batch_shape + (L, S)
    if attn_mask.ndim < 2:
        raise ValueError(f"attn_mask must have at least 2 dimensions (L, S) "
                         f"broadcastable to {full}, got shape {attn_mask.shape}")
    if not _broadcasts_to(attn_mask.shape, full):
        raise ValueError(f"attn_mask of shape {attn_mask.shape} does not broadcast to "
                         f"the attention shape (..., L, S) = {full}")
    if attn_mask.dtype == np.bool_:
        kind, mask = _MASK_BOOL, attn_mask.view(np.uint8)
    elif attn_mask.dtype.kind == "f":
        kind, mask = _MASK_ADDITIVE, attn_mask.astype(dtype, copy=False)
    else:
        raise TypeError(f"attn_mask must be boolean (True = attend) or floating "
                        f"(added to the scores), got dtype {attn_mask.dtype}")
    m_strides = _element_strides(mask)
    if m_strides is None or not mask.flags.aligned:
        mask = np.require(mask, requirements="CA")
        m_strides = _element_strides(mask)
    return (mask, kind, m_strides[-2] if mask.shape[-2] > 1 else 0,
            m_strides[-1] if mask.shape[-1] > 1 else 0)


def _key_lengths_and_diagonal(key_lengths, q_offset, k_offset, alignment, batch_shape, L,
                              S):
    """(valid keys, key index of query 0's diagonal): ints, or one intp per item."""
    kv_len = (S if key_lengths is None else
              _per_item_integers(key_lengths, "key_lengths", batch_shape, 0, S, "S"))
    diag = kv_len - L if alignment == "bottom_right" else 0
    if q_offset is not None or k_offset is not None:
        if alignment != "top_left":
            raise ValueError("q_offset and k_offset give global positions, which place the "
                             "diagonal themselves: use alignment='top_left' (for a "
                             "bottom-right diagonal, add key length - L to q_offset)")
        diag = _offset(q_offset, "q_offset", batch_shape) - \
            _offset(k_offset, "k_offset", batch_shape)
    return kv_len, diag


def _window(window, is_causal):
    """(left, right) sides of the visible band around the diagonal; causal closes the
    right side."""
    win_left, win_right = _UNBOUNDED, _UNBOUNDED
    if window is not None:
        left, right = _window_pair(window)
        # (a side beyond any index is no limit: clamped, it stays a C integer)
        if left is not None:
            win_left = min(_check_int(left, "window left", 0), _UNBOUNDED)
        if right is not None:
            win_right = min(_check_int(right, "window right", 0), _UNBOUNDED)
    if is_causal:
        win_right = 0
    return win_left, win_right


def _kept_first_keys(keep_first, k_offset, batch_shape, S):
    """How many leading keys of each item are the sequence's first keep_first positions
    (an int, or one intp per item when k_offset varies)."""
    keep_first = _check_int(keep_first, "keep_first", 0, "a non-negative integer")
    kept = min(keep_first, _MAX_OFFSET) - _offset(k_offset, "k_offset", batch_shape)
    return np.clip(kept, 0, S) if isinstance(kept, np.ndarray) else min(max(kept, 0), S)


def _sink_logits(sinks, batch_shape, dtype):
    """One sink logit per item, contiguous in the operands' dtype."""
    sinks = _as_ndarray(sinks, "sinks")
    if not isinstance(sinks, np.ndarray):
        try:
            sinks = np.asarray(sinks)
        except (TypeError, ValueError):
            raise TypeError(f"sinks must be an array of floats, one per query head, got "
                            f"{type(sinks).__name__}") from None
    _reject_masked(sinks, "sinks")
    if sinks.dtype.kind != "f":
        raise TypeError(f"sinks must be floating-point logits, one per query head, got "
                        f"dtype {sinks.dtype}")
    if not _broadcasts_to(sinks.shape, batch_shape):
        heads = f"(Hq,) = ({batch_shape[-1]},)" if batch_shape else "()"
        raise ValueError(f"sinks of shape {sinks.shape} must hold one logit per query head, "
                         f"{heads}, or broadcast to the batch shape {batch_shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        logits = np.broadcast_to(sinks, batch_shape).astype(dtype).reshape(-1)
    if np.isnan(logits).any() or np.isposinf(logits).any():
        bad = logits[np.isnan(logits) | np.isposinf(logits)][0]
        raise ValueError(f"sinks must be finite in {dtype} (or -inf: no sink for that "
                         f"head), got {bad} after conversion to {dtype}")
    return logits


def _outputs(out, batch_shape, L, S, Ev, dtype, return_lse, return_weights, inputs):
    """(out, its row and column strides in elements, lse or None, weights or None)."""
    out_shape = batch_shape + (L, Ev)
    if out is None:
        out = np.empty(out_shape, dtype=dtype)
        out_rs, out_cs = Ev, 1
    else:
        out_rs, out_cs = _check_out(out, out_shape, dtype, inputs)[-2:]
    lse = np.empty(batch_shape + (L,), dtype=dtype) if return_lse else None
    weights = np.zeros(batch_shape + (L, S), dtype=dtype) if return_weights else None
    return out, out_rs, out_cs, lse, weights


def _check_out(out, out_shape, dtype, inputs):
    """A user's `out`: writable, of the right shape and dtype, sharing no memory with the
    inputs or within itself. Returns its strides in elements."""
    _check_ndarray(out, "out")
    if out.shape != out_shape or out.dtype != dtype:
        raise ValueError(f"out must have shape {out_shape} and dtype {dtype}, got "
                         f"shape {out.shape} and dtype {out.dtype}")
    _reject_masked(out, "out")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, x in zip(("query", "key", "value", "attn_mask"), inputs):
        if x is not None and _overlaps(out, x):
            raise ValueError(f"out overlaps {name}: the output must not share memory "
                             f"with an input")
    strides = _element_strides(out)
    if strides is None or not out.flags.aligned:
        raise ValueError("out must be aligned, with strides that are multiples of its "
                         "item size")
    if _has_internal_overlap(out):
        raise ValueError(f"out has overlapping elements (two of its elements share "
                         f"memory: strides {out.strides} for shape {out.shape})")
    return strides


def _launch(query, key, value, out, lse, weights, mask_plan, batch_shape, group, kv_len,
            diag, out_rs, out_cs, win_left, win_right, scale, softcap, num_threads,
            weights_mode, block_sizes, isa, keep=0, sinks=None, narrow=None):
    """Operands GEMM can read, the per-item table, block sizes and key splits; then the
    kernel, with BLAS kept on one thread inside its OpenMP team."""
    query, q_rs = _blas_ready(query)
    key, k_rs = _blas_ready(key)
    value, v_rs = _blas_ready(value)
    if sinks is not None and sinks.dtype != query.dtype:  # the kernel's compute dtype
        sinks = sinks.astype(query.dtype)
    mask, mask_kind, mask_rs, mask_cs = mask_plan
    table = _table(query, key, value, out, mask, batch_shape, group, kv_len, diag, keep,
                   narrow)
    L, E = query.shape[-2:]
    S, Ev = value.shape[-2:]
    isa = _kernel.default_isa_index() if isa is None else _kernel.isa_index(isa)
    block_q, block_k = (_choose_block_sizes(L, S, isa) if block_sizes is None
                        else _checked_block_sizes(block_sizes))
    n_q_blocks = -(-L // block_q)
    n_splits, split_keys = _key_splits(n_q_blocks, S, block_k, weights_mode)
    n_items = table.shape[0]
    n_tasks = n_items * n_q_blocks * n_splits
    threads = _runtime.team_size(min(num_threads, n_tasks))
    partials = (np.empty((n_splits, n_items, L, Ev + 2), dtype=out.dtype) if n_splits > 1
                else None)
    with single_threaded_blas if _kernel.calls_blas(isa) else _NO_LIMIT:
        _kernel.attention(query, key, value, out, lse, weights, mask, partials, table,
                          shape=(L, S, E, Ev),
                          strides=(q_rs, k_rs, v_rs, out_rs, out_cs, mask_rs, mask_cs),
                          variant=(mask_kind, win_left, win_right, scale, softcap,
                                   weights_mode),
                          blocks=(block_q, block_k, n_splits, split_keys),
                          run=(threads, isa), sinks=sinks,
                          kv_storage=None if narrow is None else narrow.kv_storage,
                          bf16_query=narrow is not None and narrow.query_bf16)


def _table(query, key, value, out, mask, batch_shape, group, kv_len, diag, keep=0,
           narrow=None):
    """One row per item: where its matrices start (in elements), its key length, its
    diagonal, how many of its first keys stay visible outside the window and where its
    int8 scales start."""
    table = np.empty((math.prod(batch_shape), _kernel.TABLE_COLUMNS), dtype=np.intp)
    _kernel.fill_offsets(table, _Column.Q, query, batch_shape)
    _kernel.fill_offsets(table, _Column.K, key, batch_shape, group)
    _kernel.fill_offsets(table, _Column.V, value, batch_shape, group)
    _kernel.fill_offsets(table, _Column.OUT, out, batch_shape)
    _kernel.fill_offsets(table, _Column.MASK, mask, batch_shape)
    _kernel.fill_column(table, _Column.KV_LEN, kv_len)
    _kernel.fill_column(table, _Column.DIAG, diag)
    _kernel.fill_column(table, _Column.KEEP_FIRST, keep)
    if narrow is not None:  # (without scales the kernel never reads these columns)
        _kernel.fill_offsets(table, _Column.K_SCALE, narrow.k_scale, batch_shape, group)
        _kernel.fill_offsets(table, _Column.V_SCALE, narrow.v_scale, batch_shape, group)
    return table


def _choose_block_sizes(L, S, isa):
    """Query rows per task and keys per block."""
    block_q = min(max(L, 1), 128)
    block_k = min(max(S, 1), 256)
    return block_q, block_k


def _checked_block_sizes(sizes):
    block_q, block_k = sizes
    return _check_int(block_q, "block_q", 1), _check_int(block_k, "block_k", 1)


# An item with few query blocks (decoding, short chunks) against many keys: split its keys
# into chunks of at least _MIN_SPLIT_KEYS, aiming at _MIN_TASKS tasks per item, so that the
# cores stay busy when a few heads decode against a long cache. The rule looks at one
# item's shape only, never at the number of items or threads: each item is computed
# bitwise alike whatever the thread count and whichever other heads share the call (a
# call on some of the heads equals those heads of the full call, as sharding needs).
_FEW_Q_BLOCKS = 2
_MIN_TASKS = 16
_MIN_SPLIT_KEYS = 512


def _key_splits(n_q_blocks, S, block_k, weights_mode):
    """(number of chunks of keys, keys per chunk: a multiple of block_k)."""
    if (weights_mode or n_q_blocks == 0 or n_q_blocks > _FEW_Q_BLOCKS
            or S < 2 * _MIN_SPLIT_KEYS):
        return 1, S
    n_splits = min(-(-_MIN_TASKS // n_q_blocks), S // _MIN_SPLIT_KEYS)
    split_keys = -(-S // n_splits)
    split_keys = -(-split_keys // block_k) * block_k
    return -(-S // split_keys), split_keys


def merge_attention(outputs, lses):
    """Combine attention results over disjoint chunks of keys into the result over all.

    Parameters
    ----------
    outputs : sequence of ndarrays (..., L, Ev)
        One per chunk of keys, all of one shape and dtype (float32, float64, float16 or
        bfloat16).
    lses : sequence of ndarrays (..., L)
        The matching log-sum-exps (`return_lse=True`), of the outputs' dtype (float32
        for float16 or bfloat16 outputs, as `scaled_dot_product_attention` returns them).

    Returns
    -------
    out : ndarray (..., L, Ev), the outputs' dtype
    lse : ndarray (..., L), float32 for float16 and bfloat16 outputs (merged in float32)
        Exactly what one call over the union of the keys returns, up to rounding. Each
        chunk is weighted by exp(lse_chunk - lse_total); chunks in which a row sees no key
        (lse -inf) contribute nothing, and a row that sees no key in any chunk gets output
        0 and lse -inf. NaN or inf in an output propagate to the rows that use it (NaN
        where its weight is 0), without a NumPy warning.

    Raises
    ------
    TypeError
        Arguments that are not sequences of arrays, or arrays of other dtypes.
    ValueError
        No chunk, a different number of outputs and lses, shapes that do not match, or an
        lse of +inf or NaN (no log-sum-exp of finite scores: that chunk's scores
        overflowed).

    See Also
    --------
    scaled_dot_product_attention : computes each chunk's output and lse.

    Examples
    --------
    Attention over 10 keys, computed as two chunks of 4 and 6 keys and merged:

    >>> import numpy as np
    >>> import cattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((3, 5, 8))
    >>> k = rng.standard_normal((3, 10, 8))
    >>> v = rng.standard_normal((3, 10, 8))
    >>> parts = [cattn.scaled_dot_product_attention(q, k[:, s], v[:, s], return_lse=True)
    ...          for s in (slice(0, 4), slice(4, 10))]
    >>> out, lse = cattn.merge_attention([o for o, _ in parts], [l for _, l in parts])
    >>> bool(np.allclose(out, cattn.scaled_dot_product_attention(q, k, v)))
    True
    """
    outputs, lses = _merge_operands(outputs, lses)
    result_dtype = outputs[0].dtype
    if result_dtype not in _FLOAT_DTYPES:  # float16, bfloat16: merged in float32
        outputs = [o.astype(np.float32) for o in outputs]
    dtype = outputs[0].dtype
    lse_stack = np.stack(lses).astype(dtype, copy=False)
    if not (lse_stack < np.inf).all():  # (NaN fails the comparison too)
        raise ValueError("lses must be finite or -inf (a row that sees no key in that "
                         "chunk), got +inf or NaN")
    lse_max = lse_stack.max(axis=0)
    safe_max = np.where(np.isfinite(lse_max), lse_max, 0).astype(dtype)
    # exp(-inf) = 0 weighs an empty chunk, log(0) = -inf is a row that sees nothing; a
    # non-finite output propagates as NumPy would, without its warning
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        chunk_weights = np.exp(lse_stack - safe_max)
        total = chunk_weights.sum(axis=0)
        out = np.zeros_like(outputs[0])
        for o, w in zip(outputs, chunk_weights):
            out += o * w[..., None]
        np.divide(out, total[..., None], out=out, where=total[..., None] != 0)
        lse = (safe_max + np.log(total)).astype(dtype)
    return out.astype(result_dtype, copy=False), lse


def _merge_operands(outputs, lses):
    """outputs and lses as lists of matching arrays of one dtype, at least one of each."""
    if isinstance(outputs, np.ndarray) or isinstance(lses, np.ndarray):
        raise TypeError("outputs and lses must be sequences (lists) of arrays, one per chunk")
    try:
        outputs, lses = list(outputs), list(lses)
    except TypeError:
        raise TypeError(f"outputs and lses must be sequences (lists) of arrays, one per "
                        f"chunk, got {type(outputs).__name__} and {type(lses).__name__}"
                        ) from None
    if not outputs or len(outputs) != len(lses):
        raise ValueError(f"need one lse per output and at least one chunk, got "
                         f"{len(outputs)} outputs and {len(lses)} lses")
    for o, s in zip(outputs, lses):
        _check_array(o, "each output", "half")
        if not isinstance(s, np.ndarray) or not (
                s.dtype == o.dtype or (_dtypes.is_half(o.dtype) and s.dtype == np.float32)):
            raise TypeError("each lse must be an ndarray of its output's dtype (float32 for "
                            "float16 or bfloat16 outputs)")
        if s.shape != o.shape[:-1] or o.shape != outputs[0].shape:
            raise ValueError(f"outputs must all have one shape (..., L, Ev) and lses "
                             f"(..., L); got output {o.shape} with lse {s.shape}")
    if any(o.dtype != outputs[0].dtype for o in outputs):
        raise TypeError("all outputs must have the same dtype")
    return outputs, lses

"""The padded entry point: every check happens at the front, once per call.

A call is turned into a plan for `cattn._kernel.attention` (see cattn._plan): one table
row per (batch..., head) item with the element offsets of its query, key, value, mask and
output matrices, its key length and where its causal diagonal lies. Broadcasting, grouped-query
heads and arbitrary strides are all expressed as offsets, so nothing is copied or
expanded, except a matrix whose last axis is not contiguous (BLAS needs unit stride there).

`scaled_dot_product_attention` runs the plan's steps (storage, options, mask, kept keys
and sinks, outputs, launch) around its own: operands, batch shape, key lengths and
diagonal, and the padded layout's table.
"""

import numpy as np

from cattn import _kernel, _dtypes
from cattn._plan import (FLOAT_DTYPES as _FLOAT_DTYPES, INT32_MAX as _INT32_MAX,
                         MAX_OFFSET as _MAX_OFFSET, Plan, launch,
                         as_ndarray as _as_ndarray, check_array as _check_array,
                         blas_ready as _blas_ready, offset as _offset,
                         per_item_integers as _per_item_integers,
                         sink_logits as _sink_logits)  # (the last two: for dask, layers)


# ------------------------------------------------------------------ validation helpers

def _broadcast_batch(shapes, names):
    if shapes[0] == shapes[1] == shapes[2]:  # the common case, without NumPy's machinery
        return shapes[0]
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError as e:  # incompatible sizes, or a result too large
        listed = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise ValueError(f"leading (batch) dimensions do not broadcast: {listed} ({e})"
                         ) from None


# ---------------------------------------------------------------------- the public API

def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False,
                                 scale=None, *, enable_gqa=False, window=None,
                                 alignment="top_left", key_lengths=None, q_offset=None,
                                 k_offset=None, softcap=None, sinks=None, keep_first=None,
                                 alibi_slopes=None, return_lse=False, return_weights=False,
                                 return_key_mass=False, position_bias=None, out=None,
                                 num_threads=None, dropout_p=0.0, k_scale=None, v_scale=None,
                                 out_dtype=None, _block_sizes=None, _isa=None,
                                 _heads_last=False):
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
    alibi_slopes : array (Hq,) or (B, Hq), optional
        ALiBi (attention with linear biases): one slope per query head (or per sequence
        and head), float32 (float64 inputs may give float64). Query i and key j at
        global positions p_i and p_j get the bias -slope·|p_i - p_j| added to their
        scaled (and capped) scores, with the mask; p_i - p_j = i + diag - j on the
        diagonal of `alignment` and the offsets. Computed inside the kernel from the
        positions, never stored. This is FlashAttention's `alibi_slopes` (its
        non-causal bias -slope·|i + S - L - j| is the bottom-right case); under a causal
        mask FlashAttention adds slope·j instead, which differs by a constant per row:
        the same output, its lse higher by slope·(i + S - L).
    position_bias : cattn.RelativePositionBias, optional
        T5's bucketed relative position bias (one learned value per head and bucket of
        the key - query distance, global positions as for alibi_slopes), looked up per
        block in the kernel: no (H, L, S) bias array. Heads on the batch shape's last axis.
    return_lse : bool
        Also return the natural-log sum of exp of each row's scores, shape (..., L).
    return_weights : bool
        Also return the attention weights (..., L, S); each visible row sums to 1.
    return_key_mass : bool or "kv_heads"
        Also return the attention mass of each key, (..., S): the sum over the call's
        queries of the key's weight (what H2O-style KV-cache eviction ranks keys by),
        float32 (float64 for float64 inputs). Computed in the kernel from each block of
        query rows once its softmax is final, without the (..., L, S) weights: its memory
        is (..., ceil(L / 128), S) partial sums, added in a fixed order (bitwise the same
        result for any thread count). Keys are then not split into chunks.
        "kv_heads": one row per key/value head, (..., Hkv, S), summed over the Hq // Hkv
        query heads that share it under enable_gqa (a cache that keeps one K/V per
        key/value head evicts by it); without grouping, the same as True.
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
        `return_weights` and/or `return_lse` ask for them; the key mass comes last, when
        asked for.

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
    plan = Plan(query, key, value, out, k_scale, v_scale, out_dtype)
    plan.set_options(is_causal, enable_gqa, return_lse, return_weights, dropout_p, scale,
                     softcap, alignment, window, num_threads, _block_sizes, _isa, E, S,
                     return_key_mass)
    batch_shape, group = _batch_shape(query, key, value, plan.enable_gqa)
    if attn_mask is not None:
        attn_mask = _as_ndarray(attn_mask, "attn_mask")
        plan.set_mask(attn_mask, batch_shape, L, S)
    kv_len, diag = _key_lengths_and_diagonal(key_lengths, q_offset, k_offset, alignment,
                                             batch_shape, L, S)
    plan.set_extras(keep_first, k_offset, sinks, batch_shape, S, alibi_slopes, position_bias)
    plan.set_outputs(batch_shape + (L, Ev), batch_shape + (L,), batch_shape + (L, S),
                     (("query", query), ("key", key), ("value", value),
                      ("attn_mask", attn_mask)), batch_shape + (S,), group,
                     heads_last=_heads_last)
    _padded_layout(plan, batch_shape, group, kv_len, diag, L, S, E, Ev)
    launch(plan)
    return plan.results()


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


def _padded_layout(plan, batch_shape, group, kv_len, diag, L, S, E, Ev):
    """Operands GEMM can read in place (or contiguous copies) and one table row per item:
    where its matrices start (in elements), its key length, its diagonal, how many of its
    first keys stay visible outside the window and where its int8 scales start."""
    query, plan.q_rs = _blas_ready(plan.query)
    key, plan.k_rs = _blas_ready(plan.key)
    value, plan.v_rs = _blas_ready(plan.value)
    plan.query, plan.key, plan.value = query, key, value
    plan.L, plan.S, plan.E, plan.Ev = L, S, E, Ev
    plan.longest_keys = S
    narrow = plan.narrow
    plan.table = _kernel.padded_table(
        batch_shape, group, query, key, value, plan.out, plan.mask, kv_len, diag, plan.keep,
        None if narrow is None else narrow.k_scale, None if narrow is None else narrow.v_scale)


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

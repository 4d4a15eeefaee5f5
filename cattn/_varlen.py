"""Attention over packed variable-length sequences (no padding computed or allocated).

Sequences are packed along the token axis, (T, H, E), and cut by cumulative lengths
(cu_seqlens), as in FlashAttention's varlen functions. Each (sequence, head) is one item of
the kernel's table, read in place through the packed layout's uniform token stride; the
kernel runs an explicit list of (item, query block) tasks, heaviest first, so that a long
sequence starts early and the short ones fill the gaps between the threads.
"""
import numpy as np

from cattn import _runtime, _kernel  # _runtime first: it loads OpenMP (wait policy)
from cattn._api import (_FLOAT_DTYPES, _INT32_MAX, _MASK_NONE, _NO_LIMIT, _Column,
                        _as_ndarray, _check_array, _checked_block_sizes, _choose_block_sizes,
                        _element_strides, _narrow_storage, _options, _sink_logits, _window)
from cattn._blas_threads import single_threaded_blas
from cattn._validation import (check_flag as _check_flag, check_int as _check_int,
                               reject_masked as _reject_masked)

# keep_first beyond any sequence keeps every key (clamped to stay an int64)
_KEEP_ALL = 2**48


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                     alignment="top_left", window=None, softcap=None, scale=None,
                     sinks=None, keep_first=None, enable_gqa=False, return_lse=False,
                     num_threads=None, k_scale=None, v_scale=None, out_dtype=None,
                     _block_sizes=None, _isa=None):
    """Exact attention of each packed sequence over its own keys.

    Parameters
    ----------
    q : ndarray (Tq, Hq, E), float32 or float64 (or float16, bfloat16)
        The queries of all sequences, one after the other along axis 0.
    k : ndarray (Tk, Hkv, E), same dtype (or float16, bfloat16, int8)
    v : ndarray (Tk, Hkv, Ev), same dtype (or float16, bfloat16, int8)
        The keys and values of all sequences, packed the same way. Any strides are
        accepted (a view into a fused QKV projection is read in place). As in
        `scaled_dot_product_attention`, float64 computes in float64 and any mix of float32,
        float16, bfloat16 and int8 in float32, keys and values read in their own type.
    cu_seqlens_q, cu_seqlens_k : integer arrays (n + 1,)
        Where each sequence starts: sequence s has queries cu_seqlens_q[s] to
        cu_seqlens_q[s + 1] - 1 and keys cu_seqlens_k[s] to cu_seqlens_k[s + 1] - 1.
        Both start at 0, never decrease and end at Tq and Tk. Empty sequences are allowed
        (a sequence with queries but no keys gets output 0 and lse -inf).
    is_causal : bool
        Mask keys after the query's position, on the diagonal chosen by `alignment`.
    alignment : "top_left" or "bottom_right"
        Per sequence, as in `scaled_dot_product_attention`: "top_left" aligns query i with
        key i, "bottom_right" the last query with the sequence's last key (queries that
        continue a cached prefix: chunked prefill, decoding).
    window : (left, right), optional
        Sliding window around the diagonal; either side may be None for no limit.
    softcap : float, optional
        Scores become softcap·tanh(scores/softcap) before the softmax.
    scale : float, optional
        Multiplies Q·Kᵀ; defaults to 1/sqrt(E).
    sinks : array (Hq,) or (n, Hq), optional
        One logit per query head (or per sequence and head) that joins every row's softmax denominator (exp(sink))
        but contributes no value: rows then sum to less than 1. The lse includes it; a
        row that sees no key gets output 0 and lse = sink. -inf: no sink for that head.
    keep_first : int, optional
        The first keep_first keys of each sequence stay visible to every query whatever
        the window's left side (StreamingLLM's sink tokens; the window's right side and
        the causal mask still apply).
    enable_gqa : bool
        Grouped-query attention: Hq a multiple of Hkv; query head h reads key/value head
        h // (Hq // Hkv). Without it, Hq must equal Hkv.
    return_lse : bool
        Also return the log-sum-exp of each row, shape (Hq, Tq) (FlashAttention's
        `softmax_lse` layout for varlen calls: heads first, tokens packed).
    num_threads : int, optional
        Threads for this call; defaults to OpenMP's.
    k_scale, v_scale : array (Tk, Hkv), optional
        With int8 keys (values): float32 scales, one per key and head, broadcastable to
        (Tk, Hkv); key t stands for k[t] * k_scale[t] (`cattn.quantize_kv` returns both).
    out_dtype : dtype, optional
        The output's dtype when computing in float32: float32, float16 or bfloat16
        (default: the query's). lse is float32 then.

    Returns
    -------
    out : ndarray (Tq, Hq, Ev)
        Alone, or (out, lse) with return_lse.

    Raises
    ------
    TypeError
        Arrays of other dtypes, dtypes that differ, cu_seqlens that are not integers.
    ValueError
        Shapes that do not fit, cu_seqlens that do not start at 0, decrease, do not end
        at the token count or differ in length, options out of range.

    See Also
    --------
    scaled_dot_product_attention : the same options on a padded (..., L, E) batch.
    merge_attention : combine results over chunks of keys (lse moved to (..., L) order).

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> rng = np.random.default_rng(0)
    >>> lengths = [3, 5, 2]                                 # three sequences, 10 tokens
    >>> cu = np.concatenate([[0], np.cumsum(lengths)])
    >>> q, k, v = (rng.standard_normal((10, 4, 8), dtype=np.float32) for _ in range(3))
    >>> out = cattn.varlen_attention(q, k, v, cu, cu, is_causal=True)
    >>> out.shape
    (10, 4, 8)
    >>> one = cattn.scaled_dot_product_attention(                # sequence 1 alone
    ...     q[3:8].transpose(1, 0, 2), k[3:8].transpose(1, 0, 2), v[3:8].transpose(1, 0, 2),
    ...     is_causal=True)
    >>> bool(np.allclose(out[3:8], one.transpose(1, 0, 2), atol=1e-6))
    True
    """
    q, k, v, group = _packed_operands(q, k, v, enable_gqa)
    narrow = None
    if not (k.dtype == q.dtype == v.dtype and q.dtype in _FLOAT_DTYPES and k_scale is None
            and v_scale is None and out_dtype is None):
        q, narrow = _narrow_storage(q, k, v, k_scale, v_scale, out_dtype, None)
    Tq, Hq, E = q.shape
    Tk, Ev = k.shape[0], v.shape[2]
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq, "q")
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk, "k")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_q.size - 1} and {cu_k.size - 1}")
    q_len, k_len = np.diff(cu_q), np.diff(cu_k)
    max_q = int(q_len.max(initial=0))
    max_k = int(k_len.max(initial=0))
    (is_causal, enable_gqa, return_lse, _, scale, softcap, num_threads) = _options(
        is_causal, enable_gqa, return_lse, False, 0.0, scale, softcap, alignment,
        num_threads, q.dtype, E, max_k)
    n = cu_q.size - 1
    sink_logits = None if sinks is None else _sink_logits(sinks, (n, Hq), q.dtype)
    keep = (np.zeros_like(k_len) if keep_first is None else
            np.minimum(min(_check_int(keep_first, "keep_first", 0, "a non-negative integer"),
                           _KEEP_ALL), k_len))
    win_left, win_right = _window(window, is_causal)
    diag = k_len - q_len if alignment == "bottom_right" else np.zeros_like(q_len)

    out = np.empty((Tq, Hq, Ev), dtype=q.dtype)
    lse = np.empty((Hq, Tq), dtype=q.dtype) if return_lse else None
    isa = _kernel.default_isa_index() if _isa is None else _kernel.isa_index(_isa)
    block_q, block_k = (_choose_block_sizes(max_q, max_k, isa) if _block_sizes is None
                        else _checked_block_sizes(_block_sizes))
    table = _table(q, k, v, out, cu_q, cu_k, q_len, k_len, diag, keep, group, narrow)
    kv_storage = None if narrow is None else _kv_storage(narrow)
    tasks = _task_list(q_len, k_len, diag, keep, Hq, block_q, win_left, win_right)
    if tasks.shape[0]:
        threads = _runtime.team_size(min(num_threads, tasks.shape[0]))
        # Keys are never split into chunks here: a packed batch has a task per
        # (sequence, head, query block), and even decode-like sequences bring one per
        # head, which the heaviest-first order spreads over the threads; a split would
        # also make an item's result depend on which other sequences share its call.
        with single_threaded_blas if _kernel.calls_blas(isa) else _NO_LIMIT:
            _kernel.attention(q, k, v, out, lse, None, None, None, table,
                              shape=(max_q, max_k, E, Ev),
                              strides=(_token_stride(q), _token_stride(k), _token_stride(v),
                                       Hq * Ev, 1, 0, 0),
                              variant=(_MASK_NONE, win_left, win_right, scale, softcap,
                                       False),
                              blocks=(block_q, block_k, 1, max_k),
                              run=(threads, isa), tasks=tasks, sinks=sink_logits,
                              kv_storage=kv_storage,
                              bf16_query=narrow is not None and narrow.query_bf16)
    if narrow is not None and narrow.result_dtype != out.dtype:
        out = narrow.results(out, None, None)[0]
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------- the steps

def _packed_operands(q, k, v, enable_gqa):
    """q, k, v as (T, H, ·) arrays of the kernel's dtypes that it reads in place (a copy
    only when a token row is not contiguous), and query heads per key/value head."""
    names = ("q", "k", "v")
    arrays = []
    for name, x, narrow in zip(names, (q, k, v), ("half", "int8", "int8")):
        x = _as_ndarray(x, name)
        _check_array(x, name, narrow)
        if x.ndim != 3:
            raise ValueError(f"{name} must have 3 dimensions (tokens, heads, features), "
                             f"got shape {x.shape}")
        arrays.append(_readable_in_place(x))
    q, k, v = arrays
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same tokens and heads (axes 0 and 1), got "
                         f"k {k.shape} and v {v.shape}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same feature size E (last axis), got "
                         f"q {q.shape} and k {k.shape}")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError(f"q/k and v need at least one feature (last axis), got E = "
                         f"{q.shape[2]} and Ev = {v.shape[2]}")
    Hq, Hkv = q.shape[1], k.shape[1]
    if enable_gqa is not False and _check_flag(enable_gqa, "enable_gqa"):
        if Hkv == 0 or Hq % Hkv:
            raise ValueError(f"enable_gqa needs query heads to be a multiple of key/value "
                             f"heads, got {Hq} query heads and {Hkv} key/value heads")
        return q, k, v, Hq // Hkv
    if Hq != Hkv:
        raise ValueError(f"q has {Hq} heads but k and v have {Hkv}: they must be equal, "
                         f"or pass enable_gqa=True for grouped-query attention")
    return q, k, v, 1


def _readable_in_place(x):
    """x when each token's (H, E) rows can be read at whole-element offsets with unit
    stride along the features and a token stride a GEMM accepts; otherwise a contiguous
    copy (the input itself is never modified)."""
    strides = _element_strides(x)
    T, H, E = x.shape
    if (strides is not None and x.flags.aligned and (E <= 1 or strides[2] == 1)
            and (T <= 1 or max(E, 1) <= strides[0] <= _INT32_MAX)):
        return x
    return np.require(x, requirements="CA")


def _token_stride(x):
    """Elements from one token to the next (the row stride of every item's matrix)."""
    T, H, E = x.shape
    return x.strides[0] // x.itemsize if T > 1 else max(E, 1)


def _cu_seqlens(cu, name, total, operand):
    """cu as an intp array after checking it is (n + 1,) integer prefix sums from 0 to
    total."""
    _reject_masked(cu, name)
    values = np.asarray(cu)
    if values.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers (cumulative sequence lengths), got dtype "
                        f"{values.dtype}")
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a 1-D array (n + 1,) of cumulative lengths, got "
                         f"shape {values.shape}")
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    steps = np.diff(values.astype(np.int64))
    if steps.size and steps.min() < 0:
        at = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must not decrease, got {values[at]} then "
                         f"{values[at + 1]} at positions {at} and {at + 1}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of tokens of {operand} "
                         f"({total}), got {values[-1]}")
    return values.astype(np.intp)


def _table(q, k, v, out, cu_q, cu_k, q_len, k_len, diag, keep, group, narrow=None):
    """One row per (sequence, head), sequence-major: where its matrices start (element
    offsets into the packed arrays), its key length, diagonal, kept first keys, query
    length, lse and int8 scales."""
    Tq, Hq, _ = q.shape
    n = q_len.size
    seq = np.repeat(np.arange(n, dtype=np.intp), Hq)
    head = np.tile(np.arange(Hq, dtype=np.intp), n)
    kv_head = head // group
    table = np.zeros((n * Hq, _kernel.TABLE_COLUMNS), dtype=np.intp)
    q_st, k_st, v_st = (_element_strides(x) for x in (q, k, v))
    table[:, _Column.Q] = cu_q[seq] * q_st[0] + head * q_st[1]
    table[:, _Column.K] = cu_k[seq] * k_st[0] + kv_head * k_st[1]
    table[:, _Column.V] = cu_k[seq] * v_st[0] + kv_head * v_st[1]
    table[:, _Column.OUT] = (cu_q[seq] * Hq + head) * out.shape[2]
    table[:, _Column.KV_LEN] = k_len[seq]
    table[:, _Column.DIAG] = diag[seq]
    table[:, _Column.Q_LEN] = q_len[seq]
    table[:, _Column.LSE] = head * Tq + cu_q[seq]
    table[:, _Column.KEEP_FIRST] = keep[seq]
    for column, scale in ((_Column.K_SCALE, getattr(narrow, "k_scale", None)),
                          (_Column.V_SCALE, getattr(narrow, "v_scale", None))):
        if scale is not None:  # (Tk, Hkv, 1) scales, read like the keys
            token_stride, head_stride = _element_strides(scale)[:2]
            table[:, column] = cu_k[seq] * token_stride + kv_head * head_stride
    return table


def _kv_storage(narrow):
    """How the kernel reads keys and values stored narrower than float32: their types, and
    int8's scales (Tk, Hkv, 1) seen as (Hkv, Tk, 1), so that each item's scales run along
    its keys at the token stride (from the offset of its table row)."""
    k_code, v_code = narrow.kv_storage[:2]
    return (k_code, v_code) + tuple(None if scale is None else scale.transpose(1, 0, 2)
                                    for scale in (narrow.k_scale, narrow.v_scale))


def _task_list(q_len, k_len, diag, keep, Hq, block_q, win_left, win_right):
    """(n_tasks, 2) intp (item, query block) pairs, heaviest first: work is rows × visible
    keys (kept first keys included; at least one unit per row, for the output it writes),
    equal for every head of a block; ties keep sequence order."""
    blocks = -(-q_len // block_q)
    seq = np.repeat(np.arange(q_len.size, dtype=np.intp), blocks)
    first = np.arange(seq.size, dtype=np.intp) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    i0 = first * block_q
    rows = np.minimum(block_q, q_len[seq] - i0)
    # the keys any row of the block sees: [first row's start, last row's end)
    k_begin = np.clip(i0 + diag[seq] - win_left, 0, k_len[seq])
    k_end = np.clip(i0 + rows + diag[seq] + win_right, 0, k_len[seq])
    kept = np.minimum(keep[seq], k_begin)  # kept keys before the window's start
    work = rows * (np.maximum(k_end - k_begin, 0) + kept + 1)
    order = np.argsort(-work, kind="stable")
    tasks = np.empty((order.size * Hq, 2), dtype=np.intp)
    tasks[:, 0] = (seq[order][:, None] * Hq + np.arange(Hq, dtype=np.intp)).reshape(-1)
    tasks[:, 1] = np.repeat(first[order], Hq)
    return tasks

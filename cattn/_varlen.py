"""Attention over packed variable-length sequences (no padding computed or allocated).

Sequences are packed along the token axis, (T, H, E), and cut by cumulative lengths
(cu_seqlens), as in FlashAttention's varlen functions. Each (sequence, head) is one item of
the kernel's table, read in place through the packed layout's uniform token stride; the
kernel runs an explicit list of (item, query block) tasks, heaviest first, so that a long
sequence starts early and the short ones fill the gaps between the threads.
"""
import numpy as np

from cattn import _kernel
from cattn._plan import (INT32_MAX as _INT32_MAX, Column as _Column, Plan, as_ndarray,
                         check_array, choose_blocks, element_strides, launch)
from cattn._validation import check_flag as _check_flag, reject_masked as _reject_masked
from cattn._visibility import key_span

def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                     alignment="top_left", window=None, softcap=None, scale=None,
                     sinks=None, keep_first=None, alibi_slopes=None, position_bias=None,
                     enable_gqa=False, return_lse=False, return_key_mass=False,
                     out=None, num_threads=None, k_scale=None, v_scale=None,
                     out_dtype=None, _block_sizes=None, _isa=None):
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
    alibi_slopes : array (Hq,) or (n, Hq), optional
        ALiBi's slopes, as in `scaled_dot_product_attention`: -slope·|i + diag - j| is
        added to the scores of each sequence, on its own diagonal.
    position_bias : cattn.RelativePositionBias, optional
        T5's bucketed relative position bias (Hq heads), as in
        `scaled_dot_product_attention`: the distance of key j from query i is measured on
        each sequence's own diagonal, j - (i + diag).
    enable_gqa : bool
        Grouped-query attention: Hq a multiple of Hkv; query head h reads key/value head
        h // (Hq // Hkv). Without it, Hq must equal Hkv.
    return_lse : bool
        Also return the log-sum-exp of each row, shape (Hq, Tq) (FlashAttention's
        `softmax_lse` layout for varlen calls: heads first, tokens packed).
    return_key_mass : bool or "kv_heads"
        Also return each key's attention mass (the sum of its weights over its sequence's
        queries, as in `scaled_dot_product_attention`), shape (Hq, Tk), last in the tuple;
        "kv_heads": (Hkv, Tk), summed over the query heads of each key/value head.
    out : ndarray (Tq, Hq, Ev), optional
        Preallocated output (any strides), of the result's dtype.
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
    plan = Plan(q, k, v, out, k_scale, v_scale, out_dtype)
    Tq, Hq, E = q.shape
    Tk, Ev = k.shape[0], v.shape[2]
    cu_q, q_len = cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq, "q")
    cu_k, k_len = cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk, "k")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_q.size - 1} and {cu_k.size - 1}")
    max_k = int(k_len.max(initial=0))
    plan.set_options(is_causal, enable_gqa, return_lse, False, 0.0, scale, softcap,
                     alignment, window, num_threads, _block_sizes, _isa, E, max_k,
                     return_key_mass)
    n = cu_q.size - 1
    plan.set_extras(keep_first, None, sinks, (n, Hq), max_k, alibi_slopes,
                    position_bias)
    diag = k_len - q_len if alignment == "bottom_right" else np.zeros_like(q_len)
    plan.set_outputs((Tq, Hq, Ev), (Hq, Tq), None, (("q", q), ("k", k), ("v", v)),
                     (n, Hq, max_k), group)
    k_st, v_st = element_strides(plan.key), element_strides(plan.value)
    plan.k_rs, plan.v_rs = _token_stride(plan.key), _token_stride(plan.value)
    plan.S, plan.longest_keys = max_k, max_k
    packed_layout(plan, cu_q, q_len, k_len, diag, group, cu_k * k_st[0], k_st[1],
                  cu_k * v_st[0], v_st[1])
    narrow = plan.narrow
    if narrow is not None:
        _scale_columns(plan.table, narrow, cu_k, q_len.size, Hq, group)
        plan.kv_storage = _kv_storage(narrow)
    launch(plan)
    if plan.return_key_mass:
        plan.key_mass = _packed_key_mass(plan.key_mass, cu_k, k_len)
    return plan.results()


def _packed_key_mass(mass, cu_k, k_len):
    """(n, Hq, max_k) per sequence -> (Hq, Tk), the keys packed as in k (the lse's layout)."""
    sequence = np.repeat(np.arange(k_len.size), k_len)
    local = np.arange(int(cu_k[-1])) - cu_k[sequence]
    return np.ascontiguousarray(mass[sequence, :, local].T)


# ------------------------------------------------------------------------- the steps

def _packed_operands(q, k, v, enable_gqa):
    """q, k, v as (T, H, ·) arrays of the kernel's dtypes that it reads in place (a copy
    only when a token row is not contiguous), and query heads per key/value head."""
    names = ("q", "k", "v")
    arrays = []
    for name, x, narrow in zip(names, (q, k, v), ("half", "int8", "int8")):
        x = as_ndarray(x, name)
        check_array(x, name, narrow)
        if x.ndim != 3:
            raise ValueError(f"{name} must have 3 dimensions (tokens, heads, features), "
                             f"got shape {x.shape}")
        arrays.append(readable_in_place(x))
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


def readable_in_place(x):
    """x when each token's (H, E) rows can be read at whole-element offsets with unit
    stride along the features and a token stride a GEMM accepts; otherwise a contiguous
    copy (the input itself is never modified)."""
    strides = element_strides(x)
    T, H, E = x.shape
    if (strides is not None and x.flags.aligned and (E <= 1 or strides[2] == 1)
            and (T <= 1 or max(E, 1) <= strides[0] <= _INT32_MAX)):
        return x
    return np.require(x, requirements="CA")


def _token_stride(x):
    """Elements from one token to the next (the row stride of every item's matrix)."""
    T, H, E = x.shape
    return x.strides[0] // x.itemsize if T > 1 else max(E, 1)


def cu_seqlens(cu, name, total, operand):
    """(cu, the n lengths) as intp arrays after checking cu is (n + 1,) integer prefix
    sums from 0 to total."""
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
    values = values.astype(np.intp)
    return values, np.diff(values)


def packed_layout(plan, cu_q, q_len, k_len, diag, group, k_starts, k_head_stride,
                  v_starts, v_head_stride):
    """The table of packed queries (T, Hq, E) and outputs, one row per (sequence, head),
    sequence-major, and the task list, heaviest first. k_starts / v_starts: where each
    sequence's keys / values start (element offsets), the head strides apart."""
    query, out = plan.query, plan.out
    Tq, Hq, _ = query.shape
    n = q_len.size
    plan.L = int(q_len.max(initial=0))
    plan.E, plan.Ev = query.shape[2], out.shape[2]
    plan.q_rs = _token_stride(query)
    q_st, out_st = element_strides(query), element_strides(out)
    plan.out_rs = out_st[0] if Tq > 1 else max(plan.Ev, 1)
    plan.out_cs = out_st[2]
    seq = np.repeat(np.arange(n, dtype=np.intp), Hq)
    head = np.tile(np.arange(Hq, dtype=np.intp), n)
    kv_head = head // group
    table = np.zeros((n * Hq, _kernel.TABLE_COLUMNS), dtype=np.intp)
    table[:, _Column.Q] = cu_q[seq] * q_st[0] + head * q_st[1]
    table[:, _Column.K] = (k_starts[seq] if np.ndim(k_starts) else k_starts) + \
        kv_head * k_head_stride
    table[:, _Column.V] = (v_starts[seq] if np.ndim(v_starts) else v_starts) + \
        kv_head * v_head_stride
    table[:, _Column.OUT] = cu_q[seq] * out_st[0] + head * out_st[1]
    table[:, _Column.KV_LEN] = k_len[seq]
    table[:, _Column.DIAG] = diag[seq]
    table[:, _Column.Q_LEN] = q_len[seq]
    table[:, _Column.LSE] = head * Tq + cu_q[seq]
    keep = np.minimum(plan.keep, k_len)
    table[:, _Column.KEEP_FIRST] = keep[seq]
    plan.table = table
    choose_blocks(plan)
    # (a key-mass row belongs to one item: those calls group no heads)
    plan.tasks = _task_list(q_len, k_len, diag, keep, Hq, plan.block_q, plan.win_left,
                            plan.win_right, 1 if plan.return_key_mass else group)


def _scale_columns(table, narrow, cu_k, n, Hq, group):
    """Where each item's int8 scales (Tk, Hkv, 1) start, read like its keys."""
    seq = np.repeat(np.arange(n, dtype=np.intp), Hq)
    kv_head = np.tile(np.arange(Hq, dtype=np.intp), n) // group
    for column, scale in ((_Column.K_SCALE, narrow.k_scale), (_Column.V_SCALE,
                                                               narrow.v_scale)):
        if scale is not None:
            token_stride, head_stride = element_strides(scale)[:2]
            table[:, column] = cu_k[seq] * token_stride + kv_head * head_stride


def _kv_storage(narrow):
    """How the kernel reads keys and values stored narrower than float32: their types, and
    int8's scales (Tk, Hkv, 1) seen as (Hkv, Tk, 1), so that each item's scales run along
    its keys at the token stride (from the offset of its table row)."""
    k_code, v_code = narrow.kv_storage[:2]
    return (k_code, v_code) + tuple(None if scale is None else scale.transpose(1, 0, 2)
                                    for scale in (narrow.k_scale, narrow.v_scale))


def _task_list(q_len, k_len, diag, keep, Hq, block_q, win_left, win_right, group=1):
    """(n_tasks, TASK_COLUMNS) intp (first item, query block, members) rows, heaviest
    first: work is rows × visible keys (kept first keys included; at least one unit per
    row, for the output it writes), times the members; ties keep sequence order. A task
    computes `members` consecutive heads of one block as rows of one GEMM, heads that
    share their keys and values (`group` query heads per K/V head): as many as fit in
    GROUPED_TASK_ROWS rows (a decoding sequence's one row: the whole group, read once)."""
    blocks = -(-q_len // block_q)
    seq = np.repeat(np.arange(q_len.size, dtype=np.intp), blocks)
    first = np.arange(seq.size, dtype=np.intp) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    i0 = first * block_q
    rows = np.minimum(block_q, q_len[seq] - i0)
    k_begin, k_end = key_span(i0, i0 + rows, diag[seq], k_len[seq], win_left, win_right)
    kept = np.minimum(keep[seq], k_begin)  # kept keys before the window's start
    work = rows * (np.maximum(k_end - k_begin, 0) + kept + 1)
    members = np.ones(seq.size, dtype=np.intp)
    for divisor in range(2, group + 1):  # the largest divisor of the group that fits
        if group % divisor == 0:
            members[divisor * rows <= _kernel.GROUPED_TASK_ROWS] = divisor
    per_block = Hq // members
    block = np.repeat(np.arange(seq.size, dtype=np.intp), per_block)
    head = (np.arange(block.size, dtype=np.intp)
            - np.repeat(np.cumsum(per_block) - per_block, per_block)) * members[block]
    order = np.argsort(-(work[block] * members[block]), kind="stable")
    block = block[order]
    tasks = np.empty((order.size, _kernel.TASK_COLUMNS), dtype=np.intp)
    tasks[:, 0] = seq[block] * Hq + head[order]
    tasks[:, 1] = first[block]
    tasks[:, 2] = members[block]
    return tasks

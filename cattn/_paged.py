"""Attention over a paged key/value cache.

A paged cache stores keys and values in fixed-size pages ("blocks") of one pool; each
sequence owns a list of page numbers, its row of the block table. The kernel reads a
sequence's keys through that table, one page at a time, without ever gathering them into a
contiguous copy: the table row's offset is a column of the kernel's per-item table and the
page size and page strides are part of its plan.

`PagedKVCache` (in cattn._cache, importable from here too) manages such a pool for
`MultiHeadAttention`: pages are taken from a free list as sequences grow, shared between
sequences by `fork` (copy-on-write, with reference counts) and returned by `free`.
"""
from typing import Any, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn import _kernel
from cattn._plan import (Column as _Column, Plan, as_ndarray,
                         blas_ready as _blas_ready, check_array, element_strides, launch)
from cattn._varlen import cu_seqlens, packed_layout, readable_in_place
from cattn._cache import PagedKVCache, PagedKVCacheLayer  # noqa: F401 (their old home)
from cattn._position_bias import RelativePositionBias
from cattn._validation import check_ndarray, reject_masked


def paged_attention(query: ArrayLike, key_cache: ArrayLike, value_cache: ArrayLike,
                    block_table: ArrayLike, seq_lens: ArrayLike, *,
                    cu_seqlens_q: Optional[ArrayLike] = None,
                    attn_mask: Optional[ArrayLike] = None, is_causal: bool = False,
                    scale: Optional[float] = None, enable_gqa: bool = False,
                    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                    softcap: Optional[float] = None, sinks: Optional[ArrayLike] = None,
                    keep_first: Optional[int] = None,
                    alibi_slopes: Optional[ArrayLike] = None,
                    position_bias: Optional[RelativePositionBias] = None,
                    return_lse: bool = False, return_weights: bool = False,
                    return_key_mass: Union[bool, str] = False,
                    out: Optional[NDArray[Any]] = None,
                    num_threads: Optional[int] = None, out_dtype: Optional[DTypeLike] = None,
                    _block_sizes: Optional[Tuple[int, int]] = None, _isa: Optional[str] = None
                    ) -> Union[NDArray[Any], Tuple[NDArray[Any], ...]]:
    """Attention of new queries over keys and values held in a paged cache.

    Parameters
    ----------
    query : ndarray (B, Hq, L, E), float32 or float64 (or float16, bfloat16)
        The queries of the last L positions of each of B sequences (any strides); or,
        with `cu_seqlens_q`, packed queries (Tq, Hq, E).
    key_cache : ndarray (num_blocks, Hkv, block_size, E)
    value_cache : ndarray (num_blocks, Hkv, block_size, Ev)
        The query's dtype, or float16 / bfloat16 pages (read as they are stored, computed
        in float32; the output in the query's dtype), as in
        `scaled_dot_product_attention`.
        The pool of pages. Read in place, never copied: the features of a row must be
        contiguous (unit stride on the last axis).
    block_table : integer ndarray (B, max_blocks)
        The pages of each sequence, in order: key j of sequence b is row j % block_size of
        page block_table[b, j // block_size]. Entries past a sequence's last page are not
        read (any value, -1 say).
    seq_lens : integer ndarray (B,)
        Keys cached per sequence (the new queries' own keys included), at most
        max_blocks · block_size.
    cu_seqlens_q : integer array (B + 1,), optional
        Packed queries of different lengths (a mixed batch: some sequences prefilling a
        chunk, others decoding one token): sequence b has the queries
        cu_seqlens_q[b] to cu_seqlens_q[b + 1] - 1 of query (Tq, Hq, E), the last
        tokens of its seq_lens[b] keys (bottom-right: its last query is its last key).
        The output is then (Tq, Hq, Ev) and the lse (Hq, Tq), as in `varlen_attention`;
        attn_mask and return_weights are not available then.
    attn_mask : ndarray, optional
        Broadcastable to (B, Hq, L, max_blocks · block_size), indexed by key position;
        boolean (True = attend) or float (added to the scores), as in
        `scaled_dot_product_attention`.
    is_causal : bool
        Query i (the sequence's position seq_len - L + i) sees keys up to its own position.
    scale, enable_gqa, window, softcap, sinks, keep_first, alibi_slopes, position_bias,
    return_lse, return_weights, return_key_mass, out, num_threads, out_dtype
        As in `scaled_dot_product_attention`; the diagonal of `is_causal` and `window` is
        bottom-right (each sequence's last query is aligned with its last key). The weights
        are (B, Hq, L, max_blocks · block_size), 0 past each sequence's length, and the
        key mass (B, Hq, max_blocks · block_size), by key position ((B, Hkv, ...) with
        return_key_mass="kv_heads").

    Returns
    -------
    out : ndarray (B, Hq, L, Ev)
        Alone, or first of a tuple with the weights and/or the lse (B, Hq, L), in the order
        of `scaled_dot_product_attention`.

    Raises
    ------
    TypeError
        An operand that is not an array of the expected dtype (a float block table, a
        cache of another dtype than the queries, ...).
    ValueError
        Shapes that do not fit together, a page number outside [0, num_blocks) among a
        sequence's pages, a sequence longer than its row of the block table, a cache
        whose rows are not contiguous.

    See Also
    --------
    PagedKVCache : a cache of pages with a free list and copy-on-write sharing.
    scaled_dot_product_attention : the same attention over contiguous keys.

    Examples
    --------
    Two sequences of 5 and 3 keys in pages of 2 rows, the pages in any order:

    >>> import numpy as np
    >>> import cattn
    >>> rng = np.random.default_rng(0)
    >>> k_cache = rng.standard_normal((6, 2, 2, 8), dtype=np.float32)  # 6 pages, 2 heads
    >>> v_cache = rng.standard_normal((6, 2, 2, 8), dtype=np.float32)
    >>> table = np.array([[4, 0, 2], [5, 1, -1]], dtype=np.int32)
    >>> q = rng.standard_normal((2, 2, 1, 8), dtype=np.float32)       # one new query each
    >>> out = cattn.paged_attention(q, k_cache, v_cache, table, np.array([5, 3]))
    >>> keys = k_cache[[4, 0, 2]].transpose(1, 0, 2, 3).reshape(2, 6, 8)[:, :5]
    >>> values = v_cache[[4, 0, 2]].transpose(1, 0, 2, 3).reshape(2, 6, 8)[:, :5]
    >>> bool(np.allclose(out[0], cattn.scaled_dot_product_attention(q[0], keys, values),
    ...                  atol=1e-6))
    True
    """
    packed = cu_seqlens_q is not None
    query, key_cache, value_cache = _cache_operands(query, key_cache, value_cache, packed)
    num_blocks, Hkv, block_size, E = key_cache.shape
    Hq, Ev = query.shape[1], value_cache.shape[-1]
    plan = Plan(query, key_cache, value_cache, out, None, None, out_dtype)
    if packed:
        Tq = query.shape[0]
        cu_q, q_len = cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq, "query")
        B, L = q_len.size, int(q_len.max(initial=0))
        if attn_mask is not None or return_weights is not False:
            raise ValueError("attn_mask and return_weights are not available with "
                             "cu_seqlens_q (packed queries): pass padded (B, Hq, L, E) "
                             "queries for them")
    else:
        B, L = query.shape[0], query.shape[2]
    block_table, max_blocks = _block_table(block_table, B)
    S = max_blocks * block_size
    plan.set_options(is_causal, enable_gqa, return_lse, return_weights, 0.0, scale, softcap,
                     "bottom_right", window, num_threads, _block_sizes, _isa, E, S,
                     return_key_mass)
    if Hq != Hkv and not (plan.enable_gqa and Hkv and Hq % Hkv == 0):
        raise ValueError(
            f"query has {Hq} heads and the cache {Hkv} key/value heads: they must be equal, "
            f"or (with enable_gqa=True) the query heads a multiple of the cache's")
    group = Hq // Hkv if Hkv else 1
    seq_lens = _seq_lens(seq_lens, B, S, max_blocks, block_size)
    _check_pages(block_table, seq_lens, block_size, num_blocks)
    batch_shape = (B, Hq)
    if attn_mask is not None:
        attn_mask = as_ndarray(attn_mask, "attn_mask")
        plan.set_mask(attn_mask, batch_shape, L, S)
    plan.set_extras(keep_first, None, sinks, batch_shape, S, alibi_slopes, position_bias)
    inputs = (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
              ("attn_mask", attn_mask))
    # (splits and block sizes follow the longest sequence, not the table's capacity:
    # chunks past every sequence's end would be empty tasks)
    plan.longest_keys = int(seq_lens.max(initial=0))
    if packed:
        plan.set_outputs((Tq, Hq, Ev), (Hq, Tq), None, inputs, batch_shape + (S,), group)
        k_head_stride, v_head_stride = _pages(plan, block_table)
        packed_layout(plan, cu_q, q_len, seq_lens, seq_lens - q_len, group, 0,
                      k_head_stride, 0, v_head_stride)
        plan.table[:, _Column.PAGES] = np.repeat(np.arange(B, dtype=np.intp) * max_blocks,
                                                 Hq)
    else:
        plan.set_outputs(batch_shape + (L, Ev), batch_shape + (L,), batch_shape + (L, S),
                         inputs, batch_shape + (S,), group)
        _paged_layout(plan, block_table, seq_lens, group)
    launch(plan)
    return plan.results()


def _cache_operands(query, key_cache, value_cache, packed):
    """query (B, Hq, L, E), or packed (Tq, Hq, E), and the caches (num_blocks, Hkv,
    block_size, E | Ev), of one float dtype, whose shapes fit together; the caches' rows
    readable in place, packed queries' tokens too (or copied)."""
    query = as_ndarray(query, "query")
    key_cache = as_ndarray(key_cache, "key_cache")
    value_cache = as_ndarray(value_cache, "value_cache")
    for name, x, axes in (("query", query, "(tokens, heads, E) with cu_seqlens_q" if packed
                           else "(batch, heads, L, E)"),
                          ("key_cache", key_cache, "(num_blocks, kv_heads, block_size, E)"),
                          ("value_cache", value_cache,
                           "(num_blocks, kv_heads, block_size, Ev)")):
        check_array(x, name, narrow="half")
        ndim = 3 if packed and name == "query" else 4
        if x.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {axes}, got shape {x.shape}")
    if key_cache.shape[:3] != value_cache.shape[:3]:
        raise ValueError(f"key_cache and value_cache must have the same pages, heads and "
                         f"block size, got shapes {key_cache.shape} and "
                         f"{value_cache.shape}")
    if query.shape[-1] != key_cache.shape[-1]:
        raise ValueError(f"query and key_cache must have the same feature size E, got "
                         f"{query.shape} and {key_cache.shape}")
    if key_cache.shape[2] == 0:
        raise ValueError(f"the block size (axis 2 of the caches) must be >= 1, got shape "
                         f"{key_cache.shape}")
    for name, x in (("key_cache", key_cache), ("value_cache", value_cache)):
        if (_kernel.gemm_row_stride(x) < 0 or not x.flags.aligned
                or element_strides(x) is None):
            raise ValueError(
                f"{name} is read in place (never copied), so each row of its pages must be "
                f"contiguous and aligned: unit stride on the last axis, row strides of "
                f"whole elements (got strides {x.strides} for shape {x.shape})")
    return (readable_in_place(query) if packed else query), key_cache, value_cache


def _block_table(block_table, B):
    """The block table as a C-contiguous int32 array (B, max_blocks), and max_blocks."""
    block_table = as_ndarray(block_table, "block_table")
    check_ndarray(block_table, "block_table", " of integers")
    reject_masked(block_table, "block_table")
    if block_table.dtype.kind not in "iu":
        raise TypeError(f"block_table must hold integers (int32 page numbers), got dtype "
                        f"{block_table.dtype}")
    if block_table.ndim != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must have shape (batch={B}, max_blocks), got "
                         f"{block_table.shape}")
    return block_table, block_table.shape[1]


def _seq_lens(seq_lens, B, S, max_blocks, block_size):
    """seq_lens as B intp values in [0, max_blocks · block_size]."""
    reject_masked(seq_lens, "seq_lens")
    lengths = np.asarray(seq_lens)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"seq_lens must be integers, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"seq_lens must have shape (batch,) = ({B},), got {lengths.shape}")
    if B and (lengths.min() < 0 or lengths.max() > S):
        b = int(np.argmax((lengths < 0) | (lengths > S)))
        raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size] = [0, {S}] "
                         f"(the block table has {max_blocks} pages of {block_size} per "
                         f"sequence), got {lengths[b]} for sequence {b}")
    return lengths.astype(np.intp)


def _check_pages(block_table, seq_lens, block_size, num_blocks):
    """Every page a sequence uses (its first ceil(seq_len / block_size)) exists."""
    used = np.arange(block_table.shape[1]) < (-(-seq_lens // block_size))[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bad.any():
        b, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {block_table[b, j]} is out of range: "
                         f"sequence {b} holds {seq_lens[b]} keys, so its first "
                         f"{-(-seq_lens[b] // block_size)} pages must lie in [0, {num_blocks})")


def _pages(plan, block_table):
    """The cache's pages as the kernel reads them: the block table (int32 page numbers),
    page size and page strides; row strides in elements."""
    key_cache, value_cache = plan.key, plan.value
    k_strides = [s // key_cache.itemsize for s in key_cache.strides]
    v_strides = [s // value_cache.itemsize for s in value_cache.strides]
    block_size = key_cache.shape[2]
    pages = np.ascontiguousarray(block_table, dtype=np.int32)  # (small: page numbers only)
    plan.paged = (pages, block_size, k_strides[0], v_strides[0])
    plan.S = pages.shape[1] * block_size
    plan.E, plan.Ev = key_cache.shape[3], value_cache.shape[3]
    # a one-row page: its row stride is never used (BLAS still wants one >= the row)
    plan.k_rs = k_strides[2] if block_size > 1 else max(plan.E, 1)
    plan.v_rs = v_strides[2] if block_size > 1 else max(plan.Ev, 1)
    return k_strides[1], v_strides[1]


def _paged_layout(plan, block_table, seq_lens, group):
    """The table of a padded batch of queries (B, Hq, L, E) over the pages: head offsets
    within a page, each item's row of the block table."""
    query, plan.q_rs = _blas_ready(plan.query)
    plan.query = query
    k_head_stride, v_head_stride = _pages(plan, block_table)
    B, Hq, L, _ = query.shape
    plan.L = L
    max_blocks = block_table.shape[1]
    batch_shape = (B, Hq)
    table = np.empty((B * Hq, _kernel.TABLE_COLUMNS), dtype=np.intp)
    kv_heads = np.tile(np.arange(Hq, dtype=np.intp) // group, B)
    _kernel.fill_offsets(table, _Column.Q, query, batch_shape)
    _kernel.fill_column(table, _Column.K, kv_heads * k_head_stride)
    _kernel.fill_column(table, _Column.V, kv_heads * v_head_stride)
    _kernel.fill_offsets(table, _Column.OUT, plan.out, batch_shape)
    _kernel.fill_offsets(table, _Column.MASK, plan.mask, batch_shape)
    kv_len = np.repeat(seq_lens, Hq)
    _kernel.fill_column(table, _Column.KV_LEN, kv_len)
    _kernel.fill_column(table, _Column.DIAG, kv_len - L)
    _kernel.fill_column(table, _Column.KEEP_FIRST, plan.keep)
    _kernel.fill_column(table, _Column.PAGES,
                        np.repeat(np.arange(B, dtype=np.intp) * max_blocks, Hq))
    plan.table = table


# --------------------------------------------------------------------------- the cache

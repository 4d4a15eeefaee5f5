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
from numpy.typing import ArrayLike, NDArray

from cattn import _runtime, _kernel  # _runtime first: it loads OpenMP (wait policy)
from cattn import _api
from cattn._blas_threads import single_threaded_blas
from cattn._cache import PagedKVCache, PagedKVCacheLayer  # noqa: F401 (their old home)
from cattn._validation import check_ndarray

_Column = _kernel.Column


def paged_attention(query: ArrayLike, key_cache: ArrayLike, value_cache: ArrayLike,
                    block_table: ArrayLike, seq_lens: ArrayLike, *,
                    attn_mask: Optional[ArrayLike] = None, is_causal: bool = False,
                    scale: Optional[float] = None, enable_gqa: bool = False,
                    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                    softcap: Optional[float] = None, sinks: Optional[ArrayLike] = None,
                    keep_first: Optional[int] = None, return_lse: bool = False,
                    return_weights: bool = False, out: Optional[NDArray[Any]] = None,
                    num_threads: Optional[int] = None,
                    _block_sizes: Optional[Tuple[int, int]] = None, _isa: Optional[str] = None
                    ) -> Union[NDArray[Any], Tuple[NDArray[Any], ...]]:
    """Attention of new queries over keys and values held in a paged cache.

    Parameters
    ----------
    query : ndarray (B, Hq, L, E), float32 or float64 (or float16, bfloat16)
        The queries of the last L positions of each of B sequences (any strides).
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
    attn_mask : ndarray, optional
        Broadcastable to (B, Hq, L, max_blocks · block_size), indexed by key position;
        boolean (True = attend) or float (added to the scores), as in
        `scaled_dot_product_attention`.
    is_causal : bool
        Query i (the sequence's position seq_len - L + i) sees keys up to its own position.
    scale, enable_gqa, window, softcap, sinks, keep_first, return_lse, return_weights,
    out, num_threads
        As in `scaled_dot_product_attention`; the diagonal of `is_causal` and `window` is
        bottom-right (each sequence's last query is aligned with its last key). The weights
        are (B, Hq, L, max_blocks · block_size), 0 past each sequence's length.

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
    query, key_cache, value_cache = _cache_operands(query, key_cache, value_cache)
    B, Hq, L, E = query.shape
    num_blocks, Hkv, block_size, _ = key_cache.shape
    Ev = value_cache.shape[-1]
    out = _api._as_ndarray(out, "out")
    narrow = None
    dtype = query.dtype
    if not (key_cache.dtype == value_cache.dtype == dtype and dtype in (np.float32, np.float64)
            and (out is None or out.dtype == dtype)):
        # float16 / bfloat16 pages (or queries, or output): computed in float32
        query, narrow = _api._narrow_storage(query, key_cache, value_cache, None, None, None,
                                             out)
        dtype = query.dtype
    block_table, max_blocks = _block_table(block_table, B)
    S = max_blocks * block_size
    (is_causal, enable_gqa, return_lse, return_weights, scale, softcap,
     num_threads) = _api._options(is_causal, enable_gqa, return_lse, return_weights, 0.0,
                                  scale, softcap, "bottom_right", num_threads, dtype, E, S)
    if Hq != Hkv and not (enable_gqa and Hkv and Hq % Hkv == 0):
        raise ValueError(
            f"query has {Hq} heads and the cache {Hkv} key/value heads: they must be equal, "
            f"or (with enable_gqa=True) the query heads a multiple of the cache's")
    seq_lens = _seq_lens(seq_lens, B, S, max_blocks, block_size)
    _check_pages(block_table, seq_lens, block_size, num_blocks)
    batch_shape = (B, Hq)
    attn_mask = _api._as_ndarray(attn_mask, "attn_mask")
    mask_plan = _api._mask_plan(attn_mask, batch_shape, L, S, dtype)
    win_left, win_right = _api._window(window, is_causal)
    keep = 0 if keep_first is None else _api._kept_first_keys(keep_first, None, batch_shape, S)
    sink_logits = None if sinks is None else _api._sink_logits(sinks, batch_shape, dtype)
    user_out = None
    if narrow is not None and narrow.result_dtype != dtype:
        # the kernel writes float32, rounded once to the result's dtype afterwards
        if out is not None:
            _api._check_out(out, batch_shape + (L, Ev), narrow.result_dtype,
                            (query, key_cache, value_cache, attn_mask))
        user_out, out = out, None
    out, out_rs, out_cs, lse, weights = _api._outputs(
        out, batch_shape, L, S, Ev, dtype, return_lse, return_weights,
        (query, key_cache, value_cache, attn_mask))
    _launch(query, key_cache, value_cache, block_table, seq_lens, out, lse, weights,
            mask_plan, Hq // Hkv if Hkv else 1, out_rs, out_cs, win_left, win_right, scale,
            softcap, num_threads, return_weights, _block_sizes, _isa, keep, sink_logits,
            narrow)
    if narrow is not None and narrow.result_dtype != dtype:
        out, weights = narrow.results(out, weights, user_out)
    return _api._results(out, weights, lse)


def _cache_operands(query, key_cache, value_cache):
    """query (B, Hq, L, E) and the caches (num_blocks, Hkv, block_size, E | Ev), of one
    float dtype, whose shapes fit together; the caches' rows readable in place."""
    query = _api._as_ndarray(query, "query")
    key_cache = _api._as_ndarray(key_cache, "key_cache")
    value_cache = _api._as_ndarray(value_cache, "value_cache")
    for name, x, axes in (("query", query, "(batch, heads, L, E)"),
                          ("key_cache", key_cache, "(num_blocks, kv_heads, block_size, E)"),
                          ("value_cache", value_cache,
                           "(num_blocks, kv_heads, block_size, Ev)")):
        _api._check_array(x, name, narrow="half")
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions {axes}, got shape {x.shape}")
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
                or _api._element_strides(x) is None):
            raise ValueError(
                f"{name} is read in place (never copied), so each row of its pages must be "
                f"contiguous and aligned: unit stride on the last axis, row strides of "
                f"whole elements (got strides {x.strides} for shape {x.shape})")
    return query, key_cache, value_cache


def _block_table(block_table, B):
    """The block table as a C-contiguous int32 array (B, max_blocks), and max_blocks."""
    block_table = _api._as_ndarray(block_table, "block_table")
    check_ndarray(block_table, "block_table", " of integers")
    _api._reject_masked(block_table, "block_table")
    if block_table.dtype.kind not in "iu":
        raise TypeError(f"block_table must hold integers (int32 page numbers), got dtype "
                        f"{block_table.dtype}")
    if block_table.ndim != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must have shape (batch={B}, max_blocks), got "
                         f"{block_table.shape}")
    return block_table, block_table.shape[1]


def _seq_lens(seq_lens, B, S, max_blocks, block_size):
    """seq_lens as B intp values in [0, max_blocks · block_size]."""
    _api._reject_masked(seq_lens, "seq_lens")
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


def _launch(query, key_cache, value_cache, block_table, seq_lens, out, lse, weights,
            mask_plan, group, out_rs, out_cs, win_left, win_right, scale, softcap,
            num_threads, weights_mode, block_sizes, isa, keep, sinks, narrow):
    """The per-item table (head offsets within a page, the item's row of the block table),
    block sizes and key splits; then the kernel."""
    query, q_rs = _api._blas_ready(query)
    k_strides = [s // key_cache.itemsize for s in key_cache.strides]
    v_strides = [s // value_cache.itemsize for s in value_cache.strides]
    B, Hq, L, E = query.shape
    block_size = key_cache.shape[2]
    Ev = value_cache.shape[-1]
    pages = np.ascontiguousarray(block_table, dtype=np.int32)  # (small: page numbers only)
    max_blocks = pages.shape[1]
    S = max_blocks * block_size
    mask, mask_kind, mask_rs, mask_cs = mask_plan
    batch_shape = (B, Hq)
    n_items = B * Hq
    table = np.empty((n_items, _kernel.TABLE_COLUMNS), dtype=np.intp)
    kv_heads = np.tile(np.arange(Hq, dtype=np.intp) // group, B)
    _kernel.fill_offsets(table, _Column.Q, query, batch_shape)
    _kernel.fill_column(table, _Column.K, kv_heads * k_strides[1])
    _kernel.fill_column(table, _Column.V, kv_heads * v_strides[1])
    _kernel.fill_offsets(table, _Column.OUT, out, batch_shape)
    _kernel.fill_offsets(table, _Column.MASK, mask, batch_shape)
    kv_len = np.repeat(seq_lens, Hq)
    _kernel.fill_column(table, _Column.KV_LEN, kv_len)
    _kernel.fill_column(table, _Column.DIAG, kv_len - L)
    _kernel.fill_column(table, _Column.KEEP_FIRST, keep)
    _kernel.fill_column(table, _Column.PAGES,
                        np.repeat(np.arange(B, dtype=np.intp) * max_blocks, Hq))
    isa = _kernel.default_isa_index() if isa is None else _kernel.isa_index(isa)
    longest = int(seq_lens.max(initial=0))
    block_q, block_k = (_api._choose_block_sizes(L, longest, isa) if block_sizes is None
                        else _api._checked_block_sizes(block_sizes))
    n_q_blocks = -(-L // block_q)
    # (splits follow the longest sequence, not the table's capacity: chunks past every
    # sequence's end would be empty tasks)
    n_splits, split_keys = _api._key_splits(n_q_blocks, longest, block_k, weights_mode)
    n_tasks = n_items * n_q_blocks * n_splits
    threads = _runtime.team_size(min(num_threads, n_tasks))
    partials = (np.empty((n_splits, n_items, L, Ev + 2), dtype=out.dtype) if n_splits > 1
                else None)
    # a one-row page: its row stride is never used (BLAS still wants one >= the row)
    k_rs = k_strides[2] if block_size > 1 else max(E, 1)
    v_rs = v_strides[2] if block_size > 1 else max(Ev, 1)
    with single_threaded_blas if _kernel.calls_blas(isa) else _api._NO_LIMIT:
        _kernel.attention(query, key_cache, value_cache, out, lse, weights, mask, partials,
                          table, shape=(L, S, E, Ev),
                          strides=(q_rs, k_rs, v_rs, out_rs, out_cs, mask_rs, mask_cs),
                          variant=(mask_kind, win_left, win_right, scale, softcap,
                                   weights_mode),
                          blocks=(block_q, block_k, n_splits, split_keys),
                          run=(threads, isa),
                          paged=(pages, block_size, k_strides[0], v_strides[0]),
                          sinks=sinks,
                          kv_storage=None if narrow is None else narrow.kv_storage,
                          bf16_query=narrow is not None and narrow.query_bf16)

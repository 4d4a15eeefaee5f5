"""Attention over a paged key/value cache, and the cache itself.

A paged cache stores keys and values in fixed-size pages ("blocks") of one pool; each
sequence owns a list of page numbers, its row of the block table. The kernel reads a
sequence's keys through that table, one page at a time, without ever gathering them into a
contiguous copy: the table row's offset is a column of the kernel's per-item table and the
page size and page strides are part of its plan.

`PagedKVCache` manages such a pool for `MultiHeadAttention`: pages are taken from a free
list as sequences grow, shared between sequences by `fork` (copy-on-write, with reference
counts) and returned by `free`.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn import _kernel, _dtypes
from cattn._plan import (INT32_MAX as _INT32_MAX, Column as _Column, Plan, as_ndarray,
                         blas_ready as _blas_ready, check_array, element_strides, launch)
from cattn._varlen import cu_seqlens, packed_layout, readable_in_place
from cattn._validation import (check_float_dtype, check_int, check_ndarray,
                               check_cache_shape, check_new_positions, reject_masked)



def paged_attention(query: ArrayLike, key_cache: ArrayLike, value_cache: ArrayLike,
                    block_table: ArrayLike, seq_lens: ArrayLike, *,
                    cu_seqlens_q: Optional[ArrayLike] = None,
                    attn_mask: Optional[ArrayLike] = None, is_causal: bool = False,
                    scale: Optional[float] = None, enable_gqa: bool = False,
                    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                    softcap: Optional[float] = None, sinks: Optional[ArrayLike] = None,
                    keep_first: Optional[int] = None,
                    alibi_slopes: Optional[ArrayLike] = None, return_lse: bool = False,
                    return_weights: bool = False, return_key_mass: bool = False, out: Optional[NDArray[Any]] = None,
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
    scale, enable_gqa, window, softcap, sinks, keep_first, alibi_slopes, return_lse,
    return_weights, return_key_mass, out, num_threads, out_dtype
        As in `scaled_dot_product_attention`; the diagonal of `is_causal` and `window` is
        bottom-right (each sequence's last query is aligned with its last key). The weights
        are (B, Hq, L, max_blocks · block_size), 0 past each sequence's length, and the
        key mass (B, Hq, max_blocks · block_size), by key position.

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
    plan.set_extras(keep_first, None, sinks, batch_shape, S, alibi_slopes)
    inputs = (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
              ("attn_mask", attn_mask))
    # (splits and block sizes follow the longest sequence, not the table's capacity:
    # chunks past every sequence's end would be empty tasks)
    plan.longest_keys = int(seq_lens.max(initial=0))
    if packed:
        plan.set_outputs((Tq, Hq, Ev), (Hq, Tq), None, inputs, batch_shape + (S,))
        k_head_stride, v_head_stride = _pages(plan, block_table)
        packed_layout(plan, cu_q, q_len, seq_lens, seq_lens - q_len, group, 0,
                      k_head_stride, 0, v_head_stride)
        plan.table[:, _Column.PAGES] = np.repeat(np.arange(B, dtype=np.intp) * max_blocks,
                                                 Hq)
    else:
        plan.set_outputs(batch_shape + (L, Ev), batch_shape + (L,), batch_shape + (L, S),
                         inputs, batch_shape + (S,))
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

class _Sequence:
    """One sequence of a paged cache: its pages, in order, and its length in each layer."""
    __slots__ = ("pages", "lengths")

    def __init__(self, pages, lengths):
        self.pages = pages
        self.lengths = lengths


class PagedKVCache:
    """Keys and values of many sequences in pages of one preallocated pool.

    - `keys`   (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
    - `values` (num_layers, num_blocks, num_kv_heads, block_size, value_dim)

    A sequence holds a list of pages (its row of `block_table()`), taken from the free list
    as it grows, block_size positions at a time, so sequences of any lengths share the pool
    without padding. `fork(src, dst)` starts a sequence from another's prefix (a prompt
    sampled several times): the full pages are shared, not copied, with reference counts;
    a page is copied before a shared one would be written (copy-on-write), and the partly
    filled last page is copied at once. `free(seq)` returns a sequence's pages to the pool.
    The pages of all layers move together: page p of every layer belongs to one sequence.

    `MultiHeadAttention(..., cache=cache)` (or `cache=cache.layer(i)` for a stack of
    layers) appends the new keys and values of every live sequence, in the order of
    `sequences` (one batch row each), and attends with `paged_attention`.

    Parameters
    ----------
    num_blocks : int
        Pages in the pool.
    block_size : int
        Positions per page.
    num_kv_heads, head_dim : int
        As the layer's `num_kv_heads` and `head_dim`.
    num_layers : int
        Layers sharing the pages (one per attention layer of a model).
    value_dim : int, optional
        The size of a value head (default head_dim).
    dtype : float32, float64, float16 or bfloat16
        (float16 and bfloat16 pages serve float32 layers: appended keys and values are
        rounded as written, attention computes in float32)

    Raises
    ------
    TypeError
        A size that is not an integer, a dtype other than those above (int8 included).
    ValueError
        A size below 1 (num_blocks may be 0).

    See Also
    --------
    paged_attention : attention over such pages through a block table.
    KVCache : one contiguous, preallocated slot per sequence.

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> cache = cattn.PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    >>> prompt = cache.add_sequence()
    >>> k = np.ones((1, 2, 6, 8), dtype=np.float32)          # 6 positions: 2 pages
    >>> cache.layer(0).append(k, k)
    >>> sample = cache.fork(prompt)                        # the full page shared, not copied
    >>> cache.block_table().tolist(), cache.num_free_blocks
    ([[0, 1], [0, 2]], 5)
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, num_layers: int = 1, value_dim: Optional[int] = None,
                 dtype: DTypeLike = np.float32) -> None:
        self.num_blocks = check_int(num_blocks, "num_blocks", 0)
        self.block_size = check_int(block_size, "block_size", 1)
        (self.num_kv_heads, self.head_dim, self.num_layers, self.value_dim,
         _) = check_cache_shape(num_kv_heads, head_dim, num_layers, value_dim, np.float32)
        self.dtype = _dtypes.cache_dtype(dtype)
        if self.dtype == np.int8:
            raise TypeError("a PagedKVCache stores float32, float64, float16 or bfloat16 "
                            "(int8 needs a scale per position, which pages do not carry), "
                            "got int8")
        if self.num_blocks > _INT32_MAX:
            raise ValueError(f"num_blocks must be below 2**31 (int32 page numbers), got "
                             f"{self.num_blocks}")
        lead = (self.num_layers, self.num_blocks, self.num_kv_heads, self.block_size)
        self.keys = np.zeros(lead + (self.head_dim,), dtype=self.dtype)
        self.values = np.zeros(lead + (self.value_dim,), dtype=self.dtype)
        self.ref_counts = np.zeros(self.num_blocks, dtype=np.intp)  # sequences per page
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))  # lowest first
        self._seqs: Dict[int, _Sequence] = {}

    @classmethod
    def for_layer(cls, mha: Any, batch_size: int, max_len: int, block_size: int = 16, *,
                  num_layers: int = 1, num_sequences: Optional[int] = None,
                  dtype: Optional[DTypeLike] = None) -> "PagedKVCache":
        """A cache shaped for `mha` (its key/value heads and head size) with pages for
        batch_size sequences of max_len positions, and num_sequences (default batch_size)
        empty sequences 0, 1, ... to start with; storing the layer's dtype or, for a
        float32 layer, `dtype` (float16 or bfloat16)."""
        from cattn.layers import MultiHeadAttention
        if not isinstance(mha, MultiHeadAttention):
            raise TypeError(f"mha must be a MultiHeadAttention, got {type(mha).__name__}")
        batch_size = check_int(batch_size, "batch_size", 1)
        max_len = check_int(max_len, "max_len", 1)
        block_size = check_int(block_size, "block_size", 1)
        num_sequences = (batch_size if num_sequences is None
                         else check_int(num_sequences, "num_sequences", 0))
        cache = cls(batch_size * -(-max_len // block_size), block_size, mha.num_kv_heads,
                    mha.head_dim, num_layers=num_layers,
                    dtype=mha.dtype if dtype is None else dtype)
        if not (cache.dtype == mha.dtype or (mha.dtype == np.float32 and
                                             _dtypes.is_half(cache.dtype))):
            raise TypeError(f"a {mha.dtype} layer needs a cache of {mha.dtype}"
                            + (" (or float16, bfloat16)" if mha.dtype == np.float32 else "")
                            + f", got dtype {cache.dtype}")
        for _ in range(num_sequences):
            cache.add_sequence()
        return cache

    # ---------------------------------------------------------------- sequences

    @property
    def sequences(self) -> Tuple[int, ...]:
        """The live sequences' ids, ascending: the batch rows of a layer's call."""
        return tuple(sorted(self._seqs))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def _sequence(self, seq, name="seq"):
        seq = check_int(seq, name)
        if seq not in self._seqs:
            raise ValueError(f"{name}={seq} is not a live sequence of this cache (live: "
                             f"{list(self.sequences)})")
        return seq, self._seqs[seq]

    def _new_id(self, seq):
        if seq is None:
            return max(self._seqs, default=-1) + 1
        seq = check_int(seq, "seq", 0)
        if seq in self._seqs:
            raise ValueError(f"sequence {seq} already exists (free it first)")
        return seq

    def add_sequence(self, seq: Optional[int] = None) -> int:
        """Start an empty sequence (id `seq`, default one past the largest); its id."""
        seq = self._new_id(seq)
        self._seqs[seq] = _Sequence([], np.zeros(self.num_layers, dtype=np.intp))
        return seq

    def length(self, seq: int, layer: int = 0) -> int:
        """Positions sequence `seq` holds in `layer`."""
        return int(self._sequence(seq)[1].lengths[self._layer_index(layer)])

    def _layer_index(self, index):
        index = check_int(index, "layer index")
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range for a cache of {self.num_layers} "
                             f"layers")
        return index % self.num_layers

    def _take_page(self):
        page = self._free.pop()
        self.ref_counts[page] = 1
        return page

    def _release(self, pages):
        for page in pages:
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self._free.append(page)

    def _copy_page(self, page):
        """A new page holding what `page` holds, in every layer."""
        new = self._take_page()
        self.keys[:, new] = self.keys[:, page]
        self.values[:, new] = self.values[:, page]
        return new

    def _out_of_blocks(self, needed, what):
        return ValueError(
            f"the paged cache is out of blocks: {what} needs {needed} free blocks, "
            f"{len(self._free)} of {self.num_blocks} are free (free finished sequences "
            f"with free(seq), or make the cache with more num_blocks)")

    def fork(self, src: int, dst: Optional[int] = None) -> int:
        """Start sequence `dst` (default: a new id) as a copy of `src`'s positions; its id.

        The full pages are shared (reference counted, copied only before either sequence
        would write to one); a partly filled last page is copied at once, since both
        sequences write to it next. Raises ValueError when no page is free for that copy,
        or when src's layers hold different lengths (fork between steps of the model)."""
        src, source = self._sequence(src, "src")
        lengths = source.lengths
        if np.any(lengths != lengths[0]):
            raise ValueError(f"sequence {src} holds {lengths.tolist()} positions in its "
                             f"layers: fork it when every layer has appended the same "
                             f"positions")
        dst = self._new_id(dst)
        full, partial = divmod(int(lengths[0]), self.block_size)
        if partial and not self._free:
            raise self._out_of_blocks(1, f"forking sequence {src}")
        pages = source.pages[:full]
        for page in pages:
            self.ref_counts[page] += 1
        pages = list(pages)
        if partial:
            pages.append(self._copy_page(source.pages[full]))
        self._seqs[dst] = _Sequence(pages, lengths.copy())
        return dst

    def truncate(self, seq: int, length: int) -> None:
        """Keep the first `length` positions of `seq` in every layer (drop rejected draft
        tokens, say), returning the pages past them to the pool."""
        seq, sequence = self._sequence(seq)
        longest = int(sequence.lengths.min())
        length = check_int(length, "length", 0)
        if length > longest:
            raise ValueError(f"length must be at most the {longest} positions sequence "
                             f"{seq} holds, got {length}")
        keep = -(-length // self.block_size)
        self._release(sequence.pages[keep:])
        del sequence.pages[keep:]
        sequence.lengths[:] = length

    def free(self, seq: int) -> None:
        """End sequence `seq`: its pages go back to the pool (shared ones once no other
        sequence holds them)."""
        seq, sequence = self._sequence(seq)
        self._release(sequence.pages)
        del self._seqs[seq]

    def block_table(self, sequences: Optional[Sequence[int]] = None) -> NDArray[np.int32]:
        """The pages of `sequences` (default: every live one, ascending), one row each,
        padded with -1: (len(sequences), most pages held) int32."""
        seqs = [self._sequence(s)[1] for s in (self.sequences if sequences is None
                                                else sequences)]
        width = max((len(s.pages) for s in seqs), default=0)
        table = np.full((len(seqs), width), -1, dtype=np.int32)
        for row, s in zip(table, seqs):
            row[:len(s.pages)] = s.pages
        return table

    # ---------------------------------------------------------------- layers

    def layer(self, index: int) -> "PagedKVCacheLayer":
        """Layer `index`'s view of the cache."""
        return PagedKVCacheLayer(self, self._layer_index(index))

    __getitem__ = layer

    def __len__(self) -> int:
        return self.num_layers

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def __repr__(self):
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_layers={self.num_layers}, value_dim={self.value_dim}, "
                f"dtype={self.dtype.name})")


class PagedKVCacheLayer:
    """One layer of a PagedKVCache: `keys` (num_blocks, Hkv, block_size, D) and `values`
    are views of the cache's pools; the pages and sequences are the cache's."""

    def __init__(self, cache, index):
        self.cache, self.index = cache, index
        self.keys = cache.keys[index]
        self.values = cache.values[index]
        for name in ("num_blocks", "block_size", "num_kv_heads", "head_dim", "value_dim",
                     "dtype"):
            setattr(self, name, getattr(cache, name))
        # what append takes: the stored dtype, and float32 for half pages (rounded)
        self.input_dtypes = ((self.dtype, np.dtype(np.float32)) if _dtypes.is_half(self.dtype)
                             else (self.dtype,))

    def __repr__(self):
        return f"<layer {self.index} of {self.cache!r}, lengths {self.seq_lens().tolist()}>"

    @property
    def batch_size(self) -> int:
        return len(self.cache._seqs)

    def seq_lens(self, sequences: Optional[Sequence[int]] = None) -> NDArray[np.intp]:
        """Positions held in this layer by `sequences` (default every live one, ascending)."""
        cache = self.cache
        seqs = cache.sequences if sequences is None else sequences
        return np.array([cache._sequence(s)[1].lengths[self.index] for s in seqs],
                        dtype=np.intp)

    def append(self, keys: NDArray[Any], values: NDArray[Any],
               num_new: Optional[ArrayLike] = None) -> None:
        """Write new positions after each live sequence's cached ones (batch row b is
        sequence `cache.sequences[b]`), taking pages from the pool as needed.

        keys : (B, Hkv, T, D) and values : (B, Hkv, T, Dv), the cache's dtype.
        num_new : (B,) ints, optional
            How many of the T new positions are real per sequence (default all): the last
            num_new[b] (left padding).
        Raises ValueError, changing nothing, when the pool lacks the pages.
        """
        cache = self.cache
        seq_ids = cache.sequences
        bs = self.block_size
        T, num_new = check_new_positions(self, keys, values, num_new, "sequences")
        seqs = [cache._seqs[s] for s in seq_ids]
        starts = [int(s.lengths[self.index]) for s in seqs]
        # Pages first (all or nothing): new ones past each sequence's last page, and a
        # private copy of every shared page about to be written.
        needed = 0
        for s, start, n in zip(seqs, starts, num_new):
            if n:
                first, last = start // bs, (start + n - 1) // bs
                needed += max(0, last + 1 - len(s.pages))
                needed += sum(cache.ref_counts[p] > 1
                              for p in s.pages[first:min(last + 1, len(s.pages))])
        if needed > cache.num_free_blocks:
            raise cache._out_of_blocks(needed, f"appending {int(num_new.sum())} positions")
        page_of, row_of, batch_of, step_of = [], [], [], []
        for b, (s, start, n) in enumerate(zip(seqs, starts, num_new)):
            if not n:
                continue
            first, last = start // bs, (start + n - 1) // bs
            for i in range(first, last + 1):
                if i == len(s.pages):
                    s.pages.append(cache._take_page())
                elif cache.ref_counts[s.pages[i]] > 1:  # shared: copy before writing
                    shared = s.pages[i]
                    s.pages[i] = cache._copy_page(shared)
                    cache._release([shared])
            positions = np.arange(start, start + n)
            page_of.append(np.asarray(s.pages, dtype=np.intp)[positions // bs])
            row_of.append(positions % bs)
            batch_of.append(np.full(n, b))
            step_of.append(np.arange(T - n, T))
            s.lengths[self.index] = start + n
        if page_of:
            pages, rows = np.concatenate(page_of), np.concatenate(row_of)
            items, steps = np.concatenate(batch_of), np.concatenate(step_of)
            self.keys[pages, :, rows] = keys[items, :, steps]
            self.values[pages, :, rows] = values[items, :, steps]

"""The key/value caches of incremental decoding.

`KVCache` keeps one preallocated slot of max_len positions per sequence; `PagedKVCache`
keeps every sequence in pages of one pool, taken as it grows and shared between forks
(copy-on-write). Both hold the keys and values of all layers in one allocation,
(num_layers, ...) arrays whose layer i is a view, `cache.layer(i)`: what
`MultiHeadAttention(..., cache=...)` takes, whose `append` writes new positions after each
sequence's cached ones, checked the same way for both.

The caches know nothing of the layers that use them (cattn.layers imports this module,
never the other way round).
"""
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn import _dtypes
from cattn._dtypes import quantize_kv
from cattn._validation import FLOAT_DTYPES, check_cache_shape, check_int, check_ndarray

_INT32_MAX = 2**31 - 1



def _serves(cache_dtype, layer_dtype):
    """Whether a cache storing cache_dtype serves a layer computing in layer_dtype: its own
    dtype, or float16, bfloat16 and int8 for float32 layers."""
    return cache_dtype == layer_dtype or (layer_dtype == np.float32 and
                                          cache_dtype not in FLOAT_DTYPES)


def _is_attention_layer(mha):
    """Whether mha is a MultiHeadAttention: one exists only once cattn.layers is loaded, so
    it is looked up there rather than imported (cattn.layers imports the caches)."""
    layers = sys.modules.get("cattn.layers")
    return layers is not None and isinstance(mha, layers.MultiHeadAttention)


class _Cache:
    """What both caches share: keys and values of every layer in one pair of arrays whose
    first axis is the layer, seen one layer at a time through `layer(i)` (or `cache[i]`)."""

    _narrower: str               # what a float32 layer may store instead, for messages
    _fields: Tuple[str, ...]     # the constructor arguments repr shows (dtype aside)
    num_layers: int

    def _set_shape(self, num_kv_heads, head_dim, num_layers, value_dim, dtype):
        """The sizes and stored dtype both caches take, checked."""
        (self.num_kv_heads, self.head_dim, self.num_layers, self.value_dim,
         _) = check_cache_shape(num_kv_heads, head_dim, num_layers, value_dim, np.float32)
        self.dtype = _dtypes.cache_dtype(dtype)

    def _allocate(self, lead):
        """keys and values of shape lead + (head_dim | value_dim,), zeroed."""
        self.keys = np.zeros(lead + (self.head_dim,), dtype=self.dtype)
        self.values = np.zeros(lead + (self.value_dim,), dtype=self.dtype)

    @staticmethod
    def _check_layer(mha):
        if not _is_attention_layer(mha):
            raise TypeError(f"mha must be a MultiHeadAttention, got {type(mha).__name__}")

    def _check_serves(self, mha):
        """The cache made for mha stores what mha computes with."""
        if not _serves(self.dtype, mha.dtype):
            raise TypeError(f"a {mha.dtype} layer needs a cache of {mha.dtype}"
                            + (f" (or {self._narrower})" if mha.dtype == np.float32
                               else "") + f", got dtype {self.dtype}")

    def _layer_index(self, index):
        index = check_int(index, "layer index")
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range for a cache of {self.num_layers} "
                             f"layers")
        return index % self.num_layers

    def layer(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        return self.layer(index)

    def __len__(self) -> int:
        return self.num_layers

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return self.keys.nbytes + self.values.nbytes

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self._fields)
        return f"{type(self).__name__}({fields}, dtype={self.dtype.name})"


class _CacheLayer:
    """What both caches' layer views share: `keys` and `values`, the layer's slices of the
    cache's arrays; the cache's sizes; and the check of the positions `append` takes."""

    _shared = ("num_kv_heads", "head_dim", "value_dim", "dtype")

    def __init__(self, cache, index):
        self.cache, self.index = cache, index
        self.keys = cache.keys[index]
        self.values = cache.values[index]
        for name in self._shared:
            setattr(self, name, getattr(cache, name))
        # what append takes: the stored dtype, and float32 for the narrower ones (rounded,
        # or quantized for int8, which takes float32 only)
        self.input_dtypes = ((self.dtype,) if self.dtype in FLOAT_DTYPES else
                             (np.dtype(np.float32),) if self.dtype == np.int8 else
                             (self.dtype, np.dtype(np.float32)))

    def __repr__(self):
        return f"<layer {self.index} of {self.cache!r}, lengths {self._lengths().tolist()}>"

    def _new_positions(self, keys, values, num_new, batch_name):
        """append's keys (B, Hkv, T, D) and values (B, Hkv, T, Dv) of an accepted dtype,
        num_new (B,) ints in [0, T] or None (all T). Returns (T, num_new as intp)."""
        B, Hkv = self.batch_size, self.num_kv_heads
        for name, x, width in (("keys", keys, self.head_dim),
                               ("values", values, self.value_dim)):
            check_ndarray(x, name)
            if x.dtype not in self.input_dtypes:
                raise TypeError(f"{name} has dtype {x.dtype}, the cache holds {self.dtype} "
                                f"(and takes "
                                f"{' or '.join(d.name for d in self.input_dtypes)})")
            if x.ndim != 4 or x.shape[0] != B or x.shape[1] != Hkv or x.shape[3] != width:
                raise ValueError(f"{name} must have shape ({batch_name}={B}, kv_heads={Hkv}, "
                                 f"new, {width}), got {x.shape}")
        T = keys.shape[2]
        if values.shape[2] != T:
            raise ValueError(f"keys and values must hold the same number of new positions, "
                             f"got {keys.shape} and {values.shape}")
        if num_new is None:
            return T, np.full(B, T, dtype=np.intp)
        num_new = np.asarray(num_new)
        if num_new.dtype.kind not in "iu":
            raise TypeError(f"num_new must be integers, got dtype {num_new.dtype}")
        if num_new.shape != (B,) or num_new.min(initial=0) < 0 or num_new.max(initial=0) > T:
            raise ValueError(f"num_new must be {B} integers in [0, {T}], got {num_new}")
        return T, num_new.astype(np.intp)


class KVCache(_Cache):
    """Preallocated keys and values for incremental (token by token, or chunked) decoding.

    One pair of arrays for all layers, allocated once:

    - `keys`   (num_layers, batch_size, num_kv_heads, max_len, head_dim)
    - `values` (num_layers, batch_size, num_kv_heads, max_len, value_dim)
    - `lengths` (num_layers, batch_size): the valid positions of each layer and sequence.

    `cache.layer(i)` (or `cache[i]`) is layer i's view (arrays shared, nothing copied): it is
    what `MultiHeadAttention(..., cache=...)` takes (a one-layer KVCache may be passed
    itself), and its `append` writes new keys/values after each sequence's valid ones and
    grows the lengths, never reallocating. Sequences may have different lengths (ragged
    prompts: left-pad them and pass a key_padding_mask). Appending past `max_len` raises
    ValueError and changes nothing.

    Parameters
    ----------
    batch_size : int
        Sequences decoded together.
    max_len : int
        Positions each sequence can hold.
    num_kv_heads, head_dim : int
        The key/value heads and their size (as the layer's `num_kv_heads`, `head_dim`).
    num_layers : int
        Layers sharing the allocation (one per attention layer of a model).
    value_dim : int, optional
        The size of a value head (default `head_dim`).
    dtype : float32, float64, float16, bfloat16 or int8
        How keys and values are stored. float16 and bfloat16 (`ml_dtypes.bfloat16`) hold
        half the bytes of float32, int8 a quarter plus one float32 scale per (token, head)
        (`key_scales`, `value_scales`, computed on append: symmetric, max |x| / 127 of
        each row, as `cattn.quantize_kv`). Those caches serve float32 layers, which append
        float32 keys and values (rounded, or quantized, as they are written) and attend
        reading the stored type, never a converted copy of the cache.

    Raises
    ------
    TypeError
        A size that is not an integer, a dtype other than those.
    ValueError
        A size below 1.

    See Also
    --------
    KVCache.for_layer : a cache shaped for a MultiHeadAttention layer.
    MultiHeadAttention : takes a cache as `cache=` when called.

    Examples
    --------
    >>> import cattn
    >>> cache = cattn.KVCache(batch_size=2, max_len=16, num_kv_heads=2, head_dim=4,
    ...                       num_layers=3)
    >>> cache.keys.shape, len(cache), cache.layer(1).lengths.tolist()
    ((3, 2, 2, 16, 4), 3, [0, 0])
    """

    _narrower = "float16, bfloat16, int8"
    _fields = ("batch_size", "max_len", "num_kv_heads", "head_dim", "num_layers", "value_dim")

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 num_layers: int = 1, value_dim: Optional[int] = None,
                 dtype: DTypeLike = np.float32) -> None:
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.max_len = check_int(max_len, "max_len", 1)
        self._set_shape(num_kv_heads, head_dim, num_layers, value_dim, dtype)
        lead = (self.num_layers, self.batch_size, self.num_kv_heads, self.max_len)
        self._allocate(lead)
        self.lengths = np.zeros((self.num_layers, self.batch_size), dtype=np.intp)
        # int8: one scale per (token, head), as quantize_kv computes them (None otherwise)
        quantized = self.dtype == np.int8
        self.key_scales = np.ones(lead, np.float32) if quantized else None
        self.value_scales = np.ones(lead, np.float32) if quantized else None

    @classmethod
    def for_layer(cls, mha: Any, batch_size: int, max_len: int, *,
                  num_layers: int = 1, dtype: Optional[DTypeLike] = None) -> "KVCache":
        """A cache shaped for `mha` (a MultiHeadAttention: its key/value heads and head
        size), storing its dtype or, for a float32 layer, `dtype` (float16, bfloat16 or
        int8)."""
        cls._check_layer(mha)
        cache = cls(batch_size, max_len, mha.num_kv_heads, mha.head_dim, num_layers=num_layers,
                    dtype=mha.dtype if dtype is None else dtype)
        cache._check_serves(mha)
        return cache

    def layer(self, index: int) -> "KVCacheLayer":
        """Layer `index`'s view of the cache."""
        return KVCacheLayer(self, self._layer_index(index))

    def reset(self, batch_index: Optional[int] = None) -> None:
        """Forget the cached positions (of all sequences, or of one), keeping the memory."""
        if batch_index is None:
            self.lengths[...] = 0
            return
        batch = self.lengths.shape[1]
        batch_index = check_int(batch_index, "batch_index",
                                expected="an int (one sequence) or None (all)")
        if not -batch <= batch_index < batch:
            raise ValueError(f"batch_index must lie in [{-batch}, {batch}), got {batch_index}")
        self.lengths[:, batch_index] = 0

    @property
    def nbytes(self) -> int:
        """Bytes held: keys and values (and int8's scales)."""
        scales = (0 if self.key_scales is None
                  else self.key_scales.nbytes + self.value_scales.nbytes)
        return self.keys.nbytes + self.values.nbytes + scales


class KVCacheLayer(_CacheLayer):
    """One layer of a KVCache: `keys` (B, Hkv, max_len, D), `values` (B, Hkv, max_len, Dv)
    and `lengths` (B,) are views of the cache's arrays."""

    _shared = _CacheLayer._shared + ("batch_size", "max_len")

    def __init__(self, cache, index):
        super().__init__(cache, index)
        self.lengths = cache.lengths[index]
        self.key_scales = None if cache.key_scales is None else cache.key_scales[index]
        self.value_scales = None if cache.value_scales is None else cache.value_scales[index]

    def _lengths(self):
        return self.lengths

    def append(self, keys: NDArray[Any], values: NDArray[Any],
               num_new: Optional[ArrayLike] = None) -> None:
        """Write new positions after each sequence's cached ones and grow its length.

        keys : (B, Hkv, T, D) and values : (B, Hkv, T, Dv), the cache's dtype (any strides);
            float32 for a float16 or bfloat16 cache (rounded as written) and for an int8
            one (quantized, each (token, head) row with its own scale).
        num_new : (B,) ints, optional
            How many of the T new positions are real for each sequence (default all): the
            last num_new[b] (left padding), written at positions lengths[b] onwards.
        Raises ValueError (changing nothing) when a sequence would exceed max_len.
        """
        B = self.batch_size
        T, num_new = self._new_positions(keys, values, num_new, "batch")
        new_lengths = self.lengths + num_new
        if new_lengths.max(initial=0) > self.max_len:
            b = int(np.argmax(new_lengths))
            raise ValueError(f"KV cache overflow: sequence {b} holds {self.lengths[b]} of "
                             f"max_len={self.max_len} positions and {num_new[b]} more do not "
                             f"fit (make the cache with a larger max_len)")
        writes = [(self.keys, keys), (self.values, values)]
        if self.key_scales is not None:
            (keys, key_scales), (values, value_scales) = quantize_kv(keys), quantize_kv(values)
            writes = [(self.keys, keys), (self.values, values), (self.key_scales, key_scales),
                      (self.value_scales, value_scales)]
        start = self.lengths
        # (positions are axis 2 of every stored array: the scales just lack the features)
        for stored, new in writes:
            if np.all(start == start[0]) and np.all(num_new == T):
                # The common case: one slice for the whole batch.
                stored[:, :, start[0]:start[0] + T] = new
            elif T == 1 and np.all(num_new == 1):
                # Decoding sequences of different lengths: one token each, one scatter.
                stored[np.arange(B), :, start] = new[:, :, 0]
            else:
                for b in range(B):
                    n, s = num_new[b], start[b]
                    stored[b, :, s:s + n] = new[b, :, T - n:]
        self.lengths[...] = new_lengths



class _Sequence:
    """One sequence of a paged cache: its pages, in order, and its length in each layer."""
    __slots__ = ("pages", "lengths")

    def __init__(self, pages, lengths):
        self.pages = pages
        self.lengths = lengths


class PagedKVCache(_Cache):
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

    _narrower = "float16, bfloat16"
    _fields = ("num_blocks", "block_size", "num_kv_heads", "head_dim", "num_layers",
               "value_dim")

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, num_layers: int = 1, value_dim: Optional[int] = None,
                 dtype: DTypeLike = np.float32) -> None:
        self.num_blocks = check_int(num_blocks, "num_blocks", 0)
        self.block_size = check_int(block_size, "block_size", 1)
        self._set_shape(num_kv_heads, head_dim, num_layers, value_dim, dtype)
        if self.dtype == np.int8:
            raise TypeError("a PagedKVCache stores float32, float64, float16 or bfloat16 "
                            "(int8 needs a scale per position, which pages do not carry), "
                            "got int8")
        if self.num_blocks > _INT32_MAX:
            raise ValueError(f"num_blocks must be below 2**31 (int32 page numbers), got "
                             f"{self.num_blocks}")
        self._allocate((self.num_layers, self.num_blocks, self.num_kv_heads, self.block_size))
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
        cls._check_layer(mha)
        batch_size = check_int(batch_size, "batch_size", 1)
        max_len = check_int(max_len, "max_len", 1)
        block_size = check_int(block_size, "block_size", 1)
        num_sequences = (batch_size if num_sequences is None
                         else check_int(num_sequences, "num_sequences", 0))
        cache = cls(batch_size * -(-max_len // block_size), block_size, mha.num_kv_heads,
                    mha.head_dim, num_layers=num_layers,
                    dtype=mha.dtype if dtype is None else dtype)
        cache._check_serves(mha)
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

    def _pages_to_take(self, seqs, starts, num_new, block_size):
        """The free pages that writing num_new[b] positions from starts[b] into seqs[b]
        takes, in the order of the writers: (sequence, page index) for a new page past its
        last one, or for a private copy of a shared page. A page shared by several writers
        is copied by all but the last, who holds it alone by then."""
        holders = {}  # shared page -> its holders not yet copied away from it
        plan = []
        for s, start, n in zip(seqs, starts, num_new):
            if not n:
                continue
            first, last = start // block_size, (start + n - 1) // block_size
            for i in range(first, last + 1):
                if i >= len(s.pages):
                    plan.append((s, i))
                    continue
                page = s.pages[i]
                count = holders.get(page, self.ref_counts[page])
                if count > 1:
                    plan.append((s, i))
                    holders[page] = count - 1
        return plan

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


class PagedKVCacheLayer(_CacheLayer):
    """One layer of a PagedKVCache: `keys` (num_blocks, Hkv, block_size, D) and `values`
    are views of the cache's pools; the pages and sequences are the cache's."""

    _shared = _CacheLayer._shared + ("num_blocks", "block_size")

    def _lengths(self):
        return self.seq_lens()

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
        T, num_new = self._new_positions(keys, values, num_new, "sequences")
        seqs = [cache._seqs[s] for s in seq_ids]
        starts = [int(s.lengths[self.index]) for s in seqs]
        # Pages first (all or nothing): plan every page taken, then take them.
        plan = cache._pages_to_take(seqs, starts, num_new, bs)
        if len(plan) > cache.num_free_blocks:
            raise cache._out_of_blocks(len(plan), f"appending {int(num_new.sum())} positions")
        for s, i in plan:
            if i == len(s.pages):
                s.pages.append(cache._take_page())
            else:  # shared: copy before writing
                shared = s.pages[i]
                s.pages[i] = cache._copy_page(shared)
                cache._release([shared])
        page_of, row_of, batch_of, step_of = [], [], [], []
        for b, (s, start, n) in enumerate(zip(seqs, starts, num_new)):
            if not n:
                continue
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

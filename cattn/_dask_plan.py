"""The plan of a Dask attention call: one batch shape and its chunks (every input
rechunked to match them), each item's key length and positions, and which (query chunk,
key chunk) pairs see something (cattn._visibility's rule).

Part of cattn.dask, which imports it (it needs Dask).
"""
import itertools
import math
from typing import Any, NamedTuple, Tuple

import numpy as np
import dask.array as da

from cattn import _api
from cattn._visibility import rows_see_keys


class BatchLayout(NamedTuple):
    """The inputs rechunked to one batch chunking (a leading axis of 1 broadcasts)."""
    query: Any
    key: Any
    value: Any
    mask: Any
    group: int                          # query heads per key/value head
    lead: int                           # number of batch axes
    batch_shape: Tuple[int, ...]
    batch_chunks: list                  # chunks of each batch axis
    key_chunks: Tuple[int, ...]


def batch_layout(query, key, value, attn_mask, enable_gqa):
    """One batch shape and its chunks (the query's, or the key's heads with GQA)."""
    E, Ev = query.shape[-1], value.shape[-1]
    nd = max(query.ndim, key.ndim, value.ndim)
    query, key, value = (x[(None,) * (nd - x.ndim)] for x in (query, key, value))
    group = query.shape[-3] // key.shape[-3] if enable_gqa else 1
    lead = nd - 2
    batch_shape = tuple(np.broadcast_shapes(
        *[x.shape[:lead - (1 if enable_gqa else 0)] for x in (query, key, value)]))
    if enable_gqa:
        batch_shape += (query.shape[-3],)
    batch_chunks = []
    for axis in range(lead):
        if enable_gqa and axis == lead - 1:
            batch_chunks.append(tuple(c * group for c in key.chunks[axis]))
            continue
        source = next((x for x in (query, key, value) if x.shape[axis] == batch_shape[axis]),
                      query)
        batch_chunks.append(source.chunks[axis])
    key_chunks = key.chunks[-2]

    def aligned(x, tail_chunks, heads_divisor=1):
        chunks = []
        for axis in range(lead):
            if x.shape[axis] == 1 and batch_shape[axis] != 1:
                chunks.append((1,))  # broadcast: every task reads its one chunk
            elif heads_divisor > 1 and axis == lead - 1:
                chunks.append(tuple(c // heads_divisor for c in batch_chunks[axis]))
            else:
                chunks.append(batch_chunks[axis])
        return x.rechunk(tuple(chunks) + tail_chunks)

    query = aligned(query, (query.chunks[-2], (E,)))
    key = aligned(key, (key_chunks, (E,)), group)
    value = aligned(value, (key_chunks, (Ev,)), group)
    mask = None
    if attn_mask is not None:
        mask = attn_mask if isinstance(attn_mask, da.Array) else da.from_array(attn_mask)
        mask = mask[(None,) * (nd - mask.ndim)]
        mask = aligned(mask, tuple(c if mask.shape[a] != 1 else (1,) for a, c in
                                   ((-2, query.chunks[-2]), (-1, key_chunks))))

    return BatchLayout(query, key, value, mask, group, lead, batch_shape, batch_chunks,
                       key_chunks)


def item_positions(key_lengths, q_offset, k_offset, alignment, window, is_causal,
                   batch_shape, L, S):
    """(kv_len, q_pos, k_pos, left, right): each item's key length and global positions
    (top-left offsets: bottom-right becomes one), and the window's sides (None: no
    limit)."""
    kv_len = np.full(batch_shape, S, dtype=np.int64) if key_lengths is None else \
        _per_item(key_lengths, "key_lengths", batch_shape, 0, S)
    if alignment == "bottom_right":
        if q_offset is not None or k_offset is not None:
            raise ValueError("q_offset and k_offset give global positions, which place the "
                             "diagonal themselves: use alignment='top_left'")
        q_pos = kv_len - L
    else:
        q_pos = _offset(q_offset, "q_offset", batch_shape)
    k_pos = _offset(k_offset, "k_offset", batch_shape)
    left = right = None
    if window is not None:
        left, right = window
    if is_causal:
        right = 0 if right is None else min(right, 0)

    return kv_len, q_pos, k_pos, left, right


def _per_item(x, name, batch_shape, low, high):
    """Validated per-item integers (cattn's rules), as an int64 array of batch_shape."""
    values = np.asarray(_api._per_item_integers(x, name, batch_shape, low, high),
                        dtype=np.int64)
    return np.broadcast_to(values, (math.prod(batch_shape),)).reshape(batch_shape)


def _offset(x, name, batch_shape):
    if x is None:
        return np.zeros(batch_shape, dtype=np.int64)
    return _per_item(x, name, batch_shape, -_api._MAX_OFFSET, _api._MAX_OFFSET)


def spans(chunks):
    """[(start, end)] of each chunk along an axis."""
    ends = list(itertools.accumulate(chunks))
    return [(end - n, end) for end, n in zip(ends, chunks)]


def pair_is_visible(kv_len, q_pos, k_pos, q0, q1, k0, k1, left, right):
    """Whether some query of rows [q0, q1) of some item sees some key of [k0, k1): key j
    (local) is visible to query i when j < kv_len and the position difference
    (k_pos + j) - (q_pos + i) lies in [-left, right]."""
    return rows_see_keys(q0, q1, k0, k1, q_pos - k_pos, kv_len, left, right)



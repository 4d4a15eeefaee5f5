"""Attention on Dask arrays: the same exact result, computed chunk by chunk on a cluster.

    pip install "cattn[dask]"

>>> import dask.array as da
>>> import cattn.dask
>>> q = da.ones((2, 4, 64, 16), chunks=(1, 2, 32, 16))         # (batch, heads, L, E)
>>> k = v = da.ones((2, 4, 96, 16), chunks=(1, 2, 48, 16))     # (batch, heads, S, E)
>>> cattn.dask.scaled_dot_product_attention(q, k, v, is_causal=True).compute().shape
(2, 4, 64, 16)

The chunking of the inputs is the plan:

- batch and head chunks are independent tasks, each one cattn call: bitwise equal to
  the same items of a single call over everything;
- chunks of the queries (L) are independent too: each knows its global position;
- chunks of the keys (S) give one task per (query chunk, key chunk) pair, returning its
  output and log-sum-exp; a tree of `merge_attention` tasks (`split_every` pieces at a
  time) combines them, equal to the single call up to rounding;
- a pair that causal masks, windows or key lengths hide entirely gets no task at all.

A KV cache placed on the workers with `persist_shards` stays there: each call then sends
only the queries to the shards and gathers (..., L, Ev) outputs with their lse.
"""
import functools
import itertools
import math
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("cattn.dask needs Dask: pip install 'cattn[dask]' (dask[array] and "
                      "distributed)") from error

import cattn
from cattn import _api
from cattn._visibility import rows_see_keys
from cattn._validation import check_int


__all__ = ["scaled_dot_product_attention", "persist_shards"]

_DEFAULT_SPLIT_EVERY = 8


def scaled_dot_product_attention(
        query: Any, key: Any, value: Any, attn_mask: Any = None, is_causal: bool = False,
        scale: Optional[float] = None, *, enable_gqa: bool = False,
        window: Optional[Tuple[Optional[int], Optional[int]]] = None,
        alignment: str = "top_left", key_lengths: Any = None, q_offset: Any = None,
        k_offset: Any = None, softcap: Optional[float] = None, return_lse: bool = False,
        num_threads: Optional[int] = None, split_every: Optional[int] = None,
) -> Union["da.Array", Tuple["da.Array", "da.Array"]]:
    """`cattn.scaled_dot_product_attention` on Dask arrays; returns Dask arrays.

    query (..., L, E), key (..., S, E) and value (..., S, Ev) are Dask arrays (NumPy arrays
    are wrapped as one chunk: a small query against a persisted cache, say). Their leading
    axes broadcast as in NumPy; the feature axes are taken whole (rechunked if needed);
    key and value share the key chunks of `key`; batch axes follow the query's chunks (with
    enable_gqa, the head axis follows the key's, times the group size).

    attn_mask may be a Dask or NumPy array broadcastable to (..., L, S): it is cut along
    the same chunks. key_lengths, q_offset and k_offset are ints or NumPy integer arrays
    (one per sequence, as in cattn): their values decide which chunk pairs are computed.
    The other options are cattn's. `return_weights` and `out` are not offered (the L×S
    weights of a problem that needs a cluster rarely fit anywhere).

    num_threads : int, optional
        Threads of each task's cattn call. By default, on a distributed worker, its threads
        divided by the tasks it is running at that moment; under Dask's local threaded
        scheduler, the cores divided by the pool's threads; in the synchronous scheduler,
        cattn's default. Each task's result does not depend on it.
    split_every : int, optional
        How many (out, lse) pieces one merge task combines (default 8): the fan-in of the
        tree reduction over key chunks.

    Returns
    -------
    out, a Dask array (..., L, Ev), or (out, lse) with lse (..., L).
    """
    query, key, value = (_as_dask(x, name) for x, name in
                         ((query, "query"), (key, "key"), (value, "value")))
    if attn_mask is not None and not isinstance(attn_mask, (da.Array, np.ndarray)):
        raise TypeError(f"attn_mask must be a Dask or NumPy array, got "
                        f"{type(attn_mask).__name__}")
    for name, x in (("key_lengths", key_lengths), ("q_offset", q_offset),
                    ("k_offset", k_offset)):
        if isinstance(x, da.Array):
            raise TypeError(f"{name} must be an int or a NumPy array: its values decide "
                            f"which chunks are computed (call .compute() on it first)")
    if num_threads is not None:
        num_threads = check_int(num_threads, "num_threads", 1)
    split_every = _DEFAULT_SPLIT_EVERY if split_every is None else \
        check_int(split_every, "split_every", 2)
    dtype = query.dtype
    L, E = query.shape[-2:]
    S, Ev = key.shape[-2], value.shape[-1]
    options = dict(is_causal=is_causal, scale=scale, window=window, softcap=softcap)
    _check_with_a_small_call(query, key, value, attn_mask, enable_gqa, alignment, options)

    # ---- one batch shape and its chunks (query's, or the key's heads with GQA)
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

    # ---- per-item lengths and positions (top-left offsets: bottom-right becomes one)
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

    # ---- the graph: one task per visible (batch block, query chunk, key chunk) ...
    token = tokenize(query, key, value, mask, kv_len, q_pos, k_pos, options, group,
                     num_threads, split_every)
    part_name, merge_name = f"cattn-part-{token}", f"cattn-merge-{token}"
    out_name, lse_name = f"cattn-out-{token}", f"cattn-lse-{token}"
    layers: Dict[Any, Any] = {}
    results: Tuple[Dict[Any, Any], Dict[Any, Any]] = ({}, {})
    task = functools.partial(_chunk_attention, options=options, enable_gqa=enable_gqa,
                             num_threads=num_threads)

    def block_index(x, b):
        return tuple(0 if x.shape[a] == 1 and batch_shape[a] != 1 else b[a]
                     for a in range(lead))

    batch_spans = [_spans(c) for c in batch_chunks]
    for b in itertools.product(*[range(len(c)) for c in batch_chunks]):
        items = tuple(slice(*spans[i]) for spans, i in zip(batch_spans, b))
        block_len, block_q, block_k = kv_len[items], q_pos[items], k_pos[items]
        block_shape = block_len.shape
        for i, (q0, q1) in enumerate(_spans(query.chunks[-2])):
            parts = []
            for j, (k0, k1) in enumerate(_spans(key_chunks)):
                if not _pair_is_visible(block_len, block_q, block_k, q0, q1, k0, k1, left,
                                        right):
                    continue
                mask_key = None
                if mask is not None:
                    mask_key = (mask.name,) + block_index(mask, b) + (
                        0 if mask.shape[-2] == 1 else i, 0 if mask.shape[-1] == 1 else j)
                part = (part_name,) + b + (i, j)
                layers[part] = (
                    task, (query.name,) + block_index(query, b) + (i, 0),
                    (key.name,) + block_index(key, b) + (j, 0),
                    (value.name,) + block_index(value, b) + (j, 0), mask_key,
                    np.clip(block_len - k0, 0, k1 - k0), block_q + q0, block_k + k0)
                parts.append(part)
            rows = (block_shape, q1 - q0, Ev)
            root = _tree(layers, parts, merge_name, b + (i,), split_every, rows, dtype)
            results[0][(out_name,) + b + (i, 0)] = (_first, root)
            results[1][(lse_name,) + b + (i,)] = (_second, root)

    inputs: List[Any] = [x for x in (query, key, value, mask) if x is not None]
    tasks = HighLevelGraph.from_collections(part_name, layers, dependencies=inputs)
    out = da.Array(_on_top(tasks, part_name, out_name, results[0]), out_name,
                   tuple(batch_chunks) + (query.chunks[-2], (Ev,)),
                   meta=np.empty((0,) * (lead + 2), dtype=dtype))
    if not return_lse:
        return out
    lse = da.Array(_on_top(tasks, part_name, lse_name, results[1]), lse_name,
                   tuple(batch_chunks) + (query.chunks[-2],),
                   meta=np.empty((0,) * (lead + 1), dtype=dtype))
    return out, lse


def _on_top(graph, below, name, layer):
    """graph plus one layer, `name`, that reads the layer `below`."""
    layers, dependencies = dict(graph.layers), dict(graph.dependencies)
    layers[name] = layer
    dependencies[name] = {below}
    return HighLevelGraph(layers, dependencies)


def persist_shards(client: Any, key: Any, value: Any,
                   workers: Optional[Sequence[str]] = None) -> Tuple["da.Array", "da.Array"]:
    """Persist a KV cache across a cluster, each key chunk with its value chunk on one worker.

    client : distributed.Client
    key, value : Dask (or NumPy) arrays (..., S, E) and (..., S, Ev); their chunks (value
        takes the key's) are the shards, given to `workers` (default: all) in turn.

    Returns the persisted (key, value) Dask arrays. Attention against them then runs each
    (query chunk, key chunk) task where its shard lives: a decoding step sends the queries
    and gathers outputs and lse, and the cache never moves (a plain `client.persist` may
    place a key chunk and its value chunk on different workers, which moves one of them
    at every step).
    """
    key, value = _as_dask(key, "key"), _as_dask(value, "value")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must have the same shape but for the last axis, got "
                         f"{key.shape} and {value.shape}")
    key = key.rechunk(key.chunks[:-1] + ((key.shape[-1],),))
    value = value.rechunk(key.chunks[:-1] + ((value.shape[-1],),))
    workers = list(workers) if workers is not None else sorted(
        client.scheduler_info()["workers"])
    if not workers:
        raise ValueError("no worker to hold the shards")
    shards = []
    for x in (key, value):
        blocks = np.empty(x.numblocks, dtype=object)
        for n, index in enumerate(np.ndindex(*x.numblocks)):
            future = client.compute(x.blocks[index], workers=[workers[n % len(workers)]],
                                    allow_other_workers=False)
            shape = tuple(c[i] for c, i in zip(x.chunks, index))
            blocks[index] = da.from_delayed(future, shape, dtype=x.dtype,
                                            meta=np.empty((0,) * x.ndim, dtype=x.dtype))
        shards.append(da.block(blocks.tolist()))
    return tuple(shards)


# --------------------------------------------------------------------- validation

def _as_dask(x, name):
    if isinstance(x, np.ndarray):
        x = da.from_array(x, chunks=x.shape or ())
    elif not isinstance(x, da.Array):
        raise TypeError(f"{name} must be a Dask array (or a NumPy array), got "
                        f"{type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.ndim < 2 or any(math.isnan(n) for n in x.shape):
        raise ValueError(f"{name} must have a known shape with at least 2 dimensions "
                         f"(..., length, features), got {x.shape}")
    return x


def _check_with_a_small_call(query, key, value, attn_mask, enable_gqa, alignment,
                             options):
    """Shapes, dtypes and scalar options checked up front by cattn itself, on tiny NumPy
    stand-ins of the same shapes except L = 0 and S <= 1 (nothing is computed)."""
    def stand_in(x, length):
        return np.zeros(x.shape[:-2] + (length, x.shape[-1]), dtype=x.dtype)
    L, S = query.shape[-2], key.shape[-2]
    small_mask = None
    if attn_mask is not None:
        if attn_mask.ndim < 2 or attn_mask.shape[-2] not in (1, L) or \
                attn_mask.shape[-1] not in (1, S):
            raise ValueError(f"attn_mask of shape {attn_mask.shape} does not broadcast to "
                             f"the attention shape (..., L, S) = (..., {L}, {S})")
        rows = 1 if attn_mask.shape[-2] == 1 else 0
        columns = min(attn_mask.shape[-1], 1)
        small_mask = np.zeros(attn_mask.shape[:-2] + (rows, columns), dtype=attn_mask.dtype)
    s = min(key.shape[-2], 1)
    cattn.scaled_dot_product_attention(
        stand_in(query, 0), stand_in(key, s), stand_in(value, s), small_mask,
        enable_gqa=enable_gqa, alignment=alignment, **options)


def _per_item(x, name, batch_shape, low, high):
    """Validated per-item integers (cattn's rules), as an int64 array of batch_shape."""
    values = np.asarray(_api._per_item_integers(x, name, batch_shape, low, high),
                        dtype=np.int64)
    return np.broadcast_to(values, (math.prod(batch_shape),)).reshape(batch_shape)


def _offset(x, name, batch_shape):
    if x is None:
        return np.zeros(batch_shape, dtype=np.int64)
    return _per_item(x, name, batch_shape, -_api._MAX_OFFSET, _api._MAX_OFFSET)


# --------------------------------------------------------------------------- plan

def _spans(chunks):
    """[(start, end)] of each chunk along an axis."""
    ends = list(itertools.accumulate(chunks))
    return [(end - n, end) for end, n in zip(ends, chunks)]


def _pair_is_visible(kv_len, q_pos, k_pos, q0, q1, k0, k1, left, right):
    """Whether some query of rows [q0, q1) of some item sees some key of [k0, k1): key j
    (local) is visible to query i when j < kv_len and the position difference
    (k_pos + j) - (q_pos + i) lies in [-left, right]."""
    return rows_see_keys(q0, q1, k0, k1, q_pos - k_pos, kv_len, left, right)


def _tree(layers, parts, name, index, split_every, rows, dtype):
    """Merge tasks over `parts` (split_every at a time); returns the key of the root."""
    if not parts:
        root = (name, "empty") + index
        layers[root] = (_no_keys, rows, dtype)
        return root
    level = 0
    while len(parts) > 1:
        merged = []
        for n in range(0, len(parts), split_every):
            group = parts[n:n + split_every]
            if len(group) == 1:
                merged.append(group[0])
                continue
            node = (name, level, n // split_every) + index
            layers[node] = (_merge,) + tuple(group)
            merged.append(node)
        parts, level = merged, level + 1
    return parts[0]


# ----------------------------------------------------------------- what tasks run

def _task_threads():
    """Threads for one task: the worker's share, so that its tasks do not oversubscribe."""
    try:
        from distributed import get_worker
        state = get_worker().state
    except (ImportError, ValueError):
        state = None
    if state is not None:
        return max(1, state.nthreads // max(1, state.executing_count))
    if threading.current_thread() is threading.main_thread():
        return None  # the synchronous scheduler: the task is the only one running
    pool = dask.config.get("num_workers", None) or os.cpu_count() or 1
    return max(1, cattn.get_num_threads() // pool)


def _chunk_attention(query, key, value, mask, key_lengths, q_offset, k_offset, *,
                     options, enable_gqa, num_threads):
    """(out, lse) of one (query chunk, key chunk) pair, at its global positions."""
    threads = _task_threads() if num_threads is None else num_threads
    return cattn.scaled_dot_product_attention(
        query, key, value, mask, enable_gqa=enable_gqa, key_lengths=key_lengths,
        q_offset=q_offset, k_offset=k_offset, return_lse=True, num_threads=threads,
        **options)


def _merge(*parts):
    return cattn.merge_attention([p[0] for p in parts], [p[1] for p in parts])


# (Not operator.getitem: Dask's array optimizations take that for slicing an array.)
def _first(pair):
    return pair[0]


def _second(pair):
    return pair[1]


def _no_keys(rows, dtype):
    """A query chunk that sees no key at all: output 0 and lse -inf (cattn's convention)."""
    batch, length, ev = rows
    return (np.zeros(batch + (length, ev), dtype=dtype),
            np.full(batch + (length,), -np.inf, dtype=dtype))

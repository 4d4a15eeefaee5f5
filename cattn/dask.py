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
import math
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

try:
    import dask.array as da
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("cattn.dask needs Dask: pip install 'cattn[dask]' (dask[array] and "
                      "distributed)") from error

import cattn
from cattn._dask_graph import _task_threads, attention_graph  # noqa: F401 (a test hook)
from cattn._dask_plan import batch_layout, item_positions
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

    layout = batch_layout(query, key, value, attn_mask, enable_gqa)
    positions = item_positions(key_lengths, q_offset, k_offset, alignment, window, is_causal,
                               layout.batch_shape, L, S)
    return attention_graph(layout, positions, options, enable_gqa, num_threads, split_every,
                           return_lse)


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

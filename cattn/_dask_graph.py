"""The task graph of a Dask attention call, from its plan (cattn._dask_plan): one task per
visible (batch block, query chunk, key chunk), a tree of merges per query chunk, and the
functions those tasks run.

Part of cattn.dask, which imports it (it needs Dask).
"""
import functools
import itertools
import os
import threading
from typing import Any, Dict, List, Tuple

import numpy as np
import dask
import dask.array as da
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

import cattn
from cattn._dask_plan import pair_is_visible, spans


def attention_graph(layout, positions, options, enable_gqa, num_threads, split_every,
                    return_lse):
    """The output (and lse) Dask arrays of the call planned by layout and positions."""
    (query, key, value, mask, group, lead, batch_shape, batch_chunks,
     key_chunks) = layout
    kv_len, q_pos, k_pos, left, right = positions
    dtype = query.dtype
    Ev = value.shape[-1]
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

    batch_spans = [spans(c) for c in batch_chunks]
    for b in itertools.product(*[range(len(c)) for c in batch_chunks]):
        items = tuple(slice(*spans[i]) for spans, i in zip(batch_spans, b))
        block_len, block_q, block_k = kv_len[items], q_pos[items], k_pos[items]
        block_shape = block_len.shape
        for i, (q0, q1) in enumerate(spans(query.chunks[-2])):
            parts = []
            for j, (k0, k1) in enumerate(spans(key_chunks)):
                if not pair_is_visible(block_len, block_q, block_k, q0, q1, k0, k1, left,
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

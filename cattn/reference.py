"""The readable definition of attention, in plain NumPy, step by step.

This is what cattn computes, written for clarity rather than speed: it materializes the
full L×S matrix of scores. It has the same signature as
`cattn.scaled_dot_product_attention` (without out= and num_threads=), stays in the input
dtype (float32 stays float32), and is the baseline the benchmarks compare against. The
tests call it on float64 copies of their inputs as the independent ground truth.

The steps, as in the seeds: every query is scored against every key (Q·Kᵀ, scaled);
keys a query may not see are removed; a softmax turns each row of scores into weights
that sum to 1; each output is the weighted sum of the values.
"""
import math
from typing import Any, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cattn import _visibility as visibility

_Window = Optional[Tuple[Optional[int], Optional[int]]]


def _per_item(x, batch_shape):
    """x (an int, or an array over the leading batch axes) as (..., 1, 1) per item."""
    x = np.asarray(x)
    x = x.reshape(x.shape + (1,) * (len(batch_shape) - x.ndim))
    return np.broadcast_to(x, batch_shape)[..., None, None]


def visible_keys(L: int, S: int, is_causal: bool = False, window: _Window = None,
                 alignment: str = "top_left", key_lengths: Optional[ArrayLike] = None,
                 batch_shape: Tuple[int, ...] = (), q_offset: Optional[ArrayLike] = None,
                 k_offset: Optional[ArrayLike] = None,
                 keep_first: Optional[int] = None) -> NDArray[np.bool_]:
    """Boolean (..., L, S): which key each query may see, from the structural options."""
    kl, k_pos, diag = _diagonal(L, S, alignment, key_lengths, batch_shape, q_offset,
                                k_offset)
    left, right = (None, None) if window is None else window
    if is_causal:
        right = 0 if right is None else min(right, 0)
    # keep_first: the sequence's first keys (positions below keep_first, which include
    # any negative ones) stay visible past the left side
    kept = 0 if keep_first is None else keep_first - k_pos
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    return np.array(np.broadcast_to(visibility.visible(i, j, diag, kl, left, right, kept),
                                    batch_shape + (L, S)))


def _diagonal(L, S, alignment, key_lengths, batch_shape, q_offset, k_offset):
    """(key lengths, k_offset, diag), each (..., 1, 1) per item: key i + diag sits at
    query i's position."""
    kl = _per_item(S if key_lengths is None else key_lengths, batch_shape)
    # Positions: query i and key j sit at q_offset + i and k_offset + j of the sequence.
    if (q_offset is not None or k_offset is not None) and alignment != "top_left":
        raise ValueError("q_offset and k_offset need alignment='top_left'")
    q_pos = _per_item(0 if q_offset is None else q_offset, batch_shape)
    k_pos = _per_item(0 if k_offset is None else k_offset, batch_shape)
    return kl, k_pos, (kl - L if alignment == "bottom_right" else 0) + q_pos - k_pos


def alibi_bias(slopes: ArrayLike, L: int, S: int, alignment: str = "top_left",
               key_lengths: Optional[ArrayLike] = None, batch_shape: Tuple[int, ...] = (),
               q_offset: Optional[ArrayLike] = None,
               k_offset: Optional[ArrayLike] = None) -> NDArray[np.float64]:
    """ALiBi's bias (..., L, S): -slope·|(i + diag) - j| for query i and key j, the
    distance of their global positions, one slope per item (slopes broadcast to batch_shape, (Hq,) or
    (B, Hq)). Causal or not, this is FlashAttention's `alibi_slopes` bias on every key a
    query sees (its causal kernel adds slope·j instead, which differs by a constant per
    row: the same softmax)."""
    _, _, diag = _diagonal(L, S, alignment, key_lengths, batch_shape, q_offset, k_offset)
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    slope = np.broadcast_to(np.asarray(slopes, dtype=np.float64), batch_shape)[..., None, None]
    return -slope * np.abs(i + diag - j)


def scaled_dot_product_attention(query: NDArray[Any], key: NDArray[Any], value: NDArray[Any],
                                 attn_mask: Optional[NDArray[Any]] = None,
                                 is_causal: bool = False, scale: Optional[float] = None, *,
                                 enable_gqa: bool = False, window: _Window = None,
                                 alignment: str = "top_left",
                                 key_lengths: Optional[ArrayLike] = None,
                                 q_offset: Optional[ArrayLike] = None,
                                 k_offset: Optional[ArrayLike] = None,
                                 softcap: Optional[float] = None,
                                 sinks: Optional[ArrayLike] = None,
                                 keep_first: Optional[int] = None,
                                 alibi_slopes: Optional[ArrayLike] = None,
                                 position_bias: Any = None,
                                 return_lse: bool = False, return_weights: bool = False
                                 ) -> Union[NDArray[Any], Tuple[NDArray[Any], ...]]:
    """softmax(Q·Kᵀ·scale + mask)·V with the full score matrix (see cattn for options)."""
    dtype = query.dtype
    L, E = query.shape[-2:]
    S = key.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    scale = dtype.type(scale)  # a Python float would promote float32 to float64

    # Grouped-query attention: each key/value head serves Hq // Hkv query heads.
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = np.repeat(key, group, axis=-3)
        value = np.repeat(value, group, axis=-3)

    # Leading (batch) dimensions broadcast as in NumPy, value's included.
    batch = np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    query = np.broadcast_to(query, batch + query.shape[-2:])
    key = np.broadcast_to(key, batch + key.shape[-2:])
    value = np.broadcast_to(value, batch + value.shape[-2:])

    # Step 1: score every query against every key.
    scores = (query @ np.swapaxes(key, -1, -2)) * scale
    if softcap is not None:
        cap = dtype.type(softcap)
        scores = cap * np.tanh(scores / cap)

    # Step 2: remove what a query may not see.
    batch_shape = scores.shape[:-2]
    if attn_mask is not None:
        if attn_mask.dtype == bool:
            scores = np.where(attn_mask, scores, -np.inf).astype(dtype)
        else:
            scores = scores + attn_mask.astype(dtype)
    if alibi_slopes is not None:  # after the softcap, with the mask (as FlashAttention)
        scores = scores + alibi_bias(alibi_slopes, L, S, alignment, key_lengths,
                                     batch_shape, q_offset, k_offset).astype(dtype)
    if position_bias is not None:  # T5: a learned value per head and distance bucket
        from cattn._position_bias import relative_position_bucket
        _, _, diag = _diagonal(L, S, alignment, key_lengths, batch_shape, q_offset, k_offset)
        distance = np.arange(S)[None, :] - (np.arange(L)[:, None] + diag)
        buckets = relative_position_bucket(
            np.broadcast_to(distance, batch_shape + (L, S)), position_bias.bidirectional,
            position_bias.num_buckets, position_bias.max_distance)
        heads = np.arange(batch_shape[-1])[:, None, None]
        scores = scores + position_bias.table[buckets, heads].astype(dtype)
    structural = (is_causal or window is not None or key_lengths is not None
                  or q_offset is not None or k_offset is not None)
    if structural:
        visible = visible_keys(L, S, is_causal, window, alignment, key_lengths, batch_shape,
                               q_offset, k_offset, keep_first)
        scores = np.where(visible, scores, -np.inf).astype(dtype)

    # Attention sinks: one more score per row (the head's logit, uncapped) with no value.
    if sinks is not None:
        sink_column = np.broadcast_to(np.asarray(sinks, dtype=dtype)[..., None, None],
                                      batch_shape + (L, 1))
        scores = np.concatenate([scores, sink_column], axis=-1)

    # Step 3: softmax over each row (subtract the row max so exp never overflows).
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    safe_max = np.where(np.isfinite(row_max), row_max, 0).astype(dtype)
    exp_scores = np.exp(scores - safe_max)
    row_sum = exp_scores.sum(axis=-1, keepdims=True)
    # A row that sees no key has weights 0 (and output 0); NaN inputs stay NaN.
    weights = np.divide(exp_scores, row_sum, out=np.zeros_like(exp_scores),
                        where=row_sum != 0)

    if sinks is not None:
        weights = weights[..., :S]  # the sink's share goes nowhere

    # Step 4: each output is the weighted sum of the values.
    output = weights @ value

    results = [output]
    if return_weights:
        results.append(weights)
    if return_lse:
        with np.errstate(divide="ignore"):
            lse = (safe_max + np.log(row_sum))[..., 0]
        results.append(lse.astype(dtype))
    return results[0] if len(results) == 1 else tuple(results)

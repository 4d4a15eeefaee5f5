"""Decoding many requests that share a prompt: the shared prefix is read once for all of
them, each request's own suffix apart, and the two merged by log-sum-exp."""
from typing import Any, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cattn._api import merge_attention, scaled_dot_product_attention
from cattn._plan import as_ndarray
from cattn._position_bias import RelativePositionBias
from cattn._validation import broadcasts_to, check_flag, check_ndarray


def _check_layout(x: Any, name: str, ndim: int, layout: str) -> None:
    check_ndarray(x, name, f" {layout}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {x.shape}")


def shared_prefix_attention(q: NDArray[Any], prefix_k: NDArray[Any], prefix_v: NDArray[Any],
                            k: NDArray[Any], v: NDArray[Any], *,
                            key_lengths: Union[int, ArrayLike, None] = None,
                            is_causal: bool = False, scale: Optional[float] = None,
                            window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                            attn_mask: Optional[ArrayLike] = None,
                            softcap: Optional[float] = None,
                            sinks: Optional[ArrayLike] = None,
                            alibi_slopes: Optional[ArrayLike] = None,
                            position_bias: Optional[RelativePositionBias] = None,
                            enable_gqa: bool = False,
                            return_lse: bool = False, num_threads: Optional[int] = None,
                            _isa: Optional[str] = None
                            ) -> Union[NDArray[Any], Tuple[NDArray[Any], NDArray[Any]]]:
    """Attention of R requests over a prefix they share, then each over its own suffix.

    Equal to attention over the concatenation [prefix, suffix of request r] for every
    request, without copying the prefix R times: all R·L queries meet the prefix in one
    call (K and V of the prefix read once, the queries as one block of rows per head), each
    request then meets its own suffix, and the two results are merged by their lse. When
    some queries see only part of the prefix (a window, a mask, or a causal request with
    fewer than L - 1 valid suffix keys, whose first queries are prefix tokens), each
    request meets the prefix at its own positions instead (the prefix read per request,
    still never copied).

    Parameters
    ----------
    q : ndarray (R, H, L, E)
        L query tokens per request (L = 1 when decoding), float32 or float64, or float16
        or bfloat16 (computed in float32, the result rounded once). Keys and values may be
        stored in any dtype scaled_dot_product_attention reads.
    prefix_k, prefix_v : ndarrays (Hkv, P, E) and (Hkv, P, Ev)
        The shared prefix's keys and values (Hkv = H, or a divisor with enable_gqa).
    k, v : ndarrays (R, Hkv, S, E) and (R, Hkv, S, Ev)
        Each request's own keys and values after the prefix (a cache of S slots).
    key_lengths : int or (R,) integer array, optional
        Valid suffix keys per request (default S); the queries are each request's last L
        tokens.
    is_causal : bool
        Each query sees the concatenation's keys up to its own position, bottom-right
        aligned: the last query is the request's last valid key, query i sits at
        position P + n - L + i of [prefix, n valid suffix keys]. With n >= L - 1 the whole
        prefix lies before every query.
    window : (left, right), optional
        Sliding window around each query's position in the concatenation (as in
        scaled_dot_product_attention, bottom-right aligned); either side may be None.
    attn_mask : ndarray, optional
        Boolean (True = attend) or float (added to the scores), broadcastable to
        (R, H, L, P + S): indexed by key position in [prefix, suffix slots].
    scale, softcap, enable_gqa, num_threads
        As in scaled_dot_product_attention.
    sinks : array (H,) or (R, H), optional
        Attention sinks, counted once per row (in the suffix's call).
    alibi_slopes : array (H,) or (R, H), optional
        ALiBi's slopes, over positions in the concatenation (each request meets the prefix
        at its own positions then).
    position_bias : cattn.RelativePositionBias, optional
        T5's bucketed relative position bias (H heads), over positions in the
        concatenation, as alibi_slopes.
    return_lse : bool
        Also return the lse (R, H, L) over prefix, suffix and sink.

    Returns
    -------
    out : ndarray (R, H, L, Ev), or (out, lse) with return_lse.

    Raises
    ------
    TypeError, ValueError
        Arrays of other dtypes or layouts, prefix and suffix shapes that do not fit
        together (heads, features), and whatever scaled_dot_product_attention rejects.

    See Also
    --------
    scaled_dot_product_attention : each of the two calls.
    merge_attention : how the prefix's and the suffix's results are combined.

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((3, 2, 1, 8))                  # 3 requests, 2 heads
    >>> pk, pv = rng.standard_normal((2, 2, 50, 8))            # a 50-token shared prompt
    >>> k, v = rng.standard_normal((2, 3, 2, 6, 8))            # 6 own tokens per request
    >>> out = cattn.shared_prefix_attention(q, pk, pv, k, v, key_lengths=[6, 2, 4])
    >>> whole = [cattn.scaled_dot_product_attention(
    ...     q[r], np.concatenate([pk, k[r, :, :n]], axis=1),
    ...     np.concatenate([pv, v[r, :, :n]], axis=1)) for r, n in enumerate([6, 2, 4])]
    >>> bool(np.allclose(out, np.stack(whole)))
    True
    """
    _check_layout(q, "q", 4, "(R, H, L, E)")
    _check_layout(prefix_k, "prefix_k", 3, "(Hkv, P, E)")
    _check_layout(prefix_v, "prefix_v", 3, "(Hkv, P, Ev)")
    _check_layout(k, "k", 4, "(R, Hkv, S, E)")
    _check_layout(v, "v", 4, "(R, Hkv, S, Ev)")
    is_causal = check_flag(is_causal, "is_causal")
    return_lse = check_flag(return_lse, "return_lse")
    R, H, L, E = q.shape
    if prefix_k.shape[0] != prefix_v.shape[0] or prefix_k.shape[1] != prefix_v.shape[1]:
        raise ValueError(f"prefix_k and prefix_v must have the same heads and length, got "
                         f"{prefix_k.shape} and {prefix_v.shape}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != R:
        raise ValueError(f"k and v must be (R, Hkv, S, ·) with R = {R} requests, the same "
                         f"heads and length, got {k.shape} and {v.shape}")
    if k.shape[1] != prefix_k.shape[0] or k.shape[3] != prefix_k.shape[2] \
            or v.shape[3] != prefix_v.shape[2]:
        raise ValueError(f"the suffix and the prefix must have the same heads and feature "
                         f"sizes: k {k.shape}, v {v.shape} after prefix_k "
                         f"{prefix_k.shape}, prefix_v {prefix_v.shape}")
    enable_gqa = check_flag(enable_gqa, "enable_gqa")
    Hkv = prefix_k.shape[0]
    if Hkv != H and not (enable_gqa and Hkv and H % Hkv == 0):
        raise ValueError(f"q has {H} heads and the prefix {Hkv}: they must be equal, or "
                         f"with enable_gqa=True a divisor of the query heads")
    group = H // Hkv
    P, S = prefix_k.shape[1], k.shape[2]
    # Half-precision queries: both parts stay float32 until the merge, rounded once.
    exact = q.dtype in (np.float32, np.float64)
    options = dict(scale=scale, softcap=softcap, num_threads=num_threads, _isa=_isa,
                   out_dtype=None if exact else np.float32, enable_gqa=enable_gqa,
                   alibi_slopes=alibi_slopes, position_bias=position_bias)
    prefix_mask, own_mask = _split_mask(attn_mask, (R, H, L, P + S), P)
    own_out, own_lse = scaled_dot_product_attention(
        q, k, v, attn_mask=own_mask, is_causal=is_causal, alignment="bottom_right",
        key_lengths=key_lengths, window=window, sinks=sinks, return_lse=True, **options)
    # (key_lengths is valid now: the suffix's call checked it)
    valid = np.asarray(S if key_lengths is None else key_lengths)
    # (a bias by position needs each query's own position: not one block of all queries)
    by_position = alibi_slopes is not None or position_bias is not None
    if window is None and prefix_mask is None and not by_position and not (
            is_causal and valid.size and valid.min() < L - 1):
        prefix_out, prefix_lse = _every_query_over_the_prefix(q, prefix_k, prefix_v, group,
                                                              options)
    else:
        # Query i of request r sits at position P + n_r - L + i; the prefix at 0 .. P - 1.
        prefix_out, prefix_lse = scaled_dot_product_attention(
            q, prefix_k, prefix_v, attn_mask=prefix_mask, is_causal=is_causal, window=window,
            q_offset=P + valid - L, return_lse=True, **options)
    out, lse = merge_attention([prefix_out, own_out], [prefix_lse, own_lse])
    if not exact:
        out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def _every_query_over_the_prefix(q, prefix_k, prefix_v, group, options):
    """(out, lse) of every query over the whole prefix, in one call: the queries of each
    key/value head, (Hkv, group·R·L, E) (a small copy), so the prefix's keys and values
    are read once, by blocks of rows from all requests."""
    R, H, L, E = q.shape
    Hkv = prefix_k.shape[0]
    all_queries = q.reshape(R, Hkv, group, L, E).transpose(1, 2, 0, 3, 4).reshape(
        Hkv, group * R * L, E)
    options = dict(options, enable_gqa=False)  # (no bias by position here)
    out, lse = scaled_dot_product_attention(all_queries, prefix_k, prefix_v,
                                            return_lse=True, **options)
    Ev = out.shape[-1]
    out = out.reshape(Hkv, group, R, L, Ev).transpose(2, 0, 1, 3, 4).reshape(R, H, L, Ev)
    lse = lse.reshape(Hkv, group, R, L).transpose(2, 0, 1, 3).reshape(R, H, L)
    return out, lse


def _split_mask(attn_mask, full, P):
    """attn_mask over [prefix, suffix slots] as its prefix part and its suffix part (an
    axis of length 1 broadcasts to both)."""
    if attn_mask is None:
        return None, None
    attn_mask = as_ndarray(attn_mask, "attn_mask")
    check_ndarray(attn_mask, "attn_mask", " (bool or float)")
    if attn_mask.ndim < 2 or not broadcasts_to(attn_mask.shape, full):
        raise ValueError(f"attn_mask of shape {attn_mask.shape} must broadcast to "
                         f"(R, H, L, P + S) = {full}: one column per key of [prefix, "
                         f"suffix slots]")
    if attn_mask.shape[-1] == 1:
        return attn_mask, attn_mask
    return attn_mask[..., :P], attn_mask[..., P:]

"""Attention as a layer: `MultiHeadAttention` (PyTorch's nn.MultiheadAttention on NumPy), and
the caches it decodes with, `KVCache` and `PagedKVCache` (defined in cattn._cache).

The layer holds the seeds' three matrices Wq, Wk, Wv (rows = output features, as in PyTorch)
and the output projection Wo. A call projects the inputs with one BLAS GEMM per distinct
input (one for all of Q, K, V in self-attention), splits the heads as strided *views* of the
projections (a (B, L, H·D) array seen as (B, H, L, D), nothing copied), and hands them to
`cattn.scaled_dot_product_attention`, which writes the heads straight back into a
(B, L, H, D) buffer that the output projection reads as (B·L, E). A call's `projections`
(`Projections`) stand in for those GEMMs (the int8 BERT encoder's quantized linear layers),
so one forward serves the layer's float weights and any other form of them.

Masks follow nn.MultiheadAttention, not scaled_dot_product_attention: in `key_padding_mask`
*and* in a boolean `attn_mask`, True means "ignore this key" (the opposite of cattn's and
F.scaled_dot_product_attention's boolean masks, where True means "take part"). A float mask
is added to the scaled scores in both places.
"""
import math
import numbers
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn._api import _sink_logits, scaled_dot_product_attention
from cattn._cache import (KVCache, KVCacheLayer, PagedKVCache,  # noqa: F401 (re-exported)
                          PagedKVCacheLayer, _serves)
from cattn._paged import paged_attention
from cattn._plan import alibi_slopes_per_item as _alibi_slopes
from cattn._plan import distance_bias_per_item as _distance_bias
from cattn._position_bias import RelativePositionBias
from cattn._interop import from_dlpack
from cattn._validation import (check_flag, check_float_dtype, check_int, check_ndarray,
                               is_masked_array)


# --------------------------------------------------------------------------- helpers

def _as_generator(rng):
    if rng is None or isinstance(rng, (numbers.Integral, np.random.SeedSequence)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, "
                    f"got {type(rng).__name__}")


def _xavier_uniform(rng, shape):
    """PyTorch's xavier_uniform_ for a (fan_out, fan_in) weight: U(-a, a), a = √(6/(in+out))."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-bound, bound, size=shape)


def _linear_uniform(rng, shape):
    """nn.Linear's weight init, kaiming_uniform_(a=√5): U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, size=shape)


def _linear(x, weight, bias):
    """x @ weightᵀ + bias over the last axis, as one GEMM on the (rows, in) matrix."""
    rows = x.reshape(-1, x.shape[-1])
    y = rows @ weight.T
    if bias is not None:
        y += bias
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def _project_rows(projection, x, width):
    """`projection` (a Projections field) over the last axis of x, as _linear would project
    it: called once on x's (rows, in) matrix, its result checked to be (rows, width) of x's
    dtype."""
    rows = x.reshape(-1, x.shape[-1])
    y = projection(rows)
    if not isinstance(y, np.ndarray) or y.dtype != x.dtype:
        raise TypeError(f"a projection must return a numpy.ndarray of {x.dtype}, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (rows.shape[0], width):
        raise ValueError(f"a projection of {rows.shape[0]} rows must return shape "
                         f"{(rows.shape[0], width)}, got {y.shape}")
    return y.reshape(x.shape[:-1] + (width,))


def _split_heads(x, num_heads):
    """(B, L, H·D) -> (B, H, L, D) as a view (splitting the last axis never copies)."""
    B, L, width = x.shape
    return x.reshape(B, L, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def _to_numpy(x):
    """An ndarray from an ndarray or anything array-like (a torch tensor included)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        if getattr(x, "is_meta", False):
            raise ValueError("a tensor on the meta device has shapes but no values: load the "
                             "weights (e.g. module.to_empty(device='cpu') and a checkpoint) "
                             "before copying them into cattn")
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # bfloat16, float16: no NumPy view
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------- the layer

class Projections(NamedTuple):
    """Stand-ins for a MultiHeadAttention's own linear layers in one call (its
    `projections=`), e.g. quantized ones. Each is None (the layer's GEMM on its own weight)
    or a callable taking the (M, in) rows of its input and returning a new (M, out) array
    of the layer's dtype, bias included:

    in_proj : rows (M, E) -> (M, E + 2·Hkv·D), the fused Q/K/V projection of
        self-attention (columns Q | K | V, as `in_proj_weight`'s rows); only for calls
        that project with it (key and value omitted, kdim = vdim = embed_dim)
    out_proj : rows (M, E) -> (M, E), the output projection (layers with out_proj=True)
    """
    in_proj: Optional[Callable[[NDArray[Any]], NDArray[Any]]] = None
    out_proj: Optional[Callable[[NDArray[Any]], NDArray[Any]]] = None


_OWN_PROJECTIONS = Projections()  # a call without `projections`: the layer's own GEMMs


class MultiHeadAttention:
    """Multi-head attention with PyTorch's weights, initialization and call.

    Parameters
    ----------
    embed_dim : int
        E, the width of the queries and of the output; split into `num_heads` heads of
        E // num_heads features.
    num_heads : int
        H, the number of query heads; must divide `embed_dim`.
    num_kv_heads : int, optional
        Grouped-query attention: key/value heads (default `num_heads`); must divide
        `num_heads`. Query head h reads key/value head h // (num_heads // num_kv_heads).
    kdim, vdim : int, optional
        Feature sizes of the key and value inputs (default `embed_dim`).
    bias : bool
        Biases on the input and output projections (zero-initialized, as in PyTorch).
    out_proj : bool
        With False there is no output projection: with `num_heads=1` the layer is exactly the
        seeds' single-head flow softmax(Q·Kᵀ/√E)·V with Q = x·Wqᵀ, K = x·Wkᵀ, V = x·Wvᵀ.
    dtype : float32 or float64
    rng : None, int or numpy.random.Generator
        Source of the random initial weights.

    Weights (PyTorch layout, rows = output features): `q_proj_weight` (E, E),
    `k_proj_weight` (Hkv·D, kdim), `v_proj_weight` (Hkv·D, vdim), `in_proj_bias`,
    `out_proj_weight` (E, E), `out_proj_bias`. When kdim = vdim = E they are row blocks of
    one `in_proj_weight` (E + 2·Hkv·D, E), as in PyTorch, so self-attention projects Q, K
    and V with a single GEMM. Initialized like nn.MultiheadAttention: xavier_uniform over
    the input projection (the fused matrix as a whole), nn.Linear's uniform for Wo, zero
    biases. `state_dict()` / `load_state_dict()` speak PyTorch's key names.

    Raises
    ------
    TypeError
        A size that is not an integer, a flag that is not a bool, a dtype other than
        float32 or float64.
    ValueError
        A size below 1, `num_heads` not dividing `embed_dim`, `num_kv_heads` not dividing
        `num_heads`.

    See Also
    --------
    KVCache : keys and values kept across calls, for decoding token by token.
    scaled_dot_product_attention : the attention itself, on (..., L, E) arrays.

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> mha = cattn.MultiHeadAttention(embed_dim=16, num_heads=4, rng=0)
    >>> x = np.ones((2, 5, 16), dtype=np.float32)          # (batch, length, embed_dim)
    >>> out, weights = mha(x, need_weights=True)
    >>> out.shape, weights.shape
    ((2, 5, 16), (2, 5, 5))
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, bias: bool = True,
                 out_proj: bool = True, dtype: DTypeLike = np.float32,
                 rng: Union[None, int, np.random.Generator] = None) -> None:
        embed_dim = check_int(embed_dim, "embed_dim", 1)
        num_heads = check_int(num_heads, "num_heads", 1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads must divide embed_dim, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        num_kv_heads = (num_heads if num_kv_heads is None
                        else check_int(num_kv_heads, "num_kv_heads", 1))
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads, got num_heads={num_heads} "
                             f"and num_kv_heads={num_kv_heads}")
        kdim = embed_dim if kdim is None else check_int(kdim, "kdim", 1)
        vdim = embed_dim if vdim is None else check_int(vdim, "vdim", 1)
        bias, out_proj = check_flag(bias, "bias"), check_flag(out_proj, "out_proj")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.kdim, self.vdim = kdim, vdim
        self.head_dim = embed_dim // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.bias, self.has_out_proj = bias, out_proj
        self.dtype = check_float_dtype(dtype)
        # PyTorch's _qkv_same_embed_dim: one fused in_proj_weight, else three matrices.
        self.fused = kdim == embed_dim and vdim == embed_dim
        rng = _as_generator(rng)

        E, kv = embed_dim, self.kv_dim
        if self.fused:
            self.in_proj_weight = _xavier_uniform(rng, (E + 2 * kv, E)).astype(self.dtype)
        else:
            self.in_proj_weight = None
            self._q_w = _xavier_uniform(rng, (E, E)).astype(self.dtype)
            self._k_w = _xavier_uniform(rng, (kv, kdim)).astype(self.dtype)
            self._v_w = _xavier_uniform(rng, (kv, vdim)).astype(self.dtype)
        self.in_proj_bias = np.zeros(E + 2 * kv, dtype=self.dtype) if bias else None
        if out_proj:
            self.out_proj_weight = _linear_uniform(rng, (E, E)).astype(self.dtype)
            self.out_proj_bias = np.zeros(E, dtype=self.dtype) if bias else None
        else:
            self.out_proj_weight = self.out_proj_bias = None

    # ---- the projection blocks (views into the fused arrays when fused)

    @property
    def q_proj_weight(self) -> NDArray[Any]:
        return self.in_proj_weight[:self.embed_dim] if self.fused else self._q_w

    @property
    def k_proj_weight(self) -> NDArray[Any]:
        E, kv = self.embed_dim, self.kv_dim
        return self.in_proj_weight[E:E + kv] if self.fused else self._k_w

    @property
    def v_proj_weight(self) -> NDArray[Any]:
        E, kv = self.embed_dim, self.kv_dim
        return self.in_proj_weight[E + kv:] if self.fused else self._v_w

    def _bias_block(self, which):
        if self.in_proj_bias is None:
            return None
        E, kv = self.embed_dim, self.kv_dim
        return {"q": self.in_proj_bias[:E], "k": self.in_proj_bias[E:E + kv],
                "v": self.in_proj_bias[E + kv:], "kv": self.in_proj_bias[E:]}[which]

    def __repr__(self):
        extra = "" if self.num_kv_heads == self.num_heads else \
            f", num_kv_heads={self.num_kv_heads}"
        if not self.fused:
            extra += f", kdim={self.kdim}, vdim={self.vdim}"
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}"
                f"{extra}, bias={self.bias}, out_proj={self.has_out_proj}, "
                f"dtype={self.dtype.name})")

    # ---- state dict

    def _expected_shapes(self, fused_form):
        E, kv = self.embed_dim, self.kv_dim
        shapes = {}
        if fused_form:
            shapes["in_proj_weight"] = (E + 2 * kv, E)
        else:
            shapes.update(q_proj_weight=(E, E), k_proj_weight=(kv, self.kdim),
                          v_proj_weight=(kv, self.vdim))
        if self.bias:
            shapes["in_proj_bias"] = (E + 2 * kv,)
        if self.has_out_proj:
            shapes["out_proj.weight"] = (E, E)
            if self.bias:
                shapes["out_proj.bias"] = (E,)
        return shapes

    def state_dict(self) -> Dict[str, NDArray[Any]]:
        """The weights as nn.MultiheadAttention names them (copies, as NumPy arrays):
        `in_proj_weight` when kdim = vdim = E, else `q_proj_weight`, `k_proj_weight`,
        `v_proj_weight`; plus `in_proj_bias`, `out_proj.weight`, `out_proj.bias` as present."""
        arrays = {"in_proj_weight": self.in_proj_weight, "q_proj_weight": self.q_proj_weight,
                  "k_proj_weight": self.k_proj_weight, "v_proj_weight": self.v_proj_weight,
                  "in_proj_bias": self.in_proj_bias, "out_proj.weight": self.out_proj_weight,
                  "out_proj.bias": self.out_proj_bias}
        return {name: arrays[name].copy() for name in self._expected_shapes(self.fused)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Copy weights in from a PyTorch-style state dict (NumPy arrays or CPU tensors).

        Takes either form of the input projection: `in_proj_weight`, or the three
        `q_proj_weight` / `k_proj_weight` / `v_proj_weight` (the only form when kdim or vdim
        differs from embed_dim). Missing or unexpected keys and wrong shapes raise
        ValueError, non-numeric values TypeError; nothing is changed unless all is valid.
        The arrays are copied (cast to the layer's dtype), never kept or modified.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got "
                            f"{type(state_dict).__name__}")
        keys = set(state_dict.keys())
        fused_form = "in_proj_weight" in keys
        if fused_form and not self.fused:
            raise ValueError(f"in_proj_weight needs kdim = vdim = embed_dim; this layer has "
                             f"kdim={self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}: "
                             f"give q_proj_weight, k_proj_weight and v_proj_weight")
        expected = self._expected_shapes(fused_form)
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing or unexpected:
            raise ValueError(f"state_dict does not fit {self!r}: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        arrays = {}
        for name, shape in expected.items():
            a = _to_numpy(state_dict[name])
            if a.dtype.kind not in "fiu":
                raise TypeError(f"state_dict[{name!r}] must be numeric, got dtype {a.dtype}")
            if a.shape != shape:
                raise ValueError(f"state_dict[{name!r}] must have shape {shape}, got {a.shape}")
            arrays[name] = a
        # All valid: copy into the existing arrays (the fused views stay valid).
        if fused_form:
            self.in_proj_weight[...] = arrays["in_proj_weight"]
        else:
            self.q_proj_weight[...] = arrays["q_proj_weight"]
            self.k_proj_weight[...] = arrays["k_proj_weight"]
            self.v_proj_weight[...] = arrays["v_proj_weight"]
        if self.bias:
            self.in_proj_bias[...] = arrays["in_proj_bias"]
        if self.has_out_proj:
            self.out_proj_weight[...] = arrays["out_proj.weight"]
            if self.bias:
                self.out_proj_bias[...] = arrays["out_proj.bias"]

    # ---- the call

    def _check_input(self, x, name, width):
        check_ndarray(x, name)
        if isinstance(x, np.matrix) or is_masked_array(x):
            raise TypeError(f"{name} must be a plain numpy.ndarray, got {type(x).__name__} "
                            f"(pass np.asarray({name}))")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the layer is {self.dtype}: cast "
                            f"it (x.astype(np.{self.dtype.name})) or build the layer with "
                            f"dtype=np.{x.dtype.name}")
        if x.ndim != 3 or x.shape[-1] != width:
            raise ValueError(f"{name} must have shape (batch, length, {width}), "
                             f"got {x.shape}")

    def __call__(self, query: ArrayLike, key: Optional[ArrayLike] = None,
                 value: Optional[ArrayLike] = None, *,
                 key_padding_mask: Optional[ArrayLike] = None,
                 attn_mask: Optional[ArrayLike] = None, is_causal: bool = False,
                 need_weights: bool = False, average_attn_weights: bool = True,
                 cache: Union["KVCache", "KVCacheLayer", PagedKVCache, PagedKVCacheLayer,
                              None] = None,
                 sinks: Optional[ArrayLike] = None, alibi_slopes: Optional[ArrayLike] = None,
                 position_bias: Optional[RelativePositionBias] = None,
                 projections: Optional[Projections] = None
                 ) -> Tuple[NDArray[Any], Optional[NDArray[Any]]]:
        """Attention of `query` over `key`/`value`, batch first, as nn.MultiheadAttention.

        Parameters
        ----------
        query : (B, L, E) array, or (L, E) unbatched. Here and for key, value and the masks,
            objects with `__dlpack__` (CPU PyTorch tensors) are used without a copy; the
            results are NumPy arrays.
        key : (B, S, kdim) array, optional; defaults to `query` (self-attention)
        value : (B, S, vdim) array, optional; defaults to `key`
        key_padding_mask : (B, S) array, optional
            Boolean: True marks a key to ignore (padding). Float: added to the scores.
        attn_mask : array, optional
            (L, S), (B·H, L, S) as in PyTorch, or broadcastable to (B, H, L, S). Boolean:
            True marks a position that may NOT be attended (PyTorch's nn.MultiheadAttention
            convention). Float: added to the scaled scores.
        is_causal : bool
            Query i sees keys j <= i (with a cache: aligned to the end of the cache). Unlike
            PyTorch's hint, no attn_mask is needed; given both, both apply.
        need_weights, average_attn_weights : bool
            Also return the attention weights, averaged over heads (B, L, S) or per head
            (B, H, L, S).
        cache : KVCache or PagedKVCache (of one layer), or its .layer(i), optional
            Incremental self-attention: the projected keys/values of `query` are appended to
            the cache and the queries attend to everything cached (bottom-right aligned:
            pass is_causal=True when `query` holds more than one new token). With a cache,
            `key_padding_mask` (B, L) marks *left* padding of the new tokens (True first),
            and `attn_mask` is not accepted. A PagedKVCache's batch rows are its live
            sequences, in the order of its `sequences`.
        sinks : (num_heads,) array, optional
            Attention sinks (gpt-oss): one logit per head that joins each row's softmax
            denominator without a value (see scaled_dot_product_attention). The weights
            then sum to less than 1.
        alibi_slopes : (num_heads,) or (B, num_heads) array, optional
            ALiBi: -slope·|i - j| is added to the scores of query i and key j, computed in
            the kernel (see scaled_dot_product_attention; with a cache, i and j are
            positions in the cached sequence).
        position_bias : cattn.RelativePositionBias, optional
            T5's bucketed relative position bias (num_heads heads), looked up in the kernel
            by the distance of key j from query i, positions as for alibi_slopes.
        projections : cattn.layers.Projections, optional
            Callables that stand in for the layer's input (fused Q/K/V, self-attention
            only) and output projections in this call, e.g. quantized linear layers; masks,
            caches and every other option apply as without them.

        Returns
        -------
        output : ndarray (B, L, E), or (L, E) unbatched
            A query that sees no key gets attention output 0 (PyTorch gives NaN there).
        weights : ndarray or None
            The attention weights when `need_weights`, else None.

        Raises
        ------
        TypeError
            An input that is not an array of the layer's dtype, a flag that is not a bool,
            `projections` that is not a Projections of callables (or returns no array of
            the layer's dtype).
        ValueError
            Shapes that do not fit the layer or each other, masks of the wrong shape, a
            cache of another shape or one that would overflow its `max_len`, a projection
            given for a GEMM this call does not run.

        See Also
        --------
        KVCache.for_layer : a cache shaped for this layer.
        scaled_dot_product_attention : what each head computes.

        Examples
        --------
        Self-attention with padding, then decoding two tokens one at a time with a cache:

        >>> import numpy as np
        >>> import cattn
        >>> mha = cattn.MultiHeadAttention(8, 2, rng=0)
        >>> x = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
        >>> padding = np.array([[False, False, True]])        # True: ignore that key
        >>> out, _ = mha(x, key_padding_mask=padding)
        >>> out.shape
        (1, 3, 8)
        >>> cache = cattn.KVCache.for_layer(mha, batch_size=1, max_len=4)
        >>> first, _ = mha(x[:, :1], cache=cache)
        >>> second, _ = mha(x[:, 1:2], cache=cache)
        >>> full, _ = mha(x[:, :2], is_causal=True)
        >>> bool(np.allclose(second[:, 0], full[:, 1], atol=1e-6))
        True
        """
        # Self-attention (one fused Q/K/V GEMM) when key and value are omitted or are query.
        self_attention = (key is None or key is query) and (value is None or value is query)
        query, key, value, key_padding_mask, attn_mask, unbatched = self._inputs(
            query, None if self_attention else key, None if self_attention else value,
            key_padding_mask, attn_mask)
        is_causal = check_flag(is_causal, "is_causal")
        need_weights = check_flag(need_weights, "need_weights")
        average_attn_weights = check_flag(average_attn_weights, "average_attn_weights")
        heads = (query.shape[0], self.num_heads)
        if sinks is not None:  # checked before a cache is appended to
            _sink_logits(sinks, heads, self.dtype)
        if alibi_slopes is not None:
            _alibi_slopes(alibi_slopes, heads, self.dtype)
        if position_bias is not None:
            _distance_bias(position_bias, heads, self.dtype)
        projections = self._check_projections(projections, self_attention)
        per_head = dict(sinks=sinks, alibi_slopes=alibi_slopes, position_bias=position_bias)
        if cache is not None:
            out, weights = self._cached(query, key, value, self_attention, key_padding_mask,
                                        attn_mask, is_causal, need_weights, cache, per_head,
                                        projections)
        else:
            out, weights = self._full(query, key, value, self_attention, key_padding_mask,
                                      attn_mask, is_causal, need_weights, per_head,
                                      projections)
        if weights is not None and average_attn_weights:
            weights = weights.mean(axis=1)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return out, weights

    def _inputs(self, query, key, value, key_padding_mask, attn_mask):
        """The call's arrays as NumPy arrays, batched (a leading axis of 1 added to unbatched
        ones), key defaulting to query and value to key; and whether they were unbatched."""
        query, key, value, key_padding_mask, attn_mask = (
            from_dlpack(x, name) for x, name in (
                (query, "query"), (key, "key"), (value, "value"),
                (key_padding_mask, "key_padding_mask"), (attn_mask, "attn_mask")))
        unbatched = isinstance(query, np.ndarray) and query.ndim == 2
        if unbatched:
            query, key, value, key_padding_mask = (
                x[None] if isinstance(x, np.ndarray) else x
                for x in (query, key, value, key_padding_mask))
        self._check_input(query, "query", self.embed_dim)
        if key is None:
            key = query
        if value is None:
            value = key
        return query, key, value, key_padding_mask, attn_mask, unbatched

    def _check_projections(self, projections, self_attention):
        """`projections` once it fits this call (a Projections whose GEMMs this call runs);
        None given: the layer's own GEMMs."""
        if projections is None:
            return _OWN_PROJECTIONS
        if not isinstance(projections, Projections):
            raise TypeError(f"projections must be a cattn.layers.Projections, got "
                            f"{type(projections).__name__}")
        for name, projection in zip(projections._fields, projections):
            if projection is not None and not callable(projection):
                raise TypeError(f"projections.{name} must be None or a callable (rows -> "
                                f"projected rows), got {type(projection).__name__}")
        if projections.in_proj is not None and not (self_attention and self.fused):
            raise ValueError("projections.in_proj stands in for the fused Q/K/V projection "
                             "of self-attention: it needs kdim = vdim = embed_dim and a call "
                             "without a different key or value")
        if projections.out_proj is not None and not self.has_out_proj:
            raise ValueError("projections.out_proj given, but this layer has no output "
                             "projection (out_proj=False)")
        return projections

    def _project(self, query, key, value, self_attention, in_proj=None):
        """Q, K, V as (B, L|S, width) arrays, sharing one GEMM where the inputs allow;
        `in_proj` (a Projections field) stands in for the fused GEMM of self-attention."""
        E, kv = self.embed_dim, self.kv_dim
        if self_attention and self.fused:
            if in_proj is None:
                qkv = _linear(query, self.in_proj_weight, self.in_proj_bias)
            else:
                qkv = _project_rows(in_proj, query, E + 2 * kv)
            return qkv[..., :E], qkv[..., E:E + kv], qkv[..., E + kv:]
        q = _linear(query, self.q_proj_weight, self._bias_block("q"))
        if key is value and self.fused:
            kv_proj = _linear(key, self.in_proj_weight[E:], self._bias_block("kv"))
            return q, kv_proj[..., :kv], kv_proj[..., kv:]
        return (q, _linear(key, self.k_proj_weight, self._bias_block("k")),
                _linear(value, self.v_proj_weight, self._bias_block("v")))

    def _attend(self, q, k, v, B, L, out_proj=None, paged=False, **options):
        """Heads of q/k/v (as views) through the kernel (paged_attention for pages of a
        PagedKVCache) into a (B, L, H, D) buffer, then the output projection (`out_proj`,
        a Projections field, standing in for the layer's own). Returns (out (B, L, E),
        per-head weights or None)."""
        context = np.empty((B, L, self.num_heads, self.head_dim), dtype=self.dtype)
        attention = paged_attention if paged else scaled_dot_product_attention
        result = attention(
            q, k, v, enable_gqa=self.num_kv_heads != self.num_heads,
            out=context.transpose(0, 2, 1, 3), **options)
        weights = result[1] if options.get("return_weights") else None
        context = context.reshape(B, L, self.embed_dim)
        if out_proj is not None:
            context = _project_rows(out_proj, context, self.embed_dim)
        elif self.has_out_proj:
            context = _linear(context, self.out_proj_weight, self.out_proj_bias)
        return context, weights

    def _full(self, query, key, value, self_attention, key_padding_mask, attn_mask,
              is_causal, need_weights, per_head, projections):
        """per_head: the sinks, alibi_slopes and position_bias options (None or per head);
        projections: the call's checked Projections."""
        B, L, _ = query.shape
        self._check_input(key, "key", self.kdim)
        self._check_input(value, "value", self.vdim)
        if key.shape[0] != B or value.shape[0] != B:
            raise ValueError(f"query, key and value must have the same batch size, got "
                             f"{query.shape}, {key.shape} and {value.shape}")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have the same length S, got {key.shape} "
                             f"and {value.shape}")
        S = key.shape[1]
        mask, key_lengths = self._combine_masks(key_padding_mask, attn_mask, B, L, S)
        q, k, v = self._project(query, key, value, self_attention, projections.in_proj)
        q, k, v = (_split_heads(q, self.num_heads), _split_heads(k, self.num_kv_heads),
                   _split_heads(v, self.num_kv_heads))
        return self._attend(q, k, v, B, L, projections.out_proj, attn_mask=mask,
                            is_causal=is_causal, key_lengths=key_lengths,
                            return_weights=need_weights, **per_head)

    def _combine_masks(self, key_padding_mask, attn_mask, B, L, S):
        """PyTorch's two masks as one cattn mask broadcastable to (B, H, L, S) (boolean True =
        attend, or additive float), and key lengths when the padding is a right padding."""
        parts = []
        key_lengths = None
        if key_padding_mask is not None:
            kpm = self._mask_array(key_padding_mask, "key_padding_mask")
            if kpm.shape != (B, S):
                raise ValueError(f"key_padding_mask must have shape (batch, S) = {(B, S)}, "
                                 f"got {kpm.shape}")
            if kpm.dtype == np.bool_:
                valid = S - np.count_nonzero(kpm, axis=1)
                if np.array_equal(kpm, np.arange(S) >= valid[:, None]):
                    key_lengths = valid  # right padding: the kernel skips it, no mask read
                else:
                    parts.append(kpm[:, None, None, :])
            else:
                parts.append(kpm[:, None, None, :])
        if attn_mask is not None:
            parts.append(self._attn_mask_4d(attn_mask, B, L, S))
        if not parts:
            return None, key_lengths
        if all(p.dtype == np.bool_ for p in parts):
            # PyTorch: True = ignore; cattn: True = attend.
            mask = ~parts[0] if len(parts) == 1 else ~(parts[0] | parts[1])
            return mask, key_lengths
        additive = [np.where(p, -np.inf, 0.0).astype(self.dtype) if p.dtype == np.bool_
                    else p.astype(self.dtype, copy=False) for p in parts]
        mask = additive[0] if len(additive) == 1 else additive[0] + additive[1]
        return mask, key_lengths

    def _attn_mask_4d(self, attn_mask, B, L, S):
        """PyTorch's attn_mask, (L, S) or (B·H, L, S), as an array broadcastable to
        (B, H, L, S)."""
        H = self.num_heads
        am = self._mask_array(attn_mask, "attn_mask")
        if am.ndim == 3 and am.shape == (B * H, L, S):
            am = am.reshape(B, H, L, S)  # PyTorch's layout: item b·H + h
        elif am.ndim == 3 and am.shape[0] != 1:
            raise ValueError(f"a 3-D attn_mask must have shape (batch·num_heads, L, S) = "
                             f"{(B * H, L, S)}, got {am.shape}")
        full = (B, H, L, S)
        try:
            fits = am.ndim >= 2 and np.broadcast_shapes(am.shape, full) == full
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)}, "
                             f"(batch·num_heads, L, S) = {(B * H, L, S)} or broadcast to "
                             f"(batch, num_heads, L, S) = {full}, got {am.shape}")
        return am

    @staticmethod
    def _mask_array(mask, name):
        check_ndarray(mask, name, " (bool or float)")
        if mask.dtype != np.bool_ and mask.dtype.kind != "f":
            raise TypeError(f"{name} must be boolean (True = ignore, as in PyTorch's "
                            f"nn.MultiheadAttention) or floating (added to the scores), got "
                            f"dtype {mask.dtype}")
        return mask

    def _cache_layer(self, cache):
        """The KVCacheLayer that `cache` names, once it fits this layer."""
        if not self.fused:
            raise ValueError("a cache needs kdim = vdim = embed_dim (self-attention)")
        layer = cache
        if isinstance(cache, (KVCache, PagedKVCache)):
            if cache.num_layers != 1:
                raise ValueError(f"this {type(cache).__name__} holds {cache.num_layers} "
                                 f"layers: pass cache.layer(i) (or cache[i]) for the layer "
                                 f"being run")
            layer = cache.layer(0)
        if not isinstance(layer, (KVCacheLayer, PagedKVCacheLayer)):
            raise TypeError(f"cache must be a KVCache or PagedKVCache, or its .layer(i), "
                            f"got {type(cache).__name__}")
        if (layer.num_kv_heads, layer.head_dim, layer.value_dim) != \
                (self.num_kv_heads, self.head_dim, self.head_dim) or \
                not _serves(layer.dtype, self.dtype):
            kind = type(layer.cache).__name__
            raise ValueError(f"the cache holds {layer.num_kv_heads} key/value heads of "
                             f"{layer.head_dim}/{layer.value_dim} {layer.dtype} features; "
                             f"this layer needs {self.num_kv_heads} heads of {self.head_dim} "
                             f"{self.dtype} (make it with {kind}.for_layer(mha, ...))")
        return layer

    def _cached(self, query, key, value, self_attention, key_padding_mask, attn_mask,
                is_causal, need_weights, cache, per_head, projections):
        if not self_attention:
            raise ValueError("a cache serves incremental self-attention: call "
                             "mha(query, cache=...) without a different key or value")
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported with a cache: the cache positions "
                             "are given by is_causal and the cached lengths")
        layer = self._cache_layer(cache)
        B, L, _ = query.shape
        if B != layer.batch_size:
            raise ValueError(f"query has batch size {B} but the cache holds "
                             f"{layer.batch_size} sequences")
        paged = isinstance(layer, PagedKVCacheLayer)
        num_new = None
        if key_padding_mask is not None:
            kpm = self._mask_array(key_padding_mask, "key_padding_mask")
            if kpm.dtype != np.bool_ or kpm.shape != (B, L):
                raise ValueError(f"with a cache, key_padding_mask must be boolean of shape "
                                 f"(batch, new tokens) = {(B, L)}, got {kpm.dtype} "
                                 f"{kpm.shape}")
            num_new = L - np.count_nonzero(kpm, axis=1)
            if not np.array_equal(kpm, np.arange(L) < (L - num_new)[:, None]):
                raise ValueError("with a cache, key_padding_mask must mark left padding "
                                 "(True only before the first real token of each row)")
        q, k, v = self._project(query, query, query, True, projections.in_proj)
        layer.append(_split_heads(k, self.num_kv_heads), _split_heads(v, self.num_kv_heads),
                     num_new=num_new)
        q = _split_heads(q, self.num_heads)
        if paged:
            lengths = layer.seq_lens()
            out, weights = self._attend(
                q, layer.keys, layer.values, B, L, projections.out_proj, paged=True,
                block_table=layer.cache.block_table(), seq_lens=lengths,
                is_causal=is_causal, return_weights=need_weights, **per_head)
        else:
            lengths = layer.lengths.copy()
            scales = ({} if getattr(layer, "key_scales", None) is None else
                      dict(k_scale=layer.key_scales, v_scale=layer.value_scales))
            out, weights = self._attend(q, layer.keys, layer.values, B, L,
                                        projections.out_proj, is_causal=is_causal,
                                        alignment="bottom_right",
                                        key_lengths=lengths, return_weights=need_weights,
                                        **per_head, **scales)
        if weights is not None:
            weights = weights[..., :lengths.max(initial=0)]
        return out, weights

"""cattn as a PyTorch operator: ``torch.ops.cattn.scaled_dot_product_attention``.

Importing this module registers the operator (with `torch.library.custom_op`) and its fake
implementation, so `torch.compile` and `torch.export` keep the call in their graphs as one
opaque node instead of breaking the graph around it. CPU tensors go in and out without a
copy: they are shared with the NumPy kernel as views of the same memory.

The operator computes inference only: a forward pass works on tensors that require grad
(a model left in training mode), and the backward pass raises a RuntimeError that says so.

>>> import torch
>>> import cattn.integrations.torch
>>> q = k = v = torch.ones(1, 2, 4, 8)
>>> out = torch.ops.cattn.scaled_dot_product_attention(q, k, v, is_causal=True)
>>> tuple(out.shape)
(1, 2, 4, 8)
"""
from typing import Optional

import numpy as np
import torch

import cattn
from cattn import _dtypes

__all__ = ["scaled_dot_product_attention"]

_BFLOAT16_NUMPY = None


def _bfloat16():
    global _BFLOAT16_NUMPY
    if _BFLOAT16_NUMPY is None:
        _BFLOAT16_NUMPY = _dtypes.bfloat16_dtype()  # ml_dtypes, with an install hint if absent
    return _BFLOAT16_NUMPY


def check_cpu(tensor, name):
    """A clear error for tensors cattn cannot read in place (it computes on the CPU)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"cattn computes on the CPU, but {name} is on {tensor.device}: move "
                         f"the model and inputs to the CPU (model.to('cpu')), or use another "
                         f"attention implementation on this device")


def numpy_view(tensor, name):
    """The same memory as a NumPy array (bfloat16 as ml_dtypes.bfloat16): never a copy."""
    try:  # (the common case first: a CPU tensor NumPy knows, outside autograd)
        return tensor.numpy()
    except (RuntimeError, TypeError):
        pass
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.dtype is torch.bfloat16:  # NumPy has no bfloat16: share the bits
        check_cpu(tensor, name)
        return tensor.view(torch.int16).numpy().view(_bfloat16())
    try:
        return tensor.numpy()
    except (RuntimeError, TypeError):
        check_cpu(tensor, name)
        raise TypeError(f"{name}: cattn cannot read a tensor of dtype {tensor.dtype}; "
                        f"expected float32, float16, bfloat16 or float64") from None


def numpy_views(query, key, value):
    """numpy_view of the three operands (the query first: its dtype and device are
    checked first)."""
    return (numpy_view(query, "query"), numpy_view(key, "key"),
            numpy_view(value, "value"))


def _window(window_left, window_right):
    return None if window_left is None and window_right is None else (window_left,
                                                                      window_right)


def _batch_shape(query, key, value, enable_gqa):
    """The leading shape of the result: the operands' leading axes broadcast, the query's
    head count where grouped-query heads share key/value heads."""
    lead = query.shape[:-2]
    key_lead, value_lead = key.shape[:-2], value.shape[:-2]
    if enable_gqa and query.dim() >= 3:
        key_lead, value_lead = key_lead[:-1] + lead[-1:], value_lead[:-1] + lead[-1:]
    if key_lead == lead and value_lead == lead:  # (the common case, without broadcasting)
        return lead
    return torch.broadcast_shapes(lead, key_lead, value_lead)


def empty_result(query, key, value, enable_gqa):
    """The output, laid out in memory as (batch, L, heads, Ev) for 4-D operands (as
    FlashAttention and PyTorch's CPU flash attention return it), so that the
    (batch, L, heads, Ev) tensor models want is a free transpose of it."""
    batch = _batch_shape(query, key, value, enable_gqa)
    L, Ev = query.shape[-2], value.shape[-1]
    if len(batch) == 2:
        return torch.empty((batch[0], L, batch[1], Ev), dtype=query.dtype).transpose(1, 2)
    return torch.empty(tuple(batch) + (L, Ev), dtype=query.dtype)


def one_batch_axis(query, key, value):
    """Whether the operands (tensors or their NumPy views) are (batch, heads, length,
    features) of one batch size, as `attention_heads_last` takes them."""
    return query.ndim == 4 and key.shape[0] == value.shape[0] == query.shape[0]


def attention_heads_last(query, key, value, *, attn_mask=None, is_causal=False, scale=None,
                         enable_gqa=False, window=None, alignment="top_left",
                         key_lengths=None, q_offset=None, k_offset=None, softcap=None,
                         sinks=None, return_weights=False):
    """cattn.scaled_dot_product_attention of (batch, heads, L, E) tensors of one batch
    size (see `one_batch_axis`), or of their NumPy views (`numpy_views`), returned as a
    new (batch, L, heads, Ev) tensor: the layout models reshape to (batch, L, features)
    for free. The options are cattn's, by name (tensors where it takes arrays, see
    `_attend`); with return_weights=True, the pair of the result and the
    (batch, heads, L, S) attention weights in the query's dtype."""
    if not isinstance(query, np.ndarray):
        query, key, value = numpy_views(query, key, value)
    if not (attn_mask is key_lengths is q_offset is k_offset is sinks is None):
        attn_mask, key_lengths, q_offset, k_offset, sinks = option_arrays(
            attn_mask, key_lengths, q_offset, k_offset, sinks)
    # (cattn allocates the result in the (batch, L, heads, Ev) layout itself: no `out` to
    # check, no transposed write to set up; called directly: a layer of keywords costs a
    # microsecond)
    returned = cattn.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, window=window, alignment=alignment, key_lengths=key_lengths,
        q_offset=q_offset, k_offset=k_offset, softcap=softcap, sinks=sinks,
        return_weights=return_weights, _heads_last=True)
    if return_weights:
        returned, weights = returned
        return tensor_view(returned.transpose(0, 2, 1, 3)), tensor_view(weights)
    return tensor_view(returned.transpose(0, 2, 1, 3))


def tensor_view(array):
    """A NumPy array as a tensor of the same memory (ml_dtypes.bfloat16 as
    torch.bfloat16): the inverse of `numpy_view`."""
    if array.dtype.kind == "V":  # bfloat16, which torch.from_numpy does not know
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def attention_into(out, query, key, value, **options):
    """cattn.scaled_dot_product_attention on tensors, written into the tensor `out`
    (any strides); options by name, as for `_attend`."""
    _attend(numpy_view(out, "out"), *numpy_views(query, key, value), **options)
    return out


def sinks_array(sinks):
    """Attention sinks (a tensor or None) as cattn takes them: float32 or float64."""
    if sinks is None:
        return None
    if sinks.dtype not in (torch.float32, torch.float64):
        sinks = sinks.float()  # a handful of logits: the kernel takes them in float32
    return numpy_view(sinks, "sinks")


def option_arrays(attn_mask, key_lengths, q_offset, k_offset, sinks):
    """The tensor options as cattn takes them: NumPy views (sinks in float32 or float64;
    lengths and offsets may also be ints)."""
    if attn_mask is not None:
        attn_mask = numpy_view(attn_mask, "attn_mask")
    if isinstance(key_lengths, torch.Tensor):
        key_lengths = numpy_view(key_lengths, "key_lengths")
    if isinstance(q_offset, torch.Tensor):
        q_offset = numpy_view(q_offset, "q_offset")
    if isinstance(k_offset, torch.Tensor):
        k_offset = numpy_view(k_offset, "k_offset")
    return attn_mask, key_lengths, q_offset, k_offset, sinks_array(sinks)


def _attend(out, query, key, value, *, attn_mask=None, is_causal=False, scale=None,
            enable_gqa=False, window=None, alignment="top_left",
            key_lengths=None, q_offset=None, k_offset=None, softcap=None,
            sinks=None, return_weights=False, heads_last=False):
    """cattn.scaled_dot_product_attention on NumPy views of tensors (`out` may be None):
    what it returns, NumPy arrays (heads_last: a new result laid out as
    (batch, L, heads, Ev) in memory). The options travel by name (explicit keywords all
    the way: a dict of them costs microseconds per call); the tensor ones become arrays
    here (see `option_arrays`)."""
    if not (attn_mask is key_lengths is q_offset is k_offset is sinks is None):
        attn_mask, key_lengths, q_offset, k_offset, sinks = option_arrays(
            attn_mask, key_lengths, q_offset, k_offset, sinks)
    return cattn.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, window=window, alignment=alignment, key_lengths=key_lengths,
        q_offset=q_offset, k_offset=k_offset, softcap=softcap, sinks=sinks, out=out,
        return_weights=return_weights, _heads_last=heads_last)


@torch.library.custom_op("cattn::scaled_dot_product_attention", mutates_args=(),
                         device_types="cpu")
def _operator(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False,
              window_left: Optional[int] = None, window_right: Optional[int] = None,
              alignment: str = "top_left", key_lengths: Optional[torch.Tensor] = None,
              q_offset: Optional[torch.Tensor] = None, k_offset: Optional[torch.Tensor] = None,
              softcap: Optional[float] = None,
              sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """cattn.scaled_dot_product_attention as a PyTorch operator. The window is given by
    its two sides (None: no limit on that side); lengths and offsets as integer tensors.
    (The arguments after `scale` may also be given by position: an operator's tensor
    arguments cannot be keyword-only.)"""
    out = empty_result(query, key, value, enable_gqa)
    return attention_into(out, query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa,
                          window=_window(window_left, window_right), alignment=alignment,
                          key_lengths=key_lengths, q_offset=q_offset, k_offset=k_offset,
                          softcap=softcap, sinks=sinks)


@_operator.register_fake
def _(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
      window_left=None, window_right=None, alignment="top_left", key_lengths=None,
      q_offset=None, k_offset=None, softcap=None, sinks=None):
    return empty_result(query, key, value, enable_gqa)


def _no_gradient(ctx, grad_output):
    raise RuntimeError(
        "cattn.scaled_dot_product_attention computes inference only and has no gradient: "
        "run the model under torch.no_grad() or torch.inference_mode() (and model.eval()), "
        "or train with another attention implementation (attn_implementation='sdpa')")


def _setup_context(ctx, inputs, output):
    pass


_operator.register_autograd(_no_gradient, setup_context=_setup_context)


def traced(*tensors):
    """Whether a call on these tensors (None: absent) is traced, by torch.compile or
    torch.export, or recorded by autograd: then it must be the operator, which they see."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors))


def _as_tensor(x):
    return x if x is None or isinstance(x, torch.Tensor) else torch.tensor(x)


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False,
                                 scale=None, *, enable_gqa=False, window=None,
                                 alignment="top_left", key_lengths=None, q_offset=None,
                                 k_offset=None, softcap=None, sinks=None):
    """`cattn.scaled_dot_product_attention` on CPU tensors, returning a tensor.

    Inside a traced graph (torch.compile, torch.export) and whenever autograd records the
    call, this is the operator ``torch.ops.cattn.scaled_dot_product_attention``; otherwise
    the operator's implementation is called directly, skipping the dispatcher's cost.
    Options are those of `cattn.scaled_dot_product_attention` (lengths and offsets as ints
    or integer tensors). The result of 4-D operands is laid out in memory as
    (batch, L, heads, Ev): ``out.transpose(1, 2)`` is contiguous.

    Raises
    ------
    ValueError
        A tensor on another device than the CPU (or an option out of its range).
    TypeError
        A dtype cattn cannot read (see `cattn.scaled_dot_product_attention`).
    RuntimeError
        On the backward pass: cattn computes inference only.
    """
    if traced(query, key, value, sinks):
        left, right = (None, None) if window is None else window
        return _operator(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa, window_left=left,
                         window_right=right, alignment=alignment,
                         key_lengths=_as_tensor(key_lengths), q_offset=_as_tensor(q_offset),
                         k_offset=_as_tensor(k_offset), softcap=softcap, sinks=sinks)
    options = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                   enable_gqa=enable_gqa, window=window, alignment=alignment,
                   key_lengths=key_lengths, q_offset=q_offset, k_offset=k_offset,
                   softcap=softcap, sinks=sinks)
    if one_batch_axis(query, key, value):
        return attention_heads_last(query, key, value, **options).transpose(1, 2)
    return attention_into(empty_result(query, key, value, enable_gqa), query, key, value,
                          **options)

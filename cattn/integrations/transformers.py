"""cattn as an attention implementation of Hugging Face transformers (the optional extra
``cattn[transformers]``).

>>> import cattn.integrations.transformers as cattn_hf
>>> cattn_hf.register()                       # attn_implementation="cattn" from now on
>>> from transformers import AutoModelForCausalLM, LlamaConfig
>>> config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
>>> model = AutoModelForCausalLM.from_config(config, attn_implementation="cattn")
>>> model.config._attn_implementation
'cattn'

`register()` adds two functions under the name "cattn", as transformers' own `sdpa` and
`flash_attention_2` are plugged in:

- `cattn_attention_forward` to `transformers.AttentionInterface`: every attention layer
  runs through `cattn.scaled_dot_product_attention` (the operator
  ``torch.ops.cattn.scaled_dot_product_attention`` under `torch.compile`). Queries, keys
  and values are read in place (the cache's keys too, whatever its kind), grouped-query
  heads share their key/value heads without copies, and the result is written straight
  into the (batch, L, heads, Ev) tensor the model reshapes. The layer's `scaling`,
  `softcap` and `s_aux` (attention sinks) are applied inside the kernel.
  `output_attentions=True` returns each layer's (batch, heads, L, S) weights as eager
  does (outside torch.compile).
- `cattn_mask` to `transformers.masking_utils.AttentionMaskInterface`: instead of a dense
  (batch, 1, L, S) mask, the model's mask becomes an `AttentionPattern` (causal or not, a
  sliding window, the queries' and keys' positions, and one row of valid keys per sequence
  when there is padding), which cattn applies without materializing the mask. Chunked
  attention (Llama 4) becomes each sequence's chunks as packed sequences of
  `cattn.varlen_attention`, or for one query a window from its chunk's start. Patterns it
  cannot express (packed sequences, a model's own mask functions, chunks under other
  padding than left padding or inside torch.compile) fall back to the dense boolean mask.

cattn computes inference only, on the CPU: dropout must be 0 (`model.eval()`), and tensors
on another device, an additive position bias (T5) or a backward pass raise a clear error.
"""
import numpy as np
import torch
from transformers import AttentionInterface
from transformers import masking_utils
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                        causal_mask_function, prepare_padding_mask, sdpa_mask)

import cattn
from cattn.integrations import torch as cattn_torch

__all__ = ["register", "cattn_attention_forward", "cattn_mask", "AttentionPattern"]

NAME = "cattn"


class AttentionPattern:
    """What `cattn_mask` hands to the attention layers in place of a dense mask.

    is_causal : bool
    window : (left, right) or None
        cattn's sliding window, relative to the diagonal.
    key_mask : bool tensor (batch, 1, 1, S) or None
        True for the keys that take part (padding excluded); None when all do.
    alignment : "top_left" or "bottom_right"
    q_offset, k_offset : int, integer tensor or None
        Positions of the first query and of the first key in the sequence (a cache's keys
        start after the ones a sliding window dropped), so causality and the window compare
        true positions whatever the cache holds. None when an alignment says as much (the
        kernel then needs no per-item diagonals): "top_left" when both start at the same
        position, "bottom_right" when the last query and the last key are at the same
        position (a dynamic cache's keys).
    key_lengths : int or None
        Keys at or past it take no part (a static buffer's unfilled keys).
    chunks : list of (cu_seqlens_q, cu_seqlens_k) or None
        Chunked attention over several queries: per batch item, its queries and keys cut
        into the sequences of `cattn.varlen_attention` (one per chunk, bottom-right
        causal), which then replaces the pattern's other fields.
    dense : callable or None
        For chunked patterns: builds the dense boolean (batch, 1, L, S) mask, for the
        calls that need one (attention weights, traced graphs).
    """

    # Not a 2-D padding mask: transformers' mask helpers pass it through unchanged when
    # generate() builds the masks ahead of the forward pass (static caches).
    ndim = 4

    def __init__(self, is_causal, window, key_mask, alignment, q_offset, k_offset, *,
                 key_lengths=None, chunks=None, dense=None):
        self.is_causal = is_causal
        self.window = window
        self.key_mask = key_mask
        self.alignment = alignment
        self.q_offset = q_offset
        self.k_offset = k_offset
        self.key_lengths = key_lengths
        self.chunks = chunks
        self.dense = dense

    def __repr__(self):
        padding = "none" if self.key_mask is None else tuple(self.key_mask.shape)
        return (f"AttentionPattern(is_causal={self.is_causal}, window={self.window}, "
                f"key_mask={padding}, alignment={self.alignment!r}, "
                f"q_offset={self.q_offset}, k_offset={self.k_offset}, "
                f"key_lengths={self.key_lengths}, "
                f"chunks={None if self.chunks is None else len(self.chunks)})")


def _closure(function):
    return dict(zip(function.__code__.co_freevars,
                    (cell.cell_contents for cell in function.__closure__)))


def _code(function):
    return getattr(function, "__code__", None)


# transformers' mask functions are closures: known by their code, read by their cells.
_AND_CODE = _code(masking_utils.and_masks(causal_mask_function))
_SLIDING_CODE = _code(masking_utils.sliding_window_overlay(1))
_SLIDING_BIDIRECTIONAL_CODE = _code(masking_utils.sliding_window_bidirectional_overlay(1))
_CHUNKED_CODE = _code(masking_utils.chunked_overlay(1, None))


def _chunking(mask_function):
    """(chunk_size, left_padding) of transformers' chunked causal mask, None otherwise."""
    if _code(mask_function) is not _AND_CODE:
        return None
    parts = _closure(mask_function)["mask_functions"]
    if len(parts) != 2 or _code(parts[0]) is not _CHUNKED_CODE or (
            parts[1] is not causal_mask_function):
        return None
    cells = _closure(parts[0])
    return cells["chunk_size"], cells["left_padding"]


def _native_pattern(mask_function):
    """(is_causal, window) of the mask functions cattn computes natively, None otherwise."""
    if mask_function is causal_mask_function:
        return True, None
    if mask_function is bidirectional_mask_function:
        return False, None
    if _code(mask_function) is not _AND_CODE:
        return None
    parts = _closure(mask_function)["mask_functions"]
    if len(parts) != 2:
        return None
    overlay, base = parts
    if _code(overlay) is _SLIDING_CODE and base is causal_mask_function:
        # kv_idx > q_idx - sliding_window
        return True, (_closure(overlay)["sliding_window"] - 1, 0)
    if _code(overlay) is _SLIDING_BIDIRECTIONAL_CODE and base is bidirectional_mask_function:
        # |q_idx - kv_idx| <= sliding_window
        side = _closure(overlay)["sliding_window"]
        return False, (side, side)
    return None


def cattn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
               mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """The mask function registered with `AttentionMaskInterface` (the signature of
    transformers' `sdpa_mask`): an `AttentionPattern` for causal, bidirectional and
    sliding-window masks with any padding, the dense boolean (batch, 1, L, S) mask for
    other patterns."""
    if isinstance(attention_mask, AttentionPattern):  # built ahead by generate()
        return attention_mask

    def dense():
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, allow_is_causal_skip=False,
                         allow_is_bidirectional_skip=False,
                         use_vmap=kwargs.get("use_vmap", False),
                         device=kwargs.get("device", "cpu"))

    chunking = _chunking(mask_function)
    if chunking is not None:
        pattern = _chunked_pattern(q_length, kv_length, q_offset, kv_offset, *chunking,
                                   attention_mask, dense)
        return dense() if pattern is None else pattern
    pattern = _native_pattern(mask_function)
    if pattern is None:
        return dense()
    is_causal, window = pattern
    key_mask = None
    if attention_mask is not None:
        # the 2-D mask covers positions 0 ..; the keys are positions kv_offset ..
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length]
        # (outside a traced graph, a mask without padding is dropped: the kernel then
        # reads no mask at all)
        if torch.compiler.is_compiling() or not bool(padding.all()):
            key_mask = padding[:, None, None, :]
    if isinstance(q_offset, torch.Tensor):
        # a static cache's own length counter, which its update advances before the
        # attention reads the pattern: keep the position the mask is made for (an int
        # outside traced graphs: the layers then read no tensor for it)
        q_offset = q_offset.clone() if torch.compiler.is_compiling() else int(q_offset)
    return _aligned(is_causal, window, key_mask, q_length, kv_length, q_offset, kv_offset)


def _aligned(is_causal, window, key_mask, q_length, kv_length, q_offset, kv_offset):
    """The pattern, its offsets replaced by an alignment where one says as much."""
    alignment = "top_left"
    if isinstance(q_offset, int):
        if q_offset == kv_offset:
            q_offset = kv_offset = None
        elif q_offset + q_length == kv_offset + kv_length:
            alignment, q_offset, kv_offset = "bottom_right", None, None
    return AttentionPattern(is_causal, window, key_mask, alignment, q_offset, kv_offset)


def _chunked_pattern(q_length, kv_length, q_offset, kv_offset, chunk_size, left_padding,
                     attention_mask, dense):
    """Chunked causal attention (Llama 4): a query sees the keys of its own chunk up to
    itself, chunks counted from each sequence's first real token. None where cattn cannot
    take it without a dense mask: inside a traced graph (the per-item calls are not the
    operator), with padding other than left padding, or queries past the keys."""
    if torch.compiler.is_compiling() or left_padding is None:
        return None
    first_query, first_key = int(q_offset), int(kv_offset)
    query_end, key_end = first_query + q_length, first_key + kv_length
    if query_end > key_end or first_key > first_query:
        return None
    starts = [int(start) for start in left_padding]  # each sequence's first real token
    if attention_mask is not None:
        # the keys a query may see must be padding exactly when they precede the start
        # (the chunks exclude left padding; holes or right padding they would not)
        seen_end = min(key_end, query_end)
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, first_key:seen_end].bool()
        positions = torch.arange(first_key, seen_end)
        if not torch.equal(padding, positions >= torch.tensor(starts)[:, None]):
            return None
    if q_length == 1:
        return _chunk_decoding(first_query, first_key, kv_length, chunk_size, starts)
    chunks = [_chunk_sequences(first_query, q_length, first_key, kv_length, chunk_size,
                               start) for start in starts]
    return AttentionPattern(True, None, None, "bottom_right", None, None, chunks=chunks,
                            dense=dense)


def _chunk_start(position, chunk_size, start):
    """Where the chunk of `position` begins (chunks of a sequence that begins at `start`;
    a padding position gets itself)."""
    if position < start:
        return position
    return start + (position - start) // chunk_size * chunk_size


def _chunk_decoding(position, first_key, kv_length, chunk_size, starts):
    """One query per sequence: a window from its chunk's start. When the sequences' chunks
    begin at different positions (left padding), a per-item query position places each
    window's left end on its chunk start: the query at chunk_start + chunk_size - 1 with
    window (chunk_size - 1, 0), the keys past the true position cut by key_lengths."""
    chunk_starts = {_chunk_start(position, chunk_size, start) for start in starts}
    if len(chunk_starts) == 1:
        (chunk_start,) = chunk_starts
        return _aligned(True, (position - chunk_start, 0), None, 1, kv_length, position,
                        first_key)
    window_ends = torch.tensor([_chunk_start(position, chunk_size, start) + chunk_size - 1
                                for start in starts])
    seen = position - first_key + 1
    return AttentionPattern(True, (chunk_size - 1, 0), None, "top_left", window_ends,
                            first_key, key_lengths=seen if seen < kv_length else None)


def _chunk_sequences(first_query, q_length, first_key, kv_length, chunk_size, start):
    """cu_seqlens_q and cu_seqlens_k of one batch item's chunks, for varlen_attention:
    its queries (positions first_query ..) cut where chunks begin, each piece over the keys
    (positions first_key ..) from its chunk's start to its own last query (bottom-right
    causal). Padding queries (before `start`) get no key; keys no piece sees (padding, a
    previous chunk's, a static buffer's unfilled end) form sequences without queries."""
    query_end, key_end = first_query + q_length, first_key + kv_length
    cuts = [first_query]
    cut = start if first_query < start else _chunk_start(first_query, chunk_size,
                                                         start) + chunk_size
    while cut < query_end:
        cuts.append(cut)
        cut += chunk_size
    cuts.append(query_end)
    cu_q, cu_k = [0], [0]
    next_key = first_key
    for begin, end in zip(cuts, cuts[1:]):
        if begin < start:  # padding queries
            keys_begin = keys_end = next_key
        else:
            keys_begin = max(_chunk_start(begin, chunk_size, start), first_key)
            keys_end = end
        if keys_begin > next_key:
            cu_q.append(cu_q[-1])
            cu_k.append(keys_begin - first_key)
        cu_q.append(end - first_query)
        cu_k.append(keys_end - first_key)
        next_key = keys_end
    if next_key < key_end:
        cu_q.append(cu_q[-1])
        cu_k.append(kv_length)
    return np.array(cu_q, dtype=np.intp), np.array(cu_k, dtype=np.intp)


def cattn_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                            scaling=None, sliding_window=None, softcap=None, is_causal=None,
                            s_aux=None, position_bias=None, **kwargs):
    """The attention function registered with `AttentionInterface` (the signature of
    transformers' `sdpa_attention_forward`): query (batch, Hq, L, E), key and value
    (batch, Hkv, S, E) -> ((batch, L, Hq, Ev) output, None)."""
    if position_bias is not None:
        raise ValueError("cattn does not apply an additive position bias (T5-style relative "
                         "attention): load this model with attn_implementation='eager' or "
                         "'sdpa'")
    if dropout:
        raise ValueError(f"cattn computes inference only, but this layer asks for dropout "
                         f"{dropout}: call model.eval() (or set the attention dropout to 0)")
    # weights, traced graphs and other layouts go through the operator's general path;
    # the common path works on NumPy views (a tensor's shape costs 0.3 us, an array's 30 ns)
    general = kwargs.get("output_attentions") or cattn_torch.traced(query, key, value, s_aux)
    arrays = None if general else cattn_torch.numpy_views(query, key, value)
    q_shape, k_shape = (query.shape, key.shape) if general else (arrays[0].shape,
                                                                 arrays[1].shape)
    enable_gqa = q_shape[1] != k_shape[1]
    if not general and not cattn_torch.one_batch_axis(*arrays):
        general, arrays = True, None
    if isinstance(attention_mask, AttentionPattern) and attention_mask.chunks is not None:
        if not general:
            return _chunked(*arrays, attention_mask.chunks, scale=scaling,
                            enable_gqa=enable_gqa, softcap=softcap, sinks=s_aux), None
        attention_mask = attention_mask.dense()  # (what those calls take)
    q_offset = k_offset = key_lengths = None
    alignment = "top_left"
    if isinstance(attention_mask, AttentionPattern):
        mask, causal, window = (attention_mask.key_mask, attention_mask.is_causal,
                                attention_mask.window)
        alignment, key_lengths = attention_mask.alignment, attention_mask.key_lengths
        q_offset, k_offset = attention_mask.q_offset, attention_mask.k_offset
    elif attention_mask is None:
        # no mask from the model: the layer's own flags, the last query on the last key
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = None
        if sliding_window is not None:
            window = (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
        mask, alignment = None, "bottom_right"
    else:  # a dense mask the model (or the user) built: applied as it is
        mask, causal, window = attention_mask, False, None
        if mask.is_floating_point() and mask.dtype not in (torch.float32, torch.float64):
            mask = mask.float()  # additive masks of 16-bit models: cattn adds in float32
    if general:
        # (built here only: the common path below passes each option as a keyword, a dict
        # of them costs a microsecond per call)
        options = dict(attn_mask=mask, is_causal=causal, scale=scaling,
                       enable_gqa=enable_gqa, window=window, alignment=alignment,
                       key_lengths=key_lengths, q_offset=q_offset, k_offset=k_offset,
                       softcap=softcap, sinks=s_aux)
        if kwargs.get("output_attentions"):
            return _with_weights(query, key, value, options)
        out = cattn_torch.scaled_dot_product_attention(query, key, value, **options)
        return out.transpose(1, 2), None
    if (q_shape[2] == 1 and enable_gqa and s_aux is None and key_lengths is None
            and (mask is None or mask.shape[1] == 1) and getattr(q_offset, "ndim", 0) == 0):
        visible = _visible_keys(k_shape[2], is_causal=causal, window=window,
                                alignment=alignment, q_offset=q_offset, k_offset=k_offset)
        if visible is not None:
            return _one_token_grouped(*arrays, visible, attn_mask=mask, scale=scaling,
                                      softcap=softcap), None
    # (the operator's eager path, without its checks and transposes)
    return cattn_torch.attention_heads_last(
        *arrays, attn_mask=mask, is_causal=causal, scale=scaling,
        enable_gqa=enable_gqa, window=window, alignment=alignment, key_lengths=key_lengths,
        q_offset=q_offset, k_offset=k_offset, softcap=softcap, sinks=s_aux), None


def _chunked(query_array, keys, values, chunks, **options):
    """Chunked attention on NumPy views of the operands: each batch item's chunks as the
    sequences of one `cattn.varlen_attention` call, over (L, heads, E) views of the item's
    operands, written into the (batch, L, heads, Ev) result."""
    batch, heads, L = query_array.shape[:3]
    out = np.empty((batch, L, heads, values.shape[-1]), dtype=query_array.dtype)
    sinks = cattn_torch.sinks_array(options.pop("sinks"))
    for item, (cu_seqlens_q, cu_seqlens_k) in enumerate(chunks):
        cattn.varlen_attention(query_array[item].transpose(1, 0, 2),
                               keys[item].transpose(1, 0, 2), values[item].transpose(1, 0, 2),
                               cu_seqlens_q, cu_seqlens_k, is_causal=True,
                               alignment="bottom_right", sinks=sinks, out=out[item],
                               **options)
    return cattn_torch.tensor_view(out)


def _with_weights(query, key, value, options):
    """output_attentions=True: the output and the (batch, Hq, L, S) weights, as eager
    returns them (a row that sees no key has weights 0 here)."""
    if cattn_torch.traced(query, key, value, options["sinks"]):
        raise ValueError("cattn returns attention weights (output_attentions=True) outside "
                         "torch.compile and autograd only: call the model under "
                         "torch.no_grad() without compiling it, or use "
                         "attn_implementation='eager'")
    if not cattn_torch.one_batch_axis(query, key, value):
        raise ValueError(f"output_attentions=True needs (batch, heads, L, E) operands of "
                         f"one batch size, got query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)} and value {tuple(value.shape)}")
    return cattn_torch.attention_heads_last(query, key, value, return_weights=True,
                                            **options)


def _visible_keys(S, *, is_causal, window, alignment, q_offset, k_offset):
    """The keys [lo, hi) one query sees under causality and the window, or None if none."""
    if alignment == "bottom_right":
        position = S - 1
    elif q_offset is None:
        position = 0
    else:
        position = int(q_offset) - int(k_offset)
    left, right = (None, None) if window is None else window
    if is_causal:
        right = 0 if right is None else min(right, 0)
    lo = 0 if left is None else max(0, position - left)
    hi = S if right is None else min(S, position + right + 1)
    return (lo, hi) if lo < hi else None


def _one_token_grouped(queries, keys, values, visible, *, attn_mask, scale, softcap):
    """Decoding one token with grouped-query heads: the query heads of each key/value head
    become its rows, over the slice of keys the token sees. One (group, S) product per
    key/value head reads each key once, where one row per query head would re-read the
    keys for every head of the group. Takes NumPy views (shapes and slices in NumPy: after
    a decoding call has streamed a long cache through the CPU's caches, every operation
    runs cold, and one of torch's costs tens of microseconds there)."""
    batch, heads, _, features = queries.shape
    kv_heads = keys.shape[1]
    lo, hi = visible
    if lo != 0 or hi != keys.shape[2]:
        keys, values = keys[:, :, lo:hi], values[:, :, lo:hi]
    if attn_mask is not None:
        attn_mask = cattn_torch.numpy_view(attn_mask, "attn_mask")[..., lo:hi]
    # (cattn's (batch, kv_heads, group, Ev) result is the (batch, 1, heads, Ev) one in memory)
    out = cattn.scaled_dot_product_attention(
        queries.reshape(batch, kv_heads, heads // kv_heads, features), keys, values,
        attn_mask=attn_mask, scale=scale, softcap=softcap)
    return cattn_torch.tensor_view(out.reshape(batch, 1, heads, out.shape[-1]))


def register():
    """Register "cattn" with transformers' attention and mask interfaces (idempotent):
    afterwards `from_pretrained(..., attn_implementation="cattn")`,
    `from_config(..., attn_implementation="cattn")` and
    `model.set_attn_implementation("cattn")` run attention through cattn."""
    AttentionInterface.register(NAME, cattn_attention_forward)
    AttentionMaskInterface.register(NAME, cattn_mask)

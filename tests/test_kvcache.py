"""KVCache: incremental decoding (token by token, chunked prefill, ragged prompts, several
layers) equals one full causal pass; the cache never reallocates and refuses to overflow."""
import numpy as np
import pytest

import cattn
from cattn import layers
from conftest import tolerance

E, H = 32, 4


def make_layer(rng, dtype=np.float32, num_kv_heads=None):
    mha = cattn.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, dtype=dtype, rng=rng)
    mha.load_state_dict({n: rng.standard_normal(w.shape) * 0.3
                         for n, w in mha.state_dict().items()})
    return mha


def assert_close(got, want, dtype):
    tol = tolerance(dtype)
    np.testing.assert_allclose(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


def decode_in_chunks(mha, x, chunks, cache, need_weights=False):
    """Feed x (B, L, E) to the layer through the cache, chunk by chunk."""
    outs, weights, start = [], [], 0
    for size in chunks:
        out, w = mha(x[:, start:start + size], cache=cache, is_causal=True,
                     need_weights=need_weights, average_attn_weights=False)
        outs.append(out)
        weights.append(w)
        start += size
    assert start == x.shape[1]
    return np.concatenate(outs, axis=1), weights


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1], [9], [2, 7]],
                         ids=["token_by_token", "mixed", "one_chunk", "prefill_then_rest"])
def test_decoding_equals_full_causal_pass(rng, dtype, num_kv_heads, chunks):
    mha = make_layer(rng, dtype, num_kv_heads)
    x = rng.standard_normal((2, 9, E)).astype(dtype)
    x_before = x.copy()
    full_out, full_w = mha(x, is_causal=True, need_weights=True, average_attn_weights=False)
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=16)
    out, weights = decode_in_chunks(mha, x, chunks, cache, need_weights=True)
    assert_close(out, full_out, dtype)
    np.testing.assert_array_equal(x, x_before)
    assert cache.lengths.tolist() == [[9, 9]]
    # the weights of each chunk are the matching rows of the full causal weights
    start = 0
    for size, w in zip(chunks, weights):
        n_keys = start + size
        assert w.shape == (2, H, size, n_keys)
        assert_close(w, full_w[:, :, start:start + size, :n_keys], dtype)
        start += size


def test_cache_reaches_kernel_bottom_right_with_lengths(rng, monkeypatch):
    """Decoding hands the cache's own preallocated arrays to the kernel with the valid
    lengths and the bottom-right diagonal (no slicing, no copies)."""
    seen = []
    real = layers.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((k, v, kwargs))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(layers, "scaled_dot_product_attention", spy)
    mha = make_layer(rng, num_kv_heads=2)
    cache = cattn.KVCache.for_layer(mha, batch_size=1, max_len=64)
    x = rng.standard_normal((1, 5, E)).astype(np.float32)
    mha(x[:, :3], cache=cache, is_causal=True)
    mha(x[:, 3:4], cache=cache)
    for (k, v, kwargs), length in zip(seen, (3, 4)):
        assert k.base is cache.keys and v.base is cache.values
        assert k.shape == (1, 2, 64, E // H)
        assert kwargs["alignment"] == "bottom_right"
        assert kwargs["key_lengths"].tolist() == [length]
        assert kwargs["enable_gqa"] is True


def test_append_never_reallocates(rng):
    mha = make_layer(rng)
    cache = cattn.KVCache.for_layer(mha, batch_size=3, max_len=12)
    keys, values = cache.keys, cache.values
    pointers = (keys.ctypes.data, values.ctypes.data)
    x = rng.standard_normal((3, 12, E)).astype(np.float32)
    for t in range(12):
        mha(x[:, t:t + 1], cache=cache)
        assert cache.lengths.tolist() == [[t + 1] * 3]
    assert cache.keys is keys and cache.values is values
    assert (keys.ctypes.data, values.ctypes.data) == pointers
    # the cached keys are the projected keys of the inputs, head by head
    k = x @ mha.k_proj_weight.T + mha.in_proj_bias[E:2 * E]
    want = k.reshape(3, 12, H, E // H).transpose(0, 2, 1, 3)
    assert_close(cache.keys[0], want, np.float32)


def test_overflow_raises_and_changes_nothing(rng):
    mha = make_layer(rng)
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=6)
    x = rng.standard_normal((2, 5, E)).astype(np.float32)
    mha(x, cache=cache, is_causal=True)
    snapshot = cache.keys.copy(), cache.values.copy(), cache.lengths.copy()
    with pytest.raises(ValueError, match="overflow.*max_len=6"):
        mha(x[:, :2], cache=cache, is_causal=True)
    np.testing.assert_array_equal(cache.keys, snapshot[0])
    np.testing.assert_array_equal(cache.values, snapshot[1])
    np.testing.assert_array_equal(cache.lengths, snapshot[2])
    mha(x[:, :1], cache=cache)  # exactly full is fine
    assert cache.lengths.tolist() == [[6, 6]]
    with pytest.raises(ValueError, match="overflow"):
        mha(x[:, :1], cache=cache)


def test_ragged_prompts_left_padded(rng):
    """Two prompts of different lengths, left-padded in one batch, then decoded together:
    each sequence's real tokens get exactly what a full causal pass over it alone gives."""
    dtype = np.float32
    mha = make_layer(rng, num_kv_heads=2)
    lengths, steps = [5, 2], 3
    seqs = [rng.standard_normal((n + steps, E)).astype(dtype) for n in lengths]
    P = max(lengths)
    prompt = np.zeros((2, P, E), dtype=dtype)
    pad = np.zeros((2, P), dtype=bool)
    for b, n in enumerate(lengths):
        prompt[b, P - n:] = seqs[b][:n]
        pad[b, :P - n] = True
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=16)
    out_prompt, _ = mha(prompt, cache=cache, is_causal=True, key_padding_mask=pad)
    assert cache.lengths.tolist() == [lengths]
    decoded = [mha(np.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None],
                   cache=cache)[0] for t in range(steps)]
    for b, n in enumerate(lengths):
        want, _ = mha(seqs[b][None], is_causal=True)
        assert_close(out_prompt[b, P - n:], want[0, :n], dtype)
        for t in range(steps):
            assert_close(decoded[t][b, 0], want[0, n + t], dtype)
    # the cache holds each sequence's keys contiguously from position 0
    for b, n in enumerate(lengths):
        k = seqs[b] @ mha.k_proj_weight.T + mha.in_proj_bias[E:E + mha.kv_dim]
        assert_close(cache.keys[0, b, :, :n + steps],
                     k.reshape(n + steps, 2, E // H).transpose(1, 0, 2), dtype)


def test_stack_of_layers_with_one_cache(rng):
    """A two-layer residual stack decoded with one multi-layer cache equals its full pass."""
    dtype = np.float64
    stack = [make_layer(rng, dtype), make_layer(rng, dtype)]

    def run(x, cache=None):
        for i, mha in enumerate(stack):
            out, _ = mha(x, cache=None if cache is None else cache.layer(i), is_causal=True)
            x = x + out
        return x

    x = rng.standard_normal((2, 7, E))
    want = run(x)
    cache = cattn.KVCache(2, 10, H, E // H, num_layers=2, dtype=dtype)
    assert cache.keys.shape == (2, 2, H, 10, E // H) and len(cache) == 2
    got = np.concatenate([run(x[:, :4], cache)] + [run(x[:, t:t + 1], cache)
                                                   for t in range(4, 7)], axis=1)
    assert_close(got, want, dtype)
    with pytest.raises(ValueError, match="holds 2 layers"):
        stack[0](x[:, :1], cache=cache)


def test_reset_reuses_memory(rng):
    mha = make_layer(rng)
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=8)
    x = rng.standard_normal((2, 8, E)).astype(np.float32)
    first, _ = mha(x, cache=cache, is_causal=True)
    cache.reset(batch_index=1)
    assert cache.lengths.tolist() == [[8, 0]]
    cache.reset()
    again, _ = mha(x, cache=cache, is_causal=True)
    np.testing.assert_array_equal(again, first)


def test_cache_errors(rng):
    mha = make_layer(rng)
    x = rng.standard_normal((2, 3, E)).astype(np.float32)
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=8)
    cases = [
        (dict(cache=cattn.KVCache.for_layer(mha, batch_size=3, max_len=8)), ValueError,
         "batch size 2 but the cache holds 3"),
        (dict(cache=cattn.KVCache(2, 8, 2, E // H)), ValueError, "key/value heads"),
        (dict(cache=cattn.KVCache(2, 8, H, E // H, dtype=np.float64)), ValueError, "float64"),
        (dict(cache=cache, key=x.copy()), ValueError, "without a different key"),
        (dict(cache=cache, attn_mask=np.ones((3, 3), bool)), ValueError, "attn_mask"),
        (dict(cache=cache, key_padding_mask=np.array([[False, True, False]] * 2)),
         ValueError, "left padding"),
        (dict(cache=cache, key_padding_mask=np.zeros((2, 3))), ValueError, "boolean"),
        (dict(cache="cache"), TypeError, "KVCache"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            mha(x, **kwargs)
    assert cache.lengths.tolist() == [[0, 0]]  # nothing was appended by a failed call
    with pytest.raises(ValueError, match="kdim"):
        cattn.MultiHeadAttention(E, H, kdim=8, rng=rng)(x, cache=cache)
    layer = cache.layer(0)
    k = np.zeros((2, H, 1, E // H), dtype=np.float32)
    with pytest.raises(ValueError, match="batch=2"):
        layer.append(k[:1], k[:1])
    with pytest.raises(TypeError, match="dtype"):
        layer.append(k.astype(np.float64), k)
    with pytest.raises(ValueError, match="num_new"):
        layer.append(k, k, num_new=[2, 0])
    with pytest.raises(IndexError):
        cache.layer(1)
    with pytest.raises(ValueError, match=">= 1"):
        cattn.KVCache(2, 0, H, 8)


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_long_cache_decode_matches_full_pass(rng, num_kv_heads):
    """Few heads and a long, partly filled cache: the kernel's decode path (chunks of the
    cache merged by log-sum-exp) must agree with the full causal pass."""
    dtype = np.float32
    mha = cattn.MultiHeadAttention(16, 2, num_kv_heads=num_kv_heads, dtype=dtype, rng=rng)
    mha.load_state_dict({n: rng.standard_normal(w.shape) * 0.3
                         for n, w in mha.state_dict().items()})
    lengths, steps = [1500, 900], 3
    seqs = [rng.standard_normal((n + steps, 16)).astype(dtype) for n in lengths]
    P = max(lengths)
    prompt = np.zeros((2, P, 16), dtype=dtype)
    pad = np.zeros((2, P), dtype=bool)
    for b, n in enumerate(lengths):
        prompt[b, P - n:] = seqs[b][:n]
        pad[b, :P - n] = True
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=2048)
    mha(prompt, cache=cache, is_causal=True, key_padding_mask=pad)
    for t in range(steps):
        step = np.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
        # weights only on the last step: the kernel may take another path for them
        out, w = mha(step, cache=cache, need_weights=t == steps - 1)
        for b, n in enumerate(lengths):
            want, want_w = mha(seqs[b][None, :n + t + 1], is_causal=True, need_weights=True)
            assert_close(out[b, 0], want[0, -1], dtype)
            if w is not None:
                assert_close(w[b, 0, :n + t + 1], want_w[0, -1], dtype)
                assert np.all(w[b, 0, n + t + 1:] == 0)

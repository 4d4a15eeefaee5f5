"""T5's relative position bias (`position_bias=cattn.RelativePositionBias(...)`), looked up
by distance inside the kernel, against transformers' own T5 code: its bucket function and
T5Attention.compute_bias (a dense (1, H, L, S) bias given to the float64 reference)."""
import numpy as np
import pytest

import cattn
from cattn._position_bias import relative_position_bucket
from conftest import reference64, tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)
from test_isa_paths import ALL_PATHS

torch = pytest.importorskip("torch")
modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
sdpa = cattn.scaled_dot_product_attention
# (the last two: a max_distance far below a block of keys, so that one block holds keys
# beyond it on both sides of the stretch read by distance)
CONFIGS = [(32, 128, True), (32, 128, False), (16, 20, True), (8, 64, False), (8, 6, True),
           (12, 9, False)]


def t5_attention(heads, num_buckets, max_distance, bidirectional, table):
    config = modeling_t5.T5Config(num_heads=heads, d_model=8 * heads, d_kv=8,
                                  relative_attention_num_buckets=num_buckets,
                                  relative_attention_max_distance=max_distance,
                                  is_decoder=not bidirectional)
    layer = modeling_t5.T5Attention(config, has_relative_attention_bias=True)
    with torch.no_grad():
        layer.relative_attention_bias.weight.copy_(torch.from_numpy(table))
    return layer


def t5_bias(layer, L, S, first_query=0):
    """transformers' dense bias (1, H, L, S), queries at positions first_query.."""
    with torch.no_grad():
        return layer.compute_bias(L, S, past_seen_tokens=first_query).double().numpy()


@pytest.mark.parametrize("num_buckets, max_distance, bidirectional", CONFIGS)
def test_buckets_are_t5s(num_buckets, max_distance, bidirectional):
    distances = np.arange(-3 * max_distance, 3 * max_distance + 1)
    want = modeling_t5.T5Attention._relative_position_bucket(
        torch.from_numpy(distances), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    np.testing.assert_array_equal(
        relative_position_bucket(distances, bidirectional, num_buckets, max_distance), want)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_buckets, max_distance, bidirectional", CONFIGS)
def test_bias_matches_t5s_compute_bias(num_buckets, max_distance, bidirectional, dtype, path,
                                       rng):
    # 150 keys in blocks of 32, query blocks of 16, distances past max_distance: the bugs
    # this catches are a distance measured from the block instead of the sequence, a
    # sign flipped (key - query is T5's), the far buckets not clamped, a head mixed up.
    H, L, S = 4, 150, 150
    table = rng.standard_normal((num_buckets, H)).astype(np.float32)
    bias = cattn.RelativePositionBias(table, num_buckets=num_buckets,
                                      max_distance=max_distance, bidirectional=bidirectional)
    q, k, v = (rng.standard_normal((2, H, L, 16)).astype(dtype) for _ in range(3))
    causal = not bidirectional
    got = sdpa(q, k, v, position_bias=bias, is_causal=causal, _isa=path,
               _block_sizes=(16, 32), return_lse=True)
    want = reference64(q, k, v, attn_mask=t5_bias(t5_attention(
        H, num_buckets, max_distance, bidirectional, table), L, S), is_causal=causal,
        return_lse=True)
    also = reference64(q, k, v, position_bias=bias, is_causal=causal, return_lse=True)
    for g, w, a in zip(got, want, also):
        np.testing.assert_allclose(a, w, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g, w, **tolerance(dtype))


def test_decoding_positions_follow_the_diagonal(rng):
    # 3 new queries after 197 cached keys (bottom-right): T5 with past_seen_tokens 197.
    H, L, S = 2, 3, 200
    table = rng.standard_normal((32, H)).astype(np.float32)
    bias = cattn.RelativePositionBias(table, num_buckets=32, max_distance=128,
                                      bidirectional=False)
    q, k, v = (rng.standard_normal((1, H, n, 8)) for n in (L, S, S))
    got = sdpa(q, k, v, position_bias=bias, is_causal=True, alignment="bottom_right")
    want = reference64(q, k, v, is_causal=True, alignment="bottom_right", attn_mask=t5_bias(
        t5_attention(H, 32, 128, False, table), L, S, first_query=S - L))
    np.testing.assert_allclose(got, want, **tolerance(np.float64))
    with_offsets = sdpa(q, k, v, position_bias=bias, is_causal=True, q_offset=S - L + 1000,
                        k_offset=1000)
    np.testing.assert_allclose(with_offsets, want, **tolerance(np.float64))


def test_bias_is_bitwise_independent_of_the_thread_count(rng):
    table = rng.standard_normal((32, 4)).astype(np.float32)
    bias = cattn.RelativePositionBias(table, num_buckets=32, max_distance=128,
                                      bidirectional=True)
    q, k, v = (rng.standard_normal((2, 4, 300, 16)).astype(np.float32) for _ in range(3))
    runs = [sdpa(q, k, v, position_bias=bias, num_threads=n) for n in (1, 2, 3)]
    for out in runs[1:]:
        np.testing.assert_array_equal(out, runs[0])


def test_bad_position_bias_is_refused(rng):
    q = k = v = rng.standard_normal((1, 4, 3, 8))
    with pytest.raises(TypeError, match="RelativePositionBias"):
        sdpa(q, k, v, position_bias=np.zeros((32, 4)))
    bias = cattn.RelativePositionBias(np.zeros((32, 2)), num_buckets=32, max_distance=128,
                                      bidirectional=True)
    with pytest.raises(ValueError, match="2 heads"):
        sdpa(q, k, v, position_bias=bias)
    with pytest.raises(ValueError, match="num_buckets"):
        cattn.RelativePositionBias(np.zeros((16, 2)), num_buckets=32, max_distance=128,
                                   bidirectional=True)
    # T5's formula divides by log(max_distance / exact distances): garbage buckets else
    with pytest.raises(ValueError, match="max_distance must exceed the 4 distances"):
        cattn.RelativePositionBias(np.zeros((8, 2)), num_buckets=8, max_distance=4,
                                   bidirectional=False)
    with pytest.raises(ValueError, match="max_distance must exceed the 0 distances"):
        cattn.RelativePositionBias(np.zeros((2, 2)), num_buckets=2, max_distance=9,
                                   bidirectional=True)
    with pytest.raises(TypeError, match="bidirectional"):
        cattn.RelativePositionBias(np.zeros((32, 2)), num_buckets=32, max_distance=128,
                                   bidirectional="yes")


# ---------------------------------------------------------------- every entry point

def t5_table_bias(rng, heads, bidirectional):
    """T5's default bucketing: 32 buckets up to distance 128, so 150 keys reach the
    log-spaced buckets and the clamp past max_distance."""
    table = rng.standard_normal((32, heads)).astype(np.float32)
    return cattn.RelativePositionBias(table, num_buckets=32, max_distance=128,
                                      bidirectional=bidirectional)


def as_pages(k, v, page):
    """(B, Hkv, S, ·) keys and values as pages of `page` rows, the pages of the batch in
    reversed order, and the block table."""
    B, Hkv, S = k.shape[:3]
    n = S // page
    k_pages, v_pages = (x.reshape(B, Hkv, n, page, x.shape[3]).transpose(0, 2, 1, 3, 4)
                        .reshape(B * n, Hkv, page, x.shape[3])[::-1].copy() for x in (k, v))
    return k_pages, v_pages, (B * n - 1 - np.arange(B * n).reshape(B, n)).astype(np.int32)


def packed(x):
    """(B, H, T, D) -> (B·T, H, D)."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]))


def unpacked(x, B):
    """(B·T, H, D) -> (B, H, T, D)."""
    return x.reshape(B, -1, x.shape[1], x.shape[2]).transpose(0, 2, 1, 3)


def run_entry_point(entry, q, k, v, bias, **options):
    """The same problem (queries the last L positions of each sequence, bottom-right) through
    one entry point, its output as (B, Hq, L, Ev)."""
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if entry == "sdpa":
        return sdpa(q, k, v, position_bias=bias, enable_gqa=gqa, alignment="bottom_right",
                    **options)
    if entry == "varlen":
        out = cattn.varlen_attention(packed(q), packed(k), packed(v), np.arange(B + 1) * L,
                                     np.arange(B + 1) * S, position_bias=bias,
                                     enable_gqa=gqa, alignment="bottom_right", **options)
        return unpacked(out, B)
    k_pages, v_pages, table = as_pages(k, v, 10)
    if entry == "paged":
        return cattn.paged_attention(q, k_pages, v_pages, table, np.full(B, S),
                                     position_bias=bias, enable_gqa=gqa, **options)
    if entry == "paged packed":
        out = cattn.paged_attention(packed(q), k_pages, v_pages, table, np.full(B, S),
                                    cu_seqlens_q=np.arange(B + 1) * L, position_bias=bias,
                                    enable_gqa=gqa, **options)
        return unpacked(out, B)
    assert entry == "shared prefix"
    P = 70  # (every sequence's first 70 keys are the same: see shared_operands)
    return cattn.shared_prefix_attention(q, k[0, :, :P], v[0, :, :P], k[:, :, P:],
                                         v[:, :, P:], position_bias=bias, enable_gqa=gqa,
                                         **options)


ENTRY_POINTS = ["sdpa", "varlen", "paged", "paged packed", "shared prefix"]


def shared_operands(rng, dtype, L, Hkv, S=150):
    """(2, 4, L, 16) queries over 150 keys of Hkv heads, the first 70 keys shared by both
    sequences (a prefix for shared_prefix_attention)."""
    q = rng.standard_normal((2, 4, L, 16)).astype(dtype)
    k, v = (rng.standard_normal((2, Hkv, S, 16)).astype(dtype) for _ in range(2))
    k[1, :, :70], v[1, :, :70] = k[0, :, :70], v[0, :, :70]
    return q, k, v


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("L", [1, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("Hkv", [4, 2], ids=["heads", "grouped"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_matches_the_reference(entry, Hkv, L, path, rng):
    # The queries are the last L of 150 positions (bottom-right): the bugs this catches are
    # an entry point that drops the bias, measures a packed or paged sequence's distances
    # from the call's start instead of its own diagonal, or, with grouped heads (decoding:
    # the query heads of a key/value head are rows of one task), reads one head's row of
    # the bias for all the rows of its group.
    bidirectional = L > 1
    bias = t5_table_bias(rng, 4, bidirectional)
    q, k, v = shared_operands(rng, np.float32, L, Hkv)
    got = run_entry_point(entry, q, k, v, bias, is_causal=not bidirectional, _isa=path)
    if entry != "shared prefix":  # (it has no block sizes: two calls of its own)
        again = run_entry_point(entry, q, k, v, bias, is_causal=not bidirectional,
                                _isa=path, _block_sizes=(16, 32))
        np.testing.assert_allclose(again, got, **tolerance(np.float32))
    want = reference64(q, k, v, enable_gqa=Hkv != 4, is_causal=not bidirectional,
                       alignment="bottom_right", position_bias=bias)
    np.testing.assert_allclose(got, want, **tolerance(np.float32))


def test_grouped_decode_rows_read_their_own_heads_bias(rng):
    # A decode step with 4 query heads per key/value head runs each group as one task; the
    # call must be the one the kernel groups, and each row must get its own head's bias.
    bias = t5_table_bias(rng, 8, False)
    q = rng.standard_normal((2, 8, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 300, 16)).astype(np.float32) for _ in range(2))
    got = sdpa(q, k, v, position_bias=bias, enable_gqa=True, is_causal=True,
               alignment="bottom_right")
    assert cattn._kernel.last_call_stats()["items_per_task"] > 1
    want = reference64(q, k, v, enable_gqa=True, is_causal=True, alignment="bottom_right",
                       position_bias=bias)
    np.testing.assert_allclose(got, want, **tolerance(np.float32))


@pytest.mark.parametrize("L", [1, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_is_bitwise_independent_of_the_thread_count(entry, L, rng):
    bias = t5_table_bias(rng, 4, True)
    q, k, v = shared_operands(rng, np.float32, L, 2, S=1500)
    runs = [run_entry_point(entry, q, k, v, bias, num_threads=n) for n in (1, 2, 3)]
    for out in runs[1:]:
        np.testing.assert_array_equal(out, runs[0])


def test_layer_bias_matches_the_reference_through_a_cache(rng):
    # The layer passes the bias to the kernel (the bug: a keyword taken and dropped); with
    # a cache, contiguous or paged, positions are those of the cached sequence, so decoding
    # token by token equals the full causal call, which equals the reference on the
    # layer's own projections.
    mha = cattn.MultiHeadAttention(32, 4, num_kv_heads=2, rng=0)
    x = rng.standard_normal((2, 7, 32)).astype(np.float32)
    bias = cattn.RelativePositionBias(rng.standard_normal((8, 4)), num_buckets=8,
                                      max_distance=6, bidirectional=False)
    full, _ = mha(x, is_causal=True, position_bias=bias)
    projections = x @ mha.in_proj_weight.T + mha.in_proj_bias
    q, k, v = (projections[..., a:b].reshape(2, 7, heads, 8).transpose(0, 2, 1, 3)
               for a, b, heads in ((0, 32, 4), (32, 48, 2), (48, 64, 2)))
    heads = reference64(q, k, v, is_causal=True, enable_gqa=True, position_bias=bias)
    want = heads.transpose(0, 2, 1, 3).reshape(2, 7, 32) @ mha.out_proj_weight.T.astype(
        np.float64) + mha.out_proj_bias
    np.testing.assert_allclose(full, want, rtol=1e-4, atol=1e-4)
    for cache in (cattn.KVCache.for_layer(mha, batch_size=2, max_len=8),
                  cattn.PagedKVCache.for_layer(mha, batch_size=2, max_len=8, block_size=2)):
        first, _ = mha(x[:, :4], is_causal=True, cache=cache, position_bias=bias)
        steps = [mha(x[:, t:t + 1], cache=cache, position_bias=bias)[0] for t in range(4, 7)]
        np.testing.assert_allclose(np.concatenate([first] + steps, axis=1), full,
                                   rtol=1e-5, atol=1e-5)
    three_heads = cattn.RelativePositionBias(np.zeros((8, 3)), num_buckets=8,
                                             max_distance=6, bidirectional=True)
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=8)
    with pytest.raises(ValueError, match="3 heads"):
        mha(x, cache=cache, position_bias=three_heads)
    assert cache.layer(0).lengths.tolist() == [0, 0]  # refused before the cache grew

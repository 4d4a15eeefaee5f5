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
CONFIGS = [(32, 128, True), (32, 128, False), (16, 20, True), (8, 64, False)]


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
    with pytest.raises(TypeError, match="bidirectional"):
        cattn.RelativePositionBias(np.zeros((32, 2)), num_buckets=32, max_distance=128,
                                   bidirectional="yes")

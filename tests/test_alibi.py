"""ALiBi slopes (`alibi_slopes=`): the bias -slope·|i + diag - j| computed inside the kernel.

cattn with alibi_slopes is compared with the float64 reference given the same bias as an
explicit additive mask (`cattn.reference.alibi_bias`), on every instruction-set path this
CPU runs, in every dtype, with causal masks, windows, grouped-query heads, offsets and
several blocks of keys; and bitwise across thread counts. The reference's own definition is
checked against loops in test_oracles.py.
"""
import numpy as np
import pytest

import cattn
from cattn import _kernel, reference
from conftest import reference64, tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)
from test_dtypes import p_rounding
from test_isa_paths import ALL_PATHS

pytestmark = pytest.mark.filterwarnings("error")

bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
sdpa = cattn.scaled_dot_product_attention
# The 16-bit dtypes compute in float32 on rounded inputs: their float32 result is compared
# with the reference on the same rounded values, at float32's tolerance.
ACCURACY = {np.float32: tolerance(np.float32), np.float64: tolerance(np.float64),
            np.float16: tolerance(np.float32), bfloat16: tolerance(np.float32)}


def slopes_for(H, B=None):
    """ALiBi's geometric slopes 2**(-8h/H) (one row per sequence, shifted, with B)."""
    slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
    if B is not None:
        slopes = slopes * (1 + np.arange(B))[:, None]
    return slopes.astype(np.float32)


def explicit_bias(slopes, L, S, batch_shape, **options):
    """The same bias as a dense additive mask (..., L, S), float64."""
    keep = ("alignment", "key_lengths", "q_offset", "k_offset")
    return reference.alibi_bias(slopes, L, S, batch_shape=batch_shape,
                                **{k: v for k, v in options.items() if k in keep})


def operands(rng, dtype, B, Hq, Hkv, L, S, E=16, Ev=8):
    q = rng.standard_normal((B, Hq, L, E))
    k = rng.standard_normal((B, Hkv, S, E))
    v = rng.standard_normal((B, Hkv, S, Ev))
    return tuple(x.astype(dtype) for x in (q, k, v))


def check_against_explicit_bias(q, k, v, slopes, dtype, **options):
    """cattn with alibi_slopes equals the reference with the bias as an attn_mask (and the
    reference with alibi_slopes: the two definitions agree)."""
    B, Hq, L = q.shape[0], q.shape[1], q.shape[2]
    S = k.shape[2]
    ref_options = {k_: v_ for k_, v_ in options.items()
                   if k_ not in ("num_threads", "_isa", "_block_sizes")}
    if np.dtype(dtype).itemsize == 2:  # (the float32 result, before rounding to 16 bits)
        options = dict(options, out_dtype=np.float32)
    got = sdpa(q, k, v, alibi_slopes=slopes, return_lse=True, **options)
    bias = explicit_bias(slopes, L, S, (B, Hq), **ref_options)
    mask = ref_options.get("attn_mask")
    if mask is not None:  # (a boolean mask: -inf where it hides a key)
        bias = np.where(mask, bias, -np.inf)
    p_atol = p_rounding(options.get("_isa"), v)
    q, k, v = (x.astype(np.float64) for x in (q, k, v))  # (bfloat16 included)
    want = reference64(q, k, v, return_lse=True, **dict(ref_options, attn_mask=bias))
    also = reference64(q, k, v, alibi_slopes=slopes, return_lse=True, **ref_options)
    for i, (g, w, a) in enumerate(zip(got, want, also)):
        np.testing.assert_allclose(a, w, rtol=1e-12, atol=1e-12)
        tol = dict(ACCURACY[np.dtype(dtype).type])
        if i == 0:  # the output: P rounded to bfloat16 on the native bfloat16 paths
            tol["atol"] += p_atol
        np.testing.assert_allclose(g.astype(np.float64), w, **tol)
    return got


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bottom_right causal": dict(is_causal=True, alignment="bottom_right",
                                key_lengths=np.array([70, 41])),
    "window": dict(window=(17, 5)),
    "offsets": dict(is_causal=True, q_offset=np.array([40, 3]), k_offset=9),
    "gqa": dict(enable_gqa=True, window=(30, None)),
    "softcap and mask": dict(softcap=3.0, attn_mask="bool"),
    "keep_first": dict(window=(8, 0), keep_first=3),
}


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_alibi_matches_an_explicit_bias_on_every_path(case, dtype, path, rng):
    # Several key blocks (block_k 16 over 70 keys, query blocks of 8): the bug this
    # catches is a distance measured from the block's first key instead of the sequence's
    # (or the diagonal forgotten), and per-head slopes read at the key/value head.
    options = dict(CASES[case])
    Hkv = 2 if options.get("enable_gqa") else 4
    q, k, v = operands(rng, dtype, 2, 4, Hkv, 23, 70)
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = rng.random((2, 4, 23, 70)) < 0.7
    check_against_explicit_bias(q, k, v, slopes_for(4, B=2), dtype, _isa=path,
                                _block_sizes=(8, 16), **options)
    assert _kernel.last_call_stats()["isa"] == path


@pytest.mark.parametrize("path", ALL_PATHS)
def test_alibi_with_keys_split_into_chunks(path, rng):
    # A decode against 5000 keys runs as chunks of keys merged by lse: each chunk must
    # measure distances from the sequence's positions.
    q, k, v = operands(rng, np.float32, 1, 2, 2, 1, 5000)
    check_against_explicit_bias(q, k, v, slopes_for(2) / 64, np.float32, _isa=path,
                                alignment="bottom_right")
    assert _kernel.last_call_stats()["n_splits"] > 1


@pytest.mark.parametrize("options", [dict(is_causal=True), dict(window=(40, 7)),
                                     dict(enable_gqa=True, is_causal=True)], ids=str)
def test_alibi_is_bitwise_independent_of_the_thread_count(options, rng):
    q, k, v = operands(rng, np.float32, 2, 4, 2 if options.get("enable_gqa") else 4, 150, 300)
    runs = [sdpa(q, k, v, alibi_slopes=slopes_for(4), num_threads=n, return_lse=True,
                 **options) for n in (1, 2, 3)]
    for out, lse in runs[1:]:
        np.testing.assert_array_equal(out, runs[0][0])
        np.testing.assert_array_equal(lse, runs[0][1])


def test_alibi_matches_cattn_with_the_same_values_as_a_float32_mask(rng):
    # The kernel adds slope·|d| rounded once to float32, as a float32 mask holding the same
    # values: the two calls agree to a few roundings of the sum.
    q, k, v = operands(rng, np.float32, 1, 4, 4, 64, 96)
    slopes = slopes_for(4)
    mask = (-slopes[:, None, None] * np.abs(np.arange(64)[:, None] - np.arange(96))
            ).astype(np.float32)
    np.testing.assert_allclose(sdpa(q, k, v, alibi_slopes=slopes, is_causal=True),
                               sdpa(q, k, v, attn_mask=mask, is_causal=True),
                               rtol=1e-6, atol=1e-6)


def test_far_offsets_keep_float32_precision(rng):
    # Global positions near 2**40: FlashAttention's causal form (slope·j) would add ~1e11
    # to float32 scores and lose them; the distance stays small.
    q, k, v = operands(rng, np.float32, 1, 2, 2, 5, 9)
    offset = 2**40
    check_against_explicit_bias(q, k, v, slopes_for(2), np.float32, is_causal=True,
                                q_offset=offset + 4, k_offset=offset)


def test_causal_lse_is_of_the_distance_bias(rng):
    # lse is the log-sum-exp of the scores with -slope·|i - j| (FlashAttention's causal
    # kernel adds slope·j: its lse is higher by slope·i; the outputs agree).
    q, k, v = operands(rng, np.float64, 1, 1, 1, 4, 4)
    slope = np.array([0.75])
    out, lse = sdpa(q, k, v, alibi_slopes=slope, is_causal=True, return_lse=True)
    flash_bias = np.where(np.tril(np.ones((4, 4), bool)), slope[0] * np.arange(4), -np.inf)
    flash_out, flash_lse = reference.scaled_dot_product_attention(
        q, k, v, attn_mask=flash_bias, return_lse=True)
    np.testing.assert_allclose(out, flash_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse + slope[0] * np.arange(4), flash_lse, rtol=1e-12)


def test_zero_slopes_change_nothing(rng):
    q, k, v = operands(rng, np.float32, 2, 3, 3, 9, 12)
    np.testing.assert_array_equal(sdpa(q, k, v, alibi_slopes=np.zeros(3, np.float32)),
                                  sdpa(q, k, v))


def test_alibi_with_weights(rng):
    q, k, v = operands(rng, np.float64, 2, 2, 2, 6, 10)
    slopes = slopes_for(2, B=2)
    out, weights = sdpa(q, k, v, alibi_slopes=slopes, window=(3, 2), return_weights=True)
    want_out, want_weights = reference.scaled_dot_product_attention(
        q, k, v, alibi_slopes=slopes, window=(3, 2), return_weights=True)
    np.testing.assert_allclose(out, want_out, **tolerance(np.float64))
    np.testing.assert_allclose(weights, want_weights, **tolerance(np.float64))


@pytest.mark.parametrize("slopes, error", [
    (np.ones(3), ValueError),                      # 3 slopes for 4 heads
    (np.ones((3, 4)), ValueError),                 # 3 sequences for 2
    (np.array([1, 2, 3, 4]), TypeError),           # integers
    (np.array([0.5, np.nan, 1, 1]), ValueError),
    (np.array([0.5, np.inf, 1, 1]), ValueError),
    ("slopes", TypeError),
])
def test_bad_slopes_are_refused(slopes, error, rng):
    q, k, v = operands(rng, np.float32, 2, 4, 4, 3, 5)
    with pytest.raises(error, match="alibi_slopes"):
        sdpa(q, k, v, alibi_slopes=slopes)


def test_slopes_are_not_modified(rng):
    q, k, v = operands(rng, np.float64, 2, 4, 4, 3, 5)
    slopes = slopes_for(4)
    before = slopes.copy()
    sdpa(q, k, v, alibi_slopes=slopes)
    np.testing.assert_array_equal(slopes, before)


def test_layer_alibi_matches_the_reference_through_a_cache(rng):
    # The layer passes the slopes to the kernel; with a cache, positions are those of the
    # cached sequence (bottom-right), so decoding token by token equals the full causal call.
    mha = cattn.MultiHeadAttention(32, 4, rng=0)
    x = rng.standard_normal((2, 7, 32)).astype(np.float32)
    slopes = slopes_for(4)
    full, _ = mha(x, is_causal=True, alibi_slopes=slopes)
    cache = cattn.KVCache.for_layer(mha, batch_size=2, max_len=8)
    first, _ = mha(x[:, :4], is_causal=True, cache=cache, alibi_slopes=slopes)
    steps = [mha(x[:, t:t + 1], cache=cache, alibi_slopes=slopes)[0] for t in range(4, 7)]
    np.testing.assert_allclose(np.concatenate([first] + steps, axis=1), full, rtol=1e-5,
                               atol=1e-5)
    plain, _ = mha(x, is_causal=True)
    assert not np.allclose(full, plain, atol=1e-3)
    with pytest.raises(ValueError, match="alibi_slopes"):
        mha(x, alibi_slopes=np.ones(3, np.float32))

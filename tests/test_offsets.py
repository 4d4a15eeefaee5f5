"""Position offsets: q_offset / k_offset place a block of queries and a block of keys in a
longer sequence, so that causal masks and windows compare global positions.

Checked three ways: the reference against explicit Python loops, cattn against the float64
reference, and the property sharding relies on: cutting a causal or windowed sequence into
(query chunk, key chunk) pieces, each called with its offsets, and merging each query
chunk's pieces with merge_attention reproduces the call over the whole sequence.
"""
import math

import numpy as np
import pytest

from cattn import merge_attention, reference
from conftest import assert_matches_reference, tolerance
from test_core import DTYPES, loop_attention, qkv, sdpa
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")


def visible_by_position(q_offset, k_offset, is_causal, window):
    left, right = window if window is not None else (None, None)
    if is_causal:
        right = 0 if right is None else min(right, 0)

    def visible(i, j):
        delta = (k_offset + j) - (q_offset + i)
        return ((left is None or delta >= -left) and (right is None or delta <= right))
    return visible


@pytest.mark.parametrize("is_causal, window", [(True, None), (False, (2, 1)),
                                               (True, (1, None)), (False, (None, 0))])
def test_reference_matches_python_loops_with_offsets(rng, is_causal, window):
    # Two sequences, each with its own offsets: 4 queries at 10.. / 3.., 6 keys at 7.. / 0..
    q, k, v = qkv(rng, [(2, 4, 3), (2, 6, 3), (2, 6, 2)], np.float64)
    q_offsets, k_offsets = np.array([10, 3]), np.array([7, 0])
    got_out, got_lse = reference.scaled_dot_product_attention(
        q, k, v, is_causal=is_causal, window=window, q_offset=q_offsets,
        k_offset=k_offsets, return_lse=True)
    for b in range(2):
        visible = visible_by_position(q_offsets[b], k_offsets[b], is_causal, window)
        want_out, want_lse = loop_attention(q[b].tolist(), k[b].tolist(), v[b].tolist(),
                                            1 / math.sqrt(3), visible)
        np.testing.assert_allclose(got_out[b], want_out, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(got_lse[b], want_lse, rtol=1e-13, atol=1e-14)
        # ... and cattn agrees with both.
        out, lse = sdpa(q[b], k[b], v[b], is_causal=is_causal, window=window,
                        q_offset=int(q_offsets[b]), k_offset=int(k_offsets[b]),
                        return_lse=True)
        np.testing.assert_allclose(out, want_out, **tolerance(np.float64))
        np.testing.assert_allclose(lse, want_lse, **tolerance(np.float64))


OFFSET_CASES = {
    "scalar-causal": dict(q_offset=300, k_offset=100, is_causal=True),
    "negative-window": dict(q_offset=-40, k_offset=-90, window=(64, 16)),
    "per-batch-causal-lengths": dict(q_offset=np.array([0, 500, 1000]), k_offset=200,
                                     is_causal=True, key_lengths=np.array([700, 300, 0])),
    "per-head-window": dict(q_offset=np.arange(12).reshape(3, 4) * 97,
                            k_offset=np.array([[5], [0], [300]]).repeat(4, 1),
                            window=(150, 0)),
    "gqa-mask-softcap": dict(q_offset=np.array([900, 0, 450]), k_offset=np.array([0, 30, 0]),
                             is_causal=True, enable_gqa=True, softcap=4.0, mask=True),
    "only-k-offset": dict(k_offset=np.array([-200, 0, 200]), is_causal=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 150])
@pytest.mark.parametrize("case", OFFSET_CASES.values(), ids=OFFSET_CASES.keys())
def test_kernel_matches_reference_with_offsets(rng, case, L, dtype):
    options = dict(case)
    Hkv = 1 if options.get("enable_gqa") else 4
    S = 700
    query, key, value = qkv(rng, [(3, 4, L, 32), (3, Hkv, S, 32), (3, Hkv, S, 16)], dtype)
    if options.pop("mask", False):
        options["attn_mask"] = rng.random((3, 1, L, S)) < 0.7
    assert_matches_reference(query, key, value, return_lse=True, **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_offsets_without_causal_or_window_change_nothing(rng, dtype):
    query, key, value = qkv(rng, [(2, 3, 40, 16), (2, 3, 90, 16), (2, 3, 90, 8)], dtype)
    plain = sdpa(query, key, value, key_lengths=[90, 33])
    shifted = sdpa(query, key, value, key_lengths=[90, 33], q_offset=[7, -3], k_offset=1000)
    np.testing.assert_array_equal(shifted, plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_offsets_equal_to_a_bottom_right_diagonal(rng, dtype):
    # Bottom-right alignment is top-left with q_offset = key length - L.
    lengths = np.array([50, 128, 7])
    query, key, value = qkv(rng, [(3, 2, 9, 16), (3, 2, 128, 16), (3, 2, 128, 8)], dtype)
    want = sdpa(query, key, value, is_causal=True, window=(20, 0), key_lengths=lengths,
                alignment="bottom_right")
    got = sdpa(query, key, value, is_causal=True, window=(20, 0), key_lengths=lengths,
               q_offset=lengths - 9)
    np.testing.assert_array_equal(got, want)


CHUNKED = {
    "causal": dict(is_causal=True),
    "window": dict(window=(100, 30)),
    "causal-window": dict(is_causal=True, window=(77, None)),
}


def chunks(n, size):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_chunk, k_chunk", [(96, 160), (1, 640)])
@pytest.mark.parametrize("options", CHUNKED.values(), ids=CHUNKED.keys())
def test_chunks_with_offsets_merge_into_the_full_call(rng, options, q_chunk, k_chunk, dtype):
    N = 517
    query, key, value = qkv(rng, [(2, 2, N, 16), (2, 2, N, 16), (2, 2, N, 8)], dtype)
    full_out, full_lse = sdpa(query, key, value, return_lse=True, **options)
    for q0, q1 in chunks(N, q_chunk):
        pieces = [sdpa(query[..., q0:q1, :], key[..., k0:k1, :], value[..., k0:k1, :],
                       q_offset=q0, k_offset=k0, return_lse=True, **options)
                  for k0, k1 in chunks(N, k_chunk)]
        # (chunks with no visible key at all weigh nothing: output 0, lse -inf)
        out, lse = merge_attention([p[0] for p in pieces], [p[1] for p in pieces])
        np.testing.assert_allclose(out, full_out[..., q0:q1, :], **tolerance(dtype))
        np.testing.assert_allclose(lse, full_lse[..., q0:q1], **tolerance(dtype))


BAD_OFFSETS = [
    (dict(q_offset=1.5), TypeError, "q_offset must be integers"),
    (dict(k_offset=np.array([1.0, 2.0])), TypeError, "k_offset must be integers"),
    (dict(q_offset=True), TypeError, "q_offset must be integers"),
    (dict(q_offset=np.zeros(3, dtype=int)), ValueError, "must match the leading batch"),
    (dict(k_offset=np.zeros((2, 5), dtype=int)), ValueError, "must match the leading batch"),
    (dict(q_offset=2**50), ValueError, "q_offset must lie in"),
    (dict(k_offset=-2**49), ValueError, "k_offset must lie in"),
    (dict(q_offset=3, alignment="bottom_right", is_causal=True), ValueError,
     "alignment='top_left'"),
]


@pytest.mark.parametrize("options, error, message", BAD_OFFSETS)
def test_bad_offsets_are_refused(rng, options, error, message):
    query, key, value = qkv(rng, [(2, 3, 4, 8), (2, 3, 6, 8), (2, 3, 6, 8)], np.float32)
    with pytest.raises(error, match=message):
        sdpa(query, key, value, **options)

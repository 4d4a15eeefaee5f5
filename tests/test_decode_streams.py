"""The decoding streams (1-4 query rows read K and V in place, converting float16, bfloat16
and int8 as they load) against the float64 reference, on every path this CPU has, and
bitwise the same on 1, 2 and 3 threads.

The streams group their work by the vector width W and read the keys as several stretches
at once: 1-4 query rows score W keys at a time, W/4 from each of four stretches (each
row's W sums merged across lanes into one vector of W scores, then the keys past the last
multiple of W one by one); P·V keeps its accumulators in registers for a whole block of
keys, one set per stretch (one row on AVX-512: two stretches of 8 vectors; 2-4 rows, and
AVX2: one stretch, 16 or 8 vectors shared by the rows), the last stretch taking the keys
past 2 · (n // 2); then single vectors, then a partial one. So the shapes here put key
counts on both sides of W's and 4's multiples (W = 4, 8, 16 across the paths and
precisions), odd and even, and feature sizes on both sides of the chunks, where a key's score landing in another key's place, a key skipped
between the stretches, or a column skipped or counted twice between the chunk sizes,
shows.

Tolerances as in test_dtypes.py: the conversions are exact, so the float32 tolerance holds
on the rounded (int8: dequantized) inputs.
"""
import numpy as np
import pytest

import cattn
from cattn import _kernel
from conftest import TOLERANCE
from test_dtypes import bfloat16, p_rounding, reference_of

sdpa = cattn.scaled_dot_product_attention
PATHS = _kernel.testable_isa_paths()
# the numerical paths (the native bfloat16 ones run these streams as avx512 does)
STREAM_PATHS = [p for p in PATHS if p not in ("amx", "avx512_bf16")]

# key counts around W = 4, 8, 16 and their multiples (and the 256-key block)
KEY_COUNTS = [1, 3, 15, 16, 17, 33, 47, 64, 257]
# feature sizes around the vector widths and the 1/2/4/8-vector chunks of the P·V stream
FEATURES = [1, 7, 16, 24, 100, 128, 136, 200]


def stored(kind, k, v):
    """(k, v, scales) as a cache of this kind stores them."""
    if kind == "int8":
        (kq, k_scale), (vq, v_scale) = cattn.quantize_kv(k), cattn.quantize_kv(v)
        return kq, vq, {"k_scale": k_scale, "v_scale": v_scale}
    if kind == "float32":
        return k, v, {}
    dtype = np.dtype(np.float16) if kind == "float16" else bfloat16()
    return k.astype(dtype), v.astype(dtype), {}


@pytest.mark.parametrize("path", STREAM_PATHS)
@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_streams_match_reference(path, kind, rows, rng):
    for S in KEY_COUNTS:
        E = FEATURES[S % len(FEATURES)]
        Ev = FEATURES[(S + rows) % len(FEATURES)]
        q = rng.standard_normal((2, rows, E)).astype(np.float32)
        k = rng.standard_normal((2, S, E)).astype(np.float32)
        v = rng.standard_normal((2, S, Ev)).astype(np.float32)
        k, v, scales = stored(kind, k, v)
        got = sdpa(q, k, v, _isa=path, **scales)
        want = reference_of(q, k, v, **scales)
        tol = dict(TOLERANCE[np.float32])
        tol["atol"] += p_rounding(path, v)
        np.testing.assert_allclose(got, want, **tol, err_msg=f"S={S} E={E} Ev={Ev}")


@pytest.mark.parametrize("path", STREAM_PATHS)
@pytest.mark.parametrize("E, Ev", [(128, 128), (100, 136), (7, 9)])
def test_float64_streams_match_reference(path, E, Ev, rng):
    for rows in (1, 2, 3):
        for S in (7, 8, 9, 33):
            q = rng.standard_normal((1, 2, rows, E))
            k, v = rng.standard_normal((1, 2, S, E)), rng.standard_normal((1, 2, S, Ev))
            np.testing.assert_allclose(sdpa(q, k, v, _isa=path), reference_of(q, k, v),
                                       **TOLERANCE[np.float64])


@pytest.mark.parametrize("path", STREAM_PATHS)
@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16", "int8"])
def test_streams_bitwise_across_threads(path, kind, rng):
    # (a long cache is cut into chunks of keys by its shape, never by the thread count)
    q = rng.standard_normal((1, 3, 1, 128)).astype(np.float32)
    k = rng.standard_normal((1, 3, 3001, 128)).astype(np.float32)
    v = rng.standard_normal((1, 3, 3001, 72)).astype(np.float32)
    k, v, scales = stored(kind, k, v)
    runs = [sdpa(q, k, v, num_threads=t, _isa=path, **scales) for t in (1, 2, 3)]
    assert runs[0].tobytes() == runs[1].tobytes() == runs[2].tobytes()
    np.testing.assert_allclose(runs[0], reference_of(q, k, v, **scales),
                               **TOLERANCE[np.float32])

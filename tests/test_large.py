"""64-bit indexing: problems with more than 2^31 scores, mask elements or operand elements.

Slow (run with --runslow). The big arrays come from np.zeros, whose pages the kernel only
reads: Linux maps them all to the one zero page, so a 10 GB mask or an 8.6 GB query costs
little memory. Only the sampled rows hold data (they are written, so they are real pages),
among them the last rows, whose element offsets are beyond 2^31; every other row is zero,
which gives a result known in closed form, so the whole output is checked too.
"""
import time

import numpy as np
import pytest

import cattn
from conftest import reference64, tolerance

pytestmark = pytest.mark.slow

sdpa = cattn.scaled_dot_product_attention
INT32_LIMIT = 2**31


def sample_rows(rng, n, count=48):
    """count row indices spread over [0, n): the first, the last and random ones."""
    return np.unique(np.concatenate([[0, n - 1], rng.choice(n, count - 2, replace=False)]))


def report(what, start):
    print(f"\n{what}: {time.perf_counter() - start:.1f} s")


def test_more_than_2_31_scores_are_never_materialized():
    """L = S = 50,000 (2.5e9 scores, 10 GB if they existed in float32): sampled rows
    against the reference computed on those rows only."""
    rng = np.random.default_rng(1)
    L = S = 50_000
    assert L * S > INT32_LIMIT
    q = rng.standard_normal((1, L, 2)).astype(np.float32)
    k = rng.standard_normal((1, S, 2)).astype(np.float32)
    v = rng.standard_normal((1, S, 3)).astype(np.float32)
    start = time.perf_counter()
    out, lse = sdpa(q, k, v, return_lse=True, num_threads=2)
    report("L = S = 50,000, E = 2", start)
    rows = sample_rows(rng, L)
    want_out, want_lse = reference64(q[:, rows], k, v, return_lse=True)
    np.testing.assert_allclose(out[:, rows], want_out, **tolerance(np.float32))
    np.testing.assert_allclose(lse[:, rows], want_lse, **tolerance(np.float32))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_mask_with_more_than_2_31_elements(mask_kind):
    """An (L, S) mask of 2.5e9 elements: rows past 2^31 / S = 42,949 are read at element
    offsets beyond 2^31. The float mask is zero except on the sampled rows; the boolean
    mask is False (fully masked: output 0, lse -inf) except on the sampled rows."""
    rng = np.random.default_rng(2)
    L = S = 50_000
    q = rng.standard_normal((L, 2)).astype(np.float32)
    k = rng.standard_normal((S, 2)).astype(np.float32)
    v = rng.standard_normal((S, 3)).astype(np.float32)
    rows = sample_rows(rng, L)
    assert rows.max() * S > INT32_LIMIT
    if mask_kind == "bool":
        mask = np.zeros((L, S), bool)
        mask[rows] = rng.random((len(rows), S)) < 0.5
    else:
        mask = np.zeros((L, S), np.float32)
        mask[rows] = rng.standard_normal((len(rows), S)) * 3
        mask[rows, ::7] = -np.inf
    start = time.perf_counter()
    out, lse = sdpa(q, k, v, mask, return_lse=True, num_threads=2)
    report(f"L = S = 50,000 with a {mask_kind} (L, S) mask", start)
    want_out, want_lse = reference64(q[rows], k, v, mask[rows], return_lse=True)
    np.testing.assert_allclose(out[rows], want_out, **tolerance(np.float32))
    np.testing.assert_allclose(lse[rows], want_lse, **tolerance(np.float32))
    others = np.setdiff1d(np.arange(L), rows)
    if mask_kind == "bool":
        assert np.all(out[others] == 0) and np.all(lse[others] == -np.inf)
    else:  # unmasked rows: compare a sample of them too
        some = rng.choice(others, 32, replace=False)
        np.testing.assert_allclose(out[some], reference64(q[some], k, v),
                                   **tolerance(np.float32))


def test_query_with_more_than_2_31_elements():
    """query (2, 2, 2^24 + 1000, 32): 2.15e9 elements (8.6 GB virtual). Zero rows give
    scores 0, so their output is the mean of their item's values; the sampled rows,
    the last of which lies past element 2^31, are checked against the reference."""
    rng = np.random.default_rng(3)
    B, H, L, E, S, Ev = 2, 2, 2**24 + 1000, 32, 8, 2
    assert B * H * L * E > INT32_LIMIT
    q = np.zeros((B, H, L, E), np.float32)
    rows = sample_rows(rng, L, count=16)
    q[:, :, rows] = rng.standard_normal((B, H, len(rows), E))
    k = rng.standard_normal((B, H, S, E)).astype(np.float32)
    v = rng.standard_normal((B, H, S, Ev)).astype(np.float32)
    start = time.perf_counter()
    out = sdpa(q, k, v, num_threads=2)
    report("query of 2.15e9 elements", start)
    assert np.ravel_multi_index((B - 1, H - 1, rows[-1], E - 1), q.shape) >= INT32_LIMIT
    np.testing.assert_allclose(out[:, :, rows], reference64(q[:, :, rows], k, v),
                               **tolerance(np.float32))
    mean_v = v.astype(np.float64).mean(axis=-2)
    zero_rows = np.setdiff1d(rng.choice(L, 200_000, replace=False), rows)
    for b in range(B):
        for h in range(H):
            np.testing.assert_allclose(out[b, h, zero_rows], np.broadcast_to(
                mean_v[b, h], (len(zero_rows), Ev)), **tolerance(np.float32))

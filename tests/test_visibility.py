"""The one visibility rule (cattn._visibility) and everything that plans with it: the
kernel (which keeps its own C version) must hide exactly the pairs the rule hides, the
key spans of the varlen task list and the Dask pair planner must cover exactly the
visible pairs of their blocks.
"""
import itertools

import numpy as np
import pytest

import cattn
from cattn import _visibility, dask as cattn_dask  # noqa: F401 (the planner's module)
from conftest import tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")

WINDOWS = [None, (0, 0), (2, 1), (None, 3), (4, None), (1, 0)]


def rule_mask(L, S, diag, kv_len, left, right, kept):
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    return _visibility.visible(i, j, diag, kv_len, left, right, kept)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("keep_first", [None, 0, 3])
def test_the_kernel_hides_exactly_what_the_rule_hides(window, is_causal, alignment,
                                                      keep_first):
    """The kernel's structural options against the same call with the rule's mask as a
    boolean attn_mask (the bug: the kernel's own visibility drifting from the rule, a
    block skipped that holds a visible key, a kept key lost)."""
    rng = np.random.default_rng(0)
    B, H, L, S, E = 3, 2, 37, 300, 8
    q, k, v = (rng.standard_normal(shape, dtype=np.float32)
               for shape in ((B, H, L, E), (B, H, S, E), (B, H, S, E)))
    key_lengths = np.array([300, 41, 0])
    if keep_first is not None and window is None:
        window = (2, None)
    options = dict(is_causal=is_causal, window=window, alignment=alignment,
                   key_lengths=key_lengths, keep_first=keep_first)
    got = cattn.scaled_dot_product_attention(q, k, v, _block_sizes=(8, 16), **options)
    left, right = (None, None) if window is None else window
    if is_causal:
        right = 0
    diag = (key_lengths - L if alignment == "bottom_right" else np.zeros(B, int))
    mask = np.stack([rule_mask(L, S, diag[b], key_lengths[b], left, right,
                               keep_first or 0) for b in range(B)])[:, None]
    want = cattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    np.testing.assert_allclose(got, want, **tolerance(np.float32))


def test_key_span_covers_the_visible_keys_of_a_block_and_no_more():
    """Every visible key outside the kept ones lies in the span, and both ends of a
    non-empty span are seen by some row of the block (the bug: an off-by-one at an end
    skips a visible key block, or plans an empty one)."""
    for L, S in ((9, 13), (5, 5)):
        for diag, kv_len, window, (i0, i1) in itertools.product(
                (-6, 0, 3, 8), (0, 4, S), WINDOWS, ((0, 1), (0, L), (2, 7), (4, 5))):
            if i1 > L:
                continue
            left, right = (None, None) if window is None else window
            mask = rule_mask(L, S, diag, kv_len, left, right, 0)[i0:i1]
            begin, end = _visibility.key_span(i0, i1, diag, kv_len, left, right)
            seen = np.flatnonzero(mask.any(axis=0))
            if seen.size == 0:
                assert begin >= end
            else:
                assert (begin, end) == (seen[0], seen[-1] + 1)


def test_rows_see_keys_is_any_visible_pair():
    """The Dask planner's question, against the brute-force mask, over every block pair
    and with per-item arrays (the bug: a pair with visible keys planned away)."""
    L, S = 11, 14
    kv_len = np.array([14, 3, 0, 9])
    diag = np.array([0, -4, 2, 5])
    for window, kept in itertools.product(WINDOWS, (0, 2)):
        left, right = (None, None) if window is None else window
        masks = [rule_mask(L, S, d, n, left, right, kept) for d, n in zip(diag, kv_len)]
        for (i0, i1), (k0, k1) in itertools.product(((0, 4), (4, 11), (3, 3)),
                                                    ((0, 5), (5, 14), (2, 2))):
            want = any(m[i0:i1, k0:k1].any() for m in masks)
            got = _visibility.rows_see_keys(i0, i1, k0, k1, diag, kv_len, left, right,
                                            kept)
            assert got == want, (window, kept, i0, i1, k0, k1)

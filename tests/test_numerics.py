"""Numerical behaviour at the edges: huge scores, NaN and inf inputs, rows that see no key,
-inf and huge negative additive masks, and float64 accuracy.

The rule for non-finite inputs (what these tests establish, see also the README): results
follow IEEE arithmetic on the scores, row by row, as in the float64 reference:
  * a NaN or inf in query row i changes row i only: it is NaN (output and lse) when one of
    its visible scores is NaN or +inf, and it sees no key (output 0, lse -inf) when all of
    its visible scores are -inf;
  * a NaN or +inf in key row j makes NaN every row that can see key j; rows that cannot see
    it (causal, window, boolean mask, key_lengths) are exact;
  * a NaN or inf in column c of value row j makes column c of every row that sees key j
    NaN or inf; the other columns are exact; keys at or past an item's key length are never
    read, so whatever they hold changes nothing.
A row that sees no key at all gives output 0, lse -inf and weights 0, never NaN.
"""
import numpy as np
import pytest

import cattn
from cattn import reference
from conftest import assert_matches_reference, reference64, tolerance

sdpa = cattn.scaled_dot_product_attention
DTYPES = [np.float32, np.float64]


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------ huge scores

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [1, 37, 700])
@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"return_lse": True},
                                     {"return_weights": True, "return_lse": True}],
                         ids=["plain", "causal", "lse", "weights"])
def test_scores_of_1e4_are_exact(rng, dtype, S, options):
    """Scores up to ±1e4 that are exact in float32 (integer Q and K, scale 1), so any
    difference from the float64 reference comes from the softmax: with the maximum
    subtracted, nothing overflows and the usual dtype tolerance holds."""
    L, E = 50, 4
    q = rng.integers(-50, 51, (2, L, E)).astype(dtype)
    k = rng.integers(-50, 51, (2, S, E)).astype(dtype)
    q[:, 0] = k[:, S // 2] = [50, -50, 50, -50]  # a score of exactly +1e4 in each item
    v = normal(rng, (2, S, 3), dtype)
    scores = q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)
    assert np.abs(scores).max() == 1e4
    got = assert_matches_reference(q, k, v, scale=1.0, num_threads=2, **options)
    for x in got if isinstance(got, tuple) else (got,):
        assert np.isfinite(x).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_scores_of_1e4_stay_finite_and_normalized(rng, dtype):
    """Arbitrary (inexact) scores of ±1e4: the weights are a probability distribution and
    each output lies in the range spanned by the values."""
    L, S, E = 64, 600, 16
    q = normal(rng, (L, E), dtype)
    k = normal(rng, (S, E), dtype)
    scale = 1e4 / np.abs(q.astype(np.float64) @ k.T.astype(np.float64)).max()
    v = normal(rng, (S, 5), dtype)
    out, weights, lse = sdpa(q, k, v, scale=scale, return_weights=True, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(weights).all() and np.isfinite(lse).all()
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(weights.sum(axis=-1), 1, rtol=0, atol=S * eps)
    assert (weights >= 0).all()
    slack = 8 * eps * np.abs(v).max()
    assert (out >= v.min(axis=0) - slack).all() and (out <= v.max(axis=0) + slack).all()
    assert (np.abs(lse) <= 1e4 + np.log(S) + 1).all()


# -------------------------------------------------------------------- float64 accuracy

F64_CASES = {
    "plain": dict(),
    "causal_bottom_right": dict(is_causal=True, alignment="bottom_right"),
    "float_mask": dict(attn_mask="float"),
    "softcap": dict(softcap=5.0, return_lse=True),
    "window_lengths": dict(window=(100, 3), key_lengths=np.array([700, 333])),
    "gqa_weights": dict(enable_gqa=True, return_weights=True),
}


@pytest.mark.parametrize("name", F64_CASES)
def test_float64_agrees_to_1e12_relative(rng, name):
    """float64 against the float64 reference: every result's largest error is at most
    1e-12 of its largest magnitude (rounding of sums over ~10^3 terms is ~10^-13)."""
    options = dict(F64_CASES[name])
    Hq, Hk = (4, 2) if options.get("enable_gqa") else (2, 2)
    L, S, E = 150, 700, 64
    q = normal(rng, (2, Hq, L, E), np.float64)
    k = normal(rng, (2, Hk, S, E), np.float64)
    v = normal(rng, (2, Hk, S, 48), np.float64)
    if options.get("attn_mask") == "float":
        options["attn_mask"] = normal(rng, (Hq, L, S), np.float64)
    got = sdpa(q, k, v, num_threads=2, **options)
    want = reference64(q, k, v, **options)
    for g, w in zip(*((x,) if not isinstance(x, tuple) else x for x in (got, want))):
        finite = np.isfinite(w)
        np.testing.assert_array_equal(g[~finite], w[~finite])
        scale = np.abs(w[finite]).max()
        assert np.abs(g[finite] - w[finite]).max() <= 1e-12 * scale


# ---------------------------------------------------------------- rows that see no key

def _fully_masked_cases(rng, L, S):
    bool_mask = rng.random((L, S)) < 0.6
    bool_mask[[1, 4]] = False
    add_mask = normal(rng, (L, S), np.float64)
    add_mask[[0, 3]] = -np.inf
    return {
        # name: (options, rows that see no key)
        "bool_mask_rows": (dict(attn_mask=bool_mask), [1, 4]),
        "additive_-inf_rows": (dict(attn_mask=add_mask), [0, 3]),
        "key_lengths_zero": (dict(key_lengths=0), list(range(L))),
        "causal_bottom_right_L_gt_S": (dict(is_causal=True, alignment="bottom_right"),
                                       list(range(L - S))),
        "window_past_the_keys": (dict(window=(0, 0)), list(range(S, L))),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["bool_mask_rows", "additive_-inf_rows", "key_lengths_zero",
                                  "causal_bottom_right_L_gt_S", "window_past_the_keys"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fully_masked_rows_give_zero(rng, dtype, case, threads):
    L, S = 12, 7
    options, empty_rows = _fully_masked_cases(rng, L, S)[case]
    if "attn_mask" in options:
        options["attn_mask"] = options["attn_mask"].astype(
            bool if options["attn_mask"].dtype == bool else dtype)
    q, k, v = normal(rng, (L, 8), dtype), normal(rng, (S, 8), dtype), normal(rng, (S, 5), dtype)
    for weights_mode in (False, True):
        got = assert_matches_reference(q, k, v, return_lse=True, return_weights=weights_mode,
                                       num_threads=threads, **options)
        out, lse = got[0], got[-1]
        assert np.all(out[empty_rows] == 0) and np.all(lse[empty_rows] == -np.inf)
        if weights_mode:
            assert np.all(got[1][empty_rows] == 0)
        others = np.setdiff1d(np.arange(L), empty_rows)
        assert np.isfinite(out[others]).all() and np.isfinite(lse[others]).all()


# ------------------------------------------------------------- -inf and huge negatives

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_mode", [False, True])
def test_minus_inf_additive_mask_equals_boolean_mask(rng, dtype, weights_mode):
    L, S = 40, 600
    keep = rng.random((3, L, S)) < 0.5
    keep[0, 5] = False
    additive = np.where(keep, 0, -np.inf).astype(dtype)
    q, k, v = normal(rng, (3, L, 16), dtype), normal(rng, (3, S, 16), dtype), normal(
        rng, (3, S, 8), dtype)
    options = dict(return_lse=True, return_weights=weights_mode)
    with_add = assert_matches_reference(q, k, v, additive, **options)
    with_bool = sdpa(q, k, v, keep, **options)
    for a, b in zip(with_add, with_bool):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("huge", ["-1e30", "finfo.min"])
def test_huge_negative_additive_mask(rng, dtype, huge):
    """Keys with a huge negative mask get weight exactly 0 next to ordinary keys; a row in
    which every key has the same huge negative mask is an ordinary softmax again (the mask
    absorbs the scores: uniform weights), never NaN or 0."""
    big = -1e30 if huge == "-1e30" else np.finfo(dtype).min
    L, S = 20, 30
    q, k, v = normal(rng, (L, 8), dtype), normal(rng, (S, 8), dtype), normal(rng, (S, 4), dtype)
    mask = np.zeros((L, S), dtype)
    mask[:, ::3] = big
    mask[7] = big
    out, weights = assert_matches_reference(q, k, v, mask, return_weights=True)
    assert np.isfinite(out).all()
    ordinary = np.arange(L) != 7
    assert np.all(weights[ordinary][:, ::3] == 0)
    np.testing.assert_allclose(weights[7], 1 / S, **tolerance(dtype))
    np.testing.assert_allclose(out[7], v.astype(np.float64).mean(axis=0), **tolerance(dtype))


# ------------------------------------------------------------------ NaN and inf inputs

def _sees(L, S, options, mask=None):
    """(L, S) boolean: which key each query row can see with these options."""
    visible = reference.visible_keys(L, S, options.get("is_causal", False),
                                     options.get("window"), options.get("alignment",
                                                                        "top_left"),
                                     options.get("key_lengths"))
    return visible if mask is None else visible & mask


VISIBILITY = {
    "none": dict(),
    "causal": dict(is_causal=True),
    "window": dict(window=(3, 2)),
    "bool_mask": dict(attn_mask=True),
    "key_lengths": dict(key_lengths=15),
}


def _setup(rng, dtype, visibility, L=24, S=30):
    options = dict(VISIBILITY[visibility])
    mask = None
    if options.get("attn_mask") is True:
        mask = rng.random((L, S)) < 0.7
        mask[:, 0] = True  # every row sees at least one finite key
        options["attn_mask"] = mask
    q, k, v = normal(rng, (L, 8), dtype), normal(rng, (S, 8), dtype), normal(rng, (S, 5), dtype)
    return q, k, v, options, _sees(L, S, options, mask)


def _assert_rows_exact(got, want, rows, dtype):
    np.testing.assert_allclose(got[rows], want[rows], **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
@pytest.mark.parametrize("signs", ["mixed", "same"])
@pytest.mark.parametrize("visibility", ["none", "causal", "bool_mask"])
def test_inf_in_a_query_row_changes_that_row_only(rng, dtype, bad, signs, visibility):
    """Row i's scores become ±inf: with both signs among its visible keys (+inf - +inf in
    the softmax) it is NaN; with the same sign, +inf gives NaN and -inf means no key."""
    q, k, v, options, sees = _setup(rng, dtype, visibility)
    i = 9
    visible = np.flatnonzero(sees[i])
    k[:, 2] = np.abs(k[:, 2]) + 0.5
    if signs == "mixed":
        k[visible[1::2], 2] *= -1
    want, want_lse = reference64(q, k, v, return_lse=True, **options)
    q[i, 2] = bad
    out, lse = sdpa(q, k, v, return_lse=True, num_threads=2, **options)
    if signs == "same" and bad < 0:
        assert np.all(out[i] == 0) and lse[i] == -np.inf
    else:
        assert np.isnan(out[i]).all() and np.isnan(lse[i])
    others = np.arange(len(q)) != i
    _assert_rows_exact(out, want, others, dtype)
    _assert_rows_exact(lse, want_lse, others, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_mode", [False, True])
def test_nan_in_a_query_row_poisons_that_row(rng, dtype, weights_mode):
    q, k, v, options, _ = _setup(rng, dtype, "causal")
    want, want_lse = reference64(q, k, v, return_lse=True, **options)
    i = 9
    q[i, 3] = np.nan
    got = sdpa(q, k, v, return_lse=True, return_weights=weights_mode, **options)
    out, lse = got[0], got[-1]
    others = np.arange(len(q)) != i
    _assert_rows_exact(out, want, others, dtype)
    assert np.isnan(out[i]).all() and np.isnan(lse[i])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("visibility", ["none", "causal", "window", "bool_mask",
                                        "key_lengths"])
@pytest.mark.parametrize("threads", [1, 2])
def test_bad_key_row_poisons_the_rows_that_see_it(rng, dtype, bad, visibility, threads):
    q, k, v, options, sees = _setup(rng, dtype, visibility)
    for j in (0, 5, 20):  # (with causal, row 0 sees key 0 only)
        k_bad = k.copy()
        k_bad[j] = bad
        q_pos = np.abs(q)  # scores with a +inf key are +inf (NaN for NaN)
        want, want_lse = reference64(q_pos, k, v, return_lse=True, **options)
        out, lse = sdpa(q_pos, k_bad, v, return_lse=True, num_threads=threads, **options)
        poisoned = sees[:, j]
        assert np.isnan(out[poisoned]).all() and np.isnan(lse[poisoned]).all()
        _assert_rows_exact(out, want, ~poisoned, dtype)
        _assert_rows_exact(lse, want_lse, ~poisoned, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["causal_first_key_nan", "window_sees_only_the_nan_key",
                                  "first_block_all_nan_then_finite_keys"])
def test_nan_key_that_fills_a_rows_block_poisons_it(dtype, case):
    """Rows whose visible scores are all NaN, in one block or in whole blocks before
    finite ones (a fixed bug: the row max ignored NaN and the block was taken as empty)."""
    if case == "causal_first_key_nan":  # query 0 sees key 0 only
        q, k, v = (np.ones((3, 4), dtype) for _ in range(3))
        k[0, 0] = np.nan
        out, lse = sdpa(q, k, v, is_causal=True, return_lse=True)
        poisoned = [0, 1, 2]
    elif case == "window_sees_only_the_nan_key":
        q, k, v = (np.ones((3, 4), dtype) for _ in range(3))
        k[1, 0] = np.nan
        out, lse = sdpa(q, k, v, window=(0, 0), return_lse=True)
        poisoned = [1]
    else:  # keys 0..511 NaN (whole key blocks of 256 or 512), then 88 finite keys
        q, k, v = np.ones((1, 4), dtype), np.ones((600, 4), dtype), np.ones((600, 4), dtype)
        k[:512, 0] = np.nan
        out, lse = sdpa(q, k, v, return_lse=True)
        poisoned = [0]
    assert np.isnan(out[poisoned]).all() and np.isnan(lse[poisoned]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad_input", ["key", "query"])
@pytest.mark.parametrize("S", [600, 4096])
def test_bad_score_among_many_keys_poisons_the_row(dtype, bad_input, S):
    """One query row, one head, many keys (the kernel's decode paths). A NaN key row, or
    an inf query entry whose scores are +inf and -inf, makes the row NaN."""
    rng = np.random.default_rng(5)
    q = np.abs(rng.standard_normal((1, 1, 16))).astype(dtype)
    k = rng.standard_normal((1, S, 16)).astype(dtype)
    v = rng.standard_normal((1, S, 8)).astype(dtype)
    if bad_input == "key":
        k[0, S - 5] = np.nan
    else:
        q[0, 0, 3] = np.inf  # k[:, 3] has both signs: scores +inf and -inf
    out, lse = sdpa(q, k, v, return_lse=True)
    assert np.isnan(out).all() and np.isnan(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("visibility", ["none", "causal", "window", "bool_mask",
                                        "key_lengths"])
def test_bad_value_poisons_its_column_in_the_rows_that_see_it(rng, dtype, bad, visibility):
    q, k, v, options, sees = _setup(rng, dtype, visibility)
    want = reference64(q, k, v, **options)
    c = 2
    for j in (0, 5, 20):
        v_bad = v.copy()
        v_bad[j, c] = bad
        out = sdpa(q, k, v_bad, num_threads=2, **options)
        poisoned = sees[:, j]
        if np.isnan(bad):
            assert np.isnan(out[poisoned, c]).all()
        else:
            assert np.all(out[poisoned, c] == bad)
        others = np.arange(v.shape[1]) != c
        np.testing.assert_allclose(out[:, others], want[:, others], **tolerance(dtype))
        if visibility == "key_lengths" and j >= options["key_lengths"]:
            np.testing.assert_allclose(out, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_past_key_lengths_are_never_read(rng, dtype):
    """A KV cache allocated with np.empty and filled up to each item's length: whatever
    lies past the length (here NaN and inf) changes nothing, bitwise."""
    B, L, S = 3, 5, 300
    lengths = np.array([0, 17, 250])
    q = normal(rng, (B, L, 8), dtype)
    k, v = normal(rng, (B, S, 8), dtype), normal(rng, (B, S, 6), dtype)
    k_dirty, v_dirty = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        k_dirty[b, n:] = np.nan
        v_dirty[b, n:] = np.inf
    for options in (dict(), dict(is_causal=True, alignment="bottom_right"),
                    dict(return_weights=True, return_lse=True)):
        clean = sdpa(q, k, v, key_lengths=lengths, **options)
        dirty = sdpa(q, k_dirty, v_dirty, key_lengths=lengths, **options)
        for a, b in zip(*((x,) if not isinstance(x, tuple) else x for x in (clean, dirty))):
            np.testing.assert_array_equal(a, b)
        assert_matches_reference(q, k, v, key_lengths=lengths, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool", "additive_-inf"])
@pytest.mark.xfail(strict=True, reason="kernel limitation: P·V multiplies the probability "
                   "0 of a masked key by its value, and 0·NaN = NaN, so a non-finite value "
                   "of a masked key poisons every row whose key block contains it (only "
                   "key_lengths keeps such keys out)")
def test_nan_value_of_a_masked_key_does_not_poison(rng, dtype, mask_kind):
    """Key 5 is masked for every row (keys 4 and 6 are not), so no output depends on
    value row 5."""
    L = S = 8
    q, k, v = normal(rng, (L, 4), dtype), normal(rng, (S, 4), dtype), normal(rng, (S, 4), dtype)
    keep = np.ones((L, S), bool)
    keep[:, 5] = False
    mask = keep if mask_kind == "bool" else np.where(keep, 0, -np.inf).astype(dtype)
    want = reference64(q, k, v, mask)
    v[5] = np.nan
    out = sdpa(q, k, v, mask)
    np.testing.assert_allclose(out, want, **tolerance(dtype))

"""The attention variants against the float64 reference with the same options: bottom-right
causal, per-item key lengths, sliding windows, grouped-query heads, softcap, the log-sum-exp
and `merge_attention`, the weights, their combinations, fully masked rows, and threads.

Sizes cross the kernel's blocks of 128 query rows and 256 keys; key and value are strided
views (a (B, S, H, E) cache seen as (B, H, S, E)) and masks broadcast.
"""
import itertools

import numpy as np
import pytest

import cattn
from cattn import reference
from conftest import assert_matches_reference, last_call_stats, reference64, tolerance
from test_core import DTYPES, in_layout, qkv, random_mask, sdpa
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

# A warning (overflow, invalid value, 0/0) is a failure everywhere in this file.
pytestmark = pytest.mark.filterwarnings("error")


def problem(rng, dtype, L, S, B=2, Hq=2, Hkv=None, E=16, Ev=8):
    """Query (B, Hq, L, E) and, as (B, S, Hkv, ·) caches seen as (B, Hkv, S, ·), key and value."""
    Hkv = Hq if Hkv is None else Hkv
    query, key, value = qkv(rng, [(B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)], dtype)
    return query, in_layout(key, "transposed"), in_layout(value, "transposed")


def assert_invisible_rows_are_empty(out, lse, visible_rows):
    """Rows that see no key: output exactly 0, lse -inf; all others finite."""
    assert np.all(out[~visible_rows] == 0)
    assert np.all(lse[~visible_rows] == -np.inf)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[visible_rows]))


# ---------------------------------------------------------------- bottom-right causal

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L, S", [(1, 700), (4, 700), (130, 700), (9, 9), (300, 129),
                                  (9, 5)])
def test_bottom_right_causal(rng, L, S, dtype):
    query, key, value = problem(rng, dtype, L, S)
    out, lse = assert_matches_reference(query, key, value, is_causal=True,
                                        alignment="bottom_right", return_lse=True)
    # The last query sees every key; with L > S the first L - S rows see none.
    visible_rows = np.arange(L) >= L - S
    assert_invisible_rows_are_empty(out, lse, np.broadcast_to(visible_rows, lse.shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 4])
def test_decode_step_equals_the_last_rows_of_the_full_causal_call(rng, L, dtype):
    # A KV-cache decode step: the last L queries of a causal prefill over S = 700 positions.
    query, key, value = problem(rng, dtype, 700, 700)
    full = sdpa(query, key, value, is_causal=True)
    step = sdpa(query[..., -L:, :], key, value, is_causal=True, alignment="bottom_right")
    np.testing.assert_allclose(step, full[..., -L:, :], **tolerance(dtype))


DECODE_OPTIONS = {  # a few query rows against a long cache (B = 3, Hq = 4, S = 4200)
    "plain": {},
    "causal": {"is_causal": True},
    "lengths": {"is_causal": True, "key_lengths": [4200, 600, 0]},
    "window": {"is_causal": True, "window": (300, None), "key_lengths": [3000, 1024, 5]},
    "mask-row-empty": {"attn_mask": "bool"},
    "gqa-mask-softcap": {"enable_gqa": True, "attn_mask": "float32", "softcap": 5.0},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 4])
@pytest.mark.parametrize("options", DECODE_OPTIONS.values(), ids=DECODE_OPTIONS.keys())
def test_decode_against_a_long_cache(rng, options, L, dtype):
    # 12 tasks (fewer than 16) and many keys: the kernel cuts the keys into chunks and
    # merges them, so some chunks of a row see nothing (lengths, windows, masks) and must
    # weigh nothing.
    options = dict(options, alignment="bottom_right", return_lse=True)
    query, key, value = problem(rng, dtype, L, 4200, B=3, Hq=4,
                                Hkv=1 if options.get("enable_gqa") else 4)
    if "attn_mask" in options:
        mask = random_mask(rng, (3, 1, L, 4200), options["attn_mask"])
        mask[:, :, -1, :] = False if mask.dtype == bool else -np.inf
        options["attn_mask"] = mask
    assert_matches_reference(query, key, value, **options)
    assert last_call_stats()["n_splits"] > 1, "the decode call did not split its keys"


# ------------------------------------------------------------------------- key lengths

LENGTHS_B = [0, 1, 511, 512, 513, 700]   # one per batch item, S = 700


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal, alignment", [(False, "top_left"), (True, "top_left"),
                                               (True, "bottom_right")])
def test_key_lengths_per_batch_item(rng, causal, alignment, dtype):
    query, key, value = problem(rng, dtype, 130, 700, B=len(LENGTHS_B))
    out, lse = assert_matches_reference(query, key, value, is_causal=causal,
                                        alignment=alignment, key_lengths=np.array(LENGTHS_B),
                                        return_lse=True)
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)   # length 0 sees nothing


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_lengths_per_batch_item_and_head(rng, dtype):
    query, key, value = problem(rng, dtype, 20, 700, B=2, Hq=3)
    lengths = np.array([[0, 1, 700], [511, 513, 512]])
    assert_matches_reference(query, key, value, key_lengths=lengths, is_causal=True,
                             alignment="bottom_right", return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [LENGTHS_B, 513], ids=["per-item", "one-int"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_key_length_equals_cutting_the_keys(rng, alignment, lengths, dtype):
    # Keys at or past the length are ignored, and with "bottom_right" the diagonal follows
    # the length: each item's result is that of a call on its first `length` keys only.
    query, key, value = problem(rng, dtype, 130, 700, B=len(LENGTHS_B))
    out = sdpa(query, key, value, key_lengths=lengths, is_causal=True, window=(300, None),
               alignment=alignment)
    for b, n in enumerate(np.broadcast_to(lengths, len(LENGTHS_B))):
        cut = sdpa(query[b], key[b, :, :n], value[b, :, :n], is_causal=True,
                   window=(300, None), alignment=alignment)
        np.testing.assert_allclose(out[b], cut, **tolerance(dtype))


# ----------------------------------------------------------------------- sliding window

WINDOWS = [(3, 2), (200, None), (None, 4), (0, 0), (5000, 5000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L, S", [(130, 600), (300, 129)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_sliding_window(rng, window, causal, alignment, L, S, dtype):
    query, key, value = problem(rng, dtype, L, S)
    assert_matches_reference(query, key, value, window=window, is_causal=causal,
                             alignment=alignment, return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float32"])
@pytest.mark.parametrize("window", [(0, None), (3, 2), (20, 600), (None, 4)], ids=str)
def test_sliding_window_with_a_mask(rng, window, kind, dtype):
    query, key, value = problem(rng, dtype, 130, 600)
    mask = random_mask(rng, (2, 1, 130, 600), kind)
    assert_matches_reference(query, key, value, mask, window=window, return_lse=True)


def test_window_and_mask_on_three_keys():
    # Query i sees keys j >= i (window (0, None)), intersected with the mask: row 1 sees
    # key 1 only, row 2 key 2 only. (Once the mask was read from the block's first key
    # rather than the row's first visible key, shifting it by the window's left edge.)
    query, key, value = np.eye(3), np.eye(3), np.diag([1.0, 2.0, 3.0])
    mask = np.array([[True, True, False], [True, True, False], [False, True, True]])
    out = sdpa(query, key, value, mask, window=(0, None))
    np.testing.assert_allclose(out[1:], value[1:], **tolerance(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_larger_than_the_keys_changes_nothing(rng, dtype):
    query, key, value = problem(rng, dtype, 130, 600)
    np.testing.assert_array_equal(sdpa(query, key, value, window=(5000, 5000)),
                                  sdpa(query, key, value))
    np.testing.assert_array_equal(sdpa(query, key, value, window=(5000, None), is_causal=True),
                                  sdpa(query, key, value, is_causal=True))


# ------------------------------------------------------------------ grouped-query heads

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hkv", [2, 1], ids=["GQA", "MQA"])
@pytest.mark.parametrize("kv_layout", ["transposed", "sliced", "last-axis-strided"])
def test_grouped_query_heads(rng, kv_layout, Hkv, dtype):
    query, key, value = qkv(rng, [(2, 8, 130, 16), (2, Hkv, 600, 16), (2, Hkv, 600, 8)], dtype)
    key, value = in_layout(key, kv_layout), in_layout(value, kv_layout)
    out = assert_matches_reference(query, key, value, enable_gqa=True, is_causal=True)
    # Query head h reads key/value head h // (8 // Hkv): the same as repeating them.
    repeated = [np.repeat(x, 8 // Hkv, axis=1) for x in (key, value)]
    np.testing.assert_array_equal(out, sdpa(query, *repeated, is_causal=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_query_heads_broadcast_over_batch(rng, dtype):
    # Key/value shared by the batch, query heads in groups of 4.
    query, key, value = qkv(rng, [(3, 8, 20, 16), (1, 2, 530, 16), (2, 530, 8)], dtype)
    assert_matches_reference(query, key, value, enable_gqa=True)


# ------------------------------------------------------------------------------ softcap

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(rng, softcap, causal, dtype):
    query, key, value = problem(rng, dtype, 130, 600)
    # scale 2 makes scores of several units, so a cap of 5 really bites.
    out, _ = assert_matches_reference(query, key, value, softcap=softcap, scale=2.0,
                                      is_causal=causal, return_lse=True)
    assert not np.allclose(out, sdpa(query, key, value, scale=2.0, is_causal=causal))


# ---------------------------------------------------------- log-sum-exp and merging

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bounds", [(0, 600, 1100), (0, 300, 700, 1100), (0, 1, 513, 1100)],
                         ids=["2-chunks", "3-chunks", "1-key-chunk"])
@pytest.mark.parametrize("causal", [False, True])
def test_merge_attention_over_key_chunks_equals_the_full_call(rng, bounds, causal, dtype):
    query, key, value = problem(rng, dtype, 300, 1100)
    # Top-left causal as a mask, so each chunk sees its keys at their global positions: in
    # the later chunks the first rows see nothing (lse -inf) and must contribute nothing.
    mask = np.tri(300, 1100, dtype=bool) if causal else np.ones((300, 1100), dtype=bool)
    full_out, full_lse = assert_matches_reference(query, key, value, mask, return_lse=True)
    outs, lses = [], []
    for a, b in zip(bounds, bounds[1:]):
        out, lse = sdpa(query, key[..., a:b, :], value[..., a:b, :], mask[:, a:b],
                        return_lse=True)
        outs.append(out)
        lses.append(lse)
    assert any(np.any(lse == -np.inf) for lse in lses) == causal
    merged_out, merged_lse = cattn.merge_attention(outs, lses)
    np.testing.assert_allclose(merged_out, full_out, **tolerance(dtype))
    np.testing.assert_allclose(merged_lse, full_lse, **tolerance(dtype))


@pytest.mark.parametrize("offset", [1900.0, -2500.0], ids=["lse+2200", "lse-2200"])
def test_merge_attention_far_beyond_the_range_of_exp(rng, offset):
    # Scores of thousands (exp overflows past 709 in float64): unit query and key rows
    # at scale 300 give scores in [-300, 300], and a float mask adds `offset` to them all.
    query, key, value = problem(rng, np.float64, 20, 600, E=4)
    query = query / np.linalg.norm(query, axis=-1, keepdims=True)
    key = key / np.linalg.norm(key, axis=-1, keepdims=True)
    shift = np.full((20, 600), offset)
    chunks = [sdpa(query, key[..., a:b, :], value[..., a:b, :], shift[:, a:b], scale=300.0,
                   return_lse=True) for a, b in [(0, 250), (250, 600)]]
    assert all(np.all(np.abs(lse) > 1500) for _, lse in chunks)
    out, lse = cattn.merge_attention(*zip(*chunks))
    want_out, want_lse = reference64(query, key, value, shift, scale=300.0, return_lse=True)
    np.testing.assert_allclose(out, want_out, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_keeps_rows_that_see_nothing_anywhere_empty(rng, dtype):
    query, key, value = problem(rng, dtype, 20, 600)
    mask = rng.random((20, 600)) < 0.5
    mask[[3, 11]] = False
    chunks = [sdpa(query, key[..., a:b, :], value[..., a:b, :], mask[:, a:b], return_lse=True)
              for a, b in [(0, 250), (250, 600)]]
    out, lse = cattn.merge_attention(*zip(*chunks))
    want_out, want_lse = reference64(query, key, value, mask, return_lse=True)
    np.testing.assert_allclose(out, want_out, **tolerance(dtype))
    np.testing.assert_allclose(lse, want_lse, **tolerance(dtype))
    assert_invisible_rows_are_empty(out, lse, np.broadcast_to(mask.any(axis=1), lse.shape))


# ----------------------------------------------------------------------------- weights

WEIGHT_OPTIONS = {
    "plain": {},
    "causal": {"is_causal": True},
    "window-bottom-right": {"window": (40, 10), "alignment": "bottom_right"},
    "key-lengths": {"key_lengths": [300, 513], "is_causal": True},
    "bool-mask": {"attn_mask": "bool"},
    "float-mask": {"attn_mask": "float64"},
    "gqa-softcap": {"enable_gqa": True, "softcap": 5.0},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_lse", [False, True], ids=["weights", "weights+lse"])
@pytest.mark.parametrize("options", WEIGHT_OPTIONS.values(), ids=WEIGHT_OPTIONS.keys())
def test_weights(rng, options, with_lse, dtype):
    options = dict(options)
    Hkv = 1 if options.get("enable_gqa") else 2
    query, key, value = problem(rng, dtype, 130, 600, Hq=2, Hkv=Hkv)
    if "attn_mask" in options:
        options["attn_mask"] = random_mask(rng, (2, 1, 130, 600), options["attn_mask"])
    got = assert_matches_reference(query, key, value, return_weights=True,
                                   return_lse=with_lse, **options)
    assert len(got) == 2 + with_lse
    weights = got[1]                      # the order is (out, weights, lse)
    assert weights.shape == (2, 2, 130, 600)
    want_weights = reference64(query, key, value, return_weights=True, **options)[1]
    # Keys a row does not see weigh exactly 0; each row that sees a key sums to 1.
    assert np.all(weights[want_weights == 0] == 0)
    sums = weights.sum(axis=-1, dtype=np.float64)
    visible_rows = want_weights.sum(axis=-1) > 0
    np.testing.assert_allclose(sums[visible_rows], 1, **tolerance(dtype))
    assert np.all(sums[~visible_rows] == 0)


# ------------------------------------------------------------------------ combinations

COMBO_NAMES = ["gqa", "bottom_right", "key_lengths", "window", "mask", "causal", "weights"]


def combo_options(rng, flags, dtype):
    """Inputs and options for one combination of the COMBO_NAMES switches (all with lse)."""
    on = dict(zip(COMBO_NAMES, flags))
    query, key, value = problem(rng, dtype, 40, 600, Hq=4, Hkv=2 if on["gqa"] else 4)
    options = {"return_lse": True, "enable_gqa": on["gqa"], "is_causal": on["causal"],
               "alignment": "bottom_right" if on["bottom_right"] else "top_left",
               "return_weights": on["weights"]}
    if on["key_lengths"]:
        options["key_lengths"] = np.array([[600, 513, 20, 0], [1, 511, 512, 300]])
    if on["window"]:
        options["window"] = (30, 6)
    if on["mask"]:
        options["attn_mask"] = random_mask(rng, (2, 1, 40, 600), dtype)
    return (query, key, value), options


def combo_param(flags):
    """All 2^7 switch settings, each in one dtype chosen by parity: a half fraction of the
    2^8 design in which every pair (indeed every 7) of factors still meets both dtypes."""
    on = dict(zip(COMBO_NAMES, flags))
    dtype = DTYPES[sum(flags) % 2]
    name = "+".join(n for n in COMBO_NAMES if on[n]) or "none"
    return pytest.param(flags, dtype, id=f"{name}-{np.dtype(dtype)}")


@pytest.mark.parametrize("flags, dtype", [combo_param(f)
                                          for f in itertools.product([False, True], repeat=7)])
def test_combinations(rng, flags, dtype):
    arrays, options = combo_options(rng, flags, dtype)
    assert_matches_reference(*arrays, **options)


# ---------------------------------------------------------------- fully masked rows

EMPTY_ROW_CASES = {  # options -> some rows see no key (L = 130, S = 600)
    "bool-mask-row": {"attn_mask": "empty-row"},
    "additive-all-inf-row": {"attn_mask": "inf-row"},
    "bottom-right-causal-short-length": {"is_causal": True, "alignment": "bottom_right",
                                         "key_lengths": [100, 0]},
    "window-past-the-length": {"window": (0, 0), "key_lengths": [50, 600]},
    "causal-window-left-of-the-keys": {"is_causal": True, "window": (0, None),
                                       "alignment": "bottom_right", "key_lengths": [30, 600]},
}


def empty_row_options(options, dtype):
    options = dict(options)
    if options.get("attn_mask") == "empty-row":
        mask = np.ones((130, 600), dtype=bool)
        mask[[0, 64, 127, 128, 129]] = False
        options["attn_mask"] = mask
    elif options.get("attn_mask") == "inf-row":
        mask = np.zeros((2, 1, 130, 600), dtype=dtype)
        mask[:, :, [1, 128]] = -np.inf
        options["attn_mask"] = mask
    return options


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("options", EMPTY_ROW_CASES.values(), ids=EMPTY_ROW_CASES.keys())
def test_fully_masked_rows_give_zero_and_minus_inf(rng, options, weights, dtype):
    query, key, value = problem(rng, dtype, 130, 600)
    options = empty_row_options(options, dtype)
    got = assert_matches_reference(query, key, value, return_lse=True,
                                   return_weights=weights, **options)
    out, lse = got[0], got[-1]
    structural = {k: v for k, v in options.items() if k != "attn_mask"}
    visible = reference.visible_keys(130, 600, batch_shape=(2, 2), **structural)
    mask = options.get("attn_mask")
    if mask is not None:
        visible = visible & (mask if mask.dtype == bool else mask != -np.inf)
    visible_rows = visible.any(axis=-1)
    assert not visible_rows.all()          # the case really has empty rows
    assert_invisible_rows_are_empty(out, lse, visible_rows)
    if weights:
        assert np.all(got[1][~visible_rows] == 0)


# ---------------------------------------------------------------------------- threads

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("L, S", [(300, 1100), (4, 2100)], ids=["prefill", "decode"])
def test_one_and_two_threads_agree_bitwise(rng, L, S, weights, dtype):
    query, key, value = problem(rng, dtype, L, S, Hq=4, Hkv=2)
    options = dict(enable_gqa=True, is_causal=True, alignment="bottom_right",
                   key_lengths=[S, 700], window=(600, None), softcap=30.0,
                   attn_mask=random_mask(rng, (2, 1, 1, S), "bool"),
                   return_lse=True, return_weights=weights)
    one = sdpa(query, key, value, num_threads=1, **options)
    two = sdpa(query, key, value, num_threads=2, **options)
    if cattn.openmp_enabled():  # (else both run on one thread, and say so)
        assert last_call_stats()["team_size"] == 2, "the two-thread call ran on one"
    assert len(one) == len(two) == 2 + weights
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)

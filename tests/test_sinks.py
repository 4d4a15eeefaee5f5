"""Attention sinks (`sinks=`, one logit per query head) and StreamingLLM's kept first keys
(`keep_first=`).

A sink is one more score in each row's softmax with no value: the denominator gains
exp(sink - max), the weights of the keys sum to less than 1, the lse includes it, and a row
that sees no key gets output 0 and lse = sink. keep_first=n keeps the sequence's first n
keys visible past the left side of the window. The float64 reference is checked against
both written out as loops; cattn is checked against the reference on every testable
instruction-set path, with small blocks (kept keys, hidden gap and window inside one
block), key splits (the sink must count once, in one chunk), weights, lse and merges.
"""
import math

import numpy as np
import pytest

import cattn
from cattn import _kernel, reference
from conftest import assert_matches_reference, last_call_stats, reference64, tolerance
from test_core import DTYPES, qkv, sdpa
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")

PATHS = _kernel.testable_isa_paths()
EXACT = dict(rtol=1e-12, atol=1e-13)


def loop_attention(q, k, v, *, sinks=None, keep_first=None, window=None, is_causal=False,
                   alignment="top_left", key_lengths=None, q_offset=0, k_offset=0,
                   softcap=None,
                   enable_gqa=False):
    """out (B, H, L, Ev) and lse (B, H, L), one number at a time with `math`: the keys a
    query sees (key lengths, diagonal, causal, window, the kept first positions), scaled and
    capped scores, and the head's sink as one more term of the denominator."""
    B, H, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hk if enable_gqa else 1
    lengths = np.broadcast_to(S if key_lengths is None else key_lengths, (B,))
    out = np.zeros((B, H, L, Ev))
    lse = np.full((B, H, L), -math.inf)
    for b in range(B):
        n_valid = int(lengths[b])
        diag = n_valid - L if alignment == "bottom_right" else 0
        for h in range(H):
            for i in range(L):
                at = q_offset + i + diag  # global positions
                scores = {}
                for j in range(n_valid):
                    position = k_offset + j
                    kept = keep_first is not None and position < keep_first
                    if is_causal and position > at:
                        continue
                    if window is not None:
                        left, right = window
                        if left is not None and position < at - left and not kept:
                            continue
                        if right is not None and position > at + right:
                            continue
                    s = sum(float(q[b, h, i, e]) * float(k[b, h // group, j, e])
                            for e in range(E)) / math.sqrt(E)
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    scores[j] = s
                terms = list(scores.values())
                if sinks is not None and sinks[h] != -math.inf:
                    terms.append(float(sinks[h]))  # uncapped, and no value
                if not terms:
                    continue
                top = max(terms)
                total = sum(math.exp(s - top) for s in terms)
                for c in range(Ev):
                    out[b, h, i, c] = sum(math.exp(s - top) * float(v[b, h // group, j, c])
                                          for j, s in scores.items()) / total
                lse[b, h, i] = top + math.log(total)
    return out, lse


def matches_reference(q, k, v, **options):
    """cattn (on the private path and blocks given, if any) equals the float64 reference
    with the same public options: every result. Returns cattn's."""
    private = {name: options.pop(name) for name in ("_isa", "_block_sizes") if name in options}
    got = sdpa(q, k, v, **options, **private)
    want = reference64(q, k, v, **options)
    for g, w in zip(*((x,) if not isinstance(x, tuple) else x for x in (got, want))):
        assert g.dtype == q.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, **tolerance(q.dtype))
    return got


def problem(seed, B=2, H=2, L=5, S=9, E=3, Ev=2, Hk=None, dtype=np.float64, scale=1.5):
    rng = np.random.default_rng(seed)
    Hk = H if Hk is None else Hk
    q, k, v = qkv(rng, [(B, H, L, E), (B, Hk, S, E), (B, Hk, S, Ev)], dtype)
    return rng, q * dtype(scale), k * dtype(scale), v


# ----------------------------------------------------- the reference against the loops

ORACLE_CASES = {
    "sinks": dict(sinks=[0.5, -1.0]),
    "large-sink": dict(sinks=[6.0, 2.0]),
    "no-sink-head": dict(sinks=[-math.inf, 0.3]),
    "sinks-causal-bottom-right": dict(sinks=[0.5, 1.0], is_causal=True,
                                      alignment="bottom_right", key_lengths=[9, 3]),
    "sinks-softcap-not-applied": dict(sinks=[3.0, -0.5], softcap=1.0),
    "sinks-gqa": dict(sinks=[0.5, -1.0], enable_gqa=True),
    "sinks-rows-see-nothing": dict(sinks=[0.5, -1.0], key_lengths=[0, 4]),
    "keep-first-window": dict(keep_first=2, window=(1, 0)),
    "keep-first-causal-window": dict(keep_first=3, window=(1, None), is_causal=True,
                                     alignment="bottom_right"),
    "keep-first-right-side-hides": dict(keep_first=4, window=(0, 0)),
    "keep-first-beyond-lengths": dict(keep_first=6, window=(1, 1), key_lengths=[9, 3]),
    "keep-first-offsets": dict(keep_first=5, window=(2, 0), q_offset=8, k_offset=3),
    "keep-first-and-sinks": dict(keep_first=2, window=(2, 0), sinks=[1.0, -2.0],
                                 is_causal=True, alignment="bottom_right"),
}


@pytest.mark.parametrize("case", ORACLE_CASES, ids=str)
def test_reference_and_cattn_equal_the_loops(case):
    options = ORACLE_CASES[case]
    Hk = 1 if options.get("enable_gqa") else None
    _, q, k, v = problem(3, Hk=Hk)
    want_out, want_lse = loop_attention(q, k, v, **options)
    call = dict(options)
    if "sinks" in call:
        call["sinks"] = np.array(call["sinks"])
    implementations = [("reference", reference.scaled_dot_product_attention)] + [
        (f"cattn {path}", lambda *a, path=path, **kw: sdpa(*a, _isa=path, **kw))
        for path in PATHS]
    for name, impl in implementations:
        out, lse = impl(q, k, v, return_lse=True, **call)
        np.testing.assert_allclose(out, want_out, **EXACT, err_msg=f"{name} output")
        np.testing.assert_allclose(lse, want_lse, **EXACT, err_msg=f"{name} lse")


def test_a_row_that_sees_no_key_gets_zero_and_the_sink_as_lse():
    _, q, k, v = problem(4)
    sinks = np.array([0.25, -3.0])
    for path in PATHS:
        out, weights, lse = sdpa(q, k, v, sinks=sinks, key_lengths=[0, 9], _isa=path,
                                 return_weights=True, return_lse=True)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        assert (out[0] == 0).all() and (weights[0] == 0).all()
        np.testing.assert_array_equal(lse[0], np.broadcast_to(sinks[:, None], (2, 5)))


# ------------------------------------------------------------ cattn against the reference

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["sinks", "keep-first", "both"])
@pytest.mark.parametrize("blocks", [None, (7, 16)], ids=["default-blocks", "small-blocks"])
def test_matches_the_reference(path, dtype, variant, blocks):
    rng, q, k, v = problem(5, B=2, H=3, L=70, S=300, E=24, Ev=20, dtype=dtype, scale=1.0)
    options = dict(is_causal=True, alignment="bottom_right",
                   key_lengths=np.array([300, 211]))
    if variant in ("sinks", "both"):
        options["sinks"] = (rng.standard_normal(3) * 2).astype(dtype)
    if variant in ("keep-first", "both"):
        options.update(keep_first=20, window=(37, 0))
    for weights in (False, True):
        matches_reference(q, k, v, return_lse=True, return_weights=weights,
                                 _isa=path, _block_sizes=blocks, **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_rows_sum_to_one_minus_the_sinks_share(dtype):
    rng, q, k, v = problem(6, B=1, H=4, L=16, S=40, E=8, Ev=8, dtype=dtype, scale=1.0)
    sinks = np.array([-1.0, 0.0, 1.0, 3.0], dtype=dtype)
    _, weights, lse = sdpa(q, k, v, sinks=sinks, return_weights=True, return_lse=True)
    share = np.exp(sinks[:, None].astype(np.float64) - lse)
    np.testing.assert_allclose(weights.sum(-1) + share, 1, **tolerance(dtype))
    assert (weights.sum(-1) < 1).all()


def test_minus_infinity_is_no_sink():
    rng, q, k, v = problem(7, B=1, H=2, L=6, S=50)
    got = sdpa(q, k, v, sinks=np.array([-np.inf, -np.inf]), return_lse=True)
    want = sdpa(q, k, v, return_lse=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_sinks_broadcast_over_the_batch_and_per_item():
    rng, q, k, v = problem(8, B=3, H=2, L=4, S=20)
    per_item = rng.standard_normal((3, 2))
    matches_reference(q, k, v, sinks=per_item, return_lse=True)
    matches_reference(q, k, v, sinks=per_item[:1], return_lse=True)
    matches_reference(q[0, 0], k[0, 0], v[0, 0], sinks=np.float64(0.7),
                             return_lse=True)
    matches_reference(q, k, v, sinks=[0.5, 1.5], return_lse=True)  # a list


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_query_heads(dtype):
    rng, q, k, v = problem(9, B=2, H=8, Hk=2, L=9, S=130, E=16, Ev=16, dtype=dtype,
                           scale=1.0)
    matches_reference(q, k, v, enable_gqa=True, sinks=rng.standard_normal(8),
                             keep_first=3, window=(20, 0), is_causal=True,
                             alignment="bottom_right", return_lse=True, return_weights=True)


def test_the_sink_is_not_capped():
    rng, q, k, v = problem(10, B=1, H=2, L=5, S=30)
    options = dict(sinks=np.array([4.0, 0.5]), softcap=2.0, return_lse=True)
    out, lse = matches_reference(q, k, v, **options)
    assert (lse[0, 0] > 4.0).all()  # the sink alone gives 4; a capped one at most 2


def test_inputs_are_not_modified():
    rng, q, k, v = problem(11, B=1, H=2, L=5, S=30)
    sinks = np.array([0.5, -0.5])
    copies = [x.copy() for x in (q, k, v, sinks)]
    sdpa(q, k, v, sinks=sinks, keep_first=2, window=(3, 0))
    for x, c in zip((q, k, v, sinks), copies):
        np.testing.assert_array_equal(x, c)


# ----------------------------------------------------------------- key splits and merges

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 4])
def test_decode_with_split_keys_counts_the_sink_once(path, dtype, L):
    rng, q, k, v = problem(12, B=1, H=2, L=L, S=4099, E=32, Ev=32, dtype=dtype, scale=1.0)
    sinks = np.array([2.5, -1.0], dtype=dtype)
    matches_reference(q, k, v, sinks=sinks, return_lse=True, _isa=path)
    assert last_call_stats()["n_splits"] > 1
    # kept first keys far from a short window: some chunks see nothing, the first does
    matches_reference(q, k, v, sinks=sinks, keep_first=4, window=(100, 0),
                             is_causal=True, alignment="bottom_right", return_lse=True,
                             key_lengths=np.array([3900]), _isa=path)
    assert last_call_stats()["n_splits"] > 1


def test_decode_with_split_keys_and_no_visible_key():
    rng, q, k, v = problem(13, B=2, H=2, L=1, S=4096, E=16, Ev=16)
    sinks = np.array([0.3, -0.7])
    out, lse = sdpa(q, k, v, sinks=sinks, key_lengths=[0, 4096], return_lse=True)
    assert last_call_stats()["n_splits"] > 1
    assert (out[0] == 0).all()
    np.testing.assert_array_equal(lse[0, :, 0], sinks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merging_chunks_with_the_sink_in_one_equals_the_whole(dtype):
    """merge_attention stays exact: the sink joins one chunk's call only."""
    rng, q, k, v = problem(14, B=2, H=3, L=7, S=600, E=16, Ev=12, dtype=dtype, scale=1.0)
    sinks = rng.standard_normal(3).astype(dtype)
    parts = [sdpa(q, k[..., :250, :], v[..., :250, :], sinks=sinks, return_lse=True),
             sdpa(q, k[..., 250:, :], v[..., 250:, :], return_lse=True)]
    out, lse = cattn.merge_attention([o for o, _ in parts], [s for _, s in parts])
    want_out, want_lse = reference64(q, k, v, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(out, want_out, **tolerance(dtype))
    np.testing.assert_allclose(lse, want_lse, **tolerance(dtype))


def test_keep_first_with_offsets_merges_pieces_of_a_sequence():
    """A causal sequence cut in two pieces of keys: the kept first keys are global
    positions, so they appear in the piece that holds them and nowhere else."""
    rng, q, k, v = problem(15, B=1, H=2, L=6, S=400, E=8, Ev=8)
    options = dict(is_causal=True, window=(30, 0), keep_first=5, sinks=np.array([1.0, 0.0]))
    full = reference64(q, k, v, q_offset=394, return_lse=True, **options)
    pieces = [sdpa(q, k[..., :200, :], v[..., :200, :], q_offset=394, return_lse=True,
                   **options),
              sdpa(q, k[..., 200:, :], v[..., 200:, :], q_offset=394, k_offset=200,
                   return_lse=True, **dict(options, sinks=None))]
    out, lse = cattn.merge_attention([o for o, _ in pieces], [s for _, s in pieces])
    np.testing.assert_allclose(out, full[0], **tolerance(np.float64))
    np.testing.assert_allclose(lse, full[1], **tolerance(np.float64))


# ------------------------------------------------------ kept first keys skip the gap

def test_keep_first_visits_the_kept_blocks_and_the_window_only():
    rng, q, k, v = problem(16, B=1, H=1, L=128, S=8192, E=16, Ev=16, dtype=np.float32,
                           scale=1.0)
    options = dict(is_causal=True, alignment="bottom_right", window=(255, 0))
    sdpa(q, k, v, _block_sizes=(128, 256), **options)
    window_blocks = last_call_stats()["key_blocks_visited"]
    matches_reference(q, k, v, keep_first=4, _block_sizes=(128, 256), **options)
    assert last_call_stats()["key_blocks_visited"] == window_blocks + 1
    sdpa(q, k, v, _block_sizes=(128, 256), **options)


def test_keep_first_of_decode_with_split_keys_visits_two_blocks():
    rng, q, k, v = problem(17, B=1, H=1, L=1, S=8192, E=16, Ev=16, dtype=np.float32)
    matches_reference(q, k, v, keep_first=4, window=(100, 0), is_causal=True,
                             alignment="bottom_right")
    stats = last_call_stats()
    assert stats["n_splits"] > 1 and stats["key_blocks_visited"] == 2


# ------------------------------------------------------------------------- the layer

def test_multi_head_attention_passes_sinks_per_head():
    mha = cattn.MultiHeadAttention(32, 4, num_kv_heads=2, rng=0, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((2, 7, 32))
    sinks = np.array([0.5, -1.0, 2.0, 0.0])
    out, weights = mha(x, is_causal=True, sinks=sinks, need_weights=True,
                       average_attn_weights=False)
    qkv_proj = x @ mha.in_proj_weight.T + mha.in_proj_bias
    q, k, v = (qkv_proj[..., a:b].reshape(2, 7, -1, 8).transpose(0, 2, 1, 3)
               for a, b in ((0, 32), (32, 48), (48, 64)))
    context, want_weights = reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True, sinks=sinks, return_weights=True)
    want = context.transpose(0, 2, 1, 3).reshape(2, 7, 32) @ mha.out_proj_weight.T \
        + mha.out_proj_bias
    np.testing.assert_allclose(out, want, **tolerance(np.float64))
    np.testing.assert_allclose(weights, want_weights, **tolerance(np.float64))
    assert (weights.sum(-1) < 1).all()


def test_multi_head_attention_decodes_with_sinks_through_a_cache():
    mha = cattn.MultiHeadAttention(16, 2, rng=0, dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((1, 6, 16))
    sinks = np.array([1.0, -0.5])
    full, _ = mha(x, is_causal=True, sinks=sinks)
    cache = cattn.KVCache.for_layer(mha, batch_size=1, max_len=8)
    steps = [mha(x[:, i:i + 1], cache=cache, sinks=sinks)[0] for i in range(6)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, **tolerance(np.float64))


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("sinks, error, words", [
    (np.zeros(3), ValueError, "one logit per query head"),
    (np.zeros((2, 1)), ValueError, "one logit per query head"),
    (np.zeros(2, dtype=np.int64), TypeError, "floating-point"),
    (np.zeros(2, dtype=bool), TypeError, "floating-point"),
    (np.array([0.0, np.nan]), ValueError, "finite"),
    (np.array([0.0, np.inf]), ValueError, "finite"),
    (np.array([0.0, 1e300]), ValueError, "finite in float32"),
    ("ab", TypeError, "floating-point"),
    (np.ma.masked_array(np.zeros(2)), TypeError, "masked"),
])
def test_bad_sinks(sinks, error, words):
    rng = np.random.default_rng(18)
    q, k, v = qkv(rng, [(1, 2, 3, 4)] * 3, np.float32)
    with pytest.raises(error, match=words):
        sdpa(q, k, v, sinks=sinks)


@pytest.mark.parametrize("keep_first, error, words", [
    (-1, ValueError, ">= 0"),
    (2.0, TypeError, "non-negative integer"),
    (True, TypeError, "non-negative integer"),
    ("3", TypeError, "non-negative integer"),
])
def test_bad_keep_first(keep_first, error, words):
    rng = np.random.default_rng(19)
    q, k, v = qkv(rng, [(1, 2, 3, 4)] * 3, np.float32)
    with pytest.raises(error, match=words):
        sdpa(q, k, v, keep_first=keep_first, window=(1, 0))


def test_bad_sinks_in_the_layer():
    mha = cattn.MultiHeadAttention(8, 2, rng=0)
    x = np.zeros((1, 3, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="one logit per query head"):
        mha(x, sinks=np.zeros(3))


# --------------------------------------------------- random sweep of the visible-key logic

@pytest.mark.parametrize("seed", range(40))
def test_random_windows_kept_keys_sinks_and_blocks(seed):
    """Random shapes, block sizes, window sides, kept first keys, alignments, key lengths,
    offsets and sinks (some with key splits): the kept keys, the hidden gap and the window
    land in every relative position to the key blocks."""
    rng = np.random.default_rng(1000 + seed)
    B, H = 2, 2
    L = int(rng.choice([1, 2, 5, 17, 40]))
    S = int(rng.choice([7, 60, 300, 1100, 2100]))
    _, q, k, v = problem(2000 + seed, B=B, H=H, L=L, S=S, E=8, Ev=4, scale=1.0)
    side = lambda: None if rng.random() < 0.2 else int(rng.integers(0, 60))  # noqa: E731
    options = dict(window=(side(), side()), keep_first=int(rng.integers(0, 40)),
                   is_causal=bool(rng.random() < 0.5), return_lse=True)
    if rng.random() < 0.5:
        options["key_lengths"] = rng.integers(0, S + 1, B)
    if rng.random() < 0.5:
        options["alignment"] = "bottom_right"
    elif rng.random() < 0.5:
        options["q_offset"] = int(rng.integers(0, 2 * S))
        options["k_offset"] = int(rng.integers(-20, 20))
    if rng.random() < 0.7:
        options["sinks"] = rng.standard_normal(H) * 2
    blocks = None if rng.random() < 0.4 else (int(rng.integers(1, 20)),
                                              int(rng.integers(1, 70)))
    matches_reference(q, k, v, _block_sizes=blocks, **options)


# ------------------------------------------------------- float16, bfloat16 and int8 K/V

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("query_dtype", ["float32", "half"])
@pytest.mark.parametrize("L", [1, 9])
def test_half_precision_keys_and_values(path, half, query_dtype, L):
    """Sinks and kept first keys on half-precision storage (keys split when decoding): the
    reference on the stored values, within the float32 tolerance plus one rounding of a
    half-precision output (and of P, on the native bfloat16 paths)."""
    from test_dtypes import compare, half_dtype, p_rounding
    half = half_dtype(half)
    rng = np.random.default_rng(30)
    q = rng.standard_normal((2, 3, L, 32)).astype(half if query_dtype == "half" else
                                                  np.float32)
    k, v = rng.standard_normal((2, 2, 3, 2100, 32)).astype(half)
    options = dict(sinks=np.array([0.5, 2.0, -1.0]), keep_first=3, window=(200, 0),
                   is_causal=True, alignment="bottom_right", key_lengths=[2100, 1500],
                   return_lse=True)
    got = sdpa(q, k, v, _isa=path, **options)
    want = reference.scaled_dot_product_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), **options)
    compare(got, want, q.dtype, lse_last=True, output_atol=p_rounding(path, v))


def test_int8_keys_and_values_with_sinks():
    from test_dtypes import reference_of
    rng = np.random.default_rng(31)
    q = rng.standard_normal((1, 2, 1, 16)).astype(np.float32)
    k, v = rng.integers(-127, 128, (2, 1, 2, 3000, 16)).astype(np.int8)
    k_scale, v_scale = rng.random((2, 1, 2, 3000)) * 0.02
    options = dict(sinks=np.array([1.0, -0.5]), keep_first=2, window=(50, 0),
                   return_lse=True)
    got = sdpa(q, k, v, k_scale=k_scale.astype(np.float32),
               v_scale=v_scale.astype(np.float32), **options)
    want = reference_of(q, k, v, k_scale=k_scale.astype(np.float32),
                        v_scale=v_scale.astype(np.float32), **options)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **tolerance(np.float32))

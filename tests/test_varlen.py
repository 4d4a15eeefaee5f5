"""Packed variable-length sequences: varlen_attention against the float64 reference run on
each sequence alone, with every option, thread count and instruction-set path, and the
checks of its inputs.

Each sequence s is q[cu_q[s]:cu_q[s+1]] (tokens, heads, E) over k and v cut by cu_k; the
reference sees it as (heads, tokens, E) with the same options. lse is (Hq, Tq).
"""
import numpy as np
import pytest

import cattn
from cattn import _kernel, reference
from conftest import as64, last_call_stats, tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")
varlen = cattn.varlen_attention
DTYPES = [np.float32, np.float64]


def cumulative(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def packed(rng, q_lengths, k_lengths, Hq=3, Hkv=3, E=16, Ev=8, dtype=np.float32):
    q = rng.standard_normal((sum(q_lengths), Hq, E)).astype(dtype)
    k = rng.standard_normal((sum(k_lengths), Hkv, E)).astype(dtype)
    v = rng.standard_normal((sum(k_lengths), Hkv, Ev)).astype(dtype)
    return q, k, v, cumulative(q_lengths), cumulative(k_lengths)


def heads_first(x):
    return np.ascontiguousarray(x.transpose(1, 0, 2))


def reference_per_sequence(q, k, v, cu_q, cu_k, sinks=None, **options):
    """(out (Tq, Hq, Ev), lse (Hq, Tq)) in float64, one reference call per sequence.

    Sinks are modelled independently of cattn's formula: one extra key with a zero key
    vector (score 0, unchanged by softcap) and a zero value, always visible, whose score
    the additive mask sets to the head's sink logit."""
    q, k, v = as64(q), as64(k), as64(v)
    Hq, Ev = q.shape[1], v.shape[2]
    out = np.zeros((q.shape[0], Hq, Ev))
    lse = np.zeros((Hq, q.shape[0]))
    for s in range(len(cu_q) - 1):
        qs = heads_first(q[cu_q[s]:cu_q[s + 1]])
        ks, vs = heads_first(k[cu_k[s]:cu_k[s + 1]]), heads_first(v[cu_k[s]:cu_k[s + 1]])
        if sinks is None:
            o, l = reference.scaled_dot_product_attention(qs, ks, vs, return_lse=True,
                                                          **options)
        else:
            L, S = qs.shape[1], ks.shape[1]
            structural = {key: options[key] for key in ("is_causal", "window", "alignment",
                                                        "keep_first") if key in options}
            visible = reference.visible_keys(L, S, batch_shape=(Hq,), **structural)
            mask = np.concatenate([np.broadcast_to(np.asarray(sinks, float)[:, None, None],
                                                   (Hq, L, 1)),
                                   np.where(visible, 0.0, -np.inf)], axis=-1)
            ks = np.concatenate([np.zeros((ks.shape[0], 1, ks.shape[2])), ks], axis=1)
            vs = np.concatenate([np.zeros((vs.shape[0], 1, Ev)), vs], axis=1)
            rest = {key: val for key, val in options.items() if key not in structural}
            o, l = reference.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask,
                                                          return_lse=True, **rest)
        out[cu_q[s]:cu_q[s + 1]] = o.transpose(1, 0, 2)
        lse[:, cu_q[s]:cu_q[s + 1]] = l
    return out, lse


def assert_matches(q, k, v, cu_q, cu_k, **options):
    got_out, got_lse = varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    ref_options = {key: val for key, val in options.items()
                   if key not in ("num_threads", "_isa", "_block_sizes")}
    want_out, want_lse = reference_per_sequence(q, k, v, cu_q, cu_k, **ref_options)
    assert got_out.dtype == q.dtype and got_lse.dtype == q.dtype
    assert got_out.shape == want_out.shape and got_lse.shape == want_lse.shape
    np.testing.assert_allclose(got_out, want_out, **tolerance(q.dtype))
    np.testing.assert_allclose(got_lse, want_lse, **tolerance(q.dtype))
    return got_out, got_lse


# Lengths (queries, keys): empty sequences of either kind, length 1, more query rows than
# one block, more keys than one block, queries longer than keys and the reverse.
Q_LENGTHS = [5, 0, 1, 130, 7, 3, 1, 40, 0, 300]
K_LENGTHS = [5, 4, 0, 200, 9, 0, 1, 40, 0, 520]

OPTIONS = {
    "plain": {},
    "causal": dict(is_causal=True),
    "causal-bottom-right": dict(is_causal=True, alignment="bottom_right"),
    "window": dict(window=(17, 3)),
    "window-bottom-right": dict(window=(None, 2), alignment="bottom_right"),
    "causal-window-softcap": dict(is_causal=True, window=(30, None), softcap=3.0),
    "scale": dict(scale=0.3),
    "gqa": dict(enable_gqa=True, is_causal=True),
    "sinks": dict(sinks=np.array([0.5, -1.0, 3.0]), is_causal=True,
                  alignment="bottom_right"),
    "sinks-no-sink-head-softcap": dict(sinks=np.array([-np.inf, 2.0, 0.0]), softcap=1.5),
    "keep-first-window": dict(keep_first=4, window=(8, 0)),
    "keep-first-causal-bottom-right-sinks": dict(keep_first=2, window=(5, None),
                                                 is_causal=True, alignment="bottom_right",
                                                 sinks=np.array([1.0, -1.0, 0.0])),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_matches_reference_per_sequence(rng, options, dtype):
    Hkv = 1 if options.get("enable_gqa") else 3
    q, k, v, cu_q, cu_k = packed(rng, Q_LENGTHS, K_LENGTHS, Hkv=Hkv, dtype=dtype)
    assert_matches(q, k, v, cu_q, cu_k, **options)


@pytest.mark.parametrize("block_sizes", [(1, 1), (7, 5), (64, 32)])
def test_block_sizes_do_not_change_the_result(rng, block_sizes):
    q, k, v, cu_q, cu_k = packed(rng, Q_LENGTHS, K_LENGTHS, dtype=np.float64)
    assert_matches(q, k, v, cu_q, cu_k, is_causal=True, _block_sizes=block_sizes)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_threads_give_identical_results(rng, num_threads):
    q, k, v, cu_q, cu_k = packed(rng, Q_LENGTHS, K_LENGTHS)
    out, lse = assert_matches(q, k, v, cu_q, cu_k, is_causal=True, num_threads=num_threads,
                              _block_sizes=(32, 64))
    one_out, one_lse = varlen(q, k, v, cu_q, cu_k, is_causal=True, return_lse=True,
                              num_threads=1, _block_sizes=(32, 64))
    # Each (sequence, head, query block) is one task whatever the thread count: bitwise.
    np.testing.assert_array_equal(out, one_out)
    np.testing.assert_array_equal(lse, one_lse)


def test_many_sequences(rng):
    lengths = rng.integers(0, 12, size=300)
    q, k, v, cu_q, cu_k = packed(rng, lengths, lengths[::-1], Hq=2, Hkv=2, E=8, Ev=4)
    assert_matches(q, k, v, cu_q, cu_k, is_causal=True, alignment="bottom_right",
                   num_threads=2)


def test_single_tokens_and_no_tokens(rng):
    q, k, v, cu_q, cu_k = packed(rng, [1], [1])
    out = varlen(q, k, v, cu_q, cu_k)
    np.testing.assert_allclose(out, v.repeat(3 // v.shape[1], axis=1), rtol=1e-6)
    q, k, v, cu_q, cu_k = packed(rng, [0, 0], [0, 0])
    out, lse = varlen(q, k, v, cu_q, cu_k, return_lse=True)
    assert out.shape == (0, 3, 8) and lse.shape == (3, 0)
    q, k, v, cu_q, cu_k = packed(rng, [], [])
    assert varlen(q, k, v, cu_q, cu_k).shape == (0, 3, 8)


def test_queries_without_keys_get_zero_and_minus_infinity(rng):
    q, k, v, cu_q, cu_k = packed(rng, [4, 2], [0, 3])
    out, lse = varlen(q, k, v, cu_q, cu_k, return_lse=True)
    assert np.all(out[:4] == 0) and np.all(lse[:, :4] == -np.inf)
    assert np.all(np.isfinite(out[4:]))
    out, lse = varlen(q, k, v, cu_q, cu_k, return_lse=True, sinks=[1.0, 2.0, -np.inf])
    assert np.all(out[:4] == 0)
    np.testing.assert_array_equal(lse[:, :4], np.array([[1.0], [2.0], [-np.inf]]).repeat(4, 1))


def test_strided_views_are_read_in_place(rng):
    # q, k and v as views into one fused (T, 3, H, E) projection, and q with every other
    # feature (a non-unit last stride, which the front copies), against contiguous copies.
    lengths = [9, 0, 33, 1, 70]
    T, H, E = sum(lengths), 4, 16
    fused = rng.standard_normal((T, 3, H, E)).astype(np.float32)
    q, k, v = fused[:, 0], fused[:, 1], fused[:, 2]
    cu = cumulative(lengths)
    before = fused.copy()
    got = assert_matches(q, k, v, cu, cu, is_causal=True)
    want = varlen(*(np.ascontiguousarray(x) for x in (q, k, v)), cu, cu, is_causal=True,
                  return_lse=True)
    np.testing.assert_array_equal(got[0], want[0])
    wide = rng.standard_normal((T, H, 2 * E)).astype(np.float32)
    assert_matches(wide[:, :, ::2], k, v, cu, cu)
    assert_matches(q[:, ::-1], k[:, ::-1], v[:, ::-1], cu, cu)  # negative head stride
    np.testing.assert_array_equal(fused, before)  # inputs are never modified


def path_param(name):
    available = name in _kernel.testable_isa_paths()
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        not available, reason=f"this CPU lacks the {name} path"))


# every path a CPU may offer (this one's, and the others skipped with the reason)
PATHS = ("amx", "avx512_bf16", "avx512", "avx2", "portable", "wide16", "blas")


def test_every_testable_path_is_listed():
    assert set(_kernel.testable_isa_paths()) <= set(PATHS)


@pytest.mark.parametrize("path", [path_param(p) for p in PATHS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_path(rng, path, dtype):
    q, k, v, cu_q, cu_k = packed(rng, Q_LENGTHS, K_LENGTHS, E=17, Ev=33, dtype=dtype)
    assert_matches(q, k, v, cu_q, cu_k, is_causal=True, alignment="bottom_right",
                   softcap=5.0, _isa=path, num_threads=2)
    assert last_call_stats()["isa"] == path
    if dtype == np.float32:  # keys and values read as float16, converted in the kernel
        k16, v16 = k.astype(np.float16), v.astype(np.float16)
        assert_matches(q, k16, v16, cu_q, cu_k, is_causal=True, _isa=path, num_threads=2,
                       _block_sizes=(16, 32))


def test_tasks_run_heaviest_first_and_cover_every_block(rng):
    # One task per (sequence, head, query block) with rows, never a key chunk.
    q, k, v, cu_q, cu_k = packed(rng, Q_LENGTHS, K_LENGTHS)
    varlen(q, k, v, cu_q, cu_k, _block_sizes=(32, 64))
    stats = last_call_stats()
    blocks = sum(-(-n // 32) for n in Q_LENGTHS)
    assert stats["n_tasks"] == 3 * blocks and stats["n_splits"] == 1


def test_task_order_is_longest_work_first():
    from cattn._varlen import _task_list
    q_len = np.array([10, 300, 0, 40])
    k_len = np.array([10, 300, 5, 4000])
    tasks = _task_list(q_len, k_len, np.zeros(4, np.intp), np.zeros(4, np.intp), 2, 128,
                       2**60, 2**60)
    # sequence 3 (40 rows x 4000 keys) first, then sequence 1's two full 128-row blocks,
    # its 44-row tail, sequence 0; every head of a block in a row.
    assert tasks.tolist() == [[6, 0, 1], [7, 0, 1], [2, 0, 1], [3, 0, 1], [2, 1, 1],
                              [3, 1, 1], [2, 2, 1], [3, 2, 1], [0, 0, 1], [1, 0, 1]]


def test_tasks_group_the_heads_of_one_kv_head_as_far_as_their_rows_fit():
    """Heads sharing keys and values (group of 4) are rows of one task while they fit in
    the kernel's grouped-task rows: a decoding sequence's 4 one-row heads in one task, a
    block of 64 rows two heads a task, a full block of 128 one head (bugs: a head left out
    of every task, a group that straddles two K/V heads, more rows than the scratch)."""
    from cattn._varlen import _task_list
    q_len = np.array([1, 64, 128])
    k_len = np.array([500, 64, 128])
    tasks = _task_list(q_len, k_len, k_len - q_len, np.zeros(3, np.intp), 8, 128,
                       2**60, 0, group=4)
    covered = sorted((item + m, block) for item, block, members in tasks.tolist()
                     for m in range(members))
    assert covered == sorted((s * 8 + h, 0) for s in range(3) for h in range(8))
    members = {item: m for item, _, m in tasks.tolist()}
    assert members == {0: 4, 4: 4, 8: 2, 10: 2, 12: 2, 14: 2,
                       16: 1, 17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1, 23: 1}
    assert all(item % m == 0 and (item % 8) // 4 == (item % 8 + m - 1) // 4
               for item, _, m in tasks.tolist())


def test_lse_merges_with_other_key_chunks(rng):
    # Two calls over the two halves of every sequence's keys merge into the whole call.
    q_lengths, k_lengths = [6, 20, 3], [10, 40, 8]
    q, k, v, cu_q, cu_k = packed(rng, q_lengths, k_lengths, dtype=np.float64)
    half = np.array(k_lengths) // 2
    first = np.concatenate([np.arange(cu_k[s], cu_k[s] + half[s]) for s in range(3)])
    second = np.setdiff1d(np.arange(cu_k[-1]), first)
    o1, l1 = varlen(q, k[first], v[first], cu_q, cumulative(half), return_lse=True)
    o2, l2 = varlen(q, k[second], v[second], cu_q, cumulative(k_lengths - half),
                    return_lse=True)
    merged, lse = cattn.merge_attention([o1.transpose(1, 0, 2), o2.transpose(1, 0, 2)],
                                        [l1, l2])
    whole, whole_lse = varlen(q, k, v, cu_q, cu_k, return_lse=True)
    np.testing.assert_allclose(merged.transpose(1, 0, 2), whole, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-12, atol=1e-13)


def test_equals_the_padded_call_with_key_lengths(rng):
    lengths = [5, 17, 2]
    q, k, v, cu, _ = packed(rng, lengths, lengths, dtype=np.float64)
    got = varlen(q, k, v, cu, cu, is_causal=True, alignment="bottom_right")
    B, H, L = 3, 3, max(lengths)

    def pad(x):
        out = np.zeros((B, H, L, x.shape[2]))
        for s in range(B):
            out[s, :, L - lengths[s]:] = x[cu[s]:cu[s + 1]].transpose(1, 0, 2)  # left pad
        return out
    # queries left-padded, keys right-padded: the last real query meets the last real key
    qp = pad(q)
    kp, vp = (np.zeros((B, H, L, x.shape[2])) for x in (k, v))
    for s in range(B):
        kp[s, :, :lengths[s]] = k[cu[s]:cu[s + 1]].transpose(1, 0, 2)
        vp[s, :, :lengths[s]] = v[cu[s]:cu[s + 1]].transpose(1, 0, 2)
    dense = cattn.scaled_dot_product_attention(qp, kp, vp, is_causal=True,
                                               alignment="bottom_right",
                                               key_lengths=np.array(lengths))
    for s in range(B):
        np.testing.assert_allclose(got[cu[s]:cu[s + 1]],
                                   dense[s, :, L - lengths[s]:].transpose(1, 0, 2),
                                   rtol=1e-12, atol=1e-13)


# ---------------------------------------------------- keys and values in narrower types

def bfloat16():
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


NARROW = {
    "float16-kv": (np.float32, np.float16, np.float16),
    "bfloat16-kv": (np.float32, "bfloat16", "bfloat16"),
    "float16-all": (np.float16, np.float16, np.float16),
    "bfloat16-all": ("bfloat16", "bfloat16", "bfloat16"),  # native products where the CPU has them
    "bfloat16-q-int8-v": ("bfloat16", np.float32, np.int8),
    "int8-kv": (np.float32, np.int8, np.int8),
}


@pytest.mark.parametrize("dtypes", NARROW.values(), ids=NARROW.keys())
def test_narrow_keys_and_values(rng, dtypes):
    """float32 computing on K and V read in their own type: against the reference on the
    same rounded (int8: dequantized) values, outputs in the query's dtype, lse float32."""
    q_type, k_type, v_type = (bfloat16() if d == "bfloat16" else np.dtype(d)
                              for d in dtypes)
    q, k, v, cu_q, cu_k = packed(rng, Q_LENGTHS, K_LENGTHS, Hkv=3, E=32, Ev=16,
                                 dtype=np.float64)  # (int8: one scale per key and head)
    scales = {}
    inputs = {"q": q.astype(q_type)}
    exact = {"q": inputs["q"].astype(np.float64)}
    for name, x, x_type in (("k", k, k_type), ("v", v, v_type)):
        if x_type == np.int8:
            inputs[name], scales[name + "_scale"] = cattn.quantize_kv(x)
            exact[name] = inputs[name] * scales[name + "_scale"][..., None].astype(np.float64)
        else:
            inputs[name] = x.astype(x_type)
            exact[name] = inputs[name].astype(np.float64)
    options = dict(is_causal=True, alignment="bottom_right", enable_gqa=True,
                   sinks=np.array([0.5, -1.0, 2.0]), num_threads=2)
    out, lse = varlen(inputs["q"], inputs["k"], inputs["v"], cu_q, cu_k, return_lse=True,
                      **scales, **options)
    del options["num_threads"]
    want_out, want_lse = reference_per_sequence(exact["q"], exact["k"], exact["v"], cu_q,
                                                cu_k, **options)
    assert out.dtype == q_type and lse.dtype == np.float32
    rounding = {np.float32: 0, np.float16: 2.0**-11}.get(q_type.type, 2.0**-8)
    bound = 2e-5 + (2e-5 + rounding) * np.abs(want_out)
    if last_call_stats()["bf16_native_blocks"]:
        # native bfloat16 P.V (amx, avx512_bf16) rounds P to bfloat16: an error up to
        # 2^-8 · sum_j p_j |v_j|, which is the attention output over |v|
        bound += 2.0**-8 * reference_per_sequence(exact["q"], exact["k"], np.abs(exact["v"]),
                                                 cu_q, cu_k, **options)[0]
    assert np.all(np.abs(out.astype(np.float64) - want_out) <= bound)
    np.testing.assert_allclose(lse, want_lse, **tolerance(np.float32))


def test_out_dtype_rounds_the_float32_result_once(rng):
    q, k, v, cu_q, cu_k = packed(rng, [5, 9], [7, 3])
    half = varlen(q, k.astype(np.float16), v.astype(np.float16), cu_q, cu_k,
                  out_dtype=np.float16)
    full = varlen(q, k.astype(np.float16), v.astype(np.float16), cu_q, cu_k)
    assert half.dtype == np.float16 and full.dtype == np.float32
    np.testing.assert_array_equal(half, full.astype(np.float16))


# ------------------------------------------------------------------------- bad input

def bad_call(rng, **change):
    q, k, v, cu_q, cu_k = packed(rng, [3, 4], [5, 2])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    options = {key: change.pop(key) for key in list(change) if key not in args}
    args.update(change)
    return lambda: varlen(**args, **options)


BAD = [
    (dict(cu_seqlens_q=np.array([0, 4, 3, 7])), ValueError, "must not decrease"),
    (dict(cu_seqlens_q=np.array([0, 7])), ValueError, "same number of sequences"),
    (dict(cu_seqlens_q=np.array([1, 3, 7])), ValueError, "must start at 0"),
    (dict(cu_seqlens_q=np.array([0, 3, 6])), ValueError, r"end at the number of tokens of q \(7\)"),
    (dict(cu_seqlens_k=np.array([0, 5, 8])), ValueError, r"end at the number of tokens of k \(7\)"),
    (dict(cu_seqlens_k=np.array([0.0, 5.0, 7.0])), TypeError, "must be integers"),
    (dict(cu_seqlens_k=np.array([True, False, True])), TypeError, "must be integers"),
    (dict(cu_seqlens_q=np.array([[0, 3, 7]])), ValueError, "1-D array"),
    (dict(cu_seqlens_q=np.array([], dtype=int)), ValueError, "1-D array"),
    (dict(q=np.zeros((7, 3, 16), np.int8)), TypeError, "dtype"),
    (dict(k=np.zeros((7, 3, 16), np.int8)), ValueError, "k_scale"),
    (dict(k_scale=np.ones((7, 3), np.float32)), ValueError, "only for int8"),
    (dict(q=np.zeros((7, 3, 16), np.float64)), TypeError, "same dtype"),
    (dict(q=np.zeros((7, 48), np.float32)), ValueError, "3 dimensions"),
    (dict(k=np.zeros((1, 7, 3, 16), np.float32)), ValueError, "3 dimensions"),
    (dict(q=[[[0.0]]]), TypeError, "q"),
    (dict(v=np.zeros((6, 3, 8), np.float32)), ValueError, "same tokens and heads"),
    (dict(q=np.zeros((7, 3, 8), np.float32)), ValueError, "feature size"),
    (dict(q=np.zeros((7, 2, 16), np.float32)), ValueError, "enable_gqa"),
    (dict(q=np.zeros((7, 4, 16), np.float32), enable_gqa=True), ValueError, "multiple"),
    (dict(enable_gqa=1), TypeError, "enable_gqa"),
    (dict(sinks=np.zeros(2)), ValueError, r"one logit per query head, \(Hq,\) = \(3,\)"),
    (dict(sinks=np.array([0, np.nan, 0])), ValueError, "finite"),
    (dict(sinks=np.array([0, 1, 2])), TypeError, "floating-point"),
    (dict(keep_first=-1), ValueError, "keep_first"),
    (dict(keep_first=1.5), TypeError, "keep_first"),
    (dict(alignment="bottom"), ValueError, "alignment"),
    (dict(window=(1,)), TypeError, "window"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(num_threads=0), ValueError, "num_threads"),
]


@pytest.mark.parametrize("change, error, message", BAD,
                         ids=[f"{i}-{m[:20]}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_input_is_refused_clearly(rng, change, error, message):
    with pytest.raises(error, match=message):
        bad_call(rng, **change)()

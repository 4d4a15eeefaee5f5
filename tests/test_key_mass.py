"""Per-key attention mass (`return_key_mass=True`): for each key, the sum over the call's
queries of its attention weight, computed in the kernel without the (..., L, S) weights.

Compared with the float64 reference's weights summed over the queries, with masks, causal
masks, windows, sinks, kept first keys, ALiBi and grouped-query heads, on every
instruction-set path, over several query blocks; bitwise the same for 1, 2 and 3 threads;
through the padded, paged and packed entry points.
"""
import numpy as np
import pytest

import cattn
from conftest import reference64, tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)
from test_dtypes import p_rounding
from test_isa_paths import ALL_PATHS

pytestmark = pytest.mark.filterwarnings("error")

bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
sdpa = cattn.scaled_dot_product_attention


def operands(rng, dtype, B, Hq, Hkv, L, S, E=16, Ev=8):
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in
                 ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)))


def reference_mass(q, k, v, attn_mask=None, **options):
    """The reference's weights, summed over the queries (float64)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))  # (bfloat16 included)
    _, weights = reference64(q, k, v, attn_mask, return_weights=True, **options)
    return weights.sum(axis=-2)


def mass_tolerance(dtype, L):
    """A sum of L weights, each within the dtype's tolerance."""
    base = tolerance(np.float64 if dtype == np.float64 else np.float32)
    return dict(rtol=base["rtol"] * 4, atol=base["atol"] * L)


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bottom_right window": dict(window=(9, 2), alignment="bottom_right",
                                key_lengths=np.array([60, 33])),
    "bool mask": dict(attn_mask="bool"),
    "float mask": dict(attn_mask="float", is_causal=True),
    "sinks": dict(sinks=np.array([0.5, 3.0, -1.0, -np.inf])),
    "keep_first": dict(window=(5, 0), keep_first=4),
    "gqa alibi": dict(enable_gqa=True, alibi_slopes=np.array([0.5, 0.25, 0.1, 0.05]),
                      is_causal=True),
    "softcap": dict(softcap=2.0, q_offset=np.array([3, 40]), k_offset=1, is_causal=True),
}


def case_options(name, rng, L, S):
    options = dict(CASES[name])
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = rng.random((2, 4, L, S)) < 0.6
        options["attn_mask"][0, 0, 3] = False  # a row that sees nothing: mass 0
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = rng.standard_normal((L, S))
    return options


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_key_mass_is_the_weights_summed_over_queries(case, dtype, path, rng):
    # 37 query rows in blocks of 8 over 60 keys in blocks of 16: the likeliest bugs are a
    # query block's sum overwriting another's, keys outside a block's range left with
    # garbage from the thread's scratch, and the sink's share counted as a key's.
    L, S = 37, 60
    options = case_options(case, rng, L, S)
    q, k, v = operands(rng, dtype, 2, 4, 2 if options.get("enable_gqa") else 4, L, S)
    if np.dtype(dtype).itemsize == 2:  # (outputs compared before rounding to 16 bits)
        options["out_dtype"] = np.float32
    out, mass = sdpa(q, k, v, return_key_mass=True, _isa=path, _block_sizes=(8, 16),
                     **options)
    want = reference_mass(q, k, v, **{n: o for n, o in options.items() if n != "out_dtype"})
    wide = np.float64 if dtype == np.float64 else np.float32
    assert mass.shape == (2, 4, S) and mass.dtype == wide
    np.testing.assert_allclose(mass, want, **mass_tolerance(dtype, L))
    # The output stays the attention (as return_weights computes it: full rows). On the
    # native bfloat16 paths each of the two rounds its own P (full rows' or a block's) to
    # bfloat16.
    tol = dict(tolerance(wide))
    tol["atol"] += 2 * p_rounding(path, v)
    np.testing.assert_allclose(out, sdpa(q, k, v, _isa=path, _block_sizes=(8, 16),
                                         **options), **tol)


@pytest.mark.parametrize("options", [dict(is_causal=True), dict(window=(40, 7)),
                                     dict(enable_gqa=True, sinks=np.array([1.0, 2.0]))],
                         ids=str)
def test_key_mass_is_bitwise_independent_of_the_thread_count(options, rng):
    q, k, v = operands(rng, np.float32, 2, 2, 1 if options.get("enable_gqa") else 2, 300,
                       400)
    runs = [sdpa(q, k, v, return_key_mass=True, num_threads=n, **options)[1]
            for n in (1, 2, 3)]
    for mass in runs[1:]:
        np.testing.assert_array_equal(mass, runs[0])


def test_a_decode_keeps_its_keys_whole(rng):
    # One query against 5000 keys would split the keys into chunks; the mass needs the
    # final softmax of the row, so the call runs unsplit and the mass is the weights row.
    q, k, v = operands(rng, np.float64, 1, 2, 2, 1, 5000)
    out, lse, mass = sdpa(q, k, v, return_lse=True, return_key_mass=True)
    want_out, want_lse = reference64(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, want_out, **tolerance(np.float64))
    np.testing.assert_allclose(mass, reference_mass(q, k, v), **tolerance(np.float64))
    assert cattn._kernel.last_call_stats()["n_splits"] == 1


def test_results_come_in_order_with_the_mass_last(rng):
    q, k, v = operands(rng, np.float32, 1, 2, 2, 5, 7)
    out, weights, lse, mass = sdpa(q, k, v, return_weights=True, return_lse=True,
                                   return_key_mass=True, is_causal=True)
    np.testing.assert_allclose(mass, weights.sum(axis=-2), rtol=1e-6, atol=1e-6)
    assert lse.shape == (1, 2, 5) and mass.shape == (1, 2, 7)
    # Each row that sees a key gives it a total mass of 1.
    np.testing.assert_allclose(mass.sum(axis=-1), 5, rtol=1e-6)


def test_no_query_gives_zero_mass(rng):
    q, k, v = operands(rng, np.float32, 1, 2, 2, 0, 7)
    out, mass = sdpa(q, k, v, return_key_mass=True)
    assert out.shape == (1, 2, 0, 8)
    np.testing.assert_array_equal(mass, np.zeros((1, 2, 7), np.float32))


def test_paged_key_mass_is_indexed_by_key_position(rng):
    B, H, L, S, page = 2, 2, 3, 12, 4
    q, k, v = operands(rng, np.float32, B, H, H, L, S)
    n = S // page
    k_pages, v_pages = (x.reshape(B, H, n, page, -1).transpose(0, 2, 1, 3, 4).reshape(
        B * n, H, page, -1)[::-1].copy() for x in (k, v))
    table = (B * n - 1 - np.arange(B * n).reshape(B, n)).astype(np.int32)
    lengths = np.array([12, 7])
    out, mass = cattn.paged_attention(q, k_pages, v_pages, table, lengths, is_causal=True,
                                      return_key_mass=True)
    want = reference_mass(q, k, v, is_causal=True, alignment="bottom_right",
                          key_lengths=lengths)
    np.testing.assert_allclose(mass, want, **mass_tolerance(np.float32, L))
    packed = cattn.paged_attention(q.transpose(0, 2, 1, 3).reshape(B * L, H, -1), k_pages,
                                   v_pages, table, lengths, is_causal=True,
                                   cu_seqlens_q=np.arange(B + 1) * L, return_key_mass=True)
    np.testing.assert_allclose(packed[1], want, **mass_tolerance(np.float32, L))


def test_varlen_key_mass_is_packed_like_the_keys(rng):
    q_lens, k_lens = np.array([3, 0, 5]), np.array([6, 4, 9])
    H, E = 2, 8
    q = rng.standard_normal((q_lens.sum(), H, E))
    k = rng.standard_normal((k_lens.sum(), H, E))
    v = rng.standard_normal((k_lens.sum(), H, E))
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]) for x in (q_lens, k_lens))
    out, mass = cattn.varlen_attention(q, k, v, cu_q, cu_k, is_causal=True,
                                       alignment="bottom_right", return_key_mass=True)
    assert mass.shape == (H, k_lens.sum()) and mass.dtype == np.float64
    for s in range(3):
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        want = reference_mass(q[qs].transpose(1, 0, 2), k[ks].transpose(1, 0, 2),
                              v[ks].transpose(1, 0, 2), is_causal=True,
                              alignment="bottom_right")
        np.testing.assert_allclose(mass[:, ks], want, **tolerance(np.float64))


def test_bad_flag_is_refused(rng):
    q, k, v = operands(rng, np.float32, 1, 2, 2, 3, 4)
    with pytest.raises(ValueError, match="True, False or 'kv_heads'"):
        sdpa(q, k, v, return_key_mass="yes")
    with pytest.raises(TypeError, match="return_key_mass"):
        sdpa(q, k, v, return_key_mass=1)


# ------------------------------------------------ summed over a key/value head's group

def group_sum(mass, Hkv):
    """(..., Hq, S) -> (..., Hkv, S): the consecutive query heads of each group added."""
    return mass.reshape(mass.shape[:-2] + (Hkv, -1, mass.shape[-1])).sum(axis=-2)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("L", [1, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("options", [dict(is_causal=True, alignment="bottom_right"),
                                     dict(window=(9, 2), sinks=np.array([0.5, 3.0, -1.0,
                                                                         -np.inf]))],
                         ids=["causal", "window sinks"])
def test_kv_heads_mass_is_the_sum_over_each_group(options, L, path, rng):
    # 4 query heads over 2 key/value heads: the bugs this catches are heads summed across
    # groups (h % Hkv instead of h // group), one head of a group taken for all, and a
    # query block of one head overwriting another head's.
    S = 60
    q, k, v = operands(rng, np.float32, 2, 4, 2, L, S)
    out, mass = sdpa(q, k, v, enable_gqa=True, return_key_mass="kv_heads", _isa=path,
                     _block_sizes=(8, 16), **options)
    assert mass.shape == (2, 2, S) and mass.dtype == np.float32
    want = group_sum(reference_mass(q, k, v, enable_gqa=True, **options), 2)
    np.testing.assert_allclose(mass, want, **mass_tolerance(np.float32, 2 * L))
    np.testing.assert_allclose(out, reference64(q, k, v, enable_gqa=True, **options),
                               **tolerance(np.float32))


def test_kv_heads_mass_through_varlen_and_paged(rng):
    # The packed (Hkv, Tk) and paged (B, Hkv, S) layouts of the group sums.
    lengths_q, lengths_k = np.array([3, 1, 5]), np.array([9, 4, 12])
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]) for n in (lengths_q, lengths_k))
    q = rng.standard_normal((cu_q[-1], 6, 8))
    k, v = (rng.standard_normal((cu_k[-1], 2, 8)) for _ in range(2))
    out, mass = cattn.varlen_attention(q, k, v, cu_q, cu_k, enable_gqa=True,
                                       is_causal=True, alignment="bottom_right",
                                       return_key_mass="kv_heads")
    assert mass.shape == (2, cu_k[-1])
    for s in range(3):
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        want = reference_mass(q[qs].transpose(1, 0, 2), k[ks].transpose(1, 0, 2),
                              v[ks].transpose(1, 0, 2), enable_gqa=True, is_causal=True,
                              alignment="bottom_right")
        np.testing.assert_allclose(mass[:, ks], group_sum(want, 2), **tolerance(np.float64))
    # pages of 4 rows, the batch's pages in reversed order
    qb = rng.standard_normal((2, 6, 3, 8))
    kb, vb = (rng.standard_normal((2, 2, 12, 8)) for _ in range(2))
    k_pages, v_pages = (x.reshape(2, 2, 3, 4, 8).transpose(0, 2, 1, 3, 4).reshape(
        6, 2, 4, 8)[::-1].copy() for x in (kb, vb))
    table = (5 - np.arange(6).reshape(2, 3)).astype(np.int32)
    for packed in (False, True):
        query = qb.transpose(0, 2, 1, 3).reshape(6, 6, 8) if packed else qb
        extra = dict(cu_seqlens_q=np.array([0, 3, 6])) if packed else {}
        _, mass = cattn.paged_attention(query, k_pages, v_pages, table, np.array([12, 10]),
                                        enable_gqa=True, is_causal=True,
                                        return_key_mass="kv_heads", **extra)
        assert mass.shape == (2, 2, 12)
        want = group_sum(reference_mass(qb, kb, vb, enable_gqa=True, is_causal=True,
                                        alignment="bottom_right",
                                        key_lengths=np.array([12, 10])), 2)
        np.testing.assert_allclose(mass, want, **tolerance(np.float64))


def test_kv_heads_mass_is_bitwise_independent_of_the_thread_count(rng):
    q, k, v = operands(rng, np.float32, 2, 8, 2, 300, 400)
    runs = [sdpa(q, k, v, enable_gqa=True, is_causal=True, return_key_mass="kv_heads",
                 num_threads=n)[1] for n in (1, 2, 3)]
    for mass in runs[1:]:
        np.testing.assert_array_equal(mass, runs[0])


def test_kv_heads_without_groups_is_the_per_head_mass(rng):
    q, k, v = operands(rng, np.float32, 1, 3, 3, 5, 7)
    per_head = sdpa(q, k, v, return_key_mass=True)[1]
    np.testing.assert_array_equal(sdpa(q, k, v, return_key_mass="kv_heads")[1], per_head)
    two_d = sdpa(q[0, 0], k[0, 0], v[0, 0], return_key_mass="kv_heads")[1]
    np.testing.assert_array_equal(two_d, per_head[0, 0])


def test_h2o_example_runs_and_beats_a_window_of_the_same_budget(capsys):
    # examples/h2o_eviction.py: evicting by key mass keeps the output closer to attention
    # over the whole history than keeping the newest positions alone.
    import os
    import re
    import runpy
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "h2o_eviction.py")
    runpy.run_path(path, run_name="__main__")
    text = capsys.readouterr().out
    h2o, window = map(float, re.search(r"evicting: ([\d.]+) \(the \d+ newest positions "
                                       r"alone: ([\d.]+)\)", text).groups())
    assert h2o < window

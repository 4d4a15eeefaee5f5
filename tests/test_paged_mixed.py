"""Mixed batches over a paged cache: `paged_attention` with packed queries and
`cu_seqlens_q`, some sequences prefilling a chunk and others decoding one token in one
call. Each sequence's queries are its last tokens (bottom-right against its cached keys).

Checked against the float64 reference on each sequence's keys gathered from its pages in
the test, and against one padded paged call per sequence (bitwise: the same item computed
by the same kernel path, only scheduled in another order).
"""
import numpy as np
import pytest

import cattn
from cattn import _kernel
from conftest import reference64, tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)
from test_paged import gathered, make_pool, shuffled_table

pytestmark = pytest.mark.filterwarnings("error")

paged = cattn.paged_attention


def mixed_batch(rng, q_lens, seq_lens, Hq=4, Hkv=2, E=16, Ev=8, block_size=4,
                dtype=np.float32):
    """(q (Tq, Hq, E), k_cache, v_cache, block table, seq_lens, cu_seqlens_q)."""
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k_cache, v_cache = make_pool(rng, num_blocks, Hkv, block_size, E, Ev, dtype)
    table = shuffled_table(rng, seq_lens, block_size, num_blocks)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    q = rng.standard_normal((int(cu[-1]), Hq, E)).astype(dtype)
    return q, k_cache, v_cache, table, np.array(seq_lens), cu


def reference_mixed(q, k_cache, v_cache, table, seq_lens, cu, sinks=None, **options):
    """(out (Tq, Hq, Ev), lse (Hq, Tq)) in float64, sequence by sequence."""
    Tq, Hq, _ = q.shape
    out = np.zeros((Tq, Hq, v_cache.shape[-1]))
    lse = np.zeros((Hq, Tq))
    for b, n in enumerate(seq_lens):
        rows = slice(cu[b], cu[b + 1])
        if cu[b] == cu[b + 1]:
            continue
        keys, values = gathered(k_cache, table[b], n), gathered(v_cache, table[b], n)
        seq_sinks = None if sinks is None else np.broadcast_to(sinks, (len(seq_lens), Hq))[b]
        o, l = reference64(q[rows].transpose(1, 0, 2), keys, values, alignment="bottom_right",
                           sinks=seq_sinks, return_lse=True, **options)
        out[rows] = o.transpose(1, 0, 2)
        lse[:, rows] = l
    return out, lse


def per_sequence_calls(q, k_cache, v_cache, table, seq_lens, cu, **options):
    """One padded paged call per sequence (its queries as (1, Hq, L, E))."""
    outs, lses = [], []
    for b in range(len(seq_lens)):
        qb = q[cu[b]:cu[b + 1]].transpose(1, 0, 2)[None]
        sinks = options.get("sinks")
        seq_options = dict(options)
        if sinks is not None and np.ndim(sinks) == 2:
            seq_options["sinks"] = sinks[b]
        o, l = paged(qb, k_cache, v_cache, table[b:b + 1], seq_lens[b:b + 1],
                     return_lse=True, **seq_options)
        outs.append(o[0].transpose(1, 0, 2))
        lses.append(l[0])
    return np.concatenate(outs), np.concatenate(lses, axis=1)


# 8 sequences decoding one token, one prefilling a chunk of 7, one empty, one whose chunk
# is longer than its cache (its first queries see no key), one with no cached key.
Q_LENS = [1, 1, 1, 7, 1, 1, 0, 1, 1, 5, 1, 2]
SEQ_LENS = [13, 1, 30, 19, 4, 9, 6, 22, 2, 3, 7, 0]

OPTIONS = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, window=(3, None)),
    dict(window=(2, 1)),
    dict(is_causal=True, window=(2, 0), keep_first=2),
    dict(is_causal=True, softcap=3.0, scale=0.4),
    dict(is_causal=True, sinks=np.array([0.5, -1.0, 2.0, -np.inf])),
    dict(sinks="per sequence"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 2), (6, 2)])
def test_mixed_batch_equals_the_reference_and_per_sequence_calls(dtype, options, Hq, Hkv):
    """The bugs: a sequence's queries aligned top-left (prefill chunks see the wrong keys),
    another sequence's pages or query rows read, GQA heads mapped per token instead of per
    head, sinks taken per token, the lse written at the wrong (head, token)."""
    rng = np.random.default_rng(hash((Hq, Hkv)) % 2**32)
    q, kc, vc, table, seq_lens, cu = mixed_batch(rng, Q_LENS, SEQ_LENS, Hq, Hkv, dtype=dtype)
    options = dict(options)
    if options.get("sinks") is not None:
        options["sinks"] = (rng.standard_normal((len(SEQ_LENS), Hq))
                            if isinstance(options["sinks"], str) else options["sinks"][:Hq]
                            if len(options["sinks"]) >= Hq else
                            np.resize(options["sinks"], Hq))
    gqa = dict(enable_gqa=Hq != Hkv)
    out, lse = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, return_lse=True,
                     **options, **gqa)
    assert out.shape == (q.shape[0], Hq, vc.shape[-1]) and out.dtype == dtype
    assert lse.shape == (Hq, q.shape[0])
    want_out, want_lse = reference_mixed(q, kc, vc, table, seq_lens, cu, **options, **gqa)
    np.testing.assert_allclose(out, want_out, **tolerance(dtype))
    np.testing.assert_allclose(lse, want_lse, **tolerance(dtype))
    each_out, each_lse = per_sequence_calls(q, kc, vc, table, seq_lens, cu, **options, **gqa)
    np.testing.assert_array_equal(out, each_out)
    np.testing.assert_array_equal(lse, each_lse)


def test_decoding_heads_of_one_kv_head_are_one_task():
    """A decoding sequence's query heads that share a K/V head are rows of one task (its
    keys read once for the group), as in a padded call: 3 sequences x 2 K/V heads = 6
    tasks for 12 heads (the bug: every head its own task, the cache read once per head)."""
    from cattn._kernel import last_call_stats
    rng = np.random.default_rng(7)
    q, kc, vc, table, seq_lens, cu = mixed_batch(rng, [1, 1, 1], [50, 9, 30], Hq=4, Hkv=2)
    out = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, enable_gqa=True)
    assert last_call_stats()["n_tasks"] == 6
    want, _ = reference_mixed(q, kc, vc, table, seq_lens, cu, enable_gqa=True)
    np.testing.assert_allclose(out, want, **tolerance(np.float32))


@pytest.mark.parametrize("path", _kernel.testable_isa_paths())
def test_every_isa_path(path):
    rng = np.random.default_rng(3)
    q, kc, vc, table, seq_lens, cu = mixed_batch(rng, Q_LENS, SEQ_LENS, block_size=3)
    out = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, is_causal=True,
                enable_gqa=True, _isa=path)
    want, _ = reference_mixed(q, kc, vc, table, seq_lens, cu, is_causal=True,
                              enable_gqa=True)
    np.testing.assert_allclose(out, want, **tolerance(np.float32))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_and_block_sizes_do_not_change_the_result(threads):
    rng = np.random.default_rng(4)
    q, kc, vc, table, seq_lens, cu = mixed_batch(rng, [40, 1, 1, 3], [300, 90, 7, 3])
    want = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, is_causal=True,
                 enable_gqa=True, num_threads=1)
    got = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, is_causal=True,
                enable_gqa=True, num_threads=threads)
    np.testing.assert_array_equal(got, want)
    small = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, is_causal=True,
                  enable_gqa=True, _block_sizes=(3, 5))
    np.testing.assert_allclose(small, want, **tolerance(np.float32))


def test_half_pages_out_and_out_dtype():
    """float16 pages computed in float32; a preallocated strided out; a float16 result."""
    rng = np.random.default_rng(5)
    q, kc, vc, table, seq_lens, cu = mixed_batch(rng, Q_LENS, SEQ_LENS, dtype=np.float32)
    kc16, vc16 = kc.astype(np.float16), vc.astype(np.float16)
    want, _ = reference_mixed(q, kc16, vc16, table, seq_lens, cu, is_causal=True,
                              enable_gqa=True)
    got = paged(q, kc16, vc16, table, seq_lens, cu_seqlens_q=cu, is_causal=True,
                enable_gqa=True)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, **tolerance(np.float32))
    out = np.full((q.shape[0], 8, 4 * vc.shape[-1]), np.nan, dtype=np.float32)[:, ::2, ::4]
    result = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, is_causal=True,
                   enable_gqa=True, out=out)
    assert result is out
    want32, _ = reference_mixed(q, kc, vc, table, seq_lens, cu, is_causal=True,
                                enable_gqa=True)
    np.testing.assert_allclose(out, want32, **tolerance(np.float32))
    half = paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, is_causal=True,
                 enable_gqa=True, out_dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, want32, rtol=2e-3, atol=2e-3)


def test_bad_input_is_rejected_clearly():
    rng = np.random.default_rng(6)
    q, kc, vc, table, seq_lens, cu = mixed_batch(rng, [2, 1], [5, 3])
    with pytest.raises(ValueError, match="attn_mask and return_weights"):
        paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, enable_gqa=True,
              attn_mask=np.ones((1, 1), dtype=bool))
    with pytest.raises(ValueError, match="attn_mask and return_weights"):
        paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, enable_gqa=True,
              return_weights=True)
    with pytest.raises(ValueError, match=r"3 dimensions \(tokens, heads, E\)"):
        paged(q[None], kc, vc, table, seq_lens, cu_seqlens_q=cu, enable_gqa=True)
    with pytest.raises(ValueError, match="must end at the number of tokens"):
        paged(q, kc, vc, table, seq_lens, cu_seqlens_q=[0, 1, 2], enable_gqa=True)
    with pytest.raises(ValueError, match=r"block_table must have shape \(batch=3"):
        paged(q, kc, vc, table, seq_lens, cu_seqlens_q=[0, 1, 2, 3], enable_gqa=True)
    with pytest.raises(TypeError, match="cu_seqlens_q must be integers"):
        paged(q, kc, vc, table, seq_lens, cu_seqlens_q=np.array([0., 2., 3.]),
              enable_gqa=True)
    before = q.copy()
    paged(q, kc, vc, table, seq_lens, cu_seqlens_q=cu, enable_gqa=True)
    np.testing.assert_array_equal(q, before)

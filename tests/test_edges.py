"""Edge cases where a feature's easy case passes and its likeliest bug does not: several
key/value heads with groups > 1, chunk boundaries on the causal diagonal and the window's
edge, page-boundary truncation and copy-on-write out of blocks, bfloat16 values outside
float16's range, context managers left by an exception, several batches and several layers.

Every numerical check is against the float64 reference (`cattn.reference`) on float64 copies
of the same inputs. Only public names are used (`cattn.X`, `cattn.layers`, `cattn.models`).
"""
import numpy as np
import pytest

import cattn
from conftest import reference64, require_peer, tolerance


def packed(rng, lengths, heads, features, dtype=np.float32, scale=1.0):
    """(T, heads, features) of standard normals times scale, and the cu_seqlens."""
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    x = (rng.standard_normal((int(cu[-1]), heads, features)) * scale).astype(dtype)
    return x, cu


def varlen_reference(q, k, v, cu_q, cu_k, **options):
    """Each sequence through the reference as a (heads, length, features) batch item: out
    (Tq, Hq, Ev) and lse (Hq, Tq) in float64."""
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = (x[a:b].transpose(1, 0, 2) for x, a, b in
                      ((q, cu_q[s], cu_q[s + 1]), (k, cu_k[s], cu_k[s + 1]),
                       (v, cu_k[s], cu_k[s + 1])))
        o, lse = reference64(qs, ks, vs, return_lse=True, **options)
        outs.append(o.transpose(1, 0, 2))
        lses.append(lse)
    return np.concatenate(outs), np.concatenate(lses, axis=1)


def gathered(pool, table_row, n):
    """The first n positions that a block-table row lists in a pool of pages
    (num_blocks, Hkv, block_size, D), as one (Hkv, n, D) array."""
    pages = pool[np.asarray(table_row)[:-(-n // pool.shape[2])]]
    return pages.transpose(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])[:, :n]


# ------------------------------------------------------------- grouped-query varlen heads

@pytest.mark.parametrize("Hq, Hkv", [(6, 3), (8, 2), (4, 4)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_grouped_query_heads_with_several_kv_heads(rng, Hq, Hkv, is_causal):
    """Bug caught: query head h reading kv head h % Hkv (tiled) instead of h // group; it
    only shows with Hkv > 1 and group > 1."""
    lengths_q, lengths_k = [5, 1, 9, 3], [7, 4, 9, 3]
    q, cu_q = packed(rng, lengths_q, Hq, 16)
    k, cu_k = packed(rng, lengths_k, Hkv, 16)
    v, _ = packed(rng, lengths_k, Hkv, 8)
    got, got_lse = cattn.varlen_attention(q, k, v, cu_q, cu_k, enable_gqa=True,
                                          is_causal=is_causal, alignment="bottom_right",
                                          return_lse=True)
    want, want_lse = varlen_reference(q, k, v, cu_q, cu_k, enable_gqa=True,
                                      is_causal=is_causal, alignment="bottom_right")
    np.testing.assert_allclose(got, want, **tolerance(np.float32))
    np.testing.assert_allclose(got_lse, want_lse, **tolerance(np.float32))


# -------------------------------------------------------------- lse at every row's place

def test_lse_values_of_every_row_in_every_entry_point(rng):
    """Bug caught: lse written at the wrong offset (another row's place, or one past): a
    value check of every row, including each sequence's first and last, against the
    reference."""
    Hq, E = 3, 8
    q, cu_q = packed(rng, [4, 7, 2], Hq, E)
    k, cu_k = packed(rng, [6, 7, 5], Hq, E)
    v, _ = packed(rng, [6, 7, 5], Hq, E)
    _, lse = cattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
    _, want = varlen_reference(q, k, v, cu_q, cu_k)
    np.testing.assert_allclose(lse, want, **tolerance(np.float32))

    q4 = rng.standard_normal((2, Hq, 5, E)).astype(np.float32)
    k4 = rng.standard_normal((2, Hq, 11, E)).astype(np.float32)
    v4 = rng.standard_normal((2, Hq, 11, E)).astype(np.float32)
    for lengths in (None, np.array([[11, 3, 7], [0, 11, 5]])):
        _, lse = cattn.scaled_dot_product_attention(q4, k4, v4, return_lse=True,
                                                    key_lengths=lengths)
        _, want = reference64(q4, k4, v4, return_lse=True, key_lengths=lengths)
        np.testing.assert_allclose(lse, want, **tolerance(np.float32))

    k_pool = rng.standard_normal((7, Hq, 4, E)).astype(np.float32)
    v_pool = rng.standard_normal((7, Hq, 4, E)).astype(np.float32)
    table = np.array([[6, 2, 0], [1, 5, -1]], dtype=np.int32)
    seq_lens = np.array([11, 8])
    q2 = rng.standard_normal((2, Hq, 3, E)).astype(np.float32)
    _, lse = cattn.paged_attention(q2, k_pool, v_pool, table, seq_lens, return_lse=True,
                                   is_causal=True)
    for b in range(2):
        _, want = reference64(q2[b], gathered(k_pool, table[b], seq_lens[b]),
                              gathered(v_pool, table[b], seq_lens[b]), return_lse=True,
                              is_causal=True, alignment="bottom_right")
        np.testing.assert_allclose(lse[b], want, **tolerance(np.float32))


# ----------------------------------------------------------- Dask chunks on the diagonal

@pytest.mark.parametrize("q_chunks, k_chunks, options", [
    # the second key chunk starts exactly at the first query chunk's last row: the
    # diagonal key of that row is the chunk's first key
    ((4, 4, 4), (3, 5, 4), dict(is_causal=True)),
    ((4, 4, 4), (4, 4, 4), dict(is_causal=True)),
    ((5, 7), (4, 1, 7), dict(is_causal=True)),
    # window (2, 0): the first key chunk ends exactly at the left edge of row 4's window
    ((4, 4, 4), (3, 5, 4), dict(window=(2, 0))),
    ((4, 4, 4), (3, 5, 4), dict(window=(2, 1))),
    # right edge: rows 0..3 see up to key row + 2; the second chunk starts at 3 + 2 = 5
    ((4, 8), (5, 7), dict(window=(None, 2))),
    ((4, 8), (6, 6), dict(window=(1, 2))),
])
def test_dask_chunk_boundary_on_diagonal_and_window_edges(rng, q_chunks, k_chunks, options):
    """Bug caught: a (query chunk, key chunk) pair whose only visible key lies exactly on
    the diagonal or the window's edge judged invisible and skipped (an off-by-one in the
    pair test): that row then misses its key."""
    da = pytest.importorskip("dask.array")
    import cattn.dask
    L, S = sum(q_chunks), sum(k_chunks)
    q = rng.standard_normal((2, L, 8))
    k = rng.standard_normal((2, S, 8))
    v = rng.standard_normal((2, S, 8))
    out, lse = cattn.dask.scaled_dot_product_attention(
        da.from_array(q, chunks=(1, q_chunks, 8)), da.from_array(k, chunks=(1, k_chunks, 8)),
        da.from_array(v, chunks=(1, k_chunks, 8)), return_lse=True, **options)
    got, got_lse = out.compute(scheduler="synchronous"), lse.compute(scheduler="synchronous")
    want, want_lse = reference64(q, k, v, return_lse=True, **options)
    np.testing.assert_allclose(got, want, **tolerance(np.float64))
    np.testing.assert_allclose(got_lse, want_lse, **tolerance(np.float64))


# ------------------------------------------------------------------------ paged caches

def paged_state(cache):
    return (cache.block_table().tolist(), [cache.length(s) for s in cache.sequences],
            cache.num_free_blocks, cache.ref_counts.tolist(), cache.keys.copy(),
            cache.values.copy())


def assert_same_state(before, after):
    for a, b in zip(before, after):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


def held_keys(cache, seq, layer=0):
    """The keys and values sequence `seq` holds, gathered from its pages: (Hkv, n, D)."""
    n, row = cache.length(seq, layer), cache.block_table([seq])[0]
    return gathered(cache.keys[layer], row, n), gathered(cache.values[layer], row, n)


@pytest.mark.parametrize("length", [0, 4, 8])
def test_paged_truncate_to_a_page_boundary_and_to_zero(rng, length):
    """Bugs caught: truncation to a multiple of block_size keeping one page too many (or to
    0 keeping one): the pool leaks a page per truncation, and the next append writes into
    a page past the kept positions; keys after the truncation must be the kept ones then
    the new ones."""
    bs, Hkv, D = 4, 2, 8
    cache = cattn.PagedKVCache(num_blocks=6, block_size=bs, num_kv_heads=Hkv, head_dim=D)
    seq = cache.add_sequence()
    k = rng.standard_normal((1, Hkv, 11, D)).astype(np.float32)
    v = rng.standard_normal((1, Hkv, 11, D)).astype(np.float32)
    cache.layer(0).append(k, v)
    cache.truncate(seq, length)
    assert cache.length(seq) == length
    assert cache.block_table().shape[1] == length // bs
    assert cache.num_free_blocks == 6 - length // bs
    k2 = rng.standard_normal((1, Hkv, 3, D)).astype(np.float32)
    v2 = rng.standard_normal((1, Hkv, 3, D)).astype(np.float32)
    cache.layer(0).append(k2, v2)
    assert cache.num_free_blocks == 6 - (-(-(length + 3) // bs))
    want_k = np.concatenate([k[0, :, :length], k2[0]], axis=1)
    want_v = np.concatenate([v[0, :, :length], v2[0]], axis=1)
    got_k, got_v = held_keys(cache, seq)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    # and attention over the pages sees exactly those keys
    q = rng.standard_normal((1, Hkv, 1, D)).astype(np.float32)
    got = cattn.paged_attention(q, cache.keys[0], cache.values[0], cache.block_table(),
                                cache.layer(0).seq_lens())
    want = reference64(q, want_k[None], want_v[None])
    np.testing.assert_allclose(got, want, **tolerance(np.float32))
    cache.free(seq)
    assert cache.num_free_blocks == 6


def test_paged_copy_on_write_out_of_blocks_changes_nothing(rng):
    """Bug caught: an append that needs a private copy of a shared page (a fork truncated
    into it) counts only the new pages: with the pool exhausted it fails half-way (pages
    taken, lengths grown) or with a bare IndexError, instead of a ValueError that changes
    nothing."""
    bs, Hkv, D = 4, 1, 4
    cache = cattn.PagedKVCache(num_blocks=3, block_size=bs, num_kv_heads=Hkv, head_dim=D)
    a = cache.add_sequence()
    cache.layer(0).append(*(rng.standard_normal((1, Hkv, 8, D)).astype(np.float32),) * 2)
    b = cache.fork(a)                       # pages 0 and 1 shared, one free page left
    cache.truncate(b, 6)                    # b's next position lies in shared page 1
    before = paged_state(cache)
    new = rng.standard_normal((2, Hkv, 1, D)).astype(np.float32)
    # a needs a new page and b a copy of page 1: two pages, one is free
    with pytest.raises(ValueError, match="out of blocks"):
        cache.layer(0).append(new, new)
    assert_same_state(before, paged_state(cache))
    # one sequence at a time fits: b's copy, and a's page after b is freed
    cache.layer(0).append(new, new, num_new=np.array([0, 1]))
    assert cache.num_free_blocks == 0
    np.testing.assert_array_equal(held_keys(cache, b)[0][:, 6], new[1, :, 0])
    np.testing.assert_array_equal(held_keys(cache, a)[0][:, :6], held_keys(cache, b)[0][:, :6])
    cache.free(b)
    cache.layer(0).append(new[:1], new[:1])
    assert cache.length(a) == 9


def test_paged_cache_for_layer_holds_its_sequences_at_max_len(rng):
    """Bug caught: for_layer rounding max_len / block_size down, so that batch_size
    sequences of max_len positions run out of pages before max_len."""
    mha = cattn.MultiHeadAttention(16, 2, rng=0)
    for max_len, block_size in ((10, 4), (8, 4), (1, 16)):
        cache = cattn.PagedKVCache.for_layer(mha, batch_size=3, max_len=max_len,
                                             block_size=block_size)
        x = rng.standard_normal((3, max_len, 16)).astype(np.float32)
        mha(x, cache=cache, is_causal=True)
        assert cache.layer(0).seq_lens().tolist() == [max_len] * 3
        assert cache.num_free_blocks == 0  # and no more pages than that


def test_paged_fork_and_truncate_with_several_layers(rng):
    """Bugs caught: a fork sharing its source's length array (appending to one grows the
    other), truncation shortening layer 0 only. Every layer's keys are checked after the
    fork, the appends and the truncation."""
    bs, Hkv, D = 4, 2, 4
    cache = cattn.PagedKVCache(num_blocks=12, block_size=bs, num_kv_heads=Hkv, head_dim=D,
                               num_layers=2)
    a = cache.add_sequence()
    first = [rng.standard_normal((1, Hkv, 6, D)).astype(np.float32) for _ in range(2)]
    for layer in range(2):
        cache.layer(layer).append(first[layer], first[layer])
    b = cache.fork(a)
    more = [rng.standard_normal((2, Hkv, 2, D)).astype(np.float32) for _ in range(2)]
    for layer in range(2):
        cache.layer(layer).append(more[layer], more[layer], num_new=np.array([0, 2]))
    for layer in range(2):
        assert cache.length(a, layer) == 6 and cache.length(b, layer) == 8
        np.testing.assert_array_equal(held_keys(cache, a, layer)[0], first[layer][0])
        np.testing.assert_array_equal(
            held_keys(cache, b, layer)[0],
            np.concatenate([first[layer][0], more[layer][1]], axis=1))
    cache.truncate(b, 4)
    assert [cache.length(b, layer) for layer in range(2)] == [4, 4]
    for layer in range(2):
        cache.layer(layer).append(more[layer], more[layer])
        np.testing.assert_array_equal(
            held_keys(cache, b, layer)[0],
            np.concatenate([first[layer][0, :, :4], more[layer][1]], axis=1))
        np.testing.assert_array_equal(
            held_keys(cache, a, layer)[0],
            np.concatenate([first[layer][0], more[layer][0]], axis=1))


def test_paged_truncate_between_layers_stays_within_the_shortest(rng):
    """Bug caught: truncate checking the length against the longest layer, not the
    shortest: mid-step (layer 0 appended, layer 1 not yet) a truncation past layer 1's
    length gives that layer positions it never wrote. It must be refused, changing
    nothing; a length every layer holds is taken by all."""
    bs, Hkv, D = 4, 1, 4
    cache = cattn.PagedKVCache(num_blocks=8, block_size=bs, num_kv_heads=Hkv, head_dim=D,
                               num_layers=2)
    seq = cache.add_sequence()
    keys = rng.standard_normal((1, Hkv, 6, D)).astype(np.float32)
    cache.layer(0).append(keys, keys)
    cache.layer(1).append(keys[:, :, :4], keys[:, :, :4])
    before = paged_state(cache)
    with pytest.raises(ValueError, match="at most the 4 positions"):
        cache.truncate(seq, 5)
    assert_same_state(before, paged_state(cache))
    cache.truncate(seq, 3)
    assert [cache.length(seq, layer) for layer in range(2)] == [3, 3]
    for layer in range(2):
        np.testing.assert_array_equal(held_keys(cache, seq, layer)[0], keys[0, :, :3])


# --------------------------------------------------- bfloat16 beyond float16's range

def bf16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


# Powers of two: bfloat16 holds q * m, k / m and v * m exactly when it holds q, k and v, and
# the float32 computation on them is the one at m = 1 scaled by m (exact), so the results
# must be m times those at m = 1, bit for bit. 2^20 ~ 1e6 and 2^100 ~ 1e30 overflow float16
# (65504); 2^-20 ~ 1e-6 times unit values falls below float16's normal range.
MAGNITUDES = [2.0 ** 20, 2.0 ** -20, 2.0 ** 100]
# Every instruction-set path this CPU runs (the others are tested where they run).
ISA_PATHS = cattn.show_config()["isa_supported"]


def assert_scales_exactly(run, magnitude, reference):
    """run(m) at m = magnitude is magnitude * run(1), and run(1) matches the reference
    within bfloat16's rounding (of the inputs, of P in bfloat16 P·V products, of the
    output)."""
    unit = np.asarray(run(1.0), dtype=np.float64)
    scaled = np.asarray(run(magnitude), dtype=np.float64)
    assert np.all(np.isfinite(scaled))
    np.testing.assert_array_equal(scaled, unit * magnitude)
    np.testing.assert_allclose(unit, reference, rtol=0, atol=5e-2)


@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("L", [1, 33])
def test_bfloat16_beyond_float16_range_in_scaled_dot_product_attention(rng, magnitude, L, isa):
    """Bug caught: bfloat16 queries (or outputs) passed through float16 on the way to or
    from float32: inf beyond 65504, zeros or subnormals near 1e-6 times unit values; in the
    decode (L = 1, keys split) and the tiled path, bfloat16 and float32 outputs."""
    dtype = bf16()
    q, k, v = (rng.standard_normal(shape).astype(dtype)
               for shape in ((2, 2, L, 16), (2, 2, 300, 16), (2, 2, 300, 8)))
    options = dict(is_causal=L > 1, alignment="bottom_right")
    want = reference64(q, k, v, **options)
    for out_dtype in (None, np.float32):
        def run(m):
            got = cattn.scaled_dot_product_attention(
                (q * m).astype(dtype), (k / m).astype(dtype), (v * m).astype(dtype),
                out_dtype=out_dtype, _isa=isa, **options)
            assert got.dtype == (dtype if out_dtype is None else out_dtype)
            return got
        assert_scales_exactly(run, magnitude, want)


@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_bfloat16_beyond_float16_range_in_varlen_and_paged(rng, magnitude, isa):
    """The same bug in the packed and the paged entry points."""
    dtype = bf16()
    q, cu_q = packed(rng, [3, 1, 5], 2, 16, dtype)
    k, cu_k = packed(rng, [4, 6, 5], 2, 16, dtype)
    v, _ = packed(rng, [4, 6, 5], 2, 8, dtype)
    want, _ = varlen_reference(q, k, v, cu_q, cu_k)
    assert_scales_exactly(
        lambda m: cattn.varlen_attention((q * m).astype(dtype), (k / m).astype(dtype),
                                         (v * m).astype(dtype), cu_q, cu_k, _isa=isa),
        magnitude, want)

    bs = 4
    k_pool = rng.standard_normal((5, 2, bs, 16)).astype(dtype)
    v_pool = rng.standard_normal((5, 2, bs, 8)).astype(dtype)
    table = np.array([[3, 1, 4], [0, 2, -1]], dtype=np.int32)
    seq_lens = np.array([10, 5])
    q = rng.standard_normal((2, 2, 1, 16)).astype(dtype)
    want = []
    for b in range(2):
        want.append(reference64(q[b], gathered(k_pool, table[b], seq_lens[b]),
                                gathered(v_pool, table[b], seq_lens[b])))
    assert_scales_exactly(
        lambda m: cattn.paged_attention((q * m).astype(dtype), (k_pool / m).astype(dtype),
                                        (v_pool * m).astype(dtype), table, seq_lens,
                                        _isa=isa),
        magnitude, np.stack(want))


# ------------------------------------------------------------------ the thread setting

def test_threads_block_left_by_an_exception_restores_the_setting():
    """Bug caught: `with cattn.threads(n)` restoring the previous count only on a normal
    exit: an exception inside leaves every later call of the thread at n."""
    before = cattn.get_num_threads()
    outer = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="inside"):
        with cattn.threads(outer):
            assert cattn.get_num_threads() == outer
            raise RuntimeError("raised inside the block")
    assert cattn.get_num_threads() == before
    # nested: the inner block's exception restores the outer count, not the default
    with cattn.threads(outer):
        with pytest.raises(KeyboardInterrupt):
            with cattn.threads(3):
                raise KeyboardInterrupt
        assert cattn.get_num_threads() == outer
    assert cattn.get_num_threads() == before


def test_threads_bad_count_leaves_the_setting_alone():
    before = cattn.get_num_threads()
    with pytest.raises(ValueError):
        with cattn.threads(0):
            pass
    with pytest.raises(TypeError):
        with cattn.threads(1.5):
            pass
    assert cattn.get_num_threads() == before


# --------------------------------------------------------------- int8 caches, layers

def test_int8_cache_with_several_layers_keeps_each_layers_scales(rng):
    """Bug caught: every layer's view reading (or writing) the first layer's scales: keys
    of layers 1 and 2 decoded with layer 0's scales. Attention over each layer against the
    reference on what that layer was given."""
    layers, B, Hkv, D = 3, 2, 2, 8
    cache = cattn.KVCache(batch_size=B, max_len=16, num_kv_heads=Hkv, head_dim=D,
                          num_layers=layers, dtype=np.int8)
    given = []
    for i in range(layers):
        magnitude = 10.0 ** i  # layers of different scales: a shared scale shows
        k = (rng.standard_normal((B, Hkv, 5, D)) * magnitude).astype(np.float32)
        v = (rng.standard_normal((B, Hkv, 5, D)) * magnitude).astype(np.float32)
        cache.layer(i).append(k[:, :, :3], v[:, :, :3])
        cache.layer(i).append(k[:, :, 3:], v[:, :, 3:])
        given.append((k, v, magnitude))
    q = rng.standard_normal((B, 2 * Hkv, 1, D)).astype(np.float32)
    for i, (k, v, magnitude) in enumerate(given):
        layer = cache.layer(i)
        assert layer.lengths.tolist() == [5, 5]
        decoded_k = layer.keys[:, :, :5] * layer.key_scales[:, :, :5, None]
        decoded_v = layer.values[:, :, :5] * layer.value_scales[:, :, :5, None]
        step = np.abs(k).max(axis=-1, keepdims=True) / 127
        assert np.all(np.abs(decoded_k - k) <= step * 0.51)
        step = np.abs(v).max(axis=-1, keepdims=True) / 127
        assert np.all(np.abs(decoded_v - v) <= step * 0.51)
        got = cattn.scaled_dot_product_attention(
            q, layer.keys[:, :, :5], layer.values[:, :, :5], enable_gqa=True,
            k_scale=layer.key_scales[:, :, :5], v_scale=layer.value_scales[:, :, :5])
        want = reference64(q, decoded_k, decoded_v, enable_gqa=True)
        np.testing.assert_allclose(got / magnitude, want / magnitude, rtol=1e-4, atol=1e-4)


def test_int8_cache_layer_of_a_multilayer_cache_serves_a_layer(rng):
    """A stack of layers decoding through one int8 cache: each layer's output follows from
    the keys it appended (its own scales), within int8's rounding of the float32 cache."""
    mhas = [cattn.MultiHeadAttention(16, 4, num_kv_heads=2, rng=i) for i in range(3)]
    x = rng.standard_normal((1, 6, 16)).astype(np.float32)
    exact = cattn.KVCache.for_layer(mhas[0], 1, 8, num_layers=3)
    narrow = cattn.KVCache.for_layer(mhas[0], 1, 8, num_layers=3, dtype=np.int8)
    for i, mha in enumerate(mhas):
        want = mha(x * (i + 1), cache=exact.layer(i), is_causal=True)[0]
        got = mha(x * (i + 1), cache=narrow.layer(i), is_causal=True)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())


# ------------------------------------------------------------------ the layer's masks

def test_layer_padding_and_attention_masks_both_hide_keys(rng):
    """Bug caught: a boolean key_padding_mask and a boolean attn_mask combined so that a key
    is hidden only when both hide it (& instead of |). A left padding (not turned into key
    lengths) and a random mask, against the reference on the layer's own projections."""
    B, L, E, H = 3, 7, 16, 4
    mha = cattn.MultiHeadAttention(E, H, rng=1)
    mha.in_proj_bias[:] = rng.standard_normal(3 * E)
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    padding = np.zeros((B, L), bool)
    padding[1, :2] = padding[2, :4] = True                 # left padding: True = ignore
    hidden = rng.random((L, L)) < 0.4                        # True = ignore, as PyTorch
    hidden[:, -1] = False                                    # every row keeps a key
    got, _ = mha(x, key_padding_mask=padding, attn_mask=hidden)
    qkv = x.astype(np.float64) @ mha.in_proj_weight.T.astype(np.float64) + mha.in_proj_bias
    q, k, v = (qkv[..., i * E:(i + 1) * E].reshape(B, L, H, E // H).transpose(0, 2, 1, 3)
               for i in range(3))
    attend = ~(padding[:, None, None, :] | hidden)
    context = reference64(q, k, v, attn_mask=attend).transpose(0, 2, 1, 3).reshape(B, L, E)
    want = context @ mha.out_proj_weight.T.astype(np.float64) + mha.out_proj_bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the sentence encoder

def tiny_encoder(normalize=False, max_seq_length=None, pooling="mean"):
    from cattn.models import SentenceEncoder
    from cattn.models.bert import BertConfig, BertEncoder
    from cattn.models.minilm import WordTokenizer
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    encoder = BertEncoder.random(config, rng=3, dtype=np.float64)
    return SentenceEncoder(encoder, WordTokenizer(config.vocab_size), pooling=pooling,
                           normalize=normalize, max_seq_length=max_seq_length)


SENTENCES = ["a short one", "the second sentence is a good deal longer than the first",
             "three words here", "x", "and a fifth, to make three batches of two",
             "the sixth and last sentence of the list"]


def test_normalize_embeddings_over_several_batches():
    """Bug caught: normalize_embeddings applied to one batch's rows (the last, or the
    first) when the sentences take several batches."""
    model = tiny_encoder()
    raw = model.encode(SENTENCES, batch_size=2)
    unit = model.encode(SENTENCES, batch_size=2, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-12)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               rtol=1e-12, atol=1e-14)
    # and the batch size changes nothing
    np.testing.assert_allclose(model.encode(SENTENCES, batch_size=4, normalize_embeddings=True),
                               unit, rtol=1e-10, atol=1e-12)


def test_public_pooling_helpers_match_encode():
    """Bugs caught: mean_pooling dividing by the padded length (not the real tokens), or
    l2_normalize leaving rows unnormalized: the public helpers on the encoder's padded
    hidden states give encode's embeddings."""
    from cattn.models.minilm import l2_normalize, mean_pooling
    model = tiny_encoder(normalize=True)
    ids, mask, _ = model.tokenize(SENTENCES)
    assert mask.min() == 0  # some padding, or the helper's bug cannot show
    hidden = model.encoder(ids, mask)
    pooled = mean_pooling(hidden, mask)
    by_hand = np.stack([hidden[b, mask[b] == 1].mean(axis=0) for b in range(len(SENTENCES))])
    np.testing.assert_allclose(pooled, by_hand, rtol=1e-12)
    np.testing.assert_allclose(l2_normalize(pooled), model.encode(SENTENCES, batch_size=2),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("given", [("mean", "cls"), ("max", "mean", "cls")])
def test_several_poolings_concatenate_in_sentence_transformers_order(given):
    """Bug caught: pooling modes concatenated in the order given instead of
    sentence-transformers' fixed order (cls, max, mean, mean_sqrt_len_tokens): a model
    folder's embedding would come out permuted."""
    from cattn.models.minilm import mean_pooling
    model = tiny_encoder(pooling=given)
    ids, mask, _ = model.tokenize(SENTENCES)
    hidden = model.encoder(ids, mask)
    parts = {"cls": hidden[:, 0], "mean": mean_pooling(hidden, mask),
             "max": np.where(mask[..., None] == 1, hidden, -np.inf).max(axis=1)}
    want = np.concatenate([parts[m] for m in ("cls", "max", "mean") if m in given], axis=1)
    np.testing.assert_allclose(model.encode(SENTENCES, batch_size=4), want, rtol=1e-9,
                               atol=1e-12)


def test_truncation_by_the_model_when_the_tokenizer_does_not_truncate():
    """Bug caught: max_seq_length applied only through the tokenizer's own truncation: a
    tokenizer that truncates nothing (the stand-in WordTokenizer) passes long sentences
    whole. The embedding must be that of the first max_seq_length tokens."""
    from cattn.models.minilm import mean_pooling
    model = tiny_encoder(max_seq_length=6)
    long = "one two three four five six seven eight nine ten eleven twelve"
    full_ids = model.tokenizer.encode_batch([long])[0].ids
    assert len(full_ids) > 6
    ids, mask, _ = model.tokenize([long])
    assert ids.shape == (1, 6) and ids[0].tolist() == full_ids[:6]
    hidden = model.encoder(ids, mask)
    np.testing.assert_allclose(model.encode([long]), mean_pooling(hidden, mask), rtol=1e-9,
                               atol=1e-12)


def test_do_lower_case_with_a_tokenizer_that_keeps_case():
    """Bug caught: do_lower_case (sentence_bert_config.json's) ignored, which only shows
    with a tokenizer that keeps case (BERT's own lower-cases, hiding it): "The Dog" must
    then be embedded as "the dog" is, and not as a case-keeping model embeds it."""
    tokenizers = require_peer("tokenizers")
    from cattn.models import SentenceEncoder
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "The", "dog", "Dog", "ran", "RAN"]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    encoder = tiny_encoder().encoder
    lowering, keeping = (SentenceEncoder(encoder, tokenizer, do_lower_case=lower)
                         for lower in (True, False))
    mixed, lower = ["The Dog RAN", "the Dog"], ["the dog ran", "the dog"]
    assert lowering.tokenize(mixed)[2][0] == ["[CLS]", "the", "dog", "ran", "[SEP]"]
    np.testing.assert_array_equal(lowering.encode(mixed), keeping.encode(lower))
    assert not np.allclose(keeping.encode(mixed), keeping.encode(lower))


def test_token_type_ids_of_sentence_pairs_match_transformers(tmp_path):
    """Bug caught: token_type_ids ignored (every token typed 0) or indexing the wrong
    table: sentence pairs (types 0 then 1, padded) against transformers' BertModel with
    the same weights."""
    torch = require_peer("torch")
    transformers = require_peer("transformers")
    from cattn.models.bert import BertConfig, BertEncoder
    from cattn.models import SentenceEncoder  # noqa: F401  (the public package loads)
    config = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=32, type_vocab_size=2)
    torch.manual_seed(5)
    model = transformers.BertModel(transformers.BertConfig(**config), add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    weights = {name: p.detach().numpy().astype(np.float64)
               for name, p in model.state_dict().items()}
    ours = BertEncoder(BertConfig.from_dict(config), weights, np.float64)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 50, (3, 9))
    mask = np.ones((3, 9), dtype=np.int64)
    mask[1, 7:] = 0
    mask[2, 5:] = 0
    types = np.zeros((3, 9), dtype=np.int64)
    types[0, 4:], types[1, 3:7], types[2, 2:5] = 1, 1, 1   # the second sentence of a pair
    got = ours(ids, mask, types)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     token_type_ids=torch.from_numpy(types)).last_hidden_state.double().numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
    # the types matter here (or the comparison could not tell them apart)
    assert not np.allclose(ours(ids, mask)[real], want[real], atol=1e-3)

"""Paged keys and values: `paged_attention` over a pool of pages through a block table, and
`PagedKVCache` (free list, fork with copy-on-write, free) behind MultiHeadAttention.

Every result is checked against the float64 reference run on each sequence's keys gathered
from its pages here, in the test (the kernel itself never gathers): pages in shuffled
order, pages shared between sequences, lengths that are not multiples of the page size,
page sizes 1, 3, 16 and 256 against key blocks of other sizes, every instruction-set path,
1-3 threads and the key-split path of long decodes.
"""
import tracemalloc

import numpy as np
import pytest

import cattn
from cattn import _kernel
from conftest import last_call_stats, reference64, tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)
from test_isa_paths import ALL_PATHS

pytestmark = pytest.mark.filterwarnings("error")

DTYPES = (np.float32, np.float64)
BLOCK_SIZES = (1, 3, 16, 256)


def make_pool(rng, num_blocks, Hkv, block_size, E, Ev, dtype):
    k_cache = rng.standard_normal((num_blocks, Hkv, block_size, E)).astype(dtype)
    v_cache = rng.standard_normal((num_blocks, Hkv, block_size, Ev)).astype(dtype)
    return k_cache, v_cache


def shuffled_table(rng, seq_lens, block_size, num_blocks, share_prefix=0):
    """A block table whose pages come in random order from the pool; with share_prefix,
    every sequence starts with sequence 0's first share_prefix pages (shared, not copied).
    Unused entries are -1."""
    pages_needed = [-(-int(n) // block_size) for n in seq_lens]
    width = max(pages_needed + [1])
    free = list(rng.permutation(num_blocks))
    table = np.full((len(seq_lens), width), -1, dtype=np.int32)
    for b, n in enumerate(pages_needed):
        for j in range(n):
            table[b, j] = table[0, j] if (b and j < share_prefix) else free.pop()
    return table


def gathered(cache, table_row, n):
    """(H, n, D): the first n rows a sequence's pages hold, in order."""
    block_size = cache.shape[2]
    positions = np.arange(n)
    return cache[table_row[positions // block_size], :, positions % block_size].transpose(
        1, 0, 2)


def reference_paged(q, k_cache, v_cache, table, seq_lens, attn_mask=None, **options):
    """The float64 reference, sequence by sequence, on keys gathered from the pages; the
    weights padded with zeros to the block table's capacity."""
    S = table.shape[1] * k_cache.shape[2]
    outs, lses, weights = [], [], []
    for b, n in enumerate(seq_lens):
        mask = None if attn_mask is None else np.broadcast_to(
            attn_mask, q.shape[:3] + (S,))[b, ..., :n]
        got = reference64(q[b], gathered(k_cache, table[b], n), gathered(v_cache, table[b], n),
                          mask, alignment="bottom_right", **options)
        got = got if isinstance(got, tuple) else (got,)
        outs.append(got[0])
        if options.get("return_weights"):
            w = np.zeros(got[1].shape[:-1] + (S,))
            w[..., :n] = got[1]
            weights.append(w)
        if options.get("return_lse"):
            lses.append(got[-1])
    result = [np.stack(outs)]
    if weights:
        result.append(np.stack(weights))
    if lses:
        result.append(np.stack(lses))
    return tuple(result) if len(result) > 1 else result[0]


def check(q, k_cache, v_cache, table, seq_lens, attn_mask=None, **options):
    """paged_attention against the reference (every result), inputs left untouched."""
    before = [x.copy() for x in (q, k_cache, v_cache, table, seq_lens)]
    got = cattn.paged_attention(q, k_cache, v_cache, table, seq_lens, attn_mask=attn_mask,
                                **options)
    for x, y in zip(before, (q, k_cache, v_cache, table, seq_lens)):
        np.testing.assert_array_equal(x, y)
    ref_options = {k: v for k, v in options.items()
                   if k not in ("num_threads", "_isa", "_block_sizes", "out")}
    want = reference_paged(q, k_cache, v_cache, table, seq_lens, attn_mask, **ref_options)
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    assert len(got_t) == len(want_t)
    for g, w in zip(got_t, want_t):
        assert g.dtype == q.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, **tolerance(q.dtype))
    return got


VARIANTS = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"window": (5, 0)},
    "window-both-sides": {"window": (7, 2), "softcap": 3.0, "scale": 0.3},
    "gqa-lse": {"enable_gqa": True, "is_causal": True, "return_lse": True},
    "weights": {"return_weights": True, "return_lse": True, "is_causal": True},
    "bool-mask": {"mask": "bool"},
    "float-mask": {"mask": "float", "is_causal": True},
    "sinks-keep-first": {"sinks": "per-head", "keep_first": 3, "window": (4, 0),
                         "is_causal": True, "return_lse": True},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(rng, variant, block_size, dtype):
    options = dict(VARIANTS[variant])
    Hq, Hkv = (4, 2) if options.get("enable_gqa") else (3, 3)
    L, E, Ev = 5, 17, 9
    seq_lens = np.array([7, 1, 40, 0, 33]) if block_size < 16 else np.array([300, 5, 515, 256])
    num_blocks = int(sum(-(-n // block_size) for n in seq_lens)) + 3
    k_cache, v_cache = make_pool(rng, num_blocks, Hkv, block_size, E, Ev, dtype)
    table = shuffled_table(rng, seq_lens, block_size, num_blocks)
    q = rng.standard_normal((len(seq_lens), Hq, L, E)).astype(dtype)
    S = table.shape[1] * block_size
    if options.get("sinks") == "per-head":
        options["sinks"] = np.linspace(-1.0, 2.0, Hq)
    mask = options.pop("mask", None)
    if mask == "bool":
        mask = rng.random((len(seq_lens), 1, L, S)) < 0.7
    elif mask == "float":
        mask = rng.standard_normal((L, S)).astype(dtype)
    check(q, k_cache, v_cache, table, seq_lens, mask, **options)


@pytest.mark.parametrize("block_size", (3, 16))
def test_shared_pages(rng, block_size):
    """Sequences whose first pages are the same pages of the pool (a forked prompt)."""
    seq_lens = np.array([50, 61, 49, 70])
    num_blocks = 4 * (-(-70 // block_size)) + 2
    k_cache, v_cache = make_pool(rng, num_blocks, 2, block_size, 16, 16, np.float32)
    table = shuffled_table(rng, seq_lens, block_size, num_blocks, share_prefix=45 // block_size)
    assert (table[1:, 0] == table[0, 0]).all()
    q = rng.standard_normal((4, 2, 3, 16)).astype(np.float32)
    check(q, k_cache, v_cache, table, seq_lens, is_causal=True, return_lse=True)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("block_size,L", [(1, 1), (3, 20), (16, 2), (16, 37), (48, 13)])
def test_instruction_set_paths(rng, path, block_size, L):
    """Decoding rows stream K and V page by page; more rows pack each page's keys (pages of
    fewer keys than a panel, of more, and across key blocks)."""
    seq_lens = np.array([100, 37])
    num_blocks = 2 * (-(-100 // block_size)) + 1
    for dtype in DTYPES:
        k_cache, v_cache = make_pool(rng, num_blocks, 2, block_size, 33, 20, dtype)
        table = shuffled_table(rng, seq_lens, block_size, num_blocks)
        q = rng.standard_normal((2, 2, L, 33)).astype(dtype)
        check(q, k_cache, v_cache, table, seq_lens, is_causal=True, return_lse=True,
              _isa=path)
        check(q, k_cache, v_cache, table, seq_lens, window=(9, 0), return_weights=True,
              _isa=path, _block_sizes=(8, 40))
        assert last_call_stats()["isa"] == path


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("block_k", (1, 7, 64, 256))
def test_key_blocks_independent_of_page_size(rng, block_size, block_k):
    """Key blocks that start and end inside pages, span many pages, or are one key."""
    seq_lens = np.array([70, 129])
    num_blocks = 2 * (-(-129 // block_size)) + 1
    k_cache, v_cache = make_pool(rng, num_blocks, 1, block_size, 8, 8, np.float32)
    table = shuffled_table(rng, seq_lens, block_size, num_blocks)
    q = rng.standard_normal((2, 1, 6, 8)).astype(np.float32)
    check(q, k_cache, v_cache, table, seq_lens, is_causal=True, _block_sizes=(4, block_k))
    assert last_call_stats()["block_k"] == block_k


@pytest.mark.parametrize("block_size", (16, 256))
def test_long_decode_splits_keys_and_threads_agree(rng, block_size):
    """A decode against thousands of keys runs as chunks of keys merged by lse; 1, 2 and 3
    threads give the same bits."""
    seq_lens = np.array([6001, 1200])
    num_blocks = 2 * (-(-6001 // block_size))
    k_cache, v_cache = make_pool(rng, num_blocks, 2, block_size, 64, 64, np.float32)
    table = shuffled_table(rng, seq_lens, block_size, num_blocks)
    q = rng.standard_normal((2, 4, 1, 64)).astype(np.float32)
    runs = []
    for threads in (1, 2, 3):
        runs.append(check(q, k_cache, v_cache, table, seq_lens, enable_gqa=True,
                          return_lse=True, num_threads=threads))
        assert last_call_stats()["n_splits"] > 1
    for out, lse in runs[1:]:
        np.testing.assert_array_equal(out, runs[0][0])
        np.testing.assert_array_equal(lse, runs[0][1])


def test_equals_contiguous_attention(rng):
    """The same keys stored contiguously or as shuffled pages give the same result."""
    B, H, S, E, bs = 2, 3, 200, 32, 16
    k = rng.standard_normal((B, H, S, E)).astype(np.float32)
    v = rng.standard_normal((B, H, S, E)).astype(np.float32)
    nb = B * (S // bs + 1)
    perm = rng.permutation(nb)[:B * (-(-S // bs))].reshape(B, -1).astype(np.int32)
    k_cache, v_cache = np.zeros((nb, H, bs, E), np.float32), np.zeros((nb, H, bs, E), np.float32)
    for b in range(B):
        for j in range(S):
            k_cache[perm[b, j // bs], :, j % bs] = k[b, :, j]
            v_cache[perm[b, j // bs], :, j % bs] = v[b, :, j]
    lengths = np.array([200, 131])
    q = rng.standard_normal((B, H, 4, E)).astype(np.float32)
    got = cattn.paged_attention(q, k_cache, v_cache, perm, lengths, is_causal=True)
    want = cattn.scaled_dot_product_attention(q, k, v, is_causal=True, key_lengths=lengths,
                                              alignment="bottom_right")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_cache_read_in_place_never_gathered(rng):
    """The pool is read where it lies: strided page views (rows of a wider array) work, and
    the call allocates far less than one sequence's keys."""
    wide = rng.standard_normal((64, 2, 16, 256)).astype(np.float32)
    k_cache, v_cache = wide[..., :64], wide[..., 128:192]      # row stride 256, not 64
    seq_lens = np.array([1000])
    table = rng.permutation(64)[None].astype(np.int32)
    q = rng.standard_normal((1, 2, 1, 64)).astype(np.float32)
    check(q, k_cache, v_cache, table, seq_lens)
    tracemalloc.start()
    try:
        cattn.paged_attention(q, k_cache, v_cache, table, seq_lens, num_threads=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_sequence = 2 * 1000 * 64 * 4   # one head's keys of the sequence, contiguous
    assert peak < one_sequence, peak


def test_out_and_empty_cases(rng):
    k_cache, v_cache = make_pool(rng, 4, 1, 4, 8, 8, np.float32)
    table = np.array([[2, 0], [1, -1]], dtype=np.int32)
    q = rng.standard_normal((2, 1, 3, 8)).astype(np.float32)
    out = np.full((2, 1, 3, 8), np.nan, np.float32)
    got = cattn.paged_attention(q, k_cache, v_cache, table, np.array([6, 0]), out=out,
                                is_causal=True)
    assert got is out
    np.testing.assert_array_equal(out[1], 0)   # a sequence without keys: 0, never NaN
    check(q, k_cache, v_cache, table, np.array([6, 0]), is_causal=True)
    empty = cattn.paged_attention(q[:0], k_cache, v_cache, table[:0], np.zeros(0, int))
    assert empty.shape == (0, 1, 3, 8)


# ------------------------------------------------------------------------- bad input

def bad_input_cases():
    rng = np.random.default_rng(1)
    k, v = make_pool(rng, 6, 2, 4, 8, 8, np.float32)
    q = rng.standard_normal((2, 2, 1, 8)).astype(np.float32)
    table = np.array([[0, 1, 2], [3, 4, -1]], dtype=np.int32)
    lens = np.array([10, 8])
    return [
        ("page-out-of-range", (q, k, v, np.array([[0, 1, 6], [3, 4, -1]], np.int32), lens),
         {}, ValueError, r"block_table\[0, 2\] = 6 is out of range"),
        ("negative-page", (q, k, v, np.array([[0, 1, 2], [-1, 4, 5]], np.int32), lens), {},
         ValueError, r"block_table\[1, 0\] = -1"),
        ("too-long", (q, k, v, table, np.array([13, 8])), {}, ValueError,
         r"seq_lens must lie in \[0, max_blocks \* block_size\] = \[0, 12\]"),
        ("negative-length", (q, k, v, table, np.array([-1, 8])), {}, ValueError, "seq_lens"),
        ("float-table", (q, k, v, table.astype(np.float32), lens), {}, TypeError,
         "block_table must hold integers"),
        ("table-shape", (q, k, v, table[:1], lens), {}, ValueError,
         r"block_table must have shape \(batch=2, max_blocks\)"),
        ("float-lengths", (q, k, v, table, lens.astype(float)), {}, TypeError,
         "seq_lens must be integers"),
        ("lengths-shape", (q, k, v, table, lens[:1]), {}, ValueError, "seq_lens must have shape"),
        ("cache-dtype", (q, k.astype(np.float64), v, table, lens), {}, TypeError,
         "same dtype"),
        ("int-cache", (q, k.astype(np.int8), v, table, lens), {}, TypeError,
         "key_cache must have dtype float32, float64, float16 or bfloat16, got int8"),
        ("cache-3d", (q, k[0], v, table, lens), {}, ValueError,
         r"key_cache must have 4 dimensions \(num_blocks, kv_heads, block_size, E\)"),
        ("query-3d", (q[0], k, v, table, lens), {}, ValueError, "query must have 4 dimensions"),
        ("feature-size", (q[..., :4], k, v, table, lens), {}, ValueError,
         "same feature size E"),
        ("pages-differ", (q, k, v[:5], table, lens), {}, ValueError,
         "same pages, heads and block size"),
        ("heads", (np.concatenate([q, q[:, :1]], axis=1), k, v, table, lens), {},
         ValueError, "enable_gqa"),
        ("feature-stride", (q, np.ones((6, 2, 4, 16), np.float32)[..., ::2], v, table, lens),
         {}, ValueError, "read in place"),
        ("mask-shape", (q, k, v, table, lens), {"attn_mask": np.ones((1, 5), bool)},
         ValueError, "does not broadcast"),
        ("window", (q, k, v, table, lens), {"window": (-1, 0)}, ValueError, "window"),
    ]


@pytest.mark.parametrize("args,options,error,match",
                         [pytest.param(*c[1:], id=c[0]) for c in bad_input_cases()])
def test_bad_input(args, options, error, match):
    with pytest.raises(error, match=match):
        cattn.paged_attention(*args, **options)


def test_unused_table_entries_are_not_read(rng):
    """Entries past a sequence's pages may hold anything (vLLM pads with garbage)."""
    k, v = make_pool(rng, 3, 1, 4, 8, 8, np.float32)
    table = np.array([[2, 10**6, -7]], dtype=np.int64)
    q = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
    check(q, k, v, table, np.array([3]))


# ------------------------------------------------------------------------- the cache

def kv(rng, B, Hkv, T, D, dtype=np.float32):
    return (rng.standard_normal((B, Hkv, T, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, D)).astype(dtype))


def held(cache, seq, layer=0):
    """(keys, values) sequence `seq` holds in `layer`, gathered from its pages."""
    row = cache.block_table([seq])[0]
    n = cache.length(seq, layer)
    return (gathered(cache.keys[layer], row, n), gathered(cache.values[layer], row, n))


def test_append_across_pages_and_free(rng):
    cache = cattn.PagedKVCache(10, 4, 2, 8)
    a, b = cache.add_sequence(), cache.add_sequence()
    assert cache.sequences == (0, 1)
    layer = cache.layer(0)
    k1, v1 = kv(rng, 2, 2, 3, 8)
    layer.append(k1, v1)
    k2, v2 = kv(rng, 2, 2, 6, 8)
    layer.append(k2, v2, num_new=np.array([6, 2]))  # left padding of sequence 1
    np.testing.assert_array_equal(layer.seq_lens(), [9, 5])
    np.testing.assert_array_equal(held(cache, a)[0], np.concatenate([k1[0], k2[0]], 1))
    np.testing.assert_array_equal(held(cache, b)[1], np.concatenate([v1[1], v2[1, :, 4:]], 1))
    assert cache.num_free_blocks == 10 - 3 - 2
    cache.free(a)
    assert cache.sequences == (1,) and cache.num_free_blocks == 8
    assert (cache.ref_counts >= 0).all() and cache.ref_counts.sum() == 2


def test_fork_shares_full_pages_and_copies_on_write(rng):
    cache = cattn.PagedKVCache(12, 4, 1, 8, num_layers=2)
    src = cache.add_sequence()
    k, v = kv(rng, 1, 1, 10, 8)        # 2 full pages and 2 rows of a third
    for layer in range(2):
        cache.layer(layer).append(k, v)
    src_table = cache.block_table()[0].copy()
    dst = cache.fork(src)
    table = cache.block_table()
    np.testing.assert_array_equal(table[1, :2], src_table[:2])          # shared
    assert table[1, 2] != src_table[2]                                  # the partial page
    np.testing.assert_array_equal(cache.ref_counts[src_table[:2]], 2)
    for layer in range(2):
        np.testing.assert_array_equal(held(cache, dst, layer)[0], k[0])
    # Both sequences write after the fork: neither sees the other's new positions.
    k_new, v_new = kv(rng, 2, 1, 3, 8)
    for layer in range(2):
        cache.layer(layer).append(k_new, v_new)
    for seq in (src, dst):
        np.testing.assert_array_equal(held(cache, seq, 1)[0],
                                      np.concatenate([k[0], k_new[seq]], 1))
    # Dropping positions into the shared pages, then writing there, copies the page first.
    cache.truncate(dst, 6)
    assert cache.block_table()[1, 1] == src_table[1] and cache.ref_counts[src_table[1]] == 2
    k_more, v_more = kv(rng, 2, 1, 1, 8)
    for layer in range(2):
        cache.layer(layer).append(k_more, v_more)
    assert cache.block_table()[1, 1] != src_table[1] and cache.ref_counts[src_table[1]] == 1
    np.testing.assert_array_equal(held(cache, src, 0)[0],
                                  np.concatenate([k[0], k_new[0], k_more[0]], 1))
    np.testing.assert_array_equal(held(cache, dst, 0)[1],
                                  np.concatenate([v[0, :, :6], v_more[1]], 1))
    cache.free(src)
    cache.free(dst)
    assert cache.num_free_blocks == 12 and not cache.ref_counts.any()


def test_out_of_blocks_changes_nothing(rng):
    cache = cattn.PagedKVCache(3, 4, 1, 8)
    cache.add_sequence()
    cache.add_sequence()
    k, v = kv(rng, 2, 1, 5, 8)
    keys_before = cache.keys.copy()
    with pytest.raises(ValueError, match="out of blocks: appending 10 positions needs 4 "
                                         "free blocks, 3 of 3 are free"):
        cache.layer(0).append(k, v)
    np.testing.assert_array_equal(cache.keys, keys_before)
    np.testing.assert_array_equal(cache.layer(0).seq_lens(), [0, 0])
    assert cache.num_free_blocks == 3
    cache.layer(0).append(k[:, :, :4], v[:, :, :4])   # 2 pages: fits
    cache.free(1)
    with pytest.raises(ValueError, match="out of blocks: forking sequence 0"):
        small = cattn.PagedKVCache(1, 4, 1, 8)
        small.add_sequence()
        small.layer(0).append(k[:1, :, :2], v[:1, :, :2])
        small.fork(0)


def shared_partial_page(rng):
    """Two sequences sharing a partly filled page (a fork, then both truncated into the
    shared page) in a pool of 3 pages, one of them free; and the keys they hold."""
    cache = cattn.PagedKVCache(3, 4, 1, 8)
    cache.add_sequence()
    k, v = kv(rng, 1, 1, 8, 8)
    cache.layer(0).append(k, v)
    cache.fork(0)
    for seq in (0, 1):
        cache.truncate(seq, 6)
    assert cache.block_table().tolist() == [[0, 1], [0, 1]] and cache.num_free_blocks == 1
    return cache, k, v


def check_pool(cache):
    """The pool's bookkeeping agrees with the block table: every page's reference count is
    the number of sequences holding it, and the free list holds exactly the others."""
    counts = np.zeros(cache.num_blocks, dtype=np.intp)
    for seq in cache.sequences:
        np.add.at(counts, cache.block_table([seq])[0], 1)
    np.testing.assert_array_equal(cache.ref_counts, counts)
    assert cache.num_free_blocks == np.count_nonzero(counts == 0)


def test_copy_on_write_counts_a_shared_page_once(rng):
    """Bug caught: counting every writer of a shared page as a copy, when the last writer
    owns the page once the others have copied it (1 page needed here, not 2)."""
    cache, k, v = shared_partial_page(rng)
    k_new, v_new = kv(rng, 2, 1, 1, 8)
    cache.layer(0).append(k_new, v_new)
    table = cache.block_table()
    assert table[0, 1] == 2 and table[1, 1] == 1     # the first writer copied
    assert cache.num_free_blocks == 0
    check_pool(cache)
    for seq in (0, 1):
        keys, values = held(cache, seq)
        np.testing.assert_array_equal(keys, np.concatenate([k[0, :, :6], k_new[seq]], 1))
        np.testing.assert_array_equal(values, np.concatenate([v[0, :, :6], v_new[seq]], 1))


def test_copy_on_write_out_of_blocks_changes_nothing(rng):
    """Bug caught: copying (or taking) pages for the first writers before finding that a
    later one does not fit, leaving the pool changed by a refused append."""
    cache, k, _ = shared_partial_page(rng)
    # Sequence 0 copies the shared page (the free one), sequence 1 then owns it but needs
    # a new page past it: 2 pages, 1 free.
    k_new, v_new = kv(rng, 2, 1, 3, 8)
    table, counts = cache.block_table(), cache.ref_counts.copy()
    keys_before = cache.keys.copy()
    with pytest.raises(ValueError, match="needs 2 free blocks, 1 of 3 are free"):
        cache.layer(0).append(k_new, v_new, num_new=np.array([1, 3]))
    np.testing.assert_array_equal(cache.block_table(), table)
    np.testing.assert_array_equal(cache.ref_counts, counts)
    np.testing.assert_array_equal(cache.keys, keys_before)
    np.testing.assert_array_equal(cache.layer(0).seq_lens(), [6, 6])
    assert cache.num_free_blocks == 1
    check_pool(cache)
    np.testing.assert_array_equal(held(cache, 1)[0], k[0, :, :6])


def test_random_operations_refuse_only_what_does_not_fit(rng):
    """Random appends, forks, truncations and frees on a small pool, each replayed on a
    twin with pages to spare: an append is refused exactly when the twin ends it holding
    more pages than the small pool has, a refused one changes nothing, and every sequence
    holds what was written to it. Bugs caught: under-counting pages (running out halfway),
    over-counting new pages, a refused append that leaves pages taken or copied, reference
    counts drifting from the block table. (The shared partial page is pinned down by the
    tests above: random operations rarely reach it at the pool's edge.)"""
    small = cattn.PagedKVCache(6, 3, 1, 4)
    done = []                                   # the operations the small pool took

    def replayed():
        twin = cattn.PagedKVCache(60, 3, 1, 4)
        for name, args in done:
            getattr(twin.layer(0) if name == "append" else twin, name)(*args)
        return twin

    want = {}                                   # sequence -> the keys it holds
    refused = 0
    for step in range(300):
        live = small.sequences
        op = rng.choice(5, p=[0.1, 0.25, 0.25, 0.1, 0.3]) if live else 0
        if op == 0 and len(live) < 4:
            seq = small.add_sequence()
            done.append(("add_sequence", (seq,)))
            want[seq] = np.zeros((1, 0, 4), np.float32)
        elif op == 1:
            src = live[rng.integers(len(live))]
            free_before = small.num_free_blocks
            try:
                dst = small.fork(src)
            except ValueError:
                assert free_before == 0 and small.length(src) % 3
                continue
            done.append(("fork", (src, dst)))
            want[dst] = want[src].copy()
        elif op == 2:
            seq = live[rng.integers(len(live))]
            length = int(rng.integers(small.length(seq) + 1))
            small.truncate(seq, length)
            done.append(("truncate", (seq, length)))
            want[seq] = want[seq][:, :length]
        elif op == 3 and len(live) > 1:
            seq = live[rng.integers(len(live))]
            small.free(seq)
            done.append(("free", (seq,)))
            del want[seq]
        else:
            k, _ = kv(rng, len(live), 1, 4, 4)
            num_new = rng.integers(0, 3, size=len(live))
            twin = replayed()
            twin.layer(0).append(k, k, num_new)
            if twin.num_blocks - twin.num_free_blocks > small.num_blocks:
                refused += 1
                state = (small.block_table(), small.ref_counts.copy(), small.keys.copy())
                with pytest.raises(ValueError, match="out of blocks"):
                    small.layer(0).append(k, k, num_new)
                np.testing.assert_array_equal(small.block_table(), state[0])
                np.testing.assert_array_equal(small.ref_counts, state[1])
                np.testing.assert_array_equal(small.keys, state[2])
                continue
            small.layer(0).append(k, k, num_new)
            done.append(("append", (k, k, num_new)))
            for b, seq in enumerate(live):
                want[seq] = np.concatenate([want[seq], k[b, :, 4 - num_new[b]:]], 1)
        check_pool(small)
        for seq in small.sequences:
            np.testing.assert_array_equal(held(small, seq)[0], want[seq])
    assert refused >= 5          # the pool ran out often enough to test the edge


@pytest.mark.parametrize("length", [0, 4, 8])
def test_truncate_to_a_page_boundary(rng, length):
    """Truncating to a multiple of the page size (0 included) keeps exactly the pages
    below it. Bug caught: keeping (or copying on the next write) a page past the end, or
    writing the next position into the last kept page instead of a new one."""
    cache = cattn.PagedKVCache(6, 4, 1, 8)
    cache.add_sequence()
    k, v = kv(rng, 1, 1, 10, 8)
    cache.layer(0).append(k, v)
    cache.fork(0)                              # pages 0 and 1 shared, the partial one copied
    cache.truncate(0, length)
    assert cache.length(0) == length and len(cache.block_table([0])[0]) == length // 4
    check_pool(cache)
    k_new, v_new = kv(rng, 2, 1, 5, 8)
    cache.layer(0).append(k_new, v_new, num_new=np.array([5, 0]))
    check_pool(cache)
    keys, values = held(cache, 0)
    np.testing.assert_array_equal(keys, np.concatenate([k[0, :, :length], k_new[0]], 1))
    np.testing.assert_array_equal(values, np.concatenate([v[0, :, :length], v_new[0]], 1))
    np.testing.assert_array_equal(held(cache, 1)[0], k[0])   # the fork kept its keys
    cache.truncate(0, 0)
    cache.free(1)
    assert cache.block_table([0]).shape == (1, 0) and cache.num_free_blocks == 6
    check_pool(cache)


def test_cache_misuse():
    cache = cattn.PagedKVCache(4, 4, 1, 8, num_layers=2)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match="already exists"):
        cache.add_sequence(seq)
    with pytest.raises(ValueError, match="src=5 is not a live sequence"):
        cache.fork(5)
    cache.layer(0).append(np.ones((1, 1, 2, 8), np.float32), np.ones((1, 1, 2, 8), np.float32))
    with pytest.raises(ValueError, match="fork it when every layer"):
        cache.fork(seq)
    with pytest.raises(TypeError, match="dtype float64, the cache holds float32"):
        cache.layer(1).append(np.ones((1, 1, 2, 8)), np.ones((1, 1, 2, 8)))
    with pytest.raises(ValueError, match="length must be at most"):
        cache.truncate(seq, 3)
    with pytest.raises(IndexError):
        cache.layer(2)
    with pytest.raises(ValueError, match="num_blocks must be >= 0"):
        cattn.PagedKVCache(-1, 4, 1, 8)


def test_layer_decodes_as_with_a_contiguous_cache_after_fork(rng):
    """200 decoding steps of 4 sequences forked from one prompt equal the contiguous
    KVCache holding 4 copies of the prompt."""
    mha = cattn.MultiHeadAttention(64, 4, num_kv_heads=2, rng=0)
    P, steps = 37, 200
    prompt = rng.standard_normal((1, P, 64)).astype(np.float32)
    contiguous = cattn.KVCache.for_layer(mha, 4, P + steps)
    paged = cattn.PagedKVCache.for_layer(mha, 4, P + steps, block_size=16, num_sequences=1)
    want, _ = mha(np.repeat(prompt, 4, 0), cache=contiguous, is_causal=True)
    got, _ = mha(prompt, cache=paged, is_causal=True)
    np.testing.assert_allclose(got[0], want[0], **tolerance(np.float32))
    for dst in (1, 2, 3):
        paged.fork(0, dst)
    assert (paged.block_table()[:, :2] == paged.block_table()[0, :2]).all()
    for step in range(steps):
        x = rng.standard_normal((4, 1, 64)).astype(np.float32)
        want, w_want = mha(x, cache=contiguous, need_weights=step % 50 == 0)
        got, w_got = mha(x, cache=paged, need_weights=step % 50 == 0)
        np.testing.assert_allclose(got, want, **tolerance(np.float32))
        if w_want is not None:
            np.testing.assert_allclose(w_got, w_want, **tolerance(np.float32))
    np.testing.assert_array_equal(paged.layer(0).seq_lens(), P + steps)
    # 2 shared pages + (one partial copy, then new pages) per sequence
    assert paged.num_blocks - paged.num_free_blocks == 2 + 4 * (-(-(P + steps) // 16) - 2)


def test_layer_with_paged_cache_chunked_prefill_and_padding(rng):
    """Chunks with left padding (ragged prompts) through a multi-layer PagedKVCache."""
    mha = cattn.MultiHeadAttention(32, 4, rng=1, dtype=np.float64)
    contiguous = cattn.KVCache(2, 40, 4, 8, num_layers=2, dtype=np.float64)
    paged = cattn.PagedKVCache(30, 3, 4, 8, num_layers=2, dtype=np.float64)
    paged.add_sequence()
    paged.add_sequence()
    sinks = np.array([0.5, -1.0, 2.0, 0.0])
    for chunk in (5, 1, 7):
        x = rng.standard_normal((2, chunk, 32))
        pad = np.zeros((2, chunk), bool)
        pad[1, :chunk // 2] = True
        for layer in range(2):
            want, _ = mha(x, cache=contiguous.layer(layer), is_causal=True,
                          key_padding_mask=pad, sinks=sinks)
            got, _ = mha(x, cache=paged.layer(layer), is_causal=True, key_padding_mask=pad,
                         sinks=sinks)
            np.testing.assert_allclose(got, want, **tolerance(np.float64))
    with pytest.raises(ValueError, match="query has batch size 3 but the cache holds 2"):
        mha(rng.standard_normal((3, 1, 32)), cache=paged.layer(0))
    with pytest.raises(ValueError, match="holds 2 layers"):
        mha(rng.standard_normal((2, 1, 32)), cache=paged)


def test_benchmark_pools_hold_the_inputs(rng):
    """The benchmark's paged rows time the same keys and values as its contiguous rows."""
    from cattn.bench.peers import paged_pools
    k = rng.standard_normal((2, 3, 50, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 50, 4)).astype(np.float32)
    k_pool, v_pool, table = paged_pools(k, v, 16)
    assert sorted(table.ravel()) == list(range(8)) and table.shape == (2, 4)
    for b in range(2):
        np.testing.assert_array_equal(gathered(k_pool, table[b], 50), k[b])
        np.testing.assert_array_equal(gathered(v_pool, table[b], 50), v[b])


def half_dtypes():
    params = [pytest.param(np.float16, id="float16")]
    try:
        import ml_dtypes
        params.append(pytest.param(ml_dtypes.bfloat16, id="bfloat16"))
    except ImportError:
        params.append(pytest.param(None, id="bfloat16", marks=pytest.mark.skip(
            reason="bfloat16 needs ml_dtypes")))
    return params


@pytest.mark.parametrize("half", half_dtypes())
@pytest.mark.parametrize("block_size,L,lengths", [(3, 4, (40, 7)), (16, 1, (6001, 1200)),
                                                  (16, 20, (100, 37))])
def test_half_precision_pages(rng, half, block_size, L, lengths):
    """float16 / bfloat16 pages are read as stored and computed in float32: the float64
    reference on the same (exactly widened) values, for decode with split keys and for
    chunks of rows that pack each page's keys."""
    seq_lens = np.array(lengths)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 2
    k_cache, v_cache = (x.astype(half) for x in make_pool(rng, num_blocks, 2, block_size, 64,
                                                          32, np.float32))
    table = shuffled_table(rng, seq_lens, block_size, num_blocks)
    q = rng.standard_normal((2, 4, L, 64)).astype(np.float32)
    # (the float32 paths; the native bfloat16 products round P, see test_dtypes.py)
    for path in [p for p in ("avx2", "avx512", "portable") if p in _kernel.testable_isa_paths()]:
        got, lse = cattn.paged_attention(q, k_cache, v_cache, table, seq_lens, is_causal=True,
                                         enable_gqa=True, return_lse=True, _isa=path)
        want, want_lse = reference_paged(q, k_cache.astype(np.float64),
                                         v_cache.astype(np.float64), table, seq_lens,
                                         is_causal=True, enable_gqa=True, return_lse=True)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, **tolerance(np.float32))
        np.testing.assert_allclose(lse, want_lse, **tolerance(np.float32))
    out16 = cattn.paged_attention(q.astype(np.float16), k_cache, v_cache, table, seq_lens,
                                  enable_gqa=True)
    assert out16.dtype == np.float16
    with pytest.raises(TypeError, match="float64 does not mix"):
        cattn.paged_attention(q.astype(np.float64), k_cache, v_cache, table, seq_lens)
    with pytest.raises(TypeError, match="int8"):
        cattn.paged_attention(q, k_cache.astype(np.int8), v_cache, table, seq_lens)


@pytest.mark.parametrize("half", half_dtypes())
def test_half_precision_cache_decodes_as_the_contiguous_one(rng, half):
    """A float32 layer over float16 / bfloat16 pages equals it over a KVCache of the same
    storage dtype (both round the keys and values as they are written)."""
    mha = cattn.MultiHeadAttention(32, 4, num_kv_heads=2, rng=3)
    contiguous = cattn.KVCache.for_layer(mha, 2, 40, dtype=half)
    paged = cattn.PagedKVCache.for_layer(mha, 2, 40, block_size=4, dtype=half)
    assert paged.keys.dtype == half
    for length in (9, 1, 1, 3):
        x = rng.standard_normal((2, length, 32)).astype(np.float32)
        want, _ = mha(x, cache=contiguous, is_causal=True)
        got, _ = mha(x, cache=paged, is_causal=True)
        np.testing.assert_allclose(got, want, **tolerance(np.float32))
    with pytest.raises(TypeError, match="int8 needs a scale per position"):
        cattn.PagedKVCache(4, 4, 1, 8, dtype=np.int8)
    with pytest.raises(TypeError, match="a float64 layer needs a cache of float64"):
        cattn.PagedKVCache.for_layer(cattn.MultiHeadAttention(8, 1, dtype=np.float64), 1, 8,
                                     dtype=half)

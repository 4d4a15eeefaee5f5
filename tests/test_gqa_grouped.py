"""Grouped heads read their keys and values once: under grouped-query attention (and MQA,
and latent attention's one K/V head) the query heads of one K/V head are rows of one
kernel task. Checked against the float64 reference over group sizes, query lengths, key
counts around the blocks and key chunks, every variant that differs per row or per head
(masks per head, sinks per head, key lengths per sequence), every stored key/value type and
every instruction-set path this CPU runs; results bitwise alike for 1, 2 and 3 threads.

The likeliest bugs of grouping: a row of the group read with another head's mask, sink,
output or lse slot (a per-head difference then shows against the reference); queries
gathered with the wrong stride (transposed query layouts); groups that straddle K/V heads
or batch items with other key lengths; scratch sized for one head's rows (a crash or
garbage beyond the first head of a large group).
"""
import ml_dtypes
import numpy as np
import pytest

import cattn
from cattn import _kernel, reference
from test_dtypes import p_rounding

sdpa = cattn.scaled_dot_product_attention
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}


def path_param(name):
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        name not in _kernel.testable_isa_paths(), reason=f"this CPU lacks the {name} path"))


PATHS = [path_param(p) for p in ("amx", "avx512_bf16", "avx512", "avx2", "portable",
                                 "wide16", "blas")]


def operands(rng, B, Hkv, group, L, S, E=32, Ev=24, dtype=np.float32):
    q = rng.standard_normal((B, Hkv * group, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, Ev)).astype(dtype)
    return q, k, v


def as64(x, scale=None):
    if x is None:
        return None
    x64 = np.asarray(x).astype(np.float64) if np.asarray(x).dtype != bool else x
    return x64 if scale is None else x64 * np.asarray(scale, np.float64)[..., None]


def want(q, k, v, mask=None, k_scale=None, v_scale=None, **options):
    """The float64 reference on the inputs as stored (int8: dequantized)."""
    options = {name: value for name, value in options.items() if name != "num_threads"}
    return reference.scaled_dot_product_attention(
        as64(q), as64(k, k_scale), as64(v, v_scale), as64(mask), enable_gqa=True, **options)


def compare(got, expected, dtype=np.float32, output_atol=0.0):
    """got against the float64 reference; output_atol more for the output (P rounded to
    bfloat16 by the native bfloat16 paths' P·V)."""
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for i, (g, w) in enumerate(zip(got, expected)):
        assert g.shape == w.shape
        tol = dict(TOL[np.dtype(dtype).type])
        tol["atol"] += output_atol if i == 0 else 0.0
        np.testing.assert_allclose(g.astype(np.float64), w, **tol)


def stats():
    return _kernel.last_call_stats()


# (Hkv, group, L, S): groups of 1 to 32 heads, one to 64 query rows, keys around the key
# blocks (256; 2048 where a task's rows stream K and V: at most 4) and the key chunks (a
# decoding call splits its keys from 1024 keys, or from 4096 where its rows stream).
SHAPES = [(Hkv, group, L, S)
          for Hkv in (1, 2, 8) for group in (1, 2, 3, 4, 5, 8, 32) for L in (1, 2, 7, 64)
          for S in (1, 255, 257, 1100, 2049, 4500)
          if Hkv * group * L * S <= 600_000]


@pytest.mark.parametrize("Hkv, group, L, S", SHAPES,
                         ids=[f"Hkv{a}-g{b}-L{c}-S{d}" for a, b, c, d in SHAPES])
def test_grouped_heads_match_reference(rng, Hkv, group, L, S):
    q, k, v = operands(rng, 1, Hkv, group, L, S)
    got = sdpa(q, k, v, enable_gqa=True, return_lse=True)
    compare(got, want(q, k, v, return_lse=True))
    # heads of one K/V head share one task (up to 128 rows, a divisor of the group)
    per_task = stats()["items_per_task"]
    assert group % per_task == 0 and per_task * min(L, 128) <= max(128, L)
    if group * L <= 128:
        assert per_task == group


def test_each_kv_head_is_read_once_per_group(rng):
    # 32 query heads over 8 K/V heads, 4500 keys in 4 blocks (in 2 chunks: split tasks):
    # key blocks visited = K/V heads x blocks, not query heads x blocks.
    q, k, v = operands(rng, 1, 8, 4, 1, 4500, E=64, Ev=64)
    sdpa(q, k, v, enable_gqa=True)
    s = stats()
    assert s["items_per_task"] == 4
    blocks_per_head = s["key_blocks_visited"] // 8
    sdpa(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1))  # the same, heads copied
    assert stats()["items_per_task"] == 1
    assert stats()["key_blocks_visited"] == 4 * 8 * blocks_per_head


def test_broadcast_keys_group_across_batch_and_heads(rng):
    # One K/V matrix for every batch item and head (MQA broadcast without enable_gqa).
    q = rng.standard_normal((3, 4, 1, 16)).astype(np.float32)
    k = rng.standard_normal((300, 16)).astype(np.float32)
    v = rng.standard_normal((300, 8)).astype(np.float32)
    got = sdpa(q, k, v, return_lse=True)
    compare(got, reference.scaled_dot_product_attention(as64(q), as64(k), as64(v),
                                                        return_lse=True))
    assert stats()["items_per_task"] == 12


def test_items_with_other_key_lengths_are_not_grouped(rng):
    # Broadcast keys, but each batch item has its own length: a group stays in one item.
    q = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 500, 16)).astype(np.float32)
    v = rng.standard_normal((1, 1, 500, 16)).astype(np.float32)
    options = dict(key_lengths=np.array([500, 123]), is_causal=True,
                   alignment="bottom_right", return_lse=True)
    got = sdpa(q, k, v, **options)
    compare(got, reference.scaled_dot_product_attention(as64(q), as64(k), as64(v),
                                                        **options))
    assert stats()["items_per_task"] == 4


def variant_options(rng, name, B, Hq, L, S):
    if name == "causal-bottom-right-lengths":
        return dict(is_causal=True, alignment="bottom_right",
                    key_lengths=rng.integers(1, S + 1, B))
    if name == "window-keep-first":
        return dict(is_causal=True, alignment="bottom_right", window=(300, 0), keep_first=5)
    if name == "sinks-per-head":
        return dict(sinks=rng.standard_normal(Hq).astype(np.float32) + 2)
    if name == "softcap":
        return dict(softcap=3.0, scale=1.0)
    if name == "mask-per-head-bool":
        return dict(attn_mask=rng.random((B, Hq, L, S)) > 0.4)
    if name == "mask-per-head-float":
        return dict(attn_mask=rng.standard_normal((1, Hq, L, S)).astype(np.float32))
    if name == "mask-broadcast-over-heads":
        return dict(attn_mask=rng.random((B, 1, L, S)) > 0.3)
    if name == "offsets":
        return dict(is_causal=True, q_offset=np.array([S - L, 40]), window=(200, 0))
    raise AssertionError(name)


VARIANTS = ["causal-bottom-right-lengths", "window-keep-first", "sinks-per-head", "softcap",
            "mask-per-head-bool", "mask-per-head-float", "mask-broadcast-over-heads",
            "offsets"]


@pytest.mark.parametrize("L, S", [(1, 1100), (2, 300), (7, 2100)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_per_row_and_per_head(rng, variant, L, S):
    B, Hkv, group = 2, 2, 4
    q, k, v = operands(rng, B, Hkv, group, L, S)
    options = variant_options(rng, variant, B, Hkv * group, L, S)
    mask = options.pop("attn_mask", None)
    sinks = options.get("sinks")
    got = sdpa(q, k, v, mask, enable_gqa=True, return_lse=True, **options)
    if sinks is not None:  # the reference takes them in the computing dtype
        options["sinks"] = sinks.astype(np.float64)
    compare(got, want(q, k, v, mask, return_lse=True, **options))
    assert stats()["items_per_task"] == group


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("L, S", [(1, 3000), (1, 700), (5, 2100), (33, 400)])
def test_results_are_bitwise_alike_for_any_thread_count(rng, threads, L, S):
    q, k, v = operands(rng, 2, 2, 8, L, S, E=64, Ev=64)
    mask = rng.standard_normal((2, 16, L, S)).astype(np.float32)
    options = dict(enable_gqa=True, return_lse=True, is_causal=True, alignment="bottom_right",
                   key_lengths=np.array([S, S // 2 + 1]), softcap=20.0,
                   sinks=rng.standard_normal(16).astype(np.float32))
    one = sdpa(q, k, v, mask, num_threads=1, **options)
    many = sdpa(q, k, v, mask, num_threads=threads, **options)
    assert stats()["items_per_task"] > 1
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_transposed_and_strided_queries_and_out(rng):
    # Queries laid out (B, L, H, E) and viewed as (B, H, L, E); the output written through
    # a strided view: the group's rows are gathered with the query's own strides.
    B, Hkv, group, L, S, E = 2, 2, 4, 3, 600, 32
    q = rng.standard_normal((B, L, Hkv * group, E)).astype(np.float32).transpose(0, 2, 1, 3)
    k = rng.standard_normal((B, Hkv, S, 2 * E)).astype(np.float32)[..., ::2]
    v = rng.standard_normal((B, Hkv, S, E)).astype(np.float32)
    out = np.zeros((B, L, Hkv * group, E), np.float32).transpose(0, 2, 1, 3)
    sdpa(q, k, v, enable_gqa=True, out=out)
    compare(out, want(q, k, v))


def stored_as(kind, q, k, v):
    """(q, k, v, int8 scales as keyword arguments) with the cache stored as `kind`."""
    if kind == "float64":
        return q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), {}
    if kind == "int8":
        (k, k_scale), (v, v_scale) = cattn.quantize_kv(k), cattn.quantize_kv(v)
        return q, k, v, dict(k_scale=k_scale, v_scale=v_scale)
    dtype = np.float16 if kind == "float16" else ml_dtypes.bfloat16
    return q, k.astype(dtype), v.astype(dtype), {}


@pytest.mark.parametrize("kind", ["float64", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("L, S", [(1, 1100), (6, 300)])
def test_cache_types(rng, kind, L, S):
    B, Hkv, group = 2, 2, 8
    q, k, v = operands(rng, B, Hkv, group, L, S, E=48, Ev=40)
    q, k, v, scales = stored_as(kind, q, k, v)
    options = dict(is_causal=True, alignment="bottom_right", return_lse=True)
    got = sdpa(q, k, v, enable_gqa=True, **scales, **options)
    compare(got, want(q, k, v, **scales, **options), q.dtype, p_rounding(None, v))
    assert stats()["items_per_task"] == group


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("Hkv, group, L, S", [(2, 3, 1, 1100), (1, 8, 2, 300),
                                              (1, 32, 1, 2100), (2, 5, 7, 257)])
def test_every_instruction_set_path(rng, path, Hkv, group, L, S):
    q, k, v = operands(rng, 2, Hkv, group, L, S, E=40, Ev=33)
    mask = rng.random((2, Hkv * group, L, S)) > 0.3
    options = dict(is_causal=True, alignment="bottom_right", return_lse=True, softcap=10.0)
    got = sdpa(q, k, v, mask, enable_gqa=True, _isa=path, **options)
    compare(got, want(q, k, v, mask, **options))
    assert stats()["isa"] == path and stats()["items_per_task"] == group


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["float16", "bfloat16", "int8"])
def test_narrow_caches_on_every_path(rng, path, kind):
    q, k, v = operands(rng, 1, 2, 16, 1, 1100, E=64, Ev=64)
    q, k, v, scales = stored_as(kind, q, k, v)
    got = sdpa(q, k, v, enable_gqa=True, return_lse=True, _isa=path, **scales)
    compare(got, want(q, k, v, return_lse=True, **scales), np.float32, p_rounding(path, v))


# ------------------------------------------------------------------ latent attention (MLA)

@pytest.mark.parametrize("B, L, S", [(1, 1, 1100), (2, 2, 300), (1, 1, 257)])
def test_latent_attention_values_are_a_view_of_the_keys(rng, B, L, S):
    # DeepSeek's absorbed form: 128 query heads over one K/V head of width 576 (512 latent
    # + 64 rotary features), the values the keys' first 512 columns (a strided view).
    heads, E, Ev = 128, 576, 512
    q = (rng.standard_normal((B, heads, L, E)) * 0.05).astype(np.float32)
    k = rng.standard_normal((B, 1, S, E)).astype(np.float32)
    v = k[..., :Ev]
    assert not v.flags.c_contiguous and np.shares_memory(k, v)
    options = dict(scale=0.1, is_causal=True, alignment="bottom_right", return_lse=True)
    got = sdpa(q, k, v, enable_gqa=True, **options)
    compare(got, want(q, k, v, **options))
    assert stats()["items_per_task"] == 128 // L

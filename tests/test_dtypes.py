"""float16, bfloat16 and int8 keys and values (float16 and bfloat16 queries), computed in
float32, against the float64 reference on the same rounded inputs.

Tolerances, and why. Converting float16, bfloat16 or int8 to float32 is exact, so the
kernel computes in float32 on exactly the values the reference sees (for int8: the
dequantized ones, int8 · scale, also exact in float64). A float32 result is therefore held
to the float32 tolerance of every other test (conftest: O(sqrt(S)) float32 roundings,
2e-5). A result returned in float16 or bfloat16 adds one rounding of the output: half a
unit in the last place, a relative 2**-11 (float16) or 2**-8 (bfloat16), on top of the
float32 error. lse stays float32. On the paths with native bfloat16 products ("amx",
"avx512_bf16"), P·V against bfloat16 values rounds P to bfloat16 (test_bf16_native.py): an
output moves by at most 2**-8 · Σ_j p_j·|v_j| <= 2**-8 · max|v| more.
"""
import numpy as np
import pytest

import cattn
from cattn import _kernel
from cattn.models import minilm
from conftest import TOLERANCE, as64, case_operands, reference, require_peer
from test_isa_paths import CASES as ISA_CASES

sdpa = cattn.scaled_dot_product_attention
PATHS = _kernel.testable_isa_paths()
F32_TOL = TOLERANCE[np.float32]



def bfloat16():
    return np.dtype(require_peer("ml_dtypes").bfloat16)


def half_dtype(name):
    return np.dtype(np.float16) if name == "float16" else bfloat16()


HALVES = ["float16", "bfloat16"]
# half a unit in the last place, relative: the rounding of a float16 / bfloat16 output
OUTPUT_ROUNDING = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def tolerance_for(dtype):
    """The float32 tolerance, plus one rounding of the output for half-precision results."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return F32_TOL
    extra = OUTPUT_ROUNDING[dtype.name]
    return dict(rtol=F32_TOL["rtol"] + extra, atol=F32_TOL["atol"] + extra * 1e-2)


def p_rounding(path, value):
    """The extra absolute error of an output whose P·V rounded P to bfloat16 (on the
    native bfloat16 paths, against bfloat16 values; path None: the process's path)."""
    if value.dtype.name != "bfloat16":  # (first: isa_path() may settle the bfloat16 default,
        return 0.0                       # a measurement that would replace the call's stats)
    if (path or _kernel.isa_path()) in ("amx", "avx512_bf16"):
        return 2.0**-8 * float(np.abs(value.astype(np.float64)).max())
    return 0.0


def compare(got, want, dtype, lse_last=False, output_atol=0.0):
    """got (cattn's result or tuple) against the float64 reference: outputs and weights in
    `dtype`, lse (last, when asked) in float32; output_atol more for the output."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        is_lse = lse_last and i == len(got) - 1
        expected_dtype = np.dtype(np.float32) if is_lse else np.dtype(dtype)
        assert g.dtype == expected_dtype and g.shape == w.shape
        tol = dict(tolerance_for(expected_dtype))
        if i == 0:
            tol["atol"] += output_atol
        np.testing.assert_allclose(g.astype(np.float64), w, **tol)


def reference_of(q, k, v, mask=None, k_scale=None, v_scale=None, **options):
    """The float64 reference on the inputs as stored (int8: dequantized)."""
    k64, v64 = as64_any(k), as64_any(v)
    if k_scale is not None:
        k64 = k64 * np.asarray(k_scale, np.float64)[..., None]
    if v_scale is not None:
        v64 = v64 * np.asarray(v_scale, np.float64)[..., None]
    mask = as64(mask) if mask is not None and mask.dtype.kind == "f" else mask
    return reference.scaled_dot_product_attention(as64_any(q), k64, v64, mask, **options)


def as64_any(x):
    return x.astype(np.float64)


# The instruction-set paths' cases (decoding rows, row tiles and their tails, key counts
# around the panels, blocks and key chunks, feature sizes around the vector widths, every
# variant), and more decoding rows (1-4 query rows stream K and V) with lse and weights.
CASES = ISA_CASES + [
    ((2, 3), 1, 300, 40, 24, {}),
    ((2,), 4, 70, 17, 9, {"return_lse": True}),
    ((1, 2), 2, 80, 8, 16, {"return_weights": True, "return_lse": True}),
]
CASE_IDS = [f"L{c[1]}-S{c[2]}-E{c[3]}-Ev{c[4]}" for c in CASES]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_half_inputs_match_reference_on_the_rounded_inputs(path, half, case, rng):
    dtype = half_dtype(half)
    q, k, v, mask, options = case_operands(case, rng)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    lse_last = options.get("return_lse", False)
    want = reference_of(q, k, v, mask, **options)
    # in float32, the float32 tolerance: the conversions are exact
    compare(sdpa(q, k, v, mask, out_dtype=np.float32, _isa=path, **options), want,
            np.float32, lse_last, p_rounding(path, v))
    assert _kernel.last_call_stats()["isa"] == path
    # in the query's dtype by default: one more rounding
    compare(sdpa(q, k, v, mask, _isa=path, **options), want, dtype, lse_last,
            p_rounding(path, v))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_int8_is_exact_on_the_dequantized_inputs(path, case, rng):
    q, k, v, mask, options = case_operands(case, rng)
    kq, k_scale = cattn.quantize_kv(k)
    vq, v_scale = cattn.quantize_kv(v)
    got = sdpa(q, kq, vq, mask, k_scale=k_scale, v_scale=v_scale, _isa=path, **options)
    compare(got, reference_of(q, kq, vq, mask, k_scale, v_scale, **options), np.float32,
            options.get("return_lse", False))


@pytest.mark.parametrize("shape", [(1, 8, 1, 2048, 64), (2, 4, 100, 300, 64),
                                   (1, 2, 3, 1000, 128)])
def test_int8_is_close_to_float32(shape, rng):
    """Quantization error on normal data: relative RMS to the float32 result <= 1e-2."""
    B, H, L, S, E = shape
    q, k, v = (rng.standard_normal((B, H, n, E), dtype=np.float32) for n in (L, S, S))
    exact = sdpa(q, k, v)
    kq, k_scale = cattn.quantize_kv(k)
    vq, v_scale = cattn.quantize_kv(v)
    for key, value, scales in ((kq, v, dict(k_scale=k_scale)), (k, vq, dict(v_scale=v_scale)),
                               (kq, vq, dict(k_scale=k_scale, v_scale=v_scale))):
        got = sdpa(q, key, value, **scales)
        rms = np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact ** 2))
        assert rms <= 1e-2, rms


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtypes", [("float32", "bfloat16", "float16"),
                                    ("float16", "float32", "bfloat16"),
                                    ("bfloat16", "int8", "float16")], ids="-".join)
def test_mixed_dtypes_and_strides(path, dtypes, rng):
    """Queries, keys and values of different dtypes, as transposed, sliced and reversed
    views: read in place, as the reference sees them."""
    q_dtype, k_dtype, v_dtype = (np.int8 if d == "int8" else
                                 np.float32 if d == "float32" else half_dtype(d)
                                 for d in dtypes)
    q = rng.standard_normal((2, 70, 3, 40), dtype=np.float32).transpose(0, 2, 1, 3)
    k = rng.standard_normal((2, 3, 90, 80), dtype=np.float32)[..., :40]
    v = rng.standard_normal((2, 3, 90, 24), dtype=np.float32)[:, :, ::-1]
    scales = {}
    if k_dtype == np.int8:
        k, scales["k_scale"] = cattn.quantize_kv(k)
    q, k, v = q.astype(q_dtype), k.astype(k_dtype), v.astype(v_dtype)
    out = np.zeros((2, 70, 3, 24), q_dtype).transpose(0, 2, 1, 3)
    sdpa(q, k, v, is_causal=True, out=out, _isa=path, **scales)
    compare(out, reference_of(q, k, v, is_causal=True, **scales), q_dtype,
            output_atol=p_rounding(path, v))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv", ["float16", "bfloat16", "int8"])
def test_grouped_query_heads_and_key_lengths(path, kv, rng):
    B, Hq, Hkv, L, S, E = 2, 8, 2, 3, 333, 64
    q = rng.standard_normal((B, Hq, L, E), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
    scales = {}
    if kv == "int8":
        k, ks = cattn.quantize_kv(k)
        v, vs = cattn.quantize_kv(v)
        scales = dict(k_scale=ks, v_scale=vs)
    else:
        k, v = k.astype(half_dtype(kv)), v.astype(half_dtype(kv))
    options = dict(enable_gqa=True, key_lengths=np.array([333, 100]), is_causal=True,
                   alignment="bottom_right", return_lse=True)
    got = sdpa(q, k, v, _isa=path, **options, **scales)
    compare(got, reference_of(q, k, v, **scales, **options), np.float32, lse_last=True,
            output_atol=p_rounding(path, v))


def test_scales_broadcast_and_read_in_place(rng):
    """Per-head scales of shape (H, S), a scalar scale per head (H, 1), and a float64 scale:
    all broadcast to (..., S) as documented."""
    q = rng.standard_normal((2, 3, 5, 16), dtype=np.float32)
    k = rng.integers(-127, 128, (2, 3, 40, 16)).astype(np.int8)
    v = rng.integers(-127, 128, (2, 3, 40, 8)).astype(np.int8)
    # (scales around 1/127: dequantized values of unit scale, as the tolerance assumes)
    for k_scale, v_scale in (((rng.random((3, 40), dtype=np.float32) + 0.5) / 127,
                              (rng.random((2, 3, 40)) + 0.5) / 127),
                             (np.full((3, 1), 0.01, np.float32), np.float32(1 / 127))):
        got = sdpa(q, k, v, k_scale=k_scale, v_scale=v_scale)
        compare(got, reference_of(q, k, v, k_scale=np.broadcast_to(k_scale, (2, 3, 40)),
                                  v_scale=np.broadcast_to(v_scale, (2, 3, 40))), np.float32)


def test_output_dtype_follows_the_query_unless_told(rng):
    bf16 = bfloat16()
    q = rng.standard_normal((2, 6, 8), dtype=np.float32)
    k = rng.standard_normal((2, 9, 8), dtype=np.float32).astype(bf16)
    want = reference_of(q, k, k)
    assert sdpa(q, k, k).dtype == np.float32
    assert sdpa(q.astype(bf16), k, k).dtype == bf16
    out, weights, lse = sdpa(q, k, k, out_dtype=np.float16, return_weights=True,
                             return_lse=True)
    assert (out.dtype, weights.dtype, lse.dtype) == (np.float16, np.float16, np.float32)
    compare(out, want, np.float16, output_atol=p_rounding(None, k))
    # a float32 computation written into a preallocated bfloat16 (strided) output
    out = np.zeros((2, 8, 6), bf16).transpose(0, 2, 1)
    assert sdpa(q, k, k, out=out) is out
    compare(out, want, bf16, output_atol=p_rounding(None, k))
    # float32 inputs into a float16 out=
    out = np.empty((2, 6, 8), np.float16)
    sdpa(q, q, q, out=out)
    compare(out, reference_of(q, q, q), np.float16)


def test_inputs_are_not_modified(rng):
    q = rng.standard_normal((2, 4, 16), dtype=np.float32).astype(np.float16)
    k, k_scale = cattn.quantize_kv(rng.standard_normal((2, 50, 16), dtype=np.float32))
    v = rng.standard_normal((2, 50, 8), dtype=np.float32).astype(bfloat16())
    before = [x.copy() for x in (q, k, k_scale, v)]
    sdpa(q, k, v, k_scale=k_scale, return_weights=True)
    for x, b in zip((q, k, k_scale, v), before):
        assert np.array_equal(x.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("half", HALVES)
def test_merge_attention_of_half_outputs(half, rng):
    dtype = half_dtype(half)
    q, k, v = (rng.standard_normal((3, n, 8), dtype=np.float32).astype(dtype)
               for n in (5, 40, 40))
    parts = [sdpa(q, k[:, s], v[:, s], return_lse=True)
             for s in (slice(0, 13), slice(13, 40))]
    assert all(o.dtype == dtype and lse.dtype == np.float32 for o, lse in parts)
    out, lse = cattn.merge_attention([o for o, _ in parts], [lse for _, lse in parts])
    want_out, want_lse = reference_of(q, k, v, return_lse=True)
    assert out.dtype == dtype and lse.dtype == np.float32
    # each chunk's output was rounded once (an error relative to the chunk's values, which
    # may be larger than the merged ones), the merge rounds once more
    chunk_rounding = OUTPUT_ROUNDING[half] * max(np.abs(o.astype(np.float32)).max()
                                                 for o, _ in parts)
    tol = tolerance_for(dtype)
    np.testing.assert_allclose(out.astype(np.float64), want_out, rtol=tol["rtol"],
                               atol=tol["atol"] + chunk_rounding)
    np.testing.assert_allclose(lse, want_lse, **F32_TOL)


def test_decoding_reads_the_stored_bytes_only(rng):
    """The kernel reads keys and values in place: a float16 cache is not converted as a
    whole (the per-thread scratch holds a block at most, never the cache)."""
    k = rng.standard_normal((1, 4, 4096, 64), dtype=np.float32).astype(np.float16)
    q = rng.standard_normal((1, 4, 1, 64), dtype=np.float32)
    sdpa(q, k, k, num_threads=1)
    assert _kernel.last_call_stats()["scratch_bytes"] < k.nbytes / 8


# ------------------------------------------------------------------------ quantize_kv

def test_quantize_kv_rounds_each_row_to_its_own_scale(rng):
    x = rng.standard_normal((2, 3, 50, 16)) * rng.random((2, 3, 50, 1)) * 10
    x[0, 0, 7] = 0  # a row of zeros
    q, scale = cattn.quantize_kv(x.astype(np.float32))
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == x.shape[:-1]
    assert np.abs(q).max() <= 127 and scale[0, 0, 7] == 1 and not q[0, 0, 7].any()
    # the largest element of each row maps to +-127, every element within half a step
    assert np.all(np.abs(q).max(-1)[scale != 1] == 127)
    error = np.abs(q * scale[..., None].astype(np.float64) - x)
    assert np.all(error <= 0.5 * scale[..., None] * (1 + 1e-6))


def test_quantize_kv_of_half_precision(rng):
    x = rng.standard_normal((4, 32), dtype=np.float32)
    for dtype in (np.float16, bfloat16()):
        q, scale = cattn.quantize_kv(x.astype(dtype))
        assert np.array_equal(q, cattn.quantize_kv(x.astype(dtype).astype(np.float32))[0])


@pytest.mark.parametrize("x, error, message", [
    ([[1.0, 2.0]], TypeError, "numpy.ndarray"),
    (np.ones((2, 3), np.int8), TypeError, "float32, float64, float16 or bfloat16"),
    (np.ones((), np.float32), ValueError, "at least one axis"),
    (np.array([[1.0, np.nan]]), ValueError, "finite"),
    (np.array([[1.0, np.inf]], np.float32), ValueError, "finite"),
])
def test_quantize_kv_bad_input(x, error, message):
    with pytest.raises(error, match=message):
        cattn.quantize_kv(x)


# ------------------------------------------------------------------------- bad input

Q = np.ones((2, 4, 8), np.float32)
K8 = np.ones((2, 6, 8), np.int8)
KF = np.ones((2, 6, 8), np.float32)
SCALE = np.ones((2, 6), np.float32)


@pytest.mark.parametrize("call, error, message", [
    (lambda: sdpa(Q, K8, KF), ValueError, "int8 key needs k_scale="),
    (lambda: sdpa(Q, KF, K8), ValueError, "int8 value needs v_scale="),
    (lambda: sdpa(Q, KF, KF, k_scale=SCALE), ValueError, "k_scale is only for int8 key"),
    (lambda: sdpa(Q, K8, K8, k_scale=SCALE, v_scale=SCALE[:, :5]), ValueError,
     r"v_scale of shape \(2, 5\) must broadcast to value's shape .* \(2, 6\)"),
    (lambda: sdpa(Q, K8, K8, k_scale=SCALE.astype(int), v_scale=SCALE), TypeError,
     "k_scale must be floating point"),
    (lambda: sdpa(Q.astype(np.int8), Q, Q), TypeError,
     "query must have dtype float32, float64, float16 or bfloat16, got int8"),
    (lambda: sdpa(Q.astype(np.float16), Q.astype(np.float64), Q), TypeError,
     "same dtype, got float16, float64 and float32"),
    (lambda: sdpa(Q, Q, Q.astype(np.float16), out_dtype=np.int32), TypeError,
     "out_dtype must be float32, float16 or bfloat16, got int32"),
    (lambda: sdpa(Q, Q.astype(np.float16), Q, out_dtype=np.float16,
                  out=np.empty((2, 4, 8), np.float32)), ValueError,
     "out has dtype float32 but out_dtype is float16"),
    (lambda: sdpa(Q.astype(np.float64), Q.astype(np.float64), Q.astype(np.float64),
                  out=np.empty((2, 4, 8), np.float16)), TypeError,
     "out must have dtype float64 with float64 inputs"),
    (lambda: sdpa(Q.astype(np.float16), Q, Q, out=np.empty((2, 4, 7), np.float16)),
     ValueError, r"out must have shape \(2, 4, 8\) and dtype float16"),
    (lambda: cattn.merge_attention([Q.astype(np.float16)], [Q[..., 0].astype(np.float64)]),
     TypeError, "each lse must be an ndarray of its output's dtype"),
])
def test_bad_input_is_rejected(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------- models

def test_minilm_with_bfloat16_attention_inputs(monkeypatch):
    """The real MiniLM, its attention fed bfloat16 queries, keys and values: sentence
    embeddings within cosine 0.999 of the float32 ones."""
    bf16 = bfloat16()
    for module in ("safetensors", "tokenizers", minilm.WEIGHTS_PACKAGE):
        require_peer(module)
    model = minilm.MiniLM.from_pretrained()
    sentences = ["How are you doing?", "He fed the dog because it was hungry.",
                 "Self-attention lets every token look at every other token, all at once."]
    exact = model.encode(sentences)
    from cattn import layers
    from cattn.models import bert
    calls = []

    def in_bfloat16(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q.astype(bf16), k.astype(bf16), v.astype(bf16), *args, **kwargs)

    # (the layer and the sentence encoder's own attention call)
    monkeypatch.setattr(layers, "scaled_dot_product_attention", in_bfloat16)
    monkeypatch.setattr(bert, "scaled_dot_product_attention", in_bfloat16)
    rounded = model.encode(sentences)
    assert calls, "the model did not run its attention through cattn's attention"
    cosine = np.sum(exact * rounded, -1) / (np.linalg.norm(exact, axis=-1)
                                           * np.linalg.norm(rounded, axis=-1))
    assert np.all(cosine >= 0.999), cosine


# ------------------------------------------------------------------------- KV caches

CACHE_DTYPES = ["float16", "bfloat16", "int8"]


def cache_dtype(name):
    return np.dtype(np.int8) if name == "int8" else half_dtype(name)


@pytest.mark.parametrize("name", CACHE_DTYPES)
def test_kv_cache_memory(name):
    """A float16 or bfloat16 cache holds half the bytes of a float32 one; an int8 cache a
    quarter, plus one float32 scale per (token, head) for keys and for values."""
    sizes = dict(batch_size=2, max_len=64, num_kv_heads=4, head_dim=32, num_layers=3)
    full = cattn.KVCache(**sizes)
    narrow = cattn.KVCache(**sizes, dtype=cache_dtype(name))
    assert narrow.keys.dtype == narrow.values.dtype == cache_dtype(name)
    if name == "int8":
        scale_bytes = 2 * 4 * (3 * 2 * 4 * 64)
        assert narrow.nbytes == full.nbytes // 4 + scale_bytes
    else:
        assert narrow.nbytes == full.nbytes // 2


@pytest.mark.parametrize("name", CACHE_DTYPES)
def test_decoding_with_a_narrow_cache(name, rng):
    """A float32 layer decodes with a float16, bfloat16 or int8 cache unchanged: the cache
    stores the rounded (quantized) keys and values of the float32 one, and the outputs stay
    close to those of a float32 cache. Prompts of different lengths (left padding), then
    tokens one at a time."""
    dtype = cache_dtype(name)
    mha = cattn.MultiHeadAttention(64, 8, num_kv_heads=2, rng=1)
    x = rng.standard_normal((2, 12, 64), dtype=np.float32)
    padding = np.zeros((2, 5), bool)
    padding[1, :2] = True  # the second prompt has 3 tokens, left-padded
    caches = [cattn.KVCache.for_layer(mha, 2, 32), cattn.KVCache.for_layer(mha, 2, 32,
                                                                           dtype=dtype)]
    outputs = [[], []]
    for i, cache in enumerate(caches):
        outputs[i].append(mha(x[:, :5], cache=cache, key_padding_mask=padding,
                              is_causal=True)[0])
        for t in range(5, 12):
            outputs[i].append(mha(x[:, t:t + 1], cache=cache)[0])
    full, narrow = caches
    assert np.array_equal(full.lengths, narrow.lengths)
    for b, n in enumerate(full.lengths[0]):
        keys, values = full.keys[0, b, :, :n], full.values[0, b, :, :n]
        if name == "int8":
            for stored, scales, exact in ((narrow.keys, narrow.key_scales, keys),
                                          (narrow.values, narrow.value_scales, values)):
                want, want_scales = cattn.quantize_kv(exact)
                assert np.array_equal(stored[0, b, :, :n], want)
                assert np.array_equal(scales[0, b, :, :n], want_scales)
        else:
            assert np.array_equal(narrow.keys[0, b, :, :n], keys.astype(dtype))
            assert np.array_equal(narrow.values[0, b, :, :n], values.astype(dtype))
    got, want = np.concatenate(outputs[1], 1), np.concatenate(outputs[0], 1)
    rms = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
    assert rms <= {"float16": 1e-3, "bfloat16": 1e-2, "int8": 1e-2}[name], rms


def test_kv_cache_dtype_errors():
    mha64 = cattn.MultiHeadAttention(16, 2, dtype=np.float64)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16, "
                                        "bfloat16 .* or int8, got int16"):
        cattn.KVCache(1, 4, 2, 8, dtype=np.int16)
    with pytest.raises(TypeError, match="a float64 layer needs a cache of float64, got "
                                        "dtype float16"):
        cattn.KVCache.for_layer(mha64, 1, 4, dtype=np.float16)
    with pytest.raises(ValueError, match="this layer needs 2 heads of 8 float64"):
        mha64(np.ones((1, 1, 16)), cache=cattn.KVCache(1, 4, 2, 8, dtype=np.float16))
    cache = cattn.KVCache(1, 4, 2, 8, dtype=np.int8)
    with pytest.raises(TypeError, match="keys has dtype int8, the cache holds int8 "
                                        r"\(and takes float32\)"):
        cache.layer(0).append(np.ones((1, 2, 1, 8), np.int8), np.ones((1, 2, 1, 8), np.int8))

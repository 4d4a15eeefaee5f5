"""Native bfloat16 block products (the "avx512_bf16" and "amx" paths) against float64:
first each block product alone (through a testing hook), then whole attention calls.

Q·Kᵀ: every product of two bfloat16 values is exact in float32, so the only error is the
float32 summation: |error| <= (pairs + 2) · 2^-23 · Σ|q·k| (each of the pairs of products
is one rounded add of the accumulator, plus the scale).

P·V: the probabilities are rounded to bfloat16 (to nearest even: relative error <= 2^-8
each, half a unit in the last of 8 significant bits), then summed as Q·Kᵀ. The result is compared with the float64 product of the
rounded P (the float32 summation bound), and with the unrounded P within 2^-8 · Σ|p·v| more.

Whole calls on bfloat16 inputs are compared with the float64 reference on the same
bfloat16 values. Q·Kᵀ is float32-exact, the softmax float32, so everything but P·V has the
float32 tolerance of every other test; P·V adds the rounding of P: at most
2^-8 · Σ_j p_j·|v_j| per output element (p the reference's weights), and a bfloat16 output
one more rounding, 2^-8 relative. The weights and the lse come from the float32 P and are
held to the float32 tolerance (plus the output rounding for bfloat16 weights).

Every path is run on this CPU where it exists; the others skip with a reason (and are
refused, never run).
"""
import numpy as np
import pytest

import cattn
from cattn import _kernel, reference
from conftest import TOLERANCE, as64, case_operands
from test_isa_paths import CASES as ISA_CASES

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16
NATIVE_PATHS = ("amx", "avx512_bf16")


def native_path(name):
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        name not in _kernel.testable_isa_paths(), reason=f"this CPU lacks the {name} path"))


ALL_NATIVE = [native_path(p) for p in NATIVE_PATHS]


def bf16_values(rng, shape, pad=0):
    """bfloat16 values (as float64) and their bits in a wider array whose hidden columns
    hold NaN: a kernel that reads past a row's end poisons its result."""
    x = rng.standard_normal(shape).astype(BF16)
    wide = np.full(shape[:-1] + (shape[-1] + pad,), np.nan, BF16)
    wide[..., :shape[-1]] = x
    return x.astype(np.float64), wide.view(np.uint16)[..., :shape[-1]]


def summation_bound(terms_abs, n_terms):
    return (n_terms / 2 + 2) * 2.0**-23 * terms_abs


# (rows, keys, E, Ev): rows around the register tile (8) and the AMX tiles (16, 32), keys
# around the panels (32) and pairs (odd counts), E and Ev odd, below and past 16/32/64.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (5, 40, 64, 64), (13, 47, 17, 9), (16, 32, 32, 32),
          (17, 31, 2, 5), (33, 65, 63, 33), (40, 17, 3, 48), (128, 256, 64, 64),
          (100, 300, 128, 100)]


@pytest.mark.parametrize("path", ALL_NATIVE)
@pytest.mark.parametrize("q_as_f32", [False, True], ids=["q-bf16", "q-f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}-N{}-E{}-Ev{}".format(*s))
def test_block_products_match_float64(path, q_as_f32, shape, rng):
    rows, n, E, Ev = shape
    q64, q_bits = bf16_values(rng, (rows, E), pad=3)
    k64, k_bits = bf16_values(rng, (n, E), pad=1)
    v64, v_bits = bf16_values(rng, (n, Ev), pad=2)
    p = rng.random((rows, n + 5)).astype(np.float32)[:, :n]
    p[:, ::3] *= 1e-3  # probabilities of several magnitudes
    alpha = 0.125 if E % 2 else 0.3
    q_arg = q64.astype(np.float32) if q_as_f32 else q_bits
    scores, pv = _kernel.bf16_block_products(path, q_arg, k_bits, v_bits, p, alpha)

    want = alpha * (q64 @ k64.T)
    bound = summation_bound(alpha * (np.abs(q64) @ np.abs(k64).T), E) + 1e-30
    assert np.all(np.abs(scores - want) <= bound), np.max(np.abs(scores - want) / bound)

    p_rounded = p.astype(BF16).astype(np.float64)
    want = p_rounded @ v64
    bound = summation_bound(np.abs(p_rounded) @ np.abs(v64), n) + 1e-30
    assert np.all(np.abs(pv - want) <= bound), np.max(np.abs(pv - want) / bound)
    # against the unrounded probabilities: within the bfloat16 rounding of P
    p64 = p.astype(np.float64)
    bound += 2.0**-8 * (np.abs(p64) @ np.abs(v64))
    assert np.all(np.abs(pv - p64 @ v64) <= bound)


@pytest.mark.parametrize("path", ALL_NATIVE)
def test_non_finite_values_stay_in_their_row_and_column(path, rng):
    rows, n, E, Ev = 37, 70, 33, 40
    _, q = bf16_values(rng, (rows, E), pad=1)
    _, k = bf16_values(rng, (n, E), pad=1)
    _, v = bf16_values(rng, (n, Ev), pad=1)
    q, k, v = q.copy(), k.copy(), v.copy()
    nan_bits = np.array([np.nan], BF16).view(np.uint16)[0]
    inf_bits = np.array([np.inf], BF16).view(np.uint16)[0]
    q[5, E - 1] = nan_bits   # the last (odd) feature: its pair's other half is padding
    k[69, 0] = inf_bits      # the last key of a partial panel
    v[3, Ev - 1] = nan_bits
    p = rng.random((rows, n)).astype(np.float32)
    p[20, 3] = 0.0           # a zero weight times NaN is still NaN (IEEE)
    scores, pv = _kernel.bf16_block_products(path, q, k, v, p, 1.0)
    bad = ~np.isfinite(scores)
    assert bad[5].all() and bad[:, 69].all()
    bad[5] = False
    bad[:, 69] = False
    assert not bad.any()
    bad = np.isnan(pv)
    assert bad[:, Ev - 1].all() and bad.sum() == rows


def test_paths_without_native_products_are_refused():
    bits = np.zeros((2, 2), np.uint16)
    p = np.zeros((2, 2), np.float32)
    for name in ("avx512", "avx2", "portable"):
        if name in _kernel.testable_isa_paths():
            with pytest.raises(ValueError, match="no native bfloat16 products"):
                _kernel.bf16_block_products(name, bits, bits, bits, p, 1.0)
    for name in NATIVE_PATHS:
        if name not in _kernel.testable_isa_paths():
            with pytest.raises(ValueError, match="not available on this CPU"):
                _kernel.bf16_block_products(name, bits, bits, bits, p, 1.0)


def test_avx512_cap_turns_native_products_off():
    """CATTN_ISA=avx512 is a cap below the bfloat16 levels: the process's path is avx512."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("CATTN_ISA", "CATTN_DISABLE_AVX2")}
    env["CATTN_ISA"] = "avx512"
    code = "from cattn import _kernel; print(_kernel.isa_path())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    supported = _kernel.supported_isa_paths()
    assert proc.stdout.strip() == ("avx512" if "avx512" in supported else supported[0])


# ------------------------------------------------------------------- whole attention calls

F32_TOL = TOLERANCE[np.float32]
BF16_ROUNDING = 2.0**-8
sdpa = cattn.scaled_dot_product_attention
ALL_PATHS = ALL_NATIVE + [native_path("avx512")]


def reference_with_weights(q, k, v, mask, options):
    """The float64 reference's results (as cattn returns them) and its weights."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    mask = as64(mask)
    want = reference.scaled_dot_product_attention(q, k, v, mask, **options)
    weights_options = dict(options, return_weights=True, return_lse=False)
    _, weights = reference.scaled_dot_product_attention(q, k, v, mask, **weights_options)
    return want if isinstance(want, tuple) else (want,), weights


def check_results(got, want, weights, v, p_rounded):
    """got against want (results of one call: output, then weights and lse when asked),
    the output within the float32 tolerance, P's rounding when p_rounded and its dtype's
    rounding; the rest within the float32 tolerance and their own dtype's rounding."""
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    v64 = v.astype(np.float64)
    group = weights.shape[-3] // v64.shape[-3] if v64.ndim >= 3 else 1
    if group > 1:
        v64 = np.repeat(v64, group, axis=-3)
    for i, (g, w) in enumerate(zip(got, want)):
        bound = F32_TOL["atol"] + F32_TOL["rtol"] * np.abs(w)
        if g.dtype != np.float32:
            bound = bound + BF16_ROUNDING * np.abs(w)
        if i == 0 and p_rounded:
            bound = bound + BF16_ROUNDING * (weights @ np.abs(v64))
        err = np.abs(g.astype(np.float64) - w)
        assert np.all(err <= bound), (i, np.max(err / bound))


def native_blocks_expected(path, L):
    """Whether a call runs some block products natively: on the native paths, unless every
    block has at most 4 query rows (decoding streams K and V instead)."""
    return path in NATIVE_PATHS and L > 4


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("case", ISA_CASES, ids=lambda c: f"L{c[1]}-S{c[2]}-E{c[3]}-Ev{c[4]}")
def test_bfloat16_attention_matches_float64(path, case, rng):
    q, k, v, mask, options = case_operands(case, rng, BF16)
    want, weights = reference_with_weights(q, k, v, mask, options)
    native = native_blocks_expected(path, q.shape[-2])
    for out_dtype in (None, np.float32):  # bfloat16 like the query, or float32
        got = sdpa(q, k, v, mask, out_dtype=out_dtype, _isa=path, **options)
        stats = _kernel.last_call_stats()
        assert stats["isa"] == path
        assert (stats["bf16_native_blocks"] > 0) == native, stats
        check_results(got, want, weights, v, p_rounded=native)


@pytest.mark.parametrize("path", ALL_NATIVE)
def test_out_float32_and_strided_operands(path, rng):
    """out= float32 (strided), bfloat16 operands as transposed, sliced and reversed views."""
    q = rng.standard_normal((2, 70, 3, 40)).astype(BF16).transpose(0, 2, 1, 3)
    k = rng.standard_normal((2, 3, 90, 80)).astype(BF16)[..., :40]
    v = rng.standard_normal((2, 3, 90, 24)).astype(BF16)[:, :, ::-1]
    out = np.zeros((2, 70, 3, 24), np.float32).transpose(0, 2, 1, 3)
    assert sdpa(q, k, v, is_causal=True, out=out, _isa=path) is out
    assert _kernel.last_call_stats()["bf16_native_blocks"] > 0
    want, weights = reference_with_weights(q, k, v, None, dict(is_causal=True))
    check_results(out, want, weights, v, p_rounded=True)


@pytest.mark.parametrize("path", ALL_NATIVE)
def test_grouped_heads_key_lengths_and_lse(path, rng):
    B, Hq, Hkv, L, S, E = 2, 8, 2, 37, 333, 64
    q = rng.standard_normal((B, Hq, L, E)).astype(BF16)
    k, v = (rng.standard_normal((B, Hkv, S, E)).astype(BF16) for _ in range(2))
    options = dict(enable_gqa=True, key_lengths=np.array([333, 100]), is_causal=True,
                   alignment="bottom_right", return_lse=True)
    got = sdpa(q, k, v, _isa=path, **options)
    assert _kernel.last_call_stats()["bf16_native_blocks"] > 0
    want, weights = reference_with_weights(q, k, v, None, options)
    check_results(got, want, weights, v, p_rounded=True)


@pytest.mark.parametrize("path", ALL_NATIVE)
@pytest.mark.parametrize("dtypes", [("float32", "bfloat16", "bfloat16"),
                                    ("bfloat16", "bfloat16", "float32"),
                                    ("float16", "bfloat16", "float16")], ids="-".join)
def test_native_products_only_where_both_operands_are_bfloat16(path, dtypes, rng):
    """Q·Kᵀ is native only for bfloat16 queries and keys (a float32 query is never rounded),
    P·V only for bfloat16 values; the other products widen their operands to float32."""
    q_dtype, k_dtype, v_dtype = (BF16 if d == "bfloat16" else np.dtype(d) for d in dtypes)
    L, S, E = 64, 200, 48
    q = rng.standard_normal((2, L, E)).astype(q_dtype)
    k = rng.standard_normal((2, S, E)).astype(k_dtype)
    v = rng.standard_normal((2, S, E)).astype(v_dtype)
    got = sdpa(q, k, v, out_dtype=np.float32, _isa=path, _block_sizes=(64, 100))
    native_scores = q_dtype == BF16 and k_dtype == BF16
    native_pv = v_dtype == BF16
    blocks = _kernel.last_call_stats()["bf16_native_blocks"]
    # 2 items × 2 key blocks, each with one product of each kind
    assert blocks == 4 * (native_scores + native_pv)
    want, weights = reference_with_weights(q, k, v, None, {})
    check_results(got, want, weights, v, p_rounded=native_pv)


@pytest.mark.parametrize("path", ALL_NATIVE)
def test_scores_are_float32_accurate_and_each_weight_rounds_once(path, rng):
    """With one-hot values, output j is weight j: the weights (from the float32 scores and
    softmax) hold the float32 tolerance, so Q·Kᵀ is rounded nowhere but in its float32
    sums; each output is its weight with P's one bfloat16 rounding (of the unnormalized
    probability, then divided by the row's float32 sum)."""
    L, S, E = 40, 64, 64
    q, k = (rng.standard_normal((1, n, E)).astype(BF16) for n in (L, S))
    v = np.eye(S, dtype=np.float32).astype(BF16)[None]
    out, weights = sdpa(q, k, v, return_weights=True, out_dtype=np.float32, _isa=path)
    assert _kernel.last_call_stats()["bf16_native_blocks"] > 0
    _, ref_weights = reference_with_weights(q, k, v, None, {})
    np.testing.assert_allclose(weights, ref_weights, **F32_TOL)
    error = np.abs(out.astype(np.float64) - weights)
    assert np.all(error <= BF16_ROUNDING * (1 + 1e-5) * weights + 1e-30)
    assert np.any(error > 0), "P was not rounded: the products were not bfloat16"


def test_decoding_streams_without_native_products(rng):
    """One query row: K and V stream through the float32 kernels (memory-bound), on every
    path, and the result is float32-accurate."""
    q = rng.standard_normal((1, 4, 1, 64)).astype(BF16)
    k, v = (rng.standard_normal((1, 4, 3000, 64)).astype(BF16) for _ in range(2))
    got = sdpa(q, k, v, out_dtype=np.float32)
    assert _kernel.last_call_stats()["bf16_native_blocks"] == 0
    want, weights = reference_with_weights(q, k, v, None, {})
    check_results(got, want, weights, v, p_rounded=False)

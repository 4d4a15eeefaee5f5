"""The encoder's fused row operations (cattn._encoder_ops) against their float64 NumPy
definitions, on every build this CPU runs (its default here; the baseline and AVX2 builds,
picked by CATTN_ISA, in child processes), at one and two threads."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import erf

from cattn import _encoder_ops as ops
from cattn import _kernel


def gelu64(v):
    return 0.5 * v * (1 + erf(v / math.sqrt(2)))


def layer_norm64(x, weight, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + beta


def tol(dtype):
    return dict(rtol=2e-6, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-13)


DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_bias_gelu(rng, dtype, num_threads):
    # odd widths (vector tails), a wide range (both tails of erf), and enough rows to thread
    for rows, n in [(1, 1), (3, 37), (700, 131)]:
        x = (rng.standard_normal((rows, n)) * 4).astype(dtype)
        bias = rng.standard_normal(n).astype(dtype)
        # the sum rounds to the dtype first, as any implementation's does
        want = gelu64((x + bias).astype(np.float64))
        got = x.copy()
        assert ops.bias_gelu(got, bias, num_threads=num_threads) is None
        if dtype == np.float32:
            # A&S 7.1.26 errs by <= 1.5e-7 in erf, so by <= 0.75e-7·|v| in v·Φ(v); plus the
            # float32 roundings of the result
            v = np.abs((x + bias).astype(np.float64))
            bound = 1e-7 * np.maximum(v, 1) + 2 * np.spacing(np.abs(want).astype(dtype))
            assert np.all(np.abs(got - want) <= bound)
        else:
            np.testing.assert_allclose(got, want, **tol(dtype))


def test_gelu_special_values():
    x = np.array([[0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0, np.inf, -np.inf,
                   np.nan, 1e-45]], dtype=np.float32)
    got = x.copy()
    ops.bias_gelu(got, np.zeros(x.shape[1], np.float32))
    with np.errstate(invalid="ignore"):
        want = gelu64(x.astype(np.float64))
    want[0, 9] = 0.0  # GELU(-inf) = -inf·Φ(-inf) -> 0 in the limit
    np.testing.assert_allclose(got[0, :10], want[0, :10], rtol=1e-6, atol=1e-37)
    assert np.isnan(got[0, 10]) and got[0, 11] >= 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_bias_residual_layernorm(rng, dtype, num_threads):
    for rows, n in [(1, 1), (5, 17), (300, 384)]:
        x = rng.standard_normal((rows, n)).astype(dtype) * 3 + 1
        bias = rng.standard_normal(n).astype(dtype)
        residual = rng.standard_normal((rows, n)).astype(dtype)
        weight = (1 + 0.3 * rng.standard_normal(n)).astype(dtype)
        beta = (0.1 * rng.standard_normal(n)).astype(dtype)
        f64 = [a.astype(np.float64) for a in (x, bias, residual, weight, beta)]
        want = layer_norm64(f64[0] + f64[1] + f64[2], f64[3], f64[4], 1e-12)
        out = np.empty_like(x)
        residual_before = residual.copy()
        ops.bias_residual_layernorm(x.copy(), bias, residual, weight, beta, 1e-12, out,
                                    num_threads=num_threads)
        np.testing.assert_allclose(out, want, **tol(dtype))
        np.testing.assert_array_equal(residual, residual_before)
        # in place over the residual, and with neither bias nor residual
        ops.bias_residual_layernorm(x.copy(), bias, residual, weight, beta, 1e-12, residual,
                                    num_threads=num_threads)
        np.testing.assert_allclose(residual, want, **tol(dtype))
        plain = x.copy()
        ops.bias_residual_layernorm(plain, None, None, weight, beta, 1e-5, plain)
        np.testing.assert_allclose(plain, layer_norm64(f64[0], f64[3], f64[4], 1e-5),
                                   **tol(dtype))


def test_layernorm_constant_row_and_large_offset():
    """A constant row normalizes to beta (variance 0 + eps); a large common offset does not
    cost precision (two-pass variance)."""
    n = 64
    weight, beta = np.ones(n, np.float32), np.linspace(-1, 1, n, dtype=np.float32)
    x = np.full((2, n), 7.0, np.float32)
    x[1] = 1000 + np.arange(n, dtype=np.float32) / n
    out = np.empty_like(x)
    ops.bias_residual_layernorm(x.copy(), None, None, weight, beta, 1e-12, out)
    np.testing.assert_allclose(out[0], beta, atol=1e-6)
    want = layer_norm64(x[1:].astype(np.float64), 1.0, beta.astype(np.float64), 1e-12)
    np.testing.assert_allclose(out[1:], want, atol=2e-3)  # inputs rounded at 1000 (ulp 6e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_layernorm(rng, dtype):
    vocab, positions_n, types_n, n, rows = 50, 20, 2, 24, 40
    word, position, token_type = (rng.standard_normal((m, n)).astype(dtype)
                                  for m in (vocab, positions_n, types_n))
    weight = (1 + 0.2 * rng.standard_normal(n)).astype(dtype)
    beta = rng.standard_normal(n).astype(dtype)
    ids = rng.integers(0, vocab, rows)
    pos = rng.integers(0, positions_n, rows)
    types = rng.integers(0, types_n, rows)
    out = np.empty((rows, n), dtype)
    ops.embed_layernorm(ids, pos, types, word, position, token_type, weight, beta, 1e-12, out)
    summed = (word[ids].astype(np.float64) + position[pos] + token_type[types])
    np.testing.assert_allclose(out, layer_norm64(summed, weight.astype(np.float64),
                                                 beta.astype(np.float64), 1e-12), **tol(dtype))
    bad = ids.copy()
    bad[3] = vocab
    with pytest.raises(ValueError, match="ids must lie in"):
        ops.embed_layernorm(bad, pos, types, word, position, token_type, weight, beta,
                            1e-12, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_scatter_and_gather_rows(rng, dtype, num_threads):
    lengths, L = [3, 0, 5, 1] * 40, 5
    padded_row = np.concatenate([b * L + np.arange(n) for b, n in enumerate(lengths)])
    packed = rng.standard_normal((sum(lengths), 300)).astype(dtype)
    bias = rng.standard_normal(300).astype(dtype)
    padded = np.full((len(lengths) * L, 300), -7, dtype)
    ops.scatter_rows(packed, bias, padded_row, padded, num_threads=num_threads)
    np.testing.assert_array_equal(padded[padded_row], packed + bias)
    untouched = np.setdiff1d(np.arange(len(padded)), padded_row)
    assert np.all(padded[untouched] == -7)
    back = np.empty_like(packed)
    ops.gather_rows(padded, padded_row, back, num_threads=num_threads)
    np.testing.assert_array_equal(back, packed + bias)
    ops.scatter_rows(packed, None, padded_row, padded)
    ops.gather_rows(padded, padded_row, back)
    np.testing.assert_array_equal(back, packed)
    with pytest.raises(ValueError, match="row indices"):
        ops.gather_rows(padded, padded_row + len(padded), back)
    with pytest.raises(ValueError, match="row index must have"):
        ops.scatter_rows(packed, None, padded_row[:-1], padded)
    with pytest.raises(ValueError, match="columns"):
        ops.scatter_rows(packed, None, padded_row, padded[:, :4].copy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_pool(rng, dtype, num_threads):
    lengths = [4, 1, 0, 7] * 30
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = rng.standard_normal((offsets[-1], 300)).astype(dtype)
    x64 = x.astype(np.float64)
    segments = [x64[offsets[b]:offsets[b + 1]] for b in range(len(lengths))]
    zero = np.zeros(x.shape[1])
    want = {
        ops.POOL_MEAN: [s.mean(0) if len(s) else zero for s in segments],
        ops.POOL_MAX: [s.max(0) if len(s) else zero for s in segments],
        ops.POOL_CLS: [s[0] if len(s) else zero for s in segments],
        ops.POOL_MEAN_SQRT_LEN: [s.sum(0) / math.sqrt(len(s)) if len(s) else zero
                                 for s in segments],
    }
    for mode, expected in want.items():
        out = np.full((len(lengths), x.shape[1]), np.nan, dtype)
        ops.pool(x, offsets, mode, out, num_threads=num_threads)
        np.testing.assert_allclose(out, np.array(expected), **tol(dtype))
    with pytest.raises(ValueError, match="pooling mode"):
        ops.pool(x, offsets, 9, out)


def test_bad_shapes_and_dtypes():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="bias must have 4"):
        ops.bias_gelu(x, np.zeros(5, np.float32))
    with pytest.raises(ValueError):  # mixed dtypes
        ops.bias_gelu(x, np.zeros(4, np.float64))
    with pytest.raises(ValueError):  # not C-contiguous
        ops.bias_gelu(np.zeros((4, 3), np.float32).T, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="num_threads"):
        ops.bias_gelu(np.zeros((300, 300), np.float32), np.zeros(300, np.float32),
                      num_threads=0)
    for not_an_integer in (2.0, "2", True):  # TypeError, as attention's num_threads
        with pytest.raises(TypeError, match="num_threads must be an integer"):
            ops.pool(x, np.array([0, 3], np.int64), 0, np.zeros((1, 4), np.float32),
                     num_threads=not_an_integer)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.bias_residual_layernorm(x, None, None, np.ones(4, np.float32),
                                    np.zeros(4, np.float32), 1e-5, np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("isa, build", [("portable", "generic"), ("avx2", "avx2+fma")])
def test_other_builds_in_a_child_process(isa, build):
    """CATTN_ISA picks the loops' build with the kernel's path: this file's tests pass on
    every build this CPU runs (this process covers its default one)."""
    if isa not in _kernel.testable_isa_paths():
        pytest.skip(f"this CPU lacks the {isa} path")
    if ops.simd_path() == build:
        pytest.skip("this process already runs that build")
    env = {k: v for k, v in os.environ.items() if k not in ("CATTN_ISA", "CATTN_DISABLE_AVX2")}
    env["CATTN_ISA"] = isa
    code = ("import sys, pytest; from cattn import _encoder_ops as ops; "
            f"assert ops.simd_path() == {build!r}, ops.simd_path(); "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r}, "
            "'-k', 'not child_process']))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# The layer steps' weights: plain (SciPy's BLAS), or packed for each path this CPU runs.
PACKINGS = [None] + [pytest.param(p, marks=pytest.mark.skipif(
    p not in _kernel.testable_isa_paths(), reason=f"this CPU lacks the {p} path"))
    for p in ("amx", "avx512_bf16", "avx512", "avx2", "portable", "wide16", "blas")]


def weight_for(weight, packing, transposed=False):
    """The weight as a layer step takes it: itself, or packed from its (out, in) layout."""
    if packing is None:
        return weight
    return ops.pack_linear_weight(np.ascontiguousarray(weight.T) if transposed else weight,
                                  isa=packing)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("packing", PACKINGS)
def test_project_scatter(rng, dtype, chunks, packing):
    T, K, N = 301, 40, 128  # T·N > the one-thread limit: threads share the chunks
    x = rng.standard_normal((T, K)).astype(dtype)
    weight, bias = rng.standard_normal((N, K)).astype(dtype), rng.standard_normal(N).astype(dtype)
    dest = rng.permutation(T + 9)[:T].astype(np.int64)  # into a larger padded layout
    padded = np.full((T + 9, N), -5, dtype)
    scratch = np.empty((chunks, -(-T // chunks), N), dtype)
    ops.project_scatter(x, weight_for(weight, packing), bias, dest, padded, scratch,
                        num_threads=2, isa=packing)
    want = x.astype(np.float64) @ weight.astype(np.float64).T + bias
    np.testing.assert_allclose(padded[dest], want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)
    untouched = np.setdiff1d(np.arange(T + 9), dest)
    assert np.all(padded[untouched] == -5)
    with pytest.raises(ValueError, match="rows per chunk"):
        ops.project_scatter(x, weight, bias, dest, padded, scratch[:, :-1].copy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 2, 5])
@pytest.mark.parametrize("packing", PACKINGS)
def test_attention_output_and_feed_forward(rng, dtype, chunks, packing):
    """The fused rest of a post-LN layer against its float64 NumPy definition."""
    T, E, F, rows_padded = 700, 24, 56, 760  # T·F > the one-thread limit
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    context, x = f(rows_padded, E), f(T, E)
    index = rng.permutation(rows_padded)[:T].astype(np.int64)
    w_out, b_out, w_in_t, b_in, w_ff_t, b_ff = f(E, E), f(E), f(E, F), f(F), f(F, E), f(E)
    n1w, n1b, n2w, n2b = 1 + 0.2 * f(E), f(E), 1 + 0.2 * f(E), f(E)
    a = {k: v.astype(np.float64) for k, v in dict(
        context=context, x=x, w_out=w_out, b_out=b_out, w_in_t=w_in_t, b_in=b_in,
        w_ff_t=w_ff_t, b_ff=b_ff, n1w=n1w, n1b=n1b, n2w=n2w, n2b=n2b).items()}
    h = layer_norm64(a["context"][index] @ a["w_out"].T + a["b_out"] + a["x"], a["n1w"],
                     a["n1b"], 1e-12)
    want = layer_norm64(gelu64(h @ a["w_in_t"] + a["b_in"]) @ a["w_ff_t"] + a["b_ff"] + h,
                        a["n2w"], a["n2b"], 1e-12)
    rows = -(-T // chunks)
    got = x.copy()
    ops.attention_output_and_feed_forward(
        context, index, got, weight_for(w_out, packing), b_out, n1w, n1b,
        weight_for(w_in_t, packing, True), b_in, weight_for(w_ff_t, packing, True), b_ff,
        n2w, n2b, 1e-12, np.empty((chunks, rows, 2 * E), dtype),
        np.empty((chunks, rows, F), dtype), num_threads=2, isa=packing)
    np.testing.assert_allclose(got, want, **(dict(rtol=1e-4, atol=1e-4) if dtype == np.float32
                                             else dict(rtol=1e-11, atol=1e-11)))
    with pytest.raises(ValueError, match="same chunks"):
        ops.attention_output_and_feed_forward(
            context, index, got, w_out, b_out, n1w, n1b, w_in_t, b_in, w_ff_t, b_ff, n2w, n2b,
            1e-12, np.empty((chunks, rows, 2 * E), dtype),
            np.empty((chunks + 1, rows, F), dtype))

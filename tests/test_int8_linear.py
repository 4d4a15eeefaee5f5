"""int8 linear layers (cattn._encoder_ops: Int8Weight, quantize_rows, int8_matmul,
linear_int8) on every int8 path this CPU runs (amx, avx512_vnni, avx_vnni, avx2, portable;
the emulation build runs amx and avx_vnni on any AVX512-VNNI CPU):

- the quantization of weights and rows equals the NumPy definition exactly;
- the int32 sums equal NumPy's integer product bit for bit (uint8 × int8);
- the dequantized result equals float64 arithmetic on the same levels, and stays close to
  the float product of the unquantized operands.

Shapes straddle the tiles (6 rows; 16- and 64-output panels), groups of 4 inputs (K not a
multiple of 4), the 16-float vectors of the row quantization, the 96-row blocks, and long
rows: K = 1536 (the second feed-forward layer's) over several row blocks and output
slices, and K = 385 and 1000, which a kernel blocking its inputs by 384 would end with a
short block. On the amx path, blocks of 16 rows or more take the tiles: 21 and 40 rows end
a 32-row block with a short second tile or a short first one, K = 1000 and 3 end with a
short group of 16, and 31, 70 and 130 outputs with a short panel.
"""
import os
import subprocess
import zlib
import sys

import numpy as np
import pytest

from cattn import _encoder_ops as ops

PATHS = [pytest.param(name, id=name, marks=pytest.mark.skipif(
    name not in ops.int8_supported_paths(), reason=f"this CPU lacks the int8 {name} path"))
    for name in ops.INT8_PATHS]
# (rows, outputs, inputs)
SHAPES = [(1, 1, 1), (1, 17, 5), (7, 33, 130), (13, 64, 384), (6, 100, 67), (97, 48, 1536),
          (200, 31, 3), (12, 129, 17), (5, 1, 64), (101, 130, 1536), (98, 70, 1000),
          (7, 20, 385), (21, 20, 77), (40, 40, 200)]


def rng_for(*key):
    """A generator seeded by the test's key (the same data in every process)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def quantize_rows_reference(x):
    """The definition: per row, the range [min(x, 0), max(x, 0)] in 255 steps; levels
    round(x / step) + zero point (ties to even), clipped to 0..255; float32 throughout."""
    x = x.astype(np.float32)
    lo = np.minimum(x.min(axis=1, initial=0), 0)
    hi = np.maximum(x.max(axis=1, initial=0), 0)
    scale = (hi - lo) / np.float32(255)
    usable = scale >= np.finfo(np.float32).tiny
    scale = np.where(usable, scale, np.float32(0))
    with np.errstate(divide="ignore"):
        inv = np.where(usable, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    zp = np.clip(np.rint(-lo * inv), 0, 255).astype(np.int32)
    levels = np.clip(np.rint(x * inv[:, None]).astype(np.int64) + zp[:, None], 0, 255)
    padded = np.zeros((x.shape[0], (x.shape[1] + 3) // 4 * 4), np.uint8)
    padded[:, :x.shape[1]] = levels
    return padded, scale, zp


def activations(rng, rows, n):
    """Rows like a transformer's: mostly small, a few outliers, some rows all positive (as
    after GELU), one row of zeros."""
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[:, ::7] *= 8
    if rows > 2:
        x[1] = np.abs(x[1])
        x[2] = 0
    return x


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantized_rows_equal_the_definition(path, shape):
    """Catches a zero point off by one, a tail (K mod 16) quantized differently from the
    body, padding bytes left unwritten, a rounding mode other than ties-to-even."""
    rows, _, n = shape
    x = activations(rng_for("rows", shape), rows, n)
    # exact halves of a step: ties must go to even as in NumPy
    x[0, :min(n, 4)] = [0.5, 1.5, -2.5, 3.5][:min(n, 4)]
    levels, scale, zp = ops.quantize_rows(x, isa=path)
    want_levels, want_scale, want_zp = quantize_rows_reference(x)
    np.testing.assert_array_equal(scale, want_scale)
    np.testing.assert_array_equal(zp, want_zp)
    np.testing.assert_array_equal(levels, want_levels)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int32_sums_equal_numpy_integer_products(path, shape):
    """Catches a signed/unsigned mix-up (levels >= 128 read as negative, or weights read
    as unsigned), the AVX2 emulation saturating (vpmaddubsw), tails of rows or panels
    dropped or read past their end."""
    rows, n_out, n_in = shape
    rng = rng_for("sums", shape)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    w[0, 0] = 50  # one outlier: that output's levels sit at the extremes +-127
    weight = ops.Int8Weight(w)
    levels = rng.integers(0, 256, (rows, (n_in + 3) // 4 * 4)).astype(np.uint8)
    levels[:, n_in:] = 0
    levels[0, :n_in] = 255  # the largest products, all of one sign
    got = ops.int8_matmul(levels, weight, isa=path)
    want = levels[:, :n_in].astype(np.int64) @ weight.levels().astype(np.int64).T
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_weight_quantization_and_layout():
    """Catches a scale per input instead of per output, levels packed in the wrong order
    (levels() undoes the packing), column sums over the padding."""
    rng = rng_for("weight")
    w = rng.standard_normal((21, 11)).astype(np.float32)
    w[3] = 0
    weight = ops.Int8Weight(w)
    scale = np.abs(w).max(axis=1) / np.float32(127)
    scale[3] = 1
    np.testing.assert_array_equal(weight.scale[:21], scale)
    np.testing.assert_array_equal(weight.levels(), np.rint(w / scale[:, None]))
    assert np.abs(weight.levels()).max() == 127
    np.testing.assert_array_equal(weight.col_sums[:21], weight.levels().sum(axis=1))
    assert not weight.col_sums[21:].any() and weight.packed.shape == (2, 3, 16, 4)
    # the packed groups: output j of panel p, inputs 4g .. 4g + 3
    assert weight.packed[1, 2, 4, 1] == weight.levels()[20, 9]
    np.testing.assert_allclose(weight.dequantized(), w, rtol=0, atol=scale.max() / 2)


def dequantized_reference(x, weight, bias):
    levels, scale, zp = quantize_rows_reference(x)
    x_hat = (levels[:, :x.shape[1]].astype(np.float64) - zp[:, None]) * scale[:, None]
    out = x_hat @ weight.dequantized().astype(np.float64).T
    return out if bias is None else out + bias


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_equals_float64_on_the_levels(path, shape, with_bias):
    """Catches the zero point's correction missing or applied with the wrong column sums,
    the row or weight scale of another row/output, the bias dropped or added twice."""
    rows, n_out, n_in = shape
    rng = rng_for("linear", shape)
    x = activations(rng, rows, n_in)
    w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    weight = ops.Int8Weight(w)
    out = np.full((rows, n_out), np.nan, np.float32)
    ops.linear_int8(x, weight, bias, out, isa=path)
    want = dequantized_reference(x, weight, bias)
    # float32 rounding of the int32 sum (up to 2^26) and of two products
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    # and within the rounding bound of the unquantized product: each operand off by at
    # most half its step (the rows' range / 255, the weights' max / 127)
    exact = x.astype(np.float64) @ w.astype(np.float64).T + (0 if bias is None else bias)
    _, x_step, _ = quantize_rows_reference(x)
    w_step = weight.scale[:n_out].astype(np.float64)
    bound = (np.abs(x) @ np.ones((n_in, 1)) * w_step / 2
             + x_step[:, None] / 2 * np.abs(w).sum(axis=1)
             + n_in * x_step[:, None] * w_step / 4)
    assert (np.abs(out - exact) <= bound * 1.01 + 1e-6).all()


@pytest.mark.parametrize("path", PATHS)
def test_linear_strided_rows_and_threads(path):
    """Rows of x and out taken from wider arrays, and 1 vs 2 threads: bit-identical (each
    row's result must not depend on its chunk). Catches a row stride taken as the width."""
    rng = rng_for("strided")
    big = rng.standard_normal((150, 90)).astype(np.float32)
    x = big[:, 5:72]
    w = rng.standard_normal((40, 67)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    weight = ops.Int8Weight(w)
    wide = np.zeros((150, 50), np.float32)
    ops.linear_int8(x, weight, bias, wide[:, 3:43], isa=path, num_threads=1)
    dense = np.zeros((150, 40), np.float32)
    ops.linear_int8(np.ascontiguousarray(x), weight, bias, dense, isa=path, num_threads=2)
    np.testing.assert_array_equal(wide[:, 3:43], dense)
    assert not wide[:, :3].any() and not wide[:, 43:].any()


def test_inputs_not_modified():
    rng = rng_for("inputs")
    x = rng.standard_normal((9, 30)).astype(np.float32)
    w = rng.standard_normal((5, 30)).astype(np.float32)
    x0, w0 = x.copy(), w.copy()
    weight = ops.Int8Weight(w)
    ops.linear_int8(x, weight, None, np.empty((9, 5), np.float32))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


def test_bad_input():
    w = np.ones((4, 6), np.float32)
    weight = ops.Int8Weight(w)
    with pytest.raises(TypeError, match="float32"):
        ops.Int8Weight(w.astype(np.float64))
    with pytest.raises(ValueError, match="finite"):
        ops.Int8Weight(np.full((2, 2), np.inf, np.float32))
    with pytest.raises(ValueError, match="takes 6 inputs"):
        ops.linear_int8(np.ones((3, 5), np.float32), weight, None, np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="4 columns"):
        ops.linear_int8(np.ones((3, 6), np.float32), weight, None, np.empty((3, 5), np.float32))
    with pytest.raises(TypeError, match="Int8Weight"):
        ops.linear_int8(np.ones((3, 6), np.float32), w, None, np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="not available"):
        ops.quantize_rows(np.ones((1, 6), np.float32), isa="no_such_path")
    with pytest.raises(ValueError, match="8 columns"):
        ops.int8_matmul(np.zeros((2, 6), np.uint8), weight)


@pytest.mark.parametrize("cap", ["portable", "avx2", "avx512"])
def test_attention_path_caps_the_int8_path(cap):
    """CATTN_ISA=portable runs the plain C loops, avx2 no AVX-512 instruction, avx512 no AMX
    tile."""
    from cattn import _kernel
    if cap not in _kernel.supported_isa_paths():
        pytest.skip(f"this CPU lacks the {cap} path")
    env = {k: v for k, v in os.environ.items() if k not in ("CATTN_ISA", "CATTN_DISABLE_AVX2")}
    env["CATTN_ISA"] = cap
    code = "from cattn import _encoder_ops as o; print(o.int8_path())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    allowed = {"portable": {"portable"}, "avx2": {"avx2", "avx_vnni"},
               "avx512": {"avx512_vnni", "avx2"}}[cap]
    assert proc.stdout.strip() in allowed


def test_layer_steps_take_int8_weights():
    """project_scatter with an Int8Weight: the int8 linear layer, scattered; a float64 layer
    refuses it. Catches the work area sized for float weights only (int8 rows need their
    own), an Int8Weight read as a packed float array."""
    rng = rng_for("steps")
    T, K, N, chunks = 70, 45, 33, 3
    x = rng.standard_normal((T, K)).astype(np.float32)
    weight = ops.Int8Weight(rng.standard_normal((N, K)).astype(np.float32))
    bias = rng.standard_normal(N).astype(np.float32)
    dest = rng.permutation(T + 5)[:T].astype(np.int64)
    padded = np.zeros((T + 5, N), np.float32)
    scratch = np.zeros((chunks, -(-T // chunks), N), np.float32)
    ops.project_scatter(x, weight, bias, dest, padded, scratch, num_threads=2)
    want = np.empty((T, N), np.float32)
    ops.linear_int8(x, weight, bias, want)
    np.testing.assert_allclose(padded[dest], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="float32 layers only"):
        ops.project_scatter(x.astype(np.float64), weight, bias.astype(np.float64), dest,
                            padded.astype(np.float64), scratch.astype(np.float64))

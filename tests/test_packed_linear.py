"""Linear layers on packed weights (cattn._encoder_ops.pack_linear_weight / linear): every
instruction-set path this CPU can run, against the float64 NumPy reference x·Wᵀ + b.

Shapes straddle the register tiles (row tiles of 12 or 6 rows, then 8/4/2/1), the panel
widths (1, 8, 16, 32 outputs), the input slices (inputs split in slices of 256 to 1024,
accumulated in the output) and the blocks of 128 rows; rows of x and out may be strided.
"""
import numpy as np
import pytest

from cattn import _encoder_ops as ops
from cattn import _kernel

PATHS = ("amx", "avx512_bf16", "avx512", "avx2", "portable", "wide16", "blas")


def path_param(name):
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        name not in _kernel.testable_isa_paths(), reason=f"this CPU lacks the {name} path"))


ALL_PATHS = [path_param(p) for p in PATHS]
DTYPES = [np.float32, np.float64]
# (rows, outputs, inputs)
SHAPES = [(1, 1, 1), (13, 47, 17), (7, 16, 5), (25, 33, 64), (12, 32, 300), (3, 100, 700),
          (300, 31, 40), (140, 65, 1100)]


def reference(x, weight, bias):
    out = x.astype(np.float64) @ weight.astype(np.float64).T
    return out if bias is None else out + bias


def check(got, want, dtype, inputs):
    # float32: about √inputs roundings of products of unit normals
    scale = np.sqrt(inputs) * (4e-7 if dtype == np.float32 else 1e-15) * 8
    np.testing.assert_allclose(got, want, rtol=0, atol=scale * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_matches_reference(path, dtype, shape, rng):
    rows, n_out, n_in = shape
    x = rng.standard_normal((rows, n_in)).astype(dtype)
    weight = rng.standard_normal((n_out, n_in)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    x_before, weight_before = x.copy(), weight.copy()
    packed = ops.pack_linear_weight(weight, isa=path)
    width = ops.linear_panel_width(dtype, isa=path)
    assert packed.shape == (-(-n_out // width), n_in, width)
    for use_bias in (True, False):
        for threads in (1, 2):
            out = np.full((rows, n_out), np.nan, dtype)
            ops.linear(x, packed, bias if use_bias else None, out, isa=path,
                       num_threads=threads)
            check(out, reference(x, weight, bias if use_bias else None), dtype, n_in)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(weight, weight_before)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1003, 2200), (2, 517, 4100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fewer_rows_than_threads_split_the_outputs(path, dtype, shape, rng):
    # A decoder's token: the threads share the output panels. The bugs: panels skipped or
    # done twice at a thread's boundary, the bias or the output shifted by a panel, a
    # tail panel (outputs not a multiple of the width) lost, results that change with the
    # thread count. Big enough for a parallel team; 3 threads: more threads than rows.
    rows, n_out, n_in = shape
    x = rng.standard_normal((rows, n_in)).astype(dtype)
    weight = rng.standard_normal((n_out, n_in)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    packed = ops.pack_linear_weight(weight, isa=path)
    results = []
    for threads in (1, 2, 3):
        big_out = np.full((rows, n_out + 7), 7.0, dtype)  # strided rows, guarded columns
        ops.linear(x, packed, bias, big_out[:, 3:3 + n_out], isa=path, num_threads=threads)
        assert (big_out[:, :3] == 7).all() and (big_out[:, 3 + n_out:] == 7).all()
        check(big_out[:, 3:3 + n_out], reference(x, weight, bias), dtype, n_in)
        results.append(big_out[:, 3:3 + n_out])
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_leave_the_rest_alone(path, dtype, rng):
    # x and out as column windows of wider arrays: only out's window is written
    rows, n_out, n_in = 29, 37, 70
    big_x = rng.standard_normal((rows, n_in + 9)).astype(dtype)
    weight = rng.standard_normal((n_out, n_in)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    big_out = np.full((rows, n_out + 11), 7.0, dtype)
    ops.linear(big_x[:, 3:3 + n_in], ops.pack_linear_weight(weight, isa=path), bias,
               big_out[:, 5:5 + n_out], isa=path, num_threads=2)
    check(big_out[:, 5:5 + n_out], reference(big_x[:, 3:3 + n_in], weight, bias), dtype, n_in)
    assert (big_out[:, :5] == 7).all() and (big_out[:, 5 + n_out:] == 7).all()


def test_no_inputs_gives_the_bias(rng):
    bias = rng.standard_normal(5).astype(np.float32)
    out = np.full((3, 5), np.nan, np.float32)
    packed = ops.pack_linear_weight(np.zeros((5, 0), np.float32))
    ops.linear(np.zeros((3, 0), np.float32), packed, bias, out)
    np.testing.assert_array_equal(out, np.broadcast_to(bias, (3, 5)))
    ops.linear(np.zeros((3, 0), np.float32), packed, None, out)
    assert (out == 0).all()


def test_default_path_is_tuned_or_blas():
    width = ops.linear_panel_width(np.float32)
    default = _kernel.isa_path()
    assert width == {"amx": 32, "avx512_bf16": 32, "avx512": 32, "avx2": 16}.get(default, 1)


def test_bad_input():
    x = np.zeros((4, 6), np.float32)
    weight = np.zeros((5, 6), np.float32)
    packed = ops.pack_linear_weight(weight)
    out = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="packed weight must have shape"):
        ops.linear(x, packed[:, :5], None, out)  # packed for 5 inputs, x has 6
    with pytest.raises(ValueError, match="packed weight must have shape"):
        ops.linear(x, packed, None, np.zeros((4, 40), np.float32))  # more outputs
    other = [p for p in _kernel.testable_isa_paths()
             if ops.linear_panel_width(np.float32, p) != packed.shape[2]]
    if other:  # packed for one path, used on another of a different width
        with pytest.raises(ValueError, match="packed weight must have shape"):
            ops.linear(x, packed, None, out, isa=other[0])
    with pytest.raises(ValueError, match="bias must have 5"):
        ops.linear(x, packed, np.zeros(4, np.float32), out)
    with pytest.raises(ValueError, match="out must have 4 rows"):
        ops.linear(x, packed, None, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="unit column stride"):
        ops.linear(np.zeros((4, 12), np.float32)[:, ::2], packed, None, out)
    with pytest.raises(ValueError, match="not available"):
        ops.pack_linear_weight(weight, isa="no-such-path")
    with pytest.raises((TypeError, ValueError)):
        ops.linear(x.astype(np.float64), packed, None, out)  # mixed dtypes


# ---- float32 matmul precision "high": split bfloat16 products (AMX)

def split_param():
    return pytest.mark.skipif(not ops.split_bf16_available("amx")
                              if "amx" in _kernel.testable_isa_paths() else True,
                              reason="split bfloat16 products need the amx path")


def check_split(got, x, weight, bias):
    """Three bfloat16 products per float32 product: each within 3·2^-16·|x||w| (the
    dropped lo·lo term and the two parts' remainders), plus float32 sums."""
    want = reference(x, weight, bias)
    size = np.abs(x).astype(np.float64) @ np.abs(weight).astype(np.float64).T
    n_in = x.shape[1]
    tol = (3.1 * 2.0 ** -16 + 2 * n_in * 2.0 ** -24) * size + 2.0 ** -22 * np.abs(want)
    bad = np.abs(got - want) > tol
    assert not bad.any(), (f"{bad.sum()} of {bad.size} outside the split-bfloat16 bound; "
                           f"worst |error| / (|x|·|w|) = {(np.abs(got - want) / size).max():.3g}")


@split_param()
@pytest.mark.parametrize("shape", SHAPES + [(64, 1152, 384), (33, 384, 1536)],
                         ids=lambda s: "x".join(map(str, s)))
def test_split_bf16_linear_within_its_bound(shape, rng):
    rows, n_out, n_in = shape
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((n_out, n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    x_before, weight_before = x.copy(), weight.copy()
    packed = ops.pack_linear_weight(weight, isa="amx", precision="high")
    assert packed.dtype == np.uint32 and packed.shape == ops.split_packed_shape(n_out, n_in)
    for use_bias in (True, False):
        for threads in (1, 2):
            out = np.full((rows, n_out), np.nan, np.float32)
            ops.linear(x, packed, bias if use_bias else None, out, isa="amx",
                       num_threads=threads)
            check_split(out, x, weight, bias if use_bias else None)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(weight, weight_before)


@split_param()
def test_split_bf16_is_finer_than_one_bfloat16_product(rng):
    # weights and inputs with all 24 bits used: one bfloat16 product would be off by ~2^-9
    x = (1 + rng.random((40, 64))).astype(np.float32)
    weight = (1 + rng.random((48, 64))).astype(np.float32)
    out = np.empty((40, 48), np.float32)
    ops.linear(x, ops.pack_linear_weight(weight, isa="amx", precision="high"), None, out,
               isa="amx")
    want = reference(x, weight, None)
    assert np.abs(out - want).max() / np.abs(want).max() < 2.0 ** -15


@split_param()
def test_split_bf16_strided_rows(rng):
    rows, n_out, n_in = 45, 70, 100
    big_x = rng.standard_normal((rows, n_in + 9)).astype(np.float32)
    weight = rng.standard_normal((n_out, n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    big_out = np.full((rows, n_out + 11), 7.0, np.float32)
    ops.linear(big_x[:, 3:3 + n_in], ops.pack_linear_weight(weight, isa="amx",
                                                            precision="high"),
               bias, big_out[:, 5:5 + n_out], isa="amx", num_threads=2)
    check_split(big_out[:, 5:5 + n_out], big_x[:, 3:3 + n_in], weight, bias)
    assert (big_out[:, :5] == 7).all() and (big_out[:, 5 + n_out:] == 7).all()


@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (64, 384)], ids=str)
def test_split_packing_holds_both_parts(shape, rng):
    # the layout, read back in NumPy (any CPU): hi + lo within 2^-16 of each weight, hi the
    # nearest bfloat16, zeros past the weight
    n_out, n_in = shape
    weight = rng.standard_normal(shape).astype(np.float32)
    packed = ops._pack_split(weight)
    assert packed.shape == ops.split_packed_shape(n_out, n_in)
    parts = []
    for part in packed:  # (panels, pairs, 32) -> (outputs, inputs)
        bits = part.transpose(0, 2, 1).reshape(-1, part.shape[1]).copy().view(np.uint16)
        parts.append((bits.astype(np.uint32) << 16).view(np.float32))
    hi, lo = parts
    assert not hi[n_out:].any() and not hi[:, n_in:].any() and not lo[n_out:].any()
    hi, lo = hi[:n_out, :n_in], lo[:n_out, :n_in]
    np.testing.assert_array_less(np.abs(weight - hi), 2.0 ** -8 * np.abs(weight) + 1e-38)
    np.testing.assert_array_less(np.abs(weight - hi - lo.astype(np.float64)),
                                 2.0 ** -16 * np.abs(weight) + 1e-38)


def test_high_precision_elsewhere_is_highest(rng):
    weight = rng.standard_normal((40, 30)).astype(np.float32)
    for path in _kernel.testable_isa_paths():
        if path != "amx":
            np.testing.assert_array_equal(
                ops.pack_linear_weight(weight, isa=path, precision="high"),
                ops.pack_linear_weight(weight, isa=path))
    # float64 layers have one precision
    w64 = weight.astype(np.float64)
    np.testing.assert_array_equal(ops.pack_linear_weight(w64, precision="high"),
                                  ops.pack_linear_weight(w64))


def test_split_bad_input(rng):
    weight = rng.standard_normal((5, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="precision must be one of"):
        ops.pack_linear_weight(weight, precision="medium")
    bad = weight.copy()
    bad[1, 2] = np.inf
    if "amx" in _kernel.testable_isa_paths():
        with pytest.raises(ValueError, match="must be finite"):
            ops.pack_linear_weight(bad, isa="amx", precision="high")
    split = ops._pack_split(weight)
    x, out = np.zeros((4, 6), np.float32), np.zeros((4, 5), np.float32)
    with pytest.raises(TypeError, match="float32 layers only"):
        ops.linear(x.astype(np.float64), split, None, out.astype(np.float64))
    with pytest.raises(ValueError, match="packed weight must have shape"):
        ops.linear(np.zeros((4, 40), np.float32), split, None, out)  # 40 inputs, not 6
    for path in _kernel.testable_isa_paths():
        if path != "amx":
            with pytest.raises(ValueError, match="only the amx path"):
                ops.linear(x, split, None, out, isa=path)
    with pytest.raises(ValueError, match="packed by pack_linear_weight"):
        ops.linear(x, weight, None, out)

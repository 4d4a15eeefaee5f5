"""The core call against the float64 reference: shapes and block boundaries, broadcasting,
empty sizes, strides and `out=`, scale, masks, top-left causal, threads, dtypes, and that no
input is ever written. The reference itself is checked first, on a case small enough to
compute with Python loops.

The kernel works on blocks of 128 query rows and 256 keys, so the sizes 127/128/129/300 and
511/512/513/1100 put rows and keys on either side of a block edge (512 keys: two blocks).
"""
import math

import numpy as np
import pytest

import cattn
from cattn import reference
from conftest import assert_matches_reference, tolerance

# A warning (overflow, invalid value, 0/0) is a failure everywhere in this file.
pytestmark = pytest.mark.filterwarnings("error")

sdpa = cattn.scaled_dot_product_attention
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True, scope="module")
def single_threaded_reference_blas():
    """NumPy's BLAS on one thread while the reference runs: its products are small, and on
    shared cores a second OpenBLAS thread mostly spins (it made the reference 5x costlier).
    cattn is unaffected: it keeps BLAS on one thread during its calls anyway."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, shapes, dtype):
    """Random query, key and value of the given three shapes."""
    return tuple(randn(rng, shape, dtype) for shape in shapes)


# ------------------------------------------------------------------ the reference itself

def loop_attention(q, k, v, scale, visible):
    """Attention by its definition, one number at a time with math.exp (no NumPy)."""
    out, lse = [], []
    for i, q_row in enumerate(q):
        scores = {j: scale * sum(a * b for a, b in zip(q_row, k_row))
                  for j, k_row in enumerate(k) if visible(i, j)}
        total = sum(math.exp(s) for s in scores.values())
        out.append([sum(math.exp(s) * v[j][c] for j, s in scores.items()) / total
                    for c in range(len(v[0]))])
        lse.append(math.log(total))
    return np.array(out), np.array(lse)


@pytest.mark.parametrize("is_causal", [False, True])
def test_reference_matches_python_loops_on_two_queries_and_three_keys(is_causal):
    q = [[1.0, -0.5], [0.25, 2.0]]
    k = [[0.5, 1.0], [-1.0, 0.75], [2.0, -0.25]]
    v = [[1.0, 0.0, -2.0], [0.5, 3.0, 1.0], [-1.5, 1.0, 0.25]]
    want_out, want_lse = loop_attention(
        q, k, v, 1 / math.sqrt(2), lambda i, j: not (is_causal and j > i))
    arrays = [np.array(x) for x in (q, k, v)]
    got_out, got_lse = reference.scaled_dot_product_attention(
        *arrays, is_causal=is_causal, return_lse=True)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-14, atol=1e-15)
    # ... and cattn agrees with both.
    got_out, got_lse = sdpa(*arrays, is_causal=is_causal, return_lse=True)
    np.testing.assert_allclose(got_out, want_out, **tolerance(np.float64))
    np.testing.assert_allclose(got_lse, want_lse, **tolerance(np.float64))


# ------------------------------------------------------------------------------ shapes

SHAPES = {  # name: (query, key, value) shapes
    "no-lead-L<S": ((5, 16), (7, 16), (7, 16)),
    "E=1-Ev=5-L>S": ((4, 1), (3, 1), (3, 5)),
    "one-lead-E=3": ((3, 6, 3), (3, 9, 3), (3, 9, 4)),
    "L=1-E=64": ((2, 3, 1, 64), (2, 3, 10, 64), (2, 3, 10, 64)),
    "S=1-E=100": ((2, 3, 6, 100), (2, 3, 1, 100), (2, 3, 1, 7)),
    "L=S=1": ((1, 1), (1, 1), (1, 1)),
    "three-lead-E=128": ((2, 2, 2, 5, 128), (2, 2, 2, 7, 128), (2, 2, 2, 7, 32)),
    "E=256-Ev=16": ((2, 9, 256), (2, 11, 256), (2, 11, 16)),
    # Broadcasting of the leading dimensions.
    "kv-shared-by-heads": ((2, 3, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8)),
    "query-without-batch": ((3, 5, 8), (2, 1, 7, 8), (2, 1, 7, 6)),
    "each-broadcasts-differently": ((1, 3, 5, 8), (2, 3, 7, 8), (2, 1, 7, 8)),
    "one-query-matrix-for-all": ((5, 8), (2, 3, 7, 8), (7, 8)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_shapes_and_broadcasting(rng, shapes, dtype):
    out = assert_matches_reference(*qkv(rng, shapes, dtype))
    q_shape, k_shape, v_shape = shapes
    lead = np.broadcast_shapes(q_shape[:-2], k_shape[:-2], v_shape[:-2])
    assert out.shape == lead + (q_shape[-2], v_shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [511, 512, 513, 1100])
@pytest.mark.parametrize("L", [127, 128, 129, 300])
def test_block_boundaries(rng, L, S, dtype):
    assert_matches_reference(*qkv(rng, [(2, L, 16), (2, S, 16), (2, S, 8)], dtype))


EMPTY = {
    "batch=0": ((0, 3, 4, 8), (0, 3, 5, 8), (0, 3, 5, 8)),
    "heads=0-broadcast": ((2, 0, 4, 8), (2, 1, 5, 8), (2, 1, 5, 6)),
    "L=0": ((2, 0, 8), (2, 5, 8), (2, 5, 6)),
    "S=0": ((2, 4, 8), (2, 0, 8), (2, 0, 6)),
    "L=S=0": ((2, 0, 8), (2, 0, 8), (2, 0, 6)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", EMPTY.values(), ids=EMPTY.keys())
def test_zero_sizes(rng, shapes, dtype):
    assert_matches_reference(*qkv(rng, shapes, dtype), return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_keys_gives_zero_output_and_minus_inf_lse(rng, dtype):
    # Documented: a row that sees no key gets output 0 and lse -inf.
    out, lse = sdpa(*qkv(rng, [(2, 300, 8), (2, 0, 8), (2, 0, 6)], dtype), return_lse=True)
    assert out.shape == (2, 300, 6) and out.dtype == dtype
    assert np.all(out == 0)
    assert np.all(lse == -np.inf)


# ----------------------------------------------------------------------------- strides

def strided(shape, dtype, axis):
    """An uninitialized (NaN) array of `shape` that is every other element of a buffer twice
    as long along `axis`."""
    big = list(shape)
    big[axis] *= 2
    index = [slice(None)] * len(shape)
    index[axis] = slice(None, None, 2)
    return np.full(big, np.nan, dtype=dtype)[tuple(index)]


def in_layout(x, layout):
    """A view with x's values and the given memory layout (x itself stays untouched)."""
    if layout == "transposed":       # a (B, L, H, E) array seen as (B, H, L, E)
        view = np.empty(x.swapaxes(-3, -2).shape, x.dtype).swapaxes(-3, -2)
    elif layout == "sliced":         # x[:, ::2]
        view = strided(x.shape, x.dtype, -3)
    elif layout == "last-axis-strided":  # x[..., ::2]
        view = strided(x.shape, x.dtype, -1)
    elif layout == "reversed-rows":  # negative strides on the batch and row axes
        view = np.empty_like(x)[::-1, :, ::-1]
    elif layout == "reversed-all":
        view = np.empty_like(x)[::-1, ::-1, ::-1, ::-1]
    elif layout == "fortran":
        view = np.empty_like(x, order="F")
    else:
        raise ValueError(layout)
    view[...] = x
    assert view.strides != x.strides
    return view


LAYOUTS = ["transposed", "sliced", "last-axis-strided", "reversed-rows", "reversed-all",
           "fortran"]
MULTI_BLOCK = [(2, 3, 130, 16), (2, 3, 600, 16), (2, 3, 600, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layouts", [(lay,) * 3 for lay in LAYOUTS]
                         + [("transposed", "fortran", "reversed-rows"),
                            ("last-axis-strided", "sliced", "transposed")],
                         ids=lambda lays: "+".join(sorted(set(lays))))
def test_strided_inputs_give_the_contiguous_result_bitwise(rng, layouts, dtype):
    # Layout only changes addressing (offsets, leading dimensions, or one copy of a matrix
    # BLAS cannot read), never the arithmetic: the result is identical to the last bit.
    arrays = qkv(rng, MULTI_BLOCK, dtype)
    views = [in_layout(x, lay) for x, lay in zip(arrays, layouts)]
    got = assert_matches_reference(*views)
    np.testing.assert_array_equal(got, sdpa(*arrays))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_out_is_written_in_place(rng, layout, dtype):
    arrays = qkv(rng, MULTI_BLOCK, dtype)
    out = in_layout(np.full((2, 3, 130, 12), np.nan, dtype=dtype), layout)
    buffer = out.base if out.base is not None else out
    result = sdpa(*arrays, out=out)
    assert result is out
    np.testing.assert_array_equal(out, sdpa(*arrays))
    # Nothing outside the view was written: the gaps of the buffer still hold NaN.
    assert np.count_nonzero(np.isnan(buffer)) == buffer.size - out.size


@pytest.mark.parametrize("dtype", DTYPES + [np.float16])
def test_a_heads_last_result_has_the_same_bits(rng, dtype):
    """The private layout the PyTorch bridge asks for: 4-D results laid out in memory as
    (batch, L, heads, Ev). Bug caught: its rows written with the strides of the usual
    layout (heads overwriting each other), or a narrow result's rounding that made it
    contiguous again (a copy per layer in a model)."""
    q = rng.standard_normal((2, 6, 130, 12)).astype(dtype)
    k, v = (rng.standard_normal((2, 3, 70, 12)).astype(dtype) for _ in range(2))
    got = sdpa(q, k, v, is_causal=True, enable_gqa=True, _heads_last=True)
    assert got.transpose(0, 2, 1, 3).flags.c_contiguous
    np.testing.assert_array_equal(got, sdpa(q, k, v, is_causal=True, enable_gqa=True))
    three_d = sdpa(q[0], q[0], q[0], _heads_last=True)  # (no head axis: the usual layout)
    assert three_d.flags.c_contiguous


# --------------------------------------------------------------------------- the scale

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.05, 1.0, 2.5])
def test_scale(rng, scale, dtype):
    assert_matches_reference(*qkv(rng, [(2, 9, 100), (2, 530, 100), (2, 530, 5)], dtype),
                             scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_scale_is_one_over_sqrt_e(rng, dtype):
    arrays = qkv(rng, [(3, 20, 64), (3, 40, 64), (3, 40, 64)], dtype)
    np.testing.assert_array_equal(sdpa(*arrays), sdpa(*arrays, scale=1 / math.sqrt(64)))
    # ... and a different scale really changes the result.
    assert not np.allclose(sdpa(*arrays), sdpa(*arrays, scale=1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"return_weights": True}],
                         ids=["plain", "causal", "weights"])
def test_scores_far_beyond_the_range_of_exp(rng, options, dtype):
    # Integer queries and keys with a power-of-two scale make every score an exact integer
    # in both dtypes, in the thousands: exp of a raw score would overflow (past 88 in
    # float32, 709 in float64), so only the row-max shift of the softmax keeps it finite.
    query, key = (rng.integers(-7, 8, shape).astype(dtype)
                  for shape in [(2, 130, 64), (2, 600, 64)])
    value = randn(rng, (2, 600, 8), dtype)
    got = assert_matches_reference(query, key, value, scale=4.0, return_lse=True, **options)
    assert np.max(got[-1]) > 709


# ------------------------------------------------------------------------------- masks

B, H, L, S = 2, 3, 20, 530
MASK_SHAPES = {"(L,S)": (L, S), "(B,1,1,S)": (B, 1, 1, S), "(1,H,L,S)": (1, H, L, S),
               "(H,L,1)": (H, L, 1), "(B,H,L,S)": (B, H, L, S)}


def random_mask(rng, shape, kind):
    """True = attend for "bool"; for a float dtype, unit-scale values with 20% -inf."""
    if kind == "bool":
        return rng.random(shape) < 0.7
    mask = rng.standard_normal(shape)
    mask[rng.random(shape) < 0.2] = -np.inf
    return mask.astype(kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float32", "float64"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
def test_masks_broadcast(rng, mask_shape, kind, dtype):
    arrays = qkv(rng, [(B, H, L, 16), (B, H, S, 16), (B, H, S, 8)], dtype)
    assert_matches_reference(*arrays, random_mask(rng, mask_shape, kind))


MASK_VIEWS = {
    "transposed": lambda m: np.ascontiguousarray(m.swapaxes(-1, -2)).swapaxes(-1, -2),
    "reversed": lambda m: np.ascontiguousarray(m[:, ::-1, ::-1])[:, ::-1, ::-1],
    "strided": lambda m: np.repeat(m, 2, axis=-1)[..., ::2],
    "broadcast-view": lambda m: np.broadcast_to(m[:1], (B, H, L, S))[:, 0],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float64"])
@pytest.mark.parametrize("view", MASK_VIEWS.values(), ids=MASK_VIEWS.keys())
def test_masks_with_any_strides(rng, view, kind, dtype):
    arrays = qkv(rng, [(B, H, L, 16), (B, H, S, 16), (B, H, S, 8)], dtype)
    mask_view = view(random_mask(rng, (B, L, S), kind))[:, None]   # (B, 1, L, S)
    got = assert_matches_reference(*arrays, mask_view)
    np.testing.assert_array_equal(got, sdpa(*arrays, np.ascontiguousarray(mask_view)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_additive_mask_equals_shifted_scores(rng, dtype):
    # A mask constant along each row changes nothing; -inf removes exactly the bool-False keys.
    arrays = qkv(rng, [(2, 40, 16), (2, 600, 16), (2, 600, 8)], dtype)
    row_shift = randn(rng, (2, 40, 1), dtype)
    np.testing.assert_allclose(sdpa(*arrays, row_shift), sdpa(*arrays), **tolerance(dtype))
    keep = rng.random((40, 600)) < 0.5
    additive = np.where(keep, 0.0, -np.inf).astype(dtype)
    np.testing.assert_array_equal(sdpa(*arrays, additive), sdpa(*arrays, keep))


# ------------------------------------------------------------------------------ causal

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L, S", [(5, 9), (9, 9), (9, 5), (130, 600), (300, 129),
                                  (1, 600), (600, 1)])
def test_causal_top_left(rng, L, S, dtype):
    assert_matches_reference(*qkv(rng, [(2, L, 16), (2, S, 16), (2, S, 8)], dtype),
                             is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_is_a_lower_triangular_bool_mask(rng, dtype):
    arrays = qkv(rng, [(2, 130, 16), (2, 600, 16), (2, 600, 8)], dtype)
    tril = np.tri(130, 600, dtype=bool)
    np.testing.assert_allclose(sdpa(*arrays, is_causal=True), sdpa(*arrays, tril),
                               **tolerance(dtype))
    mask = rng.random((130, 600)) < 0.6
    assert_matches_reference(*arrays, mask, is_causal=True)


# ------------------------------------------------------------------------ out, threads

@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_written_and_returned(rng, dtype):
    arrays = qkv(rng, MULTI_BLOCK, dtype)
    out = np.full((2, 3, 130, 12), np.nan, dtype=dtype)
    result = assert_matches_reference(*arrays, is_causal=True, out=out)
    assert result is out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"is_causal": True},
                                     {"attn_mask": "bool"}, {"attn_mask": "float32"}],
                         ids=["plain", "causal", "bool-mask", "float-mask"])
def test_one_and_two_threads_agree_bitwise(rng, options, dtype):
    arrays = qkv(rng, [(2, 2, 300, 32), (2, 2, 1100, 32), (2, 2, 1100, 16)], dtype)
    options = dict(options)
    if "attn_mask" in options:
        options["attn_mask"] = random_mask(rng, (2, 1, 300, 1100), options["attn_mask"])
    one = sdpa(*arrays, num_threads=1, **options)
    two = sdpa(*arrays, num_threads=2, **options)
    np.testing.assert_array_equal(one, two)


# -------------------------------------------------------------- inputs are never written

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"attn_mask": "bool"}, {"attn_mask": "float32"},
                                     {"attn_mask": "float64", "is_causal": True, "scale": 0.3},
                                     {"out": True}, {"num_threads": 1}],
                         ids=["plain", "bool-mask", "float32-mask", "float64-mask-causal",
                              "out", "one-thread"])
def test_inputs_are_never_modified(rng, options, dtype):
    arrays = [in_layout(x, lay) for x, lay in
              zip(qkv(rng, MULTI_BLOCK, dtype), ["transposed", "last-axis-strided", "fortran"])]
    options = dict(options)
    if "attn_mask" in options:
        options["attn_mask"] = random_mask(rng, (2, 1, 130, 600), options["attn_mask"])
    if options.get("out"):
        options["out"] = np.empty((2, 3, 130, 12), dtype=dtype)
    inputs = arrays + ([options["attn_mask"]] if "attn_mask" in options else [])
    before = [x.copy() for x in inputs]
    assert_matches_reference(*arrays, **options)
    for x, x_before in zip(inputs, before):
        np.testing.assert_array_equal(x, x_before)


# ------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("dtypes", [(np.float32, np.float64, np.float64),
                                    (np.float64, np.float64, np.float32),
                                    (np.float64, np.float32, np.float64)])
def test_mixed_dtypes_raise_type_error(rng, dtypes):
    arrays = [randn(rng, shape, dt) for shape, dt in zip([(4, 8), (5, 8), (5, 8)], dtypes)]
    with pytest.raises(TypeError):
        sdpa(*arrays)

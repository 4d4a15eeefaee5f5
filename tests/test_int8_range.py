"""int8 keys and values over the whole float64 range: `quantize_kv` gives finite, positive
float32 scales or refuses clearly, and attention refuses scales it cannot use.

The kernel reads float32 scales, so a float64 row whose largest magnitude over 127 does
not fit in float32 (above about 4.3e40) cannot be stored as int8 codes with a usable scale.
"""
import numpy as np
import pytest

import cattn
from conftest import tolerance

sdpa = cattn.scaled_dot_product_attention
INT8_LIMIT = 127 * float(np.finfo(np.float32).max)   # the largest magnitude a row may hold


@pytest.mark.parametrize("magnitude", [1e-300, 1e-45, 1e-38, 1e-10, 1.0, 1e10, 1e30, 1e38,
                                       1e40, 4e40])
def test_quantize_kv_dequantizes_within_half_a_step_across_the_float64_range(magnitude):
    """Every row's codes times its scale give the row back within half a scale step (a
    scale that overflowed float32 would give inf; zero codes and NaN attention)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 5, 8)) * magnitude
    q, scale = cattn.quantize_kv(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 5)
    assert np.isfinite(scale).all() and (scale > 0).all()
    step = scale.astype(np.float64)[..., None]
    error = np.abs(q * step - x)
    # a scale that underflows float32 is 1 and its row rounds to zero codes
    tiny = (scale == 1) & (np.abs(x).max(-1) < 1)
    assert (error[~tiny] <= 0.5 * np.broadcast_to(step, x.shape)[~tiny] * (1 + 1e-6)).all()
    assert (q[tiny] == 0).all()


def test_quantize_kv_never_clips_a_code_where_float32_scales_are_subnormal():
    """Below ~1.5e-36 a row's scale is a subnormal float32, rounded to few bits: a scale
    rounded down pushed the largest code past 127, where it was clipped (a row of largest
    magnitude 2.67e-43 came back a third too small)."""
    largest = np.geomspace(1e-44, 1e-35, 4001)
    x = np.stack([largest, -largest / 3, largest / 7], axis=-1)
    q, scale = cattn.quantize_kv(x)
    step = scale.astype(np.float64)
    tiny = scale == 1   # underflowed: codes 0
    error = np.abs(q * step[:, None] - x).max(axis=-1)
    assert (error[~tiny] <= 0.5 * step[~tiny] * (1 + 1e-9)).all()
    assert (q[tiny] == 0).all()


@pytest.mark.parametrize("largest", [4.4e40, 1e100, float(np.finfo(np.float64).max)])
def test_quantize_kv_refuses_rows_beyond_a_float32_scale(largest):
    x = np.array([[1.0, -largest, 3.0], [1.0, 2.0, 3.0]])
    with np.errstate(all="raise"):   # and no NumPy warning on the way
        with pytest.raises(ValueError, match="largest magnitude.*too large for int8 codes with a float32 scale"):
            cattn.quantize_kv(x)


def test_quantize_kv_at_the_limit_is_exact_enough_for_attention():
    """Values just inside the range: attention over the int8 codes matches the reference
    over the dequantized float64 values (never NaN)."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 6, 8)).astype(np.float32)
    v = rng.uniform(-1, 1, (2, 6, 8)) * 1e30
    v[0, 0, 0] = INT8_LIMIT / 1e11   # another row scale: far apart magnitudes
    vq, v_scale = cattn.quantize_kv(v)
    got = sdpa(q, k, vq, v_scale=v_scale)
    dequantized = vq * v_scale.astype(np.float64)[..., None]
    want = cattn.reference.scaled_dot_product_attention(q.astype(np.float64),
                                                          k.astype(np.float64), dequantized)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got / 1e30, want / 1e30, **tolerance(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0, -0.5, 1e300])
@pytest.mark.parametrize("name", ["k_scale", "v_scale"])
def test_attention_refuses_scales_that_are_not_finite_and_positive(name, bad):
    """A NaN, infinite, zero or negative scale (or one that overflows float32) would give
    NaN or silently wrong attention."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 3, 8)).astype(np.float32)
    k, k_scale = cattn.quantize_kv(rng.standard_normal((2, 5, 8)).astype(np.float32))
    v, v_scale = cattn.quantize_kv(rng.standard_normal((2, 5, 8)).astype(np.float32))
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    scales[name] = scales[name].astype(np.float64)
    scales[name][1, 3] = bad
    before = scales[name].copy()
    with np.errstate(all="raise"):
        with pytest.raises(ValueError, match=f"{name} must be finite and positive"):
            sdpa(q, k, v, **scales)
    np.testing.assert_array_equal(scales[name], before)   # inputs are never modified


def test_attention_refuses_a_scale_of_the_wrong_shape():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 3, 8)).astype(np.float32)
    k, k_scale = cattn.quantize_kv(rng.standard_normal((2, 5, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="k_scale of shape .* must broadcast"):
        sdpa(q, k, k, k_scale=k_scale[:, :4], v_scale=k_scale)


def test_quantize_kv_of_one_row():
    """A 1-D x is one row: its scale is a 0-d array (assigning the scale of a row of zeros
    failed on the NumPy scalar it was)."""
    for x in (np.array([1.0, -2.0, 0.5]), np.zeros(3, np.float32)):
        q, scale = cattn.quantize_kv(x)
        assert q.shape == (3,) and scale.shape == () and scale.dtype == np.float32
        assert np.abs(q * np.float64(scale) - x).max() <= 0.5 * float(scale)

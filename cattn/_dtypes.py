"""Keys, values and queries stored in fewer bits: float16, bfloat16 and int8.

The computation runs in float32 (scores, softmax, running sums, the P·V accumulator). Queries
are converted to float32 here (they are small); keys and values are read in their own type
by the kernel, which converts them block by block, so a decoding step reads only the bytes
the cache holds. int8 keys and values carry one float32 scale per key (and head): the
kernel multiplies each key's scores by its key scale and the probabilities by its value
scale, never dequantizing the whole cache.

bfloat16 is `ml_dtypes.bfloat16` (the optional extra `cattn[bf16]`), recognised by its name:
cattn never imports ml_dtypes for arrays that already have that dtype.
"""
import sys

import numpy as np

from cattn import _kernel
from cattn._validation import broadcasts_to, check_ndarray, reject_masked

_Element = _kernel.Element
FLOAT32 = np.dtype(np.float32)
FLOAT16 = np.dtype(np.float16)
INT8 = np.dtype(np.int8)
NARROW_FLOATS = "float16 or bfloat16"


def is_bfloat16(dtype):
    # (kind and itemsize first: NumPy computes dtype.name in Python, slower than a tiny
    # call's kernel)
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def is_half(dtype):
    """float16 or bfloat16: stored in 16 bits, computed in float32."""
    return dtype == FLOAT16 or is_bfloat16(dtype)


def element_code(dtype):
    """How the kernel reads keys or values of this dtype (float32: as they are)."""
    if dtype == FLOAT16:
        return _Element.FLOAT16
    if dtype == INT8:
        return _Element.INT8
    if is_bfloat16(dtype):
        return _Element.BFLOAT16
    return _Element.NATIVE


def bfloat16_dtype():
    """ml_dtypes' bfloat16, imported only when asked for."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 needs the ml_dtypes package: pip install 'cattn[bf16]'"
                        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def result_dtype(dtype, name):
    """A dtype the result may take when computing in float32: float32, float16, bfloat16
    (given as a dtype, a type or a name)."""
    if isinstance(dtype, str) and dtype == "bfloat16" and "ml_dtypes" not in sys.modules:
        return bfloat16_dtype()
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype!r}"
                        ) from None
    if dtype != FLOAT32 and not is_half(dtype):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def result_dtype_or_none(dtype):
    """dtype as a numpy.dtype, or None when it names none."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def cache_dtype(dtype):
    """A KV cache's storage dtype: float32, float64, float16, bfloat16 or int8 (a dtype, a
    type or a name)."""
    if isinstance(dtype, str) and dtype == "bfloat16" and "ml_dtypes" not in sys.modules:
        return bfloat16_dtype()
    expected = "float32, float64, float16, bfloat16 (ml_dtypes.bfloat16) or int8"
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be {expected}, got {dtype!r}") from None
    if dtype not in (FLOAT32, np.dtype(np.float64), INT8) and not is_half(dtype):
        raise TypeError(f"dtype must be {expected}, got {dtype}")
    return dtype


def check_input_dtype(x, name, allow_int8):
    """A query (float16, bfloat16, float32), key or value (also int8) of a float32
    computation."""
    dtype = x.dtype
    if dtype == FLOAT32 or is_half(dtype) or (allow_int8 and dtype == INT8):
        return
    allowed = "float32, float16, bfloat16" + (" or int8 (with its scales)" if allow_int8
                                              else "")
    raise TypeError(f"{name} must have dtype {allowed} when computing in float32 (float64 "
                    f"inputs must all be float64), got {dtype}")


def scales_for(scale, name, x, x_name):
    """int8 keys or values' scales as a float32 (..., S, 1) array the kernel reads (a view
    when it can be one), or None for other dtypes; a clear error for a missing scale, a
    scale without int8, a wrong dtype or shape."""
    if x.dtype != INT8:
        if scale is not None:
            raise ValueError(f"{name} is only for int8 {x_name}, got {x_name} of dtype "
                             f"{x.dtype} (scales belong to quantized int8 data: see "
                             f"cattn.quantize_kv)")
        return None
    if scale is None:
        raise ValueError(f"int8 {x_name} needs {name}= (float32 scales broadcastable to "
                         f"{x.shape[:-1]}, one per key and head, as cattn.quantize_kv "
                         f"returns)")
    wanted = x.shape[:-1]
    if (type(scale) is np.ndarray and scale.dtype is FLOAT32 and scale.shape == wanted
            and scale.flags.c_contiguous and scale.flags.aligned):
        # what quantize_kv returns: only the values to check (a decoding step passes the
        # scales on every call, and the general path's broadcasts cost ~10 µs)
        _check_scale_values(scale, name, x_name)
        return scale[..., None]
    reject_masked(scale, name)
    scale = np.asarray(scale)
    if scale.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point (float32), got dtype {scale.dtype}")
    if not broadcasts_to(scale.shape, wanted):
        raise ValueError(f"{name} of shape {scale.shape} must broadcast to {x_name}'s "
                         f"shape without its feature axis, {wanted} (one scale per key "
                         f"and head)")
    with np.errstate(over="ignore"):  # a scale beyond float32 becomes inf: refused below
        scale32 = scale.astype(FLOAT32, copy=False)
    _check_scale_values(scale32, name, x_name)
    scale = np.broadcast_to(scale32, wanted)[..., None]
    if _kernel.gemm_row_stride(scale) < 0 or not scale.flags.aligned:
        scale = np.require(scale, requirements="CA")
    return scale


def _check_scale_values(scale32, name, x_name):
    """Every scale finite and positive: two reductions and no temporaries (a decode's scales
    are read on every call); NaN propagates through min and max and fails both tests."""
    if scale32.size and not (scale32.min() > 0 and scale32.max() < np.inf):
        raise ValueError(f"{name} must be finite and positive in float32 (int8 {x_name} "
                         f"stand for {x_name} * {name}), got a value that is NaN, infinite, "
                         f"zero, negative or beyond float32's range")


_INT8_LARGEST = 127 * float(np.finfo(FLOAT32).max)


def quantize_kv(x):
    """Symmetric int8 quantization of keys or values, one scale per row of the last axis.

    Parameters
    ----------
    x : ndarray (..., D) of float32, float64, float16 or bfloat16
        Finite values, e.g. keys (batch, heads, S, D).

    Returns
    -------
    q : ndarray (..., D), int8
        round(x / scale), in [-127, 127].
    scale : ndarray (...), float32
        max |x| / 127 of each row (1 for a row of zeros, or one whose scale underflows
        float32: its codes are 0), so that q * scale[..., None]
        approximates x within half a scale step per element. Pass it as `k_scale=` or
        `v_scale=` with q as the key or value.

    Raises
    ------
    TypeError
        x is not a floating-point ndarray.
    ValueError
        x has no axis, holds infinities or NaN, or a row whose largest magnitude exceeds
        127 x float32's maximum (about 4.3e40: the kernel reads float32 scales).

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> k = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]], dtype=np.float32)
    >>> q, scale = cattn.quantize_kv(k)
    >>> q.tolist(), scale.tolist()
    ([[64, -127, 32], [0, 0, 0]], [0.007874015718698502, 1.0])
    """
    check_ndarray(x, "x", " of floats")
    reject_masked(x, "x")
    if not (x.dtype.kind == "f" or is_bfloat16(x.dtype)):
        raise TypeError(f"x must hold float32, float64, float16 or bfloat16 values, got "
                        f"dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (the features of each row)")
    wide = x.astype(np.float64)
    if not np.all(np.isfinite(wide)):
        raise ValueError("x must be finite to be quantized (it holds inf or NaN)")
    largest = np.max(np.abs(wide), axis=-1, initial=0.0)
    exact = largest / 127
    with np.errstate(over="ignore"):  # a scale beyond float32 becomes inf: refused below
        scale = exact.astype(FLOAT32)
    # rounded down (by far, where the scale is a subnormal float32), the scale would put
    # the largest code past 127: round it up instead
    scale = np.where(scale < exact, np.nextafter(scale, FLOAT32.type(np.inf)), scale)
    if np.isinf(scale).any():
        raise ValueError(f"x has a row whose largest magnitude, {largest.max():.6g}, is too "
                         f"large for int8 codes with a float32 scale (at most 127 x "
                         f"float32's maximum, about {_INT8_LARGEST:.3g})")
    # a row of zeros, or one so small that its scale underflows float32, has scale 1 (its
    # values round to 0): never a division by zero
    scale[scale == 0] = 1
    q = np.clip(np.rint(wide / scale[..., None].astype(np.float64)), -127, 127)
    return q.astype(INT8), scale

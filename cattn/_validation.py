"""The checks every entry point shares (the front, the layers, the caches, the models), each
spelled once, with one wording: what was expected and what came.

Compiled by Cython like the front (see setup.py): the front calls these on every call.
"""
import math
import numbers
import operator
import sys

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Positive numbers that stay finite and nonzero once rounded to the dtype (scale, softcap).
_POSITIVE_RANGE = {np.dtype(np.float32): (2.0**-150, float(np.finfo(np.float32).max)),
                   np.dtype(np.float64): (0.0, math.inf)}


def check_int(x, name, minimum=None, expected="an integer"):
    """x as a Python int: an integer (NumPy's included), not a bool, >= minimum if given."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__}")
    x = operator.index(x)
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def check_flag(x, name):
    """x as a Python bool: True or False (NumPy's bool too), nothing truthy."""
    if x is False or x is True:
        return x
    if not isinstance(x, np.bool_):
        raise TypeError(f"{name} must be True or False, got {x!r}")
    return bool(x)


def check_no_dropout(dropout_p):
    """dropout_p must be a real zero (inference only): not a bool, not a complex zero."""
    if type(dropout_p) is float and dropout_p == 0:  # the default, checked first
        return
    if (isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real)
            or dropout_p != 0):
        raise ValueError(f"dropout_p must be 0: cattn computes attention for inference, "
                         f"got {dropout_p!r}")


def window_pair(window):
    """window's two sides (left, right) from a tuple, a list or a 1-D array of two: no
    other iterable (a generator would be consumed, a set has no order)."""
    if (isinstance(window, (tuple, list)) and len(window) == 2) or (
            isinstance(window, np.ndarray) and window.shape == (2,)):
        return window[0], window[1]
    raise TypeError(f"window must be a pair (left, right) of ints or None, as a tuple or a "
                    f"list, got {window!r}")


def check_ndarray(x, name, kinds=""):
    """x itself when it is a numpy.ndarray; `kinds` says which ones are expected."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray{kinds}, got {type(x).__name__}")
    return x


def is_masked_array(x):
    """Whether x is a NumPy masked array, without importing numpy.ma (30-70 ms, most of a
    first call's cost): a masked array exists only once numpy.ma has been imported."""
    ma = sys.modules.get("numpy.ma")
    return ma is not None and isinstance(x, ma.MaskedArray)


def reject_masked(x, name):
    """A masked array's mask would be silently ignored: refuse it."""
    if is_masked_array(x):
        raise TypeError(f"{name} must be a plain numpy.ndarray, got a masked array (its mask "
                        f"would be ignored: pass .filled() data and an attn_mask instead)")


def broadcasts_to(shape, target):
    """Whether an array of `shape` broadcasts to exactly `target`."""
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def check_float_dtype(dtype, name="dtype"):
    """dtype as a numpy.dtype, float32 or float64."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_positive_float(x, name, dtype):
    """x as a Python float: a real number, not a bool, finite and > 0 once rounded to dtype."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {type(x).__name__}")
    try:
        x = float(x)
    except OverflowError:
        raise ValueError(f"{name} must be finite and > 0, got an integer too large for a "
                         f"float") from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {x}")
    low, high = _POSITIVE_RANGE[dtype]  # the kernel computes in the inputs' dtype
    if not low < x <= high:
        raise ValueError(f"{name} must be finite and > 0 in the inputs' dtype {dtype}, got "
                         f"{x}, which rounds to {'0' if x <= low else 'inf'} in {dtype}")
    return x


def check_cache_shape(num_kv_heads, head_dim, num_layers, value_dim, dtype):
    """A cache's (num_kv_heads, head_dim, num_layers, value_dim, dtype): sizes >= 1,
    value_dim defaulting to head_dim, dtype float32 or float64."""
    head_dim = check_int(head_dim, "head_dim", 1)
    return (check_int(num_kv_heads, "num_kv_heads", 1), head_dim,
            check_int(num_layers, "num_layers", 1),
            head_dim if value_dim is None else check_int(value_dim, "value_dim", 1),
            check_float_dtype(dtype))

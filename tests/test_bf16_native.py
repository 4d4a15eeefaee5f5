"""Native bfloat16 block products (the "avx512_bf16" and "amx" paths) against float64.

Q·Kᵀ: every product of two bfloat16 values is exact in float32, so the only error is the
float32 summation: |error| <= (pairs + 2) · 2^-23 · Σ|q·k| (each of the pairs of products
is one rounded add of the accumulator, plus the scale).

P·V: the probabilities are rounded to bfloat16 (to nearest even: relative error <= 2^-8
each, half a unit in the last of 8 significant bits), then summed as Q·Kᵀ. The result is compared with the float64 product of the
rounded P (the float32 summation bound), and with the unrounded P within 2^-8 · Σ|p·v| more.

Every path is run on this CPU where it exists; the others skip with a reason (and are
refused, never run).
"""
import numpy as np
import pytest

from cattn import _kernel

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

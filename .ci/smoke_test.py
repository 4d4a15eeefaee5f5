"""Smoke test of an installed cattn (from an sdist or a wheel), run outside the source tree:
the compiled core loads, runs on several threads, and matches the float64 reference."""
import os
import sys

import numpy as np

import cattn
from cattn import reference

here = os.path.dirname(os.path.abspath(cattn.__file__))
if os.path.exists(os.path.join(here, "..", "setup.py")):
    sys.exit(f"smoke test: imported the source tree at {here}, not the installed package")
config = cattn.show_config()
print("installed cattn", cattn.__version__, "at", here, config)
if os.environ.get("CATTN_FAIL_NO_OPENMP") and not config["openmp"]:
    sys.exit("smoke test: this build has no OpenMP")
for typing_file in ("py.typed", "_api.pyi", "_kernel.pyi", "_encoder_ops.pyi"):
    if not os.path.exists(os.path.join(here, typing_file)):
        sys.exit(f"smoke test: {typing_file} (type information) is missing")
rng = np.random.default_rng(0)
for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
    q, k, v = (rng.standard_normal((2, 4, 33, 16)).astype(dtype) for _ in range(3))
    for num_threads in (1, 2):
        got = cattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 num_threads=num_threads)
        want = reference.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                                      v.astype(np.float64), is_causal=True)
        err = float(np.max(np.abs(got - want)))
        if not err <= tol:
            sys.exit(f"smoke test: {np.dtype(dtype).name}, {num_threads} threads: max abs "
                     f"error {err:.3g} against the reference (tolerance {tol:g})")
layer = cattn.MultiHeadAttention(16, 4, rng=0)
out, _ = layer(rng.standard_normal((1, 5, 16)).astype(np.float32))
assert out.shape == (1, 5, 16)
print("smoke test passed")

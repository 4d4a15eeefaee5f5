"""The portable path (what CPUs without AVX2+FMA run: generic exp and row operations, block
GEMMs as micro-kernels on the compiler's generic vectors, no BLAS), forced on this
machine with CATTN_ISA=portable (or its older spelling CATTN_DISABLE_AVX2=1) in a child
process, against the float64 reference."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import json, numpy as np, cattn
    from cattn import reference
    rng = np.random.default_rng(3)
    worst = {}
    cases = [
        ((2, 3), 130, 700, 64, 64, {}),
        ((2, 3), 129, 513, 17, 9, {"is_causal": True}),
        ((2,), 1, 2100, 64, 40, {"alignment": "bottom_right", "is_causal": True,
                                 "key_lengths": [2100, 700]}),
        ((2, 3), 4, 300, 32, 32, {"window": (20, 3), "return_lse": True}),
        ((1, 2), 100, 300, 16, 8, {"return_weights": True, "softcap": 3.0}),
        ((2, 4), 50, 260, 8, 8, {"mask": "bool"}),
        ((2, 4), 50, 260, 8, 8, {"mask": "float"}),
    ]
    for dtype in (np.float32, np.float64):
        for batch, L, S, E, Ev, opts in cases:
            opts = dict(opts)
            q = rng.standard_normal(batch + (L, E)).astype(dtype)
            k = rng.standard_normal(batch + (S, E)).astype(dtype)
            v = rng.standard_normal(batch + (S, Ev)).astype(dtype)
            mask = opts.pop("mask", None)
            if mask == "bool":
                mask = rng.random((L, S)) > 0.3
            elif mask == "float":
                mask = rng.standard_normal((L, S)).astype(dtype)
            if "key_lengths" in opts:
                opts["key_lengths"] = np.array(opts["key_lengths"])
            got = cattn.scaled_dot_product_attention(q, k, v, mask, **opts)
            got2 = cattn.scaled_dot_product_attention(q, k, v, mask, num_threads=1, **opts)
            want = reference.scaled_dot_product_attention(
                q.astype(float), k.astype(float), v.astype(float),
                None if mask is None else (mask if mask.dtype == bool else mask.astype(float)),
                **opts)
            got = got if isinstance(got, tuple) else (got,)
            got2 = got2 if isinstance(got2, tuple) else (got2,)
            want = want if isinstance(want, tuple) else (want,)
            for g, g2, w in zip(got, got2, want):
                assert np.array_equal(g, g2), "threads changed the result"
                finite = np.isfinite(w)
                assert np.array_equal(finite, np.isfinite(g))
                err = float(np.max(np.abs(g[finite] - w[finite]), initial=0))
                name = np.dtype(dtype).name
                worst[name] = max(worst.get(name, 0.0), err)
    print(json.dumps({"config": cattn.show_config(), "worst": worst}))
""")


@pytest.mark.parametrize("setting", [{"CATTN_ISA": "portable"}, {"CATTN_DISABLE_AVX2": "1"}],
                         ids=["CATTN_ISA", "CATTN_DISABLE_AVX2"])
def test_portable_path_matches_the_reference(setting):
    env = {k: v for k, v in os.environ.items() if k not in ("CATTN_ISA", "CATTN_DISABLE_AVX2")}
    env.update(setting)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["config"]["isa"] == "portable"
    assert result["config"]["block_gemm"] == "portable micro-kernels"
    assert result["worst"]["float32"] < 2e-5
    assert result["worst"]["float64"] < 1e-12

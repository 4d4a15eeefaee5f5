"""BLAS is loaded on first need: the block GEMMs of the "blas" path and the encoder's plain
weights call scipy's BLAS through pointers that cattn._blas fills when a call first uses
them; every other path runs without importing scipy at all.

Each case runs in a new interpreter where scipy was never imported, so a call that reaches
the GEMMs before the pointers are filled dies there (SIGSEGV on a NULL pointer) instead of
passing on pointers an earlier test of the same process happened to fill. Results are
checked against the float64 reference in this process.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from cattn import _encoder_ops as ops
from cattn import _kernel
from conftest import reference64, tolerance
from test_encoder_ops import gelu64, layer_norm64
from test_isa_paths import ALL_PATHS
from test_paged import make_pool, reference_paged, shuffled_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: loads the inputs, runs `call` (code that sets `got`), saves the results and
# what it imported. Run from the repository root, it imports the cattn under test.
CHILD = """
import sys
import numpy as np
inputs = dict(np.load(sys.argv[1]))
import cattn
from cattn import _blas, _encoder_ops as ops
scipy_at_start = "scipy" in sys.modules
{call}
results = got if isinstance(got, tuple) else (got,)
np.savez(sys.argv[2], *results, scipy_at_start=scipy_at_start,
         scipy_after="scipy" in sys.modules, blas_loaded=_blas.loaded())
"""


def run_fresh(tmp_path, call, **inputs):
    """(results, flags) of `call` run on `inputs` in a new interpreter; flags say whether
    scipy was imported before and after the call and whether BLAS was loaded."""
    given, saved = tmp_path / "inputs.npz", tmp_path / "results.npz"
    np.savez(given, **inputs)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(call=call), str(given),
                           str(saved)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"the child exited with {proc.returncode} (-11: a GEMM "
                                  f"through a NULL BLAS pointer)\n{proc.stderr[-3000:]}")
    with np.load(saved) as f:
        results = tuple(f[f"arr_{i}"] for i in range(len(f.files) - 3))
        flags = {name: bool(f[name]) for name in ("scipy_at_start", "scipy_after",
                                                  "blas_loaded")}
    assert not flags["scipy_at_start"], "importing cattn imported scipy"
    return results, flags


def compare(got, want, dtype, **tol):
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        np.testing.assert_allclose(g, w, **(tol or tolerance(dtype)))


blas_path = pytest.mark.skipif("blas" not in _kernel.testable_isa_paths(),
                               reason="this build has no BLAS path to test")


def operands(rng, dtype, B=2, H=3, L=37, S=150, E=24, Ev=16, kv_dtype=None):
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(kv_dtype or dtype)
    v = rng.standard_normal((B, H, S, Ev)).astype(kv_dtype or dtype)
    return q, k, v


# Every way into the kernel's BLAS GEMMs: (dtype, key/value dtype, options).
KERNEL_BLAS_CASES = {
    "float32-mask": (np.float32, None, {"attn_mask": "bool"}),
    "float64-causal-lse": (np.float64, None, {"is_causal": True, "return_lse": True}),
    "weights": (np.float32, None, {"return_weights": True, "return_lse": True}),
    "float16-keys-values": (np.float32, np.float16, {"window": (20, 5)}),
    "float64-decode-split-keys": (np.float64, None, {"L": 1, "S": 5000}),
}


@blas_path
@pytest.mark.parametrize("case", list(KERNEL_BLAS_CASES))
def test_kernel_blas_path_loads_blas_itself(tmp_path, rng, case):
    """Bug caught: a kernel path that reaches gemm_ab/gemm_abt before BLAS is loaded."""
    dtype, kv_dtype, options = KERNEL_BLAS_CASES[case]
    options = dict(options)
    shape = {name: options.pop(name) for name in ("L", "S") if name in options}
    q, k, v = operands(rng, dtype, kv_dtype=kv_dtype, **shape)
    inputs = dict(q=q, k=k, v=v)
    call_mask = ""
    if options.pop("attn_mask", None) == "bool":
        inputs["mask"] = rng.random((q.shape[-2], k.shape[-2])) < 0.8
        call_mask = "inputs['mask'], "
    results, flags = run_fresh(
        tmp_path, "got = cattn.scaled_dot_product_attention(inputs['q'], inputs['k'], "
        f"inputs['v'], {call_mask}_isa='blas', num_threads=2, **{options!r})", **inputs)
    assert flags["blas_loaded"]
    compare(results, reference64(q, k, v, inputs.get("mask"), **options), dtype)


@blas_path
def test_varlen_blas_path_loads_blas_itself(tmp_path, rng):
    q_lens, k_lens, H, E = [5, 40, 1], [30, 40, 70], 2, 16
    q = rng.standard_normal((sum(q_lens), H, E)).astype(np.float32)
    k = rng.standard_normal((sum(k_lens), H, E)).astype(np.float32)
    v = rng.standard_normal((sum(k_lens), H, E)).astype(np.float32)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (q_lens, k_lens))
    results, flags = run_fresh(
        tmp_path, "got = cattn.varlen_attention(inputs['q'], inputs['k'], inputs['v'], "
        "inputs['cu_q'], inputs['cu_k'], is_causal=True, alignment='bottom_right', "
        "_isa='blas')", q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k)
    assert flags["blas_loaded"]
    per_sequence = [reference64(*(x[a:b].transpose(1, 0, 2) for x, a, b in (
        (q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1]))),
        is_causal=True, alignment="bottom_right").transpose(1, 0, 2)
        for i in range(len(q_lens))]
    compare(results, np.concatenate(per_sequence), np.float32)


@blas_path
def test_paged_blas_path_loads_blas_itself(tmp_path, rng):
    seq_lens, block_size, H, E = np.array([45, 7, 130], np.int32), 16, 2, 32
    k_cache, v_cache = make_pool(rng, 20, H, block_size, E, E, np.float32)
    table = shuffled_table(rng, seq_lens, block_size, 20)
    q = rng.standard_normal((3, H, 2, E)).astype(np.float32)
    results, flags = run_fresh(
        tmp_path, "got = cattn.paged_attention(inputs['q'], inputs['k'], inputs['v'], "
        "inputs['table'], inputs['seq_lens'], is_causal=True, return_lse=True, _isa='blas')",
        q=q, k=k_cache, v=v_cache, table=table, seq_lens=seq_lens)
    assert flags["blas_loaded"]
    compare(results, reference_paged(q, k_cache, v_cache, table, seq_lens, is_causal=True,
                                     return_lse=True), np.float32)


ENCODER_TOLERANCE = {np.float32: dict(rtol=1e-4, atol=1e-4),
                     np.float64: dict(rtol=1e-11, atol=1e-11)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encoder_plain_weights_load_blas_themselves(tmp_path, rng, dtype):
    """A plain (unpacked) weight's GEMM is BLAS's on every path. Bug caught: the encoder's
    layer steps calling BLAS before it is loaded."""
    T, K, N = 301, 40, 64
    x, weight, bias = (rng.standard_normal(s).astype(dtype) for s in ((T, K), (N, K), (N,)))
    dest = rng.permutation(T + 9)[:T].astype(np.int64)
    results, flags = run_fresh(
        tmp_path, "padded = np.zeros((inputs['x'].shape[0] + 9, inputs['bias'].shape[0]), "
        "inputs['x'].dtype)\n"
        "ops.project_scatter(inputs['x'], inputs['weight'], inputs['bias'], inputs['dest'], "
        "padded, np.empty((2, 151, padded.shape[1]), padded.dtype), num_threads=2)\n"
        "got = padded", x=x, weight=weight, bias=bias, dest=dest)
    assert flags["blas_loaded"]
    want = np.zeros((T + 9, N))
    want[dest] = x.astype(np.float64) @ weight.astype(np.float64).T + bias
    compare(results, want.astype(dtype), dtype, **ENCODER_TOLERANCE[dtype])


def test_encoder_layer_with_plain_weights_loads_blas_itself(tmp_path, rng):
    T, E, F = 40, 24, 56
    f = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    a = dict(context=f(T + 5, E), x=f(T, E), w_out=f(E, E), b_out=f(E), w_in_t=f(E, F),
             b_in=f(F), w_ff_t=f(F, E), b_ff=f(E), n1w=1 + 0.2 * f(E), n1b=f(E),
             n2w=1 + 0.2 * f(E), n2b=f(E), index=rng.permutation(T + 5)[:T].astype(np.int64))
    results, flags = run_fresh(
        tmp_path, "i = inputs\ngot = i['x'].copy()\n"
        "ops.attention_output_and_feed_forward(i['context'], i['index'], got, i['w_out'], "
        "i['b_out'], i['n1w'], i['n1b'], i['w_in_t'], i['b_in'], i['w_ff_t'], i['b_ff'], "
        "i['n2w'], i['n2b'], 1e-12, np.empty((1, 40, 48)), np.empty((1, 40, 56)))", **a)
    assert flags["blas_loaded"]
    h = layer_norm64(a["context"][a["index"]] @ a["w_out"].T + a["b_out"] + a["x"], a["n1w"],
                     a["n1b"], 1e-12)
    want = layer_norm64(gelu64(h @ a["w_in_t"] + a["b_in"]) @ a["w_ff_t"] + a["b_ff"] + h,
                        a["n2w"], a["n2b"], 1e-12)
    compare(results, want, np.float64, **ENCODER_TOLERANCE[np.float64])


@pytest.mark.parametrize("path", [None] + ALL_PATHS)
def test_linear_loads_blas_only_on_the_blas_path(tmp_path, rng, path):
    """A weight packed for the BLAS path (width 1) is multiplied by BLAS; every other
    packing by cattn's micro-kernels, without scipy. Bugs caught: the BLAS path's linear
    layer before BLAS is loaded; scipy imported by a packing that never calls BLAS."""
    x, weight, bias = (rng.standard_normal(s).astype(np.float32)
                       for s in ((70, 33), (20, 33), (20,)))
    results, flags = run_fresh(
        tmp_path, f"packed = ops.pack_linear_weight(inputs['weight'], isa={path!r})\n"
        "got = np.empty((70, 20), np.float32)\n"
        f"ops.linear(inputs['x'], packed, inputs['bias'], got, isa={path!r}, num_threads=2)",
        x=x, weight=weight, bias=bias)
    uses_blas = ops.linear_panel_width(np.float32, path) == 1
    assert flags["blas_loaded"] == flags["scipy_after"] == uses_blas
    want = x.astype(np.float64) @ weight.astype(np.float64).T + bias
    compare(results, want, np.float32, **ENCODER_TOLERANCE[np.float32])


@pytest.mark.parametrize("path", ALL_PATHS)
def test_attention_loads_blas_only_on_paths_that_call_it(tmp_path, rng, path):
    """Bugs caught: a path that calls BLAS without loading it (the portable path of a
    compiler without generic vectors is one); scipy imported by a path that never calls
    BLAS (the weights output on the micro-kernel paths included)."""
    q, k, v = operands(rng, np.float32)
    results, flags = run_fresh(
        tmp_path, "got = cattn.scaled_dot_product_attention(inputs['q'], inputs['k'], "
        f"inputs['v'], is_causal=True, return_weights=True, _isa={path!r})", q=q, k=k, v=v)
    uses_blas = _kernel.calls_blas(_kernel.isa_index(path))
    assert flags["blas_loaded"] == flags["scipy_after"] == uses_blas
    compare(results, reference64(q, k, v, is_causal=True, return_weights=True), np.float32)


def test_first_call_on_the_default_path_imports_no_scipy(tmp_path, rng):
    """`import cattn` and a first call import no scipy where the default path has its own
    micro-kernels (AVX2, AVX-512, and the portable path of compilers with generic vectors).
    Bug caught: a module of the call's way importing scipy (or loading BLAS) up front."""
    if _kernel.calls_blas():
        pytest.skip("this build's default path calls BLAS")
    q, k, v = operands(rng, np.float32)
    results, flags = run_fresh(
        tmp_path, "got = cattn.scaled_dot_product_attention(inputs['q'], inputs['k'], "
        "inputs['v'])", q=q, k=k, v=v)
    assert not flags["blas_loaded"] and not flags["scipy_after"]
    compare(results, reference64(q, k, v), np.float32)


def test_first_call_does_not_import_numpy_ma():
    """Importing numpy.ma costs 30-70 ms, most of a first call's cost: `import cattn` and a
    first call leave it unimported (a masked array can only exist once it is imported,
    and is refused then). Bug caught: a module-level reference to np.ma."""
    child = ("import sys, numpy as np\n"
             "import cattn\n"
             "q = np.ones((1, 2, 5, 8), np.float32)\n"
             "cattn.scaled_dot_product_attention(q, q, q)\n"
             "cattn.MultiHeadAttention(8, 2)(q[0].transpose(1, 0, 2).reshape(1, 10, 8)[:, :5])\n"
             "print('numpy.ma' in sys.modules)\n"
             "import numpy.ma\n"
             "try:\n"
             "    cattn.scaled_dot_product_attention(np.ma.masked_array(q), q, q)\n"
             "except TypeError as e:\n"
             "    print('masked array' in str(e))\n")
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]


@blas_path
def test_blas_of_another_signature_is_refused(tmp_path):
    """A scipy whose sgemm/dgemm take other arguments (64-bit integers, say) is refused with
    an ImportError, never called. Bug caught: taking the capsule's pointer whatever its
    signature (a crash, or wrong results, inside the kernel)."""
    call = """
import ctypes, types
new_capsule = ctypes.pythonapi.PyCapsule_New
new_capsule.restype = ctypes.py_object
new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
name = b"void (char *, char *, long *, long *, long *)"
fake = types.ModuleType("scipy.linalg.cython_blas")
fake.__pyx_capi__ = {"sgemm": new_capsule(1, name, None), "dgemm": new_capsule(1, name, None)}
sys.modules["scipy.linalg.cython_blas"] = fake
q = np.ones((1, 1, 4, 8), np.float32)
try:
    cattn.scaled_dot_product_attention(q, q, q, _isa="blas")
    raise AssertionError("no error")
except ImportError as e:
    assert "no sgemm of signature" in str(e), e
got = np.zeros(1)
"""
    _, flags = run_fresh(tmp_path, call)
    assert not flags["blas_loaded"]

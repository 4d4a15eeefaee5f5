"""Malformed calls: each is rejected with a ValueError, TypeError or MemoryError whose message
says what was expected, before the kernel runs, and the process lives on.

The catalogue is one table: (id, call, exception type, regex of the message). Sizes that do
not fit 32-bit indexing and allocations that cannot succeed are built from zero-stride views
(np.broadcast_to), so no test really uses memory.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import cattn
from conftest import assert_matches_reference

sdpa = cattn.scaled_dot_product_attention
merge = cattn.merge_attention

B, L, S, E, EV = 2, 3, 5, 4, 6


def _arr(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


Q, K, V = _arr((B, L, E), seed=1), _arr((B, S, E), seed=2), _arr((B, S, EV), seed=3)
Q4, K4, V4 = _arr((B, 4, L, E), seed=4), _arr((B, 2, S, E), seed=5), _arr((B, 2, S, EV), seed=6)


def call(**changes):
    """A call of sdpa on the valid (Q, K, V) with some arguments replaced."""
    args = dict(query=Q, key=K, value=V)
    args.update(changes)
    return lambda: sdpa(**args)


def gqa(**changes):
    args = dict(query=Q4, key=K4, value=V4, enable_gqa=True)
    args.update(changes)
    return lambda: sdpa(**args)


def zeros_view(shape, dtype=np.float32):
    """A read-only array of any shape backed by one element (all strides 0)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def read_only(x):
    x = x.copy()
    x.flags.writeable = False
    return x


def misaligned_out():
    """A float32 (B, L, EV) array whose data starts one byte past an aligned address."""
    raw = np.zeros(B * L * EV * 4 + 1, np.uint8)
    return raw[1:].view(np.float32).reshape(B, L, EV)


def self_overlapping_out():
    base = np.zeros((B, 1, EV), np.float32)
    return np.lib.stride_tricks.as_strided(base, (B, L, EV), (base.strides[0], 0, 4),
                                           writeable=True)


def out_over(x, shape=(B, L, EV)):
    """A writable view of x's memory with the output's shape (x must be large enough)."""
    return x.reshape(-1)[:int(np.prod(shape))].reshape(shape)


KV_MEM = np.zeros((B, S * 4, E), np.float32)  # key and value share this buffer
LSE = np.zeros((B, L), np.float32)
OUT = np.zeros((B, L, EV), np.float32)

HUGE = 2**31  # one past the largest 32-bit signed int
DTYPE_MSG = "float32(, | or )float64.*"
MASK_DTYPE_MSG = r"boolean \(True = attend\) or floating"

CATALOGUE = [
    # --- query, key, value: type, ndim, dtype
    ("query_1d", call(query=np.ones(E, np.float32)), ValueError, "at least 2 dimensions"),
    ("key_0d", call(key=np.ones((), np.float32)), ValueError,
     r"key must have at least 2 dimensions .* got shape \(\)"),
    ("query_list", call(query=Q.tolist()), TypeError, "query must be a numpy.ndarray"),
    ("key_python_float", call(key=1.0), TypeError, "key must be a numpy.ndarray.*got float"),
    ("value_none", call(value=None), TypeError, "value must be a numpy.ndarray.*NoneType"),
    ("query_int32", call(query=Q.astype(np.int32)), TypeError, DTYPE_MSG + ", got int32"),
    ("key_int64", call(key=K.astype(np.int64)), TypeError, DTYPE_MSG + ", got int64"),
    ("value_uint8", call(value=V.astype(np.uint8)), TypeError, DTYPE_MSG + ", got uint8"),
    ("query_bool", call(query=Q > 0), TypeError, DTYPE_MSG + ", got bool"),
    ("key_complex64", call(key=K.astype(np.complex64)), TypeError, DTYPE_MSG),
    ("value_complex128", call(value=V.astype(np.complex128)), TypeError, DTYPE_MSG),
    ("query_object", call(query=Q.astype(object)), TypeError, DTYPE_MSG + ", got object"),
    ("key_string", call(key=K.astype(str)), TypeError, DTYPE_MSG + ", got <U"),
    ("query_float16_key_float64", call(query=Q.astype(np.float16), key=K.astype(np.float64)),
     TypeError, "same dtype, got float16, float64 and float32"),
    ("query_longdouble", call(query=Q.astype(np.longdouble)), TypeError, DTYPE_MSG),
    ("query_big_endian", call(query=Q.astype(">f4"), key=K.astype(">f4"),
                              value=V.astype(">f4")), TypeError, DTYPE_MSG + ", got >f4"),
    ("mixed_dtypes", call(key=K.astype(np.float64)), TypeError,
     "same dtype, got float32, float64 and float32"),
    ("query_masked_array", call(query=np.ma.masked_less(Q, 0)), TypeError,
     "plain numpy.ndarray, got a masked array"),
    # --- shapes
    ("E_mismatch", call(key=_arr((B, S, E + 1))), ValueError, "same feature size E"),
    ("S_mismatch", call(value=_arr((B, S + 1, EV))), ValueError, "same number of keys S"),
    ("batch_mismatch", call(key=_arr((3, S, E)), value=_arr((3, S, EV))), ValueError,
     r"batch\) dimensions do not broadcast: query \(2,\), key \(3,\)"),
    ("batch_mismatch_value", call(value=_arr((4, S, EV))), ValueError,
     r"do not broadcast: .* value \(4,\)"),
    ("E_zero", call(query=_arr((B, L, 0)), key=_arr((B, S, 0))), ValueError,
     "at least one feature"),
    ("Ev_zero", call(value=_arr((B, S, 0))), ValueError, r"at least one feature.*Ev = 0"),
    # --- attn_mask
    ("mask_wrong_L", call(attn_mask=np.ones((L + 1, S), bool)), ValueError,
     r"attn_mask of shape \(4, 5\) does not broadcast to .* \(2, 3, 5\)"),
    ("mask_wrong_S", call(attn_mask=np.ones((L, S - 1), bool)), ValueError,
     "does not broadcast to the attention shape"),
    ("mask_wrong_batch", call(attn_mask=np.ones((3, L, S), bool)), ValueError,
     "does not broadcast"),
    ("mask_grows_batch", call(attn_mask=np.ones((7, B, L, S), bool)), ValueError,
     "does not broadcast"),
    ("mask_1d", call(attn_mask=np.ones(S, bool)), ValueError, "at least 2 dimensions"),
    ("mask_int", call(attn_mask=np.ones((L, S), np.int32)), TypeError, MASK_DTYPE_MSG),
    ("mask_uint8", call(attn_mask=np.ones((L, S), np.uint8)), TypeError, MASK_DTYPE_MSG),
    ("mask_complex", call(attn_mask=np.ones((L, S), complex)), TypeError, MASK_DTYPE_MSG),
    ("mask_object", call(attn_mask=np.ones((L, S), object)), TypeError, MASK_DTYPE_MSG),
    ("mask_string", call(attn_mask=np.full((L, S), "x")), TypeError, MASK_DTYPE_MSG),
    ("mask_list", call(attn_mask=[[True] * S] * L), TypeError,
     "attn_mask must be a numpy.ndarray"),
    ("mask_masked_array", call(attn_mask=np.ma.zeros((L, S))), TypeError, "masked array"),
    # --- out
    ("out_wrong_shape", call(out=np.zeros((B, L, EV + 1), np.float32)), ValueError,
     r"out must have shape \(2, 3, 6\) and dtype float32, got shape \(2, 3, 7\)"),
    ("out_wrong_dtype", call(out=np.zeros((B, L, EV), np.float64)), ValueError,
     "dtype float32, got shape .* and dtype float64"),
    ("out_list", call(out=OUT.tolist()), TypeError, "out must be a numpy.ndarray"),
    ("out_read_only", call(out=read_only(OUT)), ValueError, "out is read-only"),
    ("out_is_query", call(query=_arr((B, L, EV)), key=_arr((B, S, EV)),
                          out=None), None, None),  # placeholder, replaced below
    ("out_overlaps_value", call(value=V, out=out_over(V)), ValueError,
     "out overlaps value"),
    ("out_overlaps_mask", call(attn_mask=np.zeros((B, L, S * 2), np.float32)[..., :S],
                               out=None), None, None),  # placeholder, replaced below
    ("out_misaligned", call(out=misaligned_out()), ValueError, "out must be aligned"),
    ("out_self_overlapping", call(out=self_overlapping_out()), ValueError,
     "out has overlapping elements"),
    # --- key_lengths
    ("key_lengths_negative", call(key_lengths=np.array([-1, 2])), ValueError,
     r"key_lengths must lie in \[0, S=5\], got values from -1 to 2"),
    ("key_lengths_too_long", call(key_lengths=S + 1), ValueError,
     r"must lie in \[0, S=5\]"),
    ("key_lengths_uint_huge", call(key_lengths=np.array([1, 2**64 - 1], np.uint64)),
     ValueError, r"must lie in \[0, S=5\]"),
    ("key_lengths_float", call(key_lengths=np.array([1.0, 2.0])), TypeError,
     "key_lengths must be integers, got dtype float64"),
    ("key_lengths_bool", call(key_lengths=np.array([True, False])), TypeError,
     "key_lengths must be integers"),
    ("key_lengths_string", call(key_lengths="3"), TypeError, "key_lengths must be integers"),
    ("key_lengths_wrong_shape", call(key_lengths=np.array([1, 2, 3])), ValueError,
     r"key_lengths of shape \(3,\) must match the leading batch axes \(2,\)"),
    ("key_lengths_too_many_dims", call(key_lengths=np.ones((B, L), int)), ValueError,
     "must match the leading batch axes"),
    # --- window
    ("window_left_negative", call(window=(-1, 2)), ValueError, "window left must be >= 0"),
    ("window_right_negative", call(window=(None, -3)), ValueError,
     "window right must be >= 0, got -3"),
    ("window_scalar", call(window=3), TypeError, r"window must be a pair \(left, right\)"),
    ("window_triple", call(window=(1, 2, 3)), TypeError, "window must be a pair"),
    ("window_float", call(window=(1.5, None)), TypeError,
     "window left must be an integer, got float"),
    ("window_bool", call(window=(True, 1)), TypeError, "window left must be an integer"),
    # --- grouped-query attention
    ("gqa_heads_not_multiple", gqa(key=_arr((B, 3, S, E)), value=_arr((B, 3, S, EV))),
     ValueError, "multiple of key/value heads, got 4 query heads and 3"),
    ("gqa_key_value_heads_differ", gqa(value=_arr((B, 1, S, EV))), ValueError,
     "key and value must have the same number of heads, got 2 and 1"),
    ("gqa_zero_kv_heads", gqa(key=_arr((B, 0, S, E)), value=_arr((B, 0, S, EV))),
     ValueError, "multiple of key/value heads"),
    ("gqa_without_head_axis", call(query=Q[0], key=K[0], value=V[0], enable_gqa=True),
     ValueError, r"enable_gqa needs a head axis \(-3\)"),
    ("heads_differ_without_gqa", gqa(enable_gqa=False), ValueError, "do not broadcast"),
    # --- scale and softcap
    ("scale_zero", call(scale=0.0), ValueError, "scale must be finite and > 0, got 0.0"),
    ("scale_negative", call(scale=-0.5), ValueError, "scale must be finite and > 0"),
    ("scale_nan", call(scale=float("nan")), ValueError, "scale must be finite and > 0"),
    ("scale_inf", call(scale=np.inf), ValueError, "scale must be finite and > 0, got inf"),
    ("scale_huge_int", call(scale=10**400), ValueError, "scale must be finite and > 0"),
    ("scale_inf_in_float32", call(scale=1e300), ValueError,
     "finite and > 0 in the inputs' dtype float32"),
    ("scale_zero_in_float32", call(scale=1e-50), ValueError, "in the inputs' dtype float32"),
    ("scale_string", call(scale="0.5"), TypeError, "scale must be a positive real number"),
    ("scale_complex", call(scale=0.5j), TypeError, "scale must be a positive real number"),
    ("scale_array", call(scale=np.array([0.5])), TypeError, "positive real number"),
    ("softcap_zero", call(softcap=0), ValueError, "softcap must be finite and > 0"),
    ("softcap_negative", call(softcap=-30.0), ValueError, "softcap must be finite and > 0"),
    ("softcap_nan", call(softcap=np.float32("nan")), ValueError, "softcap must be finite"),
    ("softcap_inf", call(softcap=float("inf")), ValueError, "softcap must be finite"),
    ("softcap_bool", call(softcap=True), TypeError, "softcap must be a positive real"),
    # --- num_threads, flags, alignment, dropout
    ("num_threads_zero", call(num_threads=0), ValueError, "num_threads must be >= 1, got 0"),
    ("num_threads_negative", call(num_threads=-2), ValueError, "num_threads must be >= 1"),
    ("num_threads_float", call(num_threads=2.0), TypeError,
     "num_threads must be an integer, got float"),
    ("num_threads_string", call(num_threads="2"), TypeError, "num_threads must be an integer"),
    ("num_threads_bool", call(num_threads=True), TypeError, "num_threads must be an integer"),
    ("is_causal_int", call(is_causal=1), TypeError, "is_causal must be True or False"),
    ("is_causal_string", call(is_causal="yes"), TypeError, "is_causal must be True or False"),
    ("enable_gqa_none", call(enable_gqa=None), TypeError, "enable_gqa must be True or False"),
    ("return_lse_int", call(return_lse=1), TypeError, "return_lse must be True or False"),
    ("return_weights_array", call(return_weights=np.array([True, False])), TypeError,
     "return_weights must be True or False"),
    ("alignment_typo", call(alignment="top-left"), ValueError,
     "alignment must be 'top_left' or 'bottom_right', got 'top-left'"),
    ("alignment_none", call(alignment=None), ValueError, "alignment must be 'top_left'"),
    ("alignment_array", call(alignment=np.array(["top_left", "x"])), ValueError,
     "alignment must be 'top_left' or 'bottom_right'"),
    ("dropout_nonzero", call(dropout_p=0.1), ValueError, "dropout_p must be 0"),
    ("dropout_nan", call(dropout_p=float("nan")), ValueError, "dropout_p must be 0"),
    ("dropout_string", call(dropout_p="0"), ValueError, "dropout_p must be 0"),
    # --- sizes beyond 32-bit indexing and allocations that cannot succeed (no memory used)
    ("E_beyond_int32", call(query=zeros_view((L, HUGE)), key=zeros_view((S, HUGE)),
                            value=V[0]), ValueError, r"feature sizes must be < 2\*\*31"),
    ("Ev_beyond_int32", call(query=Q[0], key=K[0], value=zeros_view((S, HUGE))),
     ValueError, r"< 2\*\*31.*Ev = 2147483648"),
    ("weights_S_beyond_int32", call(query=Q[0], key=zeros_view((HUGE, E)),
                                    value=zeros_view((HUGE, EV)), return_weights=True),
     ValueError, r"return_weights needs S < 2\*\*31 keys"),
    ("batch_size_overflows", call(query=zeros_view((2**40, 1, L, E)),
                                  key=zeros_view((1, 2**40, S, E)),
                                  value=zeros_view((1, 2**40, S, EV))),
     ValueError, "do not broadcast.*too large"),
    ("weights_allocation", call(query=zeros_view((2**20, E)), key=zeros_view((2**20, E)),
                                value=zeros_view((2**20, EV)), return_weights=True),
     MemoryError, r"Unable to allocate 4.00 TiB"),
    ("output_allocation", call(query=zeros_view((2**40, L, E)), key=K[:1], value=V[:1]),
     MemoryError,
     "Unable to allocate"),
]

# Entries whose inputs have to be built together (out sharing memory with an input).
_q_as_out = _arr((B, L, EV))
_mask_mem = np.zeros((B, L, S + EV), np.float32)
_replacements = {
    "out_is_query": (call(query=_q_as_out, key=_arr((B, S, EV)), out=_q_as_out),
                     ValueError, "out overlaps query"),
    "out_overlaps_mask": (call(attn_mask=_mask_mem[..., :S], out=_mask_mem[..., S - 1:-1]),
                          ValueError, "out overlaps attn_mask"),
}
CATALOGUE = [(name, *_replacements[name]) if name in _replacements else (name, *rest)
             for name, *rest in CATALOGUE]

MERGE_CATALOGUE = [
    ("merge_arrays_not_lists", lambda: merge(np.zeros((2, L, EV)), np.zeros((2, L))),
     TypeError, "outputs and lses must be sequences"),
    ("merge_none", lambda: merge(None, None), TypeError,
     "outputs and lses must be sequences .* got NoneType"),
    ("merge_no_chunks", lambda: merge([], []), ValueError, "at least one chunk, got 0"),
    ("merge_count_mismatch", lambda: merge([OUT, OUT], [LSE]), ValueError,
     "need one lse per output.*got 2 outputs and 1 lses"),
    ("merge_lse_wrong_shape", lambda: merge([OUT], [LSE[:, :2]]), ValueError,
     r"lses \(\.\.\., L\); got output \(2, 3, 6\) with lse \(2, 2\)"),
    ("merge_shapes_differ", lambda: merge([OUT, OUT[:, :2]], [LSE, LSE[:, :2]]),
     ValueError, "outputs must all have one shape"),
    ("merge_lse_dtype", lambda: merge([OUT], [LSE.astype(np.float64)]), TypeError,
     "each lse must be an ndarray of its output's dtype"),
    ("merge_lse_list", lambda: merge([OUT], [LSE.tolist()]), TypeError,
     "each lse must be an ndarray"),
    ("merge_output_dtypes_differ", lambda: merge([OUT, OUT.astype(np.float64)],
                                                 [LSE, LSE.astype(np.float64)]),
     TypeError, "all outputs must have the same dtype"),
    ("merge_output_int", lambda: merge([OUT.astype(int)], [LSE.astype(int)]), TypeError,
     "each output must have dtype float32, float64"),
    ("merge_output_1d", lambda: merge([OUT[0, 0]], [LSE[0, 0]]), ValueError,
     "each output must have at least 2 dimensions"),
    ("merge_output_list", lambda: merge([OUT.tolist()], [LSE]), TypeError,
     "each output must be a numpy.ndarray"),
]


def _ids(table):
    return [row[0] for row in table]


def test_catalogue_is_large_and_unique():
    names = _ids(CATALOGUE) + _ids(MERGE_CATALOGUE)
    assert len(set(names)) == len(names)
    assert len(CATALOGUE) >= 40


def _snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


@pytest.mark.parametrize("name, bad_call, exc_type, message", CATALOGUE, ids=_ids(CATALOGUE))
def test_malformed_call_is_rejected(name, bad_call, exc_type, message):
    before = _snapshot(Q, K, V, Q4, K4, V4)
    with pytest.raises(exc_type, match=message):
        bad_call()
    for a, b in zip(before, (Q, K, V, Q4, K4, V4)):
        np.testing.assert_array_equal(a, b)  # a rejected call writes nothing


@pytest.mark.parametrize("name, bad_call, exc_type, message", MERGE_CATALOGUE,
                         ids=_ids(MERGE_CATALOGUE))
def test_malformed_merge_is_rejected(name, bad_call, exc_type, message):
    with pytest.raises(exc_type, match=message):
        bad_call()


def test_process_lives_on_after_the_catalogue():
    """Every malformed call in a row, then ordinary calls still give the right answer."""
    for name, bad_call, exc_type, _ in CATALOGUE + MERGE_CATALOGUE:
        with pytest.raises(exc_type):
            bad_call()
    for threads in (1, 2):
        assert_matches_reference(Q, K, V, is_causal=True, num_threads=threads)
        assert_matches_reference(Q4, K4, V4, enable_gqa=True, return_lse=True,
                                 num_threads=threads)


# ------------------------------------------------------------------ edge but valid calls

def test_unaligned_inputs_are_read_correctly():
    """Inputs whose data is not aligned to their item size are accepted (and copied)."""
    def misaligned(x):
        raw = np.zeros(x.nbytes + 1, np.uint8)
        view = raw[1:].view(x.dtype).reshape(x.shape)
        view[...] = x
        assert not view.flags.aligned
        return view
    mask = misaligned(_arr((L, S)))
    assert_matches_reference(misaligned(Q), misaligned(K), misaligned(V), mask)


def test_huge_window_means_no_limit():
    want = sdpa(Q, K, V)
    for window in ((2**70, None), (None, 2**100), (2**62, 2**62)):
        np.testing.assert_array_equal(sdpa(Q, K, V, window=window), want)


ABSURD_THREADS = """
import numpy as np, cattn
q = np.random.default_rng(0).standard_normal((60000, 1, 4)).astype(np.float32)
want = cattn.scaled_dot_product_attention(q, q, q, num_threads=1)
got = cattn.scaled_dot_product_attention(q, q, q, num_threads=10**6)
assert np.array_equal(got, want)
print("ok")
"""


def test_absurd_num_threads_is_capped_not_fatal():
    """num_threads=10**6 over 60,000 tasks: without a cap, libgomp exits the process when
    thread creation fails and OpenBLAS aborts past its thread table. Run in a child
    process, so that a crash is a failed test rather than a dead test session."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(cattn.__file__))] + sys.path))
    child = subprocess.run([sys.executable, "-c", ABSURD_THREADS], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip() == "ok", (
        f"exit status {child.returncode}\n{child.stderr[-2000:]}")

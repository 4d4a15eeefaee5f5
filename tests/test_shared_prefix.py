"""Shared-prefix decoding: R requests over a prefix they share, then each over its own
suffix, merged by lse, against the float64 reference over each request's concatenation
[prefix, its valid suffix keys].

Also observed: the prefix is met by all R·L queries in one call that reads the prefix's
own arrays (no copy of the prefix per request, one key/value head read once under GQA).
"""
import numpy as np
import pytest

import cattn
from cattn import _kernel, _shared_prefix
from conftest import reference64, tolerance
from test_core import DTYPES, qkv
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")

spa = cattn.shared_prefix_attention


def problem(seed, R=3, H=4, Hkv=None, L=1, P=40, S=9, E=8, Ev=6, dtype=np.float64):
    rng = np.random.default_rng(seed)
    Hkv = H if Hkv is None else Hkv
    q, k, v = qkv(rng, [(R, H, L, E), (R, Hkv, S, E), (R, Hkv, S, Ev)], dtype)
    prefix_k, prefix_v = qkv(rng, [(Hkv, P, E), (Hkv, P, Ev)], dtype)
    return rng, q, prefix_k, prefix_v, k, v


def concatenated_reference(q, prefix_k, prefix_v, k, v, key_lengths=None, is_causal=False,
                           sinks=None, attn_mask=None, **options):
    """(out, lse): each request over [prefix, its first key_lengths[r] suffix keys], in
    float64. Causal (and windows) bottom-right over the concatenation: the queries are the
    request's last L tokens, so key j (prefix first) is visible to query i when
    j <= P + n - L + i; with n < L - 1 the first queries see part of the prefix only."""
    R, L, S, P = q.shape[0], q.shape[2], k.shape[2], prefix_k.shape[1]
    lengths = np.broadcast_to(S if key_lengths is None else key_lengths, (R,))
    outs, lses = [], []
    for r in range(R):
        n = int(lengths[r])
        keys = np.concatenate([prefix_k, k[r, :, :n]], axis=1)
        values = np.concatenate([prefix_v, v[r, :, :n]], axis=1)
        request_sinks = None if sinks is None else np.broadcast_to(sinks, (R, q.shape[1]))[r]
        mask = None
        if attn_mask is not None:
            full = np.broadcast_to(attn_mask, (R, q.shape[1], L, P + S))[r]
            mask = np.concatenate([full[..., :P], full[..., P:P + n]], axis=-1)
        out, lse = reference64(q[r], keys, values, attn_mask=mask, sinks=request_sinks,
                               is_causal=is_causal, alignment="bottom_right",
                               return_lse=True, **options)
        outs.append(out)
        lses.append(lse)
    return np.stack(outs), np.stack(lses)


def assert_equals_concatenation(q, prefix_k, prefix_v, k, v, **options):
    private = {"_isa": options.pop("_isa")} if "_isa" in options else {}
    out, lse = spa(q, prefix_k, prefix_v, k, v, return_lse=True, **options, **private)
    want_out, want_lse = concatenated_reference(q, prefix_k, prefix_v, k, v, **options)
    assert out.dtype == q.dtype and out.shape == want_out.shape
    np.testing.assert_allclose(out, want_out, **tolerance(q.dtype))
    np.testing.assert_allclose(lse, want_lse, **tolerance(q.dtype))
    return out


@pytest.mark.parametrize("path", _kernel.testable_isa_paths())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_decoding_equals_attention_over_each_concatenation(path, dtype, is_causal):
    rng, q, pk, pv, k, v = problem(1, dtype=dtype)
    assert_equals_concatenation(q, pk, pv, k, v, key_lengths=np.array([9, 0, 4]),
                                is_causal=is_causal, _isa=path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_of_queries_are_causal_within_each_request(dtype):
    """L = 4 new tokens: a request with fewer valid keys than queries has queries that are
    prefix tokens (they see part of the prefix); the others see their own earlier
    tokens."""
    rng, q, pk, pv, k, v = problem(2, L=4, dtype=dtype)
    assert_equals_concatenation(q, pk, pv, k, v, key_lengths=[9, 2, 4], is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_prefix_with_split_keys(dtype):
    rng, q, pk, pv, k, v = problem(3, R=4, H=2, P=3001, S=40, E=32, Ev=32, dtype=dtype)
    assert_equals_concatenation(q, pk, pv, k, v, key_lengths=[40, 1, 17, 33], is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_query_heads_read_each_prefix_head_once(dtype, monkeypatch):
    calls = []
    real = _shared_prefix.scaled_dot_product_attention

    def recording(query, key, value, **options):
        calls.append((query.shape, key, options.get("enable_gqa", False)))
        return real(query, key, value, **options)
    monkeypatch.setattr(_shared_prefix, "scaled_dot_product_attention", recording)
    rng, q, pk, pv, k, v = problem(4, R=3, H=6, Hkv=2, L=2, dtype=dtype)
    assert_equals_concatenation(q, pk, pv, k, v, enable_gqa=True, is_causal=True,
                                key_lengths=[9, 5, 1])
    prefix_calls = [c for c in calls if c[1] is pk]
    assert len(prefix_calls) == 1  # one pass over the prefix, for all 3·2 queries per head
    shape, _, gqa = prefix_calls[0]
    assert shape == (2, 3 * 3 * 2, 8) and not gqa  # (Hkv, group·R·L, E)


def test_sinks_count_once_and_merges_stay_exact():
    rng, q, pk, pv, k, v = problem(5)
    sinks = np.array([0.5, 2.0, -1.0, 3.0])
    assert_equals_concatenation(q, pk, pv, k, v, sinks=sinks, key_lengths=[9, 0, 3],
                                is_causal=True)
    per_request = rng.standard_normal((3, 4))
    assert_equals_concatenation(q, pk, pv, k, v, sinks=per_request)


def test_options_scale_and_softcap():
    rng, q, pk, pv, k, v = problem(6)
    assert_equals_concatenation(q, pk, pv, k, v, scale=0.3, softcap=2.0, is_causal=True)


def test_empty_prefix_or_suffix():
    rng, q, pk, pv, k, v = problem(7, P=0)
    assert_equals_concatenation(q, pk, pv, k, v)
    rng, q, pk, pv, k, v = problem(8, S=0)
    assert_equals_concatenation(q, pk, pv, k, v)


def test_output_only_by_default_and_inputs_unchanged():
    rng, q, pk, pv, k, v = problem(9, dtype=np.float32)
    copies = [x.copy() for x in (q, pk, pv, k, v)]
    out = spa(q, pk, pv, k, v, key_lengths=5)
    assert isinstance(out, np.ndarray) and out.shape == (3, 4, 1, 6)
    for x, c in zip((q, pk, pv, k, v), copies):
        np.testing.assert_array_equal(x, c)


@pytest.mark.parametrize("change, error, words", [
    (dict(q=np.zeros((4, 1, 8))), ValueError, r"q must have shape \(R, H, L, E\)"),
    (dict(pk=np.zeros((1, 4, 40, 8))), ValueError, r"prefix_k must have shape"),
    (dict(pv=np.zeros((4, 41, 6))), ValueError, "same heads and length"),
    (dict(k=np.zeros((2, 4, 9, 8))), ValueError, "R = 3 requests"),
    (dict(k=np.zeros((3, 4, 9, 7))), ValueError, "feature sizes"),
    (dict(v=np.zeros((3, 4, 9, 5))), ValueError, "feature sizes"),
    (dict(pk=np.zeros((2, 40, 8)), pv=np.zeros((2, 40, 6)), k=np.zeros((3, 2, 9, 8)),
          v=np.zeros((3, 2, 9, 6))), ValueError, "enable_gqa"),
    (dict(pk=np.zeros((3, 40, 8)), pv=np.zeros((3, 40, 6)), k=np.zeros((3, 3, 9, 8)),
          v=np.zeros((3, 3, 9, 6)), enable_gqa=True), ValueError, "divisor"),
    (dict(pk=np.zeros((4, 40, 8), np.float32)), TypeError, "same dtype"),
    (dict(q=[[[[0.0]]]]), TypeError, "numpy.ndarray"),
    (dict(key_lengths=[9, 10, 1]), ValueError, "key_lengths"),
    (dict(sinks=np.zeros(3)), ValueError, "one logit per query head"),
])
def test_bad_input(change, error, words):
    rng, q, pk, pv, k, v = problem(10)
    args = dict(q=q, pk=pk, pv=pv, k=k, v=v)
    options = {name: change.pop(name) for name in ("key_lengths", "sinks", "enable_gqa") if name in change}
    args.update(change)
    with pytest.raises(error, match=words):
        spa(args["q"], args["pk"], args["pv"], args["k"], args["v"], **options)


def test_benchmark_workload_times_both_ways_and_checks_the_target(monkeypatch, tmp_path,
                                                                   capsys):
    """The serving preset (on a small shape here): both computations checked against the
    float64 reference, timed, and the speed-up target evaluated."""
    from cattn import bench
    from cattn.bench import serving
    monkeypatch.setattr(serving, "shared_prefix_shape", lambda mode: (3, 2, 300, 20, 16))
    out = tmp_path / "serving.json"
    result = bench.main(["--preset", "serving", "--threads", "1", "--reps", "5",
                         "--warmup", "0", "--json", str(out), "--plot", "-"])
    text = capsys.readouterr().out
    assert "shared_prefix_attention" in text and "concatenated caches" in text
    case = next(c for c in result["cases"] if c.workload == "serving")
    assert {r.options for r in case.rows} == {"shared-prefix", "concatenated"}
    assert all(r.max_abs_diff < 1e-5 for r in case.rows) and not case.wrong_output
    target = next(t for t in result["targets"] if t.id == "shared-prefix-speedup")
    assert target.indicative and len(target.details) == 1


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("query_dtype", ["float32", "half"])
def test_half_precision_prefix_and_suffix(half, query_dtype):
    from test_dtypes import half_dtype, p_rounding, tolerance_for
    half = half_dtype(half)
    rng, q, pk, pv, k, v = problem(11, R=3, H=4, Hkv=2, L=2, P=700, S=9, E=16, Ev=16,
                                   dtype=np.float32)
    q = q.astype(half if query_dtype == "half" else np.float32)
    pk, pv, k, v = (x.astype(half) for x in (pk, pv, k, v))
    options = dict(key_lengths=[9, 1, 4], is_causal=True, enable_gqa=True,
                   sinks=np.array([0.5, 1.0, -1.0, 2.0]))
    out, lse = spa(q, pk, pv, k, v, return_lse=True, **options)
    want_out, want_lse = concatenated_reference(*(x.astype(np.float64) for x in
                                                  (q, pk, pv, k, v)), **options)
    assert out.dtype == q.dtype and lse.dtype == np.float32
    tol = dict(tolerance_for(q.dtype))
    tol["atol"] += p_rounding(None, v)  # (P rounded to bfloat16 on the native paths)
    np.testing.assert_allclose(out.astype(np.float64), want_out, **tol)
    np.testing.assert_allclose(lse, want_lse, **tolerance_for(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 3, 5])
def test_every_suffix_length_equals_the_concatenation(dtype, L):
    """Causal, every suffix length n from 0 to L + 1 (one request each): a request with
    n < L - 1 has queries that are prefix tokens and must not see the prefix after them
    (the bug: every query saw the whole prefix)."""
    lengths = np.arange(L + 2)
    rng, q, pk, pv, k, v = problem(6, R=lengths.size, H=2, L=L, P=7, S=L + 1, dtype=dtype)
    assert_equals_concatenation(q, pk, pv, k, v, key_lengths=lengths, is_causal=True)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window", [(2, 1), (4, None), (None, 0)])
def test_windows_follow_positions_in_the_concatenation(is_causal, window):
    """A window reaches back into the prefix by position (the bug: the prefix seen whole,
    or the window measured from the suffix's start)."""
    lengths = np.array([0, 1, 3, 6])
    rng, q, pk, pv, k, v = problem(7, R=4, H=4, Hkv=2, L=3, P=6, S=6)
    assert_equals_concatenation(q, pk, pv, k, v, key_lengths=lengths, is_causal=is_causal,
                                window=window, enable_gqa=True)


@pytest.mark.parametrize("mask_shape", [(3, 4, 2, 15), (4, 2, 15), (2, 1), (1, 15)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_covers_prefix_and_suffix(mask_shape, kind):
    """One mask over [prefix, suffix slots], split at P (the bug: the prefix's columns
    applied to the suffix, or a broadcast last axis lost)."""
    rng, q, pk, pv, k, v = problem(8, R=3, H=4, L=2, P=6, S=9)
    mask = rng.random(mask_shape) < 0.7
    if kind == "float":
        mask = np.where(mask, rng.standard_normal(mask_shape), -np.inf)
    assert_equals_concatenation(q, pk, pv, k, v, key_lengths=[9, 1, 4], is_causal=True,
                                attn_mask=mask)


def test_a_mask_that_does_not_cover_the_concatenation_is_rejected():
    rng, q, pk, pv, k, v = problem(9, R=2, H=2, L=2, P=6, S=9)
    with pytest.raises(ValueError, match=r"\(R, H, L, P \+ S\)"):
        spa(q, pk, pv, k, v, attn_mask=np.ones((2, 9), dtype=bool))

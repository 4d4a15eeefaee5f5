"""Every option reaches every entry point: one table of options x entry points.

The entry points share one plan (cattn._plan): an option parsed there reaches all of them,
and this table shows it. Each entry point runs the same problem in its own layout (a padded
batch, packed sequences, pages, pages with packed queries, a shared prefix) and must match
the float64 reference of the padded problem, bottom-right aligned (the queries are each
sequence's last tokens). The few pairs an entry point does not offer are listed, and must
be refused, never ignored.
"""
import numpy as np
import pytest

import cattn
from conftest import reference64, tolerance
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")

B, HQ, HKV, L, S, E, EV, P, PAGE = 3, 4, 2, 3, 8, 16, 8, 3, 4


def padded_out(shape, dtype):
    """A preallocated, strided out full of NaN (every element must be written)."""
    return np.full(shape[:-1] + (2 * shape[-1],), np.nan, dtype=dtype)[..., ::2]


def run_padded(q, k, v, out=None, **options):
    if out is not None:
        out = padded_out(q.shape[:-1] + (v.shape[-1],), options.get("out_dtype") or q.dtype)
    return cattn.scaled_dot_product_attention(q, k, v, alignment="bottom_right", out=out,
                                              **options), out


def pack(x):
    """(B, H, T, D) -> (B·T, H, D)."""
    return x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])


def unpack(out, lse):
    out = out.reshape(B, -1, out.shape[1], out.shape[2]).transpose(0, 2, 1, 3)
    if lse is not None:
        lse = lse.reshape(lse.shape[0], B, -1).transpose(1, 0, 2)
    return out, lse


def packed_out(q, v, options):
    return padded_out((B * L, HQ, v.shape[-1]), options.get("out_dtype") or q.dtype)


def run_varlen(q, k, v, out=None, **options):
    cu_q, cu_k = np.arange(B + 1) * L, np.arange(B + 1) * S
    if out is not None:
        out = packed_out(q, v, options)
    return cattn.varlen_attention(pack(q), pack(k), pack(v), cu_q, cu_k,
                                  alignment="bottom_right", out=out, **options), out


def pages(k, v):
    """The keys as pages of PAGE rows in reversed order, and the block table."""
    n = S // PAGE
    k_pages, v_pages = (x.reshape(B, x.shape[1], n, PAGE, x.shape[3]).transpose(
        0, 2, 1, 3, 4).reshape(B * n, x.shape[1], PAGE, x.shape[3])[::-1].copy()
        for x in (k, v))
    table = (B * n - 1 - np.arange(B * n).reshape(B, n)).astype(np.int32)
    return k_pages, v_pages, table, np.full(B, S)


def run_paged(q, k, v, out=None, **options):
    if out is not None:
        out = padded_out(q.shape[:-1] + (v.shape[-1],), options.get("out_dtype") or q.dtype)
    return cattn.paged_attention(q, *pages(k, v), out=out, **options), out


def run_paged_packed(q, k, v, out=None, **options):
    if out is not None:
        out = packed_out(q, v, options)
    return cattn.paged_attention(pack(q), *pages(k, v), cu_seqlens_q=np.arange(B + 1) * L,
                                 out=out, **options), out


def run_shared_prefix(q, k, v, out=None, **options):
    if out is not None:
        out = options["out"] = padded_out(q.shape[:-1] + (v.shape[-1],), q.dtype)
    return cattn.shared_prefix_attention(q, k[0, :, :P], v[0, :, :P], k[:, :, P:],
                                         v[:, :, P:], **options), out


ENTRY_POINTS = {"scaled_dot_product_attention": (run_padded, False),
                "varlen_attention": (run_varlen, True),
                "paged_attention": (run_paged, False),
                "paged_attention (cu_seqlens_q)": (run_paged_packed, True),
                "shared_prefix_attention": (run_shared_prefix, False)}

OPTIONS = {
    "plain": {},
    "is_causal": dict(is_causal=True),
    "scale": dict(scale=0.3),
    "softcap": dict(softcap=2.0),
    "window": dict(window=(2, 1)),
    "window causal": dict(window=(1, None), is_causal=True),
    "keep_first": dict(window=(1, 0), keep_first=2),
    "sinks": dict(sinks=np.array([0.5, -1.0, 2.0, -np.inf])),
    "alibi_slopes": dict(alibi_slopes=np.array([0.5, 0.25, 2.0, 0.0], np.float32)),
    "alibi_slopes per sequence": dict(alibi_slopes=np.array([[0.5, 0.25, 2.0, 0.0]] * B,
                                                            np.float32) * [[1], [3], [0.5]],
                                      is_causal=True),
    # T5's buckets: few exact ones and a max_distance below S, so that the log-spaced and
    # clamped buckets are reached within 8 keys
    "position_bias": dict(position_bias=cattn.RelativePositionBias(
        np.array([[0.5, -1.0, 2.0, 0.0]]) * np.arange(-3, 5)[:, None], num_buckets=8,
        max_distance=5, bidirectional=True)),
    "position_bias causal grouped": dict(position_bias=cattn.RelativePositionBias(
        np.array([[1.0, -0.5, 0.25, 3.0]]) * np.arange(-2, 4)[:, None], num_buckets=6,
        max_distance=4, bidirectional=False), is_causal=True, enable_gqa=True),
    "enable_gqa": dict(enable_gqa=True),
    "return_lse": dict(return_lse=True),
    "out": dict(out=True),
    "num_threads": dict(num_threads=1),
    "out_dtype": dict(out_dtype=np.float16),
    "float16 keys": dict(),
    "attn_mask": dict(attn_mask=True),
}

# What an entry point does not offer (its layout has no place for it): refused.
NOT_OFFERED = {("varlen_attention", "attn_mask"),
               ("paged_attention (cu_seqlens_q)", "attn_mask"),
               ("shared_prefix_attention", "keep_first"),
               ("shared_prefix_attention", "out"),
               ("shared_prefix_attention", "out_dtype")}


def problem(name):
    """Queries, keys and values whose first P keys are shared by every sequence (the
    shared prefix entry point needs one)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    kv_heads = HKV if OPTIONS[name].get("enable_gqa") else HQ
    q = rng.standard_normal((B, HQ, L, E)).astype(np.float32)
    k = rng.standard_normal((B, kv_heads, S, E)).astype(np.float32)
    v = rng.standard_normal((B, kv_heads, S, EV)).astype(np.float32)
    k[:, :, :P], v[:, :, :P] = k[:1, :, :P], v[:1, :, :P]
    if name == "float16 keys":
        k, v = k.astype(np.float16), v.astype(np.float16)
    return rng, q, k, v


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_option_reaches_every_entry_point(entry, option):
    run, packed = ENTRY_POINTS[entry]
    rng, q, k, v = problem(option)
    options = dict(OPTIONS[option])
    if options.get("attn_mask"):
        options["attn_mask"] = rng.random((B, HQ, L, S)) < 0.6
    if (entry, option) in NOT_OFFERED:
        with pytest.raises((TypeError, ValueError)):
            run(q, k, v, **options)
        return
    result, out = run(q, k, v, **options)
    out_result, lse = result if isinstance(result, tuple) else (result, None)
    if out is not None:
        assert out_result is out
    if packed:
        out_result, lse = unpack(out_result, lse)
    reference_options = {name: value for name, value in options.items()
                         if name not in ("out", "num_threads", "out_dtype")}
    want = reference64(q, k, v, alignment="bottom_right", **reference_options)
    want_out, want_lse = want if isinstance(want, tuple) else (want, None)
    assert out_result.dtype == np.dtype(options.get("out_dtype") or np.float32)
    assert out_result.shape == want_out.shape
    accuracy = (dict(rtol=2e-3, atol=2e-3) if option == "out_dtype"
                else tolerance(np.float32))
    np.testing.assert_allclose(out_result.astype(np.float64), want_out, **accuracy)
    assert (lse is None) == (want_lse is None)
    if lse is not None:
        np.testing.assert_allclose(lse, want_lse, **tolerance(np.float32))

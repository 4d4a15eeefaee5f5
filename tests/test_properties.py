"""Property-based equivalence with the float64 reference (hypothesis).

One strategy draws a whole call: dtype; batch shapes that broadcast (including 0- and
1-sized dimensions); L, S, E, Ev from 0/1 through sizes that cross the kernel's blocks; the
memory layout of every operand (Fortran order, permuted axes, steps, negative strides,
zero strides, misalignment); a boolean or float mask of a broadcast shape; causal with
either alignment; windows; grouped-query heads; key lengths; softcap; scale; lse and
weights; out=; one or two threads. Each call must match the reference at the dtype's
tolerance, give bitwise the same result with the other thread count and without out=,
and leave its inputs untouched.

Profiles: "ci" (the default: fixed seeds, about 2,500 calls in all, well under a minute)
and "long" (CATTN_HYPOTHESIS_PROFILE=long: 20 times as many, random seeds).
"""
import functools
import math
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cattn
from cattn import reference
from conftest import reference64, tolerance

settings.register_profile(
    "ci", max_examples=1000, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=20000, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("CATTN_HYPOTHESIS_PROFILE", "ci"))


def examples(fraction):
    """These settings with `fraction` of the profile's examples (applied per test, so
    loading this module changes no other module's hypothesis settings)."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * fraction)))


sdpa = cattn.scaled_dot_product_attention

# Query and key counts: tiny, ordinary, and across the kernel's blocks (128 queries and
# 256 keys at the time of writing; from 1024 keys, few query blocks split the keys).
QUERY_COUNTS = st.one_of(st.integers(0, 9), st.integers(10, 64),
                         st.sampled_from([127, 128, 129, 200]))
KEY_COUNTS = st.one_of(st.integers(0, 9), st.integers(10, 64),
                       st.sampled_from([255, 256, 257, 511, 513, 700, 1024, 1500, 2100]))


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# ------------------------------------------------------------------------- layouts

@functools.lru_cache(maxsize=None)
def layouts(ndim, writable=False):
    """How an array of ndim dimensions is laid out in memory (one strategy per ndim,
    built once: building strategies inside every draw is slow)."""
    axes = st.none() | st.integers(0, ndim - 1)
    return st.fixed_dictionaries(dict(
        order=st.sampled_from(["C", "F", "permuted"]),
        perm=st.permutations(range(ndim)),
        step_axis=axes,
        flip_axis=axes,
        zero_stride_axis=st.none() if writable else axes,
        misaligned=st.just(False) if writable else st.booleans(),
    ))


def place(values, layout, zero_stride_ok=True):
    """An array equal to `values` laid out as `layout` says (a view into a larger buffer
    where steps ask for it; read-only where a zero stride is used)."""
    shape = values.shape
    z = layout["zero_stride_axis"]
    if zero_stride_ok and z is not None and shape[z] > 1:
        # All entries along axis z equal: a zero-stride view of one slice.
        first = np.take(values, [0], axis=z)
        inner = place(first, dict(layout, zero_stride_axis=None))
        return np.broadcast_to(inner, shape)
    big = list(shape)
    if layout["step_axis"] is not None:
        big[layout["step_axis"]] *= 2
    if layout["order"] == "permuted":
        perm = layout["perm"]
        buf = np.empty([big[p] for p in perm], values.dtype).transpose(np.argsort(perm))
    elif layout["misaligned"]:
        raw = np.empty(int(np.prod(big)) * values.itemsize + 1, np.uint8)
        buf = raw[1:].view(values.dtype).reshape(big, order=layout["order"])
    else:
        buf = np.empty(big, values.dtype, order=layout["order"])
    steps = [1] * len(shape)
    if layout["step_axis"] is not None:
        steps[layout["step_axis"]] *= 2
    if layout["flip_axis"] is not None:
        steps[layout["flip_axis"]] *= -1
    view = buf[tuple(slice(None, None, st) for st in steps)]
    view[...] = values
    return view


# --------------------------------------------------------------------------- calls

@st.composite
def sub_shape(draw, full, min_ndim=0):
    """A shape that broadcasts to `full`: some dimensions 1, some leading ones dropped."""
    shape = [n if draw(st.booleans()) else 1 for n in full]
    drop = draw(st.integers(0, len(full) - min_ndim))
    return tuple(shape[drop:])


@st.composite
def attention_calls(draw):
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    L, S = draw(QUERY_COUNTS), draw(KEY_COUNTS)
    # Many batch items only for small L×S: the reference's cost is items × L × S.
    big = L * S > 2000
    gqa = draw(st.booleans())
    outer = tuple(draw(st.lists(st.sampled_from([0, 1, 1, 2, 3]), max_size=1 if big else 2)))
    if gqa:
        h_kv = draw(st.integers(1, 2 if big else 3))
        h_q = h_kv * draw(st.integers(1, 2 if big else 3))
        batch = outer + (h_q,)
    else:
        batch = outer + tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    E, Ev = draw(st.integers(1, 24)), draw(st.integers(1, 12))

    def operand(name, rows, cols, heads=None):
        if gqa:
            lead = draw(sub_shape(outer)) + (heads,)
        else:
            lead = draw(sub_shape(batch))
        values = rng.standard_normal(lead + (rows, cols)).astype(dtype)
        layout = draw(layouts(values.ndim))
        return place(values, layout)

    q = operand("query", L, E, batch[-1] if gqa else None)
    k = operand("key", S, E, h_kv if gqa else None)
    v = operand("value", S, Ev, h_kv if gqa else None)

    options = dict(enable_gqa=gqa)
    batch = _out_shape(q, k, v, options)[:-2]  # the operands' own dims may be 1 or absent
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    if mask_kind is not None:
        shape = draw(sub_shape(batch + (L, S), min_ndim=2))
        if mask_kind == "bool":
            mask = rng.random(shape) < draw(st.sampled_from([0.2, 0.7, 1.0]))
        else:
            mask_dtype = draw(st.sampled_from([dtype, np.float32, np.float64]))
            mask = rng.standard_normal(shape)
            mask[rng.random(shape) < draw(st.sampled_from([0.0, 0.3]))] = -np.inf
            mask = mask.astype(mask_dtype)
        options["attn_mask"] = place(mask, draw(layouts(mask.ndim)))
    if draw(st.booleans()):
        options["is_causal"] = True
    if draw(st.booleans()):
        options["alignment"] = "bottom_right"
    if draw(st.booleans()):
        side = st.none() | st.integers(0, 12)
        options["window"] = (draw(side), draw(side))
    lengths = draw(st.sampled_from([None, "scalar", "array"]))
    if lengths == "scalar":
        options["key_lengths"] = draw(st.integers(0, S))
    elif lengths == "array":
        n_axes = draw(st.integers(0, len(batch)))
        options["key_lengths"] = rng.integers(0, S + 1, batch[:n_axes])
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([0.5, 5.0, 30.0]))
    if draw(st.booleans()):
        options["scale"] = draw(st.floats(0.05, 2.0))
    options["return_lse"] = draw(st.booleans())
    options["return_weights"] = draw(st.booleans()) and L * S * math.prod(batch) < 10**6
    threads = draw(st.sampled_from([1, 2]))
    out_layout = draw(st.none() | layouts(len(batch) + 2, writable=True))
    return q, k, v, options, threads, out_layout


def _out_shape(q, k, v, options):
    if options["enable_gqa"]:
        outer = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
        batch = outer + (q.shape[-3],)
    else:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return batch + (q.shape[-2], v.shape[-1])


def _broadcast_operands(q, k, v, options):
    """q, k, v broadcast to their common batch dimensions (views). The reference takes its
    batch shape from Q·Kᵀ, so a batch dimension that only value has is missing from its
    weights, lse and key_lengths; cattn's are those of the call."""
    lead = 3 if options["enable_gqa"] else 2
    common = np.broadcast_shapes(*(x.shape[:-lead] for x in (q, k, v)))
    return [np.broadcast_to(x, common + x.shape[-lead:]) for x in (q, k, v)]


@examples(1.5)
@given(attention_calls())
def test_matches_reference(call):
    q, k, v, options, threads, out_layout = call
    inputs = [q, k, v, options.get("attn_mask")]
    before = [None if x is None else x.copy() for x in inputs]
    out = None
    if out_layout is not None:
        out = place(np.full(_out_shape(q, k, v, options), np.nan, q.dtype), out_layout)

    got = sdpa(q, k, v, num_threads=threads, out=out, **options)
    want = reference64(*_broadcast_operands(q, k, v, options), **options)

    got_t, want_t = _as_tuple(got), _as_tuple(want)
    assert len(got_t) == len(want_t)
    if out is not None:
        assert got_t[0] is out
    out_shape = _out_shape(q, k, v, options)
    batch, (L, S) = out_shape[:-2], (q.shape[-2], k.shape[-2])
    shapes = [out_shape] + [batch + (L, S)] * options["return_weights"] + [
        batch + (L,)] * options["return_lse"]
    for g, w, shape in zip(got_t, want_t, shapes):
        assert g.dtype == q.dtype and g.shape == shape
        np.testing.assert_allclose(g, w, **tolerance(q.dtype))
    # The other thread count and no out=: bitwise the same.
    again = _as_tuple(sdpa(q, k, v, num_threads=3 - threads, **options))
    for g, a in zip(got_t, again):
        np.testing.assert_array_equal(g, a)
    # Inputs are never modified.
    for x, x0 in zip(inputs, before):
        if x is not None:
            np.testing.assert_array_equal(x, x0)


@st.composite
def chunked_calls(draw):
    """A call with a boolean or float mask (any structure folded into it) and a split of
    the keys into chunks."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    L, S = draw(st.integers(0, 40)), draw(st.integers(1, 700))
    E, Ev = draw(st.integers(1, 16)), draw(st.integers(1, 8))
    q = rng.standard_normal(batch + (L, E)).astype(dtype)
    k = rng.standard_normal(batch + (S, E)).astype(dtype)
    v = rng.standard_normal(batch + (S, Ev)).astype(dtype)
    visible = reference.visible_keys(
        L, S, draw(st.booleans()), (draw(st.none() | st.integers(0, 20)), None),
        draw(st.sampled_from(["top_left", "bottom_right"])))
    if draw(st.booleans()):
        mask = visible & (rng.random((L, S)) < 0.8)
    else:
        mask = np.where(visible, rng.standard_normal((L, S)), -np.inf).astype(dtype)
    cuts = sorted(draw(st.lists(st.integers(1, S - 1), max_size=4, unique=True))) if S > 1 \
        else []
    return q, k, v, mask, [0] + cuts + [S]


@examples(0.5)
@given(chunked_calls())
def test_merge_of_key_chunks_matches_reference(call):
    """Attention over chunks of keys, merged with merge_attention, is attention over all
    the keys (chunks in which a row sees nothing included)."""
    q, k, v, mask, bounds = call
    outs, lses = [], []
    for a, b in zip(bounds, bounds[1:]):
        o, lse = sdpa(q, k[..., a:b, :], v[..., a:b, :], mask[:, a:b], return_lse=True)
        outs.append(o)
        lses.append(lse)
    out, lse = cattn.merge_attention(outs, lses)
    want_out, want_lse = reference64(q, k, v, mask, return_lse=True)
    assert out.dtype == lse.dtype == q.dtype
    np.testing.assert_allclose(out, want_out, **tolerance(q.dtype))
    np.testing.assert_allclose(lse, want_lse, **tolerance(q.dtype))


"""Differential tests against PyTorch (when installed), besides the NumPy reference.

hypothesis draws calls over masks (boolean and float), causal masks with both alignments,
sliding windows, key lengths, grouped-query heads and strided (transposed, sliced) inputs;
cattn in float64 must agree with `torch.nn.functional.scaled_dot_product_attention` in
float64, to which every mask is given as one explicit boolean or float matrix built here
(so cattn's own causal, window and length logic is checked against an independent mask).
The layer is checked against `torch.nn.MultiheadAttention` with the same weights.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cattn

torch = pytest.importorskip("torch")
F = torch.nn.functional

PROFILE = settings(
    max_examples=300 if os.environ.get("CATTN_HYPOTHESIS_PROFILE") == "long" else 40,
    deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOLERANCE = dict(rtol=1e-10, atol=1e-10)


def _strided(rng, shape, layout):
    """A float64 array of `shape` stored as asked: contiguous, as a (B, L, H, E) array
    seen as (B, H, L, E), or every other row of a larger array."""
    B, H, n, E = shape
    if layout == "bhle":
        return rng.standard_normal((B, n, H, E)).transpose(0, 2, 1, 3)
    if layout == "rows":
        return rng.standard_normal((B, H, 2 * n, E))[:, :, ::2]
    return rng.standard_normal(shape)


def _visible(L, S, causal, alignment, window, lengths, B):
    """(B, 1, L, S) bool: which keys each query sees, built directly from the definitions."""
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    seen = np.ones((B, 1, L, S), bool)
    for b in range(B):
        valid = S if lengths is None else lengths[b]
        diag = valid - L if alignment == "bottom_right" else 0
        rel = j - (i + diag)  # key position relative to the query's diagonal
        ok = np.broadcast_to(j < valid, (L, S)).copy()
        if causal:
            ok &= rel <= 0
        if window is not None:
            ok &= rel >= -window[0]
            if window[1] is not None:
                ok &= rel <= window[1]
        seen[b, 0] = ok
    return seen


@st.composite
def calls(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    L = draw(st.one_of(st.integers(1, 12), st.sampled_from([127, 129, 200])))
    S = draw(st.one_of(st.integers(1, 12), st.sampled_from([255, 257, 600, 1100])))
    E = draw(st.sampled_from([1, 8, 16, 33]))
    Ev = draw(st.sampled_from([1, 8, 24]))
    return dict(
        B=B, Hkv=Hkv, Hq=Hkv * group, L=L, S=S, E=E, Ev=Ev,
        layouts=[draw(st.sampled_from(["contiguous", "bhle", "rows"])) for _ in range(3)],
        mask=draw(st.sampled_from([None, "bool", "float"])),
        causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        window=draw(st.one_of(st.none(), st.tuples(st.integers(0, 40),
                                                     st.one_of(st.none(), st.integers(0, 5))))),
        lengths=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)))


@settings(PROFILE)
@given(calls())
def test_sdpa_matches_torch_float64(call):
    rng = np.random.default_rng(call["seed"])
    B, Hq, Hkv, L, S = call["B"], call["Hq"], call["Hkv"], call["L"], call["S"]
    q = _strided(rng, (B, Hq, L, call["E"]), call["layouts"][0])
    k = _strided(rng, (B, Hkv, S, call["E"]), call["layouts"][1])
    v = _strided(rng, (B, Hkv, S, call["Ev"]), call["layouts"][2])
    lengths = rng.integers(0, S + 1, B) if call["lengths"] else None
    seen = _visible(L, S, call["causal"], call["alignment"], call["window"], lengths, B)
    options = dict(is_causal=call["causal"], alignment=call["alignment"],
                   window=call["window"], key_lengths=lengths, enable_gqa=Hq != Hkv)
    torch_mask = seen.copy()
    if call["mask"] == "bool":
        user = rng.random((L, S)) < 0.7
        options["attn_mask"] = user
        torch_mask &= user
        torch_mask = torch.from_numpy(torch_mask)
    elif call["mask"] == "float":
        user = rng.standard_normal((1, Hq, L, S))
        options["attn_mask"] = user
        torch_mask = torch.from_numpy(np.where(seen, user, -np.inf))
    else:
        torch_mask = torch.from_numpy(torch_mask)
    got = cattn.scaled_dot_product_attention(q, k, v, **options)
    want = F.scaled_dot_product_attention(
        *(torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v)),
        attn_mask=torch_mask, enable_gqa=Hq != Hkv).numpy()
    # A row that sees no key: cattn gives 0 by definition; PyTorch's answer varies.
    empty = ~np.broadcast_to(torch_mask.numpy() if torch_mask.dtype == torch.bool
                             else np.isfinite(torch_mask.numpy()), (B, Hq, L, S)).any(-1)
    assert (got[empty] == 0).all()
    np.testing.assert_allclose(got[~empty], want[~empty], **TOLERANCE)


@st.composite
def layer_calls(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(heads=heads, width=heads * draw(st.sampled_from([1, 4, 8])),
                B=draw(st.integers(1, 3)), L=draw(st.integers(1, 20)),
                S=draw(st.integers(1, 20)), cross=draw(st.booleans()),
                padding=draw(st.booleans()), mask=draw(st.sampled_from([None, "bool", "float"])),
                average=draw(st.booleans()), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@settings(PROFILE)
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch
@given(layer_calls())
def test_layer_matches_torch_multihead_attention(call):
    rng = np.random.default_rng(call["seed"])
    torch.manual_seed(call["seed"])
    width, heads, B, L = call["width"], call["heads"], call["B"], call["L"]
    S = call["S"] if call["cross"] else L
    module = torch.nn.MultiheadAttention(width, heads, bias=call["bias"],
                                         batch_first=True).double().eval()
    layer = cattn.MultiHeadAttention(width, heads, bias=call["bias"], dtype=np.float64)
    layer.load_state_dict(module.state_dict())
    x = rng.standard_normal((B, L, width))
    kv = rng.standard_normal((B, S, width)) if call["cross"] else x
    options = {}
    if call["padding"]:
        pad = rng.random((B, S)) < 0.3
        pad[:, 0] = False  # every query sees a key (PyTorch gives NaN otherwise)
        options["key_padding_mask"] = pad
    if call["mask"] == "bool":
        mask = rng.random((L, S)) < 0.3
        mask[:, 0] = False
        options["attn_mask"] = mask
    elif call["mask"] == "float":
        options["attn_mask"] = rng.standard_normal((L, S))
    got, got_w = layer(x, kv, kv, need_weights=True,
                       average_attn_weights=call["average"], **options)
    with torch.no_grad():
        want, want_w = module(*(torch.from_numpy(a) for a in (x, kv, kv)), need_weights=True,
                              average_attn_weights=call["average"],
                              **{name: torch.from_numpy(m) for name, m in options.items()})
    np.testing.assert_allclose(got, want.numpy(), **TOLERANCE)
    np.testing.assert_allclose(got_w, want_w.numpy(), **TOLERANCE)

"""MultiHeadAttention: against a float64 NumPy multi-head attention written out here, against
PyTorch's nn.MultiheadAttention (when torch is installed), its state dict, its checks."""
import math

import numpy as np
import pytest

import cattn
from cattn import layers
from conftest import require_peer, tolerance

E, H = 24, 4


def random_inputs(rng, dtype, B=2, L=5, S=7, kdim=E, vdim=E):
    q = rng.standard_normal((B, L, E)).astype(dtype)
    k = rng.standard_normal((B, S, kdim)).astype(dtype)
    v = rng.standard_normal((B, S, vdim)).astype(dtype)
    return q, k, v


def randomize(mha, rng):
    """Random weights *and* biases (a fresh layer has zero biases, which hides bias bugs)."""
    mha.load_state_dict({name: rng.standard_normal(w.shape) * 0.3
                         for name, w in mha.state_dict().items()})
    return mha


def mask_bias(B, H, L, S, key_padding_mask=None, attn_mask=None, is_causal=False):
    """PyTorch-style masks (bool True = ignore) as one float64 bias (B, H, L, S)."""
    bias = np.zeros((B, H, L, S))
    if key_padding_mask is not None:
        kpm = key_padding_mask
        kpm = np.where(kpm, -np.inf, 0.0) if kpm.dtype == bool else kpm.astype(np.float64)
        bias = bias + kpm[:, None, None, :]
    if attn_mask is not None:
        am = attn_mask
        am = np.where(am, -np.inf, 0.0) if am.dtype == bool else am.astype(np.float64)
        if am.ndim == 3:
            am = am.reshape(B, H, L, S)
        bias = bias + am
    if is_causal:
        bias = bias + np.where(np.arange(S)[None, :] > np.arange(L)[:, None], -np.inf, 0.0)
    return bias


def mha_reference64(mha, query, key=None, value=None, bias=None):
    """Multi-head attention in float64 from the layer's state dict, head by head, with the
    full score matrix. Returns (out (B, L, E), weights (B, H, L, S))."""
    sd = {name: w.astype(np.float64) for name, w in mha.state_dict().items()}
    E, H, Hkv, D = mha.embed_dim, mha.num_heads, mha.num_kv_heads, mha.head_dim
    key = query if key is None else key
    value = key if value is None else value
    if "in_proj_weight" in sd:
        Wq, Wk, Wv = np.split(sd["in_proj_weight"], [E, E + Hkv * D])
    else:
        Wq, Wk, Wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    bq, bk, bv = (np.split(sd["in_proj_bias"], [E, E + Hkv * D]) if "in_proj_bias" in sd
                  else (0.0, 0.0, 0.0))
    q = query.astype(np.float64) @ Wq.T + bq
    k = key.astype(np.float64) @ Wk.T + bk
    v = value.astype(np.float64) @ Wv.T + bv
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    group = H // Hkv
    out = np.zeros((B, L, E))
    weights = np.zeros((B, H, L, S))
    for b in range(B):
        for h in range(H):
            g = h // group
            qh, kh, vh = q[b, :, h * D:(h + 1) * D], k[b, :, g * D:(g + 1) * D], \
                v[b, :, g * D:(g + 1) * D]
            scores = qh @ kh.T / math.sqrt(D)
            if bias is not None:
                scores = scores + bias[b, h]
            e = np.exp(scores - scores.max(axis=1, keepdims=True))
            w = e / e.sum(axis=1, keepdims=True)
            weights[b, h] = w
            out[b, :, h * D:(h + 1) * D] = w @ vh
    if "out_proj.weight" in sd:
        out = out @ sd["out_proj.weight"].T + sd.get("out_proj.bias", 0.0)
    return out, weights


def assert_close(got, want, dtype, scale=1.0):
    tol = tolerance(dtype)
    np.testing.assert_allclose(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale)


# ------------------------------------------------------------- against float64 reference

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", [
    dict(), dict(bias=False), dict(num_kv_heads=2), dict(num_kv_heads=1),
    dict(kdim=10, vdim=6), dict(kdim=10, vdim=6, num_kv_heads=2)])
def test_matches_float64_reference(rng, dtype, config):
    mha = randomize(cattn.MultiHeadAttention(E, H, dtype=dtype, rng=rng, **config), rng)
    q, k, v = random_inputs(rng, dtype, kdim=mha.kdim, vdim=mha.vdim)
    out, weights = mha(q, k, v, need_weights=True, average_attn_weights=False)
    want_out, want_w = mha_reference64(mha, q, k, v)
    assert out.dtype == dtype and out.shape == (2, 5, E)
    assert weights.shape == (2, H, 5, 7)
    assert_close(out, want_out, dtype)
    assert_close(weights, want_w, dtype)
    # Averaged weights are the mean over heads; need_weights=False gives None.
    _, avg = mha(q, k, v, need_weights=True)
    assert_close(avg, want_w.mean(axis=1), dtype)
    out2, none = mha(q, k, v)
    assert none is None
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_self_attention_defaults_key_and_value_to_query(rng, dtype, num_kv_heads):
    mha = randomize(cattn.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, dtype=dtype,
                                             rng=rng), rng)
    q, _, _ = random_inputs(rng, dtype)
    out, w = mha(q, need_weights=True, average_attn_weights=False)
    want_out, want_w = mha_reference64(mha, q)
    assert_close(out, want_out, dtype)
    assert_close(w, want_w, dtype)
    # key given, value omitted: value = key
    _, k, _ = random_inputs(rng, dtype)
    out_kv, _ = mha(q, k)
    assert_close(out_kv, mha_reference64(mha, q, k, k)[0], dtype)


def _masks(rng, kind, B, L, S):
    """(key_padding_mask, attn_mask) of a kind, PyTorch conventions; no row fully masked."""
    kpm = am = None
    if kind in ("kpm_right", "both_bool", "kpm_right_float_attn"):
        kpm = np.zeros((B, S), dtype=bool)
        kpm[0, S - 2:] = True  # right padding (the key-lengths path)
    if kind in ("kpm_scattered", "kpm_scattered_float_attn"):
        kpm = rng.random((B, S)) < 0.4
        kpm[:, 0] = False
    if kind in ("kpm_float", "both_float"):
        kpm = rng.standard_normal((B, S)).astype(np.float32)
    if kind in ("attn_bool_2d", "both_bool"):
        am = rng.random((L, S)) < 0.4
        am[:, 0] = False
    if kind in ("attn_float_2d", "kpm_right_float_attn", "kpm_scattered_float_attn",
                "both_float"):
        am = rng.standard_normal((L, S))
    if kind == "attn_bool_3d":
        am = rng.random((B * H, L, S)) < 0.4
        am[..., 0] = False
    if kind == "attn_float_4d_broadcast":
        am = rng.standard_normal((1, H, L, S))
    return kpm, am


# (two additive masks at once, "kpm_scattered_float_attn" and "both_float": a layer that
# keeps only one of the two sums passes every kind with a single additive part)
MASK_KINDS = ["kpm_right", "kpm_scattered", "kpm_float", "attn_bool_2d", "attn_float_2d",
              "attn_bool_3d", "attn_float_4d_broadcast", "both_bool", "kpm_right_float_attn",
              "kpm_scattered_float_attn", "both_float"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_masks_match_reference(rng, kind, is_causal):
    """Every mask kind against the float64 layer. Bug caught by the two kinds with two
    additive masks: a float key_padding_mask and a float attn_mask (or a scattered boolean
    padding beside a float attn_mask) where the layer adds only one of them."""
    dtype = np.float32
    B, L, S = 2, 5, 7
    if is_causal:
        S = L  # causal self-attention
    mha = randomize(cattn.MultiHeadAttention(E, H, rng=rng), rng)
    q, k, v = random_inputs(rng, dtype, B=B, L=L, S=S)
    kpm, am = _masks(rng, kind, B, L, S)
    kpm_copy, am_copy = (None if m is None else m.copy() for m in (kpm, am))
    out, w = mha(q, k, v, key_padding_mask=kpm, attn_mask=am, is_causal=is_causal,
                 need_weights=True, average_attn_weights=False)
    bias = mask_bias(B, H, L, S, kpm, am, is_causal)
    want_out, want_w = mha_reference64(mha, q, k, v, bias=bias)
    assert_close(out, want_out, dtype)
    assert_close(w, want_w, dtype)
    for m, c in ((kpm, kpm_copy), (am, am_copy)):
        if m is not None:
            np.testing.assert_array_equal(m, c)  # masks not modified


def test_seeds_single_head_flow(rng):
    """One head and no output projection: exactly softmax(Q·Kᵀ/√E)·V of the seeds."""
    d = 16
    x = rng.standard_normal((4, d)).astype(np.float64)  # "I love Apple phones"
    mha = cattn.MultiHeadAttention(d, 1, bias=False, out_proj=False, dtype=np.float64,
                                   rng=rng)
    Wq, Wk, Wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    Q, K, V = x @ Wq.T, x @ Wk.T, x @ Wv.T
    scores = Q @ K.T / math.sqrt(d)
    weights = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    out, w = mha(x, need_weights=True)  # unbatched (L, E)
    np.testing.assert_allclose(w, weights, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out, weights @ V, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-14)
    assert set(mha.state_dict()) == {"in_proj_weight"}


def test_gqa_equals_mha_with_repeated_kv_weights(rng):
    """A GQA layer equals a full-head layer whose k/v heads repeat the shared ones."""
    dtype = np.float64
    gqa = randomize(cattn.MultiHeadAttention(E, H, num_kv_heads=2, dtype=dtype, rng=rng), rng)
    D, group = gqa.head_dim, H // 2
    full = cattn.MultiHeadAttention(E, H, dtype=dtype, rng=rng)

    def repeat_heads(w):
        return np.repeat(w.reshape(2, D, *w.shape[1:]), group, axis=0).reshape(E, *w.shape[1:])

    bq, bk, bv = np.split(gqa.in_proj_bias, [E, E + 2 * D])
    full.load_state_dict({
        "q_proj_weight": gqa.q_proj_weight, "k_proj_weight": repeat_heads(gqa.k_proj_weight),
        "v_proj_weight": repeat_heads(gqa.v_proj_weight),
        "in_proj_bias": np.concatenate([bq, repeat_heads(bk), repeat_heads(bv)]),
        "out_proj.weight": gqa.out_proj_weight, "out_proj.bias": gqa.out_proj_bias})
    q, _, _ = random_inputs(rng, dtype)
    np.testing.assert_allclose(gqa(q, is_causal=True)[0], full(q, is_causal=True)[0],
                               rtol=1e-12, atol=1e-12)


def test_unbatched_matches_batched(rng):
    mha = randomize(cattn.MultiHeadAttention(E, H, kdim=9, vdim=5, rng=rng), rng)
    q, k, v = random_inputs(rng, np.float32, B=1, kdim=9, vdim=5)
    kpm = np.array([[False] * 5 + [True] * 2])
    out, w = mha(q, k, v, key_padding_mask=kpm, need_weights=True)
    out_u, w_u = mha(q[0], k[0], v[0], key_padding_mask=kpm[0], need_weights=True)
    assert out_u.shape == (5, E) and w_u.shape == (5, 7)
    np.testing.assert_array_equal(out_u, out[0])
    np.testing.assert_array_equal(w_u, w[0])


def test_fully_masked_query_gives_output_bias(rng):
    mha = randomize(cattn.MultiHeadAttention(E, H, rng=rng), rng)
    q, k, v = random_inputs(rng, np.float32)
    am = np.zeros((5, 7), dtype=bool)
    am[2] = True  # query 2 may attend to nothing
    out, w = mha(q, k, v, attn_mask=am, need_weights=True)
    np.testing.assert_allclose(out[:, 2], np.broadcast_to(mha.out_proj_bias, (2, E)))
    assert np.all(w[:, 2] == 0) and np.allclose(w[:, [0, 1, 3, 4]].sum(-1), 1)


def test_inputs_not_modified_and_any_strides(rng):
    mha = randomize(cattn.MultiHeadAttention(E, H, rng=rng), rng)
    base = rng.standard_normal((2, 9, 2 * E)).astype(np.float32)
    q = base[:, ::2, ::2]  # non-contiguous along both axes
    k = np.asfortranarray(rng.standard_normal((2, 7, E)).astype(np.float32))
    before = [x.copy() for x in (base, k)]
    weights_before = {n: w.copy() for n, w in mha.state_dict().items()}
    out, _ = mha(q, k)
    want, _ = mha_reference64(mha, q, k, k)
    assert_close(out, want, np.float32)
    np.testing.assert_array_equal(base, before[0])
    np.testing.assert_array_equal(k, before[1])
    for n, w in mha.state_dict().items():
        np.testing.assert_array_equal(w, weights_before[n])


def test_heads_reach_the_kernel_as_views(rng, monkeypatch):
    """The head split hands strided views of the projections to the kernel, no copies."""
    seen = []
    real = layers.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v, kwargs["out"]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(layers, "scaled_dot_product_attention", spy)
    mha = cattn.MultiHeadAttention(E, H, num_kv_heads=2, rng=rng)
    q, _, _ = random_inputs(rng, np.float32)
    mha(q)
    (qh, kh, vh, out), = seen
    assert qh.shape == (2, H, 5, E // H) and kh.shape == (2, 2, 5, E // H)
    for x in (qh, kh, vh):
        assert not x.flags.c_contiguous and x.strides[-1] == x.itemsize
    # q, k and v are disjoint windows of one fused projection array (B, L, E + 2·Hkv·D)
    assert np.may_share_memory(qh, kh) and np.may_share_memory(kh, vh)
    assert qh.strides[2] == (E + 2 * 2 * (E // H)) * qh.itemsize
    assert not out.flags.c_contiguous  # written straight into the (B, L, H, D) buffer
    # mha(x, x, x) is recognized as self-attention too (one fused projection), unbatched too
    x0 = q[0]
    for args in ((q, q, q), (x0, x0, x0)):
        seen.clear()
        mha(*args)
        (qh, kh, vh, _), = seen
        assert np.may_share_memory(qh, kh) and np.may_share_memory(kh, vh)
    seen.clear()
    mha(q, q.copy())
    (qh, kh, vh, _), = seen
    assert not np.may_share_memory(qh, kh) and np.may_share_memory(kh, vh)


@pytest.mark.parametrize("padding, lengths", [
    ([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]], [5, 7]),   # right padding
    ([[0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1]], [6, 0]),   # a sequence all padding
    ([[0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], None),     # a hole: needs a mask
    ([[1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], None),     # left padding: a mask
])
def test_right_padding_reaches_the_kernel_as_key_lengths(rng, monkeypatch, padding, lengths):
    """A right-padded key_padding_mask becomes key_lengths and no mask is built; any other
    padding goes to the kernel as a mask. Either way the result is the masked attention."""
    seen = []
    real = layers.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        seen.append((attn_mask, kwargs.get("key_lengths")))
        return real(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(layers, "scaled_dot_product_attention", spy)
    mha = randomize(cattn.MultiHeadAttention(E, H, rng=rng, dtype=np.float64), rng)
    q, k, v = random_inputs(rng, np.float64)
    kpm = np.array(padding, dtype=bool)
    out, _ = mha(q, k, v, key_padding_mask=kpm)
    (mask, key_lengths), = seen
    if lengths is None:
        assert key_lengths is None and mask is not None
    else:
        assert mask is None
        np.testing.assert_array_equal(key_lengths, lengths)
    with np.errstate(invalid="ignore"):  # (the all-padding row: NaN in the reference)
        want, _ = mha_reference64(mha, q, k, v, bias=mask_bias(2, H, 5, 7, kpm))
    visible = ~kpm.all(axis=1)
    assert_close(out[visible], want[visible], np.float64)


# --------------------------------------------------------------------------- init

def test_initialization_like_pytorch(rng):
    """xavier_uniform over the (fused) input projection, nn.Linear's bound for Wo, zero
    biases: the samples fill [-bound, bound] with the uniform's variance bound²/3."""
    E_, H_ = 256, 8
    for mha, blocks in [
        (cattn.MultiHeadAttention(E_, H_, rng=1),
         [("in_proj_weight", math.sqrt(6 / (4 * E_)))]),
        (cattn.MultiHeadAttention(E_, H_, kdim=64, vdim=128, rng=2),
         [("q_proj_weight", math.sqrt(6 / (2 * E_))), ("k_proj_weight", math.sqrt(6 / (E_ + 64))),
          ("v_proj_weight", math.sqrt(6 / (E_ + 128)))]),
    ]:
        sd = mha.state_dict()
        for name, bound in blocks + [("out_proj.weight", 1 / math.sqrt(E_))]:
            w = sd[name]
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound, name
            assert abs(w.var() / (bound ** 2 / 3) - 1) < 0.05, name
            assert abs(w.mean()) < 0.02 * bound, name
        assert np.all(sd["in_proj_bias"] == 0) and np.all(sd["out_proj.bias"] == 0)
    # Seeded: the same rng seed gives the same weights; different seeds differ.
    a, b, c = (cattn.MultiHeadAttention(E, H, rng=s).in_proj_weight for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------- the state dict

def test_state_dict_round_trip_and_both_forms(rng):
    src = randomize(cattn.MultiHeadAttention(E, H, rng=rng), rng)
    sd = src.state_dict()
    assert set(sd) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    dst = cattn.MultiHeadAttention(E, H, rng=rng)
    dst.load_state_dict(sd)
    q, _, _ = random_inputs(rng, np.float32)
    np.testing.assert_array_equal(dst(q)[0], src(q)[0])
    # state_dict gives copies: editing them leaves the layer alone
    sd["in_proj_weight"][...] = 0
    assert np.any(src.in_proj_weight != 0)
    # the separate q/k/v form loads into the fused layer too
    w = src.in_proj_weight
    split = {"q_proj_weight": w[:E], "k_proj_weight": w[E:2 * E], "v_proj_weight": w[2 * E:],
             "in_proj_bias": src.in_proj_bias, "out_proj.weight": src.out_proj_weight,
             "out_proj.bias": src.out_proj_bias}
    other = cattn.MultiHeadAttention(E, H, rng=rng)
    other.load_state_dict(split)
    np.testing.assert_array_equal(other(q)[0], src(q)[0])
    # kdim/vdim: the separate form, and back
    sep = randomize(cattn.MultiHeadAttention(E, H, kdim=10, vdim=6, bias=False, rng=rng), rng)
    assert set(sep.state_dict()) == {"q_proj_weight", "k_proj_weight", "v_proj_weight",
                                     "out_proj.weight"}
    again = cattn.MultiHeadAttention(E, H, kdim=10, vdim=6, bias=False, rng=rng)
    again.load_state_dict(sep.state_dict())
    for name, w in sep.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], w)


def test_load_state_dict_errors_change_nothing(rng):
    mha = cattn.MultiHeadAttention(E, H, rng=rng)
    before = mha.state_dict()
    good = {n: np.ones_like(w) for n, w in before.items()}
    bad_cases = [
        ({k: v for k, v in good.items() if k != "out_proj.bias"}, ValueError, "missing"),
        ({**good, "extra": np.ones(3)}, ValueError, "unexpected"),
        ({**good, "in_proj_weight": np.ones((3 * E, E + 1))}, ValueError, "shape"),
        ({**good, "in_proj_bias": np.array(["a"] * 3 * E)}, TypeError, "numeric"),
        ({**good, "q_proj_weight": np.ones((E, E))}, ValueError, "unexpected"),
        ([("in_proj_weight", 1)], TypeError, "mapping"),
    ]
    for sd, error, match in bad_cases:
        with pytest.raises(error, match=match):
            mha.load_state_dict(sd)
    for n, w in mha.state_dict().items():
        np.testing.assert_array_equal(w, before[n])
    sep = cattn.MultiHeadAttention(E, H, kdim=10, rng=rng)
    with pytest.raises(ValueError, match="kdim"):
        sep.load_state_dict({**good})


# ------------------------------------------------------------------------ bad input

def test_constructor_errors():
    with pytest.raises(ValueError, match="divide embed_dim"):
        cattn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        cattn.MultiHeadAttention(24, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match=">= 1"):
        cattn.MultiHeadAttention(0, 1)
    with pytest.raises(TypeError, match="integer"):
        cattn.MultiHeadAttention(24.0, 4)
    with pytest.raises(TypeError, match="float32 or float64"):
        cattn.MultiHeadAttention(24, 4, dtype=np.int32)
    with pytest.raises(TypeError, match="rng"):
        cattn.MultiHeadAttention(24, 4, rng="seed")


def test_call_errors(rng):
    mha = cattn.MultiHeadAttention(E, H, kdim=10, vdim=6, rng=rng)
    q, k, v = random_inputs(rng, np.float32, kdim=10, vdim=6)
    cases = [
        (dict(query=q[..., :-1], key=k, value=v), ValueError, "query must have shape"),
        (dict(query=q, key=k[..., :-1], value=v), ValueError, "key must have shape"),
        (dict(query=q, key=k, value=v[:, :-1]), ValueError, "same length"),
        (dict(query=q, key=k[:1], value=v[:1]), ValueError, "same batch size"),
        (dict(query=q.astype(np.float64), key=k, value=v), TypeError, "dtype"),
        (dict(query=q.tolist(), key=k, value=v), TypeError, "numpy.ndarray"),
        (dict(query=q), ValueError, "key must have shape"),  # key defaults to query: E != kdim
        (dict(query=q, key=k, value=v, key_padding_mask=np.zeros((2, 6), bool)), ValueError,
         "key_padding_mask must have shape"),
        (dict(query=q, key=k, value=v, key_padding_mask=np.zeros((2, 7), int)), TypeError,
         "boolean"),
        (dict(query=q, key=k, value=v, attn_mask=np.zeros((5, 6), bool)), ValueError,
         "attn_mask must have shape"),
        (dict(query=q, key=k, value=v, attn_mask=np.zeros((3, 5, 7), bool)), ValueError,
         "batch·num_heads"),
        (dict(query=q, key=k, value=v, is_causal=1), TypeError, "is_causal"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            mha(**kwargs)


# -------------------------------------------------------- stand-in projections

def projections_of(mha):
    """Projections that compute `mha`'s own GEMMs (as the layer does: bitwise the same)."""
    return layers.Projections(
        in_proj=lambda rows: rows @ mha.in_proj_weight.T + mha.in_proj_bias,
        out_proj=lambda rows: rows @ mha.out_proj_weight.T + mha.out_proj_bias)


def _decode(mha, x, cache, **kwargs):
    """A prefill of all but the last token, then the last token, through `cache`."""
    first, _ = mha(x[:, :-1], cache=cache, is_causal=True, **kwargs)
    last, weights = mha(x[:, -1:], cache=cache, need_weights=True, **kwargs)
    return np.concatenate([first, last], axis=1), weights


@pytest.mark.parametrize("case", ["plain", "masks_and_weights", "gqa_causal_sinks",
                                  "float64", "kv_cache", "paged_cache"])
def test_projections_stand_in_for_the_layers_own(rng, case):
    """A layer called with another layer's projections (`projections=`) gives that layer's
    results bit for bit, under every kind of call: masks, per-head weights, grouped heads,
    sinks, both caches. Catches a projection ignored on one path (the layer's own weights
    used instead: what a quantized model would silently lose), Q/K/V taken from the wrong
    columns of the stand-in's result, the output projection applied twice or not at all."""
    dtype = np.float64 if case == "float64" else np.float32
    config = dict(num_kv_heads=2) if case == "gqa_causal_sinks" else {}
    own, other = (randomize(cattn.MultiHeadAttention(E, H, dtype=dtype, **config), rng)
                  for _ in range(2))
    x = rng.standard_normal((2, 6, E)).astype(dtype)
    kwargs = {}
    if case == "masks_and_weights":
        padding = np.zeros((2, 6), bool)
        padding[0, :2] = padding[1, 4] = True  # not a right padding: a mask
        kwargs = dict(key_padding_mask=padding, need_weights=True, average_attn_weights=False,
                      attn_mask=rng.standard_normal((6, 6)).astype(dtype))
    elif case == "gqa_causal_sinks":
        kwargs = dict(is_causal=True, sinks=rng.standard_normal(H).astype(dtype),
                      need_weights=True)
    if case in ("kv_cache", "paged_cache"):
        kind = cattn.KVCache if case == "kv_cache" else cattn.PagedKVCache
        got = _decode(own, x, kind.for_layer(own, 2, 8), projections=projections_of(other))
        want = _decode(other, x, kind.for_layer(other, 2, 8))
    else:
        got = own(x, projections=projections_of(other), **kwargs)
        want = other(x, **kwargs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_each_projection_stands_in_alone(rng):
    """One field given, the other None: the given one replaces its GEMM, the other stays
    the layer's. Catches one field read for the other, or a None field taken as 'no
    projections at all'."""
    mha = randomize(cattn.MultiHeadAttention(E, H), rng)
    other = randomize(cattn.MultiHeadAttention(E, H), rng)
    x = rng.standard_normal((2, 5, E)).astype(np.float32)
    own, _ = mha(x)
    doubled_out = layers.Projections(
        out_proj=lambda rows: 2 * (rows @ mha.out_proj_weight.T + mha.out_proj_bias))
    np.testing.assert_array_equal(mha(x, projections=doubled_out)[0], 2 * own)
    others_in = layers.Projections(in_proj=projections_of(other).in_proj)
    mixed, _ = mha(x, projections=others_in)
    heads = other(x, projections=layers.Projections(out_proj=lambda rows: rows))[0]
    np.testing.assert_array_equal(
        mixed, (heads.reshape(-1, E) @ mha.out_proj_weight.T
                + mha.out_proj_bias).reshape(mixed.shape))
    assert not np.array_equal(mixed, own)


def test_projections_errors_change_nothing(rng):
    """Projections that do not fit the call: a clear error, and a cache is not appended
    to."""
    mha = randomize(cattn.MultiHeadAttention(E, H), rng)
    x = rng.standard_normal((2, 5, E)).astype(np.float32)
    fits = projections_of(mha)
    cases = [
        (dict(projections=(fits.in_proj, fits.out_proj)), TypeError, "Projections"),
        (dict(projections=layers.Projections(in_proj=mha.in_proj_weight)), TypeError,
         "in_proj must be None or a callable"),
        (dict(projections=layers.Projections(in_proj=lambda rows: rows)), ValueError,
         r"must return shape \(10, 72\), got \(10, 24\)"),
        (dict(projections=layers.Projections(out_proj=lambda rows: rows.astype(np.float64))),
         TypeError, "numpy.ndarray of float32, got float64"),
        (dict(projections=layers.Projections(out_proj=lambda rows: rows.tolist())),
         TypeError, "got list"),
        (dict(key=x[:, :3], projections=layers.Projections(in_proj=fits.in_proj)),
         ValueError, "self-attention"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            mha(x, **kwargs)
    cross = cattn.MultiHeadAttention(E, H, kdim=10, vdim=6)
    with pytest.raises(ValueError, match="kdim = vdim = embed_dim"):
        cross(x, rng.standard_normal((2, 3, 10)).astype(np.float32),
              rng.standard_normal((2, 3, 6)).astype(np.float32),
              projections=layers.Projections(in_proj=lambda rows: rows))
    bare = cattn.MultiHeadAttention(E, H, out_proj=False)
    with pytest.raises(ValueError, match="no output projection"):
        bare(x, projections=layers.Projections(out_proj=lambda rows: rows))
    cache = cattn.KVCache.for_layer(mha, 2, 8)
    with pytest.raises(ValueError, match="must return shape"):
        mha(x, cache=cache, projections=layers.Projections(in_proj=lambda rows: rows))
    assert (cache.lengths == 0).all()
    np.testing.assert_array_equal(mha(x)[0], mha(x, projections=layers.Projections())[0])


# ------------------------------------------------------------------ against PyTorch

def _torch_module(mha):
    torch = require_peer("torch")
    tdtype = torch.float64 if mha.dtype == np.float64 else torch.float32
    mod = torch.nn.MultiheadAttention(mha.embed_dim, mha.num_heads, bias=mha.bias,
                                      kdim=mha.kdim, vdim=mha.vdim, batch_first=True,
                                      dtype=tdtype)
    mod.eval()
    return torch, mod


TORCH_CONFIGS = [dict(), dict(bias=False), dict(kdim=10, vdim=6),
                 dict(dtype=np.float64), dict(kdim=10, vdim=6, bias=False, dtype=np.float64)]


# PyTorch warns when a boolean padding mask meets a float attn_mask (it still supports it).
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("config", TORCH_CONFIGS)
@pytest.mark.parametrize("kind", [None] + MASK_KINDS + ["causal"])
def test_matches_pytorch(rng, config, kind):
    dtype = config.get("dtype", np.float32)
    mha = cattn.MultiHeadAttention(E, H, rng=rng, **config)
    torch, mod = _torch_module(mha)
    # Weights travel from PyTorch to cattn (tensors accepted directly), random biases too.
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    mha.load_state_dict(mod.state_dict())
    B, L, S = 2, 5, (5 if kind == "causal" else 7)
    q, k, v = random_inputs(rng, dtype, B=B, L=L, S=S, kdim=mha.kdim, vdim=mha.vdim)
    if kind == "causal":
        kpm, am = None, None
        causal_mask = np.triu(np.ones((L, S), dtype=bool), 1)
    else:
        kpm, am = _masks(rng, kind, B, L, S)
        if kpm is not None and kpm.dtype.kind == "f":
            kpm = kpm.astype(dtype)
        if am is not None and am.dtype.kind == "f":
            am = am.astype(dtype)
    T = torch.from_numpy
    for average in (True, False):
        if kind == "causal":
            got = mha(q, k, v, is_causal=True, need_weights=True,
                      average_attn_weights=average)
            want = mod(T(q), T(k), T(v), attn_mask=T(causal_mask), is_causal=True,
                       need_weights=True, average_attn_weights=average)
        else:
            got = mha(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=True,
                      average_attn_weights=average)
            am_t = None if am is None else T(np.broadcast_to(am, (B, H, L, S)).reshape(
                B * H, L, S).copy() if am.ndim == 4 else am)
            want = mod(T(q), T(k), T(v), key_padding_mask=None if kpm is None else T(kpm),
                       attn_mask=am_t, need_weights=True, average_attn_weights=average)
        for g, w in zip(got, want):
            assert_close(g, w.detach().numpy(), dtype)
    # and without weights (PyTorch may take its fused fast path)
    if kind is None:
        with torch.no_grad():
            want = mod(T(q), T(k), T(v), need_weights=False)[0].numpy()
        assert_close(mha(q, k, v)[0], want, dtype)


def test_state_dict_keys_match_pytorch(rng):
    for config in TORCH_CONFIGS:
        mha = cattn.MultiHeadAttention(E, H, rng=rng, **config)
        torch, mod = _torch_module(mha)
        theirs = {n: tuple(t.shape) for n, t in mod.state_dict().items()}
        ours = {n: w.shape for n, w in mha.state_dict().items()}
        assert ours == theirs


def test_seeds_walkthrough_example(capsys):
    """examples/seeds_walkthrough.py: the step-by-step flow equals the kernel and the layer
    (the script asserts it) and prints the five steps."""
    import os
    import runpy
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples",
                          "seeds_walkthrough.py")
    runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    assert all(f"Step {n}" in out for n in range(1, 6))
    assert out.count("equals the step-by-step result") == 4

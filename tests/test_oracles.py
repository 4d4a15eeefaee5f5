"""The float64 reference checked against attention written out as loops, variant by variant.

`loop_attention` below follows the README's words one query and one key at a time with
`math` functions (no NumPy arithmetic): which keys a query sees (key lengths, the diagonal
of each alignment, global positions from q_offset and k_offset, causal, window sides), softcap on the scaled scores before the mask,
float masks added, boolean masks True = attend, grouped-query heads, and a row that sees
nothing giving output 0 and lse -inf. The vectorized reference is trusted by the rest of
the suite only because it agrees with these loops on every variant here; cattn, on each
instruction-set path, is compared with the loops too, so that a bug shared by the kernel's
front and the reference still fails.
"""
import functools
import itertools
import math

import numpy as np
import pytest

import cattn
from cattn import _kernel
from cattn import reference

pytestmark = pytest.mark.filterwarnings("error")

# Both computations are float64 on tiny problems: they agree to rounding.
EXACT = dict(rtol=1e-12, atol=1e-13)


def per_item(x, default, B, Hq):
    """An option given as None, an int, (B,) or (B, Hq), as one value per (b, h)."""
    x = default if x is None else x
    return np.broadcast_to(np.reshape(x, np.shape(x) + (1,) * (2 - np.ndim(x))), (B, Hq))


def loop_attention(q, k, v, *, scale=None, attn_mask=None, is_causal=False, window=None,
                   alignment="top_left", key_lengths=None, q_offset=None, k_offset=None,
                   softcap=None, enable_gqa=False, alibi_slopes=None):
    """out (B, Hq, L, Ev) and lse (B, Hq, L) for q (B, Hq, L, E), k/v (B, Hk, S, ·).

    key_lengths, q_offset, k_offset: None, an int, (B,) or (B, Hq). attn_mask:
    broadcastable to (B, Hq, L, S). alibi_slopes: None, (Hq,) or (B, Hq).
    """
    B, Hq, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hk if enable_gqa else 1
    scale = 1 / math.sqrt(E) if scale is None else scale
    lengths = per_item(key_lengths, S, B, Hq)
    q_start, k_start = per_item(q_offset, 0, B, Hq), per_item(k_offset, 0, B, Hq)
    mask = None if attn_mask is None else np.broadcast_to(attn_mask, (B, Hq, L, S))
    slopes = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, (B, Hq))
    out = np.zeros((B, Hq, L, Ev))
    lse = np.full((B, Hq, L), -math.inf)
    for b in range(B):
        for h in range(Hq):
            kv_head = h // group
            n_valid = int(lengths[b, h])
            # The diagonal: key i + diag is "the same position" as query i.
            diag = n_valid - L if alignment == "bottom_right" else 0
            for i in range(L):
                scores = {}
                # Global positions: query i at q_offset + i, key j at k_offset + j.
                at = int(q_start[b, h]) + i + diag
                for j in range(n_valid):
                    key_at = int(k_start[b, h]) + j
                    if is_causal and key_at > at:
                        continue
                    if window is not None:
                        left, right = window
                        if left is not None and key_at < at - left:
                            continue
                        if right is not None and key_at > at + right:
                            continue
                    s = scale * sum(float(q[b, h, i, e]) * float(k[b, kv_head, j, e])
                                    for e in range(E))
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if mask is not None:
                        m = mask[b, h, i, j]
                        if mask.dtype == bool:
                            if not m:
                                continue
                        else:
                            s += float(m)
                    if slopes is not None:  # ALiBi: minus slope times the distance
                        s -= float(slopes[b, h]) * abs(at - key_at)
                    if s == -math.inf:
                        continue
                    scores[j] = s
                if not scores:
                    continue  # no visible key: output 0, lse -inf
                top = max(scores.values())
                total = sum(math.exp(s - top) for s in scores.values())
                for c in range(Ev):
                    out[b, h, i, c] = sum(math.exp(s - top) * float(v[b, kv_head, j, c])
                                          for j, s in scores.items()) / total
                lse[b, h, i] = top + math.log(total)
    return out, lse


def small_problem(seed, L, S, B=2, Hq=2, Hk=None, E=3, Ev=2, spread=1.5):
    rng = np.random.default_rng(seed)
    Hk = Hq if Hk is None else Hk
    q = rng.standard_normal((B, Hq, L, E)) * spread
    k = rng.standard_normal((B, Hk, S, E)) * spread
    v = rng.standard_normal((B, Hk, S, Ev))
    return q, k, v


# The reference, and cattn on every instruction-set path this CPU has.
IMPLEMENTATIONS = [("reference", reference.scaled_dot_product_attention)] + [
    (f"cattn {path}", functools.partial(cattn.scaled_dot_product_attention, _isa=path))
    for path in _kernel.supported_isa_paths()]


def assert_agree_with_loops(q, k, v, **options):
    """The reference and cattn (float64) both equal the loops: output and lse."""
    want_out, want_lse = loop_attention(q, k, v, **options)
    for name, impl in IMPLEMENTATIONS:
        out, lse = impl(q, k, v, return_lse=True, **options)
        np.testing.assert_allclose(out, want_out, **EXACT, err_msg=f"{name} output")
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse),
                                      err_msg=f"{name}: rows that see no key")
        np.testing.assert_allclose(lse, want_lse, **EXACT, err_msg=f"{name} lse")
    return want_out, want_lse


# ----------------------------------------------------------------- windows and diagonals

SIDES = [0, 1, 2, None]


@pytest.mark.parametrize("L, S", [(5, 7), (7, 5)])
@pytest.mark.parametrize("lengths", [None, [7, 3]], ids=["all-keys", "key-lengths"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", list(itertools.product(SIDES, SIDES)), ids=str)
def test_windows_and_diagonals(window, causal, alignment, lengths, L, S):
    q, k, v = small_problem(1, L, S)
    if lengths is not None:
        lengths = [min(n, S) for n in lengths]
    assert_agree_with_loops(q, k, v, window=window, is_causal=causal, alignment=alignment,
                            key_lengths=lengths)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_one_step_window_sees_exactly_the_diagonal_and_its_neighbour(alignment):
    # window (1, 0): query i sees keys i-1 and i (diagonal-relative), never i+1.
    q, k, v = small_problem(2, 4, 6, B=1, Hq=1)
    out, _ = assert_agree_with_loops(q, k, v, window=(1, 0), alignment=alignment)
    diag = 6 - 4 if alignment == "bottom_right" else 0
    weights = reference.scaled_dot_product_attention(q, k, v, window=(1, 0),
                                                     alignment=alignment,
                                                     return_weights=True)[1][0, 0]
    for i in range(4):
        seen = set(np.flatnonzero(weights[i]))
        assert seen == {j for j in (i + diag - 1, i + diag) if j >= 0}


@pytest.mark.parametrize("q_offset, k_offset", [
    (3, None), (None, 2), (7, 4), ([0, 6], 3), ([[2, 9], [5, 0]], [1, 8]), (-2, 1)])
@pytest.mark.parametrize("window", [None, (1, 0), (2, 1), (0, None)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_position_offsets(causal, window, q_offset, k_offset):
    # Blocks cut from a longer sequence: causal and window compare global positions.
    q, k, v = small_problem(10, 4, 6)
    assert_agree_with_loops(q, k, v, is_causal=causal, window=window, q_offset=q_offset,
                            k_offset=k_offset, key_lengths=[6, 4])


@pytest.mark.parametrize("lengths", [[[6, 0], [3, 9]], 4, [9, 1]],
                         ids=["per-item-and-head", "one-int", "per-item"])
@pytest.mark.parametrize("causal", [False, True])
def test_bottom_right_follows_each_key_length(lengths, causal):
    q, k, v = small_problem(3, 4, 9)
    assert_agree_with_loops(q, k, v, key_lengths=lengths, is_causal=causal,
                            alignment="bottom_right", window=(2, None))


@pytest.mark.parametrize("slopes", [[0.5, 0.125], [[0.25, 1.0], [2.0, 0.0]]],
                         ids=["per-head", "per-sequence-and-head"])
@pytest.mark.parametrize("options", [
    {}, dict(is_causal=True), dict(alignment="bottom_right"),
    dict(alignment="bottom_right", is_causal=True, key_lengths=[6, 3]),
    dict(window=(2, 1), softcap=2.0), dict(q_offset=[7, 2], k_offset=3, is_causal=True),
    dict(q_offset=-2, k_offset=[1, 5], attn_mask="float"), dict(enable_gqa=True)], ids=str)
def test_alibi_subtracts_slope_times_distance(options, slopes):
    # The bias is -slope·|query position - key position| on the call's diagonal, after the
    # softcap, with the mask; per head, or per sequence and head.
    options = dict(options)
    q, k, v = small_problem(11, 4, 6, Hk=1 if options.get("enable_gqa") else None)
    if options.get("attn_mask") == "float":
        options["attn_mask"] = np.random.default_rng(12).standard_normal((4, 6))
    assert_agree_with_loops(q, k, v, alibi_slopes=np.array(slopes), **options)


# ----------------------------------------------------------- softcap, scale and masks

@pytest.mark.parametrize("softcap", [0.5, 3.0])
@pytest.mark.parametrize("scale", [None, 2.0, 0.3])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_softcap_caps_the_scaled_scores_before_the_mask(softcap, scale, mask):
    # spread 3: scaled scores of several units, so that every cap bites.
    q, k, v = small_problem(4, 5, 6, spread=3.0)
    rng = np.random.default_rng(5)
    attn_mask = None
    if mask == "float":
        attn_mask = rng.standard_normal((5, 6)) * 2
        attn_mask[1, ::2] = -np.inf
    elif mask == "bool":
        attn_mask = rng.random((2, 1, 5, 6)) < 0.6
    assert_agree_with_loops(q, k, v, softcap=softcap, scale=scale, attn_mask=attn_mask,
                            is_causal=True)


def test_softcap_on_one_score():
    # One key per query: the lse is the capped scaled score itself, c·tanh(scale·q·k / c).
    q = np.array([[[[2.0, 1.0]]]])
    k = np.array([[[[3.0, -1.0]]]])
    v = np.ones((1, 1, 1, 1))
    for impl in (reference.scaled_dot_product_attention,
                 cattn.scaled_dot_product_attention):
        _, lse = impl(q, k, v, scale=0.5, softcap=2.0, return_lse=True)
        assert lse[0, 0, 0] == pytest.approx(2.0 * math.tanh(0.5 * 5.0 / 2.0), rel=1e-14)


@pytest.mark.parametrize("mask_shape", [(5, 6), (2, 1, 5, 6), (2, 2, 1, 6)])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_masks(mask_shape, kind):
    q, k, v = small_problem(6, 5, 6)
    rng = np.random.default_rng(7)
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.5
    else:
        mask = rng.standard_normal(mask_shape)
        mask[rng.random(mask_shape) < 0.3] = -np.inf
    assert_agree_with_loops(q, k, v, attn_mask=mask)


# ------------------------------------------------------------------ grouped-query heads

@pytest.mark.parametrize("Hk", [1, 2])
@pytest.mark.parametrize("lengths", [None, [[5, 0, 2, 5], [1, 5, 3, 4]]],
                         ids=["all-keys", "key-lengths"])
def test_grouped_query_heads(Hk, lengths):
    q, k, v = small_problem(8, 3, 5, Hq=4, Hk=Hk)
    assert_agree_with_loops(q, k, v, enable_gqa=True, key_lengths=lengths, is_causal=True,
                            alignment="bottom_right", softcap=2.0)


# ------------------------------------------------------------------------ merging chunks

def loop_merge(outputs, lses):
    """merge_attention by its definition: weights exp(lse_c - lse_total), in math."""
    out = np.zeros_like(outputs[0])
    lse = np.full(lses[0].shape, -math.inf)
    for index in np.ndindex(lses[0].shape):
        parts = [(float(s[index]), o[index]) for o, s in zip(outputs, lses)
                 if s[index] != -math.inf]
        if not parts:
            continue
        top = max(s for s, _ in parts)
        total = sum(math.exp(s - top) for s, _ in parts)
        lse[index] = top + math.log(total)
        out[index] = sum(math.exp(s - top) * o for s, o in parts) / total
    return out, lse


@pytest.mark.parametrize("offset", [0.0, 2200.0, -2200.0, 1e6])
def test_merge_attention_by_its_definition(offset):
    # lse far beyond exp's range (exp overflows past 709 in float64, 88 in float32).
    rng = np.random.default_rng(9)
    outputs = [rng.standard_normal((2, 3, 4)) for _ in range(3)]
    lses = [rng.standard_normal((2, 3)) * 3 + offset for _ in range(3)]
    lses[1][0, 0] = -np.inf  # a chunk in which a row sees nothing
    for s in lses:
        s[1, 2] = -np.inf    # a row that sees nothing anywhere
    for dtype, tol in ((np.float64, EXACT), (np.float32, dict(rtol=2e-6, atol=2e-6))):
        outputs_d = [o.astype(dtype) for o in outputs]
        lses_d = [s.astype(dtype) for s in lses]
        # (the definition on the very numbers merged: an lse of 2200 in float32 is only
        # known to 2.4e-4)
        want_out, want_lse = loop_merge([o.astype(np.float64) for o in outputs_d],
                                        [s.astype(np.float64) for s in lses_d])
        out, lse = cattn.merge_attention(outputs_d, lses_d)
        np.testing.assert_allclose(out, want_out, **tol)
        np.testing.assert_allclose(lse, want_lse, rtol=tol["rtol"])
        assert out[1, 2].tolist() == [0, 0, 0, 0] and lse[1, 2] == -np.inf

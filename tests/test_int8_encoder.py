"""int8 linear layers in the padded BertEncoder call (BertEncoder quantize="int8"):

- each int8 layer's result equals NumPy's integer arithmetic on the rows it was given and
  the int8 weight of the right layer (quantized from that layer's float32 weight);
- the hidden states agree with the float32 encoder's (the sentence targets, on the shipped
  sentences, with the real model) and with the packed pass's on the same int8 weights
  (real tokens only: padding rows are never read);
- the attention half is the attention layer's own call on int8 projections: bit for bit
  the int8 linears composed around cattn's attention by hand, and NumPy's dequantized
  arithmetic within float32 rounding;
- the setting is the encoder's: a SentenceEncoder's `quantize` is its encoder's.
"""
import numpy as np
import pytest

import cattn
from cattn import _encoder_ops as ops
from cattn import reference
from cattn.models import bert
from cattn.models.bert import BertConfig, BertEncoder
from cattn.models.minilm import MiniLM, l2_normalize, mean_pooling
from cattn.models.sentence import packed_forward
from test_int8_linear import dequantized_reference
from test_int8_sentence import agreement, load_sentences, pretrained

CONFIG = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=3,
                    num_attention_heads=4, intermediate_size=128,
                    max_position_embeddings=64)
LENGTHS = [9, 1, 30, 17, 4, 30, 22]


def batch(lengths=LENGTHS, vocab=CONFIG.vocab_size, seed=3):
    """(ids, attention_mask, offsets) of right-padded random sequences."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, vocab, n)
        mask[b, :n] = 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return ids, mask, offsets


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_int8_layers_equal_numpy_integer_math(monkeypatch):
    """Every int8 product of the padded call, checked on the rows it was given against the
    NumPy definition (rows quantized per row, weights per output, integer sums,
    dequantized with the bias). Catches the padded call ignoring `quantize` (no int8
    call), a layer given another layer's or kind's weight or bias, a weight quantized from
    the (in, out) storage instead of (out, in), the attention output projection quantized
    though INT8_LINEARS keeps it float32."""
    encoder = BertEncoder.random(CONFIG, rng=11)
    ids, mask, _ = batch()
    calls = []
    real_linear_int8 = ops.linear_int8

    def recording_linear_int8(x, weight, bias, out, *args, **kwargs):
        real_linear_int8(x, weight, bias, out, *args, **kwargs)
        calls.append((np.array(x), weight, None if bias is None else np.array(bias),
                      np.array(out)))

    monkeypatch.setattr(ops, "linear_int8", recording_linear_int8)
    encoder(ids, mask)
    assert not calls  # float32 unless asked
    encoder.quantize = "int8"
    encoder(ids, mask)
    expected = []  # (float32 weight (out, in), bias) of each int8 layer, in call order
    for layer in encoder.layers:
        by_kind = dict(qkv=(layer.attention.in_proj_weight, layer.attention.in_proj_bias),
                       out=(layer.attention.out_proj_weight, layer.attention.out_proj_bias),
                       ff_in=(layer.ff_in[0].T, layer.ff_in[1]),
                       ff_out=(layer.ff_out[0].T, layer.ff_out[1]))
        expected += [by_kind[kind] for kind in ("qkv", "out", "ff_in", "ff_out")
                     if kind in bert.INT8_LINEARS]
    assert len(calls) == len(expected) == 3 * CONFIG.num_hidden_layers
    for (x, weight, bias, out), (w, b) in zip(calls, expected):
        scale = np.abs(w).max(axis=1) / np.float32(127)
        np.testing.assert_array_equal(weight.levels(), np.rint(w / scale[:, None]))
        np.testing.assert_array_equal(bias, b)
        want = dequantized_reference(x, weight, bias)
        np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_padded_and_packed_int8_agree():
    """The padded call and the packed pass run the same int8 weights: on the real tokens
    their hidden states differ only where float32 rounding moved a value across a
    quantization step (rare), far less than either differs from float32. Catches one pass
    running float32 where the other runs int8, or another choice of int8 layers."""
    encoder = BertEncoder.random(CONFIG, rng=7)
    ids, mask, offsets = batch()
    real = mask == 1
    float32 = encoder(ids, mask)[real]
    encoder.quantize = "int8"
    padded = encoder(ids, mask)[real]
    packed = packed_forward(encoder, ids[real], offsets)
    int8_error = np.abs(padded - float32).mean()
    assert int8_error > 1e-5  # int8 products did run
    difference = np.abs(padded - packed)
    assert difference.mean() <= 0.05 * int8_error
    assert (difference.max(axis=1) <= 1e-5 * np.abs(padded).max()).mean() >= 0.9


def test_int8_attention_weights_and_left_padding():
    """output_attentions and a padding that is not a right padding (a mask, not key
    lengths) go through the int8 call too. Catches padding keys attended to."""
    encoder = BertEncoder.random(CONFIG, rng=5)
    encoder.quantize = "int8"
    ids, mask, _ = batch([6, 3, 5])
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b in range(ids.shape[0]):  # the same tokens, padding first
        n = int(mask[b].sum())
        left_ids[b, ids.shape[1] - n:], left_mask[b, ids.shape[1] - n:] = ids[b, :n], 1
    hidden, weights = encoder(left_ids, left_mask, output_attentions=True)
    assert len(weights) == CONFIG.num_hidden_layers and np.isfinite(hidden).all()
    for w in weights:
        assert w.shape == (3, CONFIG.num_attention_heads, ids.shape[1], ids.shape[1])
        np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-5)
        for b in range(ids.shape[0]):
            assert not w[b][..., left_mask[b] == 0].any()


def layer_inputs(lengths, left, seed):
    """(an int8 encoder's first layer, its LinearWeights, hidden states x (B, L, E), padding
    (B, L) True at padding: right padding, or left padding when `left`)."""
    encoder = BertEncoder.random(CONFIG, rng=seed)
    encoder.quantize = "int8"
    rng = np.random.default_rng(seed)
    B, L, E = len(lengths), max(lengths), CONFIG.hidden_size
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    positions = np.arange(L)[::-1] if left else np.arange(L)
    padding = positions >= np.array(lengths)[:, None]
    return encoder.layers[0], encoder.linear_weights()[0], x, padding


def linear(rows, quantized, weight, bias):
    """rows · weightᵀ + bias: int8 products when `quantized` is an Int8Weight, else the
    float32 GEMM on the float32 weight (out, in)."""
    if isinstance(quantized, ops.Int8Weight):
        out = np.empty((rows.shape[0], quantized.n_out), np.float32)
        ops.linear_int8(rows, quantized, bias, out)
        return out
    return rows @ weight.T + bias


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_int8_layer_is_int8_linears_around_cattn_attention(left):
    """The padded int8 layer, composed by hand: the int8 Q/K/V product, cattn's attention
    on its heads (key lengths for a right padding, a mask for a left one), the output
    projection as INT8_LINEARS says, add & norm, the feed-forward: the layer's hidden
    states and attention weights equal it bit for bit. Catches the attention layer
    running its float32 GEMM where the weight is int8 (int8 silently lost), an int8
    product on a layer INT8_LINEARS keeps float32, padding keys attended to."""
    layer, weights, x, padding = layer_inputs([7, 3, 5], left, seed=21)
    assert isinstance(weights.qkv, ops.Int8Weight)
    attention, eps = layer.attention, CONFIG.layer_norm_eps
    B, L, E = x.shape
    H = CONFIG.num_attention_heads
    qkv = linear(x.reshape(B * L, E), weights.qkv, attention.in_proj_weight,
                 attention.in_proj_bias)
    q, k, v = qkv.reshape(B, L, 3, H, E // H).transpose(2, 0, 3, 1, 4)
    keys = (dict(attn_mask=~padding[:, None, None, :]) if left
            else dict(key_lengths=(~padding).sum(1)))
    context = np.empty((B, L, E), np.float32)
    _, want_weights = cattn.scaled_dot_product_attention(
        q, k, v, return_weights=True,
        out=context.reshape(B, L, H, E // H).transpose(0, 2, 1, 3), **keys)
    attended = linear(context.reshape(B * L, E), weights.out, attention.out_proj_weight,
                      attention.out_proj_bias).reshape(B, L, E)
    hidden = bert.layer_norm(attended + x, *layer.attention_norm, eps).reshape(B * L, E)
    ff = linear(bert.gelu(linear(hidden, weights.ff_in, layer.ff_in[0].T, layer.ff_in[1])),
                weights.ff_out, layer.ff_out[0].T, layer.ff_out[1])
    want = bert.layer_norm(ff + hidden, *layer.output_norm, eps).reshape(B, L, E)
    got, got_weights = layer.padded(x, padding, None, eps, True, weights)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_weights, want_weights)
    float32, _ = layer.padded(x, padding, None, eps, True)
    assert not np.array_equal(float32, want)  # the int8 products did change the numbers


def test_int8_attention_equals_dequantized_numpy():
    """The int8 layer's attention half against NumPy in float64: Q/K/V from the
    dequantized int8 operands (rows quantized per row, weights per output), softmax
    attention by cattn.reference, the output projection on the float64 context (int8 on
    its float32 rounding when INT8_LINEARS holds it); within float32 rounding. Catches
    an int8 projection on another weight or bias, heads split from the wrong columns."""
    layer, weights, x, padding = layer_inputs([6, 2, 6, 4], False, seed=22)
    attention = layer.attention
    B, L, E = x.shape
    H = CONFIG.num_attention_heads
    got, _ = attention(x, key_padding_mask=padding,
                       projections=bert._int8_projections(attention, weights))

    def linear64(rows, quantized, weight, bias):
        if isinstance(quantized, ops.Int8Weight):
            return dequantized_reference(rows.astype(np.float32), quantized, bias)
        return rows.astype(np.float64) @ weight.T.astype(np.float64) + bias

    qkv = linear64(x.reshape(B * L, E), weights.qkv, attention.in_proj_weight,
                   attention.in_proj_bias)
    q, k, v = qkv.reshape(B, L, 3, H, E // H).transpose(2, 0, 3, 1, 4)
    context = reference.scaled_dot_product_attention(q, k, v,
                                                     attn_mask=~padding[:, None, None, :])
    want = linear64(context.transpose(0, 2, 1, 3).reshape(B * L, E), weights.out,
                    attention.out_proj_weight, attention.out_proj_bias).reshape(B, L, E)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    float32, _ = attention(x, key_padding_mask=padding)
    assert np.abs(float32 - want).max() > 10 * np.abs(got - want).max()


def test_quantize_is_the_encoders_setting():
    encoder = BertEncoder.random(CONFIG, rng=1)
    assert encoder.quantize is None
    with pytest.raises(ValueError, match="quantize must be one of"):
        encoder.quantize = "int4"
    with pytest.raises(ValueError, match="quantize must be one of"):
        BertEncoder.random(CONFIG, rng=1).quantize = ["int8"]
    with pytest.raises(ValueError, match="float32 model"):
        BertEncoder.random(CONFIG, rng=1, dtype=np.float64).quantize = "int8"
    with pytest.raises(ValueError, match="float32 model"):
        BertEncoder(CONFIG, {}, dtype=np.float64, quantize="int8")
    model = MiniLM(encoder, None)
    model.quantize = "int8"
    assert encoder.quantize == "int8"
    encoder.quantize = None
    assert model.quantize is None
    # the constructor's default leaves the encoder's setting
    encoder.quantize = "int8"
    assert MiniLM(encoder, None).quantize == "int8"


def test_int8_hidden_states_agree_with_float32():
    """The real model on the shipped sentences, padded call: every real token's hidden
    state within cosine 0.99 of float32's, the mean-pooled embeddings at the sentence
    targets (min cosine >= 0.99, top-10 overlap >= 0.95), and the packed pass's int8
    embeddings much closer still. Catches an int8 layer whose weight or bias belongs to
    another layer, activations quantized per tensor instead of per row."""
    model = pretrained()
    ids, mask, _ = model.tokenize(load_sentences())
    real = mask == 1
    float32 = model.encoder(ids, mask)
    model.quantize = "int8"
    int8 = model.encoder(ids, mask)
    assert cosines(int8[real], float32[real]).min() >= 0.99
    embed_float32 = l2_normalize(mean_pooling(float32, mask))
    embed_int8 = l2_normalize(mean_pooling(int8, mask))
    lo, mean, overlap = agreement(embed_float32, embed_int8)
    assert lo >= 0.99 and overlap >= 0.95, (lo, mean, overlap)
    packed = model.encode(load_sentences())
    gap_packed = 1 - cosines(packed, embed_int8)
    gap_float32 = 1 - cosines(embed_float32, embed_int8)
    assert gap_packed.max() <= 2e-3 and gap_packed.mean() <= 0.25 * gap_float32.mean()

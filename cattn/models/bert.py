"""A BERT encoder on NumPy and cattn: embeddings and post-layer-norm transformer layers
whose self-attention is `cattn.MultiHeadAttention`, loaded from Hugging Face BertModel
weights. The sentence models of `cattn.models` are built on it.

One loop, `BertEncoder.forward`, runs the embeddings and then every layer for a batch in
either layout: padded (`PaddedLayout`: (B, L, hidden) with a padding mask, layer by layer in
NumPy and cattn's attention; `BertEncoder.__call__`), or packed (`cattn.models._packed`: the
real tokens of all sequences one after another, each step a parallel loop of the compiled
core; the sentence encoders).
"""
import functools
import math
import re
from dataclasses import dataclass, field, fields
from typing import (Any, Dict, List, Literal, Mapping, NamedTuple, Optional, Protocol, Sequence,
                    Tuple, Union, overload)

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn import _runtime  # noqa: F401  (first: it loads OpenMP with its wait policy)
from cattn import _encoder_ops as ops
from cattn._api import scaled_dot_product_attention
from cattn.layers import MultiHeadAttention, Projections


# ----------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the encoder uses (defaults: MiniLM)."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        config = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        if config.hidden_act != "gelu":
            raise ValueError(f"only BERT's exact GELU is implemented, the config asks for "
                             f"hidden_act={config.hidden_act!r}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} must divide "
                             f"hidden_size={config.hidden_size}")
        return config

    def weight_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Name -> shape of every weight the encoder needs (Hugging Face BertModel names)."""
        E, F = self.hidden_size, self.intermediate_size
        shapes = {"embeddings.word_embeddings.weight": (self.vocab_size, E),
                  "embeddings.position_embeddings.weight": (self.max_position_embeddings, E),
                  "embeddings.token_type_embeddings.weight": (self.type_vocab_size, E),
                  "embeddings.LayerNorm.weight": (E,), "embeddings.LayerNorm.bias": (E,)}
        for i in range(self.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"):
                shapes[p + name + ".weight"] = (E, E)
                shapes[p + name + ".bias"] = (E,)
            shapes.update({p + "attention.output.LayerNorm.weight": (E,),
                           p + "attention.output.LayerNorm.bias": (E,),
                           p + "intermediate.dense.weight": (F, E),
                           p + "intermediate.dense.bias": (F,),
                           p + "output.dense.weight": (E, F), p + "output.dense.bias": (E,),
                           p + "output.LayerNorm.weight": (E,),
                           p + "output.LayerNorm.bias": (E,)})
        return shapes


# Present in checkpoints, not used by the encoder: the position-id buffer and the pooler
# (sentence-transformers mean-pools the hidden states instead).
_IGNORED = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")


# --------------------------------------------------------------------------- the encoder

def _is_read_only_file_map(a: NDArray[Any], dtype: np.dtype) -> bool:
    """Whether `a` (C-contiguous, `dtype`) views a read-only np.memmap."""
    if a.flags.writeable or a.dtype != dtype or not a.flags.c_contiguous:
        return False
    base = a
    while base is not None:
        if isinstance(base, np.memmap):
            return not base.flags.writeable
        base = getattr(base, "base", None)
    return False


def layer_norm(x: NDArray[Any], weight: NDArray[Any], bias: NDArray[Any],
               eps: float) -> NDArray[Any]:
    """Layer normalization over the last axis (a new array): (x - mean) / sqrt(var + eps),
    scaled by `weight` and shifted by `bias`."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    centered *= 1.0 / np.sqrt(var + eps)
    centered *= weight
    centered += bias
    return centered


# Abramowitz & Stegun 7.1.26, erfc(u) = t·(a1 + t·(a2 + ... + t·a5))·exp(-u²), t = 1/(1 + p·u)
# for u >= 0, absolute error <= 1.5e-7: written for u = |x|/√2 and halved, it gives
# Φ(-|x|) = erfc(|x|/√2)/2 directly.
_AS_P = 0.3275911 / math.sqrt(2)
_AS_A = tuple(a / 2 for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027,
                              1.061405429))
_GELU_CHUNK = 16384  # elements: the scratch rows stay in the L2 cache between the passes


def gelu(x: NDArray[Any]) -> NDArray[Any]:
    """BERT's exact GELU, x·Φ(x) = x·(1 + erf(x/√2))/2, in place on x.

    float64 goes through SciPy's erf. float32 uses the A&S 7.1.26 form above, within
    1.5e-7·|x| of the exact value (about one float32 rounding), evaluated chunk by chunk
    in cache-resident scratch: 4 to 5 times faster than scipy.special.erf, which computes
    float32 through double precision one element at a time. With q = Φ(-|x|),
    x·Φ(x) = max(x, 0) - |x|·q for both signs of x.
    """
    if x.dtype != np.float32:
        half_x = x * 0.5
        np.multiply(x, 1 / math.sqrt(2), out=x)
        from scipy.special import erf  # here: importing scipy.special costs 4 MB and 50 ms
        erf(x, out=x)
        x += 1
        x *= half_x
        return x
    flat = x.reshape(-1)
    scratch = np.empty((4, min(_GELU_CHUNK, flat.size)), dtype=x.dtype)
    for start in range(0, flat.size, _GELU_CHUNK):
        v = flat[start:start + _GELU_CHUNK]
        n = v.size
        abs_x, t, q, gauss = scratch[0, :n], scratch[1, :n], scratch[2, :n], scratch[3, :n]
        np.abs(v, out=abs_x)
        np.multiply(abs_x, _AS_P, out=t)
        t += 1
        np.divide(1, t, out=t)
        np.square(abs_x, out=gauss)
        gauss *= -0.5
        np.exp(gauss, out=gauss)
        np.multiply(t, _AS_A[4], out=q)
        for a in _AS_A[3::-1]:
            q += a
            q *= t
        q *= gauss  # q = Φ(-|x|)
        abs_x *= q
        np.maximum(v, 0, out=v)
        v -= abs_x
    return x


class LinearWeights(NamedTuple):
    """A layer's four linear weights as the packed layer steps take them: packed for
    cattn's GEMM micro-kernels where this CPU has them (`packs_weights`), else as the layer
    stores them, for BLAS."""
    qkv: NDArray[Any]
    out: NDArray[Any]
    ff_in: NDArray[Any]
    ff_out: NDArray[Any]


def packs_weights(dtype: DTypeLike) -> bool:
    """Whether the linear layers of `dtype` run cattn's micro-kernels on packed weights on
    this CPU (else BLAS's GEMM on the weights as they are)."""
    return ops.linear_panel_width(dtype) > 1


# The linear layers that run int8 products when a model is quantized ("int8"), by kind
# (LinearWeights' fields), chosen by scripts/int8_quality.py --all-choices on
# all-MiniLM-L6-v2 (125 sentences; min cosine / top-10 neighbour overlap to float32): all
# four 0.9965 / 0.9496; with the attention output projection in float32 (1/12 of the
# linear layers' work) 0.9951 / 0.958, the cheapest choice that keeps overlap >= 0.95.
INT8_LINEARS = ("qkv", "ff_in", "ff_out")
QUANTIZATIONS = (None, "int8")


def _linear_int8(rows: NDArray[Any], weight: Any, bias: Optional[NDArray[Any]]
                 ) -> NDArray[Any]:
    """rows (M, in) · weightᵀ + bias in int8 products (weight: an ops.Int8Weight), a new
    float32 array (M, out)."""
    out = np.empty((rows.shape[0], weight.n_out), np.float32)
    ops.linear_int8(rows, weight, bias, out)
    return out


def _dense(rows: NDArray[Any], quantized: Any, weight: NDArray[Any],
           bias: NDArray[Any]) -> NDArray[Any]:
    """rows (M, in) · weight (in, out) + bias, a new array: in int8 products when
    `quantized` is the layer's ops.Int8Weight (None or a packed weight: the float GEMM)."""
    if isinstance(quantized, ops.Int8Weight):
        return _linear_int8(rows, quantized, bias)
    out = rows @ weight
    out += bias
    return out


def _int8_projections(attention: MultiHeadAttention, weights: LinearWeights) -> Projections:
    """The attention's projections that `weights` holds as int8 weights, as int8 linear
    layers for its call (`projections=`); the others stay the layer's float32 GEMMs."""
    def projection(weight, bias):
        if not isinstance(weight, ops.Int8Weight):
            return None
        return functools.partial(_linear_int8, weight=weight, bias=bias)
    return Projections(in_proj=projection(weights.qkv, attention.in_proj_bias),
                       out_proj=projection(weights.out, attention.out_proj_bias))


Norm = Tuple[NDArray[Any], NDArray[Any]]          # a LayerNorm's (weight, bias)
Linear = Tuple[NDArray[Any], NDArray[Any]]        # a dense layer's (weight (in, out), bias)


@dataclass(eq=False)
class BertLayer:
    """One post-layer-norm transformer layer: self-attention, add & norm, feed-forward
    (dense, GELU, dense), add & norm. The feed-forward weights are stored transposed,
    (in, out), so the padded pass's GEMMs read them as they are."""
    attention: MultiHeadAttention
    attention_norm: Norm
    ff_in: Linear
    ff_out: Linear
    output_norm: Norm
    # the packed steps' weights, made on first use for one matmul precision and
    # quantization
    _packed: Optional[Tuple[Any, LinearWeights]] = field(default=None, init=False,
                                                         repr=False)

    def linear_weights(self, matmul_precision: str = "highest",
                       quantize: Optional[str] = None) -> LinearWeights:
        """The linear weights for the packed steps (see LinearWeights), packed once per
        precision and quantization; only the last one's packing is kept. quantize="int8":
        the layers of INT8_LINEARS as int8 weights (float32 layers only; see
        ops.Int8Weight), the others packed as for float32."""
        key = (matmul_precision, quantize)
        if self._packed is not None and self._packed[0] == key:
            return self._packed[1]
        self._packed = None  # the old packing goes before the new one is made
        attention = self.attention
        if not packs_weights(attention.dtype):
            weights = LinearWeights(attention.in_proj_weight, attention.out_proj_weight,
                                    self.ff_in[0], self.ff_out[0])
        else:  # packing takes (out, in): the feed-forward weights transposed back
            def pack(weight):
                return ops.pack_linear_weight(np.ascontiguousarray(weight),
                                              precision=matmul_precision)
            weights = LinearWeights(pack(attention.in_proj_weight),
                                    pack(attention.out_proj_weight),
                                    pack(self.ff_in[0].T), pack(self.ff_out[0].T))
        if quantize == "int8":
            out_in = dict(qkv=attention.in_proj_weight, out=attention.out_proj_weight,
                          ff_in=self.ff_in[0].T, ff_out=self.ff_out[0].T)
            weights = weights._replace(**{kind: ops.Int8Weight(np.ascontiguousarray(
                out_in[kind], dtype=np.float32)) for kind in INT8_LINEARS})
        self._packed = (key, weights)
        return weights

    def padded(self, x: NDArray[Any], padding: Optional[NDArray[Any]],
               real_rows: Optional[NDArray[Any]], eps: float, need_weights: bool = False,
               weights: Optional[LinearWeights] = None
               ) -> Tuple[NDArray[Any], Optional[NDArray[Any]]]:
        """(hidden states (B, L, E), attention weights or None) after this layer, for x
        (B, L, E) with `padding` (B, L) True at padding (or None). The feed-forward half
        (2/3 of the FLOPs) runs on `real_rows` of x seen as (B·L, E) only (None: all);
        hidden states at padding positions are left as the attention half made them.
        weights: the layer's `linear_weights(quantize=...)`, whose int8 weights replace the
        float32 ones of their layers (None: all float32)."""
        B, L, E = x.shape
        projections = None if weights is None else _int8_projections(self.attention, weights)
        attended, attention_weights = self.attention(
            x, key_padding_mask=padding, need_weights=need_weights,
            average_attn_weights=False, projections=projections)
        attended += x
        x = layer_norm(attended, *self.attention_norm, eps)
        all_rows = x.reshape(B * L, -1)
        rows = all_rows if real_rows is None else all_rows[real_rows]
        ff_in, ff_out = (None, None) if weights is None else (weights.ff_in, weights.ff_out)
        hidden = _dense(rows, ff_in, *self.ff_in)
        ff = _dense(gelu(hidden), ff_out, *self.ff_out)
        ff += rows
        ff = layer_norm(ff, *self.output_norm, eps)
        if real_rows is None:
            return ff.reshape(B, L, -1), attention_weights
        all_rows[real_rows] = ff  # x is this layer's own array: safe to write
        return x, attention_weights

    def packed(self, x: NDArray[Any], rows: "PackedRows", weights: LinearWeights,
               eps: float, num_threads: Optional[int] = None) -> None:
        """x (T, E), the packed hidden states of rows.lengths sequences, <- this layer's
        output: Q/K/V projected into the padded layout, attention with each sequence's key
        length, then output projection + add & norm + feed-forward + add & norm over the
        packed rows, each step one parallel loop of the compiled core."""
        attention = self.attention
        ops.project_scatter(x, weights.qkv, attention.in_proj_bias, rows.padded_row,
                            rows.padded_qkv, rows.scratch_qkv, num_threads=num_threads)
        scaled_dot_product_attention(*rows.heads, key_lengths=rows.lengths,
                                     out=rows.context_heads, num_threads=num_threads)
        ops.attention_output_and_feed_forward(
            rows.context, rows.padded_row, x, weights.out, attention.out_proj_bias,
            *self.attention_norm, weights.ff_in, self.ff_in[1], weights.ff_out,
            self.ff_out[1], *self.output_norm, eps, rows.scratch_e, rows.scratch_f,
            num_threads=num_threads)


@dataclass(eq=False)
class PackedRows:
    """Where a packed batch's rows go in each packed layer step: `padded_row` (T,), each
    token's row in the padded (B·L) layout attention reads; `lengths` (B,); the buffers
    `padded_qkv` (B·L, 3E) and `context` (B·L, E) with their (B, H, L, D) head views
    (`heads`: Q, K, V; `context_heads`); the per-thread scratch of the row steps."""
    padded_row: NDArray[Any]
    lengths: NDArray[Any]
    padded_qkv: NDArray[Any]
    context: NDArray[Any]
    heads: Tuple[NDArray[Any], NDArray[Any], NDArray[Any]]
    context_heads: NDArray[Any]
    scratch_qkv: NDArray[Any]
    scratch_e: NDArray[Any]
    scratch_f: NDArray[Any]


class BertEncoder:
    """A BERT encoder (embeddings + post-LN transformer layers) on NumPy and cattn.

    `weights` maps Hugging Face BertModel names (an optional "bert." prefix is stripped) to
    arrays; missing, unexpected or misshapen weights raise ValueError. Each layer's
    query/key/value/output projections are loaded into a `cattn.MultiHeadAttention` through
    its state dict (the separate q/k/v form).

    quantize : None (default), or "int8" (float32 encoders only): the linear layers of
        INT8_LINEARS take int8 products with exact int32 sums -- weights quantized once
        per output, each token's activations per row at run time -- dequantized with the
        bias on the way out; attention, the attention output projection, layer norms and
        GELU stay float32. Settable after loading; the packed pass of the sentence models
        reads the same setting.
    """

    def __init__(self, config: BertConfig, weights: Mapping[str, ArrayLike],
                 dtype: DTypeLike = np.float32, quantize: Optional[str] = None) -> None:
        self.config = config
        self.dtype = np.dtype(dtype)
        self.quantize = quantize
        weights = {(k[5:] if k.startswith("bert.") else k): v for k, v in weights.items()}
        expected = config.weight_shapes()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(k for k in weights if k not in expected and not _IGNORED.match(k))
        if missing or unexpected:
            raise ValueError(f"the weights do not fit a BERT of this config: missing "
                             f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
                             f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        w = {}
        for name, shape in expected.items():
            a = np.asarray(weights[name])
            if a.shape != shape:
                raise ValueError(f"weight {name!r} must have shape {shape}, got {a.shape}")
            # a copy (the caller's arrays are never kept), except a read-only map of a file
            # in this dtype: nothing can change it, and pages never used are never read
            w[name] = a if _is_read_only_file_map(a, self.dtype) else a.astype(self.dtype)
        self.word_embeddings = w.pop("embeddings.word_embeddings.weight")
        self.position_embeddings = w.pop("embeddings.position_embeddings.weight")
        self.token_type_embeddings = w.pop("embeddings.token_type_embeddings.weight")
        self.embeddings_norm = (w.pop("embeddings.LayerNorm.weight"),
                                w.pop("embeddings.LayerNorm.bias"))
        # Each weight leaves `w` as it is placed: a converted array is never held twice.
        self.layers: List[BertLayer] = []
        E, H = config.hidden_size, config.num_attention_heads
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            attention = MultiHeadAttention(E, H, dtype=self.dtype)
            attention.load_state_dict({
                "q_proj_weight": w.pop(p + "attention.self.query.weight"),
                "k_proj_weight": w.pop(p + "attention.self.key.weight"),
                "v_proj_weight": w.pop(p + "attention.self.value.weight"),
                "in_proj_bias": np.concatenate([w.pop(p + f"attention.self.{n}.bias")
                                                for n in ("query", "key", "value")]),
                "out_proj.weight": w.pop(p + "attention.output.dense.weight"),
                "out_proj.bias": w.pop(p + "attention.output.dense.bias")})
            self.layers.append(BertLayer(
                attention=attention,
                attention_norm=(w.pop(p + "attention.output.LayerNorm.weight"),
                                w.pop(p + "attention.output.LayerNorm.bias")),
                # stored transposed (in, out) so the GEMMs read them as they are
                ff_in=(np.ascontiguousarray(w.pop(p + "intermediate.dense.weight").T),
                       w.pop(p + "intermediate.dense.bias")),
                ff_out=(np.ascontiguousarray(w.pop(p + "output.dense.weight").T),
                        w.pop(p + "output.dense.bias")),
                output_norm=(w.pop(p + "output.LayerNorm.weight"),
                             w.pop(p + "output.LayerNorm.bias"))))

    @property
    def quantize(self) -> Optional[str]:
        return self._quantize

    @quantize.setter
    def quantize(self, value: Optional[str]) -> None:
        if value is not None and not (isinstance(value, str) and value in QUANTIZATIONS):
            raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {value!r}")
        if value is not None and self.dtype != np.float32:
            raise ValueError(f"quantize={value!r} needs a float32 model, this one is "
                             f"{self.dtype}")
        self._quantize = value

    def linear_weights(self, matmul_precision: str = "highest") -> List[LinearWeights]:
        """Per layer, its LinearWeights for this encoder's quantization (see
        BertLayer.linear_weights): what both the padded and the packed pass run."""
        return [layer.linear_weights(matmul_precision, self.quantize)
                for layer in self.layers]

    @classmethod
    def random(cls, config: BertConfig, rng: Union[None, int, np.random.Generator] = None,
               dtype: DTypeLike = np.float32) -> "BertEncoder":
        """An encoder with random weights (BERT's init: N(0, 0.02), unit layer norms)."""
        rng = np.random.default_rng(rng)
        weights = {}
        for name, shape in config.weight_shapes().items():
            if "LayerNorm.weight" in name:
                weights[name] = np.ones(shape)
            elif name.endswith(".bias"):
                weights[name] = np.zeros(shape)
            else:
                weights[name] = rng.normal(0.0, 0.02, size=shape)
        return cls(config, weights, dtype)

    @overload
    def __call__(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                 token_type_ids: Optional[ArrayLike] = None, *,
                 output_attentions: Literal[False] = False) -> NDArray[Any]: ...

    @overload
    def __call__(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                 token_type_ids: Optional[ArrayLike] = None, *,
                 output_attentions: Literal[True]) -> Tuple[NDArray[Any], List[NDArray[Any]]]:
        ...

    def __call__(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                 token_type_ids: Optional[ArrayLike] = None, *,
                 output_attentions: bool = False
                 ) -> Union[NDArray[Any], Tuple[NDArray[Any], List[NDArray[Any]]]]:
        """Last hidden states (B, L, hidden_size) for token ids (B, L).

        attention_mask : (B, L), 1 for real tokens and 0 for padding (as from a tokenizer).
        output_attentions : also return a list, one per layer, of the attention weights
            (B, heads, L, L).
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be integers of shape (batch, length), got "
                             f"{input_ids.dtype} {input_ids.shape}")
        B, L = input_ids.shape
        cfg = self.config
        if L > cfg.max_position_embeddings:
            raise ValueError(f"sequences of {L} tokens exceed the model's "
                             f"{cfg.max_position_embeddings} positions")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        padding = None
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != (B, L):
                raise ValueError(f"attention_mask must have shape {(B, L)}, got "
                                 f"{attention_mask.shape}")
            padding = attention_mask == 0  # True = ignore, as MultiHeadAttention expects
        if token_type_ids is None:
            token_type_ids = np.zeros((B, L), dtype=np.intp)

        layout = PaddedLayout(padding, token_type_ids, need_weights=output_attentions,
                              layer_weights=(self.linear_weights() if self.quantize is not None
                                             else None))
        x = self.forward(layout, input_ids)
        return (x, layout.attentions) if output_attentions else x

    def forward(self, layout: "EncoderLayout", input_ids: NDArray[Any]) -> NDArray[Any]:
        """The last hidden states of `input_ids` (valid token ids) laid out as `layout`
        says: the embeddings, then every layer in turn."""
        eps = self.config.layer_norm_eps
        x = layout.embed(self, input_ids, eps)
        for index, layer in enumerate(self.layers):
            x = layout.layer(index, layer, x, eps)
        return x


class EncoderLayout(Protocol):
    """How a batch is laid out through `BertEncoder.forward`: its embedding step and its
    layer step (index: the layer's position in the encoder)."""

    def embed(self, encoder: BertEncoder, input_ids: NDArray[Any],
              eps: float) -> NDArray[Any]: ...

    def layer(self, index: int, layer: BertLayer, x: NDArray[Any],
              eps: float) -> NDArray[Any]: ...


class PaddedLayout:
    """A padded batch: token ids (B, L), `padding` (B, L) True at padding (or None),
    `token_type_ids` (B, L). With need_weights, each layer's attention weights
    (B, heads, L, L) are collected in `attentions`."""

    def __init__(self, padding: Optional[NDArray[Any]], token_type_ids: NDArray[Any],
                 need_weights: bool = False,
                 layer_weights: Optional[Sequence[Any]] = None) -> None:
        self.padding = padding
        self.layer_weights = layer_weights  # per layer: its int8 linear weights, or None
        self.token_type_ids = token_type_ids
        self.need_weights = need_weights
        self.attentions: List[Optional[NDArray[Any]]] = []
        # The feed-forward half of each layer (2/3 of the FLOPs) runs on the real tokens
        # only; hidden states at padding positions are left as the attention half made them.
        self.real_rows = None
        if padding is not None and padding.any():
            self.real_rows = np.flatnonzero(~padding.reshape(-1))

    def embed(self, encoder: BertEncoder, input_ids: NDArray[Any],
              eps: float) -> NDArray[Any]:
        x = encoder.word_embeddings[input_ids]
        x += encoder.position_embeddings[:input_ids.shape[1]]
        x += encoder.token_type_embeddings[self.token_type_ids]
        return layer_norm(x, *encoder.embeddings_norm, eps)

    def layer(self, index: int, layer: BertLayer, x: NDArray[Any],
              eps: float) -> NDArray[Any]:
        linear = None if self.layer_weights is None else self.layer_weights[index]
        x, weights = layer.padded(x, self.padding, self.real_rows, eps, self.need_weights,
                                  linear)
        self.attentions.append(weights)
        return x

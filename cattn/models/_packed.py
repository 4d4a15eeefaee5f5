"""The packed forward pass of a BertEncoder: the real tokens of all sequences one after
another, no padding rows, in groups of whole sequences, each group a `PackedLayout` through
the encoder's one loop (`BertEncoder.forward`: embeddings, then each layer's packed steps)."""
import contextlib
import math
import threading

import numpy as np

from cattn import _runtime  # noqa: F401  (first: it loads OpenMP with its wait policy)
from cattn import _encoder_ops as ops
from cattn._blas_threads import single_threaded_blas
from cattn.models.bert import PackedRows

# Tokens per group: a batch runs through the encoder in groups of whole sequences of about
# this many tokens, so that activations stay small (and in the caches) whatever the batch;
# GEMMs of this many rows still run at full speed.
TOKENS_PER_GROUP = 512
# Fewer rows than this per thread and a GEMM would not pay for its thread.
MIN_ROWS_PER_THREAD = 32


def packed_forward(encoder, ids, offsets, num_threads=None, matmul_precision="highest"):
    """Last hidden states (T, hidden) of a BertEncoder for packed sequences.

    ids : (T,) int64, the token ids of all sequences one after another
    offsets : (B + 1,) int64, sequence b is ids[offsets[b]:offsets[b + 1]]
    matmul_precision : of the float32 linear layers (see SentenceEncoder)

    The linear layers are quantized as the encoder's `quantize` says.

    Sequences go through in groups of about TOKENS_PER_GROUP tokens. The GEMMs run on the
    real tokens only; attention runs on a padded (B, L, 3·E) copy of Q/K/V with each
    sequence's key length. Token types are 0 (single sentences).
    """
    out = np.empty((ids.shape[0], encoder.config.hidden_size), encoder.dtype)
    weights = layer_weights(encoder, matmul_precision)
    # Plain (unpacked) weights are BLAS's GEMMs, run inside cattn's threads: one BLAS
    # thread each, for this call only. Packed ones never call BLAS: its settings are left.
    calls_blas = any(isinstance(w, np.ndarray) and w.ndim == 2 for ws in weights for w in ws)
    with single_threaded_blas if calls_blas else contextlib.nullcontext():
        _groups_forward(encoder, weights, ids, offsets, num_threads, out)
    return out


def layer_weights(encoder, matmul_precision="highest"):
    """Per layer, its LinearWeights for the packed steps (packed once per precision and
    the encoder's quantization, by the layer)."""
    return encoder.linear_weights(matmul_precision)


class _Workspace(threading.local):
    """The activations' buffers of the forward pass, per thread, kept between groups and
    calls: fresh arrays of this size cost more in page faults (the kernel zeroing new
    pages) than the fused row steps themselves. Each thread's buffers are its own, so
    concurrent encode calls never share them."""

    def __init__(self):
        self.buffers = {}

    def array(self, name, shape, dtype):
        """A (shape, dtype) view of buffer `name` (contents left from earlier use, finite:
        new buffers start at zero)."""
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.size < size:
            self.buffers[name] = None  # the old buffer goes before the new one comes
            buffer = self.buffers[name] = np.zeros(size, dtype)
        return buffer[:size].reshape(shape)


_workspace = _Workspace()


def _groups_forward(encoder, weights, ids, offsets, num_threads, out):
    first, tokens = 0, 0
    for b in range(offsets.shape[0] - 1):
        tokens += int(offsets[b + 1] - offsets[b])
        last = b + 2 == offsets.shape[0]
        if last or tokens + int(offsets[b + 2] - offsets[b + 1]) > TOKENS_PER_GROUP:
            start, stop = offsets[first], offsets[b + 1]
            layout = PackedLayout(encoder, offsets[first:b + 2] - start, weights,
                                  num_threads, out[start:stop])
            encoder.forward(layout, ids[start:stop])
            first, tokens = b + 1, 0


class PackedLayout:
    """One group of packed sequences (see packed_forward) for `BertEncoder.forward`: its
    hidden states are written to `out` (T, hidden); `weights` holds each layer's
    LinearWeights; the attention buffers and row scratch are this thread's workspace."""

    def __init__(self, encoder, offsets, weights, num_threads, out):
        self.positions, self.rows = _packed_rows(encoder.config, encoder.dtype, offsets,
                                                 num_threads)
        self.weights = weights
        self.num_threads = num_threads
        self.out = out

    def embed(self, encoder, ids, eps):
        ops.embed_layernorm(ids, self.positions, np.zeros(ids.shape[0], np.int64),
                            encoder.word_embeddings, encoder.position_embeddings,
                            encoder.token_type_embeddings, *encoder.embeddings_norm, eps,
                            self.out, num_threads=self.num_threads)
        return self.out

    def layer(self, index, layer, x, eps):
        layer.packed(x, self.rows, self.weights[index], eps, self.num_threads)
        return x


def _packed_rows(config, dtype, offsets, num_threads):
    """The PackedRows of one group of sequences, on this thread's workspace."""
    E, H, F = config.hidden_size, config.num_attention_heads, config.intermediate_size
    D = E // H
    T, B = int(offsets[-1]), offsets.shape[0] - 1
    lengths = np.diff(offsets)
    L = int(lengths.max()) if B else 0
    positions = np.arange(T, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    padded_row = np.repeat(np.arange(B, dtype=np.int64) * L, lengths) + positions
    # one chunk of rows per thread, each with its own scratch
    threads = _runtime.get_num_threads() if num_threads is None else num_threads
    chunks = max(1, min(threads, T // MIN_ROWS_PER_THREAD))
    rows = -(-T // chunks)
    # padding rows keep whatever finite values they held: attention skips them as keys
    # (key_lengths) and their outputs are never read
    padded_qkv = _workspace.array("padded_qkv", (B * L, 3 * E), dtype)
    context = _workspace.array("context", (B * L, E), dtype)
    heads = tuple(padded_qkv[:, i * E:(i + 1) * E].reshape(B, L, H, D).transpose(0, 2, 1, 3)
                  for i in range(3))
    return positions, PackedRows(
        padded_row=padded_row, lengths=lengths, padded_qkv=padded_qkv, context=context,
        heads=heads, context_heads=context.reshape(B, L, H, D).transpose(0, 2, 1, 3),
        scratch_qkv=_workspace.array("qkv", (chunks, rows, 3 * E), dtype),
        scratch_e=_workspace.array("e", (chunks, rows, 2 * E), dtype),
        scratch_f=_workspace.array("f", (chunks, rows, F), dtype))

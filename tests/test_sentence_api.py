"""SentenceEncoder.encode against sentence-transformers itself, with its own options:
max_seq_length (truncation at tokenization), prompts, truncate_dim, encode_query /
encode_document, convert_to_tensor, device, the progress bar's default, and precision
(quantize_embeddings bit for bit). Needs sentence-transformers and the all-MiniLM-L6-v2
files (skipped without)."""
import logging

import numpy as np
import pytest

from cattn.models import sentence
from cattn.models.minilm import MiniLM, pretrained_dir

LONG = [" ".join(f"word{i} token" for i in range(200)), "a short one",
        "The quick brown fox jumps over the lazy dog. " * 40,
        "Attention weights in each row sum to one; " * 9]
TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    st = pytest.importorskip("sentence_transformers")
    try:
        path = pretrained_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return st.SentenceTransformer(path, device="cpu"), MiniLM.from_pretrained(path)


@pytest.mark.parametrize("length", [64, 128, 256])
def test_max_seq_length_as_sentence_transformers(models, length):
    """Catches truncation after tokenization (the final [SEP] cut away): the long texts
    would move by ~4e-3."""
    peer, model = models
    peer.max_seq_length = model.max_seq_length = length
    try:
        np.testing.assert_allclose(model.encode(LONG), peer.encode(LONG), atol=TOL, rtol=0)
    finally:
        peer.max_seq_length = model.max_seq_length = 256


def test_prompts_and_query_document(models):
    """Catches a prompt ignored, or the document prompt given to queries."""
    peer, model = models
    prompts = {"query": "query: ", "passage": "passage: "}
    peer.prompts, model.prompts = dict(prompts), dict(prompts)
    try:
        for ours, theirs in ((model.encode_query, peer.encode_query),
                             (model.encode_document, peer.encode_document)):
            np.testing.assert_allclose(ours(LONG[1:]), theirs(LONG[1:]), atol=TOL, rtol=0)
        np.testing.assert_allclose(model.encode(LONG[1:], prompt="search: "),
                                   peer.encode(LONG[1:], prompt="search: "), atol=TOL, rtol=0)
        np.testing.assert_allclose(model.encode(LONG[1:], prompt_name="query"),
                                   peer.encode(LONG[1:], prompt_name="query"), atol=TOL, rtol=0)
        assert not np.allclose(model.encode_query(LONG[1:]), model.encode(LONG[1:]))
        with pytest.raises(ValueError, match="prompt_name"):
            model.encode(LONG, prompt_name="nope")
    finally:
        peer.prompts, model.prompts = {}, {}


@pytest.mark.parametrize("normalize", [False, True])
def test_truncate_dim(models, normalize):
    """Catches normalizing before truncating (sentence-transformers truncates first)."""
    peer, model = models
    got = model.encode(LONG, truncate_dim=64, normalize_embeddings=normalize)
    want = peer.encode(LONG, truncate_dim=64, normalize_embeddings=normalize)
    assert got.shape == want.shape == (len(LONG), 64)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_convert_to_tensor_and_device(models):
    torch = pytest.importorskip("torch")
    peer, model = models
    got = model.encode(LONG, convert_to_tensor=True, device="cpu")
    want = peer.encode(LONG, convert_to_tensor=True, device="cpu")
    assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="device"):
        model.encode(LONG, device="cuda")


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_quantize_embeddings_bit_for_bit(precision):
    """The same float32 embeddings quantized by both: equal bits and dtypes (a step of
    (max - min) / 255 computed in another order, or rounding instead of floor, would
    differ in some entries)."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.util.quantization import quantize_embeddings
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 384)).astype(np.float32) / 7
    got = sentence.quantize_embeddings(x, precision)
    want = quantize_embeddings(x, precision=precision)
    assert got.dtype == want.dtype and st is not None
    np.testing.assert_array_equal(got, want)


def test_progress_bar_default_follows_the_logger(models, capsys):
    """As sentence-transformers: off at the default WARNING level, on at INFO."""
    _, model = models
    model.encode(LONG * 5, batch_size=1)
    assert "Batches" not in capsys.readouterr().err
    level = sentence.logger.level
    sentence.logger.setLevel(logging.INFO)
    try:
        model.encode(LONG * 5, batch_size=1)
    finally:
        sentence.logger.setLevel(level)
    assert "Batches" in capsys.readouterr().err

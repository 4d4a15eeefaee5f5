"""SentenceEncoder: model folders of other BERT sizes against Hugging Face transformers'
BertModel (random weights, saved with save_pretrained inside the test), and `encode` as
sentence-transformers users call it."""
import json
import math
import os
import threading
import warnings

import numpy as np
import pytest

from cattn.models import SentenceEncoder, quantize_embeddings, similarity
from cattn.models.bert import BertConfig, BertEncoder
from cattn.models.minilm import MiniLM, WordTokenizer
from conftest import require_peer

WORDS = ("the a dog cat fed because it was hungry i love apple phones how are you doing "
         "self attention lets every token look at other sentence quick brown fox jumps over "
         "lazy near river bank today ok yes no red green blue").split()
SENTENCES = ["He fed the dog because it was hungry.", "ok", "I love Apple phones",
             "The quick brown fox jumps over the lazy dog near the river bank today.",
             "how are you doing?", "Self-attention lets every token look at every other "
             "token in the sentence, the dog and the cat too.", "blue"]


def write_tokenizer(folder, vocab_size):
    """A BERT WordPiece tokenizer.json over a small vocabulary (padded to vocab_size with
    made-up sub-words)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers, processors
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "-"]
    vocab += list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [w for w in WORDS if w not in vocab]
    vocab += [f"##x{i}" for i in range(vocab_size - len(vocab))]
    assert len(vocab) == vocab_size
    tok = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)},
                                                unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(folder, "tokenizer.json"))


def write_pipeline(folder, pooling, normalize, max_seq_length=None):
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json as
    sentence-transformers saves them."""
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    keys = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
            "mean": "pooling_mode_mean_tokens"}
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({k: name in pooling for name, k in keys.items()}, f)
    if max_seq_length:
        with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)


# Sizes unlike MiniLM's: hidden sizes, heads, layers, feed-forward widths, vocabularies.
CONFIGS = [
    dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
         vocab_size=120, max_position_embeddings=64),
    dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=3, intermediate_size=200,
         vocab_size=150, max_position_embeddings=40),
    dict(hidden_size=128, num_attention_heads=8, num_hidden_layers=1, intermediate_size=64,
         vocab_size=128, max_position_embeddings=32, layer_norm_eps=1e-6),
]
POOLINGS = [(("mean",), True), (("cls",), False), (("max",), False),
            (("cls", "mean"), True)]


@pytest.fixture(scope="module")
def torch_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def save_random_bert(torch, transformers, folder, config, seed):
    """A randomly initialised BertModel, every parameter perturbed (so that biases and
    layer norms are not the trivial 0/1), saved with save_pretrained."""
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**config), add_pooling_layer=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def torch_reference(torch, model, encoder_model, sentences, pooling, normalize):
    """BertModel's last hidden states for cattn's token ids, pooled in float64."""
    ids, mask, _ = encoder_model.tokenize(sentences)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       token_type_ids=torch.zeros_like(torch.from_numpy(ids))
                       ).last_hidden_state.numpy().astype(np.float64)
    parts = []
    m = mask[..., None].astype(bool)
    for mode in pooling:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m, hidden, -np.inf).max(1))
        else:
            parts.append((hidden * m).sum(1) / m.sum(1))
    pooled = np.concatenate(parts, axis=1)
    if normalize:
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    tokens = [hidden[b, :mask[b].sum()] for b in range(len(sentences))]
    return pooled, tokens


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_matches_transformers_bert(torch_bert, tmp_path, index):
    torch, transformers = torch_bert
    config = CONFIGS[index]
    model = save_random_bert(torch, transformers, tmp_path, config, seed=index)
    write_tokenizer(tmp_path, config["vocab_size"])
    for pooling, normalize in POOLINGS:
        write_pipeline(tmp_path, pooling, normalize)
        ours = SentenceEncoder.from_pretrained(tmp_path)
        assert ours.pooling == pooling and ours.normalize == normalize
        want, want_tokens = torch_reference(torch, model, ours, SENTENCES, pooling, normalize)
        got = ours.encode(SENTENCES, batch_size=3)
        assert got.shape == (len(SENTENCES), config["hidden_size"] * len(pooling))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
        tokens = ours.encode(SENTENCES, output_value="token_embeddings")
        for g, w in zip(tokens, want_tokens):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5)
    # float64 weights: the same forward pass to float64 accuracy of torch's float32 result
    ours64 = SentenceEncoder.from_pretrained(tmp_path, dtype=np.float64)
    model64 = model.double()
    want, _ = torch_reference(torch, model64, ours64, SENTENCES, ("cls", "mean"), True)
    np.testing.assert_allclose(ours64.encode(SENTENCES), want, rtol=1e-10, atol=1e-12)


def test_folder_options_are_read_as_sentence_transformers_reads_them(torch_bert, tmp_path):
    """Bugs caught: a model folder's do_lower_case, similarity function, prompts or
    default prompt left unread (each falls back to its default, which the other tests'
    folders happen to use). The folder is loaded by sentence-transformers too, and every
    option must be the one it reads; so must the embeddings, with a query prompt."""
    torch, transformers = torch_bert
    st = require_peer("sentence_transformers")
    config = CONFIGS[0]
    save_random_bert(torch, transformers, tmp_path, config, seed=5)
    write_tokenizer(tmp_path, config["vocab_size"])
    write_pipeline(tmp_path, ("mean",), False)
    with open(tmp_path / "1_Pooling" / "config.json", "w") as f:  # (sentence-transformers
        json.dump({"word_embedding_dimension": config["hidden_size"],  # needs the width)
                   "pooling_mode_mean_tokens": True}, f)
    with open(tmp_path / "sentence_bert_config.json", "w") as f:
        json.dump({"max_seq_length": 20, "do_lower_case": True}, f)
    with open(tmp_path / "config_sentence_transformers.json", "w") as f:
        json.dump({"similarity_fn_name": "dot", "default_prompt_name": "query",
                   "prompts": {"query": "query: ", "document": "passage: "}}, f)
    ours = SentenceEncoder.from_pretrained(tmp_path)
    theirs = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert ours.do_lower_case is theirs[0].do_lower_case is True
    assert ours.similarity_fn_name == theirs.similarity_fn_name == "dot"
    assert ours.prompts == theirs.prompts and ours.default_prompt_name == "query"
    assert theirs.default_prompt_name == "query"
    np.testing.assert_allclose(ours.encode(SENTENCES), theirs.encode(SENTENCES), rtol=1e-4,
                               atol=2e-5)


def test_a_sequence_of_exactly_max_position_embeddings_tokens(torch_bert, tmp_path, rng):
    """Bug caught: the encoder refusing a sequence of exactly max_position_embeddings
    tokens (L >= instead of L >), the model's own longest input. Against transformers'
    BertModel on the same ids; one token more is refused."""
    torch, transformers = torch_bert
    config = CONFIGS[2]
    model = save_random_bert(torch, transformers, tmp_path, config, seed=3)
    write_tokenizer(tmp_path, config["vocab_size"])
    encoder = SentenceEncoder.from_pretrained(tmp_path).encoder
    longest = config["max_position_embeddings"]
    ids = rng.integers(0, config["vocab_size"], (2, longest))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(encoder(ids), want, rtol=1e-4, atol=5e-5)
    with pytest.raises(ValueError, match="exceed"):
        encoder(rng.integers(0, config["vocab_size"], (1, longest + 1)))


def test_plain_transformers_folder_is_mean_pooled(torch_bert, tmp_path):
    """Without modules.json (a plain Hugging Face model): mean pooling, no normalization,
    as sentence-transformers builds it; truncation at max_seq_length."""
    torch, transformers = torch_bert
    config = CONFIGS[0]
    model = save_random_bert(torch, transformers, tmp_path, config, seed=7)
    write_tokenizer(tmp_path, config["vocab_size"])
    ours = SentenceEncoder.from_pretrained(tmp_path)
    assert ours.pooling == ("mean",) and not ours.normalize
    want, _ = torch_reference(torch, model, ours, SENTENCES, ("mean",), False)
    np.testing.assert_allclose(ours.encode(SENTENCES), want, rtol=1e-4, atol=2e-5)
    write_pipeline(tmp_path, ("mean",), False, max_seq_length=6)
    short = SentenceEncoder.from_pretrained(tmp_path)
    ids, mask, _ = short.tokenize(SENTENCES)
    assert ids.shape[1] == 6 and mask.sum(1).max() == 6
    want, _ = torch_reference(torch, model, short, SENTENCES, ("mean",), False)
    np.testing.assert_allclose(short.encode(SENTENCES), want, rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------ loading errors

def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        SentenceEncoder.from_pretrained(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SentenceEncoder.from_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "xlm-roberta"}, f)
    with pytest.raises(ValueError, match="BERT-family.*xlm-roberta"):
        SentenceEncoder.from_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4}, f)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SentenceEncoder.from_pretrained(tmp_path)
    with open(tmp_path / "modules.json", "w") as f:
        json.dump([{"idx": 0, "path": "2_Dense",
                    "type": "sentence_transformers.models.Dense"}], f)
    with pytest.raises(ValueError, match="Dense.*not supported"):
        SentenceEncoder.from_pretrained(tmp_path)


# ----------------------------------------------------------------- encode's options

@pytest.fixture(scope="module")
def tiny():
    """A random-weight model with a stand-in tokenizer: no optional package needed."""
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=40,
                        max_position_embeddings=64)
    return MiniLM(BertEncoder.random(config, rng=3), WordTokenizer(97), normalize=False)


def test_shapes_order_and_batching(tiny):
    one = tiny.encode("I love Apple phones")
    assert one.shape == (32,) and one.dtype == np.float32
    many = tiny.encode(SENTENCES)
    assert many.shape == (len(SENTENCES), 32)
    # the input order, whatever the batching (BLAS rounds differently for other sizes)
    np.testing.assert_allclose(many[2], one, rtol=1e-5, atol=1e-6)
    for batch_size in (1, 2, 5, 100):
        np.testing.assert_allclose(tiny.encode(SENTENCES, batch_size=batch_size), many,
                                   rtol=1e-5, atol=1e-6)
    assert tiny.encode([]).shape == (0, 32)
    assert tiny.encode(tuple(SENTENCES)).shape == (len(SENTENCES), 32)
    as_list = tiny.encode(SENTENCES, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == len(SENTENCES)
    np.testing.assert_array_equal(np.stack(as_list), many)


def test_normalize_and_token_embeddings(tiny):
    raw = tiny.encode(SENTENCES)
    unit = tiny.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-7)
    tokens = tiny.encode(SENTENCES, output_value="token_embeddings")
    ids, mask, _ = tiny.tokenize(SENTENCES)
    hidden = tiny.encoder(ids, mask)
    for b, t in enumerate(tokens):
        n = mask[b].sum()
        assert t.shape == (n, 32)
        np.testing.assert_allclose(t, hidden[b, :n], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(raw[b], t.mean(0), rtol=1e-5, atol=1e-6)
    both = tiny.encode(SENTENCES[:2], output_value=None)
    assert set(both[0]) == {"sentence_embedding", "token_embeddings"}
    single = tiny.encode("ok", output_value="token_embeddings")
    assert single.shape == (3, 32)


def test_precisions_follow_sentence_transformers(tiny, rng):
    emb = tiny.encode(SENTENCES)
    lo, hi = emb.min(0), emb.max(0)
    steps = (hi - lo) / 255
    uint8 = np.clip(np.floor((emb - lo) / steps), 0, 255)
    np.testing.assert_array_equal(tiny.encode(SENTENCES, precision="uint8"), uint8)
    got = tiny.encode(SENTENCES, precision="int8")
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, uint8 - 128)
    bits = (emb > 0).astype(np.uint8)
    ubinary = (bits.reshape(len(emb), 4, 8) * (1 << np.arange(7, -1, -1))).sum(-1)
    got = tiny.encode(SENTENCES, precision="ubinary")
    assert got.dtype == np.uint8 and got.shape == (len(SENTENCES), 4)
    np.testing.assert_array_equal(got, ubinary)
    np.testing.assert_array_equal(tiny.encode(SENTENCES, precision="binary"), ubinary - 128)
    with pytest.raises(ValueError, match="one embedding"):
        tiny.encode("ok", precision="int8")
    assert tiny.encode("ok", precision="ubinary").shape == (4,)
    # against sentence-transformers' own function, when it is installed
    try:
        from sentence_transformers.util.quantization import quantize_embeddings as theirs
    except ImportError:
        try:
            from sentence_transformers.quantization import quantize_embeddings as theirs
        except ImportError:
            return
    x = rng.standard_normal((50, 24)).astype(np.float32)
    for precision in ("float32", "int8", "uint8", "binary", "ubinary"):
        want = theirs(x, precision=precision)
        got = quantize_embeddings(x, precision)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    ranges = np.stack([x.min(0) - 1, x.max(0) + 1])
    np.testing.assert_array_equal(quantize_embeddings(x, "int8", ranges=ranges),
                                  theirs(x, precision="int8", ranges=ranges))


def test_token_embeddings_share_their_calibration_ranges(rng):
    """Bug caught: a list of token embeddings (ragged, one array per sentence) quantized to
    int8/uint8 with calibration_embeddings given, but ranged over the list itself. Each
    array must equal sentence-transformers' own quantization of it with those
    calibration embeddings; without them, with the ranges of all the tokens together."""
    require_peer("sentence_transformers")
    from sentence_transformers.util.quantization import quantize_embeddings as theirs
    tokens = [rng.standard_normal((n, 16)).astype(np.float32) for n in (3, 7, 1)]
    calibration = 3 * rng.standard_normal((40, 16)).astype(np.float32)
    for precision in ("int8", "uint8"):
        for given, ranged_over in ((calibration, calibration), (None, np.concatenate(tokens))):
            got = quantize_embeddings(tokens, precision, calibration_embeddings=given)
            for array, sentence_tokens in zip(got, tokens):
                want = theirs(sentence_tokens, precision=precision,
                              calibration_embeddings=ranged_over)
                assert array.dtype == want.dtype
                np.testing.assert_array_equal(array, want)


def test_binary_quantization_of_exact_zeros(rng):
    """Bug caught: binary quantization setting the bit of a value that is exactly 0 (x >= 0
    where sentence-transformers has x > 0), which random embeddings never hold but ReLU
    outputs and truncated or padded ones do. Against sentence-transformers' own function,
    bit for bit."""
    require_peer("sentence_transformers")
    from sentence_transformers.util.quantization import quantize_embeddings as theirs
    x = rng.standard_normal((6, 32)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0.0
    x[0] = 0.0
    for precision in ("binary", "ubinary"):
        want = theirs(x, precision=precision)
        got = quantize_embeddings(x, precision)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_a_constant_dimension_quantizes_to_its_lowest_level(rng):
    """Bug caught: a dimension equal in every calibration row (step 0) divided by its
    step: 0 / 0 cast to an integer, undefined (NumPy warns). Its level must be the lowest
    (uint8 0, int8 -128) with no warning, and the other dimensions as without it."""
    x = rng.standard_normal((20, 8)).astype(np.float32)
    x[:, 3] = 0.25
    others = [0, 1, 2, 4, 5, 6, 7]
    for precision, lowest in (("uint8", 0), ("int8", -128)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = quantize_embeddings(x, precision)
        assert np.all(got[:, 3] == lowest)
        np.testing.assert_array_equal(got[:, others],
                                      quantize_embeddings(x[:, others], precision))


def test_similarity(tiny, rng):
    a, b = rng.standard_normal((3, 8)), rng.standard_normal((5, 8))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(similarity(a, b), unit(a) @ unit(b).T, rtol=1e-12)
    np.testing.assert_allclose(similarity(a, b, "dot"), a @ b.T, rtol=1e-12)
    dist = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    np.testing.assert_allclose(similarity(a, b, "euclidean"), -dist, rtol=1e-9)
    np.testing.assert_allclose(similarity(a, b, "manhattan"),
                               -np.abs(a[:, None] - b[None]).sum(-1), rtol=1e-12)
    assert similarity(a[0], b).shape == (1, 5)
    emb = tiny.encode(SENTENCES[:3])
    sim = tiny.similarity(emb, emb)
    assert sim.shape == (3, 3) and sim.dtype == np.float32
    np.testing.assert_allclose(np.diag(sim), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="same dimension"):
        similarity(a, b[:, :4])
    with pytest.raises(ValueError, match="similarity function"):
        similarity(a, b, "jaccard")


def test_progress_bar(tiny, capsys):
    tiny.encode(SENTENCES, batch_size=2, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "Batches" in err and "4/4" in err
    tiny.encode(SENTENCES, batch_size=2)
    assert capsys.readouterr().err == ""
    tiny.encode(SENTENCES * 2, batch_size=1)  # off by default, as sentence-transformers
    assert capsys.readouterr().err == ""
    tiny.encode(SENTENCES * 2, batch_size=1, show_progress_bar=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad, error, match", [
    (None, TypeError, "string or a list of strings, got NoneType"),
    (42, TypeError, "string or a list of strings, got int"),
    (["fine", 3], TypeError, "strings, got int at position 1"),
    ([["nested", "list"]], TypeError, "strings, got list at position 0"),
    (["fine", None], TypeError, "strings, got NoneType at position 1"),
    (b"bytes", TypeError, "got bytes"),
])
def test_bad_sentences(tiny, bad, error, match):
    with pytest.raises(error, match=match):
        tiny.encode(bad)


def test_bad_options(tiny):
    with pytest.raises(ValueError, match="batch_size"):
        tiny.encode(SENTENCES, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        tiny.encode(SENTENCES, batch_size=2.0)
    with pytest.raises(ValueError, match="precision"):
        tiny.encode(SENTENCES, precision="int4")
    with pytest.raises(ValueError, match="output_value"):
        tiny.encode(SENTENCES, output_value="pooled")
    with pytest.raises(TypeError, match="normalize_embeddings"):
        tiny.encode(SENTENCES, normalize_embeddings="yes")
    with pytest.raises(TypeError, match="show_progress_bar"):
        tiny.encode(SENTENCES, show_progress_bar=1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        tiny.encode(SENTENCES, normalize=True)


@pytest.mark.parametrize("blas_gemm", [False, True], ids=["this_cpu", "blas_gemm"])
def test_encode_leaves_blas_alone_unless_it_calls_blas(monkeypatch, blas_gemm):
    """Another thread reads the BLAS thread counts in the middle of an encode (from inside
    its attention calls, so on any machine and load): it sees the count the user set, or 1
    only where the linear layers are BLAS's GEMMs (held on one thread for the call, as
    attention's BLAS path): on this CPU as it runs, and with the weights left unpacked for
    BLAS as on CPUs without the micro-kernels. Bug caught: holding SciPy's BLAS at one
    thread, process-wide, during every encode, where no BLAS is called."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from cattn import _encoder_ops
    from cattn._blas_threads import single_threaded_blas
    from cattn.models import bert

    if blas_gemm:
        monkeypatch.setattr(bert, "packs_weights", lambda dtype: False)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=40,
                        max_position_embeddings=64)
    model = MiniLM(BertEncoder.random(config, rng=3), WordTokenizer(97), normalize=False)

    def fewest_blas_threads():   # (NumPy's BLAS keeps the user's count: cattn never sets it)
        return min(i["num_threads"] for i in threadpoolctl.threadpool_info()
                   if i["user_api"] == "blas")

    seen = []
    attention = bert.scaled_dot_product_attention

    def attention_read_from_another_thread(*args, **kwargs):
        reader = threading.Thread(target=lambda: seen.append(fewest_blas_threads()))
        reader.start()
        reader.join()
        return attention(*args, **kwargs)

    monkeypatch.setattr(bert, "scaled_dot_product_attention",
                        attention_read_from_another_thread)
    with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
        if fewest_blas_threads() != 3:
            pytest.skip("this BLAS does not take a count of 3 threads")
        model.encode(["I love Apple phones", "How are you doing?"])
        after = fewest_blas_threads()
    # (the linear layers' GEMM is BLAS's where no packed micro-kernel serves float32)
    calls_blas = ((blas_gemm or _encoder_ops.linear_panel_width(np.float32) == 1)
                  and single_threaded_blas.backend != "none")
    assert seen and set(seen) == {1 if calls_blas else 3}
    assert after == 3

def test_inputs_are_not_modified(tiny):
    sentences = list(SENTENCES)
    tiny.encode(sentences, batch_size=2)
    assert sentences == SENTENCES


@pytest.mark.parametrize("tokens_per_group", [512, 12, 1])
def test_packed_forward_equals_padded_forward(rng, monkeypatch, tokens_per_group):
    """The packed pass (GEMMs on real tokens, fused row operations, groups of sequences)
    equals the padded layer-by-layer BertEncoder, in float64 to rounding."""
    from cattn.models import _packed
    from cattn.models.sentence import packed_forward
    monkeypatch.setattr(_packed, "TOKENS_PER_GROUP", tokens_per_group)
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2,
                        num_attention_heads=3, intermediate_size=40,
                        max_position_embeddings=20)
    encoder = BertEncoder.random(config, rng=5, dtype=np.float64)
    lengths = [7, 1, 12, 3]
    ids = np.zeros((4, 12), np.int64)
    mask = np.zeros((4, 12), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, 50, n)
        mask[b, :n] = 1
    want = encoder(ids, mask)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    got = packed_forward(encoder, ids[mask == 1], offsets)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[offsets[b]:offsets[b + 1]], want[b, :n], rtol=1e-11,
                                   atol=1e-12)
    assert math.isfinite(float(got.sum()))


def write_safetensors(path, tensors, dtypes):
    """A .safetensors file written by hand (header size, JSON header, raw data)."""
    header, blobs, offset = {}, [], 0
    for name, raw in tensors.items():
        data = raw.tobytes()
        header[name] = {"dtype": dtypes[name], "shape": list(raw.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def test_read_safetensors(tmp_path, rng):
    from cattn.models.sentence import read_safetensors
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    bf16_bits = (f32.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    tensors = {"f32": f32, "f64": rng.standard_normal(4), "f16": f32.astype(np.float16),
               "bf16": bf16_bits, "i64": np.arange(6).reshape(2, 3)}
    dtypes = {"f32": "F32", "f64": "F64", "f16": "F16", "bf16": "BF16", "i64": "I64"}
    write_safetensors(tmp_path / "w.safetensors", tensors, dtypes)
    got = read_safetensors(tmp_path / "w.safetensors")
    for name in ("f32", "f64", "f16", "i64"):
        a = np.asarray(got[name])
        assert a.dtype == tensors[name].dtype and a.shape == tensors[name].shape
        np.testing.assert_array_equal(a, tensors[name])
    bf16 = np.asarray(got["bf16"])
    assert bf16.dtype == np.float32
    np.testing.assert_array_equal(bf16, (bf16_bits.astype(np.uint32) << 16).view(np.float32))
    assert np.abs(bf16 - f32).max() <= np.abs(f32).max() * 2 ** -7
    assert np.asarray(got["f16"], dtype=np.float32).dtype == np.float32
    safetensors_numpy = pytest.importorskip("safetensors.numpy")  # the reference reader
    safetensors_numpy.save_file({"a": f32, "b": tensors["f64"]}, str(tmp_path / "r.st"))
    for name, a in safetensors_numpy.load_file(str(tmp_path / "r.st")).items():
        np.testing.assert_array_equal(np.asarray(read_safetensors(tmp_path / "r.st")[name]), a)


def test_read_safetensors_refuses_bad_files(tmp_path):
    from cattn.models.sentence import read_safetensors
    (tmp_path / "junk").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(tmp_path / "junk")
    write_safetensors(tmp_path / "odd", {"x": np.zeros(3, np.uint32)}, {"x": "U32"})
    with pytest.raises(ValueError, match="dtype U32"):
        read_safetensors(tmp_path / "odd")
    write_safetensors(tmp_path / "short", {"x": np.zeros(3, np.float32)}, {"x": "F32"})
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(tmp_path / "short")
    write_safetensors(tmp_path / "shape", {"x": np.zeros(3, np.float32)}, {"x": "F32"})
    raw = (tmp_path / "shape").read_bytes().replace(b"[3]", b"[4]")
    (tmp_path / "shape").write_bytes(raw)
    with pytest.raises(ValueError, match="does not fit"):
        read_safetensors(tmp_path / "shape")


# ------------------------------------------------------------ float32 matmul precision

def test_high_matmul_precision(rng):
    """matmul_precision="high": split bfloat16 products on AMX (close to, not equal to, the
    float32 result), the float32 products elsewhere (equal); switching back restores the
    float32 packing."""
    from cattn import _encoder_ops as ops
    from cattn.models.sentence import layer_weights
    config = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96,
                        max_position_embeddings=64)
    model = MiniLM(BertEncoder.random(config, rng=4), WordTokenizer(97))
    sentences = SENTENCES * 3
    highest = model.encode(sentences, batch_size=4)
    model.matmul_precision = "high"
    high = model.encode(sentences, batch_size=4)
    split = ops.split_bf16_available()
    assert (layer_weights(model.encoder, "high")[0].qkv.dtype == np.uint32) == split
    if split:
        assert not np.array_equal(high, highest)
        np.testing.assert_allclose(high, highest, rtol=0, atol=2e-5)
    else:
        np.testing.assert_array_equal(high, highest)
    model.matmul_precision = "highest"
    np.testing.assert_array_equal(model.encode(sentences, batch_size=4), highest)
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        model.matmul_precision = "medium"
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        MiniLM(model.encoder, WordTokenizer(97), matmul_precision="low")


def test_layers_pack_their_weights_for_the_matmul_precision(monkeypatch):
    """Each layer asks the packing for its model's matmul precision. On a CPU without split
    bfloat16 products "high" packs as "highest", so only the request shows the bug it
    catches there: a layer that drops the precision and packs for float32 products always
    (on AMX CPUs test_high_matmul_precision sees it in the results too)."""
    from cattn import _encoder_ops as ops
    asked = []
    pack = ops.pack_linear_weight

    def recording(weight, isa=None, precision="highest"):
        asked.append(precision)
        return pack(weight, isa, precision)

    monkeypatch.setattr(ops, "pack_linear_weight", recording)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=24,
                        max_position_embeddings=16)
    model = MiniLM(BertEncoder.random(config, rng=5), WordTokenizer(30))
    model.encode(["one two"])
    assert asked and set(asked) == {"highest"}
    asked.clear()
    model.matmul_precision = "high"
    model.encode(["one two"])
    assert asked and set(asked) == {"high"}


def test_high_matmul_precision_matches_transformers(torch_bert, tmp_path):
    torch, transformers = torch_bert
    config = CONFIGS[1]
    model = save_random_bert(torch, transformers, tmp_path, config, seed=11)
    write_tokenizer(tmp_path, config["vocab_size"])
    write_pipeline(tmp_path, ("mean",), True)
    ours = SentenceEncoder.from_pretrained(tmp_path, matmul_precision="high")
    assert ours.matmul_precision == "high"
    want, want_tokens = torch_reference(torch, model, ours, SENTENCES, ("mean",), True)
    np.testing.assert_allclose(ours.encode(SENTENCES, batch_size=3), want, rtol=1e-4,
                               atol=2e-5)
    for g, w in zip(ours.encode(SENTENCES, output_value="token_embeddings"), want_tokens):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_float32_weights_map_the_file_read_only(tmp_path, rng):
    """float32 tensors come as read-only maps of the file, which BertEncoder keeps (the
    embedding table is read only where used); writable arrays are still copied."""
    from cattn.models.sentence import read_safetensors
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=24,
                        max_position_embeddings=12)
    weights = {k: rng.standard_normal(s).astype(np.float32)
               for k, s in config.weight_shapes().items()}
    write_safetensors(tmp_path / "m.safetensors", weights, {k: "F32" for k in weights})
    mapped = BertEncoder(config, read_safetensors(tmp_path / "m.safetensors"))
    table = mapped.word_embeddings
    assert not table.flags.writeable and isinstance(table.base, np.memmap)
    np.testing.assert_array_equal(table, weights["embeddings.word_embeddings.weight"])
    copied = BertEncoder(config, weights)
    assert copied.word_embeddings.flags.writeable
    assert not np.shares_memory(copied.word_embeddings,
                                weights["embeddings.word_embeddings.weight"])
    ids = rng.integers(0, 40, (2, 7))
    np.testing.assert_array_equal(mapped(ids), copied(ids))
    # asked for float64, a float32 tensor is read and converted, never mapped
    as64 = BertEncoder(config, read_safetensors(tmp_path / "m.safetensors"), np.float64)
    assert as64.word_embeddings.dtype == np.float64 and as64.word_embeddings.flags.writeable


def test_each_layer_keeps_its_packed_weights_per_precision():
    """A layer packs its linear weights once per matmul precision and keeps only the last
    precision's. Bugs caught: packing again on every encode, or serving the packing of
    another precision after a change."""
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2,
                        num_attention_heads=3, intermediate_size=40,
                        max_position_embeddings=20)
    model = MiniLM(BertEncoder.random(config, rng=2), WordTokenizer(50), normalize=False)
    layer = model.encoder.layers[1]
    model.encode(["one two three"])
    first = layer.linear_weights("highest")
    model.encode(["four five"])
    assert layer.linear_weights("highest") is first
    model.matmul_precision = "high"
    embeddings = model.encode(["four five"])
    high = layer.linear_weights("high")
    assert high is not first and layer.linear_weights("high") is high
    model.matmul_precision = "highest"
    np.testing.assert_allclose(model.encode(["four five"]), embeddings, rtol=1e-3, atol=1e-4)
    assert layer.linear_weights("highest") is not first     # the old packing was let go

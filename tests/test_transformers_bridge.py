"""cattn inside PyTorch and Hugging Face transformers (cattn.integrations).

The operator torch.ops.cattn.scaled_dot_product_attention is compared with the float64
reference; the transformers bridge with transformers' own "eager" attention on tiny random
models of seven families built from their configs (no download): Llama (grouped-query
heads), Qwen2, Mistral (sliding window), Gemma 2 (softcap, alternating windows), gpt-oss
(sinks, alternating windows), Llama 4 (chunked attention) and BERT (an encoder with
padding). Their weights are drawn
wide enough (initializer_range) that scores reach the softcap and the sinks take real
probability mass, so a dropped option changes the logits. Under CI=true a missing torch
or transformers fails these tests instead of skipping them.
"""
import copy
import doctest
import importlib
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import reference64, require_peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 32  # greedy tokens compared with eager's

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.2)
# family: (config class, options beyond COMMON); windows shorter than the prompts
DECODERS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "gemma2": ("Gemma2Config", dict(sliding_window=5, head_dim=16, query_pre_attn_scalar=16,
                                    attn_logit_softcapping=3.0,
                                    final_logit_softcapping=30.0)),
    "gpt_oss": ("GptOssConfig", dict(sliding_window=5, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, intermediate_size=64)),
    # chunked attention in chunks of 8 (three chunked layers, then a full one): prompts
    # span two chunks, generation crosses four chunk boundaries
    "llama4": ("Llama4TextConfig", dict(num_hidden_layers=4, head_dim=16,
                                        attention_chunk_size=8, intermediate_size_mlp=128,
                                        num_local_experts=2, num_experts_per_tok=1)),
}


def test_import_cattn_imports_neither_torch_nor_transformers():
    code = ("import sys, cattn, cattn.integrations; cattn.scaled_dot_product_attention; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True)
    assert child.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def torch():
    return require_peer("torch")


@pytest.fixture(scope="module")
def hf(torch):
    transformers = require_peer("transformers")
    bridge = importlib.import_module("cattn.integrations.transformers")
    bridge.register()
    return transformers


def test_module_examples_run(hf):
    for name in ("cattn.integrations.torch", "cattn.integrations.transformers"):
        failures, tried = doctest.testmod(importlib.import_module(name))
        assert tried > 0 and failures == 0, name


# ----------------------------------------------------------------------- the operator

def _operands(torch, rng, batch=2, heads=4, kv_heads=2, L=7, S=11, E=16):
    q = torch.from_numpy(rng.standard_normal((batch, heads, L, E), dtype=np.float32))
    k = torch.from_numpy(rng.standard_normal((batch, kv_heads, S, E), dtype=np.float32))
    v = torch.from_numpy(rng.standard_normal((batch, kv_heads, S, E), dtype=np.float32))
    return q, k, v


OPTIONS = [dict(is_causal=True), dict(is_causal=True, window_left=3, window_right=0),
           dict(softcap=2.0, scale=0.7), dict(is_causal=True, alignment="bottom_right"),
           dict(is_causal=True, q_offset=4, k_offset=1)]


@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(o) for o in OPTIONS])
def test_operator_matches_the_reference(torch, rng, options):
    q, k, v = _operands(torch, rng)
    sinks = torch.from_numpy(rng.standard_normal(4, dtype=np.float32))
    key_mask = torch.from_numpy(rng.random((2, 1, 1, 11)) > 0.3)
    op_options = {name: torch.tensor(value) if name.endswith("offset") else value
                  for name, value in options.items()}
    got = torch.ops.cattn.scaled_dot_product_attention(
        q, k, v, key_mask, enable_gqa=True, sinks=sinks, **op_options)
    want = reference64(q.numpy(), k.numpy(), v.numpy(), key_mask.numpy(), enable_gqa=True,
                       sinks=sinks.numpy(), **_as_cattn_options(options))
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-5)
    # heads-last memory, as models reshape it (a contiguous (B, H, L, E) would need a copy)
    assert got.transpose(1, 2).is_contiguous()


def _as_cattn_options(options):
    """The operator's window sides as cattn's window pair."""
    options = dict(options)
    if "window_left" in options:
        options["window"] = (options.pop("window_left"), options.pop("window_right"))
    return options


def torch_sdpa64(torch, q, k, v, mask):
    """torch's SDPA in float64 under a boolean or additive mask (grouped-query heads
    allowed), heads last as transformers' attention functions return it."""
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    return want.transpose(1, 2).numpy()


def layer_flags(is_causal):
    """What cattn_attention_forward reads of the attention module."""
    return types.SimpleNamespace(is_causal=is_causal)


@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(o) for o in OPTIONS])
def test_eager_paths_match_the_reference(torch, rng, options):
    """The function the bridge calls outside traced graphs, on (batch, heads, L, E) tensors
    (written heads-last) and on 3-D ones (written into a new tensor), with every option at
    a value of its own: an option handed on under another's name (q_offset for k_offset,
    the window's sides swapped, the sinks as the mask) changes the result."""
    from cattn.integrations.torch import scaled_dot_product_attention
    q, k, v = _operands(torch, rng)
    sinks = torch.from_numpy(rng.standard_normal(4, dtype=np.float32))
    key_mask = torch.from_numpy(rng.random((2, 1, 1, 11)) > 0.3)
    options = _as_cattn_options(options)
    want = reference64(q.numpy(), k.numpy(), v.numpy(), key_mask.numpy(), enable_gqa=True,
                       sinks=sinks.numpy(), **options)
    got = scaled_dot_product_attention(q, k, v, key_mask, enable_gqa=True, sinks=sinks,
                                       **options)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-5)
    for item in range(2):
        got = scaled_dot_product_attention(q[item], k[item], v[item], key_mask[item],
                                           enable_gqa=True, sinks=sinks, **options)
        np.testing.assert_allclose(got.numpy(), want[item], rtol=2e-5, atol=2e-5)


def test_operator_passes_torch_library_checks(torch, rng):
    """Schema, fake (meta) implementation and autograd registration agree with the real one
    (a fake result of other strides than the real one breaks compiled graphs)."""
    q, k, v = _operands(torch, rng)
    torch.library.opcheck(torch.ops.cattn.scaled_dot_product_attention.default, (q, k, v),
                          dict(is_causal=True, enable_gqa=True, window_left=2),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_compiled_function_keeps_the_operator_in_one_graph(torch, rng):
    from cattn.integrations.torch import scaled_dot_product_attention

    def attend(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                            window=(3, 0)) * 2

    q, k, v = _operands(torch, rng)
    explanation = torch._dynamo.explain(attend)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    targets = {node.target for graph in explanation.graphs for node in graph.graph.nodes}
    assert torch.ops.cattn.scaled_dot_product_attention.default in targets
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    np.testing.assert_allclose(compiled(q, k, v).numpy(), attend(q, k, v).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_backward_raises_a_clear_error(torch, rng):
    from cattn.integrations.torch import scaled_dot_product_attention
    q, k, v = _operands(torch, rng)
    q.requires_grad_()
    out = scaled_dot_product_attention(q, k, v, enable_gqa=True)  # the forward pass works
    with pytest.raises(RuntimeError, match="inference only"):
        out.sum().backward()


def test_other_devices_are_refused(torch):
    from cattn.integrations.torch import scaled_dot_product_attention
    q = torch.ones(1, 2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        scaled_dot_product_attention(q, q, q)


def test_16_bit_tensors_in_and_out(torch, rng):
    q, k, v = _operands(torch, rng)
    want = reference64(q.numpy(), k.numpy(), v.numpy(), is_causal=True, enable_gqa=True)
    for dtype, tol in ((torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)):
        got = torch.ops.cattn.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True, enable_gqa=True)
        assert got.dtype == dtype
        assert got.transpose(1, 2).is_contiguous()  # heads last once rounded, too
        # the 16-bit inputs' own rounding, then the result's
        np.testing.assert_allclose(got.float().numpy(), want, rtol=4 * tol, atol=4 * tol)


# -------------------------------------------------------------- models from transformers

_MODELS = {}


@pytest.mark.parametrize("is_causal", [True, False])
def test_layer_flags_without_a_mask_follow_transformers_sliding_masks(hf, torch, rng,
                                                                      is_causal):
    """Bug caught: a layer called without a mask (its own is_causal and sliding_window
    flags) given a window one key wider or narrower than transformers' sliding masks.
    Compared with torch's SDPA under the boolean mask transformers' own mask function
    gives at the same positions (the last query on the last key)."""
    from transformers import masking_utils
    from cattn.integrations.transformers import cattn_attention_forward
    L, S, sliding_window = 5, 12, 4
    q, k, v = _operands(torch, rng, L=L, S=S)
    mask_function = (masking_utils.sliding_window_causal_mask_function if is_causal else
                     masking_utils.sliding_window_bidirectional_mask_function)(sliding_window)
    allowed = mask_function(0, 0, torch.arange(S - L, S)[:, None], torch.arange(S)[None, :])
    got, _ = cattn_attention_forward(layer_flags(is_causal), q, k, v, None,
                                     sliding_window=sliding_window, is_causal=is_causal)
    np.testing.assert_allclose(got.numpy(), torch_sdpa64(torch, q, k, v, allowed), rtol=2e-5,
                               atol=2e-5)


def test_one_token_grouped_decoding_with_a_key_offset(hf, torch, rng):
    """Bug caught: the one-token grouped-query path placing its query at q_offset among
    the keys, forgetting k_offset (keys that start past position 0): it slices the wrong
    keys. The pattern and the dense mask it stands for both come from transformers'
    sliding-window mask at the same positions; torch's SDPA under the dense one is the
    peer."""
    from transformers import masking_utils
    from cattn.integrations.transformers import cattn_attention_forward, cattn_mask
    q, k, v = _operands(torch, rng, L=1, S=6)  # 4 query heads over 2 key/value heads
    where = (2, 1, 6, 5, 2, masking_utils.sliding_window_causal_mask_function(2))
    pattern = cattn_mask(*where)
    assert (pattern.alignment, pattern.q_offset, pattern.k_offset) == ("top_left", 5, 2)
    dense = masking_utils.sdpa_mask(*where, allow_is_causal_skip=False)
    got, _ = cattn_attention_forward(layer_flags(True), q, k, v, pattern)
    np.testing.assert_allclose(got.numpy(), torch_sdpa64(torch, q, k, v, dense), rtol=2e-5,
                               atol=2e-5)


def test_one_token_grouped_decoding_with_a_mask_per_query_head(hf, torch, rng):
    """Bug caught: one-token grouped-query decoding taking a dense mask with one row per
    query head (batch, Hq, 1, S) down its path for masks shared by all heads, where the
    query heads become rows of their key/value head: the mask no longer fits (an error,
    or the wrong head's row). Against torch's SDPA under the same mask."""
    from cattn.integrations.transformers import cattn_attention_forward
    q, k, v = _operands(torch, rng, L=1, S=9)  # 4 query heads over 2 key/value heads
    mask = torch.from_numpy(rng.random((2, 4, 1, 9)) > 0.4)
    mask[..., -1] = True  # (every row sees some key)
    got, _ = cattn_attention_forward(layer_flags(True), q, k, v, mask)
    np.testing.assert_allclose(got.numpy(), torch_sdpa64(torch, q, k, v, mask), rtol=2e-5,
                               atol=2e-5)


def test_dense_additive_mask_of_a_bfloat16_model(hf, torch, rng):
    """Bug caught: a dense additive mask in a bfloat16 model's dtype handed on as it is
    (cattn adds float32 or float64 masks, and refuses a bfloat16 one) instead of widened
    to float32. Compared with torch's SDPA in float64 on the same bfloat16 values."""
    from cattn.integrations.transformers import cattn_attention_forward
    q, k, v = (x.bfloat16() for x in _operands(torch, rng))
    mask = torch.from_numpy(rng.standard_normal((2, 1, 7, 11), dtype=np.float32)).bfloat16()
    got, _ = cattn_attention_forward(layer_flags(False), q, k, v, mask)
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), torch_sdpa64(torch, q, k, v, mask.double()),
                               rtol=0, atol=3e-2)


def decoder(hf, family):
    """A tiny random causal LM of `family` (built once), in float32 and eval mode."""
    if family not in _MODELS:
        torch = sys.modules["torch"]
        torch.manual_seed(0)
        config_class, options = DECODERS[family]
        config = getattr(hf, config_class)(**{**COMMON, **options})
        model = hf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        if family == "gpt_oss":  # sinks start at 0: draw them so that they matter
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.sinks.normal_(0.0, 1.0)
        _MODELS[family] = model.eval()
    return _MODELS[family]


def prompts(torch, batch=2, length=12, pad=3):
    """Token ids and a left-padded attention mask (the last row starts `pad` tokens late)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, COMMON["vocab_size"], (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :pad] = 0
    return ids, mask


def logits_with(torch, model, implementation, ids, mask):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def assert_valid_positions_close(got, want, mask, atol):
    """Compare the positions of real tokens (padding rows see no key: their output is
    arbitrary in either implementation)."""
    valid = mask.bool()
    np.testing.assert_allclose(got[valid].float().numpy(), want[valid].float().numpy(),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("family", DECODERS)
def test_logits_match_eager(hf, torch, family):
    model = decoder(hf, family)
    ids, mask = prompts(torch)
    want = logits_with(torch, model, "eager", ids, mask)
    got = logits_with(torch, model, "cattn", ids, mask)
    # float32 logits of order 1-10: the kernel's rounding is ~1e-7 relative
    assert_valid_positions_close(got, want, mask, atol=1e-5 * max(1.0, want.abs().max()))
    full = torch.ones_like(mask)
    assert_valid_positions_close(logits_with(torch, model, "cattn", ids, full),
                                 logits_with(torch, model, "eager", ids, full), full,
                                 atol=1e-5 * max(1.0, want.abs().max()))


def generate_with(torch, model, implementation, cache=None):
    ids, mask = prompts(torch)
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                              min_new_tokens=STEPS, cache_implementation=cache)


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generation_matches_eager(hf, torch, family):
    """Left-padded prompts, then one token at a time from transformers' DynamicCache (its
    sliding-window layers drop keys: the pattern's key offset must follow them)."""
    model = decoder(hf, family)
    want = generate_with(torch, model, "eager")
    got = generate_with(torch, model, "cattn")
    assert got.shape[1] == 12 + STEPS
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("family", ["llama", "gemma2", "llama4"])
def test_static_cache_generation_matches_eager(hf, torch, family):
    """A static cache: keys are a preallocated buffer, filled up to the query's position
    (a key past it must stay hidden), and for Gemma 2's sliding layers a rolled buffer of
    the last window; generate() builds the masks ahead of the forward pass."""
    model = decoder(hf, family)
    want = generate_with(torch, model, "eager", cache="static")
    got = generate_with(torch, model, "cattn", cache="static")
    assert got.tolist() == want.tolist()


def test_static_cache_without_padding_mask(hf, torch):
    """Prefill and two decoding steps into a static cache with no attention mask: nothing
    but the queries' positions hides the buffer's unfilled keys (zeros, which would take
    probability mass). The cache advances its length counter before attention runs."""
    model = decoder(hf, "llama")
    ids, _ = prompts(torch)
    logits = {}
    for implementation in ("eager", "cattn"):
        model.set_attn_implementation(implementation)
        cache = hf.StaticCache(config=model.config, max_cache_len=20)
        with torch.no_grad():
            steps = [model(ids, cache=cache).logits[:, -1]]
            for token in (5, 6):
                steps.append(model(torch.tensor([[token], [token]]), cache=cache).logits[:, -1])
        logits[implementation] = torch.stack(steps)
    scale = max(1.0, logits["eager"].abs().max().item())
    np.testing.assert_allclose(logits["cattn"].numpy(), logits["eager"].numpy(), rtol=0,
                               atol=1e-5 * scale)


def test_cache_keys_are_read_in_place(hf, torch, monkeypatch):
    """The keys and values cattn reads are the cache's own memory, not copies."""
    import cattn
    model = decoder(hf, "llama")
    cache = hf.StaticCache(config=model.config, max_cache_len=32)
    read = []
    real = cattn.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        read.append((key.__array_interface__["data"][0], value.__array_interface__["data"][0]))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(cattn, "scaled_dot_product_attention", spy)
    ids, mask = prompts(torch)
    model.set_attn_implementation("cattn")
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    buffers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    assert read == buffers


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "llama4"])
def test_bfloat16_is_as_close_as_eager(hf, torch, family):
    """A bfloat16 model: cattn's logits are no further from the float32 model's than
    eager's bfloat16 logits are (cattn computes in float32 inside)."""
    model = decoder(hf, family)
    ids, mask = prompts(torch)
    exact = logits_with(torch, model, "eager", ids, mask)
    half = copy.deepcopy(model).to(torch.bfloat16)
    errors = {}
    for implementation in ("eager", "cattn"):
        got = logits_with(torch, half, implementation, ids, mask)
        assert got.dtype == torch.bfloat16
        errors[implementation] = (got.float() - exact)[mask.bool()].abs().max().item()
    assert errors["cattn"] <= 1.5 * errors["eager"] + 1e-3, errors


def test_float16_model(hf, torch):
    model = decoder(hf, "qwen2")
    ids, mask = prompts(torch)
    exact = logits_with(torch, model, "eager", ids, mask)
    got = logits_with(torch, copy.deepcopy(model).to(torch.float16), "cattn", ids, mask)
    assert got.dtype == torch.float16
    # float16 weights and activations (11-bit significands) through two layers
    assert_valid_positions_close(got, exact, mask, atol=0.02 * exact.abs().max())


def test_compiled_model_calls_the_operator(hf, torch):
    """torch.compile(model): the attention layers become the cattn operator inside the
    graph (through its fake implementation), with the same logits."""
    model = decoder(hf, "mistral")
    ids, mask = prompts(torch)
    want = logits_with(torch, model, "eager", ids, mask)
    compiled_logits_match(torch, model, ids, mask, want,
                          torch._dynamo.backends.debugging.aot_eager)


def compiled_logits_match(torch, model, ids, mask, want, backend):
    """model compiled by `backend`, running cattn: the graphs it compiles hold the cattn
    operator once per layer (a graph break would run the layers' eager path instead),
    and its logits match `want`."""
    model.set_attn_implementation("cattn")
    targets = []

    def recording_backend(graph_module, example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes)
        return backend(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend)
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask).logits
    op = torch.ops.cattn.scaled_dot_product_attention.default
    assert targets.count(op) == COMMON["num_hidden_layers"]
    assert_valid_positions_close(got, want, mask, atol=1e-5 * max(1.0, want.abs().max()))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "llama4"])
def test_output_attentions_match_eager(hf, torch, family):
    """output_attentions=True: each layer's (batch, heads, L, S) weights equal eager's on
    the rows of real tokens (likeliest bugs: the weights of the key/value head where the
    query head's belong under grouped heads, weights before the softcap or without the
    sink's share, or the output's layout disturbed by the weights)."""
    model = decoder(hf, family)
    ids, mask = prompts(torch)
    outputs = {}
    for implementation in ("eager", "cattn"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model(ids, attention_mask=mask, output_attentions=True)
    want, got = outputs["eager"], outputs["cattn"]
    assert len(got.attentions) == len(want.attentions) == model.config.num_hidden_layers
    valid = mask.bool()  # (rows of padding see no key: eager spreads them, cattn gives 0)
    for got_layer, want_layer in zip(got.attentions, want.attentions):
        assert got_layer.shape == want_layer.shape and got_layer.dtype == want_layer.dtype
        np.testing.assert_allclose(got_layer.transpose(1, 2)[valid].numpy(),
                                   want_layer.transpose(1, 2)[valid].numpy(), rtol=0,
                                   atol=1e-5)  # (weights <= 1; float32 rounding ~1e-6)
    assert_valid_positions_close(got.logits, want.logits, mask,
                                 atol=1e-5 * max(1.0, want.logits.abs().max()))


def test_inductor_compiled_model_matches_eager(hf, torch):
    """torch.compile(model) with the default backend, inductor (which generates C++ for
    the rest of the graph around the operator), matches eager with the operator in the
    graphs."""
    from torch._inductor.compile_fx import compile_fx  # what backend="inductor" runs
    model = decoder(hf, "llama")
    ids, mask = prompts(torch)
    want = logits_with(torch, model, "eager", ids, mask)
    compiled_logits_match(torch, model, ids, mask, want, compile_fx)


def test_masks_stay_native(hf, torch):
    """Causal, sliding-window and padded masks reach cattn as a pattern, never as a dense
    (B, 1, L, S) tensor; a pattern cattn cannot express (chunked attention) falls back to
    the dense boolean mask, which then matches transformers' own."""
    from transformers import masking_utils as mu
    from cattn.integrations.transformers import AttentionPattern, cattn_mask
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :3] = False
    causal = cattn_mask(2, 12, 12, mask_function=mu.causal_mask_function,
                        attention_mask=padding)
    assert isinstance(causal, AttentionPattern) and causal.is_causal and causal.window is None
    assert causal.key_mask.shape == (2, 1, 1, 12)
    assert causal.key_mask[:, 0, 0].tolist() == padding.tolist()
    # a sliding cache's keys start at kv_offset: the key mask follows them
    sliding = cattn_mask(2, 1, 5, q_offset=12, kv_offset=8,
                         mask_function=mu.sliding_window_causal_mask_function(5),
                         attention_mask=torch.ones(2, 13, dtype=torch.bool))
    assert sliding.window == (4, 0) and sliding.key_mask is None
    # its last key is the query's position: bottom-right alignment, no per-item offsets
    assert (sliding.alignment, sliding.q_offset, sliding.k_offset) == ("bottom_right", None,
                                                                       None)
    # a static cache's buffer (16 keys, 5 filled): true positions, its offset a tensor
    static = cattn_mask(2, 1, 16, q_offset=torch.tensor(5), kv_offset=0,
                        mask_function=mu.causal_mask_function)
    assert static.alignment == "top_left" and int(static.q_offset) == 5
    assert static.k_offset == 0
    both = cattn_mask(2, 12, 12, mask_function=mu.sliding_window_bidirectional_mask_function(2))
    assert not both.is_causal and both.window == (2, 2)
    # a mask function cattn cannot express falls back to the dense boolean mask, which then
    # matches transformers' own
    other = mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(padding))
    dense = cattn_mask(2, 12, 12, mask_function=other, attention_mask=padding)
    want = mu.sdpa_mask(2, 12, 12, mask_function=other, attention_mask=padding,
                        allow_is_causal_skip=False)
    assert torch.equal(dense, want)


# (queries, keys, position of the first query, of the first key): prefill from the start,
# prefill continuing a cache (its first keys from the previous chunk), one token from a
# dynamic cache (the keys of the last chunk_size - 1 positions), one token into a static
# buffer of 16 keys of which the first 12 are filled
CHUNK_CALLS = {"prefill": (21, 21, 0, 0), "continued prefill": (6, 13, 15, 8),
               "decoding": (1, 8, 20, 13), "static buffer": (1, 16, 11, 0)}


@pytest.mark.parametrize("call", CHUNK_CALLS)
@pytest.mark.parametrize("padding", [(0, 0), (0, 3), (2, 7)])
def test_chunked_attention_matches_its_dense_mask(hf, torch, rng, call, padding):
    """Llama 4's chunked causal mask (a query sees the keys of its own chunk up to itself,
    chunks counted from each sequence's first real token) reaches cattn as a pattern, and
    attention through it equals the reference under transformers' dense mask on every row
    that sees a key. Chunks of 4: the calls span or cross several. Likeliest bugs: a chunk
    start off by one, the left padding's shift ignored (or one item's used for all),
    keys past the query visible in a static buffer, the keys a cache kept from the
    previous chunk seen."""
    from transformers import masking_utils as mu
    from cattn.integrations.transformers import AttentionPattern, cattn_attention_forward
    from cattn.integrations.transformers import cattn_mask
    L, S, first_query, first_key = CHUNK_CALLS[call]
    starts = torch.tensor(padding)
    total = first_query + L  # the 2-D mask covers every position up to the last query
    attention_mask = torch.arange(total)[None, :] >= starts[:, None]
    mask_function = mu.chunked_causal_mask_function(4, starts)
    q_offset = torch.tensor(first_query) if call == "static buffer" else first_query
    pattern = cattn_mask(2, L, S, q_offset, first_key, mask_function=mask_function,
                         attention_mask=attention_mask)
    assert isinstance(pattern, AttentionPattern)
    dense = mu.sdpa_mask(2, L, S, first_query, first_key, mask_function=mask_function,
                         attention_mask=attention_mask, allow_is_causal_skip=False)
    q = torch.from_numpy(rng.standard_normal((2, 4, L, 16), dtype=np.float32))
    k = torch.from_numpy(rng.standard_normal((2, 2, S, 16), dtype=np.float32))
    v = torch.from_numpy(rng.standard_normal((2, 2, S, 16), dtype=np.float32))

    class Layer:
        is_causal = True

    got, _ = cattn_attention_forward(Layer(), q, k, v, pattern, scaling=0.3)
    want = reference64(q.numpy(), k.numpy(), v.numpy(), dense.numpy(), enable_gqa=True,
                       scale=0.3).transpose(0, 2, 1, 3)
    sees_a_key = dense[:, 0].any(-1).numpy()  # (rows of padding see none)
    np.testing.assert_allclose(got.numpy()[sees_a_key], want[sees_a_key], rtol=2e-5,
                               atol=2e-5)


def test_llama4_chunks_stay_native(hf, torch, monkeypatch):
    """Llama 4's chunked layers on prompts of 20 tokens (three chunks; one row left padded,
    so its chunks start 3 tokens later), then greedy tokens from a dynamic cache and a
    static one: the same logits and tokens as eager, and every chunked mask reaches cattn
    as a pattern, never as a dense mask (the model tests above match eager either way)."""
    import cattn.integrations.transformers as bridge
    model = decoder(hf, "llama4")
    patterns = []
    real = bridge.cattn_mask

    def spy(*args, **kwargs):
        made = real(*args, **kwargs)
        if bridge._chunking(kwargs["mask_function"]) is not None:
            patterns.append(made)
        return made

    monkeypatch.setitem(hf.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS, "cattn", spy)
    ids, mask = prompts(torch, length=20)
    for padding in (mask, torch.ones_like(mask)):
        want = logits_with(torch, model, "eager", ids, padding)
        got = logits_with(torch, model, "cattn", ids, padding)
        assert_valid_positions_close(got, want, padding,
                                     atol=1e-5 * max(1.0, want.abs().max()))
    assert patterns and all(isinstance(p, bridge.AttentionPattern) for p in patterns)
    for cache in (None, "static"):
        tokens = {}
        for implementation in ("eager", "cattn"):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                tokens[implementation] = model.generate(
                    ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                    do_sample=False, cache_implementation=cache).tolist()
        assert tokens["cattn"] == tokens["eager"], cache
    assert all(isinstance(p, bridge.AttentionPattern) for p in patterns)


def test_refusals(hf, torch):
    from cattn.integrations.transformers import cattn_attention_forward
    model = decoder(hf, "llama")
    layer = model.model.layers[0].self_attn
    q = torch.ones(1, 4, 3, 16)
    kv = torch.ones(1, 2, 3, 16)
    with pytest.raises(ValueError, match="position bias"):
        cattn_attention_forward(layer, q, kv, kv, None, position_bias=torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="dropout"):
        cattn_attention_forward(layer, q, kv, kv, None, dropout=0.1)


def test_bert_encoder_with_padding(hf, torch):
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           initializer_range=0.2)
    model = hf.BertModel(config, add_pooling_layer=False).eval()
    ids, _ = prompts(torch)
    for mask in (torch.tensor([[1] * 12, [1] * 9 + [0] * 3]),    # right padding
                 torch.tensor([[1] * 12, [0] * 4 + [1] * 8])):   # left padding
        model.set_attn_implementation("eager")
        with torch.no_grad():
            want = model(ids, attention_mask=mask).last_hidden_state
            model.set_attn_implementation("cattn")
            got = model(ids, attention_mask=mask).last_hidden_state
        assert_valid_positions_close(got, want, mask, atol=1e-5)
        half = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad():
            got16 = half(ids, attention_mask=mask).last_hidden_state
        # layer-normed hidden states of order 1 through two bfloat16 layers
        assert_valid_positions_close(got16, want, mask, atol=0.1)


def test_bench_preset_runs_and_reports(hf, torch, monkeypatch):
    """python -m cattn.bench --preset transformers, on a tiny shape: every implementation
    timed per case, their first logits checked against eager's, the table printed."""
    from cattn.bench import transformers_bridge as preset
    from cattn.bench.config import BenchConfig
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, num_hidden_layers=2)
    monkeypatch.setattr(preset, "SHAPES", {"tiny": ("Qwen2Config", tiny, True, preset.IMPLS,
                                                    32, (64,))})
    monkeypatch.setattr(preset, "OVERHEAD_CALLS", 5)
    result = preset.run_transformers_preset(BenchConfig(threads=[1], reps=1, warmup=0))
    rows = result["transformers_cases"]
    assert {(r["case"], r["impl"]) for r in rows} == {
        (case, impl) for case in ("float32 prefill 32", "float32 decode at 64",
                                  "bfloat16 prefill 32", "bfloat16 decode at 64")
        for impl in preset.IMPLS}
    for r in rows:
        assert r["median_s"] > 0
        tol = 1e-4 if r["dtype"] == "float32" else 0.5  # bfloat16 logits of order 1-10
        assert r["logits_max_diff_vs_eager"] <= tol, r
        # the attention functions' share of the step: inside it, and only where transformers
        # looks them up by name (eager's is a direct call)
        if r["impl"] == "eager":
            assert r["attention_s"] is None
        else:
            assert 0 < r["attention_s"] < r["median_s"], r
    table = preset.format_transformers_cases(result)
    assert "cattn" in table and "bridge per call" in table and "[attention " in table
    # the clock leaves transformers' functions as it found them
    import transformers
    from cattn.integrations.transformers import cattn_attention_forward
    assert transformers.AttentionInterface._global_mapping["cattn"] is cattn_attention_forward

"""A T5 encoder on NumPy and cattn, T5's relative position bias looked up in the kernel.

transformers' T5 builds a dense (B, H, L, S) position bias (plus the padding mask) and adds
it to a (B, H, L, S) score array in every layer. Here each layer is one
`scaled_dot_product_attention` call with `position_bias=cattn.RelativePositionBias(...)`:
the first layer's table of a value per head and distance bucket (shared by every layer, as
T5 shares it), the bucket of each key - query distance found as the kernel folds each
block of scores. The padding is a (B, 1, 1, S) boolean mask, never expanded. No array of
L x S per head exists at any point.

`T5Encoder.from_transformers(model)` takes the weights of a `T5EncoderModel` (float32);
the layers follow transformers' modeling_t5: RMS norm before each sublayer, no 1/sqrt(d)
score scaling, a ReLU or gated-GELU feed-forward, a final RMS norm.

    python examples/t5_encoder.py    # a random tiny T5, checked against transformers
"""
import math
import tracemalloc

import numpy as np

import cattn


def rms_norm(x, weight, eps):
    """T5's layer norm: scaled by the root mean square, no mean subtracted, no bias."""
    return weight * (x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps))


def gelu_tanh(x):
    """transformers' gelu_new (the tanh approximation) of T5 v1.1 and Flan-T5."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class T5Encoder:
    """The encoder stack of a T5 model: embeddings, layers, final norm (float32 or float64).

    weights: transformers' T5EncoderModel state-dict names ("encoder.block.0.layer.0.
    SelfAttention.q.weight", ...) to arrays; num_heads, head_dim, the bucketing and the
    feed-forward kind from its config.
    """

    def __init__(self, weights, *, num_layers, num_heads, head_dim, num_buckets,
                 max_distance, gated, eps):
        self.w = weights
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.gated, self.eps = gated, eps
        table = weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        self.position_bias = cattn.RelativePositionBias(
            table, num_buckets=num_buckets, max_distance=max_distance, bidirectional=True)

    @classmethod
    def from_transformers(cls, model):
        config = model.config
        weights = {name: tensor.detach().numpy().copy()
                   for name, tensor in model.state_dict().items()}
        return cls(weights, num_layers=config.num_layers, num_heads=config.num_heads,
                   head_dim=config.d_kv, num_buckets=config.relative_attention_num_buckets,
                   max_distance=config.relative_attention_max_distance,
                   gated=config.is_gated_act, eps=config.layer_norm_epsilon)

    def __call__(self, input_ids, attention_mask=None):
        """Hidden states (B, L, d_model) of input_ids (B, L); attention_mask (B, L) of 1 for
        a token and 0 for padding, as transformers takes it."""
        x = self.w["encoder.embed_tokens.weight"][np.asarray(input_ids)]
        padding = None
        if attention_mask is not None and not np.all(attention_mask):
            padding = np.asarray(attention_mask, dtype=bool)[:, None, None, :]
        for i in range(self.num_layers):
            x = x + self.attention(i, x, padding)
            x = x + self.feed_forward(i, x)
        return rms_norm(x, self.w["encoder.final_layer_norm.weight"], self.eps)

    def attention(self, i, x, padding):
        prefix = f"encoder.block.{i}.layer.0."
        h = rms_norm(x, self.w[prefix + "layer_norm.weight"], self.eps)
        B, L, _ = x.shape
        q, k, v = (self.heads(h @ self.w[f"{prefix}SelfAttention.{name}.weight"].T)
                   for name in "qkv")
        context = np.empty((B, L, self.num_heads, self.head_dim), dtype=x.dtype)
        # T5 does not scale the scores (its initialization accounts for it): scale=1
        cattn.scaled_dot_product_attention(q, k, v, attn_mask=padding, scale=1.0,
                                           position_bias=self.position_bias,
                                           out=context.transpose(0, 2, 1, 3))
        return context.reshape(B, L, -1) @ self.w[prefix + "SelfAttention.o.weight"].T

    def heads(self, x):
        """(B, L, H·D) -> a (B, H, L, D) view."""
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def feed_forward(self, i, x):
        prefix = f"encoder.block.{i}.layer.1."
        h = rms_norm(x, self.w[prefix + "layer_norm.weight"], self.eps)
        if self.gated:
            inner = (gelu_tanh(h @ self.w[prefix + "DenseReluDense.wi_0.weight"].T)
                     * (h @ self.w[prefix + "DenseReluDense.wi_1.weight"].T))
        else:
            inner = np.maximum(h @ self.w[prefix + "DenseReluDense.wi.weight"].T, 0)
        return inner @ self.w[prefix + "DenseReluDense.wo.weight"].T


def tiny_t5(feed_forward="relu", seed=0):
    """transformers' T5EncoderModel from a random tiny config (no download), in eval mode."""
    import torch
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    config = T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=3,
                      num_heads=4, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj=feed_forward,
                      dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def transformers_hidden_states(model, input_ids, attention_mask):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids),
                     attention_mask=torch.from_numpy(attention_mask)).last_hidden_state.numpy()


def peak_bytes(function, *args):
    """The most memory Python and NumPy (and the kernel's scratch) held at once while
    function(*args) ran, beyond what was allocated before."""
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main():
    rng = np.random.default_rng(0)
    for feed_forward in ("relu", "gated-gelu"):
        model = tiny_t5(feed_forward)
        encoder = T5Encoder.from_transformers(model)
        lengths = np.array([300, 211, 17])  # the last two padded on the right
        input_ids = rng.integers(0, 100, (3, 300))
        attention_mask = (np.arange(300) < lengths[:, None]).astype(np.int64)
        ours = encoder(input_ids, attention_mask)
        theirs = transformers_hidden_states(model, input_ids, attention_mask)
        print(f"{feed_forward:>10}: hidden states (3, 300, 64), max abs difference from "
              f"transformers {np.max(np.abs(ours - theirs)):.1e}")
    L = 2048
    input_ids = rng.integers(0, 100, (1, L))
    peak = peak_bytes(encoder, input_ids)
    print(f"L = S = {L}: peak memory of the encoder {peak / 2**20:.2f} MiB; one head's "
          f"(L, S) float32 scores would take {L * L * 4 / 2**20:.0f} MiB, transformers' "
          f"(1, {encoder.num_heads}, L, S) bias {encoder.num_heads * L * L * 4 / 2**20:.0f} "
          f"MiB")


if __name__ == "__main__":
    main()

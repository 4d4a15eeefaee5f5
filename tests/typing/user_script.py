"""A small user script: it must type-check under mypy --strict against cattn's hints."""
import numpy as np
from numpy.typing import NDArray

import cattn
from cattn.models.bert import BertConfig, BertEncoder


def attend(q: NDArray[np.float32], k: NDArray[np.float32],
           v: NDArray[np.float32]) -> NDArray[np.float32]:
    out = cattn.scaled_dot_product_attention(q, k, v, is_causal=True, num_threads=2)
    both, lse = cattn.scaled_dot_product_attention(q, k, v, return_lse=True)
    merged, merged_lse = cattn.merge_attention([both], [lse])
    out2, weights, lse2 = cattn.scaled_dot_product_attention(q, k, v, return_weights=True,
                                                             return_lse=True)
    total: NDArray[np.float32] = out + merged + out2 + lse2[..., None]
    return total * weights[..., :1]


def layer(x: NDArray[np.float32]) -> NDArray[np.float32]:
    mha = cattn.MultiHeadAttention(16, 4, rng=0)  # float32 weights by default
    out, _ = mha(x, x, x)
    cache = cattn.KVCache.for_layer(mha, batch_size=x.shape[0], max_len=8)
    step, _ = mha(x[:, :1], cache=cache.layer(0))
    result: NDArray[np.float32] = out[:, :1] + step
    return result


def encode(token_ids: list[list[int]]) -> NDArray[np.float32]:
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=32)
    encoder = BertEncoder.random(config, rng=0)
    settings: dict[str, object] = cattn.show_config()
    assert settings["openmp"] in (True, False)
    with cattn.threads(1):
        n: int = cattn.get_num_threads()
    cattn.set_num_threads(None)
    hidden: NDArray[np.float32] = encoder(np.array(token_ids) % config.vocab_size)[:, :n]
    return hidden


q = np.ones((1, 2, 4, 16), dtype=np.float32)
print(attend(q, q, q).shape, layer(q[0]).shape, encode([[1, 2, 3]]).shape, cattn.__version__)

"""The seeds' single-head self-attention, step by step, then the same with cattn.

    python examples/seeds_walkthrough.py

"I love Apple phones": embeddings -> Q, K, V through three matrices Wq, Wk, Wv -> scores
Q·Kᵀ (scaled by 1/√d) -> softmax (weights that sum to 1) -> weighted sum of V. The embeddings
and matrices are random here (512 features, as in the seeds), so the percentages show the
mechanics, not meaning: `python -m cattn demo` shows a trained model's attention.
"""
import numpy as np

import cattn

tokens = ["I", "love", "Apple", "phones"]
d = 512
rng = np.random.default_rng(0)

# Step 1: one embedding vector per word.
x = rng.standard_normal((len(tokens), d))
print(f"Step 1  embeddings: {x.shape} (one row of {d} numbers per word)")

# Step 2: three versions of each word. The layer holds Wq, Wk, Wv (PyTorch layout: rows are
# output features, so Q = x·Wqᵀ); one head and no output projection is exactly the seeds' flow.
mha = cattn.MultiHeadAttention(d, 1, bias=False, out_proj=False, dtype=np.float64, rng=rng)
Wq, Wk, Wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
Q, K, V = x @ Wq.T, x @ Wk.T, x @ Wv.T
print(f"Step 2  Q, K, V = x·Wqᵀ, x·Wkᵀ, x·Wvᵀ: each {Q.shape}")

# Step 3: how much does "Apple" relate to each word? Q_Apple · K_word, scaled by 1/√d.
apple = tokens.index("Apple")
scores = Q @ K.T / np.sqrt(d)
print("Step 3  scores of Apple:  " + "  ".join(f"{t} {s:+.2f}" for t, s in
                                               zip(tokens, scores[apple])))

# Step 4: softmax turns each row of scores into percentages that add up to 100%.
weights = np.exp(scores - scores.max(axis=1, keepdims=True))
weights /= weights.sum(axis=1, keepdims=True)
print("Step 4  Apple's attention: " + "  ".join(f"{t} {100 * w:.0f}%" for t, w in
                                                zip(tokens, weights[apple])))

# Step 5: the new Apple is the weighted mix of every word's value vector.
new_apple = weights[apple] @ V
print(f"Step 5  New_Apple = sum of weight x V: a vector of {new_apple.size} numbers")
contextual = weights @ V  # ... and the same for every word at once

# The same with cattn: the kernel on Q, K, V, and the layer on the embeddings.
out, w = cattn.scaled_dot_product_attention(Q, K, V, return_weights=True)
layer_out, layer_w = mha(x, need_weights=True)
for name, got, want in [("kernel output", out, contextual), ("kernel weights", w, weights),
                        ("layer output", layer_out, contextual),
                        ("layer weights", layer_w, weights)]:
    diff = np.abs(got - want).max()
    assert diff < 1e-12, (name, diff)
    print(f"cattn {name:15} equals the step-by-step result (max difference {diff:.1e})")

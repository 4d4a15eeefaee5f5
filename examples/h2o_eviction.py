"""H2O-style KV-cache eviction: keep the heaviest keys and a recent window.

Heavy-hitter eviction (H2O, Zhang et al. 2023) keeps a decoding cache within a budget: each
cached key accumulates the attention mass the queries give it, and when the cache is full
the lightest keys outside a window of recent ones are dropped. cattn computes the mass in
the attention kernel (`return_key_mass=True`: each key's weight summed over the call's
queries), so no (L, S) weights array is ever made.

This script decodes random tokens into a `cattn.KVCache` of `BUDGET` positions with ALiBi
slopes, evicts with the public API (the kept keys and values gathered, the sequence reset
and the kept ones appended back), and compares every step's output with attention over the
full, never-evicted history:

    python examples/h2o_eviction.py
"""
import numpy as np

import cattn

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32
BUDGET, RECENT, STEPS = 96, 32, 400
sdpa = cattn.scaled_dot_product_attention


def evict(layer, mass, budget, recent):
    """Keep the `recent` newest positions and the heaviest of the others, `budget` in all
    (their order kept); returns the kept positions' accumulated mass."""
    n = int(layer.lengths[0])
    if n <= budget:
        return mass
    older = n - recent
    heavy = np.sort(np.argsort(mass[:older], kind="stable")[older - (budget - recent):])
    kept = np.concatenate([heavy, np.arange(older, n)])
    keys = layer.keys[:, :, kept].copy()  # (gathered before the reset overwrites them)
    values = layer.values[:, :, kept].copy()
    layer.cache.reset(0)
    layer.append(keys, values)
    return mass[kept]


def main():
    rng = np.random.default_rng(0)
    cache = cattn.KVCache(batch_size=1, max_len=BUDGET + 1, num_kv_heads=KV_HEADS,
                          head_dim=HEAD_DIM)
    layer = cache.layer(0)
    slopes = (2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)).astype(np.float32)
    # Keys with a few strong directions: some tokens stay heavy hitters for long.
    topics = rng.standard_normal((4, HEAD_DIM)).astype(np.float32) * 2
    all_keys, all_values = [], []
    mass = np.zeros(0, np.float32)
    errors = []
    for step in range(STEPS):
        k = (topics[rng.integers(4)] + rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM))
             ).astype(np.float32)
        v = rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM)).astype(np.float32)
        q = (topics[rng.integers(4)] + rng.standard_normal((1, HEADS, 1, HEAD_DIM))
             ).astype(np.float32)
        layer.append(k, v)
        all_keys.append(k)
        all_values.append(v)
        n = int(layer.lengths[0])
        out, key_mass = sdpa(q, layer.keys[:, :, :n], layer.values[:, :, :n],
                             enable_gqa=True, return_key_mass=True)
        # One eviction decision per position: the mass summed over the query heads.
        mass = np.concatenate([mass, [0]]) + key_mass[0].sum(axis=0)
        mass = evict(layer, mass, BUDGET, RECENT)
        history = (np.concatenate(all_keys, axis=2), np.concatenate(all_values, axis=2))
        full = sdpa(q, *history, enable_gqa=True)
        # the same budget as a plain window of the newest positions
        newest = sdpa(q, *history, enable_gqa=True, window=(BUDGET - 1, 0),
                      alignment="bottom_right")
        errors.append([np.linalg.norm(x - full) / np.linalg.norm(full) for x in (out, newest)])
    h2o_error, window_error = np.mean(errors[BUDGET:], axis=0)
    print(f"{STEPS} tokens decoded into a cache of {BUDGET} positions "
          f"({RECENT} recent + {BUDGET - RECENT} heavy hitters)")
    print(f"mean relative error against attention over the whole history, once evicting: "
          f"{h2o_error:.3f} (the {BUDGET} newest positions alone: {window_error:.3f})")
    out, key_mass = sdpa(q, layer.keys[:, :, :BUDGET], layer.values[:, :, :BUDGET],
                         enable_gqa=True, return_key_mass=True)
    # Each of the 8 query rows gives its keys a total weight of 1.
    assert np.allclose(key_mass.sum(), HEADS, rtol=1e-5)
    # ALiBi works the same way (the slopes see positions in the compacted cache).
    biased, biased_mass = sdpa(q, layer.keys[:, :, :BUDGET], layer.values[:, :, :BUDGET],
                               enable_gqa=True, alignment="bottom_right",
                               alibi_slopes=slopes, return_key_mass=True)
    recent_share = biased_mass[..., -RECENT:].sum() / biased_mass.sum()
    print(f"with ALiBi slopes, the {RECENT} recent keys hold {recent_share:.0%} of the mass")


if __name__ == "__main__":
    main()

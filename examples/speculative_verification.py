"""Speculative decoding: verify a tree of draft tokens against a KV cache in one step.

A small draft model proposes several continuations, arranged as a tree (token 0 follows the
last cached token, tokens 1 and 3 both follow token 0, ...). The large model then scores
every draft token at once: each one attends to the whole cache and to its own ancestors in
the tree, never to a sibling branch. Each draft token must get exactly what ordinary
decoding along its own branch would give; this script checks that, two ways:

1. two calls merged by log-sum-exp: the drafts over the cache (every cached key visible,
   per-sequence key lengths, no mask), and the drafts over each other with the tree as a
   small (k, k) mask; `cattn.merge_attention` combines them;
2. one call over a cache the drafts were appended to: bottom-right causal alignment with
   per-sequence key lengths, plus a boolean mask that hides the other branches.

    python examples/speculative_verification.py
"""
import numpy as np

import cattn

sdpa = cattn.scaled_dot_product_attention


def tree_visibility(parents):
    """(k, k) bool: draft token i sees draft token j when j is i or one of its ancestors.

    parents[i] is the index of token i's parent among the drafts, or -1 for a token that
    directly follows the cache. Parents come before their children."""
    parents = [int(p) for p in parents]
    visible = np.eye(len(parents), dtype=bool)
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"draft token {i} has parent {parent}: a parent must be an "
                             f"earlier draft token (or -1, the end of the cache)")
        if parent >= 0:
            visible[i] |= visible[parent]
    return visible


def verify_by_merge(q, cache_k, cache_v, cache_lengths, draft_k, draft_v, parents,
                    enable_gqa=False):
    """Drafts q (B, H, k, E) over the cache (B, Hkv, max_len, E) with cache_lengths (B,)
    valid keys, and over the drafts' own keys (B, Hkv, k, E) along the tree: merged."""
    over_cache = sdpa(q, cache_k, cache_v, key_lengths=cache_lengths, enable_gqa=enable_gqa,
                      return_lse=True)
    over_tree = sdpa(q, draft_k, draft_v, attn_mask=tree_visibility(parents),
                     enable_gqa=enable_gqa, return_lse=True)
    out, _ = cattn.merge_attention([over_cache[0], over_tree[0]],
                                   [over_cache[1], over_tree[1]])
    return out


def verify_in_cache(q, cache_k, cache_v, lengths_with_drafts, parents, enable_gqa=False):
    """The same in one call, the k drafts already appended to each sequence's cache
    (lengths_with_drafts includes them): bottom-right causal plus the tree mask."""
    B, k, max_len = q.shape[0], q.shape[-2], cache_k.shape[-2]
    tree = tree_visibility(parents)
    mask = np.ones((B, 1, k, max_len), dtype=bool)
    for b, n in enumerate(lengths_with_drafts):
        mask[b, 0, :, n - k:n] = tree  # the drafts' own columns: ancestors only
    return sdpa(q, cache_k, cache_v, attn_mask=mask, is_causal=True,
                alignment="bottom_right", key_lengths=lengths_with_drafts,
                enable_gqa=enable_gqa)


def branch_of(i, parents):
    """Draft token i's ancestors and itself, root first."""
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def main():
    rng = np.random.default_rng(0)
    B, H, Hkv, E, max_len = 2, 8, 2, 64, 256
    cache_lengths = np.array([150, 37])
    #            0    1  2  3  4  5: two branches after token 0, one after token 1
    parents = [-1, 0, 1, 0, 3, 1]
    k = len(parents)
    cache_k, cache_v = (rng.standard_normal((B, Hkv, max_len, E), dtype=np.float32)
                        for _ in range(2))
    q = rng.standard_normal((B, H, k, E), dtype=np.float32)
    draft_k, draft_v = (rng.standard_normal((B, Hkv, k, E), dtype=np.float32)
                        for _ in range(2))

    merged = verify_by_merge(q, cache_k, cache_v, cache_lengths, draft_k, draft_v, parents,
                             enable_gqa=True)

    appended_k, appended_v = cache_k.copy(), cache_v.copy()
    for b, n in enumerate(cache_lengths):
        appended_k[b, :, n:n + k] = draft_k[b]
        appended_v[b, :, n:n + k] = draft_v[b]
    one_call = verify_in_cache(q, appended_k, appended_v, cache_lengths + k, parents,
                               enable_gqa=True)

    # What ordinary decoding gives: each draft token as the last of its own branch.
    worst = 0.0
    for b, n in enumerate(cache_lengths):
        for i in range(k):
            path = branch_of(i, parents)
            keys = np.concatenate([cache_k[b, :, :n], draft_k[b][:, path]], axis=1)
            values = np.concatenate([cache_v[b, :, :n], draft_v[b][:, path]], axis=1)
            decoded = sdpa(q[b, :, i:i + 1], keys, values, enable_gqa=True)[:, 0]
            for got in (merged[b, :, i], one_call[b, :, i]):
                worst = max(worst, float(np.abs(got - decoded).max()))
    print(f"{k} draft tokens in a tree, {B} sequences with caches of "
          f"{', '.join(map(str, cache_lengths))} tokens")
    print(f"two calls merged vs one call: max |diff| {np.abs(merged - one_call).max():.2e}")
    print(f"either vs decoding each branch on its own: max |diff| {worst:.2e}")
    assert worst < 1e-5, worst
    print("every draft token sees the cache and its own ancestors only: verified")


if __name__ == "__main__":
    main()

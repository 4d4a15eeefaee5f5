"""Speculative verification (examples/speculative_verification.py): k draft tokens in a tree
checked against a KV cache, each draft seeing the cache and its own ancestors only. Both
ways of the example (two calls merged by lse; one bottom-right causal call with the tree
as a mask over a cache the drafts were appended to) equal the float64 reference over each
draft's own branch appended to its sequence's cache."""
import os
import runpy

import numpy as np
import pytest

from conftest import reference64, tolerance
from test_core import DTYPES, qkv
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "examples",
                      "speculative_verification.py")
example = runpy.run_path(SCRIPT)  # the functions; main() runs in its own test


def random_tree(rng, k):
    return [-1] + [int(rng.integers(-1, i)) for i in range(1, k)]


def branch_reference(q, cache_k, cache_v, cache_lengths, draft_k, draft_v, parents, group):
    """(B, H, k, Ev): each draft token decoded alone after its sequence's cache and its
    own branch (ancestors, root first), by the float64 reference."""
    B, H, k = q.shape[:3]
    out = np.zeros(q.shape[:3] + (cache_v.shape[-1],))
    for b in range(B):
        n = int(cache_lengths[b])
        for i in range(k):
            path = []
            node = i
            while node >= 0:
                path.insert(0, node)
                node = parents[node]
            keys = np.concatenate([cache_k[b, :, :n], draft_k[b][:, path]], axis=1)
            values = np.concatenate([cache_v[b, :, :n], draft_v[b][:, path]], axis=1)
            out[b, :, i] = reference64(q[b, :, i:i + 1], np.repeat(keys, group, axis=0),
                                       np.repeat(values, group, axis=0))[:, 0]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, k, Hkv", [(0, 1, 4), (1, 5, 2), (2, 9, 1), (3, 16, 4)])
def test_draft_trees_equal_decoding_each_branch(dtype, seed, k, Hkv):
    rng = np.random.default_rng(seed)
    B, H, E, max_len = 3, 4, 16, 300
    cache_lengths = np.array([0, 1, 260])[:B]
    parents = random_tree(rng, k)
    cache_k, cache_v = qkv(rng, [(B, Hkv, max_len + k, E)] * 2, dtype)
    q, draft_k, draft_v = qkv(rng, [(B, H, k, E), (B, Hkv, k, E), (B, Hkv, k, E)], dtype)
    want = branch_reference(q, cache_k, cache_v, cache_lengths, draft_k, draft_v, parents,
                            H // Hkv)
    gqa = Hkv != H
    merged = example["verify_by_merge"](q, cache_k, cache_v, cache_lengths, draft_k,
                                        draft_v, parents, enable_gqa=gqa)
    np.testing.assert_allclose(merged, want, **tolerance(dtype))
    appended_k, appended_v = cache_k.copy(), cache_v.copy()
    for b, n in enumerate(cache_lengths):
        appended_k[b, :, n:n + k] = draft_k[b]
        appended_v[b, :, n:n + k] = draft_v[b]
    one_call = example["verify_in_cache"](q, appended_k, appended_v, cache_lengths + k,
                                          parents, enable_gqa=gqa)
    np.testing.assert_allclose(one_call, want, **tolerance(dtype))


def test_tree_visibility_is_ancestors_and_self():
    visible = example["tree_visibility"]([-1, 0, 1, 0, 3, -1])
    want = np.array([[1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0],
                     [1, 0, 0, 1, 0, 0],
                     [1, 0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(visible, want)


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 0, 5], [-2]])
def test_parents_must_come_first(parents):
    with pytest.raises(ValueError, match="parent must be an earlier draft token"):
        example["tree_visibility"](parents)


def test_the_example_runs(capsys):
    runpy.run_path(SCRIPT, run_name="__main__")
    assert "verified" in capsys.readouterr().out

"""The key-split path: few (item, query block) tasks against many keys, so the kernel cuts
the keys into chunks, runs them as separate tasks and merges them by log-sum-exp.

Key counts are awkward on purpose (never a multiple of the number of chunks or of the key
block), for every task count from 1 to 15, with variants that leave some chunks of a row
empty (short key lengths, windows, masked stretches). Decoding rows stream their keys in
longer chunks (at least STREAM_BLOCK_KEYS) than query blocks (at least 512 keys): their
key counts are 4x longer.
Each case asserts, through the kernel's report, that the split path really ran.
"""
import numpy as np
import pytest

from conftest import assert_matches_reference, last_call_stats
from test_core import DTYPES, qkv, sdpa
from test_core import single_threaded_reference_blas  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("error")

KEY_COUNTS = [1025, 1537, 2049, 3001]
DECODE_KEY_COUNTS = [4097, 6145, 8193, 12001]


def split_options(variant, rng, B, H, L, S, dtype):
    """Options of one variant; most leave some chunk of some row without a visible key."""
    if variant == "plain":
        return {}
    if variant == "short-lengths":   # later chunks empty for the short items
        lengths = rng.integers(0, S + 1, (B, H))
        lengths[0, 0], lengths[-1, -1] = 5, S
        return {"key_lengths": lengths, "is_causal": True, "alignment": "bottom_right"}
    if variant == "window":          # rows see ~300 keys: most chunks empty
        return {"window": (300, 0), "alignment": "bottom_right"}
    if variant == "masked-stretch":  # the first 60% of the keys masked: the first chunk(s) empty
        mask = rng.random((B, 1, L, S)) < 0.8
        mask[..., :S * 6 // 10] = False
        return {"attn_mask": mask, "softcap": 5.0}
    if variant == "float-mask":
        return {"attn_mask": rng.standard_normal((L, S)).astype(dtype), "scale": 0.5}
    raise ValueError(variant)


VARIANTS = ["plain", "short-lengths", "window", "masked-stretch", "float-mask"]


def split_cases():
    """(S, tasks, L, variant, dtype): every S with every task count 1..15, the variant and
    dtype cycling so that each S meets each variant and both dtypes."""
    cases = []
    for s_index, S in enumerate(DECODE_KEY_COUNTS):
        for tasks in range(1, 16):
            variant = VARIANTS[(tasks + s_index) % len(VARIANTS)]
            dtype = DTYPES[(tasks + s_index) % 2]
            L = (1, 4)[(tasks // 2) % 2]
            cases.append(pytest.param(S, tasks, L, variant, dtype,
                                      id=f"S{S}-tasks{tasks}-L{L}-{variant}-"
                                         f"{np.dtype(dtype).name}"))
    return cases


def assert_took_the_split_path(S):
    stats = last_call_stats()
    assert stats["n_splits"] > 1, f"expected the key-split path, got {stats}"
    # The chunks cover the keys: none is dropped, none is empty of keys entirely.
    assert (stats["n_splits"] - 1) * stats["split_keys"] < S <= \
        stats["n_splits"] * stats["split_keys"], stats


@pytest.mark.parametrize("S, tasks, L, variant, dtype", split_cases())
def test_decode_rows_over_awkward_key_counts(rng, S, tasks, L, variant, dtype):
    B, H = (1, tasks) if tasks % 2 else (2, tasks // 2)
    query, key, value = qkv(rng, [(B, H, L, 16), (B, H, S, 16), (B, H, S, 8)], dtype)
    options = split_options(variant, rng, B, H, L, S, dtype)
    assert_matches_reference(query, key, value, return_lse=True, **options)
    assert_took_the_split_path(S)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", KEY_COUNTS)
@pytest.mark.parametrize("H", [1, 3, 7])
def test_query_blocks_over_awkward_key_counts(rng, H, S, dtype):
    # 130 rows: two query blocks per head (2, 6 or 14 tasks), the packed-key path.
    query, key, value = qkv(rng, [(1, H, 130, 16), (1, H, S, 16), (1, H, S, 8)], dtype)
    assert_matches_reference(query, key, value, return_lse=True, is_causal=True,
                             alignment="bottom_right", key_lengths=[S - 3])
    assert_took_the_split_path(S)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_last_key_counts(rng, dtype):
    # Only the last key is visible: a chunking that drops the tail sees nothing at all.
    query, key, value = qkv(rng, [(1, 3, 1, 16), (1, 3, 4097, 16), (1, 3, 4097, 8)], dtype)
    mask = np.zeros(4097, dtype=bool)
    mask[-1] = True
    out = sdpa(query, key, value, mask[None, :])
    assert_took_the_split_path(4097)
    np.testing.assert_array_equal(out, np.broadcast_to(value[:, :, -1:], out.shape))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_results_are_bitwise_identical_for_any_thread_count(rng, threads):
    query, key, value = qkv(rng, [(1, 5, 4, 16), (1, 5, 6001, 16), (1, 5, 6001, 8)],
                            np.float32)
    one = sdpa(query, key, value, is_causal=True, alignment="bottom_right", num_threads=1)
    many = sdpa(query, key, value, is_causal=True, alignment="bottom_right",
                num_threads=threads)
    assert_took_the_split_path(6001)
    np.testing.assert_array_equal(many, one)


@pytest.mark.parametrize("threads", [1, 2])
def test_heads_in_separate_calls_equal_one_call_bitwise(rng, threads):
    # The split rule looks at one head's shape only: a call over some heads (a shard of
    # the heads on another machine, say) computes them bitwise as the call over all does.
    query, key, value = qkv(rng, [(1, 32, 1, 64), (1, 32, 4200, 64), (1, 32, 4200, 32)],
                            np.float32)
    whole, whole_lse = sdpa(query, key, value, return_lse=True, num_threads=threads)
    assert_took_the_split_path(4200)
    for heads in (slice(0, 1), slice(1, 9), slice(9, 32)):
        part, part_lse = sdpa(query[:, heads].copy(), key[:, heads].copy(),
                              value[:, heads].copy(), return_lse=True, num_threads=threads)
        assert_took_the_split_path(4200)
        np.testing.assert_array_equal(part, whole[:, heads])
        np.testing.assert_array_equal(part_lse, whole_lse[:, heads])

"""Claims about how the kernel runs, observed rather than assumed: OpenMP is compiled in
(required under CI=true), `num_threads` and the default really set the team that runs the
tasks, per-thread scratch stays within its documented bound whatever S is, and key blocks
that no row of a query block may see are never visited.

The plan figures come from the kernel's private report of its last call
(`cattn._kernel.last_call_stats()`); the scratch bound is also measured with tracemalloc,
which sees the kernel's PyMem_RawMalloc.
"""
import math
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import cattn
from cattn import _kernel
from cattn._plan import STREAM_BLOCK_KEYS
from conftest import in_ci, last_call_stats
from test_core import qkv, sdpa

# The README: per-thread scratch "is about 230 KiB in float32 whatever L and S" (E = 64).
SCRATCH_BOUND = 256 * 1024


# --------------------------------------------------------------------------- threads

def test_openmp_is_compiled_in():
    if not _kernel.openmp_enabled():
        if in_ci():
            pytest.fail("CI=true but this build has no OpenMP: every call runs on one thread")
        pytest.skip("built without OpenMP")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_num_threads_sets_the_team(rng, threads):
    if not _kernel.openmp_enabled():
        pytest.skip("built without OpenMP")
    # 8 items x 2 query blocks: more tasks than threads.
    query, key, value = qkv(rng, [(8, 256, 32), (8, 512, 32), (8, 512, 32)], np.float32)
    sdpa(query, key, value, num_threads=threads)
    stats = last_call_stats()
    assert stats["n_tasks"] == 16
    assert stats["team_size"] == threads, stats


def test_a_team_is_never_larger_than_the_tasks(rng):
    query, key, value = qkv(rng, [(1, 20, 32), (1, 300, 32), (1, 300, 32)], np.float32)
    sdpa(query, key, value, num_threads=2)
    stats = last_call_stats()
    assert stats["n_tasks"] == 1 and stats["team_size"] == 1, stats


def test_two_threads_both_run_tasks(rng):
    """More than one thread really computes: with 64 tasks of a few ms each, both threads
    of a team of two take some (a loaded machine may delay one: three tries)."""
    if not _kernel.openmp_enabled():
        pytest.skip("built without OpenMP")
    query, key, value = qkv(rng, [(32, 256, 64), (32, 1024, 64), (32, 1024, 64)], np.float32)
    seen = []
    for _ in range(3):
        sdpa(query, key, value, num_threads=2)
        stats = last_call_stats()
        seen.append(stats.get("threads_with_tasks", stats["team_size"]))
        if seen[-1] == 2:
            return
    pytest.fail(f"threads that ran tasks in three calls with num_threads=2: {seen}")


def test_default_team_is_openmps(tmp_path):
    """Without num_threads (and without OMP_NUM_THREADS) a call uses every usable core."""
    if not _kernel.openmp_enabled():
        pytest.skip("built without OpenMP")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(cattn.__file__))] + sys.path)
    code = textwrap.dedent("""
        import numpy as np, cattn
        from cattn import _kernel
        x = np.ones((64, 256, 16), np.float32)
        cattn.scaled_dot_product_attention(x, x, x)
        print(_kernel.last_call_stats()["team_size"])
    """)
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    env_free_default = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count())
    assert int(child.stdout.split()[-1]) == min(64, env_free_default)


# --------------------------------------------------------------------------- scratch

def traced_peak_of_call(call):
    """Peak bytes traced by tracemalloc during call() (NumPy's and the kernel's raw
    allocations included), above what was allocated before it, and the call's result."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before, result


@pytest.mark.parametrize("S", [4096, 16384])
def test_scratch_stays_within_its_bound_whatever_s(rng, S):
    # 16 heads of 128 queries, E = Ev = 64, two threads. One query block per head: the keys
    # split into at most 16 chunks whose partial rows (Ev + 2 numbers) are merged at the
    # end, a buffer bounded by 16 (Ev + 2) / Ev outputs whatever S.
    H, L, E = 16, 128, 64
    query, key, value = qkv(rng, [(H, L, E), (H, S, E), (H, S, E)], np.float32)
    extra, out = traced_peak_of_call(lambda: sdpa(query, key, value, num_threads=2))
    threads = last_call_stats()["team_size"]
    n_splits = last_call_stats()["n_splits"]
    assert n_splits <= 16
    partials = n_splits * H * L * (E + 2) * 4 if n_splits > 1 else 0
    # The output, the partial rows, two threads' scratch, a few KiB of plan and objects.
    assert extra <= out.nbytes + partials + threads * SCRATCH_BOUND + 64 * 1024, (
        f"S = {S}: {extra / 2**20:.2f} MiB traced during the call, {out.nbytes / 2**20:.2f}"
        f" MiB of it the output")
    assert last_call_stats()["scratch_bytes"] <= SCRATCH_BOUND


@pytest.mark.parametrize("L, S", [(1, 16384), (2048, 2048), (128, 16384)])
def test_reported_scratch_does_not_grow_with_the_problem(rng, L, S):
    query, key, value = qkv(rng, [(L, 64), (S, 64), (S, 64)], np.float32)
    sdpa(query, key, value, is_causal=True, num_threads=1)
    stats = last_call_stats()
    assert stats["scratch_bytes"] <= SCRATCH_BOUND, stats
    assert stats["block_k"] < S, stats  # the keys are tiled


# ------------------------------------------------------------ key blocks of decoding

@pytest.mark.parametrize("Hq, Hkv, L, kv_dtype, streams", [
    (6, 6, 1, np.float32, True), (6, 6, 1, np.float16, True), (8, 2, 1, np.float32, True),
    (3, 3, 4, np.float32, True), (8, 1, 1, np.float32, False), (3, 3, 5, np.float32, False)])
def test_tasks_that_stream_take_long_key_blocks(rng, Hq, Hkv, L, kv_dtype, streams):
    """Tasks of at most DIRECT_ROWS rows (decoding: a query or a group of up to 4 heads)
    stream K and V in blocks of STREAM_BLOCK_KEYS keys, in chunks at least that long, with
    no packed block in their scratch; taller tasks pack blocks of 256 keys, chunks from 512.
    The bugs: a rule that looks at the query length alone (an 8-head group of one query
    would pack 2048-key blocks) or keeps the short chunks (each ending its long blocks);
    scratch for a converted block that float16 rows streamed in place never use."""
    S, E = 12001, 64
    query, key, value = qkv(rng, [(Hq, L, E), (Hkv, S, E), (Hkv, S, E)], np.float32)
    key, value = key.astype(kv_dtype), value.astype(kv_dtype)
    sdpa(query, key, value, enable_gqa=Hq != Hkv, num_threads=1)
    stats = last_call_stats()
    assert (stats["items_per_task"] * L <= _kernel.DIRECT_ROWS) == streams, stats
    assert stats["n_splits"] > 1, stats
    if streams:
        assert stats["block_k"] == STREAM_BLOCK_KEYS, stats
        assert stats["split_keys"] >= STREAM_BLOCK_KEYS, stats
        # running max and sum, output rows, scores (a cache line past each row) and a
        # group's gathered queries of at most 4 rows: no key block
        assert stats["scratch_bytes"] <= 4 * (2 + 2 * E + STREAM_BLOCK_KEYS + 16) * 4 + 64, \
            stats
    else:
        assert stats["block_k"] == 256 and stats["split_keys"] < STREAM_BLOCK_KEYS, stats


def test_decoding_keeps_the_block_sizes_it_is_given(rng):
    query, key, value = qkv(rng, [(2, 1, 16), (2, 5000, 16), (2, 5000, 16)], np.float32)
    sdpa(query, key, value, _block_sizes=(1, 48))
    assert last_call_stats()["block_k"] == 48


# ------------------------------------------------------------------ skipped key blocks

def visible_block_bounds(L, S, block_q, block_k, left, right, diag=0, kv_len=None):
    """(fewest, most) key blocks a kernel must visit: per query block, the span of keys
    any of its rows may see, cut into blocks of block_k (one more when the blocks are
    aligned to multiples of block_k rather than to the span's start)."""
    kv_len = S if kv_len is None else kv_len
    fewest = most = 0
    for i0 in range(0, L, block_q):
        i1 = min(i0 + block_q, L)
        lo = min(max(i0 + diag - left, 0), kv_len)
        hi = min(max(i1 - 1 + diag + right + 1, 0), kv_len)
        if hi > lo:
            fewest += math.ceil((hi - lo) / block_k)
            most += math.ceil((hi - lo) / block_k) + 1
    return fewest, most


UNBOUNDED = 10**9


@pytest.mark.parametrize("case", ["causal", "window", "key-length", "bottom-right"])
def test_masked_key_blocks_are_never_visited(rng, case):
    L = S = 2048
    query, key, value = qkv(rng, [(L, 32), (S, 32), (S, 32)], np.float32)
    options, left, right, kv_len, diag = {}, UNBOUNDED, 0, S, 0
    if case == "causal":
        options = dict(is_causal=True)
    elif case == "window":
        options, left, right = dict(window=(300, 100)), 300, 100
    elif case == "key-length":
        options, right, kv_len = dict(key_lengths=700), UNBOUNDED, 700
    else:  # bottom-right causal with a key length: the diagonal moves to 700 - L
        options, kv_len = dict(is_causal=True, alignment="bottom_right", key_lengths=700), 700
        diag = kv_len - L
    sdpa(query, key, value, num_threads=1, **options)
    stats = last_call_stats()
    full = math.ceil(L / stats["block_q"]) * math.ceil(S / stats["block_k"])
    fewest, most = visible_block_bounds(L, S, stats["block_q"], stats["block_k"], left,
                                        right, diag, kv_len)
    assert most < full  # the case leaves whole blocks out
    assert fewest <= stats["key_blocks_visited"] <= most, (stats, fewest, most, full)


def test_unmasked_call_visits_every_block(rng):
    query, key, value = qkv(rng, [(300, 32), (1100, 32), (1100, 32)], np.float32)
    sdpa(query, key, value, num_threads=1)
    stats = last_call_stats()
    assert stats["key_blocks_visited"] == (math.ceil(300 / stats["block_q"])
                                           * math.ceil(1100 / stats["block_k"]))

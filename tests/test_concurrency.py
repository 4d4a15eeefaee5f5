"""Concurrency: Python threads calling cattn at once, the GIL, and OpenMP thread counts.

Every comparison here is bitwise (np.testing.assert_array_equal): a result must not depend
on how many OpenMP threads computed it, nor on what other Python threads were doing.
"""
import ctypes
import threading
import time

import numpy as np
import pytest

import cattn
from conftest import assert_matches_reference

sdpa = cattn.scaled_dot_product_attention


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_bitwise_equal(got, want):
    got, want = _as_tuple(got), _as_tuple(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def make_case(seed):
    """One call's arguments, different for every seed: dtype, shape and variant vary."""
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    B, H, Hk = 2, 4, (4, 2, 1)[seed % 3]
    L, S, E, Ev = 40 + 37 * (seed % 5), 90 + 211 * (seed % 4), 16 * (1 + seed % 3), 24
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hk, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hk, S, Ev)).astype(dtype)
    options = dict(enable_gqa=Hk != H, return_lse=True)
    variant = seed % 6
    if variant == 1:
        options.update(is_causal=True, alignment="bottom_right")
    elif variant == 2:
        options.update(attn_mask=rng.random((H, L, S)) < 0.8)
    elif variant == 3:
        options.update(attn_mask=rng.standard_normal((L, S)).astype(dtype), softcap=20.0)
    elif variant == 4:
        options.update(window=(30, 5), key_lengths=rng.integers(0, S + 1, B),
                       return_weights=True)
    elif variant == 5:
        options.update(return_weights=True, is_causal=True)
    return (q, k, v), options


def run_in_threads(jobs, n_rounds=1):
    """Run every job (a no-argument callable) in its own Python thread, all released at
    once by a barrier, n_rounds times; returns the results of the last round."""
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(index, job):
        try:
            for _ in range(n_rounds):
                barrier.wait()
                results[index] = job()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("num_threads", [1, 2])
def test_eight_threads_at_once_match_serial_calls(num_threads):
    cases = [make_case(seed) for seed in range(8)]
    serial = [sdpa(*arrays, num_threads=num_threads, **options) for arrays, options in cases]
    jobs = [lambda a=arrays, o=options: sdpa(*a, num_threads=num_threads, **o)
            for arrays, options in cases]
    concurrent = run_in_threads(jobs, n_rounds=3)
    for got, want in zip(concurrent, serial):
        assert_bitwise_equal(got, want)
    # and the serial results are right
    for (arrays, options), want in zip(cases[:2], serial[:2]):
        assert_matches_reference(*arrays, **options)


def test_concurrent_calls_with_different_thread_counts():
    """Threads asking for 1, 2, 3 and 4 OpenMP threads at once, on the same inputs: all
    results identical to the serial single-threaded one. Also writes into `out=`."""
    (q, k, v), options = make_case(4)
    want = sdpa(q, k, v, num_threads=1, **options)
    outs = [np.empty_like(want[0]) for _ in range(8)]
    jobs = [lambda i=i: sdpa(q, k, v, num_threads=1 + i % 4, out=outs[i], **options)
            for i in range(8)]
    for i, got in enumerate(run_in_threads(jobs, n_rounds=3)):
        assert got[0] is outs[i]
        assert_bitwise_equal(got, want)


def test_blas_thread_limit_is_restored_after_concurrent_calls():
    """cattn limits BLAS to one thread while it runs (reference-counted across concurrent
    calls): once every call has returned, the user's setting is back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        info = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        return [i["num_threads"] for i in info]

    before = blas_threads()
    (q, k, v), options = make_case(3)
    run_in_threads([lambda: sdpa(q, k, v, **options)] * 6, n_rounds=4)
    assert blas_threads() == before


VARIANTS = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal_bottom_right_lengths": dict(is_causal=True, alignment="bottom_right",
                                        key_lengths=np.array([300, 17])),
    "bool_mask": dict(attn_mask="bool"),
    "float_mask_softcap": dict(attn_mask="float", softcap=10.0),
    "window": dict(window=(64, 0)),
    "gqa": dict(enable_gqa=True),
    "weights_lse": dict(return_weights=True, return_lse=True),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_and_two_openmp_threads_are_bitwise_identical(variant, dtype):
    """Many tasks (query blocks × heads) shared out dynamically: the thread that computes
    a block must not change a bit of the result."""
    rng = np.random.default_rng(7)
    options = dict(VARIANTS[variant])
    Hk = 2 if options.get("enable_gqa") else 4
    L, S = 300, 700
    q = rng.standard_normal((2, 4, L, 32)).astype(dtype)
    k = rng.standard_normal((2, Hk, S, 32)).astype(dtype)
    v = rng.standard_normal((2, Hk, S, 16)).astype(dtype)
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = rng.random((2, 1, L, S)) < 0.7
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = rng.standard_normal((L, S)).astype(dtype)
    one = sdpa(q, k, v, num_threads=1, **options)
    for threads in (2, 3, 8):
        assert_bitwise_equal(sdpa(q, k, v, num_threads=threads, **options), one)


# ---------------------------------------------------------------------------- the GIL

def _progress_during(call):
    """Run `call` in a thread while this thread keeps taking short naps and records the
    time of each wake-up; return the fraction of the middle 80% of the call's duration
    that is covered by wake-ups close together (at most 50 ms, or a tenth of the call,
    apart: a busy machine may delay a wake-up, it cannot make one happen).

    If `call` holds the GIL, this thread cannot wake up (return from time.sleep and run
    Python) until it ends, so no wake-up falls inside the call except around its
    Python-level start and end: coverage ~0. If the GIL is released, wake-ups arrive
    every ~1 ms throughout: coverage ~1. Only relative times matter, not absolute
    speed, so a slow or busy machine changes nothing."""
    window = {}
    done = threading.Event()

    def worker():
        window["start"] = time.perf_counter()
        call()
        window["end"] = time.perf_counter()
        done.set()

    wakeups = []
    t = threading.Thread(target=worker)
    t.start()
    while not done.is_set():
        time.sleep(0.001)
        wakeups.append(time.perf_counter())
    t.join()
    start, end = window["start"], window["end"]
    lo, hi = start + 0.1 * (end - start), end - 0.1 * (end - start)
    inside = [lo] + [w for w in wakeups if lo < w < hi] + [hi]
    max_gap = max(0.05, 0.1 * (hi - lo))
    covered = sum(b - a for a, b in zip(inside, inside[1:]) if b - a <= max_gap)
    return covered / (hi - lo), end - start


def _long_attention_call(seconds=0.3):
    """A one-thread call lasting about `seconds` on this machine: the key count is scaled
    from a timed probe call, so a faster or slower CPU gets a call just as long."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 256, 64)).astype(np.float32)

    def call_with(S):
        kv = rng.standard_normal((1, S, 64)).astype(np.float32)
        return lambda: sdpa(q, kv, kv, num_threads=1)

    S = 4096
    probe = call_with(S)
    probe()  # warm up
    took = []
    for _ in range(3):
        start = time.perf_counter()
        probe()
        took.append(time.perf_counter() - start)
    S = min(2**21, max(S, int(S * seconds / max(min(took), 1e-6))))
    return call_with(S)


def test_gil_holding_call_is_detected():
    """The method's negative control: a C call that holds the GIL for 0.4 s (libc usleep
    through ctypes.PyDLL, which keeps the GIL) leaves no progress to the other thread."""
    libc = ctypes.PyDLL(None)
    covered, duration = _progress_during(lambda: libc.usleep(400_000))
    assert duration >= 0.4
    assert covered < 0.2


def test_gil_is_released_during_the_kernel():
    call = _long_attention_call()
    call()  # warm up
    covered, duration = _progress_during(call)
    assert duration > 0.1, "the call is too short to observe"
    assert covered > 0.5, f"another thread ran during only {covered:.0%} of a {duration:.2f}s call"

"""Resident memory stays flat over many cattn calls (no leak).

    python scripts/leak_check.py                  # 100,000 calls, the full check
    python scripts/leak_check.py --calls 5000     # the short version (tests/test_leaks.py)

Cycles through a fixed set of varied calls: both dtypes, 2-D to 4-D shapes with broadcast
batch dimensions, boolean and float masks, causal with both alignments, windows, GQA, key
lengths, softcap, lse and weights, out=, one or two threads, merge_attention, malformed
calls that raise, and calls from short-lived Python threads (each gets its own OpenMP
team). After a warm-up (allocator caches, thread pools) it samples the resident set size
(VmRSS) and the number of live Python objects; it prints the trajectory and exits 1 when
RSS grows by more than the bound or the object count grows at all beyond noise.
"""
import argparse
import gc
import os
import sys
import threading
import time

import numpy as np

import cattn

sdpa = cattn.scaled_dot_product_attention


def rss_bytes():
    """Resident set size of this process (Linux /proc; ru_maxrss elsewhere, a peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def build_calls(seed=0):
    """A list of no-argument callables, each one call of cattn (or one malformed call)."""
    rng = np.random.default_rng(seed)
    calls = []

    def normal(shape, dtype):
        return rng.standard_normal(shape).astype(dtype)

    for index in range(48):
        dtype = (np.float32, np.float64)[index % 2]
        L, S = (1, 7, 33, 130)[index % 4], (1, 9, 64, 600)[(index // 4) % 4]
        big = L * S > 3000  # (kept to one item and small features: variety, not size)
        B, H = (1, 1 + index % 2) if big else (1 + index % 3, (1, 2, 4)[index % 3])
        E, Ev = (8, 16)[index % 2] if big else (8, 16, 64)[index % 3], (4, 8)[index % 2]
        Hk = H if index % 5 else max(1, H // 2)
        q = normal((B, H, L, E), dtype)
        k = normal((B, Hk, S, E), dtype)
        v = normal((1, Hk, S, Ev), dtype)  # broadcast over the batch
        # (two threads for a quarter of the calls: a parallel region costs a wake-up)
        options = dict(enable_gqa=Hk != H, num_threads=2 if index % 4 == 1 else 1)
        variant = index % 8
        if variant == 1:
            options.update(is_causal=True, alignment=("top_left", "bottom_right")[index % 2])
        elif variant == 2:
            options.update(attn_mask=rng.random((L, S)) < 0.7)
        elif variant == 3:
            options.update(attn_mask=normal((H, L, S), dtype), softcap=30.0)
        elif variant == 4:
            options.update(window=(5, 2), key_lengths=rng.integers(0, S + 1, B))
        elif variant == 5:
            options.update(return_lse=True, return_weights=True)
        elif variant == 6:
            options.update(out=np.empty((B, H, L, Ev), dtype)[..., ::-1], return_lse=True)
        elif variant == 7:
            options.update(scale=0.5, is_causal=True, key_lengths=S // 2)
        calls.append(lambda q=q, k=k, v=v, o=options: sdpa(q, k, v, **o))

    # merge_attention of two halves of the keys
    q, k, v = normal((2, 16, 8), np.float32), normal((2, 64, 8), np.float32), normal(
        (2, 64, 4), np.float32)

    def merged():
        a = sdpa(q, k[:, :40], v[:, :40], return_lse=True, num_threads=1)
        b = sdpa(q, k[:, 40:], v[:, 40:], return_lse=True, num_threads=1)
        return cattn.merge_attention([a[0], b[0]], [a[1], b[1]])
    calls.append(merged)

    # malformed calls: the error paths must not leak either
    def rejected(**bad):
        args = dict(query=q, key=k, value=v)
        args.update(bad)

        def call():
            try:
                sdpa(**args)
            except (ValueError, TypeError, MemoryError):
                return None
            raise AssertionError(f"not rejected: {sorted(bad)}")
        return call
    calls += [rejected(key=k[..., :7]), rejected(attn_mask=np.ones((3, 3), np.int8)),
              rejected(num_threads=0), rejected(out=np.empty((2, 16, 5), np.float32)),
              rejected(key_lengths=np.array([-1, 3])), rejected(scale=float("nan")),
              rejected(query=np.broadcast_to(np.float32(0), (2**20, 8)),
                       key=np.broadcast_to(np.float32(0), (2**20, 8)),
                       value=np.broadcast_to(np.float32(0), (2**20, 4)),
                       return_weights=True)]  # a 4 TiB allocation that fails

    # a call from a short-lived Python thread (a new OpenMP team each time)
    small = calls[9]

    def in_a_thread():
        t = threading.Thread(target=small)
        t.start()
        t.join()
    calls.append(in_a_thread)
    return calls


def run(n_calls, bound_mb, samples=20, quiet=False):
    calls = build_calls()
    warmup = max(len(calls) * 4, n_calls // 20)
    for i in range(warmup):
        calls[i % len(calls)]()
    gc.collect()
    start_rss, start_objects = rss_bytes(), len(gc.get_objects())
    trajectory = [(0, start_rss, start_objects)]
    every = max(1, n_calls // samples)
    t0 = time.perf_counter()
    for i in range(1, n_calls + 1):
        calls[i % len(calls)]()
        if i % every == 0 or i == n_calls:
            gc.collect()
            trajectory.append((i, rss_bytes(), len(gc.get_objects())))
    elapsed = time.perf_counter() - t0

    if not quiet:
        print(f"{n_calls} calls after {warmup} warm-up calls, {elapsed:.1f} s "
              f"({1e6 * elapsed / n_calls:.0f} us a call)")
        print(f"{'calls':>8} {'RSS MiB':>9} {'growth KiB':>11} {'objects':>8}")
        for i, rss, objects in trajectory:
            print(f"{i:>8} {rss / 2**20:>9.1f} {(rss - start_rss) / 2**10:>11.0f} "
                  f"{objects:>8}")
    # Growth: the end of the trajectory against its start; the middle must not already
    # exceed the bound either (a leak that the allocator hid at the very end).
    growth = max(rss for _, rss, _ in trajectory[len(trajectory) // 2:]) - start_rss
    object_growth = trajectory[-1][2] - start_objects
    ok = growth <= bound_mb * 2**20 and object_growth <= 100
    print(f"leak check: RSS grew {growth / 2**20:.2f} MiB (bound {bound_mb} MiB), live "
          f"Python objects {object_growth:+d}: {'OK' if ok else 'LEAK'}")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--bound-mb", type=float, default=8.0,
                        help="largest RSS growth accepted after the warm-up (MiB)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    return 0 if run(args.calls, args.bound_mb, quiet=args.quiet) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Position biases and key mass at long sequences: memory, and the dense mask they replace.

    python benchmarks/position_bias_scaling.py memory [--n 16384] [--heads 2] [--threads 2]
    python benchmarks/position_bias_scaling.py time [--n 2048,8192] [--heads 8] [--threads 2]
                                                    [--reps 3]

memory: the peak memory each call holds while it runs (tracemalloc: NumPy's arrays and the
kernel's per-thread scratch, which it allocates with PyMem_RawMalloc), for a (1, H, N, N)
float32 call with E = 64 and no causal mask, with no bias, ALiBi, T5's buckets and the key
mass; beside the output's size and what a dense (1, H, N, N) float32 bias would take (not
run: it is the array these options avoid).

time: the same call without a bias, with ALiBi, with T5's buckets and with ALiBi's values
as a dense (1, H, N, N) float32 attn_mask, interleaved round-robin, median of the reps;
the dense mask is built once, outside the timing.
"""
import argparse
import statistics
import time
import tracemalloc

import numpy as np

import cattn

E = 64
sdpa = cattn.scaled_dot_product_attention


def operands(N, H, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, H, N, E), dtype=np.float32) for _ in range(3))
    slopes = (2.0 ** (-8.0 * np.arange(1, H + 1) / H)).astype(np.float32)
    table = rng.standard_normal((32, H)).astype(np.float32)
    t5 = cattn.RelativePositionBias(table, num_buckets=32, max_distance=128,
                                    bidirectional=True)
    return q, k, v, slopes, t5


def dense_alibi(slopes, N):
    distance = np.abs(np.arange(N, dtype=np.float32)[:, None] - np.arange(N, dtype=np.float32))
    return (-slopes[:, None, None] * distance)[None]


def calls(q, k, v, slopes, t5, threads):
    return {"plain": lambda: sdpa(q, k, v, num_threads=threads),
            "alibi": lambda: sdpa(q, k, v, alibi_slopes=slopes, num_threads=threads),
            "t5": lambda: sdpa(q, k, v, position_bias=t5, num_threads=threads),
            "key mass": lambda: sdpa(q, k, v, return_key_mass=True, num_threads=threads)}


def peak_bytes(call):
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory(N, H, threads):
    q, k, v, slopes, t5 = operands(N, H)
    out_bytes = q.nbytes
    dense_bytes = H * N * N * 4
    mib = 2.0 ** 20
    print(f"(1, {H}, {N}, {N}) float32, E = {E}, {threads} threads: output "
          f"{out_bytes / mib:.1f} MiB; a dense (1, {H}, N, N) float32 bias would be "
          f"{dense_bytes / mib:.0f} MiB")
    print(f"   {'call':<10}{'peak MiB':>10}{'extra MiB':>11}{'x output':>10}"
          f"{'x dense bias':>14}")
    for name, call in calls(q, k, v, slopes, t5, threads).items():
        peak = peak_bytes(call)
        extra = peak - out_bytes  # (the key mass result is part of the extra)
        print(f"   {name:<10}{peak / mib:>10.2f}{extra / mib:>11.2f}"
              f"{peak / out_bytes:>10.2f}{peak / dense_bytes:>14.4f}")
    print("   (peak: the most memory the call held at once, output included; extra: "
          "beyond the output)")


def timing(sizes, H, threads, reps):
    for N in sizes:
        q, k, v, slopes, t5 = operands(N, H)
        dense = dense_alibi(slopes, N)
        runs = calls(q, k, v, slopes, t5, threads)
        del runs["key mass"]
        runs["dense mask"] = lambda: sdpa(q, k, v, attn_mask=dense, num_threads=threads)
        times = {name: [] for name in runs}
        for name, call in runs.items():  # (a first call each, untimed)
            call()
        for _ in range(reps):
            for name, call in runs.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        plain = statistics.median(times["plain"])
        print(f"N = {N}, (1, {H}, N, N) float32, E = {E}, {threads} threads, median of "
              f"{reps} interleaved; dense mask {dense.nbytes / 2**20:.0f} MiB")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"   {name:<12}{median * 1e3:>10.1f} ms{median / plain:>8.2f}x plain")
        del dense


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "time"))
    parser.add_argument("--n", default=None, help="N (memory) or comma-separated Ns (time)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.what == "memory":
        memory(int(args.n or 16384), args.heads or 2, args.threads)
    else:
        timing([int(n) for n in (args.n or "2048,8192").split(",")], args.heads or 8,
               args.threads, args.reps)


if __name__ == "__main__":
    main()

"""Short attention calls inside a model's loop: one thread, a full team, or the rule that
keeps small calls on the calling thread.

A decoder step of a small model (Qwen2.5-0.5B's attention: 14 query heads over 2 key/value
heads of 64 features) over 24 layers: per layer, a NumPy product of the token's hidden
state with a weight matrix (as the projections run between two attention calls), then
cattn's attention of the token against the layer's cache. Each attention call is timed
inside the loop; short prompts' prefill (L = S = 16 .. 128, causal) is timed the same way.
Three ways, interleaved round by round in one process:

- `1 thread`: num_threads=1;
- `full team`: 2 threads (or --threads), every call on its team (CATTN_FULL_TEAM=1);
- `default`: 2 threads with the rule of show_config()["small_calls"];
- and PyTorch's SDPA on the same tensors at the same thread count, when installed.

    python benchmarks/short_calls.py [--threads 2] [--rounds 15]

Prints medians (µs per attention call) and the ratios of the same run.
"""
import argparse
import platform
import time

import numpy as np

import cattn
from cattn import _kernel

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, LAYERS = 14, 2, 64, 896, 24
CONTEXTS = (64, 256, 1024, 2048, 4096)
PROMPTS = (16, 32, 64, 128)


def cases(rng):
    """(name, query, key, value, is_causal) per layer: decoding one token against a cache
    of S keys, or a causal prompt of L tokens."""
    for S in CONTEXTS:
        yield (f"decode S={S}", [
            (rng.standard_normal((1, HEADS, 1, HEAD_DIM), dtype=np.float32),
             rng.standard_normal((1, KV_HEADS, S, HEAD_DIM), dtype=np.float32),
             rng.standard_normal((1, KV_HEADS, S, HEAD_DIM), dtype=np.float32))
            for _ in range(LAYERS)], False)
    for L in PROMPTS:
        yield (f"prefill L=S={L}", [
            tuple(rng.standard_normal((1, h, L, HEAD_DIM), dtype=np.float32)
                  for h in (HEADS, KV_HEADS, KV_HEADS)) for _ in range(LAYERS)], True)


def loop(layers, attend, weight, x):
    """One decoder step: per layer a product of the hidden state with the weights (the
    projections' work between two attention calls), then attention, timed."""
    times = []
    for q, k, v in layers:
        x = np.tanh(x @ weight)
        start = time.perf_counter()
        attend(q, k, v)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32)
              / np.float32(np.sqrt(HIDDEN)))
    x = rng.standard_normal((1, HIDDEN), dtype=np.float32)
    try:
        import torch
    except ImportError:
        torch = None
    print(f"{platform.processor() or platform.machine()}; cattn {cattn.__version__}, "
          f"isa {cattn.show_config()['isa']}; {args.threads} threads; {args.rounds} rounds of "
          f"{LAYERS} layers; medians in us per attention call")
    print(f"{'case':18} {'1 thread':>9} {'full team':>10} {'default':>9}"
          f" {'torch':>9}   default vs 1 thread, vs full team")
    for name, layers, causal in cases(rng):
        teams = []  # the default's team sizes

        def attend_cattn(threads, full):
            def attend(q, k, v):
                _kernel.set_full_team(full)
                cattn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                   enable_gqa=True, num_threads=threads)
                if not full:
                    teams.append(_kernel.last_call_stats()["team_size"])
            return attend

        ways = {"1 thread": attend_cattn(1, True),
                "full team": attend_cattn(args.threads, True),
                "default": attend_cattn(args.threads, False)}
        if torch is not None:
            tensors = [tuple(torch.from_numpy(a) for a in layer) for layer in layers]

            def attend_torch(q, k, v):
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, enable_gqa=True)
            ways["torch"] = attend_torch
        times = {way: [] for way in ways}
        previous = _kernel.set_full_team(False)
        try:
            for _ in range(args.rounds):
                for way, attend in ways.items():
                    if way == "torch":
                        torch.set_num_threads(args.threads)
                        with torch.inference_mode():
                            times[way] += loop(tensors, attend, weight, x)
                    else:
                        times[way] += loop(layers, attend, weight, x)
        finally:
            _kernel.set_full_team(previous)
        med = {way: np.median(t) * 1e6 for way, t in times.items()}
        torch_col = f"{med['torch']:9.1f}" if "torch" in med else f"{'-':>9}"
        print(f"{name:18} {med['1 thread']:9.1f} {med['full team']:10.1f} "
              f"{med['default']:9.1f} {torch_col}   "
              f"{med['1 thread'] / med['default']:.2f}x, "
              f"{med['full team'] / med['default']:.2f}x; on a team: "
              f"{np.mean(np.array(teams) > 1):.0%}, team cost "
              f"{_kernel.team_overhead() * 1e6:.1f} us")
    print(f"small calls: {cattn.show_config()['small_calls']}")


if __name__ == "__main__":
    main()

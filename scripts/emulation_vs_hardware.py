"""The emulation build's bfloat16 products against a CPU's own instructions, bitwise.

The emulation build (CATTN_EMULATE_ISA=1, src/cattn_emulate.h) runs the native bfloat16
paths' code on CPUs without their instructions; the tests hold it to the float64
reference, which a difference in rounding or in the flush of subnormals would pass. This
script checks it against the hardware, on a CPU that has the path:

    # in a tree built normally, on a CPU with the path (avx512_bf16, or amx):
    python scripts/emulation_vs_hardware.py save hardware.npz --path avx512_bf16
    # in a tree built with CATTN_EMULATE_ISA=1 (any CPU with AVX-512):
    python scripts/emulation_vs_hardware.py save emulated.npz --path avx512_bf16
    python scripts/emulation_vs_hardware.py compare hardware.npz emulated.npz

Cases: prefill shapes with and without a causal mask, ragged sizes, and the same values
scaled to subnormal magnitudes (where the flush to zero of the products and their sums
shows). Outputs and log-sum-exps in float32; one thread (the result is bitwise the same
on any thread count, as the tests check).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's cattn

# (B, H, L, S, E, Ev, causal)
CASES = [(1, 2, 37, 70, 16, 8, False), (2, 4, 64, 300, 64, 64, True),
         (1, 8, 130, 513, 128, 128, False), (1, 2, 5, 1000, 64, 32, False),
         (1, 4, 17, 33, 100, 136, True)]
SUBNORMAL_SCALE = np.float32(1e-38)


def results(path):
    """{case name: outputs and lse of that case, as one float32 array}."""
    import ml_dtypes
    import cattn
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(1)
    found = {}
    for B, H, L, S, E, Ev, causal in CASES:
        q = rng.standard_normal((B, H, L, E)).astype(bf16)
        k = rng.standard_normal((B, H, S, E)).astype(bf16)
        v = rng.standard_normal((B, H, S, Ev)).astype(bf16)
        tiny = (v.astype(np.float32) * SUBNORMAL_SCALE).astype(bf16)
        for label, values in (("normal", v), ("subnormal", tiny)):
            out, lse = cattn.scaled_dot_product_attention(
                q, k, values, is_causal=causal, _isa=path, out_dtype=np.float32,
                return_lse=True, num_threads=1)
            found[f"{B}x{H}x{L}x{S}x{E}x{Ev} causal={causal} {label}"] = np.concatenate(
                [out.ravel(), lse.ravel()])
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="compute the cases in this tree's build")
    save.add_argument("file")
    save.add_argument("--path", default="avx512_bf16", choices=("avx512_bf16", "amx"))
    compare = sub.add_parser("compare", help="compare two saved files bitwise")
    compare.add_argument("first")
    compare.add_argument("second")
    args = parser.parse_args(argv)
    if args.command == "save":
        from cattn import _kernel
        print(f"path {args.path}, emulated build: {_kernel.isa_emulated()}")
        np.savez(args.file, **results(args.path))
        return 0
    first, second = np.load(args.first), np.load(args.second)
    differing = 0
    for name in first.files:
        a, b = first[name], second[name]
        same = a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
        differing += not same
        print(f"{name}: {'bitwise the same' if same else f'{np.count_nonzero(a != b)} of {a.size} differ'}")
    print("all bitwise the same" if not differing else f"{differing} cases differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())

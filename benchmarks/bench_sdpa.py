"""One shape, cattn vs the NumPy reference vs PyTorch SDPA
(and ONNX Runtime), interleaved in one run, median of repeated runs, with the machine's
sgemm ceiling at the same thread count. A thin script over cattn.bench.

    python benchmarks/bench_sdpa.py                                   # (1,8,2048,2048,64)
    python benchmarks/bench_sdpa.py --shape 1,8,2048,2048,64 --threads 1,2 [--causal]

The target at the default shape, float32, non-causal, 1 and 2 threads: cattn at least 1.6x
the NumPy reference and at least 0.9x PyTorch's SDPA (the benchmark's
shape-2048-vs-numpy-torch target).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cattn import bench  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--shape" or a.startswith("--shape=") for a in argv):
        argv = ["--shape", "1,8,2048,2048,64"] + argv
    if not any(a == "--threads" or a.startswith("--threads=") for a in argv):
        argv = ["--threads", "1,2"] + argv
    result = bench.main(argv)
    case = result["cases"][0]
    spec = case.spec
    at_target = ((spec["B"], spec["H"], spec["L"], spec["S"], spec["E"]) == (1, 8, 2048, 2048, 64)
                 and spec["dtype"] == "float32" and not spec["causal"])
    print()
    for row in case.rows:
        if row.impl in ("numpy", "torch") and row.cattn_speedup:
            need = 1.6 if row.impl == "numpy" else 0.9
            verdict = ("PASS" if row.cattn_speedup >= need else "FAIL") if at_target \
                else "(the target is for 1,8,2048,2048,64 float32 non-causal)"
            print(f"cattn vs {row.impl:<5} at {row.threads} thread(s): "
                  f"{row.cattn_speedup:.2f}x, target >= {need}x: {verdict}")
    return result


if __name__ == "__main__":
    main()

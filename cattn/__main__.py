"""python -m cattn demo [options]   - where each token looks (tables + heatmaps)
python -m cattn bench [options]  - the benchmark (the same as python -m cattn.bench)
"""
import sys

USAGE = """usage: python -m cattn {demo,bench} [options]

  demo    attention of all-MiniLM-L6-v2 (running on cattn) on the seeds' sentences:
          tables of each token's attention and heatmap PNGs (python -m cattn demo --help)
  bench   the benchmark against NumPy, PyTorch and ONNX Runtime (python -m cattn bench --help)
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from cattn.demo import main as demo_main
        return demo_main(rest)
    if command == "bench":
        try:
            from cattn.bench import main as bench_main
        except ModuleNotFoundError as e:
            if e.name != "cattn.bench":
                raise
            print("cattn.bench is not available in this installation", file=sys.stderr)
            return 2
        return bench_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The entry point: `python -m cattn.bench` parses its options into a BenchConfig, runs one
shape or the suite, and writes the JSON, the Markdown and the plot."""
import argparse
import os
import time
from typing import Any, Dict, List, Optional

from cattn.bench.config import BenchConfig, log_to_stderr
from cattn.bench.peers import ALL_IMPLS
from cattn.bench.probes import machine_info, memprobe_main
from cattn.bench.report import format_header, format_markdown, plot, write_json
from cattn.bench.suite import WORKLOADS, bench_shape, run_suite


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def _names(s: str) -> List[str]:
    return [x for x in s.replace(" ", "").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cattn.bench",
        description="Benchmark cattn against the NumPy reference, PyTorch SDPA and ONNX "
                    "Runtime, interleaved in one run, with the machine's GEMM ceiling.")
    p.add_argument("--quick", action="store_true",
                   help="the small suite (about 2.5 minutes alone on 2 cores, 4.5 loaded)")
    p.add_argument("--preset", default=None,
                   help="comma-separated workloads: " + ", ".join(WORKLOADS) +
                        "; or dask alone (needs the dask extra); or transformers alone "
                        "(whole models, attn_implementation compared; the transformers "
                        "extra)")
    p.add_argument("--shape", default=None, metavar="B,H,L,S,E",
                   help="benchmark this one shape only")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--causal", action="store_true", help="with --shape: causal")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1 and all cores)")
    p.add_argument("--impls", default=",".join(ALL_IMPLS),
                   help="comma-separated subset of " + ",".join(ALL_IMPLS))
    p.add_argument("--reps", type=int, default=None, help="timed reps (median; >= 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed round-robin reps before the timed ones (default 1, 0 with "
                        "--quick; every runner's first call, the output check, is untimed "
                        "anyway)")
    p.add_argument("--gemm-n", type=int, default=None,
                   help="size of the square GEMM ceiling (default 2048, 1024 with --quick)")
    p.add_argument("--ort-op", default="auto", choices=("auto", "mha", "attention"),
                   help="ORT op: com.microsoft MultiHeadAttention (float32 only), opset-23 "
                        "Attention, or auto (MHA for float32, Attention for float64)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check against the reference (not recommended)")
    p.add_argument("--json", default=None, help="JSON output path "
                   "(default benchmarks/out/bench-<preset>-<time>.json; '-' for none)")
    p.add_argument("--plot", default=None, help="PNG plot path (default next to the JSON; "
                   "'-' for none)")
    p.add_argument("--markdown", default=None,
                   help="also write the run as Markdown (tables and targets) to this path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memprobe", default=None, help=argparse.SUPPRESS)
    return p


def _default_threads() -> List[int]:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return [1] if n == 1 else [1, n]


def _out_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(here, "benchmarks")):
        return os.path.join(here, "benchmarks", "out")
    return os.path.join(os.getcwd(), "benchmarks", "out")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The run's settings from the command line (the --quick defaults applied)."""
    impls = _names(args.impls)
    for i in impls:
        if i not in ALL_IMPLS:
            raise SystemExit(f"unknown implementation {i!r}; choose from {ALL_IMPLS}")
    reps = args.reps if args.reps is not None else (5 if args.quick else 7)
    if reps < 1:
        raise SystemExit("--reps must be >= 1")
    return BenchConfig(
        threads=_ints(args.threads) if args.threads else _default_threads(), impls=impls,
        reps=reps, warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
        gemm_n=args.gemm_n or (1024 if args.quick else 2048), ort_op=args.ort_op,
        stream_mib=256 if args.quick else 512, check=not args.no_check, seed=args.seed,
        quick=args.quick, log=log_to_stderr)


def _write_outputs(result: Dict[str, Any], args: argparse.Namespace, tag: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(_out_dir(), f"bench-{tag}-{stamp}.json")
    if json_path != "-":
        write_json(result, json_path)
        print(f"\nJSON: {json_path}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(result) + "\n")
        print(f"Markdown: {args.markdown}")
    if args.plot != "-" and not args.shape:
        plot_path = args.plot or (os.path.splitext(json_path)[0] + ".png"
                                  if json_path != "-" else
                                  os.path.join(_out_dir(), f"bench-{tag}-{stamp}.png"))
        print(plot(result, plot_path))


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """Run the benchmark the command line asks for; returns the result (as in the JSON)."""
    args = build_parser().parse_args(argv)
    if args.memprobe:
        memprobe_main(args.memprobe)
        return None
    config = config_from_args(args)
    t_start = time.perf_counter()
    info = machine_info(config.impls, config.threads)
    print(format_header(info), flush=True)
    if args.shape:
        shape = _ints(args.shape)
        if len(shape) != 5:
            raise SystemExit("--shape takes B,H,L,S,E")
        B, H, L, S, E = shape
        case = bench_shape(B, H, L, S, E, dtype=args.dtype, causal=args.causal, config=config)
        result: Dict[str, Any] = {"machine": info, "mode": "shape", "cases": [case]}
        tag = "shape"
    elif args.preset == "dask":  # its own cluster, cases and table (cattn.dask)
        from cattn.bench.cluster import format_dask_cases, run_dask_preset
        result = {"machine": info, **run_dask_preset(config)}
        result["table_text"] = format_dask_cases(result["dask_cases"])
        print(result["table_text"])
        tag, args.plot = "dask", "-"
    elif args.preset == "transformers":  # whole models: its own cases and table
        from cattn.bench.transformers_bridge import (format_transformers_cases,
                                                     run_transformers_preset)
        result = {"machine": info, **run_transformers_preset(config)}
        result["table_text"] = format_transformers_cases(result)
        print(result["table_text"])
        tag, args.plot = "transformers", "-"
    else:
        names = _names(args.preset) if args.preset else list(WORKLOADS)
        result = {"machine": info, **run_suite(names, config)}
        tag = "quick" if args.quick else (args.preset or "full").replace(",", "+")
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    result["elapsed_s"] = time.perf_counter() - t_start
    _write_outputs(result, args, tag)
    print(f"elapsed: {result['elapsed_s']:.1f} s")
    return result

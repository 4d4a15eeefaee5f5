"""Running cases and the suite of workloads.

A workload is a list of cases; a case is (name, [Spec, ...], options for the run). Specs of
one case are timed in the same round-robin (so causal vs non-causal, window vs full,
weights vs none are same-run ratios); specs of one shape share their inputs.
"""
import dataclasses
import time
from typing import Any, Dict, List, Optional

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.peers import ALL_IMPLS, MAKERS, Skip
from cattn.bench.probes import (make_gemm, make_stream_probes, run_block_gemm_case,
                                run_memory_case, stream_array)
from cattn.bench.report import format_block_gemm_case, format_case, format_memory_case
from cattn.bench.results import (AttentionRow, Case, CeilingRow, SkippedRun, StreamRow,
                                 TimedRow, WrongOutput)
from cattn.bench.specs import (Spec, input_key, make_inputs, max_abs_diff,
                               reference_check_slice, tolerance)
from cattn.bench.targets import check_targets, format_targets
from cattn.bench.timing import Runner, admit, first_call, median, time_round_robin


def run_case(name: str, spec_list: List[Spec], config: BenchConfig, *,
             ceiling: bool = True, stream: bool = False, trace_memory: bool = True,
             kind: str = "attention") -> Case:
    """Time every implementation of config.impls on every spec in spec_list (the inputs
    made once per shape, shared by the specs of that shape) at every thread count of
    config.threads, plus the GEMM ceiling (and, with stream, the streaming-read probes),
    all in one round-robin."""
    base = spec_list[0]
    inputs: Dict[Any, Any] = {}
    runners: List[Runner] = []
    skipped: List[SkippedRun] = []
    wrong: List[WrongOutput] = []
    for spec in spec_list:
        key = input_key(spec)
        if key not in inputs:
            inputs[key] = make_inputs(spec, config.seed)
        q, k, v = inputs[key]
        expected = reference_check_slice(spec, q, k, v) if config.check else None
        for impl in config.impls:
            for t in config.threads:
                label = f"{impl}/{t}t/{spec.options()}"
                try:
                    fn, to_output, setup, note = MAKERS[impl](spec, q, k, v, t, config)
                except Skip as exc:
                    skipped.append(SkippedRun(label, impl, t, spec.options(), str(exc)))
                    continue
                r = Runner(label, impl, t, kind, fn, setup, spec, to_output, note,
                           work=spec.flops())
                res, t_single = first_call(r, trace_memory and impl in ("cattn", "numpy"))
                diff = None if expected is None else max_abs_diff(to_output(res), *expected)
                del res
                admit(r, t_single, diff, tolerance(spec), spec.options(), runners, wrong,
                      config)
    if ceiling:
        runners += _gemm_runners(base.dtype, config)
    if stream:
        runners += _stream_runners(config)
    config.log(f"  {name}: {len(runners)} runners ")
    t0 = time.perf_counter()
    time_round_robin(runners, config.reps, config.warmup, log=config.log)
    elapsed = time.perf_counter() - t0
    config.log(f" {elapsed:.1f}s\n")
    case = summarize(name, base, spec_list, config.threads, runners, skipped, wrong, kind)
    case.timing_s = elapsed
    return case


def _gemm_runners(dtype, config: BenchConfig) -> List[Runner]:
    gname = "sgemm" if dtype == np.float32 else "dgemm"
    n = config.gemm_n
    runners = []
    for t in config.threads:
        fn, setup = make_gemm(dtype, n, t)
        fn()  # warm
        runners.append(Runner(f"{gname}/{t}t", gname, t, "gemm", fn, setup, work=2.0 * n ** 3,
                              note=f"{n}x{n}x{n} {gname} through scipy.linalg.blas"))
    return runners


def _stream_runners(config: BenchConfig) -> List[Runner]:
    runners = []
    for t in config.threads:
        for pname, fn, setup in make_stream_probes(t, config.stream_mib):
            r = Runner(f"stream:{pname}/{t}t", "stream:" + pname, t, "stream", fn, setup,
                       work=float(stream_array(config.stream_mib).nbytes),
                       note=f"read-only pass over {config.stream_mib} MiB float32")
            r.call(1)
            runners.append(r)
    return runners


def _timed_fields(r: Runner) -> Dict[str, Any]:
    return dict(label=r.label, impl=r.impl, threads=r.threads, kind=r.kind,
                median_s=median(r.times), min_s=float(min(r.times)), times_s=r.times,
                calls_per_timing=r.number, note=r.note)


def summarize(name, base: Spec, spec_list, threads, runners, skipped, wrong,
              kind: str) -> Case:
    """The case's rows from its timed runners, with the ratios within the case (a grouped
    case's decodes also against its cattn prefill: the compute rate of the same run)."""
    rows: List[TimedRow] = []
    ceilings: Dict[int, float] = {}
    streams: Dict[int, float] = {}
    stream_probe: Dict[int, str] = {}
    for r in runners:
        med = median(r.times)
        if r.kind == "gemm":
            ceilings[r.threads] = r.work / med / 1e9
            rows.append(CeilingRow(**_timed_fields(r), gflops=ceilings[r.threads]))
        elif r.kind == "stream":
            gbps = r.work / med / 1e9
            rows.append(StreamRow(**_timed_fields(r), gbps=gbps))
            if gbps > streams.get(r.threads, 0.0):
                streams[r.threads] = gbps
                stream_probe[r.threads] = r.impl[len("stream:"):]
        else:
            rows.append(AttentionRow(
                **_timed_fields(r), options=r.spec.options(), gflops=r.work / med / 1e9,
                gflops_useful=r.spec.useful_flops() / med / 1e9, max_abs_diff=r.max_abs_diff,
                peak_extra_mib=None if r.peak_bytes is None else r.peak_bytes / 2**20,
                kv_gbps=r.spec.kv_bytes() / med / 1e9 if _reads_kv(r.spec, kind) else None))
    attention = [r for r in rows if isinstance(r, AttentionRow)]
    by = {(r.impl, r.threads, r.options): r for r in attention}
    for r in attention:
        c = ceilings.get(r.threads)
        r.pct_of_gemm = None if c is None else 100.0 * r.gflops / c
        if r.kv_gbps is not None and streams.get(r.threads):
            r.pct_of_stream = 100.0 * r.kv_gbps / streams[r.threads]
        mine = by.get(("cattn", r.threads, r.options))
        r.cattn_speedup = None if mine is None else r.median_s / mine.median_s
        one = by.get((r.impl, 1, r.options))
        r.speedup_vs_1t = (None if one is None or r.threads == 1
                           else one.median_s / r.median_s)
        prefill = by.get(("cattn", r.threads, YARDSTICK))
        if kind == "grouped" and r.kv_gbps is not None and prefill is not None:
            r.pct_of_prefill = 100.0 * r.gflops / prefill.gflops
    spec = base.to_json()
    if len({s.shape for s in spec_list}) > 1:
        spec["specs"] = [s.to_json() for s in spec_list]
    return Case(name, kind, spec, [s.options() for s in spec_list], list(threads),
                rows, gemm_gflops={str(t): g for t, g in ceilings.items()},
                stream_gbps={str(t): g for t, g in streams.items()},
                stream_probe={str(t): p for t, p in stream_probe.items()},
                skipped=skipped, wrong_output=wrong)


def _reads_kv(spec: Spec, kind: str) -> bool:
    """Rows whose speed is the K/V read rate: a decode case's, a grouped case's decodes."""
    return kind == "decode" or (kind == "grouped" and spec.L == 1)


def bench_shape(B, H, L, S, E, dtype="float32", causal=False,
                config: Optional[BenchConfig] = None, verbose: bool = True) -> Case:
    """One shape, one dtype, causal or not, at each thread count of the config.
    Returns the case; prints its table when verbose."""
    config = config or BenchConfig()
    case = run_case("shape", [Spec(B, H, L, S, E, dtype, causal)], config)
    if verbose:
        print(format_case(case))
    return case


# ------------------------------------------------------------------------------ workloads

PREFILL_LENGTHS = {"full": (512, 1024, 2048, 4096, 8192), "quick": (256, 1024)}
# E = 128 (H = 4, the same FLOPs as H = 8, E = 64): the head size of larger models.
PREFILL_E128_LENGTHS = {"full": (1024, 2048, 4096), "quick": (1024,)}
REF_MAX_LEN = 4096  # the NumPy reference materializes (B, H, L, S) scores: skipped above


# prefill lengths with float16, bfloat16 and int8 rows beside float32's (same round-robin)
PREFILL_NARROW_LENGTHS = {"full": (1024, 2048, 4096), "quick": (1024,)}


def _prefill_case(L, H, E, dtype, suffix="", narrow=False):
    specs = [Spec(1, H, L, L, E, dtype, causal=False)]
    if np.dtype(dtype) == np.float32:
        specs.append(Spec(1, H, L, L, E, dtype, causal=True))
    if narrow:
        specs += [Spec(1, H, L, L, E, dtype, kv=kv) for kv in ("float16", "bfloat16", "int8")]
    return (f"prefill{suffix} L={L}", specs,
            {"kind": "attention", "ref": L <= REF_MAX_LEN,
             "reps_cap": 5 if L >= 4096 else None})


def prefill_cases(mode: str):
    cases = [_prefill_case(L, 8, 64, "float32", narrow=L in PREFILL_NARROW_LENGTHS[mode])
             for L in PREFILL_LENGTHS[mode]]
    cases += [_prefill_case(L, 4, 128, "float32", " E=128")
              for L in PREFILL_E128_LENGTHS[mode]]
    return cases


def float64_cases(mode: str):
    lengths = (1024, 2048, 4096) if mode == "full" else (512,)
    return [_prefill_case(L, 8, 64, "float64", "-f64") for L in lengths]


def encoder_cases(mode: str):
    lengths = (128, 384) if mode == "full" else (128,)
    return [(f"encoder L={L}", [Spec(8, 12, L, L, 64)], {"kind": "attention"})
            for L in lengths]


def decode_cases(mode: str):
    """Decoding against a float32 cache and float16, bfloat16 and int8 ones, in one
    round-robin (the bandwidth counts the bytes each reads)."""
    return [("decode S=4096", [Spec(1, 32, 1, 4096, 128, kv=kv) for kv in
                               (None, "float16", "bfloat16", "int8")],
             {"kind": "decode", "stream": True, "ceiling": False})]


# the grouped case's sizes: decodes' keys, latent attention's keys, the prefill's L = S
GROUPED_S = {"full": 8192, "quick": 2048}
MLA_S = {"full": 4096, "quick": 1024}
YARDSTICK_L = {"full": 2048, "quick": 1024}
YARDSTICK = "prefill"  # the tag of a grouped case's compute-rate yardstick


def grouped_cases(mode: str):
    """Decoding with 32 query heads over 32, 8 and 1 K/V heads, latent attention's decode
    (DeepSeek's absorbed form: 128 query heads over one 576-wide K/V head whose first 512
    columns are the values) and a prefill as the compute-rate yardstick, in one
    round-robin: each decode against the stream read and the prefill of the same run."""
    S, N = GROUPED_S[mode], YARDSTICK_L[mode]
    specs = [Spec(1, 32, 1, S, 128, kv_heads=h) for h in (32, 8, 1)]
    specs.append(Spec(1, 128, 1, MLA_S[mode], 576, kv_heads=1, value_width=512))
    specs.append(Spec(1, 4, N, N, 128, tag=YARDSTICK))
    return [(f"grouped decode S={S}", specs,
             {"kind": "grouped", "stream": True, "ceiling": False})]


def paged_cases(mode: str):
    """The decode shape with its keys and values in pages of 16 and of 256 positions
    (shuffled, read through the block table), against the contiguous decode, same run;
    and a mixed batch of decoding and prefilling sequences over pages, in one call
    against one call per sequence."""
    shape = (1, 32, 1, 4096, 128)
    return [("paged decode S=4096", [Spec(*shape)] + [Spec(*shape, page_size=size)
                                                     for size in (16, 256)],
             {"kind": "decode", "impls": ("cattn",), "ceiling": False}),
            # 8 decoding + 1 prefilling sequences: one mixed call vs one per sequence
            ("paged mixed batch", [], {"kind": "mixed_paged"})]


def tiny_cases(mode: str):
    return [("tiny L=S=5", [Spec(1, 1, 5, 5, 64)], {"kind": "attention", "ceiling": False})]


def variant_cases(mode: str):
    """Same-run ratios of the variants: a 256 window vs full at 8192, weights vs none at
    1024, attention sinks vs none at 2048 (causal vs full at 4096 comes from the prefill
    workload)."""
    L = 8192 if mode == "full" else 1024
    W = 1024 if mode == "full" else 512
    N = 2048 if mode == "full" else 1024
    return [(f"window L={L}", [Spec(1, 8, L, L, 64), Spec(1, 8, L, L, 64, window=(256, 0))],
             {"kind": "attention", "impls": ("cattn",), "reps_cap": 5}),
            (f"weights L={W}", [Spec(1, 8, W, W, 64), Spec(1, 8, W, W, 64,
                                                              return_weights=True)],
             {"kind": "attention", "impls": ("cattn", "numpy")}),
            (f"sinks L={N}", [Spec(1, 8, N, N, 64), Spec(1, 8, N, N, 64, sinks=True)],
             {"kind": "attention", "impls": ("cattn",)})]


def memory_cases(mode: str):
    """Peak extra memory per implementation (fresh processes, no timing), up to
    L = S = 16384, one head, E = 64 (cattn and the peers; not the reference: 1 GiB scores)."""
    if mode != "full":  # --quick: the tables' tracemalloc column only
        return []
    return [("memory L=4096", [Spec(1, 8, 4096, 4096, 64)], {"kind": "memory"}),
            ("memory L=16384", [Spec(1, 1, 16384, 16384, 64)],
             {"kind": "memory", "ref": False})]


WORKLOADS = {
    "prefill": prefill_cases,
    "encoder": encoder_cases,
    "decode": decode_cases,
    "paged": paged_cases,
    "grouped": grouped_cases,
    "tiny": tiny_cases,
    "float64": float64_cases,
    "variants": variant_cases,
    "memory": memory_cases,
    "blocks": lambda mode: [("blocks", [], {"kind": "blockgemm"})],
    "varlen": lambda mode: [("varlen", [], {"kind": "varlen"})],
    "decode-loop": lambda mode: [("decode loop", [], {"kind": "decode_loop"})],
    "bias": lambda mode: [("position bias", [], {"kind": "position_bias"})],
    "serving": lambda mode: [("shared prefix", [], {"kind": "shared_prefix",
                                                    "impls": ("cattn",)})],
}


def run_workload_case(wname: str, name: str, specs: List[Spec], opts: Dict[str, Any],
                      config: BenchConfig) -> Optional[Case]:
    """One case of a workload, with the case's own implementations, threads and reps."""
    impls = [i for i in config.impls if i in opts.get("impls", ALL_IMPLS)]
    if not opts.get("ref", True):
        impls = [i for i in impls if i != "numpy"]
    if opts["kind"] == "blockgemm":
        case = run_block_gemm_case(name, 1, reps=config.reps, warmup=config.warmup,
                                   gemm_n=config.gemm_n,
                                   flops_per_call=5e7 if config.quick else 2e8,
                                   config=config)
        text = format_block_gemm_case(case)
    elif opts["kind"] == "varlen":  # its own implementations (packed and padded)
        from cattn.bench.varlen import format_varlen_case, run_varlen_case
        case = run_varlen_case(name, config)
        text = format_varlen_case(case)
    elif opts["kind"] == "mixed_paged":  # (its own inputs: pages, packed queries)
        from cattn.bench.mixed_paged import format_mixed_paged_case, run_mixed_paged_case
        case = run_mixed_paged_case(name, config)
        text = format_mixed_paged_case(case)
    elif opts["kind"] == "decode_loop":  # (its own model, peers and stream probe)
        from cattn.bench.decode_loop import format_decode_loop_case, run_decode_loop_case
        case = run_decode_loop_case(name, "quick" if config.quick else "full", config)
        text = format_decode_loop_case(case)
    elif opts["kind"] == "position_bias":  # (its own inputs: slopes, a dense bias)
        from cattn.bench.position_bias import (format_position_bias_case,
                                               run_position_bias_case)
        case = run_position_bias_case(name, config)
        text = format_position_bias_case(case)
    elif not impls:
        return None
    elif opts["kind"] == "shared_prefix":  # (its own inputs: a prefix and R suffixes)
        from cattn.bench.serving import format_shared_prefix_case, run_shared_prefix_case
        case = run_shared_prefix_case(name, "quick" if config.quick else "full", config)
        text = format_shared_prefix_case(case)
    elif opts["kind"] == "memory":  # (one cattn: the path does not change the memory)
        case = run_memory_case(name, specs, [i for i in impls if i != "cattn-avx2"], 1,
                               config=config)
        text = format_memory_case(case)
    else:
        reps = config.reps if opts.get("reps_cap") is None else min(config.reps,
                                                                    opts["reps_cap"])
        case_config = dataclasses.replace(config, impls=impls, reps=reps,
                                          warmup=opts.get("warmup", config.warmup))
        case = run_case(name, specs, case_config, ceiling=opts.get("ceiling", True),
                        stream=opts.get("stream", False), kind=opts["kind"])
        if not opts.get("ref", True) and "numpy" in config.impls:
            case.skipped.append(SkippedRun("numpy", "numpy", None, None,
                                           f"reference skipped above L={REF_MAX_LEN} "
                                           "(it materializes the L x S scores)"))
        text = format_case(case)
    case.workload = wname
    print(text)
    print(flush=True)
    return case


def run_suite(names: List[str], config: BenchConfig) -> Dict[str, Any]:
    """Every case of the named workloads, then the targets. Returns the result (for JSON)."""
    mode = "quick" if config.quick else "full"
    for n in names:
        if n not in WORKLOADS:
            raise SystemExit(f"unknown preset {n!r}; choose from {', '.join(WORKLOADS)}")
    cases = []
    for wname in names:
        for name, specs, opts in WORKLOADS[wname](mode):
            case = run_workload_case(wname, name, specs, opts, config)
            if case is not None:
                cases.append(case)
    result: Dict[str, Any] = {"mode": mode, "presets": names, "reps": config.reps,
                              "gemm_n": config.gemm_n, "threads": config.threads,
                              "cases": cases}
    result["targets"] = check_targets(result)
    print(format_targets(result["targets"]))
    return result

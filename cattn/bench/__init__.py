"""The cattn benchmark: cattn against the NumPy reference, PyTorch and ONNX Runtime.

    python -m cattn.bench --quick                      # the whole suite, small: about 2.5 min on 2 cores
    python -m cattn.bench                              # the whole suite (the RESULTS.md run)
    python -m cattn.bench --shape 1,8,2048,2048,64 --threads 1,2 [--causal] [--dtype float64]

How it measures (so the numbers can be trusted on a shared, noisy machine):

* Every implementation gets the SAME input arrays (B, H, L, E) and its output is checked
  against the NumPy reference (float64 ground truth, on a slice of rows for big shapes)
  before it is timed; a peer that computes something else is reported and never timed.
* One "case" is a list of runners (implementation x thread count x options) plus, as the
  ceiling, the machine's own large GEMM (sgemm for float32, dgemm for float64) at every
  thread count. All runners of a case are timed round-robin, rep after rep, with the start
  of the round rotated every rep, so that a burst of load from other processes hits every
  runner alike; the result is the median of the timed reps (after untimed warm-up reps).
  Ratios (cattn / peer, % of GEMM, 2 threads / 1 thread) are computed within a case.
* A timing that would be shorter than `min_timing` (tiny inputs) runs the call `number`
  times in a loop and reports the time per call (Python overhead included).
* Threads: cattn through `num_threads=`; PyTorch through `torch.set_num_threads`; ONNX
  Runtime through the session's `intra_op_num_threads` (one session per thread count,
  spinning disabled so idle ORT threads don't steal the core from the next runner);
  NumPy (the reference) and the GEMM ceiling through threadpoolctl's BLAS limit, or, when
  threadpoolctl is absent, SciPy's OpenBLAS `openblas_set_num_threads` (NumPy's own BLAS
  is then not limited; the JSON says so).
* FLOPs: 4*B*H*L*S*E (two GEMMs of 2*L*S*E each; 2*B*H*L*S*(E + Ev) where the values are
  Ev wide, as latent attention's). For causal and windowed attention the GFLOP/s is
  "dense-equivalent" (same count as non-causal, so it measures time); the "useful"
  GFLOP/s counts only the visible (query, key) pairs.
* Decode (one query against a long cache) is memory-bound: it is reported as GB/s of K and
  V read (2*Hkv*S*E*itemsize bytes / time: a K/V head that grouped query heads share counts
  once, and keys whose view the values are count once) against the machine's streaming
  read rate measured in the same round-robin: the fastest of `cattn._kernel.stream_sum`
  (if the build has it), NumPy sums over one chunk per thread, and `torch.sum`, over a
  512 MiB float32 array.
* Peak extra memory: tracemalloc around the first (checking) call; it sees NumPy
  allocations (the reference, cattn's output and scratch), not PyTorch's or ORT's own
  allocators (reported as n/a). It includes the output array.
* The machine: the CPU model and flags (from /proc/cpuinfo, else lscpu), the instruction
  set cattn's kernel runs on and PyTorch's CPU capability are printed as a header and kept
  in the JSON (machine.isa), since the ratios depend on them.
"""
# Modules, one concern each:
#   cli      the entry point (argument parsing, outputs)  config   BenchConfig
#   specs    workload specs, inputs, the reference check  peers    the implementations
#   timing   runners and the round-robin                  probes   ceilings, memory, machine
#   suite    cases and workloads                           results  result rows (dataclasses)
#   report   tables, Markdown, JSON, plot                  targets  named performance targets
from cattn.bench.cli import main
from cattn.bench.config import BenchConfig
from cattn.bench.peers import ALL_IMPLS, MAKERS, PEERS, Skip
from cattn.bench.probes import machine_info, run_block_gemm_case, run_memory_case
from cattn.bench.report import (format_block_gemm_case, format_case, format_markdown,
                                format_memory_case, write_json)
from cattn.bench.results import Case
from cattn.bench.specs import Spec
from cattn.bench.suite import WORKLOADS, bench_shape, run_case, run_suite
from cattn.bench.targets import check_targets, format_targets

__all__ = ["main", "BenchConfig", "ALL_IMPLS", "MAKERS", "PEERS", "Skip", "machine_info",
           "run_block_gemm_case", "run_memory_case", "format_block_gemm_case", "format_case",
           "format_markdown", "format_memory_case", "write_json", "Case", "Spec",
           "WORKLOADS", "bench_shape", "run_case", "run_suite", "check_targets",
           "format_targets"]

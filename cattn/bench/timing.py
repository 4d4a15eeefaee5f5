"""Timing: runners, the untimed first call, and the round-robin that times them all alike."""
import gc
import math
import time
import tracemalloc
from typing import Callable, List, Optional

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.results import AttentionRow, WrongOutput

# Seconds of idling before each timed call (see time_round_robin).
IDLE_BEFORE_TIMING = 0.1


def wait_busy(seconds: float) -> None:
    """Wait on the calling thread without sleeping. While the other threads' pools go
    idle, this thread keeps its core awake: when every core of a VM sleeps for 0.1 s, the
    next call pays the machine's wake-up (a 2-thread decode on the Ice Lake Xeon VM: 8.5
    ms after a 0.1 s sleep, 6.7 ms after a 0.1 s wait like this one, 6.3-6.6 ms back to
    back), which is no part of any implementation's speed."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Runner:
    """One thing to time: fn (the call), setup (thread settings, returns a restore callable)
    and what its time means (work: flops for GEMM and attention, bytes for streams)."""

    def __init__(self, label, impl, threads, kind, fn, setup=None, spec=None,
                 to_output=None, note="", work=None):
        self.label, self.impl, self.threads, self.kind = label, impl, threads, kind
        self.fn, self.setup, self.spec, self.to_output = fn, setup, spec, to_output
        self.note, self.work = note, work
        self.number = 1
        self.times: List[float] = []
        self.first_call = None
        self.peak_bytes: Optional[int] = None
        self.max_abs_diff: Optional[float] = None

    def call(self, number: int = 1) -> float:
        restore = self.setup() if self.setup is not None else None
        try:
            t0 = time.perf_counter()
            for _ in range(number):
                self.fn()
            return time.perf_counter() - t0
        finally:
            if restore is not None:
                restore()


def first_call(runner: Runner, trace_memory: bool):
    """The untimed first call: output (for the check), peak traced memory, call time."""
    restore = runner.setup() if runner.setup is not None else None
    try:
        gc.collect()
        if trace_memory:
            tracemalloc.start()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        res = runner.fn()
        t = time.perf_counter() - t0
        if trace_memory:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            runner.peak_bytes = max(0, peak - base)
    finally:
        if restore is not None:
            restore()
    return res, t


def time_round_robin(runners: List[Runner], reps: int, warmup: int,
                     log: Optional[Callable[[str], None]] = None) -> None:
    """Time all runners interleaved; each runner's .times gets `reps` seconds-per-call."""
    n = len(runners)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(warmup + reps):
            k = rep % n
            for r in runners[k:] + runners[:k]:
                # Let the previous runner's thread pools go idle first: OpenBLAS and OpenMP
                # workers busy-wait for a while after a call and would steal the cores of
                # whichever runner comes next.
                wait_busy(IDLE_BEFORE_TIMING)
                t = r.call(r.number) / r.number
                if rep >= warmup:
                    r.times.append(t)
            gc.collect()
            if log is not None:
                log(".")
    finally:
        if gc_was_enabled:
            gc.enable()


def calibrate(runner: Runner, t_single: float, min_timing: float) -> None:
    """Calls per timing, so that one timing lasts at least min_timing (tiny inputs)."""
    if t_single < min_timing:
        # Re-measure a short loop: the first call is cold and overestimates.
        n = 1
        while True:
            t = runner.call(n)
            if t >= min_timing / 10 or n >= 1 << 20:
                break
            n *= 4
        per_call = max(t / n, 1e-9)
        runner.number = max(1, int(math.ceil(min_timing / per_call)))


def admit(runner: Runner, t_single: float, diff: Optional[float], tol: float, options: str,
          runners: List[Runner], wrong: List[WrongOutput], config: BenchConfig) -> None:
    """Calibrate `runner` and add it to `runners` when its output is within `tol` of the
    float64 reference (diff None: not checked); otherwise record it in `wrong`, say so, and
    leave it untimed."""
    if diff is not None:
        runner.max_abs_diff = diff
        if not diff <= tol:
            wrong.append(WrongOutput(runner.label, runner.impl, runner.threads, options, diff))
            config.log(f"\n  !! {runner.label}: max abs diff {diff:.3g} vs the float64 "
                       f"reference (tolerance {tol:g}): NOT timed\n")
            return
    calibrate(runner, t_single, config.min_timing)
    runners.append(runner)


def admit_each(impls, config: BenchConfig, make_runner: Callable[[str, int], Optional[Runner]],
               max_abs_diff: Callable[[Runner, object], float], tol: float, options: str,
               runners: List[Runner], wrong: List[WrongOutput]) -> None:
    """For each implementation and thread count: its runner (make_runner; None: skipped),
    the untimed first call, its output checked against the float64 reference
    (max_abs_diff(runner, output), only with config.check), then admit."""
    for impl in impls:
        for threads in config.threads:
            runner = make_runner(impl, threads)
            if runner is None:
                continue
            output, t_single = first_call(runner, False)
            diff = max_abs_diff(runner, output) if config.check else None
            admit(runner, t_single, diff, tol, options, runners, wrong, config)


def median(xs) -> float:
    return float(np.median(xs)) if len(xs) else float("nan")


def timed_rows(name: str, runners: List[Runner], options: str, config: BenchConfig,
               baseline: str) -> List[AttentionRow]:
    """Time the admitted runners round-robin; one row each, its cattn_speedup its median
    over the `baseline` implementation's at the same thread count (same run)."""
    config.log(f"  {name}: {len(runners)} runners ")
    time_round_robin(runners, config.reps, config.warmup, log=config.log)
    config.log("\n")
    rows = [AttentionRow(
        label=r.label, impl=r.impl, threads=r.threads, kind=r.kind,
        median_s=median(r.times), min_s=float(min(r.times)), times_s=r.times,
        calls_per_timing=r.number, note=r.note, options=options,
        max_abs_diff=r.max_abs_diff) for r in runners]
    for row in rows:
        base = next((x for x in rows if x.impl == baseline and x.threads == row.threads),
                    None)
        row.cattn_speedup = None if base is None else row.median_s / base.median_s
    return rows

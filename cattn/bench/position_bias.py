"""Position biases and key mass: what ALiBi computed in the kernel costs, same run
(round-robin), on one (1, 8, N, N) float32 call with E = 64 and no causal mask (every
score gets the bias):

- cattn-plain: no bias;
- cattn-alibi: `alibi_slopes=` (8 geometric slopes), the bias computed per block;
- cattn-dense-bias: the same values as a dense (1, 8, N, N) float32 `attn_mask` (what a
  user builds without alibi_slopes);
- cattn-t5: T5's bucketed bias (`position_bias=`, 32 buckets up to distance 128),
  looked up per block;
- cattn-key-mass: no bias, `return_key_mass=True`.

Each is checked on its first head against the float64 reference before it is timed.
"""
from typing import Any, Callable, Dict, List

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.results import Case, SkippedRun, WrongOutput
from cattn.bench.specs import tolerance
from cattn.bench.timing import Runner, admit_each, timed_rows

IMPLS = ("cattn-plain", "cattn-alibi", "cattn-dense-bias", "cattn-t5", "cattn-key-mass")
HEADS, HEAD_DIM = 8, 64
SIZES = {"full": 2048, "quick": 512}


def bias_inputs(N: int, seed: int):
    """q, k, v (1, H, N, E) float32, ALiBi's slopes (H,) and the same bias dense."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, HEADS, N, HEAD_DIM), dtype=np.float32)
               for _ in range(3))
    slopes = (2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)).astype(np.float32)
    distance = np.abs(np.arange(N)[:, None] - np.arange(N)[None, :]).astype(np.float32)
    dense = (-slopes[:, None, None] * distance)[None]
    return q, k, v, slopes, dense


def t5_bias(cattn):
    """A T5 encoder's bias: 32 buckets up to distance 128, seeded values per head."""
    table = np.random.default_rng(1).standard_normal((32, HEADS)).astype(np.float32)
    return cattn.RelativePositionBias(table, num_buckets=32, max_distance=128,
                                      bidirectional=True)


def _makers(q, k, v, slopes, dense) -> Dict[str, Callable[[int], Callable[[], Any]]]:
    import cattn
    sdpa = cattn.scaled_dot_product_attention
    t5 = t5_bias(cattn)
    return {
        "cattn-t5": lambda t: lambda: sdpa(q, k, v, position_bias=t5, num_threads=t),
        "cattn-plain": lambda t: lambda: sdpa(q, k, v, num_threads=t),
        "cattn-alibi": lambda t: lambda: sdpa(q, k, v, alibi_slopes=slopes, num_threads=t),
        "cattn-dense-bias": lambda t: lambda: sdpa(q, k, v, attn_mask=dense, num_threads=t),
        "cattn-key-mass": lambda t: lambda: sdpa(q, k, v, return_key_mass=True,
                                                 num_threads=t)[0],
    }


def _max_abs_diff(impl: str, out, q, k, v, slopes, dense) -> float:
    """Head 0 against the float64 reference (with the bias where the call has one)."""
    from cattn.reference import scaled_dot_product_attention as ref
    mask = dense[0, :1].astype(np.float64) if impl in ("cattn-alibi",
                                                       "cattn-dense-bias") else None
    q1, k1, v1 = (x[0, :1].astype(np.float64) for x in (q, k, v))
    if impl == "cattn-t5":
        import cattn
        bias = t5_bias(cattn)
        first_head = cattn.RelativePositionBias(bias.table[:, :1], num_buckets=32,
                                                max_distance=128, bidirectional=True)
        want = ref(q1, k1, v1, position_bias=first_head)
    else:
        want = ref(q1, k1, v1, attn_mask=mask)
    return float(np.max(np.abs(np.asarray(out)[0, :1] - want)))


def run_position_bias_case(name: str, config: BenchConfig) -> Case:
    N = SIZES["quick" if config.quick else "full"]
    inputs = bias_inputs(N, config.seed)
    makers = _makers(*inputs)
    runners: List[Runner] = []
    wrong: List[WrongOutput] = []
    skipped: List[SkippedRun] = []
    admit_each(IMPLS, config,
               lambda impl, t: Runner(f"{impl}/{t}t", impl, t, "position_bias",
                                      makers[impl](t)),
               lambda runner, out: _max_abs_diff(runner.impl, out, *inputs),
               tolerance(np.float32), "full", runners, wrong)
    rows = timed_rows(name, runners, "full", config, baseline="cattn-plain")
    spec = {"N": N, "H": HEADS, "E": HEAD_DIM, "dtype": "float32"}
    return Case(name, "position_bias", spec, ["full"], list(config.threads), rows,
                skipped=skipped, wrong_output=wrong)


def format_position_bias_case(case: Case) -> str:
    spec = case.spec
    out = [f"== {case.name}: (1, {spec['H']}, N, N) with N = {spec['N']}, E = {spec['E']}, "
           f"no causal mask, {spec['dtype']}",
           f"   {'impl':<20}{'thr':>4}{'median':>11}{'plain x':>10}{'maxdiff':>10}"]
    for r in sorted(case.rows, key=lambda r: (r.threads, IMPLS.index(r.impl))):
        ratio = r.cattn_speedup
        out.append(f"   {r.impl:<20}{r.threads:>4}{r.median_s * 1e3:>8.2f} ms"
                   f"{'-' if ratio is None else f'{ratio:.2f}x':>10}"
                   f"{'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.1e}':>10}")
    for w in case.wrong_output:
        out.append(f"   WRONG {w.label}: max abs diff {w.max_abs_diff:.3g} (not timed)")
    out.append("   ('plain x' = time / cattn-plain's, same run)")
    return "\n".join(out)


def position_bias_markdown_table(case: Case) -> List[str]:
    return (["| impl | threads | median | time / cattn-plain's | max abs diff |",
             "|---|---|---|---|---|"]
            + [f"| {r.impl} | {r.threads} | {r.median_s * 1e3:.2f} ms | "
               + ("-" if r.cattn_speedup is None else f"{r.cattn_speedup:.2f}x")
               + " | " + ("-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}")
               + " |" for r in case.rows])

"""Packed variable-length sequences: cattn.varlen_attention against the two ways to run the
same batch padded to its longest sequence, in one round-robin.

- cattn-varlen: `varlen_attention` on the packed (T, H, E) arrays;
- cattn-padded: `scaled_dot_product_attention` on the (B, H, Lmax, E) batch with
  `key_lengths` (padded keys are skipped, padded query rows are computed);
- torch-padded: PyTorch's SDPA on the padded batch with a boolean mask (padding, and the
  causal triangle when causal).

Only the attention call is timed: the padded arrays (and the mask) are built beforehand,
which favours the padded calls. Every output is checked against the float64 reference on
the shortest, the median and the longest sequence before it is timed.
"""
import math
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.peers import optional, torch_threads
from cattn.bench.results import AttentionRow, Case, SkippedRun, WrongOutput
from cattn.bench.specs import tolerance
from cattn.bench.timing import Runner, admit_each, median, time_round_robin

IMPLS = ("cattn-varlen", "cattn-padded", "torch-padded")
# The target's batch: 16 sequences, log-uniform lengths, 12 heads of 64 features.
SEQUENCES, HEADS, HEAD_DIM = 16, 12, 64
LENGTH_RANGE = {"full": (16, 1024), "quick": (16, 256)}


def log_uniform_lengths(n: int, low: int, high: int, seed: int) -> np.ndarray:
    """n lengths whose logarithms are uniform on [log low, log high] (fixed by seed)."""
    rng = np.random.default_rng(seed)
    return np.round(np.exp(rng.uniform(math.log(low), math.log(high), n))).astype(np.int64)


def packed_inputs(lengths: np.ndarray, H: int, E: int, seed: int):
    """q, k, v (T, H, E) float32 and the cumulative lengths."""
    rng = np.random.default_rng(seed + 1)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    q, k, v = (rng.standard_normal((int(cu[-1]), H, E), dtype=np.float32) for _ in range(3))
    return q, k, v, cu


def pad(x: np.ndarray, cu: np.ndarray, L: int) -> np.ndarray:
    """(T, H, E) packed -> (B, H, L, E), zeros after each sequence's end."""
    B, H, E = cu.size - 1, x.shape[1], x.shape[2]
    out = np.zeros((B, H, L, E), dtype=x.dtype)
    for s in range(B):
        out[s, :, :cu[s + 1] - cu[s]] = x[cu[s]:cu[s + 1]].transpose(1, 0, 2)
    return out


def _makers(q, k, v, cu, causal: bool) -> Dict[str, Callable[[int], Tuple[Any, Any, Any]]]:
    """impl -> (threads -> (call, output as packed (T, H, E), setup))."""
    import cattn
    lengths = np.diff(cu)
    L = int(lengths.max())
    qp, kp, vp = (pad(x, cu, L) for x in (q, k, v))

    def unpad(out):
        return np.concatenate([np.asarray(out)[s, :, :lengths[s]].transpose(1, 0, 2)
                               for s in range(lengths.size)])

    def varlen(t):
        return (lambda: cattn.varlen_attention(q, k, v, cu, cu, is_causal=causal,
                                               num_threads=t)), (lambda out: out), None

    def padded(t):
        return (lambda: cattn.scaled_dot_product_attention(
            qp, kp, vp, is_causal=causal, key_lengths=lengths, num_threads=t)), unpad, None

    def torch_padded(t):
        torch = optional("torch")
        if torch is None:
            raise RuntimeError("torch not installed (pip install 'cattn[torch]')")
        import torch.nn.functional as F
        keep = np.arange(L)[None, :] < lengths[:, None]                  # (B, S)
        mask = np.broadcast_to(keep[:, None, None, :], (lengths.size, 1, L, L))
        if causal:
            mask = mask & np.tril(np.ones((L, L), dtype=bool))
        tq, tk, tv = (torch.from_numpy(x) for x in (qp, kp, vp))
        tmask = torch.from_numpy(np.ascontiguousarray(mask))
        return ((lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)),
                (lambda out: unpad(out.numpy())), (lambda: torch_threads(t)))

    return {"cattn-varlen": varlen, "cattn-padded": padded, "torch-padded": torch_padded}


def _expected(q, k, v, cu, causal: bool) -> Dict[int, np.ndarray]:
    """Sequence -> float64 reference output (T_s, H, E), for the shortest, the median and
    the longest sequence."""
    from cattn.reference import scaled_dot_product_attention as ref
    lengths = np.diff(cu)
    order = np.argsort(lengths, kind="stable")
    picked = sorted({int(order[0]), int(order[order.size // 2]), int(order[-1])})
    out = {}
    for s in picked:
        qs, ks, vs = (x[cu[s]:cu[s + 1]].transpose(1, 0, 2).astype(np.float64)
                      for x in (q, k, v))
        out[s] = np.asarray(ref(qs, ks, vs, is_causal=causal)).transpose(1, 0, 2)
    return out


def _max_abs_diff(packed_out, cu, expected) -> float:
    return max(float(np.max(np.abs(np.asarray(packed_out)[cu[s]:cu[s + 1]] - want),
                            initial=0.0)) for s, want in expected.items())


def run_varlen_case(name: str, config: BenchConfig) -> Case:
    """The varlen batch, causal and not, at each thread count: every implementation in
    one round-robin."""
    low, high = LENGTH_RANGE["quick" if config.quick else "full"]
    lengths = log_uniform_lengths(SEQUENCES, low, high, config.seed)
    q, k, v, cu = packed_inputs(lengths, HEADS, HEAD_DIM, config.seed)
    runners: List[Runner] = []
    skipped: List[SkippedRun] = []
    wrong: List[WrongOutput] = []
    options_of: Dict[str, str] = {}
    for causal in (False, True):
        options = "causal" if causal else "full"
        makers = _makers(q, k, v, cu, causal)
        expected = _expected(q, k, v, cu, causal) if config.check else None

        def make_runner(impl, t, makers=makers, options=options, causal=causal):
            label = f"{impl}/{t}t/{options}"
            try:
                fn, to_packed, setup = makers[impl](t)
            except RuntimeError as exc:
                skipped.append(SkippedRun(label, impl, t, options, str(exc)))
                return None
            options_of[label] = options
            return Runner(label, impl, t, "varlen", fn, setup, None, to_packed,
                          work=_flops(lengths, causal))

        def error(runner: Runner, out: Any, expected: Any = expected) -> float:
            return _max_abs_diff(runner.to_output(out), cu, expected)

        admit_each(IMPLS, config, make_runner, error, tolerance(np.float32), options,
                   runners, wrong)
    config.log(f"  {name}: {len(runners)} runners ")
    time_round_robin(runners, config.reps, config.warmup, log=config.log)
    config.log("\n")
    rows = []
    for runner in runners:
        med = median(runner.times)
        rows.append(AttentionRow(
            label=runner.label, impl=runner.impl, threads=runner.threads, kind=runner.kind,
            median_s=med, min_s=float(min(runner.times)), times_s=runner.times,
            calls_per_timing=runner.number, note=runner.note,
            options=options_of[runner.label], gflops=runner.work / med / 1e9,
            gflops_useful=runner.work / med / 1e9, max_abs_diff=runner.max_abs_diff))
    for r in rows:  # how much slower than cattn-varlen, same options and threads
        mine = next((x for x in rows if x.impl == "cattn-varlen" and x.threads == r.threads
                     and x.options == r.options), None)
        r.cattn_speedup = None if mine is None else r.median_s / mine.median_s
    spec = {"sequences": SEQUENCES, "H": HEADS, "E": HEAD_DIM, "dtype": "float32",
            "lengths": lengths.tolist(), "length_range": [low, high]}
    return Case(name, "varlen", spec, ["full", "causal"], list(config.threads), rows,
                skipped=skipped, wrong_output=wrong)


def _flops(lengths: np.ndarray, causal: bool) -> float:
    """Useful flops: 4·H·E per visible (query, key) pair of each sequence."""
    pairs = sum(int(n) * (int(n) + 1) // 2 if causal else int(n) ** 2 for n in lengths)
    return 4.0 * HEADS * HEAD_DIM * pairs


def format_varlen_case(case: Case) -> str:
    spec = case.spec
    out = [f"== {case.name}: {spec['sequences']} sequences, lengths log-uniform "
           f"{spec['length_range'][0]}-{spec['length_range'][1]} (T = "
           f"{sum(spec['lengths'])}, longest {max(spec['lengths'])}), H={spec['H']} "
           f"E={spec['E']} {spec['dtype']}",
           f"   {'impl':<14}{'thr':>4} {'options':<9}{'median':>11}{'GFLOP/s':>9}"
           f"{'varlen x':>10}{'maxdiff':>10}"]
    for r in sorted(case.rows, key=lambda r: (r.options, r.threads, IMPLS.index(r.impl))):
        sp = None if r.impl == "cattn-varlen" else r.cattn_speedup
        out.append(f"   {r.impl:<14}{r.threads:>4} {r.options:<9}"
                   f"{r.median_s * 1e3:>8.2f} ms{r.gflops:>9.1f}"
                   f"{'-' if sp is None else f'{sp:.2f}x':>10}"
                   f"{'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.1e}':>10}")
    for s in case.skipped:
        out.append(f"   skipped {s.label}: {s.reason}")
    for w in case.wrong_output:
        out.append(f"   WRONG {w.label}: max abs diff {w.max_abs_diff:.3g} (not timed)")
    out.append("   (GFLOP/s counts visible pairs only; 'varlen x' = time / cattn-varlen's)")
    return "\n".join(out)


def varlen_markdown_table(case: Case) -> List[str]:
    lines = ["| impl | threads | options | median | GFLOP/s (visible pairs) | time / "
             "cattn-varlen's | max abs diff |", "|---|---|---|---|---|---|---|"]
    for r in sorted(case.rows, key=lambda r: (r.options, r.threads, IMPLS.index(r.impl))):
        sp = "-" if r.impl == "cattn-varlen" or r.cattn_speedup is None else \
            f"{r.cattn_speedup:.2f}x"
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        lines.append(f"| {r.impl} | {r.threads} | {r.options} | {r.median_s * 1e3:.2f} ms | "
                     f"{r.gflops:.1f} | {sp} | {diff} |")
    return lines

"""A mixed batch over a paged cache: 8 sequences decoding one token and one prefilling a
chunk, in one `paged_attention` call with packed queries (`cu_seqlens_q`) against one
call per sequence, same run (round-robin), for chunks of several sizes: chunked prefill
(vLLM's) runs small chunks beside the decodes, where the call overhead one call saves is
a larger part of the work than beside a chunk of 512.

- cattn-mixed: one call, a heaviest-first task list over every (sequence, head, block);
- cattn-per-sequence: nine padded calls (each decode a (1, Hq, 1, E) query, the chunk a
  (1, Hq, C, E) one) over the same pages.

Both are checked against the float64 reference on the chunk and on one decoding sequence
(keys gathered from the pages here) before they are timed.
"""
from typing import Any, Callable, Dict, List

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.results import Case, SkippedRun, WrongOutput
from cattn.bench.specs import tolerance
from cattn.bench.timing import Runner, admit_each, timed_rows

IMPLS = ("cattn-mixed", "cattn-per-sequence")
DECODING, HQ, HKV, HEAD_DIM, PAGE = 8, 32, 8, 128, 16
# (cached keys of each decoding sequence, the prefilling chunk's cache)
SIZES = {"full": (1024, 2048), "quick": (256, 512)}
# the prefilling chunk's queries, one round-robin each (the target is on the largest)
CHUNKS = {"full": (16, 64, 256, 512), "quick": (16, 128)}


def mixed_inputs(mode: str, chunk: int, seed: int):
    """q (Tq, Hq, E) packed, the pools, the block table, seq_lens, cu_seqlens_q."""
    decode_len, chunk_cache = SIZES[mode]
    rng = np.random.default_rng(seed)
    seq_lens = np.array([decode_len + 37 * s for s in range(DECODING)] + [chunk_cache])
    q_lens = np.array([1] * DECODING + [chunk])
    pages_each = -(-seq_lens // PAGE)
    width = int(pages_each.max())
    order = rng.permutation(int(pages_each.sum()))
    table = np.full((seq_lens.size, width), -1, dtype=np.int32)
    start = 0
    for s, n in enumerate(pages_each):
        table[s, :n] = order[start:start + n]
        start += n
    k_cache, v_cache = (rng.standard_normal((order.size, HKV, PAGE, HEAD_DIM),
                                            dtype=np.float32) for _ in range(2))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    q = rng.standard_normal((int(cu[-1]), HQ, HEAD_DIM), dtype=np.float32)
    return q, k_cache, v_cache, table, seq_lens, cu


def _makers(q, k_cache, v_cache, table, seq_lens, cu) -> Dict[str, Callable[[int], Any]]:
    import cattn
    queries = [np.ascontiguousarray(q[cu[s]:cu[s + 1]].transpose(1, 0, 2))[None]
               for s in range(seq_lens.size)]

    def mixed(t):
        return lambda: cattn.paged_attention(q, k_cache, v_cache, table, seq_lens,
                                             cu_seqlens_q=cu, is_causal=True,
                                             enable_gqa=True, num_threads=t)

    def per_sequence(t):
        def call():
            return np.concatenate([cattn.paged_attention(
                queries[s], k_cache, v_cache, table[s:s + 1], seq_lens[s:s + 1],
                is_causal=True, enable_gqa=True, num_threads=t)[0].transpose(1, 0, 2)
                for s in range(seq_lens.size)])
        return call

    return {"cattn-mixed": mixed, "cattn-per-sequence": per_sequence}


def _max_abs_diff(out, q, k_cache, v_cache, table, seq_lens, cu) -> float:
    """Against the float64 reference on the chunk (last) and the first decoding sequence."""
    from cattn.reference import scaled_dot_product_attention as ref
    worst = 0.0
    for s in (0, seq_lens.size - 1):
        n = int(seq_lens[s])
        positions = np.arange(n)
        keys, values = (c[table[s, positions // PAGE], :, positions % PAGE].transpose(1, 0, 2)
                        .astype(np.float64) for c in (k_cache, v_cache))
        want = ref(q[cu[s]:cu[s + 1]].transpose(1, 0, 2).astype(np.float64), keys, values,
                   is_causal=True, alignment="bottom_right", enable_gqa=True)
        got = np.asarray(out)[cu[s]:cu[s + 1]].transpose(1, 0, 2)
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


def run_mixed_paged_case(name: str, config: BenchConfig) -> Case:
    mode = "quick" if config.quick else "full"
    rows: List[Any] = []
    wrong: List[WrongOutput] = []
    skipped: List[SkippedRun] = []
    for chunk in CHUNKS[mode]:
        inputs = mixed_inputs(mode, chunk, config.seed)
        makers = _makers(*inputs)
        runners: List[Runner] = []
        options = f"chunk={chunk}"
        admit_each(IMPLS, config,
                   lambda impl, t: Runner(f"{impl}/{t}t/{options}", impl, t, "mixed_paged",
                                          makers[impl](t)),
                   lambda runner, out: _max_abs_diff(out, *inputs), tolerance(np.float32),
                   options, runners, wrong)
        rows += timed_rows(f"{name} {options}", runners, options, config,
                           baseline="cattn-mixed")
    decode_len, chunk_cache = SIZES[mode]
    spec = {"decoding": DECODING, "decode_len": decode_len, "chunks": list(CHUNKS[mode]),
            "chunk": max(CHUNKS[mode]), "chunk_cache": chunk_cache, "Hq": HQ, "Hkv": HKV,
            "E": HEAD_DIM, "page": PAGE, "dtype": "float32"}
    return Case(name, "mixed_paged", spec, [f"chunk={c}" for c in CHUNKS[mode]],
                list(config.threads), rows, skipped=skipped, wrong_output=wrong)


def format_mixed_paged_case(case: Case) -> str:
    spec = case.spec
    out = [f"== {case.name}: {spec['decoding']} sequences decoding 1 token "
           f"({spec['decode_len']}+ cached keys) + 1 prefilling a chunk of C queries "
           f"({spec['chunk_cache']} cached), Hq={spec['Hq']} Hkv={spec['Hkv']} "
           f"E={spec['E']} pages of {spec['page']}, causal, {spec['dtype']}",
           f"   {'C':>5}  {'impl':<20}{'thr':>4}{'median':>11}{'mixed x':>10}{'maxdiff':>10}"]
    chunks = case.options
    for r in sorted(case.rows, key=lambda r: (chunks.index(r.options), r.threads,
                                              IMPLS.index(r.impl))):
        sp = None if r.impl == "cattn-mixed" else r.cattn_speedup
        out.append(f"   {r.options.split('=')[1]:>5}  {r.impl:<20}{r.threads:>4}"
                   f"{r.median_s * 1e3:>8.2f} ms"
                   f"{'-' if sp is None else f'{sp:.2f}x':>10}"
                   f"{'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.1e}':>10}")
    for w in case.wrong_output:
        out.append(f"   WRONG {w.label}: max abs diff {w.max_abs_diff:.3g} (not timed)")
    out.append("   ('mixed x' = time / cattn-mixed's at the same chunk and threads, same "
               "run)")
    return "\n".join(out)

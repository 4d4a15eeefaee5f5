"""Decoding inside a model's loop: a decoder step as a model runs it, step after step.

Per layer: the QKV projection (a NumPy/BLAS product of the token's hidden state with the
layer's weights), the new key and value written into the layer's cache, attention of the
query heads against the cache, the output projection and the residual sum. Between two
attention calls the BLAS threads (and, for PyTorch, its own pool) have run the
projections, so each attention call starts on cores that just did other work: the case a
back-to-back benchmark never sees (an OpenMP team whose idle workers sleep pays their
wake-up here).

Rows, at each thread count:
- cattn-loop / torch-loop: the attention call timed inside the step (median over every
  layer of every step of every round), cattn's `scaled_dot_product_attention` or PyTorch's
  SDPA on the same cache (shared memory), with the projections of the same library kind
  (NumPy for cattn, torch.matmul for PyTorch) on the same number of threads;
- cattn-own-loop: cattn's step with cattn's own projections (the packed-weight linear
  layers of its BERT encoder, on cattn's OpenMP team): no BLAS thread in the loop;
- cattn-b2b / torch-b2b: the same attention calls back to back, nothing in between;
- the whole step (projections, cache update, attention) of each loop, per layer;
- the stream read of the same threads (cattn's stream_sum over 512 MiB), interleaved.

KV GB/s counts the key and value bytes of one call (the whole cache of one layer); "%
stream" is that over the same-run stream read rate.
"""
import os
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.peers import blas_threads, optional, torch_threads
from cattn.bench.probes import blas_idle_cores, stream_array
from cattn.bench.results import AttentionRow, Case, SkippedRun
from cattn.bench.timing import median

HEADS, HEAD_DIM = 32, 128
KV_HEADS = (32, 8)                      # multi-head, and grouped (4 query heads per K/V head)
CONTEXT = {"full": 4096, "quick": 2048}  # keys in each layer's cache
LAYERS = {"full": 4, "quick": 2}
STEPS = {"full": 8, "quick": 4}          # decoder steps per round
ROUNDS = {"full": 5, "quick": 3}         # interleaved rounds (cattn, torch, stream, b2b)
IMPLS = ("cattn-loop", "cattn-own-loop", "torch-loop", "cattn-b2b", "torch-b2b")


class Decoder:
    """The weights and KV caches of a small decoder (one weight set shared by the layers:
    projections that read the same bytes as distinct layers would, at a quarter of the
    memory)."""

    def __init__(self, kv_heads: int, context: int, layers: int, seed: int):
        rng = np.random.default_rng(seed)
        d = HEADS * HEAD_DIM
        self.kv_heads, self.context, self.layers = kv_heads, context, layers
        norm = np.float32(1 / np.sqrt(d))
        self.w_qkv = rng.standard_normal((d, (HEADS + 2 * kv_heads) * HEAD_DIM),
                                         dtype=np.float32) * norm
        self.w_out = rng.standard_normal((d, d), dtype=np.float32) * norm
        shape = (layers, 1, kv_heads, context, HEAD_DIM)
        self.k_cache = rng.standard_normal(shape, dtype=np.float32)
        self.v_cache = rng.standard_normal(shape, dtype=np.float32)
        self.x = rng.standard_normal((1, d), dtype=np.float32)

    @property
    def kv_bytes(self) -> int:
        """Key and value bytes one layer's attention call reads."""
        return 2 * self.kv_heads * self.context * HEAD_DIM * 4

    def split(self, qkv):
        """(q (1, H, 1, E), k (1, Hkv, E), v (1, Hkv, E)) of a projected token."""
        q_end = HEADS * HEAD_DIM
        k_end = q_end + self.kv_heads * HEAD_DIM
        return (qkv[:, :q_end].reshape(1, HEADS, 1, HEAD_DIM),
                qkv[:, q_end:k_end].reshape(1, self.kv_heads, HEAD_DIM),
                qkv[:, k_end:].reshape(1, self.kv_heads, HEAD_DIM))


def cached_attention(model: Decoder, threads: int) -> Callable[..., Any]:
    """attend(layer, qkv, times): the token's key and value written into the layer's
    cache (its last row), then cattn's attention of the query heads against the cache,
    timed (appended to times)."""
    import cattn
    gqa = model.kv_heads != HEADS
    pos = model.context - 1

    def attend(layer: int, qkv, times: List[float]):
        q, k_new, v_new = model.split(qkv)
        model.k_cache[layer, :, :, pos] = k_new
        model.v_cache[layer, :, :, pos] = v_new
        t0 = time.perf_counter()
        o = cattn.scaled_dot_product_attention(q, model.k_cache[layer], model.v_cache[layer],
                                               enable_gqa=gqa, num_threads=threads)
        times.append(time.perf_counter() - t0)
        return o.reshape(1, -1)
    return attend


def numpy_step(model: Decoder, threads: int) -> Callable[[List[float]], Any]:
    """One step with NumPy projections and cattn's attention; appends attention times."""
    attend = cached_attention(model, threads)

    def step(times: List[float]):
        x = model.x
        for layer in range(model.layers):
            x = x + attend(layer, x @ model.w_qkv, times) @ model.w_out
        return x
    return step


def own_step(model: Decoder, threads: int) -> Callable[[List[float]], Any]:
    """The same step with cattn's own projections (the packed-weight linear layers of its
    BERT encoder, on its OpenMP team: no BLAS thread in the loop); appends attention
    times."""
    from cattn import _encoder_ops as ops
    attend = cached_attention(model, threads)
    packed_qkv = ops.pack_linear_weight(np.ascontiguousarray(model.w_qkv.T))
    packed_out = ops.pack_linear_weight(np.ascontiguousarray(model.w_out.T))
    qkv = np.empty((1, model.w_qkv.shape[1]), np.float32)
    projected = np.empty((1, model.w_out.shape[1]), np.float32)

    def step(times: List[float]):
        x = model.x
        for layer in range(model.layers):
            ops.linear(x, packed_qkv, None, qkv, num_threads=threads)
            ops.linear(attend(layer, qkv, times), packed_out, None, projected,
                       num_threads=threads)
            x = x + projected
        return x
    return step


def torch_step(model: Decoder, threads: int) -> Callable[[List[float]], Any]:
    """The same step in PyTorch (its tensors share the model's memory)."""
    torch = optional("torch")
    F = torch.nn.functional
    gqa = model.kv_heads != HEADS
    pos = model.context - 1
    w_qkv, w_out = torch.from_numpy(model.w_qkv), torch.from_numpy(model.w_out)
    k_cache, v_cache = torch.from_numpy(model.k_cache), torch.from_numpy(model.v_cache)
    x0 = torch.from_numpy(model.x)

    def step(times: List[float]):
        with torch.inference_mode():
            x = x0
            for layer in range(model.layers):
                q, k_new, v_new = model.split(x @ w_qkv)
                k_cache[layer, :, :, pos] = k_new
                v_cache[layer, :, :, pos] = v_new
                t0 = time.perf_counter()
                o = F.scaled_dot_product_attention(q, k_cache[layer], v_cache[layer],
                                                   enable_gqa=gqa)
                times.append(time.perf_counter() - t0)
                x = x + o.reshape(1, -1) @ w_out
            return x
    return step


def back_to_back(step_of_layer: Callable[[int], Any], layers: int, steps: int,
                 times: List[float]) -> None:
    for _ in range(steps):
        for layer in range(layers):
            t0 = time.perf_counter()
            step_of_layer(layer)
            times.append(time.perf_counter() - t0)


def check_attention(model: Decoder, threads: int) -> float:
    """Max abs difference of cattn's attention on layer 0 from the float64 reference."""
    import cattn
    from cattn import reference
    q, _, _ = model.split(model.x @ model.w_qkv)
    k, v = model.k_cache[0], model.v_cache[0]
    got = cattn.scaled_dot_product_attention(q, k, v, enable_gqa=model.kv_heads != HEADS,
                                             num_threads=threads)
    want = reference.scaled_dot_product_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
        enable_gqa=model.kv_heads != HEADS)
    return float(np.abs(got - want).max())


def run_decode_loop_case(name: str, mode: str, config: BenchConfig) -> Case:
    """Every thread count and K/V head count: the loop's rounds, interleaved."""
    import cattn
    from cattn import _kernel, _runtime
    torch = optional("torch")
    context, layers, steps, rounds = CONTEXT[mode], LAYERS[mode], STEPS[mode], ROUNDS[mode]
    x = stream_array(config.stream_mib)
    rows: List[AttentionRow] = []
    skipped: List[SkippedRun] = []
    stream_gbps: Dict[str, float] = {}
    blas_idle: Dict[str, float] = {}
    step_times: Dict[str, List[float]] = {}
    if torch is None:
        skipped.append(SkippedRun("torch", "torch", None, None, "PyTorch not installed"))
    for kv_heads in KV_HEADS:
        model = Decoder(kv_heads, context, layers, config.seed)
        for threads in config.threads:
            restore_blas = blas_threads().limit(threads)
            restore_torch = torch_threads(threads) if torch is not None else (lambda: None)
            try:
                diff = check_attention(model, threads)
                if f"{threads}t" not in blas_idle:  # a property of BLAS and the threads
                    blas_idle[f"{threads}t"] = blas_idle_cores(lambda: model.x @ model.w_qkv)
                runs: Dict[str, List[float]] = {impl: [] for impl in IMPLS}
                stream: List[float] = []
                cattn_step = numpy_step(model, threads)
                cattn_own_step = own_step(model, threads)
                torch_run = torch_step(model, threads) if torch is not None else None
                q = model.split(model.x @ model.w_qkv)[0]
                gqa = kv_heads != HEADS
                tq = torch.from_numpy(q) if torch is not None else None

                def cattn_layer(layer):
                    return cattn.scaled_dot_product_attention(
                        q, model.k_cache[layer], model.v_cache[layer], enable_gqa=gqa,
                        num_threads=threads)

                def torch_layer(layer):
                    return torch.nn.functional.scaled_dot_product_attention(
                        tq, torch.from_numpy(model.k_cache[layer]),
                        torch.from_numpy(model.v_cache[layer]), enable_gqa=gqa)
                cattn_step([])  # (untimed: first touches)
                cattn_own_step([])
                if torch_run is not None:
                    torch_run([])
                for _ in range(rounds):
                    loops = [("cattn-loop", cattn_step), ("cattn-own-loop", cattn_own_step)]
                    if torch_run is not None:
                        loops.append(("torch-loop", torch_run))
                    for impl, run_step in loops:
                        for _ in range(steps):
                            t0 = time.perf_counter()
                            run_step(runs[impl])
                            step_times.setdefault(f"{impl} Hkv={kv_heads} {threads}t", []) \
                                .append((time.perf_counter() - t0) / layers)
                    t0 = time.perf_counter()
                    _kernel.stream_sum(x, threads)
                    stream.append(time.perf_counter() - t0)
                    back_to_back(cattn_layer, layers, steps, runs["cattn-b2b"])
                    if torch_run is not None:
                        back_to_back(torch_layer, layers, steps, runs["torch-b2b"])
            finally:
                restore_torch()
                restore_blas()
            rate = x.nbytes / median(stream)
            stream_gbps[f"Hkv={kv_heads} {threads}t"] = rate / 1e9
            for impl in IMPLS:
                if not runs[impl]:
                    continue
                med = median(runs[impl])
                rows.append(AttentionRow(
                    f"{impl} Hkv={kv_heads}", impl, threads, "attention", med,
                    min(runs[impl]), runs[impl], 1, f"{layers} layers x {steps} steps x "
                    f"{rounds} rounds", options=f"Hkv={kv_heads}",
                    gflops=4.0 * HEADS * context * HEAD_DIM / med / 1e9,
                    gflops_useful=4.0 * HEADS * context * HEAD_DIM / med / 1e9,
                    max_abs_diff=diff if impl.startswith("cattn") else None,
                    kv_gbps=model.kv_bytes / med / 1e9,
                    pct_of_stream=100.0 * model.kv_bytes / med / rate))
        del model
    for r in rows:  # time / cattn's in the loop, same heads and threads
        mine = next((x for x in rows if x.impl == "cattn-loop" and x.threads == r.threads
                     and x.options == r.options), None)
        r.cattn_speedup = None if mine is None else r.median_s / mine.median_s
        one = next((x for x in rows if x.impl == r.impl and x.threads == 1
                    and x.options == r.options), None)
        r.speedup_vs_1t = None if one is None else one.median_s / r.median_s
    spec = {"B": 1, "H": HEADS, "L": 1, "S": context, "E": HEAD_DIM, "dtype": "float32",
            "layers": layers, "steps": steps, "rounds": rounds, "kv_heads": list(KV_HEADS),
            "wait_policy": _runtime.WAIT_POLICY,
            # (per heads and threads: not the thread-keyed ceilings of other cases)
            "stream_read_gbps": stream_gbps,
            # cores the BLAS workers keep busy while idle right after a projection
            "blas_idle_cores": blas_idle,
            "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
            # median time of a whole step per layer, per loop, heads and threads
            "layer_step_s": {k: median(v) for k, v in step_times.items()}}
    return Case(name, "decode_loop", spec, [f"Hkv={h}" for h in KV_HEADS],
                list(config.threads), rows, skipped=skipped)


def format_decode_loop_case(case: Case) -> str:
    spec = case.spec
    out = [f"== {case.name}: decoder step (1,{spec['H']},1,{spec['S']},{spec['E']}) "
           f"float32, {spec['layers']} layers: projections (BLAS) then attention, "
           f"{spec['steps']} steps x {spec['rounds']} rounds; OpenMP wait policy "
           f"{spec['wait_policy']}",
           "   stream read (same run): " + stream_summary(case),
           "   " + blas_idle_summary(case),
           "   whole step per layer (projections + attention): " + step_summary(case),
           f"   {'impl':<15}{'thr':>4} {'heads':<8}{'median':>11}{'KV GB/s':>9}"
           f"{'%stream':>8}{'x cattn':>9}{'vs 1t':>7}{'maxdiff':>10}"]
    for line in decode_loop_lines(case):
        r, sp, vs1 = line
        out.append(f"   {r.impl:<15}{r.threads:>4} {r.options:<8}"
                   f"{r.median_s * 1e3:>8.3f} ms{r.kv_gbps:>9.1f}{r.pct_of_stream:>7.0f}%"
                   f"{sp:>9}{vs1:>7}"
                   f"{'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.1e}':>10}")
    for s in case.skipped:
        out.append(f"   skipped {s.label}: {s.reason}")
    out.append("   (median of one attention call; 'x cattn' = time / cattn-loop's, same "
               "heads and threads)")
    return "\n".join(out)


def blas_idle_summary(case: Case) -> str:
    """The BLAS workers' idle wait, which the next attention call competes with."""
    idle = case.spec.get("blas_idle_cores") or {}
    timeout = case.spec.get("openblas_thread_timeout")
    return ("cores the BLAS workers keep busy while idle right after a projection: " +
            (", ".join(f"{k} {v:.2f}" for k, v in idle.items()) or "-") +
            (f" (OPENBLAS_THREAD_TIMEOUT={timeout})" if timeout else
             " (OPENBLAS_THREAD_TIMEOUT unset: OpenBLAS workers spin ~0.1 s after each call)"))


def step_summary(case: Case) -> str:
    return ", ".join(f"{k} {v * 1e3:.2f} ms"
                     for k, v in (case.spec.get("layer_step_s") or {}).items()) or "-"


def stream_summary(case: Case) -> str:
    return ", ".join(f"{k} {v:.1f} GB/s" for k, v in case.spec["stream_read_gbps"].items())


def decode_loop_lines(case: Case) -> List[Tuple[Any, str, str]]:
    lines = []
    for r in sorted(case.rows, key=lambda r: (r.options, r.threads, IMPLS.index(r.impl))):
        sp = "-" if r.impl == "cattn-loop" or r.cattn_speedup is None else \
            f"{r.cattn_speedup:.2f}x"
        vs1 = "-" if r.speedup_vs_1t is None or r.threads == 1 else f"{r.speedup_vs_1t:.2f}x"
        lines.append((r, sp, vs1))
    return lines


def decode_loop_markdown_table(case: Case) -> List[str]:
    lines = ["Stream read (same run): " + stream_summary(case), "",
             blas_idle_summary(case)[0].upper() + blas_idle_summary(case)[1:] + ".", "",
             "Whole step per layer (projections + attention): " + step_summary(case) + ".",
             "",
             "| impl | threads | heads | median | KV GB/s | % stream | time / cattn-loop's "
             "| vs 1 thread |", "|---|---|---|---|---|---|---|---|"]
    for r, sp, vs1 in decode_loop_lines(case):
        lines.append(f"| {r.impl} | {r.threads} | {r.options} | {r.median_s * 1e3:.3f} ms | "
                     f"{r.kv_gbps:.1f} | {r.pct_of_stream:.0f}% | {sp} | {vs1} |")
    return lines

"""The `transformers` preset: whole models of transformers with attn_implementation = sdpa,
eager and cattn (cattn.integrations.transformers), timed interleaved in one run.

Randomly initialized decoders with real models' attention shapes, two layers and a small
vocabulary (the real embedding tables, 150k-256k rows, would only add one large GEMM):
- Qwen2.5-0.5B (hidden 896, 14 heads, 2 key/value heads, head size 64, its real MLP):
  prefill of 2,048 tokens, and one-token decoding from a static cache holding 2k, 8k or
  16k tokens, in float32 and bfloat16, sdpa / eager / cattn;
- a Gemma-2-2B-shaped stack (8 heads of 256, softcap, a sliding and a full layer) and a
  gpt-oss-20b-shaped one (64 heads, 8 key/value heads, sinks, a 128-token window and a
  full layer), against eager: transformers refuses sdpa for softcaps and ignores sinks in
  it, so eager is what these models run on the CPU. Their MLPs are kept small (the real
  ones, 9216 wide or 32 experts, would hide the attention this compares);
- the bridge's own cost per call at L = S = 16 against a direct cattn call.
"""
import copy
import time
from typing import Any, Dict, List


from cattn.bench.config import BenchConfig
from cattn.bench.timing import Runner, first_call, median, time_round_robin

CONTEXTS = (2048, 8192, 16384)
VOCAB = 1024  # the real embedding tables (150k-256k rows) would only add a large GEMM
IMPLS = ("sdpa", "eager", "cattn")
OVERHEAD_CALLS = 100  # calls per timed batch of the per-call overhead
OVERHEAD_ROUNDS_PER_REP = 20  # interleaved batches of each, per repetition

# name: (config class, options, float32 and bfloat16?, implementations compared,
#        prefill length, decode contexts)
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_attention_heads=14,
        num_key_value_heads=2, num_hidden_layers=2), True, IMPLS, 2048, CONTEXTS),
    "gemma-2-2b": ("Gemma2Config", dict(
        hidden_size=2304, intermediate_size=256, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, num_hidden_layers=2, sliding_window=4096,
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0), False, ("eager", "cattn"), 2048, (8192,)),
    # prefill 1,024: eager's scores of 64 heads at 2,048 would take 1 GiB per copy
    "gpt-oss-20b": ("GptOssConfig", dict(
        hidden_size=2880, intermediate_size=256, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_hidden_layers=2, sliding_window=128,
        num_local_experts=4, num_experts_per_tok=2), False, ("eager", "cattn"), 1024,
        (8192,)),
}


def _models(name: str, dtype, impls):
    """One model per attention implementation, with the same random weights."""
    import torch
    import transformers
    config_class: Any = SHAPES[name][0]
    options: Dict[str, Any] = SHAPES[name][1]  # type: ignore[assignment]
    config = getattr(transformers, config_class)(vocab_size=VOCAB,
                                                  max_position_embeddings=32768, **options)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    base = base.to(dtype).eval()
    models = {}
    for impl in impls:
        model = copy.deepcopy(base)
        model.set_attn_implementation(impl)
        models[impl] = model
    return models


def _thread_setup(threads: int):
    import torch
    import cattn

    def setup():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        cattn.set_num_threads(threads)

        def restore():
            torch.set_num_threads(before)
            cattn.set_num_threads(None)
        return restore
    return setup


def _prefill_call(model, ids):
    import torch

    def call():
        with torch.inference_mode():
            return model(ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
    return call


def _decode_call(model, context: int):
    """One token after `context` cached ones: a static cache filled with random keys and
    values once, its length set back after each call so every call sees the same context."""
    import torch
    import transformers
    config = model.config
    cache = transformers.StaticCache(config=config, max_cache_len=context + 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for layer in range(config.num_hidden_layers):
            k, v = (torch.randn(1, config.num_key_value_heads, context, head_dim,
                                generator=generator).to(model.dtype) for _ in range(2))
            cache.update(k, v, layer)
    token = torch.tensor([[7]])
    position = torch.tensor([[context]])

    def call():
        with torch.inference_mode():
            logits = model(token, position_ids=position, cache=cache, use_cache=True).logits
        for layer in cache.layers:
            layer.crop(-1)
        return logits[:, -1].float()
    return call


class _AttentionClock:
    """Time spent inside the attention functions transformers looks up by name for every
    layer call (`sdpa`, `cattn`; eager's is called directly, so it is not seen): a model
    step's attention share, which bounds what a faster attention can gain on the step."""

    def __init__(self, names):
        import transformers
        self._mapping = transformers.AttentionInterface._global_mapping
        self._original = {n: self._mapping[n] for n in names if n in self._mapping}
        self.seconds = 0.0

    def __enter__(self):
        for name, fn in self._original.items():
            self._mapping[name] = self._timed(fn)
        return self

    def __exit__(self, *exc):
        self._mapping.update(self._original)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    def measure(self, call, spent: List[float]):
        """call, appending the attention seconds of each of its calls to `spent`."""
        def measured():
            before = self.seconds
            try:
                return call()
            finally:
                spent.append(self.seconds - before)
        return measured


def _compare(name: str, kind: str, models: Dict[str, Any], make_call, config: BenchConfig,
             label: str) -> List[Dict[str, Any]]:
    """Time every (implementation, threads) interleaved; each runner's first logits are
    checked against eager's (all start from the same weights), and the time its attention
    functions took inside each step is kept beside the step's."""
    runners: List[Runner] = []
    first: Dict[str, Any] = {}
    attention: Dict[str, List[float]] = {}
    with _AttentionClock(models) as clock:
        for threads in config.threads:
            for impl, model in models.items():
                label_t = f"{impl}/{threads}t"
                attention[label_t] = []
                r = Runner(label_t, impl, threads, kind,
                           clock.measure(make_call(model), attention[label_t]),
                           setup=_thread_setup(threads))
                first[r.label], _ = first_call(r, False)
                runners.append(r)
        config.log(f"  {name} {label}: {len(runners)} runners ")
        time_round_robin(runners, config.reps, config.warmup, log=config.log)
    config.log("\n")
    rows = []
    for r in runners:
        reference = first.get(f"eager/{r.threads}t")
        spent = attention[r.label][-len(r.times):]  # (the timed calls)
        rows.append({"model": name, "case": label, "kind": kind, "impl": r.impl,
                     "threads": r.threads,
                     "median_s": median(r.times),
                     "attention_s": median(spent) if any(spent) else None,
                     "logits_max_diff_vs_eager": None if reference is None else float(
                         (first[r.label] - reference).abs().max())})
    return rows


def _model_rows(name: str, dtype_name: str, config: BenchConfig) -> List[Dict[str, Any]]:
    import torch
    dtype = getattr(torch, dtype_name)
    _, _, _, impls, prefill, contexts = SHAPES[name]
    models = _models(name, dtype, impls)
    rows = []
    ids = torch.randint(0, VOCAB, (1, prefill), generator=torch.Generator().manual_seed(2))
    rows += _compare(name, "prefill", models, lambda m: _prefill_call(m, ids), config,
                     f"{dtype_name} prefill {prefill}")
    for context in contexts[:1] if config.quick else contexts:
        rows += _compare(name, "decode", models, lambda m: _decode_call(m, context), config,
                         f"{dtype_name} decode at " + (
                             f"{context // 1024}k" if context % 1024 == 0 else str(context)))
    for row in rows:
        row["dtype"] = dtype_name
    return rows


def _per_call_overhead(reps: int) -> Dict[str, Any]:
    """The bridge's cost per call over a direct cattn call on the same memory (L = S = 16,
    Qwen2.5-0.5B's heads, causal), both on one thread: short batches of each, interleaved,
    timed by the thread's CPU clock (a loaded machine's waits for a core do not count),
    and the median of the per-round differences."""
    import torch
    import cattn
    from cattn.integrations.transformers import AttentionPattern, cattn_attention_forward

    class Layer:  # what the bridge reads from a transformers attention module
        is_causal = True

    q = torch.randn(1, 14, 16, 64)
    k, v = torch.randn(1, 2, 16, 64), torch.randn(1, 2, 16, 64)
    qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
    pattern = AttentionPattern(True, None, None, "top_left", None, None)
    calls = {
        "direct": lambda: cattn.scaled_dot_product_attention(
            qn, kn, vn, is_causal=True, scale=0.125, enable_gqa=True),
        "bridge": lambda: cattn_attention_forward(Layer(), q, k, v, pattern, scaling=0.125),
    }
    number = OVERHEAD_CALLS
    times: Dict[str, List[float]] = {name: [] for name in calls}
    with cattn.threads(1), torch.inference_mode():
        for name in calls:
            calls[name]()
        for _ in range(OVERHEAD_ROUNDS_PER_REP * max(reps, 5)):
            for name, call in calls.items():
                t0 = time.thread_time()
                for _ in range(number):
                    call()
                times[name].append((time.thread_time() - t0) / number)
    differences = [b - d for b, d in zip(times["bridge"], times["direct"])]
    return {"direct_us": median(times["direct"]) * 1e6,
            "bridge_us": median(times["bridge"]) * 1e6,
            "overhead_us": median(differences) * 1e6,
            "calls": number * len(times["direct"]), "clock": "thread CPU time"}


def run_transformers_preset(config: BenchConfig) -> Dict[str, Any]:
    """Every model case and the per-call overhead (needs torch and transformers)."""
    import torch
    import transformers
    from cattn.integrations.transformers import register
    register()
    rows: List[Dict[str, Any]] = []
    for name, (_, _, both_dtypes, *_) in SHAPES.items():
        for dtype_name in ("float32", "bfloat16") if both_dtypes else ("float32",):
            rows += _model_rows(name, dtype_name, config)
    return {"mode": "quick" if config.quick else "full", "presets": ["transformers"],
            "reps": config.reps, "threads": config.threads,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "transformers_cases": rows, "bridge_overhead": _per_call_overhead(config.reps)}


def format_transformers_cases(result: Dict[str, Any]) -> str:
    """One line per (model, case, threads): each implementation's median time and cattn's
    speedup over the others."""
    lines = ["== transformers models, attn_implementation compared (median s per call; "
             "decode: one token; [attention: the median time inside the attention functions "
             "per step])"]
    grouped: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for row in result["transformers_cases"]:
        grouped.setdefault((row["model"], row["case"], row["threads"]), {})[row["impl"]] = row
    for (model, label, threads), by_impl in grouped.items():
        cattn_row = by_impl.get("cattn")
        parts = [f"{impl} {row['median_s'] * 1e3:9.1f} ms" + (
                     "" if row.get("attention_s") is None
                     else f" [attention {row['attention_s'] * 1e3:.1f}]")
                 for impl, row in by_impl.items()]
        ratios = [f"{by_impl[impl]['median_s'] / cattn_row['median_s']:.2f}x {impl}"
                  for impl in by_impl if impl != "cattn" and cattn_row]
        diff = cattn_row and cattn_row["logits_max_diff_vs_eager"]
        lines.append(f"   {model:13s} {label:24s} {threads}t: " + ", ".join(parts)
                     + (f"; cattn {', '.join(ratios)}" if ratios else "")
                     + ("" if diff is None else f" (logits vs eager {diff:.1e})"))
    overhead = result["bridge_overhead"]
    lines.append(f"   bridge per call at L = S = 16 (14 heads, 2 kv heads, E = 64, 1 thread): "
                 f"direct cattn {overhead['direct_us']:.1f} us, through the bridge "
                 f"{overhead['bridge_us']:.1f} us (medians); +{overhead['overhead_us']:.1f} "
                 f"us (median of {overhead['calls'] // OVERHEAD_CALLS} interleaved rounds' "
                 f"differences, {overhead['clock']})")
    return "\n".join(lines)

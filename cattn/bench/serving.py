"""Serving workloads: shared-prefix decoding against one batched decode over the requests'
concatenated caches (prefix copied into each), timed in the same round-robin."""
from typing import List, Tuple

import numpy as np

from cattn.bench.config import BenchConfig
from cattn.bench.results import Case, WrongOutput
from cattn.bench.specs import Spec, tolerance
from cattn.bench.suite import summarize
from cattn.bench.timing import Runner, admit, first_call, time_round_robin

SHARED_PREFIX = "shared-prefix"
CONCATENATED = "concatenated"


def shared_prefix_shape(mode: str) -> Tuple[int, int, int, int, int]:
    """(requests R, heads H, prefix P, suffix S, head size E): one query token each."""
    return (16, 32, 4096 if mode == "full" else 1024, 128, 128)


def _inputs(R, H, P, S, E, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((R, H, 1, E), dtype=np.float32)
    prefix_k, prefix_v = (rng.standard_normal((H, P, E), dtype=np.float32) for _ in range(2))
    own_k, own_v = (rng.standard_normal((R, H, S, E), dtype=np.float32) for _ in range(2))
    return q, prefix_k, prefix_v, own_k, own_v


def _reference_rows(q, prefix_k, prefix_v, own_k, own_v, requests=(0, -1)):
    """float64 attention of a few requests over their concatenation."""
    from cattn.reference import scaled_dot_product_attention as ref
    return {r: ref(q[r].astype(np.float64),
                   np.concatenate([prefix_k, own_k[r]], axis=1).astype(np.float64),
                   np.concatenate([prefix_v, own_v[r]], axis=1).astype(np.float64))
            for r in requests}


def run_shared_prefix_case(name: str, mode: str, config: BenchConfig) -> Case:
    """cattn.shared_prefix_attention against one batched decode call over the R
    concatenated caches (R copies of the prefix: what serving without sharing reads)."""
    import cattn
    R, H, P, S, E = shared_prefix_shape(mode)
    q, prefix_k, prefix_v, own_k, own_v = _inputs(R, H, P, S, E, config.seed)
    caches_k = np.concatenate([np.broadcast_to(prefix_k, (R, H, P, E)), own_k], axis=2)
    caches_v = np.concatenate([np.broadcast_to(prefix_v, (R, H, P, E)), own_v], axis=2)
    expected = _reference_rows(q, prefix_k, prefix_v, own_k, own_v) if config.check else {}
    spec = Spec(R, H, 1, P + S, E)
    calls = {
        SHARED_PREFIX: lambda t: (lambda: cattn.shared_prefix_attention(
            q, prefix_k, prefix_v, own_k, own_v, num_threads=t)),
        CONCATENATED: lambda t: (lambda: cattn.scaled_dot_product_attention(
            q, caches_k, caches_v, num_threads=t)),
    }
    runners: List[Runner] = []
    wrong: List[WrongOutput] = []
    for t in config.threads:
        for option, make in calls.items():
            r = Runner(f"cattn/{t}t/{option}", "cattn", t, "decode", make(t), spec=spec,
                       work=spec.flops())
            r.spec = _Labelled(spec, option)
            res, t_single = first_call(r, False)
            diff = (max(float(np.abs(res[i] - want).max()) for i, want in expected.items())
                    if expected else None)
            admit(r, t_single, diff, tolerance(np.float32), option, runners, wrong, config)
    config.log(f"  {name}: {len(runners)} runners ")
    time_round_robin(runners, config.reps, config.warmup, log=config.log)
    config.log("\n")
    case = summarize(name, spec, [_Labelled(spec, o) for o in calls], config.threads,
                     runners, [], wrong, "decode")
    case.spec.update(prefix=P, suffix=S, requests=R)
    return case


class _Labelled:
    """A spec whose label is one of this case's two ways of computing it."""

    def __init__(self, spec: Spec, option: str):
        self._spec, self._option = spec, option

    def options(self) -> str:
        return self._option

    def __getattr__(self, name):
        return getattr(self._spec, name)


def format_shared_prefix_case(case: Case) -> str:
    spec = case.spec
    out = [f"== {case.name}: {spec['requests']} requests x 1 token, H={spec['H']} "
           f"E={spec['E']}, shared prefix {spec['prefix']} + own suffix {spec['suffix']} "
           f"keys, float32"]
    rows = {(r.threads, r.options): r for r in case.rows if hasattr(r, "options")}
    for t in case.threads:
        shared, whole = rows.get((t, SHARED_PREFIX)), rows.get((t, CONCATENATED))
        if shared is None or whole is None:
            continue
        out.append(f"   {t}t: shared_prefix_attention {shared.median_s * 1e3:8.2f} ms, one "
                   f"decode over the concatenated caches {whole.median_s * 1e3:8.2f} ms: "
                   f"{whole.median_s / shared.median_s:.2f}x"
                   + ("" if shared.max_abs_diff is None else
                      f" (max abs diff {shared.max_abs_diff:.1e} / "
                      f"{whole.max_abs_diff:.1e})"))
    for w in case.wrong_output:
        out.append(f"   WRONG OUTPUT (not timed) {w.label}: max abs diff {w.max_abs_diff:.3g}")
    return "\n".join(out)

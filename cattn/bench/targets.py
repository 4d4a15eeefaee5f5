"""Performance targets, each named by what it measures, checked against one run's rows."""
from typing import Any, Dict, Iterator, List, Optional, Tuple

from cattn.bench.peers import PEERS
from cattn.bench.results import Case, Check, Target


def _rows(result: Dict[str, Any], workload: Optional[str] = None,
          name_prefix: Optional[str] = None, **match: Any) -> Iterator[Tuple[Case, Any]]:
    for case in result["cases"]:
        if workload is not None and case.workload != workload:
            continue
        if name_prefix is not None and not case.name.startswith(name_prefix):
            continue
        for r in case.rows:
            if all(getattr(r, k, None) == v for k, v in match.items()):
                yield case, r


def _target(tid: str, text: str, checks: List[tuple], unit: str = "x",
            indicative: bool = False) -> Target:
    """checks: [(where, value, threshold, higher_is_better)] -> one target row.
    indicative: measured on other shapes than the target's (a --quick run): no verdict."""
    if not checks:
        return Target(tid, text, "n/a (not in this run)", "n/a")
    details = []
    for where, value, need, higher in checks:
        passed = value is not None and (value >= need if higher else value <= need)
        details.append(Check(where, value, need, passed))
    vals = [d for d in details if d.value is not None]
    ratio = (lambda d: d.value / d.need)  # noqa: E731
    worst = (min(vals, key=ratio) if checks[0][3] else max(vals, key=ratio)) if vals else None
    measured = "n/a" if worst is None else f"worst {worst.value:.2f}{unit} ({worst.where})"
    verdict = "PASS" if all(d.passed for d in details) else "FAIL"
    if indicative:
        verdict = f"({verdict.lower()})"
        measured += " [other shape]"
    return Target(tid, text, measured, verdict, indicative, details)


def _speedup(case: Case, r: Any, peers) -> Optional[float]:
    """cattn's speedup over the fastest of `peers` in the same case/threads/options."""
    best = None
    for p in case.rows:
        if (p.impl in peers and p.threads == r.threads
                and getattr(p, "options", None) == r.options):
            best = p.median_s if best is None else min(best, p.median_s)
    return None if best is None else best / r.median_s


def _cattn_full(case: Case, r: Any) -> Any:
    """cattn's full-attention row at r's thread count in the same case."""
    return next((x for x in case.rows if x.impl == "cattn"
                 and getattr(x, "options", None) == "full" and x.threads == r.threads), None)


def _is_prefill_target_shape(case: Case) -> bool:
    return case.spec["L"] in (1024, 2048, 4096) and case.spec["E"] == 64


def _prefill_targets(result) -> List[Target]:
    f32 = dict(workload="prefill", impl="cattn")
    mid = _is_prefill_target_shape
    full = [(c, r) for c, r in _rows(result, options="full", **f32) if mid(c)]
    causal = [(c, r) for c, r in _rows(result, options="causal", **f32) if mid(c)]
    where = (lambda c, r: f"L={c.spec['L']} {r.threads}t")  # noqa: E731
    out = [_target("prefill-pct-of-sgemm", "non-causal prefill L=S 1024-4096, 1 and 2 "
                   "threads: >=80% of sgemm",
                   [(where(c, r), r.pct_of_gemm, 80.0, True) for c, r in full], "%")]
    out.append(_target("prefill-vs-peers", "non-causal prefill L=S 1024-4096, 1 and 2 "
                       "threads: >=1.15x the faster of torch and ORT",
                       [(where(c, r), _speedup(c, r, PEERS), 1.15, True) for c, r in full
                        if _speedup(c, r, PEERS) is not None]))
    out.append(_target("causal-prefill-vs-torch", "causal prefill L=S 1024-4096: >=1.15x "
                       "torch SDPA",
                       [(where(c, r), _speedup(c, r, ("torch",)), 1.15, True)
                        for c, r in causal if _speedup(c, r, ("torch",)) is not None]))
    out.append(_target("two-thread-scaling", "2 threads >= 1.85x 1 thread at L=S=2048 "
                       "(non-causal)",
                       [(f"L=2048 {r.threads}t", r.speedup_vs_1t, 1.85, True)
                        for c, r in full if c.spec["L"] == 2048
                        and r.speedup_vs_1t is not None]))
    checks = []
    for c, r in full:
        if c.spec["L"] == 2048:
            for peer, need in (("numpy", 1.6), ("torch", 0.9)):
                sp = _speedup(c, r, (peer,))
                if sp is not None:
                    checks.append((f"{r.threads}t vs {peer}", sp, need, True))
    out.append(_target("shape-2048-vs-numpy-torch", "(1,8,2048,2048,64) float32: >=1.6x "
                       "NumPy ref, >=0.9x torch", checks))
    checks = []
    for c, r in causal:
        dense = _cattn_full(c, r)
        if c.spec["L"] == 4096 and dense:
            checks.append((f"{r.threads}t", dense.median_s / r.median_s, 1.8, True))
    out.append(_target("causal-saving", "causal >=1.8x faster than non-causal, L=S=4096 "
                       "H=8 E=64", checks))
    return out


def _encoder_decode_targets(result) -> List[Target]:
    checks = []
    for c, r in _rows(result, workload="encoder", impl="cattn"):
        for peer, need in (("torch", 1.2), ("ort", 1.0)):
            sp = _speedup(c, r, (peer,))
            if sp is not None:
                checks.append((f"L={c.spec['L']} {r.threads}t vs {peer}", sp, need, True))
    out = [_target("encoder-vs-peers", "encoder B=8 H=12 L=128/384: >=1.2x torch and "
                   ">=1.0x ORT", checks,
                   indicative=not any(c.spec["L"] == 384 for c, _ in
                                      _rows(result, workload="encoder")))]
    out.append(_target("tiny-call-time", "tiny case L=S=5 E=64: < 10 us per call",
                       [(f"{r.threads}t", r.median_s * 1e6, 10.0, False)
                        for c, r in _rows(result, workload="tiny", impl="cattn")], " us"))
    out.append(_target("float64-pct-of-dgemm", "float64 prefill L=S 1024-4096: >=80% of "
                       "dgemm",
                       [(f"L={c.spec['L']} {r.threads}t", r.pct_of_gemm, 80.0, True)
                        for c, r in _rows(result, workload="float64", impl="cattn")], "%",
                       indicative=not any(_is_prefill_target_shape(c) for c, _ in
                                          _rows(result, workload="float64"))))
    checks = []
    for c, r in _rows(result, workload="decode", impl="cattn"):
        if r.pct_of_stream is not None:
            checks.append((f"{r.threads}t %stream", r.pct_of_stream, 80.0, True))
        for peer in PEERS:
            sp = _speedup(c, r, (peer,))
            if sp is not None:
                checks.append((f"{r.threads}t vs {peer} (x100)", sp * 100, 100.0, True))
    out.append(_target("decode-bandwidth", "decode H=32 S=4096 E=128: K+V read >=80% of "
                       "stream rate, faster than torch and ORT, in %", checks, "%"))
    return out


def _paged_targets(result) -> List[Target]:
    checks = []
    for c, r in _rows(result, workload="paged", impl="cattn"):
        contiguous = _cattn_full(c, r)
        if r.options.startswith("paged=") and contiguous:
            checks.append((f"{r.options} {r.threads}t", 100.0 * contiguous.median_s /
                           r.median_s, 90.0, True))
    return [_target("paged-decode-speed", "decode H=32 S=4096 E=128 from pages of 16 and "
                    "256 positions: >=90% of the contiguous decode's speed", checks, "%")]


def _memory_and_variant_targets(result) -> List[Target]:
    out = [_target("long-sequence-memory", "extra memory at L=S=16384, 1 head, E=64: "
                   "< 64 MiB (incl. the 4 MiB output)",
                   [(f"{r.threads}t RSS", r.peak_rss_mib, 64.0, False)
                    for c, r in _rows(result, workload="memory", impl="cattn")
                    if c.spec["L"] == 16384], " MiB")]
    for tid, prefix, opt, need, text, higher, target_L in (
            ("window-saving", "window", "window=256,0", 10.0,
             "window (256, 0) >=10x faster than full attention at L=S=8192", True, 8192),
            ("weights-cost", "weights", "weights", 2.0,
             "return_weights <= 2x the cost without, L=S=1024", False, 1024),
            ("sinks-cost", "sinks", "sinks", 1.03,
             "attention sinks <= 1.03x the cost without, L=S=2048", False, 2048)):
        checks = []
        for c, r in _rows(result, workload="variants", name_prefix=prefix, impl="cattn",
                          options=opt):
            dense = _cattn_full(c, r)
            if dense:
                ratio = (dense.median_s / r.median_s if higher
                         else r.median_s / dense.median_s)
                checks.append((f"L={c.spec['L']} {r.threads}t", ratio, need, higher))
        other = any(c.spec["L"] != target_L for c, _ in
                    _rows(result, workload="variants", name_prefix=prefix))
        out.append(_target(tid, text, checks, indicative=other))
    return out


def _varlen_targets(result) -> List[Target]:
    """The packed call against the padded batch: cattn's dense call with key_lengths, and
    PyTorch SDPA with a mask, same run, same options and threads."""
    out = []
    for tid, peer, need in (("varlen-vs-padded", "cattn-padded", 1.5),
                            ("varlen-vs-torch-padded", "torch-padded", 1.2)):
        checks = [(f"{r.options} {r.threads}t", r.cattn_speedup, need, True)
                  for c, r in _rows(result, workload="varlen", impl=peer)
                  if r.cattn_speedup is not None]
        quick = any(c.spec["length_range"][1] != 1024
                    for c, _ in _rows(result, workload="varlen"))
        text = (f"16 sequences, lengths log-uniform 16-1024, H=12 E=64, causal and not: "
                f">={need}x faster than {peer.replace('-padded', '')} on the padded batch"
                + (" with key_lengths" if peer == "cattn-padded" else " with a mask"))
        out.append(_target(tid, text, checks, indicative=quick))
    return out


def _mixed_paged_targets(result) -> List[Target]:
    """One call over a mixed paged batch against one call per sequence, same run."""
    checks = [(f"{r.threads}t", r.cattn_speedup, 1.3, True)
              for c, r in _rows(result, workload="paged", impl="cattn-per-sequence")
              if r.cattn_speedup is not None
              and getattr(r, "options", None) == f"chunk={c.spec.get('chunk')}"]
    quick = any(c.spec.get("decode_len") != 1024 for c, _ in
                _rows(result, workload="paged", impl="cattn-mixed"))
    return [_target("paged-mixed-batch", "8 sequences decoding + 1 prefilling 512 queries "
                    "over pages of 16, Hq=32 Hkv=8 E=128: one call >=1.3x faster than one "
                    "call per sequence", checks, indicative=quick)]


def _serving_targets(result) -> List[Target]:
    checks = []
    for c, r in _rows(result, workload="serving", impl="cattn", options="shared-prefix"):
        whole = next((x for x in c.rows if getattr(x, "options", None) == "concatenated"
                      and x.threads == r.threads), None)
        if whole is not None:
            checks.append((f"{r.threads}t", whole.median_s / r.median_s, 4.0, True))
    return [_target("shared-prefix-speedup", "16 requests x 1 token, shared prefix 4096 + "
                    "own 128 keys, H=32 E=128: >=4x one decode over the concatenated caches",
                    checks, indicative=any(c.spec.get("prefix") != 4096 for c, _ in
                                           _rows(result, workload="serving")))]


def _narrow_targets(result) -> List[Target]:
    """float16, bfloat16 and int8 keys and values against cattn's own float32 rows and
    torch SDPA in the same dtype, same run and threads."""
    decode_checks, decode_peer, prefill_peer, prefill_own = [], [], [], []
    for c, r in _rows(result, workload="decode", impl="cattn"):
        dense = _cattn_full(c, r)
        need = {"float16": 1.8, "bfloat16": 1.8, "int8-kv": 3.0}.get(r.options)
        if dense is not None and need is not None:
            decode_checks.append((f"{r.options} {r.threads}t", dense.median_s / r.median_s,
                                  need, True))
        if r.options in ("float16", "bfloat16") and _speedup(c, r, ("torch",)) is not None:
            decode_peer.append((f"{r.options} {r.threads}t", _speedup(c, r, ("torch",)), 1.2,
                                True))
    native_bf16 = any(p in _supported_paths() for p in ("amx", "avx512_bf16"))
    for c, r in _rows(result, workload="prefill", impl="cattn"):
        if r.options not in ("float16", "bfloat16") or not _is_prefill_target_shape(c):
            continue
        where = f"{r.options} L={c.spec['L']} {r.threads}t"
        if _speedup(c, r, ("torch",)) is not None:
            prefill_peer.append((where, _speedup(c, r, ("torch",)), 1.15, True))
        dense = _cattn_full(c, r)
        if r.options == "bfloat16" and dense is not None:
            prefill_own.append((where, dense.median_s / r.median_s,
                                2.0 if native_bf16 else 0.9, True))
    return [_target("narrow-decode-vs-float32", "decode H=32 S=4096 E=128: float16 and "
                    "bfloat16 caches >=1.8x cattn's float32 decode, int8 >=3x",
                    decode_checks),
            _target("narrow-decode-vs-torch", "decode H=32 S=4096 E=128: float16 and "
                    "bfloat16 caches >=1.2x torch SDPA in the same dtype", decode_peer),
            _target("narrow-prefill-vs-torch", "prefill L=S 1024-4096 H=8 E=64, float16 and "
                    "bfloat16: >=1.15x torch SDPA in the same dtype", prefill_peer),
            _target("bf16-prefill-vs-float32", "bfloat16 prefill L=S 1024-4096: >=2x cattn's "
                    "float32 with AMX-BF16 or AVX512-BF16, >=0.9x without", prefill_own)]


def _grouped_targets(result) -> List[Target]:
    """The grouped case's decodes against the same run's stream read (Hkv = 8: K/V bound)
    and its prefill's GFLOP/s (Hkv = 1 and latent attention: 32 and 128 query rows a K/V
    row, compute bound), same threads."""
    rows = list(_rows(result, workload="grouped", impl="cattn"))
    other = any(c.spec["S"] != 8192 for c, _ in rows)
    return [_target("grouped-decode-stream", "decode Hq=32 over Hkv=8 K/V heads, S=8192 "
                    "E=128, 1 and 2 threads: K/V read >=60% of the stream rate",
                    [(f"{r.threads}t", r.pct_of_stream, 60.0, True) for c, r in rows
                     if r.options == "Hkv=8" and r.pct_of_stream is not None], "%",
                    indicative=other),
            _target("grouped-decode-gemm-rate", "decode Hq=32 over one K/V head (S=8192 "
                    "E=128) and latent attention (128 heads over one 576-wide K/V head, "
                    "S=4096): >=50% of the same run's prefill GFLOP/s",
                    [(f"{r.options} {r.threads}t", r.pct_of_prefill, 50.0, True)
                     for c, r in rows if r.options in ("Hkv=1", "Hkv=1+mla")
                     and r.pct_of_prefill is not None], "%", indicative=other)]


def _supported_paths() -> Tuple[str, ...]:
    from cattn import _kernel
    return tuple(_kernel.supported_isa_paths())


def check_targets(result: Dict[str, Any]) -> List[Target]:
    """Every target's verdict in this run: PASS, FAIL, n/a (no data), or in parentheses
    when measured on other shapes than the target's (indicative only)."""
    return (_prefill_targets(result) + _encoder_decode_targets(result)
            + _memory_and_variant_targets(result) + _varlen_targets(result)
            + _mixed_paged_targets(result)
            + _serving_targets(result) + _paged_targets(result) + _narrow_targets(result)
            + _grouped_targets(result))


def format_targets(targets: List[Target]) -> str:
    width = max([len(t.id) for t in targets] + [6])
    lines = ["== targets", f"   {'target':<{width}} {'verdict':<7} {'measured':<44} asks"]
    for t in targets:
        lines.append(f"   {t.id:<{width}} {t.verdict:<7} {t.measured:<44} {t.target}")
    if any(t.indicative for t in targets):
        lines.append("   (verdicts in parentheses: measured on smaller shapes than the "
                     "target's, e.g. --quick; indicative only)")
    lines.append(targets_summary(targets))
    return "\n".join(lines)


def targets_summary(targets: List[Target]) -> str:
    """One plain line under the table: how many targets were met, missed, only indicated
    or not measured, and what a miss means (speed goals, not wrong results)."""
    def count(verdict):
        return sum(t.verdict == verdict for t in targets)
    measured = count("PASS") + count("FAIL")
    parts = [f"{count('PASS')} of {measured} targets measured at their shapes met"]
    if count("(pass)") + count("(fail)"):
        parts.append(f"{count('(pass)')} of {count('(pass)') + count('(fail)')} indicative "
                     f"ones met on smaller shapes")
    if count("n/a"):
        parts.append(f"{count('n/a')} not measured in this run")
    return ("   summary: " + "; ".join(parts) + ". Targets are speed goals, measured on "
            "this machine under its current load: a FAIL is slower than the goal, not a wrong "
            "result (wrong outputs are reported above as WRONG OUTPUT).")

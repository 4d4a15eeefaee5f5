"""Reports: the tables printed while the run goes, the header, Markdown, JSON and the plot."""
import json
import math
import os
import textwrap
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from cattn.bench.peers import ALL_IMPLS
from cattn.bench.results import Case, JsonRow
from cattn.bench.specs import tolerance


def _fmt(x, spec="{:.1f}", none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _fmt_load(x) -> str:
    return "-" if not x else "/".join(f"{v:.1f}" for v in x)


def _attention_rows(case: Case) -> List[Any]:
    """The case's attention rows (not the ceilings), by options (a grouped case's in the
    order of its specs, the prefill yardstick last), threads, implementation."""
    rows = [r for r in case.rows if r.kind not in ("gemm", "stream")]
    order = case.options.index if case.kind == "grouped" else (lambda options: options)
    rows.sort(key=lambda r: (order(r.options), r.threads, ALL_IMPLS.index(r.impl)))
    return rows


def _ceilings(case: Case) -> List[str]:
    gemm = "sgemm" if case.spec["dtype"] == "float32" else "dgemm"
    return ([f"{gemm} {t}t {g:.1f} GFLOP/s" for t, g in case.gemm_gflops.items()]
            + [f"stream read {t}t {g:.1f} GB/s ({(case.stream_probe or {}).get(t)})"
               for t, g in case.stream_gbps.items()])


def format_header(info: Dict[str, Any]) -> str:
    """Where the run happens: CPU model and SIMD flags, and the instruction set each
    implementation's kernels run on."""
    isa = info.get("isa", {})
    flags = "+".join(info.get("simd_flags", [])) or "flags unknown"
    line = [f"cattn benchmark on {info.get('cpu_model') or 'an unknown CPU'} ({flags}), "
            f"{info.get('usable_cpus')} usable cores",
            f"kernels: cattn {isa.get('cattn') or 'unknown'}"]
    if "torch" in isa:
        line[1] += f", torch {isa['torch'] or 'unknown'}"
    return "\n".join(line + ceiling_lines(info))


def ceiling_lines(info: Dict[str, Any]) -> List[str]:
    """The compute ceilings beside the library GEMM: the register-only FMA peak, and the
    GEMM library with the core type its kernels were chosen for."""
    lines = []
    peaks = info.get("fma_peak_gflops") or {}
    if peaks:
        lines.append("FMA peak (registers only, measured): "
                     + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    for lib in info.get("gemm_libraries") or []:
        lines.append(f"GEMM library: {lib.get('internal_api')} {lib.get('version')} "
                     f"(core type {lib.get('architecture') or 'unknown'}, "
                     f"{lib.get('threading_layer') or 'threads unknown'})")
    if info.get("openblas_coretype"):
        lines.append(f"OPENBLAS_CORETYPE={info['openblas_coretype']} is set: OpenBLAS runs "
                     "that core type's kernels, which can put its sgemm (the %gemm ceiling) "
                     "below what this CPU does; the FMA peak is the hard ceiling")
    return lines


# what a grouped case's figures count (float32: 4 bytes an element)
GROUPED_NOTE = ("GFLOP/s: 2*H*L*S*(E + Ev); KV GB/s: the K/V bytes read, Hkv*S*(E + Ev)*4, "
                "the keys once where the values are a view of them; %pref: GFLOP/s as % of "
                "cattn's prefill at the same threads")


def _figure_columns(kind: str) -> List[Tuple[str, Optional[str], int, Callable[[Any], str]]]:
    """The figures a kind of case reports: (table title, Markdown title, width, text)."""
    gflops = ("GFLOP/s", "GFLOP/s", 9, lambda r: _fmt(r.gflops))
    kv = ("KV GB/s", "KV GB/s", 9, lambda r: _fmt(r.kv_gbps))
    stream = ("%strm", "% stream", 7, lambda r: _fmt(r.pct_of_stream, "{:.0f}%"))
    if kind == "decode":
        return [kv, stream]
    if kind == "grouped":
        return [gflops, kv, stream,
                ("%pref", "% prefill", 7, lambda r: _fmt(r.pct_of_prefill, "{:.0f}%"))]
    return [gflops, ("%gemm", "% gemm", 7, lambda r: _fmt(r.pct_of_gemm, "{:.0f}%")),
            ("useful", None, 8,
             lambda r: _fmt(r.gflops_useful if r.options != "full" else None))]


def _shape_text(spec: Dict[str, Any]) -> str:
    return f"B={spec['B']} H={spec['H']} L={spec['L']} S={spec['S']} E={spec['E']}"


def spec_text(spec: Dict[str, Any]) -> str:
    """One Spec's shape as a reader wants it (from its JSON): B, H, L, S, E, the K/V heads
    and the values when they are not the plain ones."""
    text = _shape_text(spec)
    if spec.get("kv_heads") is not None:
        text += f", {spec['kv_heads']} K/V head{'s' if spec['kv_heads'] > 1 else ''}"
    if spec.get("value_width") is not None:
        text += f", values v = k[..., :{spec['value_width']}] (a view)"
    return text


def format_case(case: Case) -> str:
    spec = case.spec
    if "specs" in spec:  # specs of several shapes in one round-robin
        out = [f"== {case.name}: {spec['dtype']}, in one round-robin:"]
        out += [f"   {s['options']:<16}{spec_text(s)}" for s in spec["specs"]]
    else:
        out = [f"== {case.name}: {spec_text(spec)} {spec['dtype']}"]
    if _ceilings(case):
        out.append("   ceiling (same run): " + ", ".join(_ceilings(case)))
    columns = _figure_columns(case.kind)
    out.append(f"   {'impl':<11}{'thr':>4} {'options':<16}{'median':>11}"
               + "".join(f"{title:>{width}}" for title, _, width, _ in columns)
               + f"{'cattn x':>8}{'vs 1t':>7}{'maxdiff':>10}{'peakMiB':>9}")
    rows = _attention_rows(case)
    for r in rows:
        line = (f"   {r.impl:<11}{r.threads:>4} {r.options:<16}{_fmt_time(r.median_s):>11}"
                + "".join(f"{text(r):>{width}}" for _, _, width, text in columns))
        sp = r.cattn_speedup if r.impl != "cattn" else None
        line += (f"{_fmt(sp, '{:.2f}x'):>8}{_fmt(r.speedup_vs_1t, '{:.2f}x'):>7}"
                 f"{_fmt(r.max_abs_diff, '{:.1e}'):>10}"
                 f"{_fmt(r.peak_extra_mib, '{:.1f}', 'n/a'):>9}")
        out.append(line)
    for s in case.skipped:
        out.append(f"   skipped {s.label}: {s.reason}")
    for w in case.wrong_output:
        out.append(f"   WRONG OUTPUT (not timed) {w.label}: max abs diff "
                   f"{w.max_abs_diff:.3g} > tolerance {tolerance(spec['dtype']):g}"
                   + (" (less precise than float64)" if spec["dtype"] == "float64" else ""))
    if any(r.options != "full" for r in rows) and case.kind == "attention":
        out.append("   (GFLOP/s is dense-equivalent 4*B*H*L*S*E for masked options; "
                   "'useful' counts visible pairs only)")
    if case.kind == "grouped":
        out += textwrap.wrap(f"({GROUPED_NOTE})", 90, initial_indent="   ",
                             subsequent_indent="   ")
    out.append("   (cattn x = peer time / cattn time at the same threads and options)")
    return "\n".join(out)


def format_memory_case(case: Case) -> str:
    spec = case.spec
    out = [f"== {case.name}: B={spec['B']} H={spec['H']} L={spec['L']} S={spec['S']} "
           f"E={spec['E']} {spec['dtype']}, peak extra memory (fresh process per impl)",
           f"   {'impl':<11}{'thr':>4} {'options':<16}{'RSS MiB':>9}{'traced MiB':>12}"]
    for r in case.rows:
        out.append(f"   {r.impl:<11}{r.threads:>4} {r.options:<16}"
                   f"{r.peak_rss_mib:>9.1f}{_fmt(r.peak_traced_mib, '{:.1f}', 'n/a'):>12}")
    for s in case.skipped:
        out.append(f"   skipped {s.label}: {s.reason}")
    out.append("   (RSS: peak resident memory above inputs/imports over two calls, output "
               "and one-time allocations such as ORT's arena included; traced: tracemalloc, "
               "NumPy allocations only)")
    return "\n".join(out)


def format_block_gemm_case(case: Case) -> str:
    out = [f"== {case.name}: BLAS on the kernel's block shapes (m x k x n), "
           f"{case.threads[0]} thread, vs the large sgemm of the same round-robin",
           f"   {'m x k x n':<14}{'GFLOP/s':>9}{'%sgemm':>8}"]
    for r in case.rows:
        out.append(f"   {r.label:<14}{r.gflops:>9.1f}{r.pct_of_gemm:>7.0f}%")
    return "\n".join(out)


def _markdown_table(case: Case) -> List[str]:
    if case.kind == "blockgemm":
        return (["| m x k x n | GFLOP/s | % of the large sgemm |", "|---|---|---|"]
                + [f"| {r.label} | {r.gflops:.1f} | {r.pct_of_gemm:.0f}% |"
                   for r in case.rows])
    if case.kind == "memory":
        return (["| impl | threads | options | peak extra RSS MiB | traced MiB |",
                 "|---|---|---|---|---|"]
                + [f"| {r.impl} | {r.threads} | {r.options} | {r.peak_rss_mib:.1f} | "
                   f"{_fmt(r.peak_traced_mib, '{:.1f}', 'n/a')} |" for r in case.rows])
    if case.kind == "varlen":
        from cattn.bench.varlen import varlen_markdown_table
        return varlen_markdown_table(case)
    if case.kind == "position_bias":
        from cattn.bench.position_bias import position_bias_markdown_table
        return position_bias_markdown_table(case)
    if case.kind == "mixed_paged":
        return (["| chunk | impl | threads | median | time / cattn-mixed's | max abs diff |",
                 "|---|---|---|---|---|---|"]
                + [f"| {r.options} | {r.impl} | {r.threads} | {r.median_s * 1e3:.2f} ms | "
                   f"{_fmt(r.cattn_speedup, '{:.2f}x', '-')} | "
                   f"{_fmt(r.max_abs_diff, '{:.1e}', '-')} |" for r in case.rows])
    if case.kind == "decode_loop":
        from cattn.bench.decode_loop import decode_loop_markdown_table
        return decode_loop_markdown_table(case)
    columns = [(title, text) for _, title, _, text in _figure_columns(case.kind) if title]
    lines = ["| impl | threads | options | median | "
             + "".join(f"{title} | " for title, _ in columns)
             + "cattn speedup | vs 1 thread | max abs diff |",
             "|---" * (len(columns) + 7) + "|"]
    for r in _attention_rows(case):
        sp = r.cattn_speedup if r.impl != "cattn" else None
        lines.append(f"| {r.impl} | {r.threads} | {r.options} | {_fmt_time(r.median_s)} | "
                     + "".join(f"{text(r)} | " for _, text in columns)
                     + f"{_fmt(sp, '{:.2f}x')} | {_fmt(r.speedup_vs_1t, '{:.2f}x')} | "
                     f"{_fmt(r.max_abs_diff, '{:.1e}')} |")
    return lines


def format_markdown(result: Dict[str, Any]) -> str:
    """The run as Markdown (for benchmarks/RESULTS.md): machine, tables, targets."""
    m = result["machine"]
    v = m.get("versions", {})
    lines = [f"Command: `{' '.join(['python -m cattn.bench'] + m.get('argv', [])[1:])}`  ",
             f"Date: {m.get('date')}, elapsed {result.get('elapsed_s', 0):.0f} s, "
             f"load average at start/end {_fmt_load(m.get('loadavg_start'))} / "
             f"{_fmt_load(m.get('loadavg_end'))}  ",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cpus')} cores, "
             f"{'+'.join(m.get('simd_flags', []))}  ",
             "Kernels: " + ", ".join(f"{k} {val}" for k, val in m.get("isa", {}).items())
             + "  ",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "  ",
             f"cattn: `{m.get('cattn_config')}`  ",
             *[f"{line}  " for line in ceiling_lines(m)],
             f"Reps: median of {result.get('reps')} timed round-robin reps per case; GEMM "
             f"ceiling {result.get('gemm_n')}^3.", ""]
    if "cases" not in result:  # (the dask and transformers presets: their own table)
        return "\n".join(lines + ["```", result.get("table_text", ""), "```"])
    for case in result["cases"]:
        spec = case.spec
        if "B" in spec and "specs" not in spec:
            lines.append(f"### {case.name} ({_shape_text(spec)} {spec['dtype']})")
        else:
            lines.append(f"### {case.name} ({spec['dtype']})")
        lines.append("")
        if "specs" in spec:
            lines += [f"- {s['options']}: {spec_text(s)}" for s in spec["specs"]] + [""]
        if _ceilings(case):
            lines += ["Same-run ceiling: " + ", ".join(_ceilings(case)), ""]
        lines += _markdown_table(case)
        if case.kind == "attention" and any(o != "full" for o in case.options):
            lines.append("\nGFLOP/s of masked options (causal, window) is dense-equivalent "
                         "(4·B·H·L·S·E / time); the JSON also has the useful GFLOP/s.")
        if case.kind == "grouped":
            lines.append(f"\n{GROUPED_NOTE}.")
        for s in case.skipped:
            lines.append(f"\nSkipped {s.label}: {s.reason}")
        for w in case.wrong_output:
            lines.append(f"\nWrong output, not timed: {w.label} (max abs diff "
                         f"{w.max_abs_diff:.3g})")
        lines.append("")
    if result.get("targets"):
        lines += ["### Targets", "", "| target | what it asks | measured | verdict |",
                  "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t.id} | {t.target} | {t.measured} | {t.verdict} |")
        lines.append("")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, JsonRow):
        return value.to_json()
    return float(value)


def write_json(result: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)


def plot(result: Dict[str, Any], path: str) -> str:
    """GFLOP/s against sequence length (prefill, float32, E = 64) per thread count, with the
    sgemm ceiling of the same run. Returns a message (matplotlib is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "plot: skipped (matplotlib not installed: pip install 'cattn[plot]')"
    cases = [c for c in result["cases"] if c.workload == "prefill" and c.spec["E"] == 64]
    if not cases:
        return "plot: skipped (no prefill cases in this run)"
    threads = sorted({r.threads for c in cases for r in c.rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads) + 1.5, 4.5),
                             squeeze=False)  # own y scale: 2 threads reach ~2x
    colors = {"cattn": "C0", "cattn-avx2": "C4", "numpy": "C1", "torch": "C2", "ort": "C3"}
    for ax, t in zip(axes[0], threads):
        for impl in ALL_IMPLS:
            for opt, style, key in (("full", "-", "gflops"),
                                    ("causal", "--", "gflops_useful")):
                pts = sorted((c.spec["L"], getattr(r, key)) for c in cases for r in c.rows
                             if r.impl == impl and r.threads == t
                             and getattr(r, "options", None) == opt)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colors[impl],
                            label=f"{impl} {opt}")
        ceil = sorted((c.spec["L"], c.gemm_gflops[str(t)]) for c in cases
                      if c.gemm_gflops.get(str(t)))
        if ceil:
            g = float(np.median([x[1] for x in ceil]))
            ax.axhline(g, color="k", linestyle=":", label=f"sgemm {result.get('gemm_n')}^3 "
                       f"(median {g:.0f})")
            ax.plot(*zip(*ceil), "k:", marker="x", alpha=0.5,
                    label="sgemm, each case's round-robin")
        ax.set_xscale("log", base=2)
        lengths = sorted({c.spec["L"] for c in cases})
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(x) for x in lengths])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length L = S (B=1, H=8, E=64, float32)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("GFLOP/s (4*B*H*E*visible pairs / time)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    cpu = result["machine"].get("cpu_model", "")
    fig.suptitle(f"cattn benchmark ({result.get('mode')}), {cpu}: B=1 H=8 E=64 float32; "
                 "causal counts only visible (query, key) pairs", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"

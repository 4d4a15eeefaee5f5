"""Smoke tests of the benchmark (cattn.bench): CLI, JSON, checks, targets. Tiny sizes, fast."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cattn import bench
from cattn.bench import peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--threads", "1", "--impls", "cattn,numpy", "--reps", "5", "--warmup", "0",
         "--gemm-n", "128", "--plot", "-"]


def test_cli_single_shape_json(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cattn.bench", "--shape", "1,2,32,48,16",
                           "--causal", "--json", str(out)] + SMALL,
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "cattn" in proc.stdout and "sgemm" in proc.stdout
    assert proc.stdout.startswith("cattn benchmark on ")  # the header: CPU and kernels
    result = json.loads(out.read_text())
    assert result["mode"] == "shape"
    assert "cpu_model" in result["machine"] or "platform" in result["machine"]
    assert result["machine"]["isa"]["cattn"]  # the ISA path cattn's kernel runs on
    assert result["machine"]["versions"]["numpy"] == np.__version__
    case = result["cases"][0]
    assert case["spec"]["causal"] is True and case["spec"]["S"] == 48
    labels = {r["label"] for r in case["rows"]}
    assert {"cattn/1t/causal", "numpy/1t/causal", "sgemm/1t"} <= labels
    for r in case["rows"]:
        assert len(r["times_s"]) == 5 and r["median_s"] > 0
        if r["kind"] == "attention":
            assert r["max_abs_diff"] < 1e-4
            assert r["gflops_useful"] < r["gflops"]  # causal: fewer visible pairs
    numpy_row = next(r for r in case["rows"] if r["impl"] == "numpy")
    assert numpy_row["cattn_speedup"] > 0 and numpy_row["peak_extra_mib"] > 0


def test_suite_tiny_preset_and_targets(tmp_path, capsys):
    out = tmp_path / "t.json"
    result = bench.main(["--preset", "tiny", "--json", str(out)] + SMALL)
    text = capsys.readouterr().out
    assert "targets" in text and "tiny-call-time" in text
    saved = json.loads(out.read_text())
    assert [c["name"] for c in saved["cases"]] == ["tiny L=S=5"]
    tiny = next(t for t in saved["targets"] if t["id"] == "tiny-call-time")
    assert tiny["verdict"] in ("PASS", "FAIL") and tiny["details"]
    assert set(tiny["details"][0]) == {"where", "value", "need", "pass"}
    rows = saved["cases"][0]["rows"]
    assert all(r["calls_per_timing"] > 1 for r in rows)  # many calls per timing
    assert "pct_of_stream" not in rows[0]  # decode-only fields stay out of other rows
    # Targets without data in this run say so instead of passing.
    prefill = next(t for t in result["targets"] if t.id == "prefill-pct-of-sgemm")
    assert prefill.verdict == "n/a"


def test_wrong_peer_is_not_timed(monkeypatch):
    def make_wrong(spec, q, k, v, threads, config):
        return (lambda: np.zeros_like(q)), (lambda res: res), None, ""
    monkeypatch.setitem(bench.MAKERS, "torch", make_wrong)
    case = bench.run_case("wrong", [bench.Spec(1, 1, 16, 16, 8)],
                          bench.BenchConfig(impls=["cattn", "torch"], reps=5, warmup=0),
                          ceiling=False)
    assert [w.impl for w in case.wrong_output] == ["torch"]
    assert {r.impl for r in case.rows} == {"cattn"}


def test_missing_peer_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(peers._OPTIONAL, "torch", None)
    case = bench.run_case("skip", [bench.Spec(1, 1, 8, 8, 8)],
                          bench.BenchConfig(impls=["cattn", "torch"], reps=5, warmup=0),
                          ceiling=False)
    assert case.skipped and "not installed" in case.skipped[0].reason
    assert "skipped torch" in bench.format_case(case)


def test_decode_reports_bandwidth(monkeypatch):
    monkeypatch.setitem(peers._OPTIONAL, "torch", None)  # NumPy probe only: no torch import
    config = bench.BenchConfig(impls=["cattn"], reps=5, warmup=0, stream_mib=8)
    case = bench.run_case("decode", [bench.Spec(1, 2, 1, 256, 32)], config, ceiling=False,
                          stream=True, kind="decode")
    row = next(r for r in case.rows if r.impl == "cattn")
    assert row.kv_gbps > 0 and row.pct_of_stream > 0
    assert case.stream_gbps["1"] > 0
    assert row.to_json()["pct_of_stream"] == row.pct_of_stream


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flops_and_visible_pairs(dtype):
    s = bench.Spec(2, 3, 4, 4, 8, dtype, causal=True)
    assert s.flops() == 4 * 2 * 3 * 4 * 4 * 8
    assert s.visible_pairs() == 10  # 1 + 2 + 3 + 4
    assert s.kv_bytes() == 2 * 2 * 3 * 4 * 8 * np.dtype(dtype).itemsize


def test_rss_memory_probe_and_markdown():
    case = bench.run_memory_case("mem", [bench.Spec(1, 2, 64, 64, 16)], ["cattn"])
    if case.skipped:
        pytest.skip(case.skipped[0].reason)
    row = case.rows[0]
    assert row.peak_rss_mib >= 0 and row.peak_traced_mib > 0
    assert "RSS MiB" in bench.format_memory_case(case)
    result = {"machine": bench.machine_info(), "cases": [case], "reps": 5, "gemm_n": 128}
    result["targets"] = bench.check_targets(result)
    md = bench.format_markdown(result)
    assert "| cattn |" in md and "### Targets" in md


def test_block_gemm_case():
    case = bench.run_block_gemm_case("blocks", reps=5, warmup=0, gemm_n=128,
                                     flops_per_call=2e5)
    assert {r.label for r in case.rows} >= {"128x64x512", "sgemm/1t"}
    assert all(r.gflops > 0 for r in case.rows)
    assert "128x64x64" in bench.format_block_gemm_case(case)
    md = bench.format_markdown({"machine": {}, "cases": [case]})
    assert "| 128x64x512 |" in md


def test_cpu_description_without_proc(monkeypatch):
    """No /proc/cpuinfo (another OS, a sandbox): the machine info still builds."""
    from cattn.bench import probes
    real_open = open

    def no_cpuinfo(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", no_cpuinfo)
    monkeypatch.setattr(probes.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(
        OSError("no lscpu")))
    info = probes.cpu_description()
    assert set(info) <= {"cpu_model", "cpu_flags", "simd_flags"} and "cpu_model" in info


def test_prefill_preset_has_head_size_128():
    cases = bench.WORKLOADS["prefill"]("quick")
    assert {spec.E for _, specs, _ in cases for spec in specs} == {64, 128}


def test_varlen_preset_times_packed_and_padded_calls(tmp_path, monkeypatch, capsys):
    from cattn.bench import varlen as varlen_bench
    monkeypatch.setitem(varlen_bench.LENGTH_RANGE, "quick", (4, 40))
    out = tmp_path / "v.json"
    result = bench.main(["--preset", "varlen", "--quick", "--json", str(out),
                         "--markdown", str(tmp_path / "v.md")] + SMALL)
    text = capsys.readouterr().out
    assert "16 sequences, lengths log-uniform 4-40" in text
    case = json.loads(out.read_text())["cases"][0]
    rows = {(r["impl"], r["options"]): r for r in case["rows"]}
    for options in ("full", "causal"):
        for impl in ("cattn-varlen", "cattn-padded"):
            assert rows[impl, options]["max_abs_diff"] < 1e-5
        # the padded call does at least the packed call's work: its ratio is a real ratio
        assert rows["cattn-padded", options]["cattn_speedup"] > 0
    lengths = case["spec"]["lengths"]
    assert len(lengths) == 16 and 4 <= min(lengths) and max(lengths) <= 40
    assert lengths == varlen_bench.log_uniform_lengths(16, 4, 40, 0).tolist()  # seeded
    target = next(t for t in result["targets"] if t.id == "varlen-vs-padded")
    assert target.verdict in ("(pass)", "(fail)") and len(target.details) == 2
    assert "| cattn-varlen | 1 | causal |" in (tmp_path / "v.md").read_text()


def test_bias_preset_times_alibi_against_no_bias_and_a_dense_bias(tmp_path, monkeypatch,
                                                                  capsys):
    from cattn.bench import position_bias
    monkeypatch.setitem(position_bias.SIZES, "quick", 48)
    out = tmp_path / "b.json"
    bench.main(["--preset", "bias", "--quick", "--json", str(out),
                "--markdown", str(tmp_path / "b.md")] + SMALL)
    assert "N = 48, E = 64" in capsys.readouterr().out
    case = json.loads(out.read_text())["cases"][0]
    rows = {r["impl"]: r for r in case["rows"]}
    assert set(rows) == set(position_bias.IMPLS)
    for impl, row in rows.items():  # each was checked against the reference, then timed
        assert row["max_abs_diff"] < 1e-5 and row["cattn_speedup"] > 0
    assert rows["cattn-plain"]["cattn_speedup"] == 1
    assert "| cattn-alibi | 1 |" in (tmp_path / "b.md").read_text()


def test_admit_each_checks_every_runner_then_admits_only_correct_ones():
    """The shared first-call loop of the presets: every implementation at every thread
    count, a skipped one (None) left out, a wrong output recorded and not timed, nothing
    checked without config.check (bugs: one thread count only, a wrong output timed, the
    reference computed when checks are off)."""
    from cattn.bench.timing import Runner, admit_each
    config = bench.BenchConfig(threads=[1, 2], reps=1, warmup=0, min_timing=0.0)
    made, checked = [], []

    def make_runner(impl, t):
        made.append((impl, t))
        if impl == "skipped":
            return None
        return Runner(f"{impl}/{t}t", impl, t, "test", lambda impl=impl: impl)

    def max_abs_diff(runner, out):
        checked.append((runner.impl, runner.threads, out))
        return 1.0 if out == "wrong" else 0.0

    runners, wrong = [], []
    admit_each(("right", "skipped", "wrong"), config, make_runner, max_abs_diff, 1e-5,
               "full", runners, wrong)
    assert made == [(i, t) for i in ("right", "skipped", "wrong") for t in (1, 2)]
    assert checked == [(i, t, i) for i in ("right", "wrong") for t in (1, 2)]
    assert [(r.impl, r.threads) for r in runners] == [("right", 1), ("right", 2)]
    assert [(w.impl, w.threads) for w in wrong] == [("wrong", 1), ("wrong", 2)]
    unchecked = bench.BenchConfig(threads=[1], check=False, min_timing=0.0)
    checked.clear()
    runners = []
    admit_each(("wrong",), unchecked, make_runner, max_abs_diff, 1e-5, "full", runners, [])
    assert not checked and [r.impl for r in runners] == ["wrong"]


def test_paged_preset_times_each_chunk_against_its_own_mixed_call(monkeypatch):
    """Each chunk size is its own round-robin: the per-sequence calls' ratio is over the
    mixed call of the same chunk and threads, and the target reads the largest chunk only
    (bugs: a ratio over another chunk's mixed call, the target on a small chunk)."""
    from cattn.bench import mixed_paged, report, targets
    monkeypatch.setitem(mixed_paged.SIZES, "quick", (20, 40))
    monkeypatch.setitem(mixed_paged.CHUNKS, "quick", (3, 8))
    config = bench.BenchConfig(threads=[1, 2], reps=3, warmup=0, quick=True)
    case = mixed_paged.run_mixed_paged_case("paged mixed batch", config)
    case.workload = "paged"
    rows = {(r.options, r.impl, r.threads): r for r in case.rows}
    assert set(rows) == {(f"chunk={c}", i, t) for c in (3, 8) for i in mixed_paged.IMPLS
                         for t in (1, 2)}
    for (options, impl, t), row in rows.items():
        assert row.max_abs_diff < 1e-5
        mixed = rows[(options, "cattn-mixed", t)].median_s
        assert row.cattn_speedup == pytest.approx(row.median_s / mixed)
    assert "prefilling a chunk of C queries" in mixed_paged.format_mixed_paged_case(case)
    (target,) = targets._mixed_paged_targets({"cases": [case]})
    assert [c.value for c in target.details] == [
        pytest.approx(rows[("chunk=8", "cattn-per-sequence", t)].cattn_speedup)
        for t in (1, 2)]
    assert "| chunk=3 | cattn-per-sequence | 1 |" in "\n".join(report._markdown_table(case))

"""The decode-loop benchmark preset on a miniature decoder: every row it promises (cattn
and PyTorch in the loop and back to back, at each thread count and K/V head count), its
bandwidth against the same run's stream read, the check of cattn's attention against the
float64 reference, and the report's tables. (Timing figures are not checked: they depend
on the machine and its load.)"""
import pytest

from cattn import bench
from cattn.bench import decode_loop
from cattn.bench.report import format_markdown


@pytest.fixture
def tiny_decoder(monkeypatch):
    monkeypatch.setattr(decode_loop, "HEADS", 4)
    monkeypatch.setattr(decode_loop, "HEAD_DIM", 16)
    monkeypatch.setattr(decode_loop, "KV_HEADS", (4, 1))
    for name in ("CONTEXT", "LAYERS", "STEPS", "ROUNDS"):
        monkeypatch.setattr(decode_loop, name, {"quick": {"CONTEXT": 300}.get(name, 2)})


def test_decode_loop_rows_and_tables(tiny_decoder):
    torch_present = decode_loop.optional("torch") is not None
    config = bench.BenchConfig(threads=[1, 2], impls=["cattn", "torch"], stream_mib=8)
    case = decode_loop.run_decode_loop_case("decode loop", "quick", config)
    impls = decode_loop.IMPLS if torch_present else ("cattn-loop", "cattn-own-loop",
                                                      "cattn-b2b")
    assert {(r.impl, r.threads, r.options) for r in case.rows} == {
        (impl, threads, f"Hkv={h}") for impl in impls for threads in (1, 2) for h in (4, 1)}
    for r in case.rows:
        assert r.kv_gbps > 0 and r.pct_of_stream > 0 and r.median_s > 0
        # one time per layer of every step of every round
        assert len(r.times_s) == 2 * 2 * 2
        if r.impl.startswith("cattn"):
            assert r.max_abs_diff < 1e-5  # (a wrong attention would show here)
    assert set(case.spec["stream_read_gbps"]) == {f"Hkv={h} {t}t" for h in (4, 1)
                                                  for t in (1, 2)}
    # cores busy per core of wall time: at most every thread of the process
    assert set(case.spec["blas_idle_cores"]) == {"1t", "2t"}
    assert all(0 <= v < 64 for v in case.spec["blas_idle_cores"].values())
    text = decode_loop.format_decode_loop_case(case)
    assert "cattn-loop" in text and "stream read" in text
    assert "BLAS workers keep busy while idle" in text
    loops = [i for i in impls if i.endswith("-loop")]
    assert set(case.spec["layer_step_s"]) == {f"{i} Hkv={h} {t}t" for i in loops
                                              for h in (4, 1) for t in (1, 2)}
    assert all(v > 0 for v in case.spec["layer_step_s"].values())
    markdown = format_markdown({"machine": {}, "cases": [case]})
    assert "| cattn-loop | 1 | Hkv=4 |" in markdown
    assert "Same-run ceiling" not in markdown  # (the stream rates are per heads, in the table)


def test_decode_loop_is_a_preset():
    assert "decode-loop" in bench.suite.WORKLOADS



def test_blas_idle_cores_counts_the_whole_process(monkeypatch):
    """The probe divides the CPU time of every thread of the process (process_time) by
    the wall time of the main thread's sleep right after the product: a worker spinning
    through the window counts as a core. A fake clock (0.9 s of CPU per second slept)
    keeps this independent of the machine; the bugs it catches: a probe that reads the
    main thread's CPU time only (always ~0), or that sleeps before the product."""
    from cattn.bench import probes
    clock = {"cpu": 0.0, "wall": 0.0, "calls": 0}

    def product():
        clock["calls"] += 1
        clock["cpu"] += 5.0  # the product itself: outside the measured window

    def sleep(seconds):
        clock["wall"] += seconds
        clock["cpu"] += 0.9 * seconds

    monkeypatch.setattr(probes.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(probes.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(probes.time, "sleep", sleep)
    assert abs(probes.blas_idle_cores(product, idle_s=0.02, repeats=3) - 0.9) < 1e-9
    assert clock["calls"] == 3


def test_own_projections_step_computes_the_numpy_step(tiny_decoder):
    """cattn-own-loop times the same decoder step as cattn-loop, its projections on
    cattn's linear layers (the bug: a weight packed untransposed, or the output projection
    skipped, which would time a cheaper step)."""
    import numpy as np
    model = decode_loop.Decoder(kv_heads=1, context=300, layers=2, seed=0)
    want = decode_loop.numpy_step(model, 1)([])
    for threads in (1, 2):
        got = decode_loop.own_step(model, threads)([])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

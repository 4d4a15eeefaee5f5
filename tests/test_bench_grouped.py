"""The grouped benchmark preset: decodes of 32 query heads over 32, 8 and 1 K/V heads and
latent attention's decode (values a view of the keys) against a prefill of the same
round-robin; the specs' new fields, the bytes and flops they count, the check of each
query head against its own K/V head, the tables and the targets. (Timing figures are not
checked: they depend on the machine and its load.)"""
import json

import numpy as np
import pytest

from cattn import bench, reference
from cattn.bench import peers, suite, targets
from cattn.bench.report import format_markdown
from cattn.bench.results import AttentionRow, Case
from cattn.bench.specs import (Spec, check_heads, kv_head, make_inputs, max_abs_diff,
                               reference_check_slice, tolerance)
from conftest import require_peer


def test_spec_fields_round_trip_through_json():
    specs = [Spec(1, 32, 1, 64, 128, kv_heads=8),
             Spec(1, 128, 1, 32, 576, kv_heads=1, value_width=512),
             Spec(1, 4, 32, 32, 128, tag="prefill"), Spec(1, 32, 1, 64, 128)]
    for spec in specs:
        assert Spec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert [s.options() for s in specs] == ["Hkv=8", "Hkv=1+mla", "prefill", "full"]
    # a result written before the fields existed still loads, as plain heads and values
    old = {k: v for k, v in specs[3].to_json().items()
           if k not in ("kv_heads", "value_width", "tag")}
    assert Spec.from_json(old) == specs[3]
    with pytest.raises(ValueError, match="kv_heads must divide"):
        Spec(1, 32, 1, 64, 128, kv_heads=5)
    with pytest.raises(ValueError, match="value_width"):
        Spec(1, 4, 1, 64, 128, value_width=129)
    with pytest.raises(ValueError, match="takes neither kv nor page_size"):
        Spec(1, 4, 1, 64, 128, kv="float16", value_width=64)


def test_kv_bytes_and_flops_of_grouped_and_latent_decodes():
    grouped = Spec(1, 32, 1, 8192, 128, kv_heads=8)
    assert grouped.kv_bytes() == 8 * 8192 * (128 + 128) * 4  # 8 K/V heads, not 32
    assert grouped.flops() == 2 * 32 * 8192 * (128 + 128)   # every query head's work
    mla = Spec(1, 128, 1, 4096, 576, kv_heads=1, value_width=512)
    assert mla.kv_bytes() == 4096 * 576 * 4  # the values are a view: the keys, once
    assert mla.flops() == 2 * 128 * 4096 * (576 + 512)
    assert mla.useful_flops() == mla.flops()
    int8 = Spec(2, 32, 1, 100, 128, kv="int8", kv_heads=4)
    assert int8.kv_bytes() == 2 * 4 * 100 * 256 + 2 * 2 * 4 * 100 * 4  # with the scales


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_latent_values_are_a_view_of_the_keys(dtype):
    spec = Spec(1, 8, 1, 40, 24, dtype, kv_heads=1, value_width=16)
    q, k, v = make_inputs(spec)
    assert q.shape == (1, 8, 1, 24) and k.shape == (1, 1, 40, 24) and v.shape == (1, 1, 40, 16)
    assert q.dtype == k.dtype == v.dtype == np.dtype(dtype)
    assert np.shares_memory(k, v) and np.array_equal(v, k[..., :16])
    q, k, v = make_inputs(Spec(1, 8, 1, 40, 24, kv_heads=2))
    assert k.shape == v.shape == (1, 2, 40, 24) and not np.shares_memory(k, v)


def _per_head(q, k, v, kv_of, scale=None):
    """(1, H, L, Ev) float64 attention, query head h over K/V head kv_of(h)."""
    return np.stack([reference.scaled_dot_product_attention(
        q[0, h].astype(np.float64), k[0, kv_of(h)].astype(np.float64),
        v[0, kv_of(h)].astype(np.float64), scale=scale) for h in range(q.shape[1])])[None]


def test_check_compares_each_query_head_with_its_own_kv_head():
    """Query head h reads K/V head h // (H / Hkv): an output that interleaves the groups
    (h % Hkv) or reads K/V head 0 for every head must fail the check."""
    spec = Spec(1, 8, 3, 16, 8, kv_heads=2)
    q, k, v = make_inputs(spec)
    heads, rows, expected = reference_check_slice(spec, q, k, v)
    assert heads == check_heads(spec) == (0, 1, 7)
    assert [kv_head(spec, h) for h in range(8)] == [h // 4 for h in range(8)]
    right = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert max_abs_diff(right, heads, rows, expected) < tolerance(spec)
    tol = tolerance(spec)
    for wrong_kv in (lambda h: h % 2, lambda h: 0):
        assert max_abs_diff(_per_head(q, k, v, wrong_kv), heads, rows, expected) > 10 * tol
    assert check_heads(Spec(1, 8, 3, 16, 8)) == (0,)  # own K/V heads: head 0 as before


def test_latent_check_scales_by_the_key_width():
    """The default scale is 1/sqrt(E) of the 576-wide keys, as cattn's: an output scaled by
    the value width's 1/sqrt(Ev) must fail the check."""
    import cattn
    spec = Spec(1, 4, 1, 32, 24, kv_heads=1, value_width=16)
    q, k, v = make_inputs(spec)
    heads, rows, expected = reference_check_slice(spec, q, k, v)
    assert expected.shape == (3, 1, 16)
    out = cattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert max_abs_diff(out, heads, rows, expected) < tolerance(spec)
    scaled_by_ev = _per_head(q, k, v, lambda h: 0, scale=1 / 4)
    assert max_abs_diff(scaled_by_ev, heads, rows, expected) > 10 * tolerance(spec)


def test_specs_of_one_shape_share_inputs_others_get_their_own(monkeypatch):
    made = []

    def counting(spec, seed=0):
        made.append(spec.options())
        return make_inputs(spec, seed)
    monkeypatch.setattr(suite, "make_inputs", counting)
    config = bench.BenchConfig(impls=["cattn"], reps=1, warmup=0)
    bench.run_case("one shape", [Spec(1, 2, 16, 16, 8), Spec(1, 2, 16, 16, 8, causal=True)],
                   config, ceiling=False)
    assert made == ["full"]
    made.clear()
    case = bench.run_case("shapes", [Spec(1, 4, 1, 32, 8, kv_heads=2),
                                     Spec(1, 4, 1, 32, 8, kv_heads=1),
                                     Spec(1, 4, 1, 32, 8, kv_heads=1, value_width=4),
                                     Spec(1, 2, 16, 16, 8, tag="prefill")],
                          config, ceiling=False, kind="grouped")
    assert made == ["Hkv=2", "Hkv=1", "Hkv=1+mla", "prefill"]
    assert not case.wrong_output and len(case.rows) == 4
    assert [s["options"] for s in case.spec["specs"]] == made


@pytest.fixture
def tiny_grouped(monkeypatch):
    monkeypatch.setitem(suite.GROUPED_S, "quick", 48)
    monkeypatch.setitem(suite.MLA_S, "quick", 24)
    monkeypatch.setitem(suite.YARDSTICK_L, "quick", 32)


def test_grouped_preset_rows_tables_and_targets(tiny_grouped):
    impls = ["cattn", "numpy"]
    config = bench.BenchConfig(threads=[1, 2], impls=impls, reps=1, warmup=0, stream_mib=8,
                               quick=True)
    ((name, specs, opts),) = suite.WORKLOADS["grouped"]("quick")
    assert [s.options() for s in specs] == ["Hkv=32", "Hkv=8", "Hkv=1", "Hkv=1+mla",
                                            "prefill"]
    case = suite.run_workload_case("grouped", name, specs, opts, config)
    assert not case.wrong_output and not case.skipped
    rows = {(r.impl, r.threads, r.options): r for r in case.rows
            if isinstance(r, AttentionRow)}
    assert set(rows) == {(i, t, s.options()) for i in impls for t in (1, 2) for s in specs}
    for (impl, t, options), r in rows.items():
        assert r.max_abs_diff < 1e-4 and r.gflops > 0  # each checked, then timed
        if options == "prefill":
            assert r.kv_gbps is None and r.pct_of_prefill is None
            continue
        prefill = rows[("cattn", t, "prefill")]
        assert r.pct_of_prefill == pytest.approx(100 * r.gflops / prefill.gflops)
        spec = next(s for s in specs if s.options() == options)
        assert r.kv_gbps == pytest.approx(spec.kv_bytes() / r.median_s / 1e9)
        assert r.pct_of_stream == pytest.approx(100 * r.kv_gbps / case.stream_gbps[str(t)])
    saved = json.loads(json.dumps(case.to_json()))
    by_options = {r["options"]: r for r in saved["rows"] if r.get("impl") == "cattn"}
    assert "pct_of_prefill" in by_options["Hkv=8"]
    assert "pct_of_prefill" not in by_options["prefill"]
    text = bench.format_case(case)
    assert "%pref" in text and "KV GB/s" in text
    assert "Hkv=1+mla       B=1 H=128 L=1 S=24 E=576, 1 K/V head, values v = k[..., :512]" \
        in text
    lines = [line.split()[:3] for line in text.splitlines() if line.startswith("   cattn ")]
    assert [x[2] for x in lines] == [o for o in case.options for _ in (1, 2)]  # spec order
    markdown = format_markdown({"machine": {}, "cases": [case]})
    assert "| % prefill |" in markdown and "| cattn | 2 | Hkv=8 |" in markdown
    verdicts = {t.id: t for t in targets.check_targets({"cases": [case]})}
    for tid in ("grouped-decode-stream", "grouped-decode-gemm-rate"):
        assert verdicts[tid].verdict in ("(pass)", "(fail)")  # smaller than S = 8192
    assert len(verdicts["grouped-decode-stream"].details) == 2
    assert len(verdicts["grouped-decode-gemm-rate"].details) == 4


def _grouped_case(S, stream, prefill):
    """A grouped case as the run gives it, its cattn rows' figures made by hand."""
    def row(threads, options, **figures):
        return AttentionRow(f"cattn/{threads}t/{options}", "cattn", threads, "grouped",
                            1e-3, 1e-3, [1e-3], 1, "", options=options, **figures)
    rows = [row(t, "Hkv=8", pct_of_stream=p) for t, p in zip((1, 2), stream)]
    rows += [row(t, o, pct_of_prefill=p) for (t, o), p in zip(
        ((1, "Hkv=1"), (2, "Hkv=1"), (1, "Hkv=1+mla"), (2, "Hkv=1+mla")), prefill)]
    rows.append(row(1, "prefill"))
    case = Case("grouped decode", "grouped", Spec(1, 32, 1, S, 128, kv_heads=32).to_json(),
                [], [1, 2], rows)
    case.workload = "grouped"
    return {"cases": [case]}


def test_grouped_targets_from_hand_made_rows():
    stream, rate = targets._grouped_targets(_grouped_case(8192, (70, 61), (80, 55, 51, 90)))
    assert (stream.id, stream.verdict, rate.id, rate.verdict) == (
        "grouped-decode-stream", "PASS", "grouped-decode-gemm-rate", "PASS")
    assert [(c.where, c.value) for c in stream.details] == [("1t", 70), ("2t", 61)]
    stream, rate = targets._grouped_targets(_grouped_case(8192, (70, 59), (80, 55, 49, 90)))
    assert stream.verdict == rate.verdict == "FAIL"
    assert "(2t)" in stream.measured and "(Hkv=1+mla 1t)" in rate.measured
    stream, rate = targets._grouped_targets(_grouped_case(2048, (70, 61), (80, 55, 51, 90)))
    assert stream.verdict == rate.verdict == "(pass)"  # --quick's smaller shapes
    for t in targets._grouped_targets({"cases": []}):
        assert t.verdict == "n/a" and t.measured == "n/a (not in this run)"
    ids = [t.id for t in targets.check_targets({"cases": []})]
    assert {"grouped-decode-stream", "grouped-decode-gemm-rate"} <= set(ids)


TINY_GROUPED = [Spec(1, 8, 1, 40, 16, kv_heads=2), Spec(1, 8, 1, 40, 16, kv_heads=1),
                Spec(1, 8, 1, 24, 24, kv_heads=1, value_width=16)]


@pytest.mark.parametrize("impl, module", [("torch", "torch"), ("ort", "onnxruntime")])
def test_peers_compute_grouped_and_latent_decodes(impl, module):
    """PyTorch with enable_gqa and values narrower than the keys, ONNX Runtime's opset-23
    Attention: each output checked against the float64 reference, none skipped."""
    require_peer(module)
    config = bench.BenchConfig(impls=["cattn", impl], reps=1, warmup=0)
    case = bench.run_case("peers", TINY_GROUPED, config, ceiling=False, kind="grouped")
    assert not case.skipped and not case.wrong_output
    assert {(r.impl, r.options) for r in case.rows} == {
        (i, s.options()) for i in ("cattn", impl) for s in TINY_GROUPED}


def test_a_pytorch_that_refuses_grouped_heads_is_skipped(monkeypatch):
    torch = require_peer("torch")

    def no_gqa(q, k, v, is_causal=False):  # as PyTorch before 2.5: no enable_gqa
        raise TypeError("unexpected keyword argument 'enable_gqa'")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_gqa)
    q, k, v = make_inputs(TINY_GROUPED[0])
    with pytest.raises(peers.Skip, match="PyTorch SDPA refuses 2 K/V heads for 8 query heads"):
        peers.make_torch(TINY_GROUPED[0], q, k, v, 1, bench.BenchConfig())


def test_ort_multi_head_attention_is_not_asked_for_grouped_heads():
    spec = Spec(1, 8, 1, 16, 8, kv_heads=2)
    q, k, v = make_inputs(spec)
    config = bench.BenchConfig(ort_op="mha")
    with pytest.raises(peers.Skip, match="not installed|one K/V head per query head"):
        peers.make_ort(spec, q, k, v, 1, config)

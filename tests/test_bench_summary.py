"""The benchmark's targets table ends with one plain line that a reader can act on."""
from types import SimpleNamespace

from cattn.bench import format_targets


def target(tid, verdict, indicative=False):
    """A target row as check_targets gives them (the fields format_targets reads)."""
    return SimpleNamespace(id=tid, target="asks", measured="worst 1.00x", verdict=verdict,
                           indicative=indicative)


def test_targets_table_ends_with_a_summary_counting_each_verdict():
    """Bugs caught: a table ending on its last FAIL row with no context; counts that mix
    indicative verdicts (smaller shapes) with the real ones."""
    table = format_targets([target("a", "PASS"), target("b", "FAIL"), target("c", "FAIL"),
                            target("d", "(pass)", True), target("e", "(fail)", True),
                            target("f", "(pass)", True), target("g", "n/a")])
    last = table.splitlines()[-1]
    assert last.startswith("   summary: 1 of 3 targets measured at their shapes met")
    assert "2 of 3 indicative ones met on smaller shapes" in last
    assert "1 not measured in this run" in last
    assert "not a wrong result" in last


def test_summary_of_a_full_run_names_no_indicative_targets():
    last = format_targets([target("a", "PASS"), target("b", "PASS")]).splitlines()[-1]
    assert "2 of 2 targets measured at their shapes met." in last
    assert "indicative" not in last and "not measured" not in last


def test_markdown_of_a_preset_with_its_own_table():
    """The dask and transformers presets print their own table and have no `cases`: their
    markdown is the machine header and that table (the bug: a KeyError after the whole
    run, losing the --markdown file)."""
    from cattn.bench.report import format_markdown
    table = "== transformers models, attn_implementation compared\n   qwen ... 1.38x sdpa"
    text = format_markdown({"machine": {"cpu_model": "Some CPU"}, "table_text": table})
    assert "Some CPU" in text and table in text

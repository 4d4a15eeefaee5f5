"""`python -m cattn demo`: its tables show the model's attention, its heatmaps are written,
it says when the weights are random; `python -m cattn bench` forwards to cattn.bench."""
import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import cattn.__main__ as cli
from cattn import demo, minilm


def parse_tables(text):
    """{sentence: (tokens, rows of integer percents)} from the printed tables."""
    tables, lines = {}, text.splitlines()
    for n, line in enumerate(lines):
        if line.startswith('"') and line.endswith('"'):
            header = lines[n + 1].split()
            assert header[-3:] == ["looks", "most", "at"]
            tokens = header[:-3]
            rows = []
            for row in lines[n + 2:n + 2 + len(tokens)]:
                label, *cells = row.rsplit("   ", 1)[0].split()
                rows.append((label, [int(c) for c in cells]))
            tables[line.strip('"')] = (tokens, rows)
    return tables


def test_tables_show_the_models_attention(tmp_path):
    out = io.StringIO()
    result = demo.run(layer=2, head=None, plots=False, random_weights=True, stream=out)
    text = out.getvalue()
    assert "RANDOM WEIGHTS" in text and "mean nothing" in text
    tables = parse_tables(text)
    assert set(tables) == set(demo.SENTENCES)
    model = minilm.MiniLM.random()  # the same seeded weights as the demo's
    for sentence, tokens, weights in result["results"]:
        want_tokens, want_weights = model.attentions(sentence)
        assert tokens == want_tokens
        np.testing.assert_allclose(weights, want_weights, rtol=1e-6, atol=1e-7)
        shown = want_weights[2].mean(axis=0)  # layer 2, mean of the heads
        printed_tokens, rows = tables[sentence]
        assert printed_tokens == tokens
        for (label, cells), token, row in zip(rows, tokens, shown):
            assert label == token
            np.testing.assert_allclose(cells, 100 * row, atol=0.5 + 1e-4)  # float32 rounding
            assert abs(sum(cells) - 100) <= len(cells) / 2  # rounding of a distribution


def test_one_head_and_top_words():
    weights = np.zeros((2, 3, 4, 4))
    weights[1, 2] = [[0.1, 0.6, 0.2, 0.1]] * 4
    tokens = ["[CLS]", "it", "dog", "[SEP]"]
    np.testing.assert_array_equal(demo.view(weights, 1, 2), weights[1, 2])
    np.testing.assert_array_equal(demo.view(weights, 1, None), weights[1].mean(0))
    # leaves out [CLS]/[SEP] and the token itself
    assert demo.top_words(weights[1, 2, 1], tokens, 1, n=1) == "dog 20%"
    assert demo.strongest_head(weights, tokens, "it", "dog") == (1, 2, pytest.approx(0.2))
    assert demo.strongest_head(weights, tokens, "it", "cat") is None


def test_real_model_finds_where_it_looks():
    for module in ("safetensors", "tokenizers", minilm.WEIGHTS_PACKAGE):
        pytest.importorskip(module)
    out = io.StringIO()
    result = demo.run(plots=False, stream=out)
    text = out.getvalue()
    assert "all-MiniLM-L6-v2" in text and "RANDOM" not in text
    assert result["layer"] == 5 and result["head"] is None
    _, tokens, weights = result["results"][2]
    assert tokens[:5] == ["[CLS]", "he", "fed", "the", "dog"]
    layer, head, w = demo.strongest_head(weights, tokens, "it", "dog")
    assert w == weights[:, :, tokens.index("it"), tokens.index("dog")].max()
    assert f"layer {layer}, head {head} ({100 * w:.0f}% to dog" in text
    assert f"--layer {layer} --head {head}" in text


def test_heatmaps_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = io.StringIO()
    result = demo.run(sentences=("I love Apple phones",), layer=-1, head=3,
                      out_dir=str(tmp_path / "pngs"), random_weights=True, stream=out)
    paths = result["paths"]
    assert sorted(os.path.basename(p) for p in paths) == [
        "sentence1_layer5_all_heads.png", "sentence1_layer5_head3.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000
    assert "2 PNG files" in out.getvalue()


def test_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = io.StringIO()
    result = demo.run(sentences=("How are you doing?",), out_dir=str(tmp_path / "none"),
                      random_weights=True, stream=out)
    assert result["paths"] is None
    assert "matplotlib is not installed" in out.getvalue()
    assert not (tmp_path / "none").exists()


def test_random_fallback_when_model_missing(monkeypatch):
    monkeypatch.setattr(minilm, "pretrained_available", lambda: False)
    out = io.StringIO()
    demo.run(sentences=("How are you doing?",), plots=False, stream=out)
    assert 'RANDOM WEIGHTS, the pretrained model is not installed (pip install "cattn[model]"' \
        in out.getvalue()


def test_bad_options_exit_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--random", "--no-plots", "--layer", "6"])
    assert e.value.code == 2
    assert "--layer must be in 0..5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--random", "--no-plots", "--head", "12"])
    assert "--head must be in 0..11" in capsys.readouterr().err


def test_bench_command_forwards_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("cattn.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "cattn.bench", fake)
    assert cli.main(["bench", "--quick", "--threads", "1"]) == 0
    assert seen == [["--quick", "--threads", "1"]]


def test_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    run = subprocess.run([sys.executable, "-m", "cattn", "demo", "--random", "--no-plots",
                          "--sentence", "Where does it look?"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert '"Where does it look?"' in run.stdout and "RANDOM WEIGHTS" in run.stdout
    usage = subprocess.run([sys.executable, "-m", "cattn"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert usage.returncode == 0 and "demo" in usage.stdout and "bench" in usage.stdout
    bad = subprocess.run([sys.executable, "-m", "cattn", "nope"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "unknown command" in bad.stderr

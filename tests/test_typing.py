"""The type hints: `mypy --strict` accepts a small user script (tests/typing/user_script.py),
the script runs, and the stubs of the compiled modules match what they export. Skipped
without mypy."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "typing", "user_script.py")
pytest.importorskip("mypy")


def _run(args, cwd, **env):
    env = dict(os.environ, **env)
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def _cattn_root():
    import cattn
    return os.path.dirname(os.path.dirname(os.path.abspath(cattn.__file__)))


def test_user_script_runs(tmp_path):
    proc = _run([SCRIPT], tmp_path, PYTHONPATH=_cattn_root())
    assert proc.returncode == 0, proc.stderr


def test_mypy_strict_accepts_a_user_script(tmp_path):
    # As for any installed package, mypy reports errors in the user's code, not in cattn's
    # (follow-imports=silent); cattn's hints and stubs decide what the user's code may do.
    proc = _run(["-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
                 "--cache-dir", str(tmp_path / "cache"), SCRIPT], tmp_path,
                MYPYPATH=_cattn_root())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_rejects_a_wrong_call(tmp_path):
    """The check has teeth: a misspelled keyword and a wrong return type are errors."""
    script = tmp_path / "wrong.py"
    script.write_text(
        "import numpy as np\nimport cattn\n"
        "q = np.ones((1, 1, 2, 4), dtype=np.float32)\n"
        "out: int = cattn.scaled_dot_product_attention(q, q, q)\n"
        "cattn.scaled_dot_product_attention(q, q, q, causal=True)\n")
    proc = _run(["-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
                 "--cache-dir", str(tmp_path / "cache"), str(script)], tmp_path,
                MYPYPATH=_cattn_root())
    assert proc.returncode == 1
    assert "wrong.py:4: error: Incompatible types" in proc.stdout
    assert "wrong.py:5: error: No overload variant" in proc.stdout


def test_stubs_of_compiled_modules_match_them(tmp_path):
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n")
    proc = _run(["-m", "mypy.stubtest", "--ignore-missing-stub", "--mypy-config-file",
                 str(config), "cattn._api", "cattn._varlen", "cattn._kernel",
                 "cattn._encoder_ops"], tmp_path,
                MYPYPATH=_cattn_root(), PYTHONPATH=_cattn_root())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_accepts_the_benchmark_package(tmp_path):
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n")
    proc = _run(["-m", "mypy", "--config-file", str(config), "--no-incremental",
                 "--cache-dir", str(tmp_path / "cache"),
                 os.path.join(_cattn_root(), "cattn", "bench")], tmp_path,
                MYPYPATH=_cattn_root())
    assert proc.returncode == 0, proc.stdout + proc.stderr

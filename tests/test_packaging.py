"""Packaging: the sdist lists everything the build needs, and a build without OpenMP fails
when CATTN_FAIL_NO_OPENMP=1 asks for threads. (CI also builds the sdist and the wheel and
installs both into fresh environments: .ci/run.)"""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")),
                                reason="needs the source tree")


def _setup(args, tmp_path, **env):
    return subprocess.run([sys.executable, "setup.py"] + args, cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=dict(os.environ, **env))


def test_sdist_lists_every_build_input(tmp_path):
    proc = _setup(["-q", "egg_info", "--egg-base", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sources,) = glob.glob(str(tmp_path / "*.egg-info" / "SOURCES.txt"))
    listed = set(open(sources).read().split())
    needed = {os.path.relpath(p, ROOT) for pattern in ("src/*.h", "cattn/*.pyx",
                                                       "cattn/*.pxd", "cattn/py.typed")
              for p in glob.glob(os.path.join(ROOT, pattern))}
    assert any(p.endswith(".h") for p in needed)
    assert needed <= listed, f"missing from the sdist: {sorted(needed - listed)}"
    assert not any(p.endswith((".so", "_kernel.c")) for p in listed)


def test_build_without_openmp_fails_when_asked(tmp_path):
    proc = _setup(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
                   str(tmp_path / "tmp")], tmp_path, CATTN_NO_OPENMP="1",
                  CATTN_FAIL_NO_OPENMP="1")
    assert proc.returncode != 0
    assert "CATTN_FAIL_NO_OPENMP" in proc.stderr
    assert not glob.glob(str(tmp_path / "lib" / "cattn" / "*.so"))

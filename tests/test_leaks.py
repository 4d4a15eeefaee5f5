"""Resident memory stays flat over thousands of varied calls: the short version of
scripts/leak_check.py (the full one makes 100,000 calls), in a fresh process so that
nothing else in the test session moves its memory."""
import os
import subprocess
import sys

import cattn

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "leak_check.py")


def test_rss_stays_flat_over_thousands_of_calls():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(cattn.__file__))] + sys.path))
    child = subprocess.run([sys.executable, SCRIPT, "--calls", "3000", "--bound-mb", "4"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert "OK" in child.stdout.splitlines()[-1]

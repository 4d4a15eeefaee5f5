"""The debug build's bounds checks (CATTN_DEBUG=1, src/cattn_debug.h): a plan whose table
sends a write past the end of its array aborts, naming the write, instead of corrupting
memory. Each test hands the kernel a plan made wrong on purpose, in a child process (the
abort ends it); the release build would write out of bounds there, so these tests run only
in a debug build (elsewhere they are deselected, not skipped: CI's debug stage runs them).
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.debug_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child shifts one table column of the last item by `rows` rows of its operand before
# the kernel runs: the call the front planned, with one offset wrong.
CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import cattn
    from cattn import _kernel

    column, rows, call = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    planned = _kernel.attention

    def wrong_offset(q, k, v, out, lse, weights, mask, partials, table, **plan):
        L, S, E, Ev = plan["shape"]
        step = {"OUT": plan["strides"][3], "LSE": 1}[column] * rows
        table[-1, getattr(_kernel.Column, column)] += step
        return planned(q, k, v, out, lse, weights, mask, partials, table, **plan)

    _kernel.attention = wrong_offset
    rng = np.random.default_rng(0)
    if call == "dense":
        q, k, v = (rng.standard_normal((2, 3, 5, 8), dtype=np.float32) for _ in range(3))
        cattn.scaled_dot_product_attention(q, k, v, return_lse=True)
    else:  # packed sequences of 3 and 4 tokens, whose lse offsets come from the table
        q, k, v = (rng.standard_normal((7, 2, 8), dtype=np.float32) for _ in range(3))
        cu = np.array([0, 3, 7], dtype=np.int32)
        cattn.varlen_attention(q, k, v, cu, cu, return_lse=True)
    print("finished")
""")


def run_child(column, rows, call):
    return subprocess.run([sys.executable, "-c", CHILD, column, str(rows), call], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_build_checks_bounds():
    """Guards the stage itself: a debug build whose checks compiled out would pass all the
    rest silently."""
    from cattn import _kernel
    assert _kernel.debug_checks()


@pytest.mark.parametrize("call", ["dense", "varlen"])
def test_correct_offsets_pass(call):
    """The checks accept every write of a correct plan (an extent computed too small, or a
    check on the wrong array, would abort here)."""
    proc = run_child("OUT", 0, call)
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stdout


@pytest.mark.parametrize("call", ["dense", "varlen"])
def test_output_row_past_the_end_aborts(call):
    """The last item's output one row late: its last row lands past `out`."""
    proc = run_child("OUT", 1, call)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert "cattn debug build: output row written outside its array" in proc.stderr
    assert "finished" not in proc.stdout


def test_lse_entry_one_row_late_aborts():
    """A packed batch's lse written one row late: the last token's entry lands past `lse`
    (the bug an audit found only by a segfault)."""
    proc = run_child("LSE", 1, "varlen")
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert "cattn debug build: lse entry written outside its array" in proc.stderr

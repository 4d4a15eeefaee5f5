"""No memory leaks: resident memory stays flat over thousands of varied calls (the short
version of scripts/leak_check.py, which makes 100,000), and, to the byte, the heap in use
and the number of Python allocator blocks do not grow per call. Both run in a fresh process
so that nothing else in the test session moves its memory.

RSS moves in pages and allocator chunks, so it only sees leaks of kilobytes per call. The
exact check reads glibc's count of bytes in use (mallinfo2: every arena and mmap'd chunk,
so the kernel's PyMem_RawMalloc and NumPy's data buffers too) and Python's count of
allocated small-object blocks (objects and their headers). It proves its own sensitivity:
the same measurement with 100 bytes leaked per call must fail.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import cattn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "leak_check.py")


def run_child(args, code=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(cattn.__file__)), os.path.join(ROOT, "scripts")]
        + sys.path))
    command = [sys.executable] + (["-c", code] if code else [SCRIPT]) + args
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    return child.stdout


def test_rss_stays_flat_over_thousands_of_calls():
    out = run_child(["--calls", "3000", "--bound-mb", "4"])
    assert "OK" in out.splitlines()[-1]


# Per call, after a warm-up: heap bytes in use, and Python allocator blocks. The clean code
# measures 0 bytes and ~0.01 blocks a call; a 100-byte leak is 100 bytes and a leaked
# object at least one block.
HEAP_BOUND = 25
BLOCK_BOUND = 0.1

EXACT_CHECK = textwrap.dedent("""
    import ctypes, gc, json, sys
    import leak_check

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    try:
        libc.mallinfo2.restype = MallInfo2
    except AttributeError:
        print(json.dumps(None))
        sys.exit(0)
    libc.malloc.restype = ctypes.c_void_p

    def heap_in_use():
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def growth_per_call(calls, n):
        for i in range(n):  # warm-up: caches, pools, thread arenas
            calls[i % len(calls)]()
        gc.collect()
        heap, blocks = heap_in_use(), sys.getallocatedblocks()
        for i in range(n):
            calls[i % len(calls)]()
        gc.collect()
        return ((heap_in_use() - heap) / n, (sys.getallocatedblocks() - blocks) / n)

    calls = leak_check.build_calls()
    n = int(sys.argv[1])
    clean = growth_per_call(calls, n)
    leaky = growth_per_call([lambda c=c: (c(), libc.malloc(100)) for c in calls], n)
    print(json.dumps({"clean": clean, "leaky": leaky}))
""")


def test_heap_and_python_blocks_do_not_grow_per_call():
    result = json.loads(run_child(["2000"], code=EXACT_CHECK).splitlines()[-1])
    if result is None:
        pytest.skip("no mallinfo2 (glibc >= 2.33) to count the heap in use")
    heap, blocks = result["clean"]
    assert heap <= HEAP_BOUND and blocks <= BLOCK_BOUND, (
        f"per call: {heap:.1f} heap bytes, {blocks:.3f} Python blocks")
    # The measurement's positive control: 100 bytes leaked a call are seen.
    assert result["leaky"][0] > 4 * HEAP_BOUND, result

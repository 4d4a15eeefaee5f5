"""Every instruction-set path this CPU has (AMX, AVX512-BF16, AVX-512, AVX2, portable), the
block sizes and the interruptible loop, against the float64 reference. (The AMX and
AVX512-BF16 paths run float32/float64 on the AVX-512 kernels; their bfloat16 products are
tested in test_bf16_native.py.)

The path is chosen per call through a private hook (`_isa=`), so one process tests them
all; paths the CPU lacks are skipped with a reason (and must still be refused, never run).
"wide16" is the AVX-512 micro-kernels' 16-wide logic (tiles, tails, masks) built from
generic vectors for AVX2: on a CPU without AVX-512 it still tests those shapes. "blas" is the
portable path with BLAS block GEMMs, what a compiler without generic vectors (MSVC) builds.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import cattn
from cattn import _kernel
from conftest import case_operands, reference64, tolerance

PATHS = ("amx", "avx512_bf16", "avx512", "avx2", "portable", "wide16", "blas")
sdpa = cattn.scaled_dot_product_attention


def path_param(name):
    available = name in _kernel.testable_isa_paths()
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        not available, reason=f"this CPU lacks the {name} path"))


ALL_PATHS = [path_param(p) for p in PATHS]


def test_the_emulation_build_only_when_asked_for():
    """The bfloat16 levels run in software only in a build made for it (CATTN_EMULATE_ISA=1,
    whose tests run with the same variable): an ordinary build emulates nothing, so its
    amx and avx512_bf16 paths exist only where the CPU has them."""
    asked = os.environ.get("CATTN_EMULATE_ISA", "") not in ("", "0")
    assert _kernel.isa_emulated() is asked
    assert cattn.show_config()["isa_emulated"] is asked
    if asked:
        assert {"amx", "avx512_bf16"} <= set(_kernel.supported_isa_paths())


def compare(got, want, dtype):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        np.testing.assert_allclose(g, w, **tolerance(dtype))


# (batch, L, S, E, Ev, options): row counts around the register tiles (1-13 rows, 8/4/2/1
# tails), key counts around the panels (16, 32 keys) and the blocks, feature sizes around
# the vector widths (1, 7, 8, 15, 16, 17, 33, 100), every variant.
CASES = [
    ((2,), 1, 1, 1, 1, {}),
    ((2, 3), 13, 47, 17, 9, {}),
    ((3,), 29, 33, 64, 64, {}),
    ((1, 2), 130, 300, 64, 48, {"is_causal": True}),
    ((2,), 27, 515, 33, 100, {"window": (40, 3)}),
    ((2,), 3, 700, 128, 128, {"alignment": "bottom_right", "is_causal": True,
                              "key_lengths": np.array([700, 333])}),
    ((2, 2), 45, 65, 15, 7, {"softcap": 2.5, "return_lse": True}),
    ((1, 2), 37, 80, 8, 16, {"return_weights": True}),
    ((2, 3), 12, 96, 16, 32, {"mask": "bool"}),
    ((2, 3), 25, 50, 31, 31, {"mask": "float"}),
    ((1, 1), 1, 5000, 64, 64, {"return_lse": True}),  # decode: the keys split in chunks
    ((1, 4), 4, 2049, 32, 32, {"is_causal": True, "alignment": "bottom_right"}),
]


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[1]}-S{c[2]}-E{c[3]}-Ev{c[4]}")
def test_path_matches_reference(path, dtype, case, rng):
    q, k, v, mask, options = case_operands(case, rng, dtype)
    got = sdpa(q, k, v, mask, _isa=path, **options)
    assert _kernel.last_call_stats()["isa"] == path
    compare(got, reference64(q, k, v, mask, **options), dtype)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_path_reads_strided_operands(path, dtype, rng):
    # (B, L, H, E) viewed as (B, H, L, E), a sliced key and a negative-stride value
    q = rng.standard_normal((2, 70, 3, 40)).astype(dtype).transpose(0, 2, 1, 3)
    k = rng.standard_normal((2, 3, 90, 80)).astype(dtype)[..., ::1][..., :40]
    v = rng.standard_normal((2, 3, 90, 24)).astype(dtype)[:, :, ::-1]
    out = np.zeros((2, 70, 3, 24), dtype).transpose(0, 2, 1, 3)
    sdpa(q, k, v, is_causal=True, out=out, _isa=path)
    compare(out, reference64(q, k, v, is_causal=True), dtype)


def test_unavailable_path_is_refused():
    missing = [p for p in PATHS if p not in _kernel.testable_isa_paths()]
    q = np.ones((4, 8), np.float32)
    for name in missing + ["sse9"]:
        with pytest.raises(ValueError, match="not available on this CPU"):
            sdpa(q, q, q, _isa=name)


BLOCK_SIZES = [(1, 1), (5, 7), (12, 32), (13, 33), (64, 128), (128, 256), (300, 1000)]


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("block_sizes", BLOCK_SIZES, ids=str)
def test_block_size_agnosticism(path, block_sizes, rng):
    """Any block sizes give the reference's result, bitwise the same at any thread count."""
    dtype = np.float32
    B, H, L, S, E = 2, 3, 150, 211, 24
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(dtype)
    v = rng.standard_normal((B, H, S, E)).astype(dtype)
    mask = rng.random((B, 1, L, S)) > 0.2
    options = dict(is_causal=True, alignment="bottom_right", window=(90, 5),
                   key_lengths=np.array([S, 170]), return_lse=True)
    runs = [sdpa(q, k, v, mask, num_threads=t, _isa=path, _block_sizes=block_sizes,
                 **options) for t in (1, 2, 3)]
    stats = _kernel.last_call_stats()
    assert (stats["block_q"], stats["block_k"]) == block_sizes
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert np.array_equal(a, b, equal_nan=True), "thread count changed the result"
    compare(runs[0], reference64(q, k, v, mask, **options), dtype)


def test_block_sizes_are_validated():
    q = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="block_q must be >= 1"):
        sdpa(q, q, q, _block_sizes=(0, 16))
    with pytest.raises(TypeError, match="block_k must be an integer"):
        sdpa(q, q, q, _block_sizes=(16, 2.5))


@pytest.mark.skipif(not cattn.openmp_enabled(), reason="built without OpenMP")
def test_threads_really_run():
    q = np.ones((1, 4, 512, 16), np.float32)
    sdpa(q, q, q, num_threads=2)
    stats = _kernel.last_call_stats()
    assert stats["team_size"] == 2
    sdpa(q, q, q, num_threads=1)
    assert _kernel.last_call_stats()["team_size"] == 1


CHILD = """
import json, numpy as np, cattn
from cattn import _kernel
from cattn import reference
rng = np.random.default_rng(1)
q, k, v = (rng.standard_normal((2, 40, 16)) for _ in range(3))
got = cattn.scaled_dot_product_attention(q, k, v, is_causal=True)
want = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
stats = _kernel.last_call_stats()
print(json.dumps({"isa": cattn.show_config()["isa"], "ran": stats["isa"],
                  "float_kernels": stats["float_kernels"], "err": float(np.abs(got - want).max())}))
"""


def run_child(env_update):
    env = {k: v for k, v in os.environ.items() if k not in ("CATTN_ISA", "CATTN_DISABLE_AVX2")}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", ["amx", "avx512_bf16", "avx512", "avx2", "portable"])
def test_environment_caps_the_path(name):
    """(the 16-wide test path is never a process's path: CATTN_ISA does not name it)"""
    import json
    proc = run_child({"CATTN_ISA": name})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    supported = _kernel.supported_isa_paths()
    expected = name if name in supported else supported[0]  # a cap, never an upgrade
    assert result["isa"] == result["ran"] == expected
    # the bfloat16 levels run float32/float64 on the AVX-512 kernels
    native_bf16 = expected in ("amx", "avx512_bf16")
    assert result["float_kernels"] == ("avx512" if native_bf16 else expected)
    assert result["err"] < 1e-12


@pytest.mark.parametrize("value", ["avx1024", "wide16", "blas"])
def test_environment_names_an_unknown_path(value):
    proc = run_child({"CATTN_ISA": value})
    assert proc.returncode != 0
    assert (f"CATTN_ISA must be one of amx, avx512_bf16, avx512, avx2, portable, "
            f"got '{value}'") in proc.stderr


def _interrupt_once_running(out, sent, done):
    """Send SIGINT once the call filling `out` (zeroed) is running: some of its rows are
    written and some are not yet. No timer: on a loaded machine the call may start late.
    Records when, and the share of the call's query blocks written once the signal is
    sent (read after the kill: on a busy machine the sender may wait long between its
    look and its kill)."""
    row_starts = out[0, :, ::64, 0]   # the first row of every query block of every head
    while not done.is_set():
        written = row_starts != 0    # (a computed row starting with exactly 0: never here)
        if written.any() and not written.all():
            t_sent = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)
            sent.append((t_sent, float((row_starts != 0).mean())))
            return
        time.sleep(0)  # (yield only: a sleeping sender wakes late on a busy machine)


def test_ctrl_c_interrupts_a_long_call():
    """SIGINT during a long call raises KeyboardInterrupt promptly and leaves NaN in out.

    The signal is sent from a second thread once the call is seen running (part of `out`
    written), never after a timer, so the test holds on a fast machine and a loaded one.
    The call is sized from an uninterrupted run to check for signals at least 6 times;
    "promptly" is 0.5 s, or under half that run's time, or under 3 check intervals at the
    interrupted call's own pace, where the cores are so busy that a check's work takes
    longer. A signal that lands after the call's end leaves `out` complete, and a call that
    ends before the sender saw it running is repeated twice as long: either attempt is
    repeated, up to 12, while a kernel that never checks for signals fails every one.

    Python's own Ctrl-C handler is installed for the test: a process started in the
    background by a non-interactive shell (as some CI runners start the suite) inherits
    SIGINT ignored, and Python then installs none, so no signal would reach the call."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_ctrl_c_interrupts_a_long_call()
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_ctrl_c_interrupts_a_long_call():
    rng = np.random.default_rng(5)
    heads = 16
    while True:
        q = rng.standard_normal((1, heads, 4096, 64)).astype(np.float32)
        t0 = time.perf_counter()
        sdpa(q, q, q, num_threads=2)
        uninterrupted = time.perf_counter() - t0
        checks = _kernel.last_call_stats()["interrupt_checks"]
        if checks >= 6 or heads >= 128:
            break
        heads *= 2
    outcomes = []
    for _ in range(12):
        out = np.zeros_like(q)
        sent, done = [], threading.Event()
        sender = threading.Thread(target=_interrupt_once_running, args=(out, sent, done))
        sender.start()
        interrupted_at = None
        started = time.perf_counter()
        try:
            try:
                sdpa(q, q, q, out=out, num_threads=2)
                time.sleep(0.5)  # (a signal on its way after the call is raised here)
            finally:
                done.set()
                sender.join()  # (then `sent` holds what the sender recorded after its kill)
        except KeyboardInterrupt:
            interrupted_at = time.perf_counter()
            sender.join()
        if not sent:
            outcomes.append(f"the call of {q.shape[1]} heads ended before the signal was "
                            f"sent")
            if q.shape[1] < 256:
                q = np.concatenate([q, q], axis=1)
            continue
        if interrupted_at is not None and np.isnan(out).all():
            latency = interrupted_at - sent[0][0]
            # (the time between two checks at this attempt's own pace: the share written by
            # the kill over the time it took, 3 intervals of margin; a busier machine than
            # the uninterrupted run's slows both)
            pace = 3 * (sent[0][0] - started) / max(sent[0][1], 1 / 16) / (checks + 1)
            print(f"{heads} heads, {checks} checks, {uninterrupted:.2f} s uninterrupted, "
                  f"Ctrl-C answered in {latency * 1e3:.0f} ms")
            assert latency < max(0.5, uninterrupted / 2, pace), (
                f"Ctrl-C took {latency:.2f} s (checks every ~{pace / 3:.2f} s at this pace)")
            return
        outcomes.append(f"the signal was sent with {sent[0][1]:.0%} of the call done and "
                        + ("reached Python after its end" if interrupted_at is not None
                           else "never reached Python"))
    pytest.fail("no attempt interrupted the call: " + "; ".join(outcomes))

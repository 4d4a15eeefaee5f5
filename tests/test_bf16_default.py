"""The default path of bfloat16 products, decided per CPU: AMX where the CPU has it, the
widened float32 products where it has no bfloat16 instructions, and between vdpbf16ps and
the widened products, by timing both on the CPU itself at the first call that multiplies
bfloat16. The decision is
tested with faked CPUs and timings (never real ones: a test must not depend on the load)."""
import os
import subprocess
import sys

import pytest

import cattn
from cattn import _kernel, _runtime

AVX512_BF16_CPU = ["avx512_bf16", "avx512", "avx2", "portable"]


class FakeTimer:
    """time_path with fixed seconds per path; records the order of the calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, path):
        self.calls.append(path)
        value = self.seconds[path]
        return value.pop(0) if isinstance(value, list) else value


def never_timed(path):
    raise AssertionError(f"timed {path} where nothing needs measuring")


@pytest.mark.parametrize("supported, expected", [
    (["amx", "avx512_bf16", "avx512", "avx2", "portable"], "amx"),
    (["avx512", "avx2", "portable"], "avx512"),
    (["avx2", "portable"], "avx2"),
    (["portable"], "portable"),
])
def test_cpus_with_one_candidate_are_not_timed(supported, expected):
    path, reason = _runtime.choose_bf16_path(supported, never_timed)
    assert path == expected
    assert ("AMX" in reason) if expected == "amx" else ("no bfloat16 instructions" in reason)


@pytest.mark.parametrize("native_s, widened_s, expected", [
    (1.0, 1.6, "avx512_bf16"),   # Zen 5's 1.4-1.65x
    (1.0, 0.8, "avx512"),        # Sapphire Rapids without its tiles: slower
    (1.0, 1.0, "avx512"),        # a tie keeps P unrounded
    (1.0, 1.03, "avx512"),       # within the margin
])
def test_the_faster_measured_path_wins(native_s, widened_s, expected):
    """(catches a swapped comparison, or a margin that favors the rounding path)"""
    timer = FakeTimer({"avx512_bf16": native_s, "avx512": widened_s})
    path, reason = _runtime.choose_bf16_path(AVX512_BF16_CPU, timer)
    assert path == expected
    assert f"{widened_s / native_s:.2f}x" in reason and "measured" in reason


def test_the_paths_are_timed_interleaved_and_by_median():
    """Both paths alternate (a load that drifts during the calibration hits both alike), and
    one disturbed run does not decide (the median, not the mean or the minimum)."""
    rounds = _runtime.BF16_CALIBRATION_ROUNDS
    native = [1.0] * rounds
    native[0] = 50.0                       # one run delayed by another process
    widened = [1.5] * rounds
    widened[1] = 0.01                      # one run implausibly fast
    timer = FakeTimer({"avx512_bf16": native, "avx512": widened})
    path, _ = _runtime.choose_bf16_path(AVX512_BF16_CPU, timer)
    assert path == "avx512_bf16"
    assert timer.calls == ["avx512_bf16", "avx512"] * rounds


def test_without_a_timer_the_widened_path():
    path, reason = _runtime.choose_bf16_path(AVX512_BF16_CPU)
    assert path == "avx512" and "not measured" in reason


def test_a_failing_calibration_leaves_the_widened_path():
    """(it runs inside the user's first call: an error there must not fail that call)"""
    pytest.importorskip("ml_dtypes")

    def broken(path):
        raise MemoryError("no memory for the probe")

    path, reason = _runtime.calibrate_bf16_path(AVX512_BF16_CPU, broken)
    assert path == "avx512" and "calibration failed" in reason and "MemoryError" in reason


def test_the_calibration_probe_times_a_bfloat16_call():
    pytest.importorskip("ml_dtypes")
    seconds = _runtime.time_bf16_call("avx512")
    assert seconds > 0
    assert _kernel.last_call_stats()["isa"] == "avx512"


def test_show_config_says_which_path_and_why():
    products = cattn.show_config()["bfloat16_products"]
    assert products["path"] == cattn.show_config()["isa"]
    assert products["path"] in _kernel.supported_isa_paths()
    assert isinstance(products["reason"], str) and products["reason"]
    if "avx512_bf16" not in _kernel.supported_isa_paths():
        assert products["reason"] == _runtime.choose_bf16_path(
            _kernel.supported_isa_paths())[1]


def test_an_asked_path_is_not_measured():
    env = dict(os.environ, CATTN_ISA="avx2")
    code = ("import json, cattn; print(json.dumps(cattn.show_config()['bfloat16_products']))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CATTN_ISA=avx2" in proc.stdout


def test_the_kernel_measures_through_the_runtime():
    """(catches a kernel left without its calibration: a CPU with AVX512-BF16 would then
    keep the widened path unmeasured forever)"""
    assert _kernel._bf16_calibration is _runtime.calibrate_bf16_path


def test_only_a_bfloat16_call_measures():
    """A float32 call leaves the bfloat16 default unsettled (no probe, no ml_dtypes import:
    tens of milliseconds in a float32 user's first call); the first call with bfloat16
    values settles it, where the CPU has both candidates. Bug caught (on such CPUs): the
    first call of any dtype measures."""
    pytest.importorskip("ml_dtypes")
    child = ("import sys, numpy as np\n"
             "import cattn\n"
             "from cattn import _kernel\n"
             "q = np.ones((1, 2, 5, 8), np.float32)\n"
             "cattn.scaled_dot_product_attention(q, q, q)\n"
             "print(_kernel.BF16_PATH_REASON is None, 'ml_dtypes' in sys.modules)\n"
             "import ml_dtypes\n"
             "h = q.astype(ml_dtypes.bfloat16)\n"
             "cattn.scaled_dot_product_attention(h, h, h)\n"
             "print(_kernel.BF16_PATH_REASON)\n")
    env = {name: value for name, value in os.environ.items() if name != "CATTN_ISA"}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after_float32, after_bfloat16 = proc.stdout.splitlines()
    assert after_float32 == "True False"
    paths = _kernel.supported_isa_paths()
    if "avx512_bf16" in paths and "amx" not in paths:
        assert after_bfloat16.startswith("measured at first use")
    else:
        assert after_bfloat16 == "None"

"""The benchmark's ceilings: the register-only FMA peak (what no kernel can pass, whatever
the library sgemm reaches), and the GEMM library with the core type it runs, with a warning
when OPENBLAS_CORETYPE forces one. (Values are not compared with anything: they depend on
the CPU and its load.)"""
import math

import pytest

from cattn import _kernel
from cattn.bench import probes
from cattn.bench.report import ceiling_lines, format_header


@pytest.mark.parametrize("path", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("is_double", [False, True])
def test_fma_peak_of_each_path(path, is_double):
    if path not in _kernel.supported_isa_paths():
        with pytest.raises(ValueError, match="not available on this CPU"):
            _kernel.fma_peak(path, is_double, 1, 0.001)
        return
    for threads in (1, 2):
        peak = _kernel.fma_peak(path, is_double, threads, 0.001)
        assert math.isfinite(peak) and peak > 0


@pytest.mark.parametrize("path", ["wide16", "blas"])
def test_fma_peak_refuses_the_test_paths(path):
    with pytest.raises(ValueError, match="avx512, avx2 and portable"):
        _kernel.fma_peak(path)


def test_machine_info_names_peaks_and_gemm_library(monkeypatch):
    monkeypatch.setattr(probes, "fma_peaks",
                        lambda threads: {f"float32 avx2 {n}t": 1.0 for n in threads})
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    info = probes.machine_info(["cattn"], [1, 2])
    assert set(info["fma_peak_gflops"]) == {"float32 avx2 1t", "float32 avx2 2t"}
    assert info["openblas_coretype"] == "Haswell"
    for lib in info["gemm_libraries"]:
        assert {"internal_api", "version", "architecture"} <= set(lib)
    header = format_header(info)
    assert "FMA peak (registers only, measured): float32 avx2 1t 1 GFLOP/s" in header
    assert "OPENBLAS_CORETYPE=Haswell is set" in header


def test_no_warning_without_coretype():
    assert not any("OPENBLAS_CORETYPE" in line
                   for line in ceiling_lines({"fma_peak_gflops": {}, "gemm_libraries": []}))


def test_fma_peaks_cover_each_vector_path():
    peaks = probes.fma_peaks([1])
    paths = [p for p in probes.PEAK_PATHS if p in _kernel.supported_isa_paths()]
    assert set(peaks) == {f"{d} {p} 1t" for d in ("float32", "float64") for p in paths}


@pytest.mark.parametrize("n", [0, 1, 7, 31, 32, 33, 100, 4099, 65536 + 13])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_stream_sum_reads_every_element(n, threads):
    # The read-rate probe times one pass over the array: a pass that skipped a stretch
    # (or its tail) would report a rate the memory never gave. Integers keep the float32
    # sums exact, so any element missed or read twice changes the result.
    import numpy as np
    x = (np.arange(n) % 7 + 1).astype(np.float32)
    assert _kernel.stream_sum(x, threads) == float(x.astype(np.int64).sum())

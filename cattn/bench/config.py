"""The settings of one benchmark run, passed down to every part that needs them."""
import sys
from dataclasses import dataclass, field
from typing import Callable, List


def _quiet(message: str) -> None:
    pass


def log_to_stderr(message: str) -> None:
    """Progress dots and case timings go to stderr so stdout holds the tables only."""
    sys.stderr.write(message)
    sys.stderr.flush()


@dataclass
class BenchConfig:
    """What a run measures and how: thread counts, implementations, repetitions, sizes.

    `ort_op` picks the ONNX Runtime operator: "mha" (com.microsoft MultiHeadAttention,
    float32 only), "attention" (opset 23) or "auto" (MHA for float32, Attention for
    float64). `stream_mib` is the size of the array the streaming-read probes sum over.
    """
    threads: List[int] = field(default_factory=lambda: [1])
    impls: List[str] = field(default_factory=lambda: ["cattn", "numpy", "torch", "ort"])
    reps: int = 7
    warmup: int = 1
    min_timing: float = 0.02
    gemm_n: int = 2048
    ort_op: str = "auto"
    stream_mib: int = 512
    check: bool = True
    seed: int = 0
    quick: bool = False
    log: Callable[[str], None] = _quiet

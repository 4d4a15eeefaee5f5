"""Result rows: what one run measured, as dataclasses that write themselves as JSON.

Fields marked `OMIT_IF_NONE` exist for some kinds of case only (decode bandwidth, the
stream probe, the grouped case's prefill yardstick) and are left out of the JSON when
unset, so each kind of row keeps its keys.
"""
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

OMIT_IF_NONE = {"omit_if_none": True}


class JsonRow:
    """to_json(): the fields in declaration order, nested rows written as JSON too."""

    def to_json(self) -> Dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]  # every JsonRow is a dataclass
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _json_value(value)
        return out


def _json_value(value: Any) -> Any:
    if isinstance(value, JsonRow):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


@dataclass
class TimedRow(JsonRow):
    """One runner of a round-robin: its times (seconds per call) and how it was called."""
    label: str
    impl: str
    threads: int
    kind: str
    median_s: float
    min_s: float
    times_s: List[float]
    calls_per_timing: int
    note: str


@dataclass
class CeilingRow(TimedRow):
    """The large square GEMM of the same round-robin: the compute ceiling."""
    gflops: float = 0.0


@dataclass
class StreamRow(TimedRow):
    """A read-only pass over a large array: the memory-bandwidth ceiling."""
    gbps: float = 0.0


@dataclass
class AttentionRow(TimedRow):
    """One implementation on one spec at one thread count, and its ratios within the case."""
    options: str = "full"
    gflops: float = 0.0
    gflops_useful: float = 0.0
    max_abs_diff: Optional[float] = None
    peak_extra_mib: Optional[float] = None
    kv_gbps: Optional[float] = field(default=None, metadata=OMIT_IF_NONE)
    pct_of_gemm: Optional[float] = None
    pct_of_stream: Optional[float] = field(default=None, metadata=OMIT_IF_NONE)
    # a grouped case's decode: GFLOP/s as % of the same run's cattn prefill, same threads
    pct_of_prefill: Optional[float] = field(default=None, metadata=OMIT_IF_NONE)
    cattn_speedup: Optional[float] = None
    speedup_vs_1t: Optional[float] = None


@dataclass
class MemoryRow(JsonRow):
    """Peak extra memory of one implementation, measured in a fresh process."""
    label: str
    impl: str
    threads: int
    kind: str
    options: str
    peak_rss_mib: float
    peak_traced_mib: Optional[float]


@dataclass
class BlockGemmRow(JsonRow):
    """BLAS on one of the kernel's block shapes, against the large GEMM."""
    label: str
    impl: str
    threads: int
    kind: str
    median_s: float
    times_s: List[float]
    gflops: float
    pct_of_gemm: float
    note: str


@dataclass
class SkippedRun(JsonRow):
    """An implementation that could not run a spec, and why."""
    label: str
    impl: str
    threads: Optional[int]
    options: Optional[str]
    reason: str


@dataclass
class WrongOutput(JsonRow):
    """An implementation whose output missed the float64 reference: never timed."""
    label: str
    impl: str
    threads: int
    options: str
    max_abs_diff: float


@dataclass
class Case(JsonRow):
    """One round-robin (or one memory or block-GEMM measurement) and its rows."""
    name: str
    kind: str
    spec: Dict[str, Any]
    options: List[str]
    threads: List[int]
    rows: List[Any]
    gemm_gflops: Dict[str, float] = field(default_factory=dict)
    stream_gbps: Dict[str, float] = field(default_factory=dict)
    stream_probe: Optional[Dict[str, str]] = field(default=None, metadata=OMIT_IF_NONE)
    skipped: List[SkippedRun] = field(default_factory=list)
    wrong_output: List[WrongOutput] = field(default_factory=list)
    timing_s: float = 0.0
    method: Optional[str] = field(default=None, metadata=OMIT_IF_NONE)
    workload: Optional[str] = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class Check(JsonRow):
    """One measured value against a target's threshold."""
    where: str
    value: Optional[float]
    need: float
    passed: bool

    def to_json(self) -> Dict[str, Any]:
        return {"where": self.where, "value": self.value, "need": self.need,
                "pass": self.passed}


@dataclass
class Target(JsonRow):
    """A performance target, named by what it measures, and its verdict in this run."""
    id: str
    target: str
    measured: str
    verdict: str
    indicative: bool = False
    details: List[Check] = field(default_factory=list)

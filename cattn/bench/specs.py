"""Workload specs: one attention problem (shape, dtype, options), its inputs, and the
float64 truth its outputs are checked against."""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

CHECK_ROWS = 1024  # rows of one (batch, head) item checked against the float64 reference
NARROW_KV = (None, "float16", "bfloat16", "int8")


@dataclass
class Spec:
    """One attention problem: shape, dtype and the options that define what is computed."""
    B: int
    H: int
    L: int
    S: int
    E: int
    dtype: Any = "float32"
    causal: bool = False
    window: Optional[Tuple[Optional[int], Optional[int]]] = None
    return_weights: bool = False
    sinks: bool = False  # one attention-sink logit per head (sink_logits)
    page_size: Optional[int] = None  # keys and values read from a paged cache of such pages
    # keys and values stored narrower: "float16" or "bfloat16" (the queries and the output
    # too, computed in float32), "int8" (per-key scales, float32 queries); None: dtype
    kv: Optional[str] = None

    def __post_init__(self) -> None:
        self.B, self.H, self.L, self.S, self.E = (int(self.B), int(self.H), int(self.L),
                                                  int(self.S), int(self.E))
        self.dtype = np.dtype(self.dtype)
        self.causal = bool(self.causal)
        self.window = None if self.window is None else (self.window[0], self.window[1])
        self.return_weights = bool(self.return_weights)
        self.sinks = bool(self.sinks)
        self.page_size = None if self.page_size is None else int(self.page_size)
        if self.kv not in NARROW_KV:
            raise ValueError(f"kv must be one of {NARROW_KV}, got {self.kv!r}")

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Spec":
        return cls(d["B"], d["H"], d["L"], d["S"], d["E"], d["dtype"], d["causal"],
                   d["window"], d["return_weights"], d.get("sinks", False),
                   d.get("page_size"), d.get("kv"))

    @property
    def shape(self) -> Tuple[int, int, int, int, int]:
        return (self.B, self.H, self.L, self.S, self.E)

    def options(self) -> str:
        """The option part of the label."""
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append("window=%s,%s" % self.window)
        if self.return_weights:
            parts.append("weights")
        if self.sinks:
            parts.append("sinks")
        if self.page_size is not None:
            parts.append(f"paged={self.page_size}")
        if self.kv is not None:
            parts.append(self.kv if self.kv != "int8" else "int8-kv")
        return "+".join(parts) or "full"

    def flops(self) -> float:
        """Dense-equivalent flops: 4*B*H*L*S*E."""
        return 4.0 * self.B * self.H * self.L * self.S * self.E

    def visible_pairs(self) -> float:
        """How many (query, key) pairs are visible (per batch item and head)."""
        if not self.causal and self.window is None:
            return float(self.L) * self.S
        from cattn.reference import visible_keys
        # One boolean mask, 64 MiB at L = S = 8192: built once per spec, not per timing.
        return float(visible_keys(self.L, self.S, self.causal, self.window).sum())

    def useful_flops(self) -> float:
        return 4.0 * self.B * self.H * self.E * self.visible_pairs()

    def kv_bytes(self) -> float:
        """Bytes of K and V the call reads (int8: with one float32 scale per key each)."""
        per_element = {None: self.dtype.itemsize, "float16": 2, "bfloat16": 2, "int8": 1}
        scales = 2.0 * self.B * self.H * self.S * 4 if self.kv == "int8" else 0.0
        return 2.0 * self.B * self.H * self.S * self.E * per_element[self.kv] + scales

    def to_json(self) -> Dict[str, Any]:
        return {"B": self.B, "H": self.H, "L": self.L, "S": self.S, "E": self.E,
                "dtype": self.dtype.name, "causal": self.causal,
                "window": None if self.window is None else list(self.window),
                "return_weights": self.return_weights, "sinks": self.sinks,
                "page_size": self.page_size, "kv": self.kv, "options": self.options()}


def sink_logits(spec: Spec):
    """The spec's attention sinks: one logit per head, spread over [-1, 2] (of the order
    of the scores of N(0, 1) inputs), or None."""
    return np.linspace(-1, 2, spec.H).astype(spec.dtype) if spec.sinks else None


def make_inputs(spec: Spec, seed: int = 0):
    """q, k, v: C-contiguous (B, H, L|S, E) arrays of spec.dtype, N(0, 1) entries."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((spec.B, spec.H, spec.L, spec.E), dtype=np.float32)
    k = rng.standard_normal((spec.B, spec.H, spec.S, spec.E), dtype=np.float32)
    v = rng.standard_normal((spec.B, spec.H, spec.S, spec.E), dtype=np.float32)
    return tuple(x.astype(spec.dtype, copy=False) for x in (q, k, v))


def reference_check_slice(spec: Spec, q, k, v):
    """(rows, expected): the float64 reference for item (0, 0) and a set of query rows
    (all rows when L <= CHECK_ROWS, else the first and the last CHECK_ROWS/2 rows, where
    a causal query sees the most keys). Built with an explicit mask so slicing rows keeps
    the causal/window diagonal in place."""
    from cattn.reference import scaled_dot_product_attention as ref, visible_keys
    L = spec.L
    if L <= CHECK_ROWS:
        rows = np.arange(L)
    else:
        half = CHECK_ROWS // 2
        rows = np.concatenate([np.arange(half), np.arange(L - half, L)])
    q64 = q[0, 0, rows].astype(np.float64)
    k64 = k[0, 0].astype(np.float64)
    v64 = v[0, 0].astype(np.float64)
    mask = None
    if spec.causal or spec.window is not None:
        mask = visible_keys(L, spec.S, spec.causal, spec.window)[rows]
    scale = 1.0 / math.sqrt(spec.E)
    sinks = None if not spec.sinks else sink_logits(spec)[0].astype(np.float64)
    return rows, ref(q64, k64, v64, attn_mask=mask, scale=scale, sinks=sinks)


def max_abs_diff(out, rows, expected) -> float:
    got = np.asarray(out)[0, 0, rows].astype(np.float64)
    return float(np.max(np.abs(got - expected))) if got.size else 0.0


def narrow_inputs(spec: Spec, q, k, v):
    """(q, k, v, scales) as the spec stores them: float16 or bfloat16 copies, or int8 keys
    and values with their scales (cattn.quantize_kv); made once, outside the timing."""
    if spec.kv is None:
        return q, k, v, {}
    import cattn
    if spec.kv == "int8":
        (k8, k_scale), (v8, v_scale) = cattn.quantize_kv(k), cattn.quantize_kv(v)
        return q, k8, v8, {"k_scale": k_scale, "v_scale": v_scale}
    dtype = np.dtype(np.float16) if spec.kv == "float16" else _bfloat16()
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), {}


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def tolerance(spec_or_dtype: Any) -> float:
    """Max abs difference to the float64 result on the float32 inputs, for a spec or a
    dtype: float32's rounding; for narrow inputs, their rounding (float16 2**-11, bfloat16
    2**-8 relative, int8 half a step of max/127) carried to outputs of N(0, 1) data."""
    narrow = {"float16": 3e-3, "bfloat16": 3e-2, "int8": 3e-2}
    if isinstance(spec_or_dtype, Spec):
        if spec_or_dtype.kv is not None:
            return narrow[spec_or_dtype.kv]
        spec_or_dtype = spec_or_dtype.dtype
    return 1e-4 if np.dtype(spec_or_dtype) == np.float32 else 1e-10

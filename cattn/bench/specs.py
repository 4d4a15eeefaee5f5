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
    # K/V heads (None: H), each serving H // kv_heads query heads (enable_gqa)
    kv_heads: Optional[int] = None
    # values are the keys' first value_width columns, a view (latent attention's absorbed
    # form: one cache of width E, values of width Ev = value_width); None: own values, Ev = E
    value_width: Optional[int] = None
    # tells the spec from the others of its case when they differ in shape (a prefill
    # yardstick among decodes): the first part of options()
    tag: Optional[str] = None

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
        self.kv_heads = None if self.kv_heads is None else int(self.kv_heads)
        if self.kv_heads is not None and (self.kv_heads < 1 or self.H % self.kv_heads):
            raise ValueError(f"kv_heads must divide H = {self.H}, got {self.kv_heads}")
        self.value_width = None if self.value_width is None else int(self.value_width)
        if self.value_width is not None:
            if not 0 < self.value_width <= self.E:
                raise ValueError(f"value_width must be in 1..E = {self.E}, got "
                                 f"{self.value_width}")
            if self.kv is not None or self.page_size is not None:  # (both copy the values)
                raise ValueError("value_width (values a view of the keys) takes neither kv "
                                 "nor page_size")

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Spec":
        return cls(d["B"], d["H"], d["L"], d["S"], d["E"], d["dtype"], d["causal"],
                   d["window"], d["return_weights"], d.get("sinks", False),
                   d.get("page_size"), d.get("kv"), d.get("kv_heads"), d.get("value_width"),
                   d.get("tag"))

    @property
    def shape(self) -> Tuple[int, int, int, int, int]:
        return (self.B, self.H, self.L, self.S, self.E)

    @property
    def Hkv(self) -> int:
        return self.H if self.kv_heads is None else self.kv_heads

    @property
    def Ev(self) -> int:
        return self.E if self.value_width is None else self.value_width

    @property
    def grouped(self) -> bool:
        """Query heads share K/V heads (the calls take enable_gqa)."""
        return self.Hkv != self.H

    def options(self) -> str:
        """The option part of the label."""
        parts = [] if self.tag is None else [self.tag]
        if self.kv_heads is not None:
            parts.append(f"Hkv={self.kv_heads}")
        if self.value_width is not None:
            parts.append("mla")
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
        """Dense-equivalent flops: 2*B*H*L*S*(E + Ev) (4*B*H*L*S*E when Ev = E)."""
        return 2.0 * self.B * self.H * self.L * self.S * (self.E + self.Ev)

    def visible_pairs(self) -> float:
        """How many (query, key) pairs are visible (per batch item and head)."""
        if not self.causal and self.window is None:
            return float(self.L) * self.S
        from cattn.reference import visible_keys
        # One boolean mask, 64 MiB at L = S = 8192: built once per spec, not per timing.
        return float(visible_keys(self.L, self.S, self.causal, self.window).sum())

    def useful_flops(self) -> float:
        return 2.0 * self.B * self.H * (self.E + self.Ev) * self.visible_pairs()

    def kv_bytes(self) -> float:
        """Bytes of K and V the call reads from memory, Hkv heads of each (int8: with one
        float32 scale per key each); values that are a view of the keys add none."""
        per_element = {None: self.dtype.itemsize, "float16": 2, "bfloat16": 2, "int8": 1}
        scales = 2.0 * self.B * self.Hkv * self.S * 4 if self.kv == "int8" else 0.0
        width = self.E if self.value_width is not None else self.E + self.Ev
        return self.B * self.Hkv * self.S * width * float(per_element[self.kv]) + scales

    def to_json(self) -> Dict[str, Any]:
        return {"B": self.B, "H": self.H, "L": self.L, "S": self.S, "E": self.E,
                "dtype": self.dtype.name, "causal": self.causal,
                "window": None if self.window is None else list(self.window),
                "return_weights": self.return_weights, "sinks": self.sinks,
                "page_size": self.page_size, "kv": self.kv, "kv_heads": self.kv_heads,
                "value_width": self.value_width, "tag": self.tag, "options": self.options()}


def sink_logits(spec: Spec):
    """The spec's attention sinks: one logit per head, spread over [-1, 2] (of the order
    of the scores of N(0, 1) inputs), or None."""
    return np.linspace(-1, 2, spec.H).astype(spec.dtype) if spec.sinks else None


def make_inputs(spec: Spec, seed: int = 0):
    """q (B, H, L, E), k and v (B, Hkv, S, E): C-contiguous arrays of spec.dtype, N(0, 1)
    entries; with value_width, v is the view k[..., :value_width] (no copy)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((spec.B, spec.H, spec.L, spec.E), dtype=np.float32)
    kv_shape = (spec.B, spec.Hkv, spec.S, spec.E)
    k = rng.standard_normal(kv_shape, dtype=np.float32).astype(spec.dtype, copy=False)
    if spec.value_width is not None:
        v = k[..., :spec.value_width]
    else:
        v = rng.standard_normal(kv_shape, dtype=np.float32).astype(spec.dtype, copy=False)
    return q.astype(spec.dtype, copy=False), k, v


def input_key(spec: Spec) -> Tuple[Any, ...]:
    """What make_inputs' arrays depend on: specs with one key share their inputs."""
    return spec.shape + (spec.dtype.name, spec.Hkv, spec.value_width)


def kv_head(spec: Spec, h: int) -> int:
    """The K/V head query head h reads: each K/V head serves H // Hkv consecutive query
    heads (enable_gqa's grouping, as PyTorch's)."""
    return h // (spec.H // spec.Hkv)


def check_heads(spec: Spec) -> Tuple[int, ...]:
    """The query heads checked: head 0, and with grouped heads also heads 1 and H - 1, whose
    K/V heads (0 and Hkv - 1) an implementation that interleaves the groups (h % Hkv) or
    reads K/V head 0 for every query head gets wrong."""
    return tuple(sorted({0, 1, spec.H - 1})) if spec.grouped else (0,)


def reference_check_slice(spec: Spec, q, k, v):
    """(heads, rows, expected): the float64 reference for batch item 0, the query heads of
    check_heads (each against its own K/V head) and a set of query rows (all rows when
    L <= CHECK_ROWS, else the first and the last CHECK_ROWS/2 rows, where a causal query
    sees the most keys). Built with an explicit mask so slicing rows keeps the
    causal/window diagonal in place."""
    from cattn.reference import scaled_dot_product_attention as ref, visible_keys
    L = spec.L
    if L <= CHECK_ROWS:
        rows = np.arange(L)
    else:
        half = CHECK_ROWS // 2
        rows = np.concatenate([np.arange(half), np.arange(L - half, L)])
    mask = None
    if spec.causal or spec.window is not None:
        mask = visible_keys(L, spec.S, spec.causal, spec.window)[rows]
    scale = 1.0 / math.sqrt(spec.E)
    heads = check_heads(spec)
    expected = []
    for h in heads:
        q64 = q[0, h, rows].astype(np.float64)
        k64 = k[0, kv_head(spec, h)].astype(np.float64)
        v64 = v[0, kv_head(spec, h)].astype(np.float64)
        sinks = None if not spec.sinks else sink_logits(spec)[h].astype(np.float64)
        expected.append(ref(q64, k64, v64, attn_mask=mask, scale=scale, sinks=sinks))
    return heads, rows, np.stack(expected)


def max_abs_diff(out, heads, rows, expected) -> float:
    got = np.asarray(out)[0][np.ix_(heads, rows)].astype(np.float64)
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

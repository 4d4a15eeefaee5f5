"""Type signatures of the encoder's fused row operations (cattn/_encoder_ops.pyx)."""
from typing import Any, Optional, Tuple

import numpy as np
from numpy.typing import NDArray

POOL_MEAN: int
POOL_MAX: int
POOL_CLS: int
POOL_MEAN_SQRT_LEN: int

def simd_path() -> str: ...
def bias_gelu(x: NDArray[np.floating], bias: NDArray[np.floating],
              num_threads: Optional[int] = ...) -> None: ...
def bias_residual_layernorm(x: NDArray[np.floating], bias: Optional[NDArray[np.floating]],
                            residual: Optional[NDArray[np.floating]],
                            weight: NDArray[np.floating], beta: NDArray[np.floating],
                            eps: float, out: NDArray[np.floating],
                            num_threads: Optional[int] = ...) -> None: ...
def embed_layernorm(ids: NDArray[np.int64], positions: NDArray[np.int64],
                    token_types: NDArray[np.int64], word: NDArray[np.floating],
                    position: NDArray[np.floating], token_type: NDArray[np.floating],
                    weight: NDArray[np.floating], beta: NDArray[np.floating], eps: float,
                    out: NDArray[np.floating], num_threads: Optional[int] = ...) -> None: ...
def scatter_rows(src: NDArray[np.floating], bias: Optional[NDArray[np.floating]],
                 dest: NDArray[np.int64], dst: NDArray[np.floating],
                 num_threads: Optional[int] = ...) -> None: ...
def gather_rows(src: NDArray[np.floating], index: NDArray[np.int64], dst: NDArray[np.floating],
                num_threads: Optional[int] = ...) -> None: ...
def pool(x: NDArray[np.floating], offsets: NDArray[np.int64], mode: int,
         out: NDArray[np.floating], num_threads: Optional[int] = ...) -> None: ...
def project_scatter(x: NDArray[np.floating], weight: NDArray[Any],
                    bias: NDArray[np.floating], dest: NDArray[np.int64],
                    padded: NDArray[np.floating], scratch: NDArray[np.floating],
                    num_threads: Optional[int] = ..., isa: Optional[str] = ...) -> None: ...
def attention_output_and_feed_forward(
        context: NDArray[np.floating], index: NDArray[np.int64], x: NDArray[np.floating],
        w_out: NDArray[Any], b_out: NDArray[np.floating],
        norm1_weight: NDArray[np.floating], norm1_bias: NDArray[np.floating],
        w_in_t: NDArray[Any], b_in: NDArray[np.floating],
        w_ff_t: NDArray[Any], b_ff: NDArray[np.floating],
        norm2_weight: NDArray[np.floating], norm2_bias: NDArray[np.floating], eps: float,
        scratch_e: NDArray[np.floating], scratch_f: NDArray[np.floating],
        num_threads: Optional[int] = ..., isa: Optional[str] = ...) -> None: ...
def linear_isa(isa: Optional[str] = ...) -> int: ...
def linear_panel_width(dtype: object, isa: Optional[str] = ...) -> int: ...
MATMUL_PRECISIONS: Tuple[str, ...]

def split_bf16_available(isa: Optional[str] = ...) -> bool: ...
def split_packed_shape(n_out: int, n_in: int) -> Tuple[int, int, int, int]: ...
def pack_linear_weight(weight: NDArray[np.floating], isa: Optional[str] = ...,
                       precision: str = ...) -> NDArray[Any]: ...
def linear(x: NDArray[np.floating], packed: NDArray[Any],
           bias: Optional[NDArray[np.floating]], out: NDArray[np.floating],
           isa: Optional[str] = ..., num_threads: Optional[int] = ...) -> None: ...

"""Type signatures of the packed variable-length front (compiled by Cython, see _varlen.py).

varlen_attention returns the output alone, or (output, lse) with return_lse=True (the key
mass last, with return_key_mass=True)."""
from typing import Any, Literal, Optional, Tuple, TypeVar, Union, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn._position_bias import RelativePositionBias

_F = TypeVar("_F", np.float32, np.float64)
_Alignment = Literal["top_left", "bottom_right"]
_KeyMass = Union[bool, Literal["kv_heads"]]
_Window = Optional[Tuple[Optional[int], Optional[int]]]

@overload
def varlen_attention(  # type: ignore[overload-overlap]
    q: NDArray[_F], k: NDArray[_F], v: NDArray[_F], cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike, *, is_causal: bool = ..., alignment: _Alignment = ...,
    window: _Window = ..., softcap: Optional[float] = ..., scale: Optional[float] = ...,
    sinks: Optional[ArrayLike] = ..., keep_first: Optional[int] = ...,
    alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    enable_gqa: bool = ...,
    return_lse: Literal[False] = ..., return_key_mass: Literal[False] = ..., out: Optional[NDArray[Any]] = ...,
    num_threads: Optional[int] = ...,
    k_scale: Optional[ArrayLike] = ..., v_scale: Optional[ArrayLike] = ...,
    out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ..., _isa: Optional[str] = ...,
) -> NDArray[_F]: ...

@overload
def varlen_attention(  # type: ignore[overload-overlap]
    q: NDArray[_F], k: NDArray[_F], v: NDArray[_F], cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike, *, is_causal: bool = ..., alignment: _Alignment = ...,
    window: _Window = ..., softcap: Optional[float] = ..., scale: Optional[float] = ...,
    sinks: Optional[ArrayLike] = ..., keep_first: Optional[int] = ...,
    alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    enable_gqa: bool = ...,
    return_lse: Literal[True], return_key_mass: Literal[False] = ..., out: Optional[NDArray[Any]] = ...,
    num_threads: Optional[int] = ...,
    k_scale: Optional[ArrayLike] = ..., v_scale: Optional[ArrayLike] = ...,
    out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ..., _isa: Optional[str] = ...,
) -> Tuple[NDArray[_F], NDArray[_F]]: ...

@overload
def varlen_attention(
    q: NDArray[_F], k: NDArray[_F], v: NDArray[_F], cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike, *, is_causal: bool = ..., alignment: _Alignment = ...,
    window: _Window = ..., softcap: Optional[float] = ..., scale: Optional[float] = ...,
    sinks: Optional[ArrayLike] = ..., keep_first: Optional[int] = ...,
    alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    enable_gqa: bool = ...,
    return_lse: bool = ..., return_key_mass: _KeyMass = ..., out: Optional[NDArray[Any]] = ...,
    num_threads: Optional[int] = ...,
    k_scale: Optional[ArrayLike] = ..., v_scale: Optional[ArrayLike] = ...,
    out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ..., _isa: Optional[str] = ...,
) -> Union[NDArray[_F], Tuple[NDArray[_F], ...]]: ...

# float16, bfloat16 or int8 inputs, DLPack producers (CPU PyTorch tensors): the result's
# dtype is only known at run time.
@overload
def varlen_attention(
    q: Any, k: Any, v: Any, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike, *,
    is_causal: bool = ..., alignment: _Alignment = ..., window: _Window = ...,
    softcap: Optional[float] = ..., scale: Optional[float] = ...,
    sinks: Optional[ArrayLike] = ..., keep_first: Optional[int] = ...,
    alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    enable_gqa: bool = ..., return_lse: bool = ..., return_key_mass: _KeyMass = ...,
    out: Optional[NDArray[Any]] = ...,
    num_threads: Optional[int] = ...,
    k_scale: Optional[ArrayLike] = ..., v_scale: Optional[ArrayLike] = ...,
    out_dtype: Optional[DTypeLike] = ..., _block_sizes: Optional[Tuple[int, int]] = ...,
    _isa: Optional[str] = ...,
) -> Any: ...

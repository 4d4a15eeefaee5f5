"""Type signatures of the validating front, which is compiled by Cython (see _api.py).

The result of scaled_dot_product_attention depends on its flags: the output alone, or a
tuple of the output with the attention weights and/or the log-sum-exp, in that order (and
the key mass last, with return_key_mass=True).
"""
from typing import Any, Literal, Optional, Protocol, Sequence, Tuple, TypeVar, Union, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn._position_bias import RelativePositionBias

_F = TypeVar("_F", np.float32, np.float64)
_Alignment = Literal["top_left", "bottom_right"]
_KeyMass = Union[bool, Literal["kv_heads"]]


class _DLPackArray(Protocol):
    """A CPU tensor of another library (PyTorch...), read as a NumPy view without a copy."""
    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __dlpack_device__(self) -> Any: ...

@overload
def scaled_dot_product_attention(  # type: ignore[overload-overlap]
    query: NDArray[_F], key: NDArray[_F], value: NDArray[_F],
    attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., scale: Optional[float] = ...,
    *, enable_gqa: bool = ..., window: Optional[Tuple[Optional[int], Optional[int]]] = ...,
    alignment: _Alignment = ..., key_lengths: Union[int, ArrayLike, None] = ...,
    q_offset: Union[int, ArrayLike, None] = ..., k_offset: Union[int, ArrayLike, None] = ...,
    softcap: Optional[float] = ..., sinks: Optional[ArrayLike] = ...,
    keep_first: Optional[int] = ..., alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    return_lse: Literal[False] = ..., return_weights: Literal[False] = ...,
    return_key_mass: Literal[False] = ...,
    out: Optional[NDArray[_F]] = ..., num_threads: Optional[int] = ...,
    dropout_p: float = ..., k_scale: Optional[ArrayLike] = ...,
    v_scale: Optional[ArrayLike] = ..., out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ...,
    _isa: Optional[str] = ...,
    _heads_last: bool = ...,
) -> NDArray[_F]: ...

@overload
def scaled_dot_product_attention(  # type: ignore[overload-overlap]
    query: NDArray[_F], key: NDArray[_F], value: NDArray[_F],
    attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., scale: Optional[float] = ...,
    *, enable_gqa: bool = ..., window: Optional[Tuple[Optional[int], Optional[int]]] = ...,
    alignment: _Alignment = ..., key_lengths: Union[int, ArrayLike, None] = ...,
    q_offset: Union[int, ArrayLike, None] = ..., k_offset: Union[int, ArrayLike, None] = ...,
    softcap: Optional[float] = ..., sinks: Optional[ArrayLike] = ...,
    keep_first: Optional[int] = ..., alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    return_lse: Literal[True], return_weights: Literal[False] = ...,
    return_key_mass: Literal[False] = ...,
    out: Optional[NDArray[_F]] = ..., num_threads: Optional[int] = ...,
    dropout_p: float = ..., k_scale: Optional[ArrayLike] = ...,
    v_scale: Optional[ArrayLike] = ..., out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ...,
    _isa: Optional[str] = ...,
    _heads_last: bool = ...,
) -> Tuple[NDArray[_F], NDArray[_F]]: ...

@overload
def scaled_dot_product_attention(  # type: ignore[overload-overlap]
    query: NDArray[_F], key: NDArray[_F], value: NDArray[_F],
    attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., scale: Optional[float] = ...,
    *, enable_gqa: bool = ..., window: Optional[Tuple[Optional[int], Optional[int]]] = ...,
    alignment: _Alignment = ..., key_lengths: Union[int, ArrayLike, None] = ...,
    q_offset: Union[int, ArrayLike, None] = ..., k_offset: Union[int, ArrayLike, None] = ...,
    softcap: Optional[float] = ..., sinks: Optional[ArrayLike] = ...,
    keep_first: Optional[int] = ..., alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    return_lse: Literal[False] = ..., return_weights: Literal[True],
    return_key_mass: Literal[False] = ...,
    out: Optional[NDArray[_F]] = ..., num_threads: Optional[int] = ...,
    dropout_p: float = ..., k_scale: Optional[ArrayLike] = ...,
    v_scale: Optional[ArrayLike] = ..., out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ...,
    _isa: Optional[str] = ...,
    _heads_last: bool = ...,
) -> Tuple[NDArray[_F], NDArray[_F]]: ...

@overload
def scaled_dot_product_attention(  # type: ignore[overload-overlap]
    query: NDArray[_F], key: NDArray[_F], value: NDArray[_F],
    attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., scale: Optional[float] = ...,
    *, enable_gqa: bool = ..., window: Optional[Tuple[Optional[int], Optional[int]]] = ...,
    alignment: _Alignment = ..., key_lengths: Union[int, ArrayLike, None] = ...,
    q_offset: Union[int, ArrayLike, None] = ..., k_offset: Union[int, ArrayLike, None] = ...,
    softcap: Optional[float] = ..., sinks: Optional[ArrayLike] = ...,
    keep_first: Optional[int] = ..., alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    return_lse: Literal[True], return_weights: Literal[True],
    return_key_mass: Literal[False] = ...,
    out: Optional[NDArray[_F]] = ..., num_threads: Optional[int] = ...,
    dropout_p: float = ..., k_scale: Optional[ArrayLike] = ...,
    v_scale: Optional[ArrayLike] = ..., out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ...,
    _isa: Optional[str] = ...,
    _heads_last: bool = ...,
) -> Tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...

@overload
def scaled_dot_product_attention(
    query: NDArray[_F], key: NDArray[_F], value: NDArray[_F],
    attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., scale: Optional[float] = ...,
    *, enable_gqa: bool = ..., window: Optional[Tuple[Optional[int], Optional[int]]] = ...,
    alignment: _Alignment = ..., key_lengths: Union[int, ArrayLike, None] = ...,
    q_offset: Union[int, ArrayLike, None] = ..., k_offset: Union[int, ArrayLike, None] = ...,
    softcap: Optional[float] = ..., sinks: Optional[ArrayLike] = ...,
    keep_first: Optional[int] = ..., alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    return_lse: bool = ..., return_weights: bool = ..., return_key_mass: _KeyMass = ...,
    out: Optional[NDArray[_F]] = ..., num_threads: Optional[int] = ...,
    dropout_p: float = ..., k_scale: Optional[ArrayLike] = ...,
    v_scale: Optional[ArrayLike] = ..., out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ...,
    _isa: Optional[str] = ...,
    _heads_last: bool = ...,
) -> Union[NDArray[_F], Tuple[NDArray[_F], ...]]: ...

# DLPack producers (CPU PyTorch tensors): the dtype is only known at run time.
@overload
def scaled_dot_product_attention(
    query: Union[_DLPackArray, NDArray[Any]], key: Union[_DLPackArray, NDArray[Any]],
    value: Union[_DLPackArray, NDArray[Any]],
    attn_mask: Optional[Any] = ..., is_causal: bool = ..., scale: Optional[float] = ...,
    *, enable_gqa: bool = ..., window: Optional[Tuple[Optional[int], Optional[int]]] = ...,
    alignment: _Alignment = ..., key_lengths: Union[int, ArrayLike, None] = ...,
    q_offset: Union[int, ArrayLike, None] = ..., k_offset: Union[int, ArrayLike, None] = ...,
    softcap: Optional[float] = ..., sinks: Optional[ArrayLike] = ...,
    keep_first: Optional[int] = ..., alibi_slopes: Optional[ArrayLike] = ...,
    position_bias: Optional[RelativePositionBias] = ...,
    return_lse: bool = ..., return_weights: bool = ..., return_key_mass: _KeyMass = ...,
    out: Optional[NDArray[Any]] = ..., num_threads: Optional[int] = ...,
    dropout_p: float = ..., k_scale: Optional[ArrayLike] = ...,
    v_scale: Optional[ArrayLike] = ..., out_dtype: Optional[DTypeLike] = ...,
    _block_sizes: Optional[Tuple[int, int]] = ...,
    _isa: Optional[str] = ...,
    _heads_last: bool = ...,
) -> Any: ...


@overload
def merge_attention(outputs: Sequence[NDArray[_F]],
                    lses: Sequence[NDArray[_F]]) -> Tuple[NDArray[_F], NDArray[_F]]: ...
@overload
def merge_attention(outputs: Sequence[NDArray[Any]],
                    lses: Sequence[NDArray[Any]]) -> Tuple[NDArray[Any], NDArray[Any]]: ...

"""T5's relative position bias, for the kernel: a learned value per head and bucket of the
key - query distance (exact buckets near the diagonal, log-spaced ones up to max_distance,
one bucket beyond), looked up per distance inside the kernel, never as an (L, S) array."""
import math
from typing import Any, Tuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from cattn._validation import check_flag, check_int, check_ndarray, reject_masked


def relative_position_bucket(relative_position: ArrayLike, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128
                             ) -> NDArray[np.int64]:
    """T5's bucket of each key - query distance (an integer array), as transformers'
    T5Attention._relative_position_bucket computes it (its logarithm in float32)."""
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):  # (log 0 only where the exact bucket is taken)
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64),
                       num_buckets - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class RelativePositionBias:
    """T5's bucketed relative position bias, for `position_bias=`.

    Parameters
    ----------
    table : array (num_buckets, H)
        The learned bias of each bucket and head (T5's `relative_attention_bias.weight`).
    num_buckets, max_distance : int
        T5's bucketing: half the buckets (per direction, when bidirectional) are exact
        distances, the rest log-spaced up to max_distance; farther keys share the last.
    bidirectional : bool
        True for an encoder (keys on both sides have their own buckets), False for a
        decoder (keys after the query share bucket 0).

    The score of query i and key j gains table[bucket(p_j - p_i), h], p their global
    positions (the call's diagonal, q_offset and k_offset), as transformers'
    T5Attention.compute_bias gives it.

    Raises
    ------
    TypeError
        A table that is not an array, sizes that are not integers, a flag not a bool.
    ValueError
        A table that is not (num_buckets, H) floats, or holds non-finite values; a
        max_distance not beyond the exact buckets (T5's log-spaced ones need it).

    See Also
    --------
    scaled_dot_product_attention : takes it as `position_bias=`.

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 4, 6, 8))
    >>> t5 = cattn.RelativePositionBias(rng.standard_normal((32, 4)), num_buckets=32,
    ...                                 max_distance=128, bidirectional=True)
    >>> cattn.scaled_dot_product_attention(q, k, v, position_bias=t5).shape
    (1, 4, 6, 8)
    """

    def __init__(self, table: NDArray[Any], *, num_buckets: int, max_distance: int,
                 bidirectional: bool) -> None:
        check_ndarray(table, "table", " of float32 or float64")
        reject_masked(table, "table")
        self.num_buckets = check_int(num_buckets, "num_buckets", 2)
        self.max_distance = check_int(max_distance, "max_distance", 1)
        self.bidirectional = check_flag(bidirectional, "bidirectional")
        if table.dtype.kind != "f" or table.ndim != 2 or table.shape[0] != self.num_buckets:
            raise ValueError(f"table must be a float (num_buckets, H) = ({self.num_buckets}, "
                             f"H) array, got {table.dtype} {table.shape}")
        exact = self.num_buckets // 4 if self.bidirectional else self.num_buckets // 2
        if exact < 1 or self.max_distance <= exact:
            # (T5's log-spaced buckets divide by log(max_distance / exact))
            raise ValueError(f"max_distance must exceed the {exact} distances that have "
                             f"buckets of their own (num_buckets // "
                             f"{4 if self.bidirectional else 2}, at least 1), got "
                             f"num_buckets={self.num_buckets}, max_distance="
                             f"{self.max_distance}")
        if not np.isfinite(table).all():
            raise ValueError("table must hold finite values")
        self.table = table
        distances = np.arange(-self.max_distance, self.max_distance + 1)
        # (H, 2·max_distance + 1): each head's bias by distance; farther ones are clamped
        # to the ends, whose buckets every farther distance shares
        self.by_distance = np.ascontiguousarray(table[relative_position_bucket(
            distances, self.bidirectional, self.num_buckets, self.max_distance)].T)

    def __repr__(self) -> str:
        return (f"RelativePositionBias(table of shape {self.table.shape}, num_buckets="
                f"{self.num_buckets}, max_distance={self.max_distance}, bidirectional="
                f"{self.bidirectional})")

    def per_item(self, batch_shape: Tuple[int, ...], dtype: DTypeLike) -> NDArray[Any]:
        """(n_items, 2·max_distance + 1) contiguous in dtype, heads on batch_shape[-1]."""
        heads = self.by_distance.shape[0]
        if not batch_shape or batch_shape[-1] != heads:
            raise ValueError(f"position_bias has {heads} heads, the call "
                             f"{batch_shape[-1] if batch_shape else 0} query heads")
        return np.ascontiguousarray(np.broadcast_to(
            self.by_distance.astype(dtype), batch_shape + self.by_distance.shape[1:]
        ).reshape(-1, self.by_distance.shape[1]))

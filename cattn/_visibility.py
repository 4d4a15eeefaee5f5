"""Which (query, key) pairs are visible: the one rule of the task planners and the
reference (the kernel applies the same rule in C, in `task_of` and its row loops, and is
tested against this one).

Within one item, query i and key j are local indices; the item's diagonal `diag` is the
key index that sits at query 0's position (a causal query i sees keys up to i + diag).
Key j is visible to query i when

    j < kv_len                                  (the item's valid keys)
    j <= i + diag + right                       (the window's right side; causal: 0)
    j >= i + diag - left   or   j < kept        (the left side; the first `kept` keys
                                                 stay visible past it)

A side of None is no limit. Every argument may be an array (one value per item, say):
they broadcast as in NumPy.
"""
import numpy as np


def visible(i, j, diag, kv_len, left=None, right=None, kept=0):
    """Boolean: whether key j is visible to query i (broadcast over all arguments)."""
    seen = np.asarray(j + 0 * i < kv_len)  # (0·i: a row per query even with no window)
    if right is not None:
        seen = seen & (j <= i + diag + right)
    if left is not None:
        seen = seen & ((j >= i + diag - left) | (j < kept))
    return seen


def key_span(i0, i1, diag, kv_len, left=None, right=None):
    """(begin, end): the keys [begin, end) inside the band of some query row of [i0, i1),
    clipped to [0, kv_len) (empty when begin >= end; the kept first keys come on top).
    The band's ends grow with i, so the first row gives the start and the last the end."""
    begin = 0 if left is None else np.clip(i0 + diag - left, 0, kv_len)
    end = kv_len if right is None else np.clip(i1 + diag + right, 0, kv_len)
    return begin, end


def rows_see_keys(i0, i1, k0, k1, diag, kv_len, left=None, right=None, kept=0):
    """Whether some query of rows [i0, i1) sees some key of [k0, k1) (any item, when the
    arguments are per-item arrays)."""
    if i1 <= i0 or k1 <= k0:
        return False
    begin, end = key_span(i0, i1, diag, kv_len, left, right)
    in_band = (np.maximum(begin, k0) < np.minimum(end, k1))
    # kept keys below the band's start, visible to some row up to its right side
    kept_end = np.minimum(np.minimum(kept, end), k1)
    return bool(np.any(in_band | (kept_end > k0)))

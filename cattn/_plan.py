"""One kernel call, planned by named steps that every entry point shares.

`scaled_dot_product_attention`, `varlen_attention`, `paged_attention` (and through them
`shared_prefix_attention`) differ only in how their operands are laid out: a padded batch,
packed sequences, pages of a cache. Each builds its operands and its per-item table, and
leaves everything else to the steps here, in this order:

  Plan(...)       operands and storage: the dtype computed in, narrow keys/values, `out`
  plan.set_options()  flags, scale, softcap, window, threads, block sizes, path
  plan.set_mask()     attn_mask as the kernel reads it
  plan.set_extras()   keep_first and sinks, per item
  plan.set_outputs()  out (the user's, checked, or a new one), lse, weights
  (table)         the entry point's layout: one row per item, see cattn._kernel.Column
  launch(plan)    block sizes, key splits, the thread team; the kernel
  plan.results()  narrow results rounded once; out alone or with weights and/or lse

An option shared by the entry points is parsed in one of these steps, so it reaches all
of them. Compiled by Cython like the front (see setup.py): this is on every call's path.
"""
import contextlib
import math

import numpy as np

from cattn import _runtime, _kernel  # _runtime first: it loads OpenMP (wait policy)
from cattn import _dtypes
from cattn._blas_threads import single_threaded_blas
from cattn._interop import from_dlpack
from cattn._position_bias import RelativePositionBias
from cattn._validation import (FLOAT_DTYPES, broadcasts_to, check_flag, check_int,
                               check_no_dropout, window_pair,
                               check_ndarray, check_positive_float, reject_masked)

INT32_MAX = 2**31 - 1
# "No limit" for window sides: far beyond any index, far below int64 overflow.
UNBOUNDED = 2**60
# Positions stay far from int64 overflow once windows (up to UNBOUNDED) are added.
MAX_OFFSET = 2**48 - 1
ALIGNMENTS = ("top_left", "bottom_right")
# return_key_mass's value for one row per key/value head (summed over its query heads).
KV_HEADS = "kv_heads"
NO_LIMIT = contextlib.nullcontext()
# The kernel's MaskKind members as plain ints: an enum member lookup costs more than a tiny
# call can spare.
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = (int(_kernel.MaskKind.MASK_NONE),
                                       int(_kernel.MaskKind.MASK_BOOL),
                                       int(_kernel.MaskKind.MASK_ADDITIVE))
Column = _kernel.Column
FLOAT32, FLOAT64 = FLOAT_DTYPES


class Plan:
    """What one kernel call needs, by name.

    query, key, value    the operands as the kernel reads them (a narrow query as float32)
    narrow               NarrowStorage for float16/bfloat16/int8 storage, or None
    kv_storage           how the kernel reads K and V (narrow's, or the layout's view)
    dtype                the dtype computed in (float32 or float64)
    L, S, E, Ev          longest query run, key capacity, feature sizes
    longest_keys         the most keys any item has (key splits follow it), or S
    q_rs, k_rs, v_rs     row strides in elements (set by the layout)
    paged                (block table, page size, page strides) or None
    tasks                (n_tasks, 2) (item, query block) pairs, or None: item-major
    table                (n_items, TABLE_COLUMNS) intp, filled by the layout
    is_causal, enable_gqa, return_lse, return_weights, scale, softcap
    win_left, win_right  the visible band around each item's diagonal
    num_threads, block_sizes (None: chosen), isa (None: the CPU's), block_q, block_k
    mask, mask_kind, mask_rs, mask_cs      attn_mask as read (see set_mask())
    keep, sinks          kept first keys per item (int or intp array), sink logits or None
    alibi                ALiBi slopes, one per item, or None
    distance_bias        (bias by distance per item, max distance) of position_bias, or None
    out, out_rs, out_cs, lse, weights, user_out   the outputs (see set_outputs())
    return_key_mass, mass_shape, mass_group, key_mass   the per-key attention mass: asked
                         for (True or "kv_heads"), its shape (the items' shape, then keys),
                         query heads summed per row, the result after launch
    """
    def __init__(self, query, key, value, out, k_scale, v_scale, out_dtype):
        """The storage step: float64 computes in float64; any mix of float32, float16,
        bfloat16 and int8 (or a narrow result asked for) in float32."""
        if out is not None and type(out) is not np.ndarray:
            out = as_ndarray(out, "out")
        dtype = query.dtype
        narrow = None
        if not (key.dtype is dtype and value.dtype is dtype and k_scale is None  # (fast)
                and v_scale is None and out_dtype is None and out is None
                and (dtype is FLOAT32 or dtype is FLOAT64)):
            if (key.dtype != dtype or value.dtype != dtype or dtype not in FLOAT_DTYPES
                    or k_scale is not None or v_scale is not None or out_dtype is not None
                    or (isinstance(out, np.ndarray) and _dtypes.is_half(out.dtype))):
                query, narrow = narrow_storage(query, key, value, k_scale, v_scale,
                                               out_dtype, out)
                dtype = query.dtype
        self.query, self.key, self.value = query, key, value
        self.narrow = narrow
        self.dtype = dtype
        self.user_out = out
        self.paged = None
        self.tasks = None
        self.kv_storage = None if narrow is None else narrow.kv_storage
        self.mask, self.mask_kind, self.mask_rs, self.mask_cs = None, MASK_NONE, 0, 0
        self.keep = 0
        self.sinks = self.alibi = self.distance_bias = None
        self.block_q = 0
        self.lse = self.weights = self.key_mass = None
        self.return_key_mass = False
        self.mass_group = 1

    def set_options(self, is_causal, enable_gqa, return_lse, return_weights, dropout_p, scale,
                softcap, alignment, window, num_threads, block_sizes, isa, E, S,
                return_key_mass=False):
        """The flags as bools, scale and softcap as floats, the window's sides, the thread
        count, block sizes and path."""
        # (the checks run only for values other than False, the default: a tiny call's cost)
        if is_causal is not False:
            is_causal = check_flag(is_causal, "is_causal")
        if enable_gqa is not False:
            enable_gqa = check_flag(enable_gqa, "enable_gqa")
        if return_lse is not False:
            return_lse = check_flag(return_lse, "return_lse")
        if return_weights is not False:
            return_weights = check_flag(return_weights, "return_weights")
        if return_key_mass is not False:
            self.return_key_mass = key_mass_option(return_key_mass)
        check_no_dropout(dropout_p)
        if (return_weights or self.return_key_mass) and S > INT32_MAX:
            asked = "return_weights" if return_weights else "return_key_mass"
            raise ValueError(f"{asked} needs S < 2**31 keys (a weights row is one "
                             f"BLAS matrix with 32-bit dimensions), got S = {S}")
        if scale is None:
            scale = 1.0 / math.sqrt(E)
        else:
            scale = check_positive_float(scale, "scale", self.dtype)
        if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got "
                             f"{alignment!r}")
        self.is_causal, self.enable_gqa = is_causal, enable_gqa
        self.return_lse, self.return_weights = return_lse, return_weights
        self.scale = scale
        self.softcap = 0.0 if softcap is None else check_softcap(softcap, self.dtype)
        self.win_left, self.win_right = window_sides(window, is_causal)
        self.num_threads = (_runtime.get_num_threads() if num_threads is None
                            else check_int(num_threads, "num_threads", 1))
        self.block_sizes = None if block_sizes is None else checked_block_sizes(block_sizes)
        if isa is None:
            bf16_products = (_dtypes.is_bfloat16(self.key.dtype)
                             or _dtypes.is_bfloat16(self.value.dtype))
            self.isa = _kernel.default_isa_index(bf16_products)
        else:
            self.isa = _kernel.isa_index(isa)

    def set_mask(self, attn_mask, batch_shape, L, S):
        """attn_mask (broadcastable to batch_shape + (L, S)) as the kernel reads it (no
        call: no mask)."""
        self.mask, self.mask_kind, self.mask_rs, self.mask_cs = mask_plan(
            attn_mask, batch_shape, L, S, self.dtype)

    def set_extras(self, keep_first, k_offset, sinks, batch_shape, S, alibi_slopes=None,
                   position_bias=None):
        """keep_first as kept keys per item, sinks as one logit per item, ALiBi's slopes as
        one per item, a RelativePositionBias as one row of biases by distance per item."""
        if keep_first is not None:
            self.keep = kept_first_keys(keep_first, k_offset, batch_shape, S)
        if sinks is not None:
            self.sinks = sink_logits(sinks, batch_shape, self.dtype)
        if alibi_slopes is not None:
            self.alibi = alibi_slopes_per_item(alibi_slopes, batch_shape, self.dtype)
        if position_bias is not None:
            self.distance_bias = (
                distance_bias_per_item(position_bias, batch_shape, self.query.dtype),
                position_bias.max_distance)

    def set_outputs(self, out_shape, lse_shape, weights_shape, inputs, mass_shape=None,
                    group=1, heads_last=False):
        """out (the user's, checked, or new), lse and weights; the kernel writes float32
        where a narrow result is rounded once afterwards. out_rs and out_cs are the
        strides of out's last two axes (a packed layout replaces them). mass_shape: the
        key mass's per query head, (items..., Hq, S); group: query heads per key/value
        head (consecutive items), summed into one row for return_key_mass="kv_heads".
        heads_last: a new 4-D out lies in memory as (batch, L, heads, Ev), the layout a
        model reshapes to (batch, L, features) for free (a narrow result's rounding keeps
        it)."""
        self.mass_group = 1
        if self.return_key_mass == KV_HEADS and group > 1:
            self.mass_group = group
            mass_shape = mass_shape[:-2] + (mass_shape[-2] // group, mass_shape[-1])
        self.mass_shape = mass_shape
        out = self.user_out
        narrow = self.narrow
        if narrow is not None and narrow.result_dtype != self.dtype:
            if out is not None:
                check_out(out, out_shape, narrow.result_dtype, inputs)
            out = None
        else:
            self.user_out = None
        dtype = self.dtype
        if out is None and heads_last and len(out_shape) == 4:
            batch, heads, L, Ev = out_shape
            out = np.empty((batch, L, heads, Ev), dtype=dtype).transpose(0, 2, 1, 3)
            self.out_rs, self.out_cs = heads * Ev, 1
        elif out is None:
            out = np.empty(out_shape, dtype=dtype)
            self.out_rs, self.out_cs = out_shape[-1], 1
        else:
            strides = check_out(out, out_shape, dtype, inputs)
            self.out_rs, self.out_cs = strides[-2], strides[-1]
        self.out = out
        if self.return_lse:
            self.lse = np.empty(lse_shape, dtype=dtype)
        if self.return_weights:
            self.weights = np.zeros(weights_shape, dtype=dtype)

    def results(self):
        """out alone, or the tuple of out with the weights, lse and/or key mass asked for."""
        out, weights, lse = self.out, self.weights, self.lse
        narrow = self.narrow
        if narrow is not None and narrow.result_dtype != self.dtype:
            out, weights = narrow.results(out, weights, self.user_out)
        result = results(out, weights, lse)
        if self.return_key_mass:
            return (result if isinstance(result, tuple) else (result,)) + (self.key_mass,)
        return result


def choose_blocks(plan):
    """The plan's query rows per task and keys per block (before a task list is made)."""
    if plan.block_sizes is None:
        plan.block_q, plan.block_k = choose_block_sizes(plan.L, plan.longest_keys, plan.isa)
    else:
        plan.block_q, plan.block_k = plan.block_sizes


def launch(plan):
    """Block sizes, key splits and the thread team; then the kernel, with BLAS kept on one
    thread inside its OpenMP team."""
    if not plan.block_q:
        choose_blocks(plan)
    block_q, block_k = plan.block_q, plan.block_k
    L = plan.L
    n_items = plan.table.shape[0]
    n_q_blocks = -(-L // block_q)
    separate = plan.return_weights or plan.return_key_mass
    group = _kernel.items_in_a_task(plan.table, block_q, tasks=plan.tasks, separate=separate,
                                    paged=plan.paged, kv_storage=plan.kv_storage)
    streams = group * block_q <= _kernel.DIRECT_ROWS
    if streams and plan.block_sizes is None:
        block_k = stream_block_keys(plan.longest_keys)
    key_mass = None
    if plan.return_key_mass:
        # (one row of column sums per task, summed over query blocks below: in a fixed
        # order, whichever thread ran which task)
        key_mass = np.zeros((n_items * n_q_blocks, plan.S), dtype=plan.out.dtype)
        plan.key_mass = np.zeros(plan.mass_shape, dtype=plan.out.dtype)
    if plan.tasks is None:
        n_splits, split_keys = key_splits(n_q_blocks, plan.longest_keys, block_k, separate,
                                          STREAM_BLOCK_KEYS if streams else _MIN_SPLIT_KEYS)
        n_tasks = n_items * n_q_blocks * n_splits
    else:
        # Keys are never split with a task list: it has a task per (item, query block),
        # and a split would make an item's result depend on the other items of the call.
        n_splits, split_keys = 1, plan.S
        n_tasks = plan.tasks.shape[0]
    if n_tasks == 0:
        return
    out = plan.out
    threads = _runtime.team_size(min(plan.num_threads, n_tasks))
    partials = (np.empty((n_splits, n_items, L, plan.Ev + 2), dtype=out.dtype)
                if n_splits > 1 else None)
    sinks, alibi = plan.sinks, plan.alibi
    if sinks is not None and sinks.dtype != plan.query.dtype:  # the kernel's compute dtype
        sinks = sinks.astype(plan.query.dtype)
    if alibi is not None and alibi.dtype != plan.query.dtype:
        alibi = alibi.astype(plan.query.dtype)
    narrow = plan.narrow
    isa = plan.isa
    with single_threaded_blas if _kernel.calls_blas(isa) else NO_LIMIT:
        _kernel.attention(plan.query, plan.key, plan.value, out, plan.lse, plan.weights,
                          plan.mask, partials, plan.table,
                          shape=(L, plan.S, plan.E, plan.Ev),
                          strides=(plan.q_rs, plan.k_rs, plan.v_rs, plan.out_rs, plan.out_cs,
                                   plan.mask_rs, plan.mask_cs),
                          variant=(plan.mask_kind, plan.win_left, plan.win_right, plan.scale,
                                   plan.softcap, plan.return_weights),
                          blocks=(block_q, block_k, n_splits, split_keys, group),
                          run=(threads, isa), tasks=plan.tasks, paged=plan.paged,
                          sinks=sinks, alibi=alibi, key_mass=key_mass,
                          distance_bias=plan.distance_bias,
                          kv_storage=plan.kv_storage,
                          bf16_query=narrow is not None and narrow.query_bf16)
    if key_mass is not None:
        # (the rows of a group's heads are consecutive: one sum over heads and query blocks)
        plan.key_mass = key_mass.reshape(n_items // plan.mass_group,
                                         plan.mass_group * n_q_blocks, plan.S).sum(
            axis=1).reshape(plan.mass_shape)


def results(out, weights, lse):
    """out alone, or the tuple of out with the weights and/or lse that were asked for."""
    if weights is None:
        return out if lse is None else (out, lse)
    return (out, weights) if lse is None else (out, weights, lse)


# ------------------------------------------------------------------ operands and storage

def as_ndarray(x, name):
    """x, or a zero-copy NumPy view of it when it exports DLPack (a CPU torch tensor)."""
    return x if x is None or isinstance(x, np.ndarray) else from_dlpack(x, name)


def check_array(x, name, narrow=None):
    """An array of float32 or float64; with `narrow` (an input of the attention), of float16
    or bfloat16 too, and int8 when narrow == "int8"."""
    if type(x) is not np.ndarray:  # (an exact ndarray needs neither check: the fast path)
        check_ndarray(x, name, " of float32 or float64")
        reject_masked(x, name)
    if x.dtype not in FLOAT_DTYPES and not (
            narrow and (_dtypes.is_half(x.dtype) or (narrow == "int8" and
                                                     x.dtype == _dtypes.INT8))):
        kinds = ("float32 or float64" if not narrow else
                 "float32, float64, float16, bfloat16 or int8" if narrow == "int8" else
                 "float32, float64, float16 or bfloat16")
        raise TypeError(f"{name} must have dtype {kinds}, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., length, features), "
                         f"got shape {x.shape}")


def element_strides(x):
    """Strides in elements; None when some stride is not a whole number of elements."""
    item = x.itemsize
    strides = x.strides
    for st in strides:
        if st % item:
            return None
    return tuple([st // item for st in strides])


def blas_ready(x):
    """(x or a contiguous copy, its row stride): matrices GEMM can read in place."""
    row_stride = _kernel.gemm_row_stride(x)
    if row_stride < 0 or not x.flags.aligned:
        x = np.require(x, requirements="CA")  # (ascontiguousarray keeps misaligned data)
        row_stride = _kernel.gemm_row_stride(x)
    return x, row_stride


class NarrowStorage:
    """A float32 computation on float16, bfloat16 or int8 keys/values or queries: how the
    kernel reads K and V, int8's scales, and the dtype of the result."""

    def __init__(self, key, value, k_scale, v_scale, result_dtype, query_bf16=False):
        self.k_scale = _dtypes.scales_for(k_scale, "k_scale", key, "key")
        self.v_scale = _dtypes.scales_for(v_scale, "v_scale", value, "value")
        self.kv_storage = (_dtypes.element_code(key.dtype), _dtypes.element_code(value.dtype),
                           self.k_scale, self.v_scale)
        self.result_dtype = result_dtype
        self.query_bf16 = query_bf16  # (its float32 copy is exact in bfloat16 products)

    def results(self, out, weights, user_out):
        """The float32 output (and weights) rounded to the result dtype (into user_out)."""
        if user_out is not None:
            np.copyto(user_out, out, casting="unsafe")
            out = user_out
        else:
            out = out.astype(self.result_dtype)
        if weights is not None:
            weights = weights.astype(self.result_dtype)
        return out, weights


def narrow_storage(query, key, value, k_scale, v_scale, out_dtype, out):
    """(query as float32, NarrowStorage) for inputs that mix float32, float16, bfloat16
    and int8 (or ask for such an output); float64 never mixes."""
    dtypes = (query.dtype, key.dtype, value.dtype)
    if any(d == np.float64 for d in dtypes):
        if not dtypes[0] == dtypes[1] == dtypes[2]:
            raise TypeError(f"query, key and value must have the same dtype, got "
                            f"{dtypes[0]}, {dtypes[1]} and {dtypes[2]} (float64 does not "
                            f"mix; float32, float16, bfloat16 and int8 may)")
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale and v_scale are only for int8 keys and values, got "
                             "float64 ones")
        if out_dtype is not None and _dtypes.result_dtype_or_none(out_dtype) != np.float64:
            raise TypeError(f"float64 inputs give a float64 output, got out_dtype "
                            f"{out_dtype!r}")
        if isinstance(out, np.ndarray) and _dtypes.is_half(out.dtype):
            raise TypeError(f"out must have dtype float64 with float64 inputs, got "
                            f"{out.dtype}")
        return query, None
    _dtypes.check_input_dtype(query, "query", False)
    if out_dtype is not None:
        result = _dtypes.result_dtype(out_dtype, "out_dtype")
        if out is not None and isinstance(out, np.ndarray) and out.dtype != result:
            raise ValueError(f"out has dtype {out.dtype} but out_dtype is {result}: give "
                             f"one of them, or the same")
    elif isinstance(out, np.ndarray):
        result = _dtypes.result_dtype(out.dtype, "out's dtype")
    else:
        result = query.dtype
    narrow = NarrowStorage(key, value, k_scale, v_scale, result,
                           query_bf16=_dtypes.is_bfloat16(query.dtype))
    return query.astype(np.float32, copy=False), narrow


# ------------------------------------------------------------------------------ options

def key_mass_option(x):
    """return_key_mass: True (a row per query head) or "kv_heads" (per key/value head)."""
    if isinstance(x, str):
        if x != KV_HEADS:
            raise ValueError(f"return_key_mass must be True, False or {KV_HEADS!r}, got "
                             f"{x!r}")
        return x
    if x is True or isinstance(x, np.bool_):
        return bool(x)
    raise TypeError(f"return_key_mass must be True, False or {KV_HEADS!r}, got {x!r}")


def check_softcap(x, dtype):
    """The kernel divides scores by the softcap: its reciprocal must be finite in the
    dtype too (a subnormal softcap would turn a zero score into 0·inf = NaN)."""
    x = check_positive_float(x, "softcap", dtype)
    with np.errstate(over="ignore", divide="ignore"):
        reciprocal = dtype.type(1) / dtype.type(x)
    if not np.isfinite(reciprocal):
        raise ValueError(f"softcap must be at least about {1 / float(np.finfo(dtype).max):.3g} "
                         f"in {dtype} (1/softcap must be finite), got {x}")
    return x


def window_sides(window, is_causal):
    """(left, right) sides of the visible band around the diagonal; causal closes the
    right side."""
    win_left, win_right = UNBOUNDED, UNBOUNDED
    if window is not None:
        left, right = window_pair(window)
        # (a side beyond any index is no limit: clamped, it stays a C integer)
        if left is not None:
            win_left = min(check_int(left, "window left", 0), UNBOUNDED)
        if right is not None:
            win_right = min(check_int(right, "window right", 0), UNBOUNDED)
    if is_causal:
        win_right = 0
    return win_left, win_right


def choose_block_sizes(L, S, isa):
    """Query rows per task and keys per block."""
    block_q = min(max(L, 1), 128)
    block_k = min(max(S, 1), 256)
    return block_q, block_k


# Keys per block, and at least per chunk of split keys, of a task that streams its keys
# and values (decoding: a few rows, read in place): each block restarts the streams of K
# and then of V, and folds its scores. An AMD EPYC Zen 4, (1, 32, 1, 4096, 128), one
# thread, blocks and chunks of 2048 keys against blocks of 256 in chunks of 512:
# float32 1.16x, float16 1.46x, int8 1.61x (1024: 1.14x, 1.39x, 1.46x). Longer chunks
# leave an item fewer tasks: a decode's items (heads) keep the cores busy.
STREAM_BLOCK_KEYS = 2048


def stream_block_keys(S):
    """Keys per block of a task that streams K and V."""
    return min(max(S, 1), STREAM_BLOCK_KEYS)


def checked_block_sizes(sizes):
    block_q, block_k = sizes
    return check_int(block_q, "block_q", 1), check_int(block_k, "block_k", 1)


# An item with few query blocks (decoding, short chunks) against many keys: split its keys
# into chunks of at least _MIN_SPLIT_KEYS, aiming at _MIN_TASKS tasks per item, so that the
# cores stay busy when a few heads decode against a long cache. The rule looks at one
# item's shape only, never at the number of items or threads: each item is computed
# bitwise alike whatever the thread count and whichever other heads share the call (a
# call on some of the heads equals those heads of the full call, as sharding needs).
_FEW_Q_BLOCKS = 2
_MIN_TASKS = 16
_MIN_SPLIT_KEYS = 512


def key_splits(n_q_blocks, S, block_k, weights_mode, min_split_keys=_MIN_SPLIT_KEYS):
    """(number of chunks of keys, keys per chunk: a multiple of block_k or of 256 keys, at
    least min_split_keys)."""
    if (weights_mode or n_q_blocks == 0 or n_q_blocks > _FEW_Q_BLOCKS
            or S < 2 * min_split_keys):
        return 1, S
    n_splits = min(-(-_MIN_TASKS // n_q_blocks), S // min_split_keys)
    split_keys = -(-S // n_splits)
    # (chunks end at a block's end; long streaming blocks: at a multiple of 256 keys, so
    # that the chunks stay even)
    align = min(block_k, 256)
    split_keys = -(-split_keys // align) * align
    return -(-S // split_keys), split_keys


# ------------------------------------------------------------------- per-item values

def per_item_integers(x, name, batch_shape, low, high, high_name=None):
    """An int, or an integer array whose axes index the leading batch axes from the left:
    one intp value per item (flattened), or the plain int when x is a scalar."""
    reject_masked(x, name)
    values = np.asarray(x)
    if values.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {values.dtype}")
    if values.ndim > len(batch_shape) or values.shape != batch_shape[:values.ndim]:
        raise ValueError(f"{name} of shape {values.shape} must match the leading batch "
                         f"axes {batch_shape} from the left (e.g. one per sequence)")
    if values.size and (values.min() < low or values.max() > high):
        bound = high if high_name is None else f"{high_name}={high}"
        raise ValueError(f"{name} must lie in [{low}, {bound}], got values from "
                         f"{values.min()} to {values.max()}")
    if values.ndim == 0:
        return int(values)
    values = values.astype(np.intp).reshape(
        values.shape + (1,) * (len(batch_shape) - values.ndim))
    return np.broadcast_to(values, batch_shape).reshape(-1)


def offset(x, name, batch_shape):
    return 0 if x is None else per_item_integers(x, name, batch_shape, -MAX_OFFSET,
                                                 MAX_OFFSET)


def kept_first_keys(keep_first, k_offset, batch_shape, S):
    """How many leading keys of each item are the sequence's first keep_first positions
    (an int, or one intp per item when k_offset varies)."""
    keep_first = check_int(keep_first, "keep_first", 0, "a non-negative integer")
    kept = min(keep_first, MAX_OFFSET) - offset(k_offset, "k_offset", batch_shape)
    return np.clip(kept, 0, S) if isinstance(kept, np.ndarray) else min(max(kept, 0), S)


def per_head_floats(x, name, noun, batch_shape, dtype):
    """One float per item from x, one per query head (Hq,) or broadcasting to the batch
    shape: contiguous, in `dtype` (overflow left to the caller's check)."""
    x = as_ndarray(x, name)
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an array of floats, one per query head, got "
                            f"{type(x).__name__}") from None
    reject_masked(x, name)
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be floating-point {noun}s, one per query head, got "
                        f"dtype {x.dtype}")
    if not broadcasts_to(x.shape, batch_shape):
        heads = f"(Hq,) = ({batch_shape[-1]},)" if batch_shape else "()"
        raise ValueError(f"{name} of shape {x.shape} must hold one {noun} per query "
                         f"head, {heads}, or broadcast to the batch shape {batch_shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        return np.broadcast_to(x, batch_shape).astype(dtype).reshape(-1)


def alibi_slopes_per_item(slopes, batch_shape, dtype):
    """ALiBi's slopes, (Hq,) or (B, Hq) (any shape broadcasting to the batch shape): one
    finite slope per item, contiguous in the operands' dtype."""
    slopes = per_head_floats(slopes, "alibi_slopes", "slope", batch_shape, dtype)
    if not np.isfinite(slopes).all():
        bad = slopes[~np.isfinite(slopes)][0]
        raise ValueError(f"alibi_slopes must be finite in {dtype}, got {bad}")
    return slopes


def distance_bias_per_item(position_bias, batch_shape, dtype):
    """A RelativePositionBias as one row of biases by distance per item (heads on the
    batch shape's last axis), contiguous in `dtype`."""
    if not isinstance(position_bias, RelativePositionBias):
        raise TypeError(f"position_bias must be a cattn.RelativePositionBias, got "
                        f"{type(position_bias).__name__}")
    return position_bias.per_item(batch_shape, dtype)


def sink_logits(sinks, batch_shape, dtype):
    """One sink logit per item, contiguous in the operands' dtype."""
    logits = per_head_floats(sinks, "sinks", "logit", batch_shape, dtype)
    if np.isnan(logits).any() or np.isposinf(logits).any():
        bad = logits[np.isnan(logits) | np.isposinf(logits)][0]
        raise ValueError(f"sinks must be finite in {dtype} (or -inf: no sink for that "
                         f"head), got {bad} after conversion to {dtype}")
    return logits


def mask_plan(attn_mask, batch_shape, L, S, dtype):
    """(mask array or None, its MaskKind, its row and column strides in elements): a
    boolean mask is read as bytes, a float one in the inputs' dtype; neither is expanded."""
    if attn_mask is None:
        return None, MASK_NONE, 0, 0
    attn_mask = as_ndarray(attn_mask, "attn_mask")
    check_ndarray(attn_mask, "attn_mask", " (bool or float)")
    reject_masked(attn_mask, "attn_mask")
    full = batch_shape + (L, S)
    if attn_mask.ndim < 2:
        raise ValueError(f"attn_mask must have at least 2 dimensions (L, S) "
                         f"broadcastable to {full}, got shape {attn_mask.shape}")
    if not broadcasts_to(attn_mask.shape, full):
        raise ValueError(f"attn_mask of shape {attn_mask.shape} does not broadcast to "
                         f"the attention shape (..., L, S) = {full}")
    if attn_mask.dtype == np.bool_:
        kind, mask = MASK_BOOL, attn_mask.view(np.uint8)
    elif attn_mask.dtype.kind == "f":
        kind, mask = MASK_ADDITIVE, attn_mask.astype(dtype, copy=False)
    else:
        raise TypeError(f"attn_mask must be boolean (True = attend) or floating "
                        f"(added to the scores), got dtype {attn_mask.dtype}")
    m_strides = element_strides(mask)
    if m_strides is None or not mask.flags.aligned:
        mask = np.require(mask, requirements="CA")
        m_strides = element_strides(mask)
    return (mask, kind, m_strides[-2] if mask.shape[-2] > 1 else 0,
            m_strides[-1] if mask.shape[-1] > 1 else 0)


# ---------------------------------------------------------------------------- outputs

def overlaps(a, b):
    """Whether a and b share memory; undecidable cases count as sharing."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return np.shares_memory(a, b, max_work=10**5)
    except np.exceptions.TooHardError:
        return True


def has_internal_overlap(x):
    """Whether two distinct elements of x share memory (undecidable cases count as yes).

    Two elements overlap when their offsets differ by sum(d_i * stride_i) = 0 for index
    differences |d_i| < shape_i, not all 0. Most layouts are ruled out at once: sorted by
    stride, each stride exceeds the span of the smaller ones. Otherwise, an overlap whose
    last nonzero difference is on axis k is also one between x[..., 1:, 0, ..., 0] and
    x[..., :1, 0, ..., 0] (slicing axis k, later axes at 0; offsets are translation
    invariant), which NumPy's exact shares_memory decides."""
    axes = [(abs(st), n) for st, n in zip(x.strides, x.shape) if n > 1]
    if x.size == 0 or not axes:
        return False
    span = 0
    for stride, n in sorted(axes):
        if stride < x.itemsize + span:
            break
        span += stride * (n - 1)
    else:
        return False
    for k in range(x.ndim):
        if x.shape[k] < 2:
            continue
        later = (0,) * (x.ndim - k - 1)
        if overlaps(x[(Ellipsis, slice(1, None)) + later],
                    x[(Ellipsis, slice(0, 1)) + later]):
            return True
    return False


def check_out(out, out_shape, dtype, inputs):
    """A user's `out`: writable, of the right shape and dtype, sharing no memory with the
    inputs or within itself. Returns its strides in elements."""
    check_ndarray(out, "out")
    if out.shape != out_shape or out.dtype != dtype:
        raise ValueError(f"out must have shape {out_shape} and dtype {dtype}, got "
                         f"shape {out.shape} and dtype {out.dtype}")
    reject_masked(out, "out")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, x in inputs:
        if x is not None and overlaps(out, x):
            raise ValueError(f"out overlaps {name}: the output must not share memory "
                             f"with an input")
    strides = element_strides(out)
    if strides is None or not out.flags.aligned:
        raise ValueError("out must be aligned, with strides that are multiples of its "
                         "item size")
    if has_internal_overlap(out):
        raise ValueError(f"out has overlapping elements (two of its elements share "
                         f"memory: strides {out.strides} for shape {out.shape})")
    return strides

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, infer_types=False
"""The tiled (FlashAttention-style) attention loop nest.

One task is one block of query rows of one (batch, head) item (and, when tasks are few, one
chunk of its keys); items that share their keys and values (the query heads of one K/V head
under grouped-query attention) are rows of one task, so that their keys and values are read
once per group. For each block of keys visible to it, the task computes the scores with
one GEMM, applies mask, window and softcap, folds the block into a running (online)
softmax, and accumulates P·V with a second GEMM. The L×S score matrix never exists; scratch
is one block per thread.

Every variant is a parameter of the same loop nest: which keys a query row may see is the
interval [i + diag - left, i + diag + right] ∩ [0, kv_len), where `diag` places the
causal diagonal (top-left or bottom-right) and kv_len is the batch item's key length.
Whole key blocks outside the union of those intervals are never visited.

The caller (cattn._api) validates everything; nothing here checks inputs (the only error
raised is MemoryError when the per-thread scratch cannot be allocated).
"""
import os
import threading
import time

import numpy as np

from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport INFINITY, NAN, fabs, fabsf, log, tanh
from libc.stdint cimport int32_t, uint8_t
from libc.string cimport memcpy, memset
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree

cimport numpy as cnp

from cattn._blas cimport gemm_ab, gemm_abt, require_blas
from cattn._simd cimport (
    CATTN_ISA_PORTABLE, CATTN_ISA_AVX2, CATTN_ISA_AVX512, CATTN_ISA_WIDE16, cattn_isa_supported,
    cattn_isa_runs_on, cattn_isa_uses_blas, CATTN_ISA_BLAS, CATTN_ISA_BEST, cattn_isa_float_path,
    CATTN_ISA_AVX512_BF16,
    cattn_isa_has_bf16_products, cattn_bf16_work_bytes, cattn_bf16_qkt, cattn_bf16_pv,
    cattn_bf16_queries_bytes, cattn_bf16_load_queries,
    cattn_isa_name, cattn_row_max_f32, cattn_row_max_f64, cattn_exp_shift_sum_f32,
    cattn_exp_shift_sum_f64, cattn_expf_scalar, cattn_exp_scalar, cattn_stream_sum_f32,
    CATTN_OPENMP_ENABLED, omp_get_max_threads, cattn_panel_keys,
    cattn_pack_keys_f32, cattn_pack_keys_f64, cattn_gemm_qkt_f32, cattn_gemm_qkt_f64,
    cattn_gemm_pv_f32, cattn_gemm_pv_f64, CATTN_DIRECT_ROWS, CATTN_DIRECT_KEYS,
    cattn_gemm_qkt_direct_f32,
    cattn_gemm_qkt_direct_f64, cattn_gemm_pv_direct_f32, cattn_gemm_pv_direct_f64,
    CATTN_ELEM_NATIVE, CATTN_ELEM_F16, CATTN_ELEM_BF16, CATTN_ELEM_I8, cattn_pack_keys_cvt,
    cattn_gemm_qkt_direct_cvt, cattn_gemm_pv_direct_cvt, cattn_convert_rows,
)

cnp.import_array()

cdef extern from "cattn_omp.h" nogil:
    int omp_get_num_threads()

cdef extern from *:
    """
    /* The calling thread's CPU time in seconds; -1 where the system has no such clock. */
    #if defined(__linux__) || defined(__APPLE__) || defined(__FreeBSD__)
    #include <time.h>
    static double cattn_thread_cpu_seconds(void) {
        struct timespec ts;
        if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return -1.0;
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    #else
    static double cattn_thread_cpu_seconds(void) { return -1.0; }
    #endif
    """
    double cattn_thread_cpu_seconds() nogil


cdef extern from *:
    """
    /* Wall-clock seconds (OpenMP's clock; clock() in a build without OpenMP, serial). */
    #ifdef _OPENMP
    #define cattn_seconds() omp_get_wtime()
    #else
    #include <time.h>
    #define cattn_seconds() ((double)clock() / CLOCKS_PER_SEC)
    #endif
    """
    double cattn_seconds() nogil

cdef extern from *:
    """
    /* A hint to load the cache line at p soon: to L1 (near) or to L2 only. */
    #if defined(__GNUC__) || defined(__clang__)
    #define cattn_prefetch_near(p) __builtin_prefetch((p), 0, 3)
    #define cattn_prefetch_l2(p) __builtin_prefetch((p), 0, 2)
    #else
    #define cattn_prefetch_near(p) ((void)(p))
    #define cattn_prefetch_l2(p) ((void)(p))
    #endif
    """
    void cattn_prefetch_near(const void* p) nogil
    void cattn_prefetch_l2(const void* p) nogil

# Bounds checks of the debug build (CATTN_DEBUG=1): nothing in the release build.
cdef extern from "cattn_debug.h" nogil:
    ctypedef struct cattn_extent:
        const char* lo
        const char* hi
    const bint CATTN_DEBUG_BUILD
    void CATTN_ASSERT(bint cond, const char* what)
    void CATTN_ASSERT_INSIDE(cattn_extent extent, const void* first, const void* last,
                             size_t size, const char* what)

# The emulation build (CATTN_EMULATE_ISA=1): the bfloat16 levels in software (tests only).
cdef extern from "cattn_cpu.h" nogil:
    const bint CATTN_ISA_EMULATED

# Columns of the per-batch-item table built by the Python layer: element offsets of each
# operand's (L, ·) matrix, then the item's key length and causal diagonal.
# Packed variable-length calls (a task list) also fill the item's own query length and the
# element offset of its first lse value; other calls leave those two unset. With paged keys
# and values, COL_PAGES is where the item's row of the block table starts.
# Then how many of its first keys stay visible to every query whatever the window
# (StreamingLLM's sink tokens; 0: none).
# Then the element offsets of the item's per-key scales of int8 keys and values (read only
# when the call has them).
cdef enum:
    COL_Q = 0
    COL_K = 1
    COL_V = 2
    COL_OUT = 3
    COL_MASK = 4
    COL_KV_LEN = 5
    COL_DIAG = 6
    COL_Q_LEN = 7
    COL_LSE = 8
    COL_PAGES = 9
    COL_KEEP_FIRST = 10
    COL_K_SCALE = 11
    COL_V_SCALE = 12
    N_COLS = 13
TABLE_COLUMNS = N_COLS

# A task list's columns (packed layouts): the task's first item, its query block, and how
# many consecutive items it computes as rows of one block (they share keys and values).
cdef enum:
    TASK_COLS = 3
TASK_COLUMNS = TASK_COLS


class Column:
    """The table's columns, by name (for the front that fills them)."""
    Q, K, V, OUT, MASK, KV_LEN, DIAG = COL_Q, COL_K, COL_V, COL_OUT, COL_MASK, COL_KV_LEN, COL_DIAG
    Q_LEN, LSE = COL_Q_LEN, COL_LSE
    PAGES = COL_PAGES
    KEEP_FIRST = COL_KEEP_FIRST
    K_SCALE, V_SCALE = COL_K_SCALE, COL_V_SCALE


class Element:
    """How keys and values may be stored (`kv_storage`): in the computing precision, or as
    float16, bfloat16 or int8 read and converted to float32 inside the kernel."""
    NATIVE, FLOAT16, BFLOAT16, INT8 = (CATTN_ELEM_NATIVE, CATTN_ELEM_F16, CATTN_ELEM_BF16,
                                       CATTN_ELEM_I8)

cpdef enum MaskKind:
    MASK_NONE = 0
    MASK_BOOL = 1
    MASK_ADDITIVE = 2


# ------------------------------------------------------------------ instruction sets
ISA_NAMES = tuple(cattn_isa_name(i).decode() for i in range(CATTN_ISA_BEST + 1))  # best last
TEST_ONLY_PATHS = tuple(cattn_isa_name(i).decode() for i in (CATTN_ISA_WIDE16, CATTN_ISA_BLAS))


def _isa_cap_from_environment():
    """The path the user allows: CATTN_ISA=amx|avx512_bf16|avx512|avx2|portable
    (CATTN_DISABLE_AVX2=1 is the older spelling of portable); unset means the best the CPU
    has. avx512 keeps bfloat16 products off (the operands are widened to float32)."""
    value = os.environ.get("CATTN_ISA", "").strip().lower()
    if value:
        if value not in ISA_NAMES:
            raise ValueError(f"CATTN_ISA must be one of {', '.join(reversed(ISA_NAMES))}, "
                             f"got {os.environ['CATTN_ISA']!r}")
        return ISA_NAMES.index(value)
    off = os.environ.get("CATTN_DISABLE_AVX2", "")
    if off and off[0] != "0":
        return CATTN_ISA_PORTABLE
    # Unasked, a CPU with AVX512-BF16 but no AMX measures which bfloat16 products are
    # faster on it at the first call (settle_bf16_path); under AMX its vdpbf16ps still
    # serves blocks of fewer than 16 rows.
    return CATTN_ISA_BEST


# Read once, at import: no later race, and the same path for every call of the process.
cdef int SUPPORTED_ISA = cattn_isa_supported()
cdef int DEFAULT_ISA = min(SUPPORTED_ISA, _isa_cap_from_environment())
# Where the CPU's best is AVX512-BF16 without AMX and no CATTN_ISA names a path, calls run
# "avx512" (bfloat16 widened) until the first one with bfloat16 keys or values (or
# show_config) settles the default by measuring both
# (cattn._runtime.choose_bf16_path); BF16_PATH_REASON says how the default was chosen.
cdef bint BF16_PATH_PENDING = DEFAULT_ISA == CATTN_ISA_AVX512_BF16 and not os.environ.get(
    "CATTN_ISA", "").strip()
if BF16_PATH_PENDING:
    DEFAULT_ISA = CATTN_ISA_AVX512
BF16_PATH_REASON = None


# The calibration (cattn._runtime.calibrate_bf16_path), given by the runtime module as it
# loads this one: the compiled kernel imports no module of cattn.
_bf16_calibration = None


def set_bf16_calibration(calibrate):
    global _bf16_calibration
    _bf16_calibration = calibrate


cdef int settle_bf16_path() except -1:
    global DEFAULT_ISA, BF16_PATH_PENDING, BF16_PATH_REASON
    if not BF16_PATH_PENDING or _bf16_calibration is None:
        return 0
    # (cleared first, under the GIL: the calibration's own calls name their paths, and a
    # call from another thread meanwhile runs the widened path)
    BF16_PATH_PENDING = False
    path, BF16_PATH_REASON = _bf16_calibration(supported_isa_paths())
    DEFAULT_ISA = ISA_NAMES.index(path)
    return 0


def bf16_products():
    """(path, reason): the path bfloat16 products take by default, and why when it was
    measured (settled first on CPUs that measure it; else None)."""
    settle_bf16_path()
    return ISA_NAMES[DEFAULT_ISA], BF16_PATH_REASON


def isa_path():
    """The instruction-set path calls take: 'amx', 'avx512_bf16', 'avx512', 'avx2' or
    'portable' (the first two are AVX-512 with native bfloat16 block products)."""
    settle_bf16_path()
    return ISA_NAMES[DEFAULT_ISA]


def supported_isa_paths():
    """Every path this CPU can run, best first (a call may ask for any of them)."""
    return ISA_NAMES[SUPPORTED_ISA::-1]


def testable_isa_paths():
    """supported_isa_paths() and the test-only paths this CPU runs: "wide16" (the 16-wide
    micro-kernel logic on AVX2) and "blas" (the portable path with BLAS block GEMMs)."""
    extra = tuple(name for i, name in zip((CATTN_ISA_WIDE16, CATTN_ISA_BLAS), TEST_ONLY_PATHS)
                  if cattn_isa_runs_on(i, SUPPORTED_ISA))
    return supported_isa_paths() + extra


def isa_index(str name):
    """The plan's number for a path name (a ValueError for a path this CPU lacks)."""
    if name not in testable_isa_paths():
        raise ValueError(f"the {name!r} path is not available on this CPU; available: "
                         f"{', '.join(testable_isa_paths())}")
    if name in TEST_ONLY_PATHS:
        return (CATTN_ISA_WIDE16, CATTN_ISA_BLAS)[TEST_ONLY_PATHS.index(name)]
    return ISA_NAMES.index(name)


def default_isa_index(bint bf16_products=False):
    """The path a call takes when it names none. Only a call that multiplies bfloat16
    (bf16_products) settles the bfloat16 default (a measurement, the first time): every
    other call computes the same on either candidate, and never pays for it."""
    if bf16_products:
        settle_bf16_path()
    return DEFAULT_ISA


cdef struct Plan:
    Py_ssize_t n_items, L, S, E, Ev
    Py_ssize_t q_rs, k_rs, v_rs, out_rs, out_cs, mask_rs, mask_cs   # element strides
    int mask_kind
    Py_ssize_t win_left, win_right        # visible keys: [i+diag-left, i+diag+right]
    double scale, softcap                  # softcap <= 0: off
    Py_ssize_t block_q, block_k, n_q_blocks
    # Row stride of a block's scores (and of int8's scaled P): block_k, one cache line more
    # where tasks stream K and V (below)
    Py_ssize_t scores_rs
    # Consecutive items that share keys and values become the rows of one task (member-
    # major: row r is query row i0 + r % rows-per-member of item n + r // rows-per-member);
    # task_rows = group · block_q sizes the scratch, whose gathered queries (task_rows × E)
    # start queries_offset elements in. group 1: one item per task.
    Py_ssize_t group, task_rows, queries_offset
    Py_ssize_t n_splits, split_keys         # keys split into chunks merged by lse
    bint weights_mode                      # scores go straight into the weights output
    int isa                                # CATTN_ISA_*: which micro-kernels and row ops
    bint blas                              # block GEMMs through BLAS instead
    # Native bfloat16 block products (cattn_bf16.h): the level computing them, and which:
    # Q·Kᵀ when the keys are bfloat16 and the queries hold bfloat16 values, P·V when the
    # values are bfloat16 (P rounded to bfloat16); their work areas (the block's queries,
    # then one key block's operands) start this many elements into each thread's scratch.
    int bf16_isa
    bint bf16_scores, bf16_pv
    Py_ssize_t bf16_queries_offset, bf16_work_offset
    const Py_ssize_t* table                # (n_items, N_COLS)
    Py_ssize_t* counters                   # per thread, COUNTER_STRIDE apart (statistics)
    # Packed variable-length sequences: an explicit task list of (item, query block) pairs,
    # heaviest first; each item has its own query length (COL_Q_LEN, at most L) and lse
    # offset (COL_LSE). NULL: tasks run in their implicit item-major order over L rows.
    const Py_ssize_t* task_list
    # Paged keys and values (page_size 0: each item's keys are one strided matrix). Key j
    # of an item is row j % page_size of page pages[item's COL_PAGES + j // page_size];
    # the item's COL_K / COL_V offsets then locate its head within a page.
    Py_ssize_t page_size
    Py_ssize_t k_page_stride, v_page_stride   # elements from one page to the next
    const int32_t* pages
    # attention sinks
    const void* sinks                      # one logit per item (the operands' dtype), or NULL
    # ALiBi: one slope per item (the operands' dtype), or NULL; the bias is computed from
    # the positions as each block of scores is folded, never stored
    const void* alibi
    # A bias by relative position (T5's buckets, looked up per distance): per item a row of
    # 2·max_distance + 1 values (the operands' dtype) for key - query distances
    # -max_distance .. max_distance, farther ones clamped to the ends; NULL: none
    const void* distance_bias
    Py_ssize_t max_distance
    # Per-key attention mass: each task writes the column sums of its rows' weights to its
    # own row of key_mass ((n_items · n_q_blocks, S): summed over query blocks by the
    # caller, in a fixed order), from full rows of scores in the thread's scratch (at
    # mass_rows_offset, block_q × S) unless the weights output holds them. NULL: not asked.
    void* key_mass
    Py_ssize_t mass_rows_offset
    # How K and V are stored: CATTN_ELEM_NATIVE (the computing precision) or float16,
    # bfloat16, int8 read as such and converted to float32 in the kernel; bytes per stored
    # element; int8's per-key scales (NULL: none; the table locates each item's) and their
    # stride along the keys, in elements.
    int k_type, v_type
    Py_ssize_t k_size, v_size
    const float* k_scale
    const float* v_scale
    Py_ssize_t k_scale_rs, v_scale_rs
    # (debug build only) the bytes each operand spans, for the bounds checks
    cattn_extent q_bytes, k_bytes, v_bytes, out_bytes, lse_bytes, weights_bytes, mass_bytes
    cattn_extent partials_bytes


# Per-thread statistics, one cache line apart so the threads never share a line.
cdef enum:
    COUNTER_TASKS = 0
    COUNTER_KEY_BLOCKS = 1
    COUNTER_TEAM = 2        # (thread 0's slot only) the team size OpenMP gave
    COUNTER_BF16_BLOCKS = 3 # block products computed with native bfloat16 products
    COUNTER_CPU_NS = 4      # the thread's CPU time in the region, -1: unknown
    COUNTER_REGION_NS = 5   # (thread 0's slot only) the region's wall time
    COUNTER_STRIDE = 8


# Where one task works: batch item n (its table row), query rows [i0, i0 + rows), and the
# keys [k_begin, k_end) that any of those rows can see (within its chunk of keys `split`),
# plus the leading keys [keep_begin, keep_end) kept visible outside the window (empty
# unless keep_first leaves a gap before k_begin).
cdef struct Task:
    Py_ssize_t n, split, i0, rows, k_begin, k_end, keep_begin, keep_end
    Py_ssize_t lse_row0                    # lse index of the item's query row 0 (padded
                                           # layout; a task list's is in its table row)
    const Py_ssize_t* item
    # rows = members · member_rows: the items n .. n + members - 1 (sharing keys and
    # values) each with query rows [i0, i0 + member_rows); their queries at row stride q_rs
    Py_ssize_t members, member_rows, q_rs
    # (keys or values stored in another type) this item's scales, the thread's scratch for
    # a converted block and for P scaled by the values' scales
    const float* k_scale
    const float* v_scale
    float* converted
    float* p_scaled
    # (native bfloat16 products) the thread's work areas and statistics
    void* bf16_queries
    void* bf16_work
    Py_ssize_t* counters


# Steps of a key-block visit (step_key_blocks).
cdef enum:
    STEP_SCORES = 1
    STEP_FOLD = 2
    STEP_PV = 4


cdef inline floating row_max(int isa, const floating* x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return cattn_row_max_f32(isa, x, n)
    else:
        return cattn_row_max_f64(isa, x, n)


cdef inline floating exp_shift_sum(int isa, floating* x, Py_ssize_t n,
                                   floating shift) noexcept nogil:
    """x <- exp(x - shift), returning the sum of the new x."""
    if floating is float:
        return cattn_exp_shift_sum_f32(isa, x, n, shift)
    else:
        return cattn_exp_shift_sum_f64(isa, x, n, shift)


cdef inline floating exp_scalar(floating x) noexcept nogil:
    if floating is float:
        return cattn_expf_scalar(x)
    else:
        return cattn_exp_scalar(x)


cdef inline Py_ssize_t clamp(Py_ssize_t x, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    return lo if x < lo else (hi if x > hi else x)


cdef inline void apply_softcap(floating* x, Py_ssize_t n, floating cap) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating inv_cap = 1 / cap
    for j in range(n):
        x[j] = cap * <floating> tanh(x[j] * inv_cap)


cdef inline void apply_mask(floating* x, Py_ssize_t n, const Plan* p,
                            const floating* mask_add, const uint8_t* mask_bool,
                            Py_ssize_t mask_pos) noexcept nogil:
    """Add the float mask or drop (-inf) the keys the boolean mask excludes."""
    cdef Py_ssize_t j, cs = p.mask_cs
    if p.mask_kind == MASK_ADDITIVE:
        mask_add += mask_pos
        if cs == 1:
            for j in range(n):
                x[j] += mask_add[j]
        else:
            for j in range(n):
                x[j] += mask_add[j * cs]
    elif p.mask_kind == MASK_BOOL:
        mask_bool += mask_pos
        for j in range(n):
            if not mask_bool[j * cs]:
                x[j] = -INFINITY


cdef inline void add_alibi(floating* x, Py_ssize_t n, floating slope,
                           Py_ssize_t query_pos) noexcept nogil:
    """x[j] -= slope·|query_pos - j|: ALiBi's bias of key j seen from a query at query_pos
    (both relative to x's first key). An int loop over floating distances: it vectorizes,
    and a distance below 2**24 (2**53) is exact."""
    cdef int j
    cdef floating base = <floating> query_pos
    if floating is float:
        for j in range(<int> n):
            x[j] -= slope * fabsf(base - <float> j)
    else:
        for j in range(<int> n):
            x[j] -= slope * fabs(base - <double> j)


cdef inline void add_distance_bias(floating* x, Py_ssize_t n, const floating* by_distance,
                                   Py_ssize_t max_distance,
                                   Py_ssize_t query_pos) noexcept nogil:
    """x[j] += by_distance[j - query_pos], the distance clamped to ±max_distance
    (by_distance points at distance 0). The distance grows by one per key, so the keys
    within max_distance read one contiguous stretch of by_distance (a vector add, where a
    clamped index per key was a gather: the bias preset's T5 call went from 1.3-1.4x to
    1.0-1.05x the plain call, Ice Lake), and the farther keys on either side one end
    value."""
    cdef Py_ssize_t j
    cdef Py_ssize_t near_begin = clamp(query_pos - max_distance, 0, n)
    cdef Py_ssize_t near_end = clamp(query_pos + max_distance + 1, near_begin, n)
    cdef floating before = by_distance[-max_distance], after = by_distance[max_distance]
    for j in range(near_begin):
        x[j] += before
    for j in range(near_begin, near_end):
        x[j] += by_distance[j - query_pos]
    for j in range(near_end, n):
        x[j] += after


cdef inline void fold_row(floating* row, Py_ssize_t n_keys, Py_ssize_t a, Py_ssize_t b,
                          Py_ssize_t gap_a, Py_ssize_t gap_b,
                          Py_ssize_t r, Py_ssize_t mask_pos, const Plan* p,
                          const floating* mask_add, const uint8_t* mask_bool,
                          floating slope, Py_ssize_t query_pos, Py_ssize_t item_index,
                          floating* acc, floating* run_max, floating* run_sum) noexcept nogil:
    """Turn one row of block scores into probabilities P (visible keys [a, b) of the block,
    except the hidden gap [gap_a, gap_b) between kept first keys and the window) and fold
    them into the running max, sum and accumulator of query row r. query_pos: the row's
    position relative to the block's first key (for ALiBi's slope, when not 0, and the
    distance bias, item_index's row of it)."""
    cdef Py_ssize_t j, Ev = p.Ev
    cdef floating blk_max, m_old, m_new, corr
    cdef floating* x = row + a
    cdef Py_ssize_t n = b - a
    if n <= 0:
        memset(row, 0, n_keys * sizeof(floating))
        return
    if a > 0:
        memset(row, 0, a * sizeof(floating))
    if b < n_keys:
        memset(row + b, 0, (n_keys - b) * sizeof(floating))
    if p.softcap > 0:
        apply_softcap(x, n, <floating> p.softcap)
    if p.mask_kind != MASK_NONE:
        apply_mask(x, n, p, mask_add, mask_bool, mask_pos + a * p.mask_cs)
    if slope != 0:
        add_alibi(x, n, slope, query_pos - a)
    if p.distance_bias != NULL:
        add_distance_bias(x, n, (<const floating*> p.distance_bias)
                          + p.max_distance + item_index * (2 * p.max_distance + 1),
                          p.max_distance, query_pos - a)
    for j in range(gap_a, gap_b):
        row[j] = -INFINITY
    blk_max = row_max(p.isa, x, n)
    m_old = run_max[r]
    # (a NaN block max wins, so that a NaN score poisons its row as in the definition)
    m_new = blk_max if (blk_max > m_old or blk_max != blk_max) else m_old
    if m_new == -INFINITY:  # nothing visible yet: exp(-inf - -inf) would be NaN
        memset(x, 0, n * sizeof(floating))
        return
    cdef floating block_sum = exp_shift_sum(p.isa, x, n, m_new)
    if m_new != m_old:
        # Rescale what earlier blocks accumulated to the new maximum.
        corr = exp_scalar(m_old - m_new)
        run_sum[r] *= corr
        acc += r * Ev
        for j in range(Ev):
            acc[j] *= corr
    run_sum[r] += block_sum
    run_max[r] = m_new


cdef inline void block_scores(const Plan* p, const Task* t, Py_ssize_t n_keys,
                              const floating* q_block, const char* k_block,
                              const float* k_scale, floating* packed, floating* scores,
                              Py_ssize_t ld) noexcept nogil:
    """scores[rows, n_keys] (row stride ld) = scale · Q_blk · K_blkᵀ (times each key's scale
    for int8 keys)."""
    cdef Py_ssize_t rows = t.rows
    if p.k_type != CATTN_ELEM_NATIVE:
        if floating is float:
            scores_converted(p, t, n_keys, q_block, k_block, k_scale, packed, scores, ld)
        return
    cdef const floating* k_native = <const floating*> k_block
    if p.blas:
        gemm_abt(<int> rows, <int> n_keys, <int> p.E, <floating> p.scale, q_block,
                 <int> t.q_rs, k_native, <int> p.k_rs, <floating> 0, scores, <int> ld)
    elif rows <= CATTN_DIRECT_ROWS or n_keys < CATTN_DIRECT_KEYS:
        # decoding, or a few keys (a tiny call): stream K, no packing
        if floating is float:
            cattn_gemm_qkt_direct_f32(p.isa, rows, n_keys, p.E, <float> p.scale, q_block,
                                      t.q_rs, k_native, p.k_rs, scores, ld)
        else:
            cattn_gemm_qkt_direct_f64(p.isa, rows, n_keys, p.E, p.scale, q_block, t.q_rs,
                                      k_native, p.k_rs, scores, ld)
    else:
        if floating is float:
            cattn_pack_keys_f32(p.isa, k_native, p.k_rs, n_keys, p.E, packed)
            cattn_gemm_qkt_f32(p.isa, rows, n_keys, p.E, <float> p.scale, q_block, t.q_rs,
                               packed, scores, ld)
        else:
            cattn_pack_keys_f64(p.isa, k_native, p.k_rs, n_keys, p.E, packed)
            cattn_gemm_qkt_f64(p.isa, rows, n_keys, p.E, p.scale, q_block, t.q_rs, packed,
                               scores, ld)


cdef inline void scores_converted(const Plan* p, const Task* t, Py_ssize_t n_keys,
                                  const float* q_block, const char* k_block,
                                  const float* k_scale, float* packed, float* scores,
                                  Py_ssize_t ld) noexcept nogil:
    """block_scores for keys stored as float16, bfloat16 or int8: converted to float32 as
    they are packed (or streamed, or, for BLAS, as a block), then the float32 GEMM; int8's
    per-key scale multiplies each key's column of scores afterwards."""
    cdef Py_ssize_t r, j, rows = t.rows
    cdef float* row
    if p.bf16_scores and rows > CATTN_DIRECT_ROWS and n_keys >= CATTN_DIRECT_KEYS:
        cattn_bf16_qkt(p.bf16_isa, rows, n_keys, p.E, <float> p.scale,
                       <const unsigned short*> k_block, p.k_rs, scores, ld, t.bf16_queries,
                       t.bf16_work)
        t.counters[COUNTER_BF16_BLOCKS] += 1
        return
    if p.blas:
        cattn_convert_rows(p.isa, p.k_type, k_block, p.k_rs, n_keys, p.E, t.converted, p.E)
        gemm_abt(<int> rows, <int> n_keys, <int> p.E, <float> p.scale, q_block,
                 <int> t.q_rs, t.converted, <int> p.E, <float> 0, scores, <int> ld)
    elif rows <= CATTN_DIRECT_ROWS or n_keys < CATTN_DIRECT_KEYS:
        cattn_gemm_qkt_direct_cvt(p.isa, p.k_type, rows, n_keys, p.E, <float> p.scale,
                                  q_block, t.q_rs, k_block, p.k_rs, scores, ld)
    else:
        cattn_pack_keys_cvt(p.isa, p.k_type, k_block, p.k_rs, n_keys, p.E, packed)
        cattn_gemm_qkt_f32(p.isa, rows, n_keys, p.E, <float> p.scale, q_block, t.q_rs,
                           packed, scores, ld)
    if k_scale != NULL:
        for r in range(rows):
            row = scores + r * ld
            for j in range(n_keys):
                row[j] *= k_scale[j * p.k_scale_rs]


cdef inline void block_pv(const Plan* p, const Task* t, Py_ssize_t n_keys,
                          const floating* probs, Py_ssize_t ld, const char* v_block,
                          const float* v_scale, floating* acc) noexcept nogil:
    """acc[rows, Ev] += P[rows, n_keys] · V_blk (P times each key's scale for int8 values)."""
    cdef Py_ssize_t rows = t.rows
    if p.v_type != CATTN_ELEM_NATIVE:
        if floating is float:
            pv_converted(p, t, n_keys, probs, ld, v_block, v_scale, acc)
        return
    cdef const floating* v_native = <const floating*> v_block
    if p.blas:
        gemm_ab(<int> rows, <int> p.Ev, <int> n_keys, <floating> 1, probs, <int> ld,
                v_native, <int> p.v_rs, <floating> 1, acc, <int> p.Ev)
    elif rows <= CATTN_DIRECT_ROWS:  # decoding: stream V
        if floating is float:
            cattn_gemm_pv_direct_f32(p.isa, rows, p.Ev, n_keys, probs, ld, v_native, p.v_rs,
                                     acc, p.Ev)
        else:
            cattn_gemm_pv_direct_f64(p.isa, rows, p.Ev, n_keys, probs, ld, v_native, p.v_rs,
                                     acc, p.Ev)
    else:
        if floating is float:
            cattn_gemm_pv_f32(p.isa, rows, p.Ev, n_keys, probs, ld, v_native, p.v_rs, acc,
                              p.Ev)
        else:
            cattn_gemm_pv_f64(p.isa, rows, p.Ev, n_keys, probs, ld, v_native, p.v_rs, acc,
                              p.Ev)


cdef inline void pv_converted(const Plan* p, const Task* t, Py_ssize_t n_keys,
                              const float* probs, Py_ssize_t ld, const char* v_block,
                              const float* v_scale, float* acc) noexcept nogil:
    """block_pv for values stored as float16, bfloat16 or int8: int8's per-key scales
    multiply a copy of P (its row sums are already taken, from the unscaled P); decoding
    streams and converts V, more rows convert the block once and run the float32 GEMM."""
    cdef Py_ssize_t r, j, rows = t.rows
    cdef float* scaled_row
    cdef const float* prob_row
    if v_scale != NULL:
        for r in range(rows):
            scaled_row = t.p_scaled + r * p.scores_rs
            prob_row = probs + r * ld
            for j in range(n_keys):
                scaled_row[j] = prob_row[j] * v_scale[j * p.v_scale_rs]
        probs, ld = t.p_scaled, p.scores_rs
    if p.bf16_pv and rows > CATTN_DIRECT_ROWS:
        cattn_bf16_pv(p.bf16_isa, rows, p.Ev, n_keys, probs, ld,
                      <const unsigned short*> v_block, p.v_rs, acc, p.Ev, t.bf16_work)
        t.counters[COUNTER_BF16_BLOCKS] += 1
        return
    if rows <= CATTN_DIRECT_ROWS and not p.blas:
        cattn_gemm_pv_direct_cvt(p.isa, p.v_type, rows, p.Ev, n_keys, probs, ld, v_block,
                                 p.v_rs, acc, p.Ev)
        return
    cattn_convert_rows(p.isa, p.v_type, v_block, p.v_rs, n_keys, p.Ev, t.converted, p.Ev)
    if p.blas:
        gemm_ab(<int> rows, <int> p.Ev, <int> n_keys, <float> 1, probs, <int> ld,
                t.converted, <int> p.Ev, <float> 1, acc, <int> p.Ev)
    else:
        cattn_gemm_pv_f32(p.isa, rows, p.Ev, n_keys, probs, ld, t.converted, p.Ev, acc, p.Ev)


cdef inline void fold_block(const Plan* p, const Task* t, Py_ssize_t kb0, Py_ssize_t n_keys,
                            floating* scores, Py_ssize_t ld,
                            const floating* mask_add, const uint8_t* mask_bool,
                            floating* acc, floating* run_max, floating* run_sum) noexcept nogil:
    """Fold the scores of keys [kb0, kb0 + n_keys) into the online softmax of every row."""
    cdef Py_ssize_t r, i, lo, hi, a, b, gap_a, gap_b
    cdef Py_ssize_t kv_len = t.item[COL_KV_LEN], diag = t.item[COL_DIAG]
    cdef Py_ssize_t keep_first = t.item[COL_KEEP_FIRST]
    cdef const Py_ssize_t* item
    cdef Py_ssize_t n
    cdef floating slope = 0
    for r in range(t.rows):
        item = row_item(p, t, r)
        n = t.n + r // t.member_rows  # (this row's item: a grouped task's rows span heads)
        if p.alibi != NULL:
            slope = (<const floating*> p.alibi)[n]
        i = t.i0 + r % t.member_rows
        lo = clamp(i + diag - p.win_left, 0, kv_len)
        hi = clamp(i + diag + p.win_right + 1, 0, kv_len)
        a = clamp(lo - kb0, 0, n_keys)
        b = clamp(hi - kb0, 0, n_keys)
        gap_a = gap_b = 0
        # The first keys stay visible up to the window's right side (hi): either they
        # reach the window (one range from 0), or a hidden gap lies between the two.
        if keep_first > kb0:
            if keep_first >= lo:
                a = 0
            elif b > a:  # kept keys, hidden gap, window: in this block
                gap_a = clamp(keep_first - kb0, 0, n_keys)
                gap_b = a
                a = 0
            else:  # (keep_first < lo <= hi)
                a = 0
                b = clamp(keep_first - kb0, 0, n_keys)
        fold_row(scores + r * ld, n_keys, a, b, gap_a, gap_b, r,
                 item[COL_MASK] + i * p.mask_rs + kb0 * p.mask_cs, p,
                 mask_add, mask_bool, slope, i + diag - kb0, n, acc, run_max, run_sum)


cdef inline void task_of(const Plan* p, Py_ssize_t task_index, Task* t) noexcept nogil:
    """The coordinates of a task: tasks run item-major, then query block, then key chunk
    (or in the order of the task list, whose items have their own query lengths)."""
    cdef Py_ssize_t n_rows = p.L
    t.members = 1
    t.q_rs = p.q_rs
    if p.task_list != NULL:
        t.split = 0
        t.n = p.task_list[TASK_COLS * task_index]
        t.i0 = p.task_list[TASK_COLS * task_index + 1] * p.block_q
        t.members = p.task_list[TASK_COLS * task_index + 2]
        t.item = p.table + t.n * N_COLS
        n_rows = t.item[COL_Q_LEN]
    else:
        t.split = task_index % p.n_splits
        t.members = p.group
        t.n = task_index // p.n_splits // p.n_q_blocks * p.group
        t.i0 = (task_index // p.n_splits % p.n_q_blocks) * p.block_q
        t.item = p.table + t.n * N_COLS
        t.lse_row0 = t.n * p.L
    t.member_rows = (p.block_q if t.i0 + p.block_q < n_rows else n_rows - t.i0)
    t.rows = t.member_rows * t.members
    cdef Py_ssize_t kv_len = t.item[COL_KV_LEN], diag = t.item[COL_DIAG]
    # Keys any row of the block may see; lo and hi grow with i, so the first row gives
    # the start and the last row the end.
    t.k_begin = clamp(t.i0 + diag - p.win_left, 0, kv_len)
    t.k_end = clamp(t.i0 + t.member_rows - 1 + diag + p.win_right + 1, 0, kv_len)
    # Kept first keys: visible to a row up to its window's right side, so to some row of
    # the block below k_end.
    cdef Py_ssize_t keep = t.item[COL_KEEP_FIRST]
    t.keep_begin = 0
    t.keep_end = keep if keep < t.k_end else t.k_end
    if p.n_splits > 1:
        t.k_begin = clamp(t.k_begin, t.split * p.split_keys, (t.split + 1) * p.split_keys)
        t.k_end = clamp(t.k_end, t.k_begin, (t.split + 1) * p.split_keys)
        t.keep_begin = t.split * p.split_keys
        t.keep_end = clamp(t.keep_end, t.keep_begin, (t.split + 1) * p.split_keys)
    if t.keep_end >= t.k_begin and t.keep_end > t.keep_begin:  # no gap: one range
        t.k_begin = t.keep_begin
    if t.keep_end >= t.k_begin:
        t.keep_end = t.keep_begin
    CATTN_ASSERT(0 <= t.n and t.n + t.members <= p.n_items, "task items")
    CATTN_ASSERT(0 <= t.i0 and 0 < t.member_rows and t.i0 + t.member_rows <= p.L, "task rows")
    CATTN_ASSERT(0 <= t.k_begin and t.k_end <= p.S and kv_len <= p.S, "task keys")


cdef inline const Py_ssize_t* row_item(const Plan* p, const Task* t,
                                       Py_ssize_t r) noexcept nogil:
    """The table row of the item whose query row is row r of the task."""
    return t.item + r // t.member_rows * N_COLS


cdef inline Py_ssize_t row_lse(const Plan* p, const Task* t, Py_ssize_t r) noexcept nogil:
    """Where row r of the task keeps its lse (and its merged chunk rows: item · L + i);
    with a task list, where its item's table row says."""
    if p.task_list != NULL:
        return row_item(p, t, r)[COL_LSE] + t.i0 + r % t.member_rows
    return t.lse_row0 + r // t.member_rows * p.L + t.i0 + r % t.member_rows


cdef inline const floating* gather_queries(const Plan* p, Task* t, const floating* q,
                                           floating* rows_out) noexcept nogil:
    """The task's query rows, one block under the other: in place for one item, else
    copied (member by member) into rows_out at row stride E, so that one GEMM scores all
    of them against the shared keys."""
    cdef Py_ssize_t m, i
    cdef const floating* src
    if t.members == 1:
        return q + t.item[COL_Q] + t.i0 * p.q_rs
    for m in range(t.members):
        src = q + t.item[m * N_COLS + COL_Q] + t.i0 * p.q_rs
        for i in range(t.member_rows):
            memcpy(rows_out + (m * t.member_rows + i) * p.E, src + i * p.q_rs,
                   p.E * sizeof(floating))
    t.q_rs = p.E
    return rows_out


cdef inline Py_ssize_t segment_end(const Plan* p, Py_ssize_t j, Py_ssize_t kb1) noexcept nogil:
    """The end of the keys from j on (before kb1) that lie at one row stride in memory:
    all of them, or the rest of key j's page."""
    if p.page_size == 0:
        return kb1
    cdef Py_ssize_t page_end = (j // p.page_size + 1) * p.page_size
    return page_end if page_end < kb1 else kb1


cdef inline Py_ssize_t key_row(const Plan* p, const Task* t, Py_ssize_t j,
                               Py_ssize_t row_stride, Py_ssize_t page_stride) noexcept nogil:
    """Elements from the item's K (or V) base to the row of key j."""
    if p.page_size == 0:
        return j * row_stride
    return (p.pages[t.item[COL_PAGES] + j // p.page_size] * page_stride
            + j % p.page_size * row_stride)


# Pages of at most this many rows get their streams started early (prefetch_pages); longer
# ones amortize the hardware prefetcher's own start.
cdef Py_ssize_t SMALL_PAGE = 64

# Streaming rows (decoding) take P·V in runs of this many keys: their key blocks are long
# (STREAM_BLOCK_KEYS in cattn._plan), and where P·V takes several passes over each value
# row (2-4 rows; one row on AVX2, with half the registers), a run's values stay in L2
# between its passes (256 float32 rows of 128 values: 128 KiB) instead of coming from
# memory again.
cdef Py_ssize_t VALUE_RUN_KEYS = 256


cdef inline void prefetch_stream_starts(const char* row, Py_ssize_t rows,
                                        Py_ssize_t row_bytes, Py_ssize_t stride_bytes,
                                        bint near) noexcept nogil:
    """Ask for the first two cache lines of every 4 KiB of `rows` rows: the hardware's
    stream prefetcher does not cross into a new 4 KiB page by itself, and a few early
    requests per page get it going before the rows are read."""
    cdef Py_ssize_t r = 0, every = max(4096 // stride_bytes, 1) if stride_bytes > 0 else 1
    while r < rows:
        if near:
            cattn_prefetch_near(row)
            if row_bytes > 64:
                cattn_prefetch_near(row + 64)
        else:
            cattn_prefetch_l2(row)
            if row_bytes > 64:
                cattn_prefetch_l2(row + 64)
        row += every * stride_bytes
        r += every


cdef inline void prefetch_pages(const Plan* p, const Task* t, Py_ssize_t s0, Py_ssize_t s1,
                                Py_ssize_t kb_last, const char* k_item,
                                const char* v_item) noexcept nogil:
    """Paged keys: while keys [s0, s1) of one page are scored, start the streams of the
    next page's keys and of these keys' values (read by P·V after the block's fold). Each
    page is a new stretch of memory (a decode from pages of 16 rows: 83% -> 88% of the
    contiguous decode's speed)."""
    if s1 < kb_last:
        prefetch_stream_starts(k_item + key_row(p, t, s1, p.k_rs, p.k_page_stride) * p.k_size,
                               segment_end(p, s1, kb_last) - s1, p.E * p.k_size,
                               p.k_rs * p.k_size, True)
    prefetch_stream_starts(v_item + key_row(p, t, s0, p.v_rs, p.v_page_stride) * p.v_size,
                           s1 - s0, p.Ev * p.v_size, p.v_rs * p.v_size, False)


cdef void step_key_blocks(const Plan* p, const Task* t, int steps, Py_ssize_t kb_first,
                          Py_ssize_t kb_last, const floating* q_block,
                          const char* k_item, const char* v_item, floating* packed,
                          floating* scores, Py_ssize_t ld, bint scores_follow_keys,
                          const floating* mask_add, const uint8_t* mask_bool,
                          floating* acc, floating* run_max, floating* run_sum,
                          Py_ssize_t* counters) noexcept nogil:
    """Visit keys [kb_first, kb_last) one block at a time, doing `steps` on each: the
    scores (into `scores`, or at the keys' own columns of it when scores_follow_keys), the
    fold into the online softmax, and acc += P·V. The GEMMs run once per run of keys
    contiguous in memory (the whole block, or each page of paged keys within it; streaming
    rows take P·V in runs of at most VALUE_RUN_KEYS); the fold stays one per block."""
    cdef Py_ssize_t kb0 = kb_first, kb1, s0, s1
    cdef floating* block
    while kb0 < kb_last:
        kb1 = kb0 + p.block_k if kb0 + p.block_k < kb_last else kb_last
        block = scores + kb0 if scores_follow_keys else scores
        if steps & STEP_SCORES:
            s0 = kb0
            while s0 < kb1:
                s1 = segment_end(p, s0, kb1)
                if 0 < p.page_size <= SMALL_PAGE:
                    prefetch_pages(p, t, s0, s1, kb_last, k_item, v_item)
                CATTN_ASSERT_INSIDE(p.k_bytes,
                    k_item + key_row(p, t, s0, p.k_rs, p.k_page_stride) * p.k_size,
                    k_item + (key_row(p, t, s1 - 1, p.k_rs, p.k_page_stride) + p.E - 1) * p.k_size,
                    p.k_size, "key rows read")
                block_scores(p, t, s1 - s0, q_block,
                             k_item + key_row(p, t, s0, p.k_rs, p.k_page_stride) * p.k_size,
                             t.k_scale + s0 * p.k_scale_rs if t.k_scale != NULL else NULL,
                             packed, block + (s0 - kb0), ld)
                s0 = s1
            counters[COUNTER_KEY_BLOCKS] += 1
        if steps & STEP_FOLD:
            fold_block(p, t, kb0, kb1 - kb0, block, ld, mask_add, mask_bool, acc, run_max,
                       run_sum)
        if steps & STEP_PV:
            s0 = kb0
            while s0 < kb1:
                s1 = segment_end(p, s0, kb1)
                if t.rows <= CATTN_DIRECT_ROWS and s1 - s0 > VALUE_RUN_KEYS:
                    s1 = s0 + VALUE_RUN_KEYS
                CATTN_ASSERT_INSIDE(p.v_bytes,
                    v_item + key_row(p, t, s0, p.v_rs, p.v_page_stride) * p.v_size,
                    v_item + (key_row(p, t, s1 - 1, p.v_rs, p.v_page_stride) + p.Ev - 1) * p.v_size,
                    p.v_size, "value rows read")
                block_pv(p, t, s1 - s0, block + (s0 - kb0), ld,
                         v_item + key_row(p, t, s0, p.v_rs, p.v_page_stride) * p.v_size,
                         t.v_scale + s0 * p.v_scale_rs if t.v_scale != NULL else NULL, acc)
                s0 = s1
        kb0 = kb1


cdef void store_partials(const Plan* p, const Task* t, const floating* acc,
                         const floating* run_max, const floating* run_sum,
                         floating* partials) noexcept nogil:
    """One chunk of the keys: its unnormalized rows, row max and row sum, for
    merge_split_row."""
    cdef Py_ssize_t r, Ev = p.Ev
    cdef floating* part_row
    for r in range(t.rows):
        part_row = partials + (t.split * p.n_items * p.L + row_lse(p, t, r)) * (Ev + 2)
        CATTN_ASSERT_INSIDE(p.partials_bytes, part_row, part_row + Ev + 1, sizeof(floating),
            "partials row written")
        memcpy(part_row, acc + r * Ev, Ev * sizeof(floating))
        part_row[Ev] = run_max[r]
        part_row[Ev + 1] = run_sum[r]


cdef void finish_rows(const Plan* p, const Task* t, const floating* acc,
                      const floating* run_max, const floating* run_sum, floating* out,
                      floating* lse, floating* weights_rows,
                      Py_ssize_t weights_begin) noexcept nogil:
    """Normalize the rows into the output (and lse, and the weights when asked)."""
    cdef Py_ssize_t r, i, j, Ev = p.Ev
    cdef floating inv_sum
    cdef floating* out_row
    for r in range(t.rows):
        i = t.i0 + r % t.member_rows
        out_row = out + row_item(p, t, r)[COL_OUT] + i * p.out_rs
        CATTN_ASSERT_INSIDE(p.out_bytes, out_row, out_row + (Ev - 1) * p.out_cs, sizeof(floating),
            "output row written")
        if lse != NULL: CATTN_ASSERT_INSIDE(p.lse_bytes, lse + row_lse(p, t, r),
            lse + row_lse(p, t, r), sizeof(floating), "lse entry written")
        if p.weights_mode and t.k_end > weights_begin:
            CATTN_ASSERT_INSIDE(p.weights_bytes, weights_rows + r * p.S + weights_begin,
                weights_rows + r * p.S + t.k_end - 1, sizeof(floating), "weights row written")
        if run_sum[r] == 0:  # no visible key: output 0, lse -inf (never NaN)
            for j in range(Ev):
                out_row[j * p.out_cs] = 0
            if lse != NULL:
                lse[row_lse(p, t, r)] = -INFINITY
            continue
        inv_sum = 1 / run_sum[r]
        for j in range(Ev):
            out_row[j * p.out_cs] = acc[r * Ev + j] * inv_sum
        if lse != NULL:
            lse[row_lse(p, t, r)] = run_max[r] + <floating> log(run_sum[r])
        if weights_rows != NULL:
            for j in range(weights_begin, t.k_end):
                weights_rows[r * p.S + j] *= inv_sum


cdef void sum_weight_columns(const Plan* p, const Task* t, const floating* weights_rows,
                             Py_ssize_t first_key, floating* key_mass) noexcept nogil:
    """The task's share of the key mass: the sum over its rows of each key's weight, into
    its own row of key_mass (zero outside the keys it sees), rows added in order."""
    cdef Py_ssize_t r, j
    cdef floating* mass = key_mass + (t.n * p.n_q_blocks + t.i0 // p.block_q) * p.S
    cdef const floating* row
    if t.k_end <= first_key:
        return
    CATTN_ASSERT_INSIDE(p.mass_bytes, mass + first_key, mass + t.k_end - 1, sizeof(floating),
        "key-mass row written")
    memcpy(mass + first_key, weights_rows + first_key,
           (t.k_end - first_key) * sizeof(floating))
    for r in range(1, t.rows):
        row = weights_rows + r * p.S
        for j in range(first_key, t.k_end):
            mass[j] += row[j]


cdef void attend_query_block(const Plan* p, Py_ssize_t task_index,
                             const floating* q, const void* k, const void* v,
                             const floating* mask_add, const uint8_t* mask_bool,
                             floating* out, floating* lse, floating* weights,
                             floating* partials, floating* scratch,
                             Py_ssize_t* counters) noexcept nogil:
    """One task: a block of query rows of one batch item, over the key blocks it can see
    (of one chunk of keys, when the keys are split).

    scratch (this thread's own) holds, in order: running row max and row sum (task_rows
    each), the unnormalized output rows (task_rows × Ev), the block scores (task_rows ×
    block_k, absent when the scores go straight into the weights output) and the packed
    keys of one block (block_k × E rounded up to whole panels; micro-kernels only); then,
    when K or V is stored in another type, a converted block (block_k × max(E, Ev)), and
    with V's scales, P scaled by them (task_rows × block_k); with grouped items, their
    gathered queries (task_rows × E) at queries_offset.
    """
    cdef Task t
    task_of(p, task_index, &t)
    cdef Py_ssize_t r
    cdef floating sink
    cdef bint keep_range = t.keep_end > t.keep_begin
    cdef Py_ssize_t first_key = t.keep_begin if keep_range else t.k_begin
    cdef floating* run_max = scratch
    cdef floating* run_sum = scratch + p.task_rows
    cdef floating* acc = scratch + 2 * p.task_rows
    cdef floating* scores = acc + p.task_rows * p.Ev
    cdef floating* packed = scores + (0 if p.weights_mode else p.task_rows * p.scores_rs)
    cdef floating* weights_rows = NULL
    CATTN_ASSERT_INSIDE(p.q_bytes, q + t.item[COL_Q] + t.i0 * p.q_rs,
        q + row_item(p, &t, t.rows - 1)[COL_Q] + (t.i0 + t.member_rows - 1) * p.q_rs + p.E - 1,
        sizeof(floating), "query rows read")
    cdef const floating* q_block = gather_queries(p, &t, q, scratch + p.queries_offset)
    cdef const char* k_item = <const char*> k + t.item[COL_K] * p.k_size
    cdef const char* v_item = <const char*> v + t.item[COL_V] * p.v_size
    t.converted = <float*> (packed + packed_elements(p, floating is double))
    t.p_scaled = t.converted + converted_elements(p)
    t.bf16_queries = <void*> (scratch + p.bf16_queries_offset)
    t.bf16_work = <void*> (scratch + p.bf16_work_offset)
    t.counters = counters
    if floating is float:
        if p.bf16_scores and t.rows > CATTN_DIRECT_ROWS:
            cattn_bf16_load_queries(t.rows, p.E, q_block, 1, t.q_rs, t.bf16_queries)
    t.k_scale = p.k_scale + t.item[COL_K_SCALE] if p.k_scale != NULL else NULL
    t.v_scale = p.v_scale + t.item[COL_V_SCALE] if p.v_scale != NULL else NULL

    for r in range(t.rows):
        run_max[r] = -INFINITY
        run_sum[r] = 0
    if p.sinks != NULL and t.split == 0:
        # The sink is one more score with no value: the online softmax starts from it
        # (running max = sink, running sum = exp(0)), once per row, in the first chunk only.
        for r in range(t.rows):
            sink = (<const floating*> p.sinks)[t.n + r // t.member_rows]
            if sink != -INFINITY:
                run_max[r] = sink
                run_sum[r] = 1
    memset(acc, 0, t.rows * p.Ev * sizeof(floating))
    counters[COUNTER_TASKS] += 1

    if p.weights_mode or p.key_mass != NULL:
        # The scores of all visible keys go straight into the weights output (or the
        # thread's rows, for the key mass), are turned into probabilities in one fold (one
        # max per row: no rescaling of earlier blocks), normalized at the end; the GEMMs
        # still run block by block.
        weights_rows = (weights + (t.n * p.L + t.i0) * p.S if p.weights_mode
                        else scratch + p.mass_rows_offset)
        if keep_range:
            step_key_blocks(p, &t, STEP_SCORES, t.keep_begin, t.keep_end, q_block, k_item,
                            v_item, packed, weights_rows, p.S, True, mask_add, mask_bool,
                            acc, run_max, run_sum, counters)
        step_key_blocks(p, &t, STEP_SCORES, t.k_begin, t.k_end, q_block, k_item, v_item,
                        packed, weights_rows, p.S, True, mask_add, mask_bool, acc, run_max,
                        run_sum, counters)
        if t.k_end > first_key:  # (the gap between the ranges is hidden by the fold)
            fold_block(p, &t, first_key, t.k_end - first_key, weights_rows + first_key,
                       p.S, mask_add, mask_bool, acc, run_max, run_sum)
        if keep_range:
            step_key_blocks(p, &t, STEP_PV, t.keep_begin, t.keep_end, q_block, k_item,
                            v_item, packed, weights_rows, p.S, True, mask_add, mask_bool,
                            acc, run_max, run_sum, counters)
        step_key_blocks(p, &t, STEP_PV, t.k_begin, t.k_end, q_block, k_item, v_item,
                        packed, weights_rows, p.S, True, mask_add, mask_bool, acc, run_max,
                        run_sum, counters)
    else:
        if keep_range:
            step_key_blocks(p, &t, STEP_SCORES | STEP_FOLD | STEP_PV, t.keep_begin,
                            t.keep_end, q_block, k_item, v_item, packed, scores, p.scores_rs,
                            False, mask_add, mask_bool, acc, run_max, run_sum, counters)
        step_key_blocks(p, &t, STEP_SCORES | STEP_FOLD | STEP_PV, t.k_begin, t.k_end,
                        q_block, k_item, v_item, packed, scores, p.scores_rs, False,
                        mask_add, mask_bool, acc, run_max, run_sum, counters)

    if p.n_splits > 1:  # one chunk of the keys: leave the merging to merge_split_row
        store_partials(p, &t, acc, run_max, run_sum, partials)
    else:
        finish_rows(p, &t, acc, run_max, run_sum, out, lse, weights_rows, first_key)
    if p.key_mass != NULL:
        sum_weight_columns(p, &t, weights_rows, first_key, <floating*> p.key_mass)


cdef void merge_split_row(const Plan* p, Py_ssize_t row, const floating* partials,
                          floating* out, floating* lse) noexcept nogil:
    """Combine the chunks of keys of one query row (row = n·L + i): each chunk's sum and
    unnormalized output are rescaled to the common maximum, as in the online softmax."""
    cdef Py_ssize_t n = row // p.L, i = row % p.L, s, j, Ev = p.Ev
    cdef Py_ssize_t part_stride = p.n_items * p.L * (Ev + 2)
    cdef const floating* part = partials + row * (Ev + 2)
    cdef floating* out_row = out + p.table[n * N_COLS + COL_OUT] + i * p.out_rs
    cdef floating m = -INFINITY, total = 0, w
    CATTN_ASSERT_INSIDE(p.out_bytes, out_row, out_row + (Ev - 1) * p.out_cs, sizeof(floating),
        "output row written")
    if lse != NULL: CATTN_ASSERT_INSIDE(p.lse_bytes, lse + row, lse + row, sizeof(floating),
        "lse entry written")
    # A chunk counts unless its sum is exactly 0 (nothing visible): a NaN sum or max (a
    # NaN or +inf score in the chunk) must poison the row, not vanish.
    for s in range(p.n_splits):
        w = part[s * part_stride + Ev]
        if part[s * part_stride + Ev + 1] != 0 and (w > m or w != w):
            m = w
    for j in range(Ev):
        out_row[j * p.out_cs] = 0
    if m == -INFINITY:  # no visible key in any chunk
        if lse != NULL:
            lse[row] = -INFINITY
        return
    for s in range(p.n_splits):
        if part[s * part_stride + Ev + 1] != 0:
            w = exp_scalar(part[s * part_stride + Ev] - m)
            total += part[s * part_stride + Ev + 1] * w
            for j in range(Ev):
                out_row[j * p.out_cs] += part[s * part_stride + j] * w
    for j in range(Ev):
        out_row[j * p.out_cs] /= total
    if lse != NULL:
        lse[row] = m + <floating> log(total)


cdef int run_tasks(const Plan* p, int num_threads, Py_ssize_t first, Py_ssize_t last,
                   const floating* q, const void* k, const void* v,
                   const floating* mask_add, const uint8_t* mask_bool,
                   floating* out, floating* lse, floating* weights, floating* partials,
                   floating* scratch_base, Py_ssize_t scratch_stride,
                   bint merge_splits) noexcept nogil:
    """Tasks [first, last), on num_threads threads; then, with merge_splits, the chunks of
    keys of every row merged, in the same parallel region: a second region would wake the
    (passively waiting) workers again, which cost a 2-thread decode ~30%."""
    cdef Py_ssize_t task, row, n_rows = p.n_items * p.L
    p.counters[COUNTER_TEAM] = 1
    if num_threads <= 1:  # no parallel region at all: it costs microseconds on tiny inputs
        for task in range(first, last):
            attend_query_block(p, task, q, k, v, mask_add, mask_bool, out, lse, weights,
                               partials, scratch_base, p.counters)
        if merge_splits:
            for row in range(n_rows):
                merge_split_row(p, row, partials, out, lse)
        return 0
    cdef floating* mine = scratch_base
    cdef double cpu_start
    # (the clocks around the region and in each thread measure what a team costs a call:
    # see team_for_work)
    cdef double start = cattn_seconds()
    with parallel(num_threads=num_threads):
        # Each thread owns one slice of the scratch array (no shared mutable state).
        mine = scratch_base + threadid() * scratch_stride
        cpu_start = cattn_thread_cpu_seconds()
        if threadid() == 0:
            p.counters[COUNTER_TEAM] = omp_get_num_threads()
        for task in prange(first, last, schedule='dynamic', chunksize=1):
            attend_query_block(p, task, q, k, v, mask_add, mask_bool, out, lse, weights,
                               partials, mine, p.counters + threadid() * COUNTER_STRIDE)
        # (prange ends with a barrier: every chunk is done before any row is merged)
        if merge_splits:
            for row in prange(n_rows, schedule='static'):
                merge_split_row(p, row, partials, out, lse)
        # (a sleeping thread spends no CPU time: waits at the barriers are not counted)
        (p.counters + threadid() * COUNTER_STRIDE)[COUNTER_CPU_NS] = (
            <Py_ssize_t> ((cattn_thread_cpu_seconds() - cpu_start) * 1e9)
            if cpu_start >= 0 else -1)
    p.counters[COUNTER_REGION_NS] = <Py_ssize_t> ((cattn_seconds() - start) * 1e9)
    return 0


cdef void fill_nan(const Plan* p, floating* out) noexcept nogil:
    """Every output element becomes NaN: what an interrupted call leaves behind, so that no
    partly computed `out` passes for a result."""
    cdef Py_ssize_t n, i, j
    cdef floating* row
    for n in range(p.n_items):
        for i in range(p.L if p.task_list == NULL else p.table[n * N_COLS + COL_Q_LEN]):
            row = out + p.table[n * N_COLS + COL_OUT] + i * p.out_rs
            for j in range(p.Ev):
                row[j * p.out_cs] = NAN


cdef inline Py_ssize_t packed_elements(const Plan* p, bint is_double) noexcept nogil:
    """Scratch elements of one block of packed keys: whole panels (micro-kernels only; none
    where every task streams its keys)."""
    if p.blas or streams(p):
        return 0
    cdef Py_ssize_t panel = cattn_panel_keys(p.isa, is_double)
    return (p.block_k + panel - 1) // panel * panel * p.E


cdef inline bint converts(const Plan* p) noexcept nogil:
    """Whether K or V is stored in another type than the one computed in."""
    return p.k_type != CATTN_ELEM_NATIVE or p.v_type != CATTN_ELEM_NATIVE


cdef inline bint streams(const Plan* p) noexcept nogil:
    """Whether every task streams K and V in place, converting as it loads (at most
    CATTN_DIRECT_ROWS rows, micro-kernels): no packed, converted or bfloat16 blocks."""
    return p.task_rows <= CATTN_DIRECT_ROWS and not p.blas


cdef inline Py_ssize_t converted_elements(const Plan* p) noexcept nogil:
    """Scratch elements of one block of K or V converted to the type computed in."""
    return p.block_k * max(p.E, p.Ev) if converts(p) and not streams(p) else 0


cdef Py_ssize_t scratch_elements(const Plan* p, bint is_double) noexcept:
    """Elements of per-thread scratch, padded to 64 bytes so threads never share a line."""
    cdef Py_ssize_t n = 2 * p.task_rows + p.task_rows * p.Ev
    if not p.weights_mode:
        n += p.task_rows * p.scores_rs
    n += packed_elements(p, is_double)
    n += converted_elements(p)
    if p.v_scale != NULL:
        n += p.task_rows * p.scores_rs
    return (n + 15) // 16 * 16


# Rows of one task made of grouped items, at most: 128 query heads of one decoding step (a
# latent-attention model's) fit, a prefill block of 128 rows stays one item.
cdef Py_ssize_t MAX_TASK_ROWS = 128
GROUPED_TASK_ROWS = MAX_TASK_ROWS  # (for the task lists made in Python)


cdef inline bint share_keys(const Plan* p, Py_ssize_t a, Py_ssize_t b) noexcept:
    """Whether items a and b read the same keys and values, over the same visible range
    (the columns the table fills for this call)."""
    cdef const Py_ssize_t* x = p.table + a * N_COLS
    cdef const Py_ssize_t* y = p.table + b * N_COLS
    return (x[COL_K] == y[COL_K] and x[COL_V] == y[COL_V] and x[COL_KV_LEN] == y[COL_KV_LEN]
            and x[COL_DIAG] == y[COL_DIAG] and x[COL_KEEP_FIRST] == y[COL_KEEP_FIRST]
            and (p.pages == NULL or x[COL_PAGES] == y[COL_PAGES])
            and (p.k_scale == NULL or x[COL_K_SCALE] == y[COL_K_SCALE])
            and (p.v_scale == NULL or x[COL_V_SCALE] == y[COL_V_SCALE]))


cdef Py_ssize_t items_per_task(const Plan* p) noexcept:
    """How many consecutive items one task computes as rows of one block: the query heads
    of one K/V head (grouped-query attention) share its keys and values, so one task reads
    them once for all (decoding: one g-row GEMM instead of g GEMVs). The size of the first
    run of items sharing keys, cut to a divisor of it within MAX_TASK_ROWS rows, if every
    group of that size shares its keys; else 1. It depends on the table and the block
    size only, never on the threads: each row is computed alike whichever thread runs it."""
    cdef Py_ssize_t run = 1, g, first, m
    while run < p.n_items and share_keys(p, 0, run):
        run += 1
    g = min(run, MAX_TASK_ROWS // p.block_q)
    while g > 1 and (run % g or p.n_items % g):
        g -= 1
    if g <= 1:
        return 1
    for first in range(0, p.n_items, g):
        for m in range(1, g):
            if not share_keys(p, first, first + m):
                return 1
    return g


cdef Py_ssize_t task_group(Plan* p, object tasks, bint separate):
    """Items per task: a task list's most, 1 when each item keeps its own rows of scratch
    (weights, key mass: `separate`), else items_per_task."""
    return (most_members(tasks) if tasks is not None
            else 1 if separate else items_per_task(p))


DIRECT_ROWS = CATTN_DIRECT_ROWS  # (a task of at most this many rows streams K and V)


def items_in_a_task(cnp.ndarray table, Py_ssize_t block_q, *, object tasks=None,
                    bint separate=False, object paged=None, object kv_storage=None):
    """How many items, sharing their keys and values, one task of `attention` with these
    arguments computes (its rows: that many times block_q). Whether a task streams K and V
    decides its key blocks (cattn._plan), so the plan asks before the call."""
    cdef Plan p
    p.table = <const Py_ssize_t*> cnp.PyArray_DATA(table)
    p.n_items = table.shape[0]
    p.block_q = block_q
    p.pages = NULL
    if paged is not None:
        p.pages = <const int32_t*> cnp.PyArray_DATA(<cnp.ndarray> paged[0])
    p.k_scale = p.v_scale = NULL
    if kv_storage is not None:
        set_kv_storage(&p, kv_storage)
    return task_group(&p, tasks, separate)


cdef Py_ssize_t most_members(cnp.ndarray tasks) noexcept:
    """The most items one task of a task list groups (its third column)."""
    cdef const Py_ssize_t* task = <const Py_ssize_t*> cnp.PyArray_DATA(tasks)
    cdef Py_ssize_t n, most = 1
    for n in range(tasks.shape[0]):
        most = max(most, task[TASK_COLS * n + 2])
    return most


cdef double task_seconds(const Plan* p, bint is_double, Py_ssize_t n_tasks) noexcept:
    """A task's time on one thread, roughly: its block products at a fast core's rate for
    the path, its keys and values streamed from memory at 10 GB/s (what one core of a
    server reads, give or take a factor of 2 or 3), and a microsecond of setup. A task
    list's tasks count their average rows (a mixed batch's one-row decodes are not full
    blocks)."""
    cdef double keys = <double> min(p.S, p.split_keys)
    cdef double rows = p.task_rows, total_rows = 0
    cdef Py_ssize_t n
    if p.task_list != NULL and n_tasks > 0:
        for n in range(p.n_items):
            total_rows += p.table[n * N_COLS + COL_Q_LEN]
        rows = min(rows, total_rows / n_tasks)
    cdef double flops = 2.0 * rows * keys * (p.E + p.Ev)
    cdef double rate = (1e11 if p.isa == CATTN_ISA_AVX512 else
                        5e10 if p.isa == CATTN_ISA_AVX2 else 2e10)
    if is_double:
        rate /= 2
    return flops / rate + keys * (p.E * p.k_size + p.Ev * p.v_size) / 1e10 + 1e-6


cdef Py_ssize_t tasks_per_group(const Plan* p, int threads, bint is_double,
                                Py_ssize_t n_tasks) noexcept:
    """Tasks run between two checks for Ctrl-C: about 0.1 s of work on a fast core (more on
    a slow one), and at least one per thread (a group that ends early would end and
    restart its parallel region every few tasks)."""
    cdef double group = 0.1 * threads / task_seconds(p, is_double, n_tasks)
    return max(<Py_ssize_t> threads, <Py_ssize_t> min(group, 1e15))


# ------------------------------------------------------- small calls: what a team costs
# Idle workers sleep (passive waiting, see cattn._runtime), so a parallel region costs its
# caller their wake-up and, at its end, its own (it waits for the last worker): a few
# microseconds on bare metal, 60 us and more in some virtual machines, changing with what
# the host does. A call whose one-thread time is under SERIAL_OVERHEADS such costs gains
# nothing from a team, and runs on the calling thread alone. The cost is measured, not
# assumed: each parallel region's wall time, less the most CPU time a thread of it spent
# (its work: a thread that waits sleeps), is one sample, and the median of the last
# OVERHEAD_SAMPLES samples is the estimate. Once the calls kept on one thread have done
# PROBE_AFTER such costs of work, the next one runs on its team anyway (a probe costing
# 1/PROBE_AFTER of the work kept), so that the estimate follows a machine whose wake-ups
# got faster: after a product of NumPy's, OpenBLAS's spinning workers can hold the cores
# for milliseconds. Threads change no result bit (the work split follows from the shapes
# alone): only the time.
DEF OVERHEAD_SAMPLES = 8
cdef double SERIAL_OVERHEADS = 2.5  # (2 is the break-even of a perfect 2-thread split)
# Whatever the cost, a call of more one-thread work than this keeps its team: costs of
# milliseconds come from another library's threads holding the cores (OpenBLAS's idle
# workers spin for ~0.1 s after a product), which the next call may not meet, and a call
# kept on one thread by mistake loses at most about half of this.
cdef double MAX_KEPT_SECONDS = 1e-3
cdef double PROBE_AFTER = 64.0
cdef double overhead_samples[OVERHEAD_SAMPLES]
cdef int overhead_next = 0
cdef double kept_work = 0.0  # seconds of one-thread work kept off the team since a probe
# How team_for_work decided (last_call_stats' "team_rule")
cdef enum:
    RULE_TEAM = 0        # a team: asked for, worth it, or CATTN_FULL_TEAM
    RULE_ONE_THREAD = 1  # kept on the calling thread
    RULE_PROBE = 2       # small, but run on the team to measure its cost again
TEAM_RULE_NAMES = ("team", "one thread", "probe")
# CATTN_FULL_TEAM=1: every call on its full team however small (to time the parallel path)
cdef bint full_team = os.environ.get("CATTN_FULL_TEAM", "0")[:1] not in ("", "0")


def set_team_overhead(double seconds):
    """Set every sample of a team's cost to `seconds` (a private hook for the tests);
    returns the previous state, which `restore_team_overhead` puts back."""
    global overhead_next, kept_work
    previous = ([overhead_samples[i] for i in range(OVERHEAD_SAMPLES)], overhead_next,
                kept_work)
    for i in range(OVERHEAD_SAMPLES):
        overhead_samples[i] = seconds
    overhead_next, kept_work = 0, 0.0
    return previous


def restore_team_overhead(previous):
    global overhead_next, kept_work
    samples, overhead_next, kept_work = previous
    for i in range(OVERHEAD_SAMPLES):
        overhead_samples[i] = samples[i]


set_team_overhead(10e-6)  # (a prior until parallel calls have measured this machine)


def set_full_team(bint flag):
    """Run every call on its full team (True) or keep small calls on one thread (False,
    the default unless CATTN_FULL_TEAM is set); returns the previous setting."""
    global full_team
    previous, full_team = full_team, flag
    return previous


def team_overhead():
    """What a parallel region costs a call, in seconds (waking the workers, waiting for
    the last one): the median of the last regions' measurements."""
    cdef double ordered[OVERHEAD_SAMPLES]
    cdef int i, j
    cdef double x
    for i in range(OVERHEAD_SAMPLES):  # (insertion sort of eight numbers)
        x = overhead_samples[i]
        j = i
        while j > 0 and ordered[j - 1] > x:
            ordered[j] = ordered[j - 1]
            j -= 1
        ordered[j] = x
    return 0.5 * (ordered[OVERHEAD_SAMPLES // 2 - 1] + ordered[OVERHEAD_SAMPLES // 2])


def small_call_rule():
    """What decides a call's team, for show_config()."""
    if full_team:
        return "every call on its full team (CATTN_FULL_TEAM)"
    cost = team_overhead()
    return (f"calls under about {min(SERIAL_OVERHEADS * cost, MAX_KEPT_SECONDS) * 1e6:.0f} "
            f"us of one-thread work run on one thread ({SERIAL_OVERHEADS:g} x what a team "
            f"costs a call: waking the workers and waiting for them, now measured at "
            f"{cost * 1e6:.1f} us; at most {MAX_KEPT_SECONDS * 1e6:.0f} us)")


cdef int team_for_work(int threads, double serial_seconds, int* rule) noexcept:
    """The team of a call of about serial_seconds on one thread: `threads`, or 1 when the
    team would cost more than it saves (unless the work kept on one thread since the last
    probe calls for another); how it was decided goes to `rule`."""
    global kept_work
    rule[0] = RULE_TEAM
    if threads <= 1 or full_team:
        return threads
    cdef double cost = team_overhead()
    if serial_seconds >= min(SERIAL_OVERHEADS * cost, MAX_KEPT_SECONDS):
        return threads
    kept_work += serial_seconds
    if kept_work >= PROBE_AFTER * cost:
        kept_work = 0.0
        rule[0] = RULE_PROBE
        return threads
    rule[0] = RULE_ONE_THREAD
    return 1


cdef double team_cost_of(const Py_ssize_t* counters, int threads, double* busiest_cpu):
    """What the call's last region cost: its wall time less the most CPU time a thread of
    it spent (what the threads waited for: each other's wake-up, a core another process
    or library held); -1 where the system has no thread CPU clock."""
    cdef Py_ssize_t busiest = 0, cpu
    cdef int th
    for th in range(threads):
        cpu = counters[th * COUNTER_STRIDE + COUNTER_CPU_NS]
        if cpu < 0:
            return -1.0
        busiest = max(busiest, cpu)
    busiest_cpu[0] = busiest * 1e-9
    return max(counters[COUNTER_REGION_NS] - busiest, 0) * 1e-9


cdef void note_team_cost(double seconds):
    """One sample of a team's cost (the oldest of the samples goes)."""
    global overhead_next
    if seconds < 0:
        return  # (no thread CPU clock on this system: the estimate keeps its prior)
    overhead_samples[overhead_next] = seconds
    overhead_next = (overhead_next + 1) % OVERHEAD_SAMPLES


cdef inline void* data_or_null(object arr):
    if arr is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray> arr)


# The last call's statistics, per calling thread (a private hook for the tests).
_last_call = threading.local()
cdef tuple ISA_NAME_OF = tuple(cattn_isa_name(i).decode() for i in range(CATTN_ISA_BLAS + 1))


def last_call_stats():
    """What the calling thread's most recent kernel call did (a private testing hook):
    its path, OpenMP team size, tasks and how many threads ran some, key chunks, block
    sizes, key blocks visited, the per-thread scratch in bytes, and how many block products
    (Q·Kᵀ or P·V of one key block) used native bfloat16 products, the path whose
    float kernels and row operations ran ("avx512" on the bfloat16 levels), how many
    items sharing keys and values each task computed, the call's estimated one-thread
    time in seconds and how its team was decided ("team", "one thread" or "probe"), and
    for a team, what its last region cost (seconds; None without a thread CPU clock),
    that region's wall time and the most CPU time a thread spent in it."""
    stats = getattr(_last_call, "stats", None)
    if stats is None:
        return None
    keys = ("isa", "team_size", "threads_with_tasks", "n_tasks", "n_splits", "split_keys",
            "block_q", "block_k", "key_blocks_visited", "scratch_bytes", "interrupt_checks",
            "bf16_native_blocks", "float_kernels", "items_per_task",
            "one_thread_estimate", "team_rule", "team_cost", "region_seconds",
            "busiest_cpu_seconds")
    return dict(zip(keys, stats))


def attention(object q, object k, object v, object out, object lse, object weights,
              object mask, object partials, cnp.ndarray table, *, tuple shape,
              tuple strides, tuple variant, tuple blocks, tuple run, object tasks=None,
              tuple paged=None, object sinks=None, tuple kv_storage=None,
              object bf16_query=None, object alibi=None, object key_mass=None,
              tuple distance_bias=None):
    """Run the loop nest on validated operands (see cattn._api for their meaning).

    q, k, v, out, lse, weights and mask are arrays whose data pointers point at element 0
    of every operand; all offsets are in elements and come from `table`. The plan's
    numbers come in five groups (tuples unpack into C variables far faster than two dozen
    keyword arguments parse, on a call of a few microseconds):
      shape = (L, S, E, Ev)
      strides = (q_rs, k_rs, v_rs, out_rs, out_cs, mask_rs, mask_cs), in elements
      variant = (mask_kind, win_left, win_right, scale, softcap, weights_mode)
      blocks = (block_q, block_k, n_splits, split_keys, items per task: items_in_a_task)
      run = (num_threads, isa)
      paged = (block_table, page_size, k_page_stride, v_page_stride), or None: k and v
        are pages (block_table a C-contiguous int32 array of page numbers, each item's row
        starting at its table's COL_PAGES; strides in elements)
    sinks: None, or one logit per item (contiguous, the operands' dtype) that joins each
    row's softmax denominator without a value.
    alibi: None, or one ALiBi slope per item (contiguous, the operands' dtype): the score
    of query i and key j gains -slope·|i + diag - j| (after the softcap, with the mask).
    distance_bias: None, or (by_distance, max_distance): by_distance a contiguous
    (n_items, 2·max_distance + 1) array of the operands' dtype, the bias added to the score
    of key j seen from query i by their distance j - (i + diag), clamped to ±max_distance.
    key_mass: None, or a zeroed C-contiguous (n_items · n_q_blocks, S) array of the
    computing dtype: row n · n_q_blocks + b receives, for each key, the sum of its weights
    over the rows of item n's query block b (n_splits must be 1).
      kv_storage = (k_type, v_type, k_scale, v_scale), optional: how K and V are stored
        (Element members; float16, bfloat16 and int8 need float32 q, out, lse, weights,
        mask and partials) and int8's per-key scales (float32 arrays whose matrices are
        (S, 1), located by the table's K_SCALE and V_SCALE columns; None for none)
      bf16_query = True: q (float32) holds bfloat16 values, so that on the amx and
        avx512_bf16 paths Q·Kᵀ against bfloat16 keys runs on bfloat16 products (exact
        ones); P·V against bfloat16 values runs on them whatever the query
    Per-thread scratch is allocated here, for num_threads threads.
    With n_splits > 1 the keys are cut into chunks of split_keys keys, processed as
    separate tasks and merged; partials then holds (n_splits, n_items, L, Ev + 2).
    tasks (packed variable-length sequences): a C-contiguous (n_tasks, TASK_COLS) intp
    array of (item, query block, members), run in that order (heaviest first balances the
    threads): the query block of items item .. item + members - 1, which share their keys
    and values (members · the block's rows at most max(MAX_TASK_ROWS, block_q)); every
    item then has its query length and lse offset in the table, L is the longest query
    length, and keys are never split (n_splits must be 1).
    Between groups of tasks the call checks for signals: Ctrl-C raises KeyboardInterrupt
    within about 0.1 s and leaves NaN in `out`.
    """
    cdef Py_ssize_t L, S, E, Ev, q_rs, k_rs, v_rs, out_rs, out_cs, mask_rs, mask_cs
    cdef Py_ssize_t win_left, win_right, block_q, block_k, n_splits, split_keys
    cdef int mask_kind, num_threads, isa
    cdef double scale, softcap
    cdef bint weights_mode
    L, S, E, Ev = shape
    q_rs, k_rs, v_rs, out_rs, out_cs, mask_rs, mask_cs = strides
    mask_kind, win_left, win_right, scale, softcap, weights_mode = variant
    block_q, block_k, n_splits, split_keys, task_items = blocks
    num_threads, isa = run
    cdef Plan p
    p.n_items = table.shape[0]
    p.L, p.S, p.E, p.Ev = L, S, E, Ev
    p.q_rs, p.k_rs, p.v_rs = q_rs, k_rs, v_rs
    p.out_rs, p.out_cs, p.mask_rs, p.mask_cs = out_rs, out_cs, mask_rs, mask_cs
    p.mask_kind = mask_kind
    p.win_left, p.win_right = win_left, win_right
    p.scale, p.softcap = scale, softcap
    p.block_q, p.block_k = block_q, block_k
    p.n_q_blocks = (L + block_q - 1) // block_q
    p.n_splits, p.split_keys = n_splits, split_keys
    p.weights_mode = weights_mode
    p.table = <const Py_ssize_t*> cnp.PyArray_DATA(table)
    p.task_list = NULL
    p.page_size, p.k_page_stride, p.v_page_stride, p.pages = 0, 0, 0, NULL
    if paged is not None:
        p.pages = <const int32_t*> cnp.PyArray_DATA(<cnp.ndarray> paged[0])
        p.page_size, p.k_page_stride, p.v_page_stride = paged[1], paged[2], paged[3]
    p.sinks = data_or_null(sinks)
    p.alibi = data_or_null(alibi)
    p.distance_bias, p.max_distance = NULL, 0
    if distance_bias is not None:
        p.distance_bias = data_or_null(distance_bias[0])
        p.max_distance = distance_bias[1]
    p.key_mass = data_or_null(key_mass)
    p.k_type = p.v_type = CATTN_ELEM_NATIVE
    p.k_scale = p.v_scale = NULL
    p.k_scale_rs = p.v_scale_rs = 0
    if kv_storage is not None:
        set_kv_storage(&p, kv_storage)
    if CATTN_DEBUG_BUILD:
        set_extents(&p, q, k, v, out, lse, weights, key_mass, partials)
    # (a task list says how many items each of its tasks groups; else a key-mass row of
    # the scratch belongs to one item: its tasks are not grouped)
    p.group = task_items
    if CATTN_DEBUG_BUILD:
        CATTN_ASSERT(task_items == task_group(&p, tasks, weights_mode or p.key_mass != NULL),
                     "items per task")
    p.task_rows = p.group * block_q
    p.k_size = (<cnp.ndarray> k).descr.itemsize
    p.v_size = (<cnp.ndarray> v).descr.itemsize
    # never an instruction the CPU lacks, whatever the caller asked for
    cdef int level = isa if cattn_isa_runs_on(isa, SUPPORTED_ISA) else SUPPORTED_ISA
    p.isa = cattn_isa_float_path(level)
    p.blas = cattn_isa_uses_blas(p.isa)
    if p.blas:
        require_blas()
    cdef bint is_double = (<cnp.ndarray> q).descr.type_num == cnp.NPY_DOUBLE
    cdef size_t item = sizeof(double) if is_double else sizeof(float)
    # A streaming block's rows of scores 4 KiB apart (2048 float32 keys) would fall in the
    # same L1 sets, and P·V's loads of them alias the fold's stores: one cache line more.
    p.scores_rs = p.block_k + (<Py_ssize_t> (64 // item) if streams(&p) else 0)
    cdef Py_ssize_t stride = scratch_elements(&p, is_double)
    p.bf16_isa = level if cattn_isa_has_bf16_products(level) and not is_double else 0
    p.bf16_scores = p.bf16_isa and p.k_type == CATTN_ELEM_BF16 and bool(bf16_query)
    p.bf16_pv = p.bf16_isa and p.v_type == CATTN_ELEM_BF16
    p.bf16_queries_offset = stride
    if p.bf16_scores and not streams(&p):
        stride += (<Py_ssize_t> cattn_bf16_queries_bytes(p.task_rows, E) + 63) // 64 * 16
    p.bf16_work_offset = stride
    if (p.bf16_scores or p.bf16_pv) and not streams(&p):
        stride += (<Py_ssize_t> cattn_bf16_work_bytes(p.task_rows, block_k, E, Ev) + 63) // 64 * 16
    p.queries_offset = stride
    if p.group > 1:
        stride += (p.task_rows * E + 15) // 16 * 16
    p.mass_rows_offset = stride
    if p.key_mass != NULL and not weights_mode:
        stride += (block_q * S + 15) // 16 * 16
    cdef Py_ssize_t n_tasks = p.n_items // p.group * p.n_q_blocks * p.n_splits
    if tasks is not None:
        p.task_list = <const Py_ssize_t*> cnp.PyArray_DATA(<cnp.ndarray> tasks)
        n_tasks = (<cnp.ndarray> tasks).shape[0]
    # (grouping leaves fewer tasks than the caller counted: no thread waits for none)
    cdef int threads = max(min(num_threads, n_tasks), 1)
    cdef double one_thread_estimate = 0.0, team_cost = -1.0, region_seconds = 0.0
    cdef double busiest_cpu = 0.0
    cdef int team_rule = RULE_TEAM
    if n_tasks > 0:
        one_thread_estimate = n_tasks * task_seconds(&p, is_double, n_tasks)
        threads = team_for_work(threads, one_thread_estimate, &team_rule)
    cdef void* qp = data_or_null(q)
    cdef void* kp = data_or_null(k)
    cdef void* vp = data_or_null(v)
    cdef void* op = data_or_null(out)
    cdef void* lp = data_or_null(lse)
    cdef void* wp = data_or_null(weights)
    cdef void* mp = data_or_null(mask)
    cdef void* pp = data_or_null(partials)
    cdef void* sp
    cdef Py_ssize_t* counters
    cdef Py_ssize_t first = 0, last, group, key_blocks = 0, bf16_blocks = 0
    cdef int team = 1, with_tasks = 0, checks = 0, th
    if n_tasks == 0:
        return
    sp = PyMem_RawMalloc(threads * stride * item)
    counters = <Py_ssize_t*> PyMem_RawMalloc(threads * COUNTER_STRIDE * sizeof(Py_ssize_t))
    if sp == NULL or counters == NULL:
        PyMem_RawFree(sp)
        PyMem_RawFree(counters)
        raise MemoryError(f"cannot allocate {threads * stride * item} bytes of scratch for "
                          f"{threads} threads")
    memset(counters, 0, threads * COUNTER_STRIDE * sizeof(Py_ssize_t))
    p.counters = counters
    group = tasks_per_group(&p, threads, is_double, n_tasks)
    try:
        while first < n_tasks:
            last = min(first + group, n_tasks)
            run_on_operands(&p, threads, first, last, qp, kp, vp, mp, op, lp, wp, pp, sp,
                            stride, is_double, p.n_splits > 1 and last == n_tasks)
            team = max(team, <int> counters[COUNTER_TEAM])
            first = last
            if first < n_tasks:
                checks += 1
                try:
                    PyErr_CheckSignals()  # raises what a signal handler raised
                except BaseException:
                    with nogil:
                        if is_double:
                            fill_nan[double](&p, <double*> op)
                        else:
                            fill_nan[float](&p, <float*> op)
                    raise
        if team > 1:
            team_cost = team_cost_of(counters, team, &busiest_cpu)
            region_seconds = counters[COUNTER_REGION_NS] * 1e-9
            note_team_cost(team_cost)
        for th in range(threads):
            key_blocks += counters[th * COUNTER_STRIDE + COUNTER_KEY_BLOCKS]
            bf16_blocks += counters[th * COUNTER_STRIDE + COUNTER_BF16_BLOCKS]
            with_tasks += counters[th * COUNTER_STRIDE + COUNTER_TASKS] > 0
        _last_call.stats = (ISA_NAME_OF[level], team, with_tasks, n_tasks, n_splits,
                            split_keys, block_q, block_k, key_blocks, stride * item, checks,
                            bf16_blocks, ISA_NAME_OF[p.isa], p.group,
                            one_thread_estimate, TEAM_RULE_NAMES[team_rule],
                            None if team_cost < 0 else team_cost, region_seconds,
                            busiest_cpu)
    finally:
        PyMem_RawFree(sp)
        PyMem_RawFree(counters)


cdef void set_kv_storage(Plan* p, tuple kv_storage):
    k_type, v_type, k_scale, v_scale = kv_storage
    p.k_type, p.v_type = k_type, v_type
    if k_scale is not None:
        p.k_scale = <const float*> cnp.PyArray_DATA(<cnp.ndarray> k_scale)
        p.k_scale_rs = scale_stride(k_scale)
    if v_scale is not None:
        p.v_scale = <const float*> cnp.PyArray_DATA(<cnp.ndarray> v_scale)
        p.v_scale_rs = scale_stride(v_scale)


cdef cattn_extent extent_of(object arr):
    """The bytes an array spans from its lowest to its highest element (none: empty)."""
    cdef cattn_extent e
    cdef cnp.ndarray a
    cdef int axis
    e.lo = e.hi = <const char*> data_or_null(arr)
    if arr is None or arr.size == 0:
        return e
    a = <cnp.ndarray> arr
    e.hi += a.descr.itemsize
    for axis in range(a.ndim):
        if a.strides[axis] < 0:
            e.lo += (a.shape[axis] - 1) * a.strides[axis]
        else:
            e.hi += (a.shape[axis] - 1) * a.strides[axis]
    return e


cdef void set_extents(Plan* p, q, k, v, out, lse, weights, key_mass, partials):
    p.q_bytes, p.k_bytes, p.v_bytes = extent_of(q), extent_of(k), extent_of(v)
    p.out_bytes, p.lse_bytes, p.weights_bytes = extent_of(out), extent_of(lse), extent_of(weights)
    p.mass_bytes, p.partials_bytes = extent_of(key_mass), extent_of(partials)


cdef Py_ssize_t scale_stride(cnp.ndarray scales):
    """Stride along the keys, in elements, of an (..., S, 1) array of scales."""
    cdef int axis = scales.ndim - 2
    return scales.strides[axis] // scales.descr.itemsize if scales.shape[axis] > 1 else 0


cdef void run_on_operands(const Plan* p, int num_threads, Py_ssize_t first, Py_ssize_t last,
                          void* qp, void* kp, void* vp, void* mp, void* op, void* lp,
                          void* wp, void* pp, void* sp, Py_ssize_t stride,
                          bint is_double, bint merge_splits) noexcept:
    with nogil:
        if is_double:
            run_tasks[double](p, num_threads, first, last, <double*> qp,
                                     kp, vp, <double*> mp,
                                     <uint8_t*> mp, <double*> op, <double*> lp,
                                     <double*> wp, <double*> pp, <double*> sp, stride,
                                     merge_splits)
        else:
            run_tasks[float](p, num_threads, first, last, <float*> qp, kp,
                                    vp, <float*> mp, <uint8_t*> mp, <float*> op,
                                    <float*> lp, <float*> wp, <float*> pp, <float*> sp,
                                    stride, merge_splits)


def stream_sum(float[::1] x, int num_threads):
    """Sum of a float32 array read once by num_threads threads: the benchmark's probe of
    the machine's streaming read rate (bytes / time of this call)."""
    cdef Py_ssize_t n = x.shape[0], chunk, c, n_chunks = 64 * max(num_threads, 1)
    cdef double total = 0
    cdef int isa = cattn_isa_float_path(DEFAULT_ISA)
    chunk = (n + n_chunks - 1) // n_chunks
    if n == 0:
        return 0.0
    with nogil:
        for c in prange(n_chunks, num_threads=max(num_threads, 1), schedule='static'):
            if c * chunk < n:
                total += cattn_stream_sum_f32(isa, &x[c * chunk], min(chunk, n - c * chunk))
    return total


cdef extern from "cattn_peak.h" nogil:
    double cattn_peak_run(int isa, int is_double, long passes)
    double cattn_peak_pass_flops(int isa, int is_double)




def fma_peak(str path, bint is_double=False, int num_threads=1, double seconds=0.05):
    """The multiply-add peak in GFLOP/s of `path`'s vectors ("avx512", "avx2" or
    "portable"; float64 if is_double) on num_threads threads: a loop on registers only,
    lengthened until it takes `seconds` on one thread, then run by every thread at once,
    each timing its own loop (the sum of their rates: a team's wake-up on a loaded machine
    is no part of what the cores compute); the best of three runs. The benchmark's ceiling
    that no kernel can pass (a library sgemm may sit below it)."""
    cdef int isa = isa_index(path)
    if isa not in (CATTN_ISA_AVX512, CATTN_ISA_AVX2, CATTN_ISA_PORTABLE):
        raise ValueError(f"fma_peak measures the avx512, avx2 and portable paths, not {path!r}")
    cdef int threads = max(num_threads, 1)
    cdef long passes = 1 << 12
    while _time_peak_loops(isa, is_double, 1, passes) < seconds and passes < (1 << 40):
        passes *= 2
    cdef double best = 0
    for _ in range(3):
        best = max(best, threads * passes * cattn_peak_pass_flops(isa, is_double)
                   / _time_peak_loops(isa, is_double, threads, passes) / 1e9)
    return best


cdef double _time_peak_loops(int isa, bint is_double, int threads, long passes):
    """The longest time any of `threads` threads took for `passes` passes of the register
    loop, each timing its own."""
    cdef int t
    cdef double sink = 0, longest = 0, start
    cdef double* took = <double*> PyMem_RawMalloc(threads * sizeof(double))
    if took == NULL:
        raise MemoryError()
    with nogil:
        for t in prange(threads, num_threads=threads, schedule='static'):
            start = cattn_seconds()
            sink += cattn_peak_run(isa, is_double, passes)
            took[t] = cattn_seconds() - start
    for t in range(threads):
        longest = max(longest, took[t])
    PyMem_RawFree(took)
    global _peak_sum
    _peak_sum = sink  # (kept, so that no compiler drops the loops as unused)
    return longest


_peak_sum = 0.0


cdef Py_ssize_t _row_stride(cnp.ndarray x, int itemsize, str name) except -1:
    if x.ndim != 2 or x.descr.itemsize != itemsize or (x.shape[1] > 1 and x.strides[1] != itemsize) \
            or x.strides[0] % itemsize or x.strides[0] < 0:
        raise ValueError(f"{name} must be a 2-D array of {itemsize}-byte elements with unit "
                         f"column stride")
    return x.strides[0] // itemsize


def bf16_block_products(str path, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray p,
                        float alpha):
    """One block's two products with the native bfloat16 kernels of `path` (a testing
    hook): (alpha · Q·Kᵀ, P·V) as float32, for q (rows, E) as bfloat16 bits (uint16) or
    float32 holding bfloat16 values, k (n, E) and v (n, Ev) as bfloat16 bits, and p (rows,
    n) float32, rounded to bfloat16 by the kernel. Row strides may exceed the row length."""
    cdef int isa = isa_index(path)
    if not cattn_isa_has_bf16_products(isa):
        raise ValueError(f"the {path!r} path has no native bfloat16 products")
    cdef bint q_f32 = q.dtype == np.float32
    cdef Py_ssize_t q_rs = _row_stride(q, 4 if q_f32 else 2, "q")
    cdef Py_ssize_t k_rs = _row_stride(k, 2, "k"), v_rs = _row_stride(v, 2, "v")
    cdef Py_ssize_t ldp = _row_stride(p, 4, "p")
    cdef Py_ssize_t rows = q.shape[0], E = q.shape[1], n = k.shape[0], Ev = v.shape[1]
    if k.shape[1] != E or v.shape[0] != n or p.shape[0] != rows or p.shape[1] != n \
            or p.dtype != np.float32:
        raise ValueError("shapes must be q (rows, E), k (n, E), v (n, Ev), p (rows, n) float32")
    scores = np.zeros((rows, n), np.float32)
    acc = np.zeros((rows, Ev), np.float32)
    cdef void* queries = PyMem_RawMalloc(cattn_bf16_queries_bytes(rows, E))
    cdef void* work = PyMem_RawMalloc(cattn_bf16_work_bytes(rows, n, E, Ev))
    if work == NULL or queries == NULL:
        PyMem_RawFree(queries)
        PyMem_RawFree(work)
        raise MemoryError("no memory for the work areas")
    cdef float* c = <float*> cnp.PyArray_DATA(scores)
    cdef float* a = <float*> cnp.PyArray_DATA(acc)
    cdef const void* qp = cnp.PyArray_DATA(q)
    cdef const unsigned short* kp = <const unsigned short*> cnp.PyArray_DATA(k)
    cdef const unsigned short* vp = <const unsigned short*> cnp.PyArray_DATA(v)
    cdef const float* pp = <const float*> cnp.PyArray_DATA(p)
    with nogil:
        cattn_bf16_load_queries(rows, E, qp, q_f32, q_rs, queries)
        cattn_bf16_qkt(isa, rows, n, E, alpha, kp, k_rs, c, n, queries, work)
        cattn_bf16_pv(isa, rows, Ev, n, pp, ldp, vp, v_rs, a, Ev, work)
    PyMem_RawFree(queries)
    PyMem_RawFree(work)
    return scores, acc


# ------------------------------------------------------ planning helpers (per call)
# Typed versions of the per-call bookkeeping of cattn._api: in Python they cost more
# than the whole computation on a tiny input.

def gemm_row_stride(cnp.ndarray x):
    """Row stride in elements of x's matrices when GEMM can read them in place (unit
    stride along the last axis, positive row stride ≥ the row length, fitting in 32 bits;
    normalized to the row length when there is one row), else -1 (x needs a copy)."""
    cdef int nd = x.ndim
    cdef Py_ssize_t item = x.descr.itemsize
    cdef Py_ssize_t rows = x.shape[nd - 2], cols = x.shape[nd - 1]
    cdef Py_ssize_t rs = x.strides[nd - 2], cs = x.strides[nd - 1]
    cdef Py_ssize_t min_rs = cols if cols > 1 else 1
    cdef int a
    for a in range(nd):  # every offset must be a whole number of elements
        if x.strides[a] % item:
            return -1
    rs //= item
    cs //= item
    if cols > 1 and cs != 1:
        return -1
    if rows <= 1:
        return min_rs
    if rs < min_rs or rs > 2147483647:
        return -1
    return rs


cdef int _offsets_into(Py_ssize_t* table, Py_ssize_t n_items, int col, object x_or_none,
                       tuple batch_shape, Py_ssize_t group) except -1:
    """Column col of a C-contiguous (n_items, N_COLS) table: see fill_offsets."""
    cdef Py_ssize_t n, offset
    if x_or_none is None:
        for n in range(n_items):
            table[n * N_COLS + col] = 0
        return 0
    cdef cnp.ndarray x = x_or_none
    cdef int nb = len(batch_shape), lead = x.ndim - 2, a, xa
    cdef Py_ssize_t dims[64]
    cdef Py_ssize_t steps[64]
    cdef Py_ssize_t idx[64]
    cdef Py_ssize_t item = x.descr.itemsize
    for a in range(nb):
        dims[a] = batch_shape[a]
        steps[a] = 0
        idx[a] = 0
        xa = a - (nb - lead)
        if xa >= 0 and x.shape[xa] > 1:
            steps[a] = x.strides[xa] // item
    for n in range(n_items):
        offset = 0
        for a in range(nb):
            offset += (idx[a] // group if a == nb - 1 else idx[a]) * steps[a]
        table[n * N_COLS + col] = offset
        a = nb - 1
        while a >= 0:  # next item: increment the multi-index, last axis fastest
            idx[a] += 1
            if idx[a] < dims[a]:
                break
            idx[a] = 0
            a -= 1
    return 0


cdef int _column_into(Py_ssize_t* table, Py_ssize_t n_items, int col,
                      object values) except -1:
    """Column col = values: one int for every item, or one per item (1-D intp array)."""
    cdef Py_ssize_t n, value
    cdef const Py_ssize_t[:] per_item
    if not isinstance(values, cnp.ndarray):
        value = values
        for n in range(n_items):
            table[n * N_COLS + col] = value
    else:
        per_item = values
        for n in range(n_items):
            table[n * N_COLS + col] = per_item[n]
    return 0


def fill_offsets(Py_ssize_t[:, ::1] table, int col, object x_or_none, tuple batch_shape,
                 Py_ssize_t group=1):
    """table[:, col] = element offset of each batch item's matrix in x (0 for None).

    Items run in C order over batch_shape; x's leading axes broadcast against it,
    right-aligned (an axis of size 1 always gives offset 0). With group > 1, x has
    batch_shape[-1] // group heads on its last leading axis and item head h reads x's
    head h // group (grouped-query attention).
    """
    if table.shape[1] != N_COLS:
        raise ValueError(f"the table needs {N_COLS} columns, got {table.shape[1]}")
    if table.shape[0]:
        _offsets_into(&table[0, 0], table.shape[0], col, x_or_none, batch_shape, group)


def fill_column(Py_ssize_t[:, ::1] table, int col, object values):
    """table[:, col] = values: one int for every item, or one per item (1-D intp array)."""
    if table.shape[1] != N_COLS:
        raise ValueError(f"the table needs {N_COLS} columns, got {table.shape[1]}")
    if table.shape[0]:
        _column_into(&table[0, 0], table.shape[0], col, values)


def padded_table(tuple batch_shape, Py_ssize_t group, query, key, value, out, mask,
                 kv_len, diag, keep_first, k_scale=None, v_scale=None):
    """The table of a padded batch, filled in one call (it is on every call's path):
    each item's matrix offsets (keys, values and their scales shared by a group of
    `group` query heads), key length, diagonal and kept first keys (ints, or one intp per
    item). Without scales, their columns are 0 (the kernel reads them only with scales)."""
    cdef Py_ssize_t n_items = 1, d
    for d in batch_shape:
        n_items *= d
    # (zeros: the packed and paged layouts' columns stay 0 here)
    cdef cnp.ndarray table = np.zeros((n_items, N_COLS), dtype=np.intp)
    if n_items == 0:
        return table
    cdef Py_ssize_t* t = <Py_ssize_t*> cnp.PyArray_DATA(table)
    _offsets_into(t, n_items, COL_Q, query, batch_shape, 1)
    _offsets_into(t, n_items, COL_K, key, batch_shape, group)
    _offsets_into(t, n_items, COL_V, value, batch_shape, group)
    _offsets_into(t, n_items, COL_OUT, out, batch_shape, 1)
    _offsets_into(t, n_items, COL_MASK, mask, batch_shape, 1)
    _column_into(t, n_items, COL_KV_LEN, kv_len)
    _column_into(t, n_items, COL_DIAG, diag)
    _column_into(t, n_items, COL_KEEP_FIRST, keep_first)
    _offsets_into(t, n_items, COL_K_SCALE, k_scale, batch_shape, group)
    _offsets_into(t, n_items, COL_V_SCALE, v_scale, batch_shape, group)
    return table


def calls_blas(isa=None):
    """Whether the kernel calls BLAS on the given path (default: this process's path): only
    the test path "blas", and the portable path of a compiler without generic vectors."""
    return bool(cattn_isa_uses_blas(DEFAULT_ISA if isa is None else isa))


def debug_checks():
    """Whether this build checks the bounds of its reads and writes (CATTN_DEBUG=1)."""
    return bool(CATTN_DEBUG_BUILD)


def isa_emulated():
    """Whether this build emulates the bfloat16 levels' instructions (CATTN_EMULATE_ISA=1,
    src/cattn_emulate.h): a build for tests, whose amx and avx512_bf16 paths are slow."""
    return bool(CATTN_ISA_EMULATED)


def openmp_enabled():
    """Whether this build was compiled with OpenMP (otherwise it runs on one thread)."""
    return bool(CATTN_OPENMP_ENABLED)


def default_num_threads():
    """OpenMP's default team size (OMP_NUM_THREADS, else the number of cores)."""
    return omp_get_max_threads()

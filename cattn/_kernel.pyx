# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, infer_types=False
"""The tiled (FlashAttention-style) attention loop nest.

One task is one block of query rows of one (batch, head) item (and, when tasks are few, one
chunk of its keys). For each block of keys visible to it, the task computes the scores with
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
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport INFINITY, log, tanh
from libc.stdint cimport uint8_t
from libc.string cimport memcpy, memset
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree

cimport numpy as cnp

from cattn._blas cimport gemm_ab, gemm_abt
from cattn._simd cimport (
    cattn_row_max_f32, cattn_row_max_f64, cattn_exp_shift_sum_f32,
    cattn_exp_shift_sum_f64, cattn_expf_scalar, cattn_exp_scalar, cattn_simd_path,
    cattn_stream_sum_f32,
    CATTN_OPENMP_ENABLED, omp_get_max_threads, cattn_gemm_available,
    cattn_pack_keys_f32, cattn_pack_keys_f64, cattn_gemm_qkt_f32, cattn_gemm_qkt_f64,
    cattn_gemm_pv_f32, cattn_gemm_pv_f64, CATTN_DIRECT_ROWS, cattn_gemm_qkt_direct_f32,
    cattn_gemm_qkt_direct_f64, cattn_gemm_pv_direct_f32, cattn_gemm_pv_direct_f64,
)

cnp.import_array()

# Columns of the per-batch-item table built by the Python layer: element offsets of each
# operand's (L, ·) matrix, then the item's key length and causal diagonal.
cdef enum:
    COL_Q = 0
    COL_K = 1
    COL_V = 2
    COL_OUT = 3
    COL_MASK = 4
    COL_KV_LEN = 5
    COL_DIAG = 6
    N_COLS = 7
TABLE_COLUMNS = N_COLS

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADDITIVE = 2


cdef struct Plan:
    Py_ssize_t n_items, L, S, E, Ev
    Py_ssize_t q_rs, k_rs, v_rs, out_rs, out_cs, mask_rs, mask_cs   # element strides
    int mask_kind
    Py_ssize_t win_left, win_right        # visible keys: [i+diag-left, i+diag+right]
    double scale, softcap                  # softcap <= 0: off
    Py_ssize_t block_q, block_k, n_q_blocks
    Py_ssize_t n_splits, split_keys         # keys split into chunks merged by lse
    bint weights_mode                      # scores go straight into the weights output
    bint microkernels                      # AVX2 block GEMMs (else BLAS)
    const Py_ssize_t* table                # (n_items, N_COLS)


cdef inline floating row_max(const floating* x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return cattn_row_max_f32(x, n)
    else:
        return cattn_row_max_f64(x, n)


cdef inline floating exp_shift_sum(floating* x, Py_ssize_t n, floating shift) noexcept nogil:
    """x <- exp(x - shift), returning the sum of the new x."""
    if floating is float:
        return cattn_exp_shift_sum_f32(x, n, shift)
    else:
        return cattn_exp_shift_sum_f64(x, n, shift)


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
    if p.mask_kind == 2:
        mask_add += mask_pos
        if cs == 1:
            for j in range(n):
                x[j] += mask_add[j]
        else:
            for j in range(n):
                x[j] += mask_add[j * cs]
    elif p.mask_kind == 1:
        mask_bool += mask_pos
        for j in range(n):
            if not mask_bool[j * cs]:
                x[j] = -INFINITY


cdef inline void fold_row(floating* row, Py_ssize_t n_keys, Py_ssize_t a, Py_ssize_t b,
                          Py_ssize_t r, Py_ssize_t mask_pos, const Plan* p,
                          const floating* mask_add, const uint8_t* mask_bool,
                          floating* acc, floating* run_max, floating* run_sum) noexcept nogil:
    """Turn one row of block scores into probabilities P (visible keys [a, b) of the block)
    and fold them into the running max, sum and accumulator of query row r."""
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
    if p.mask_kind != 0:
        apply_mask(x, n, p, mask_add, mask_bool, mask_pos + a * p.mask_cs)
    blk_max = row_max(x, n)
    m_old = run_max[r]
    # (a NaN block max wins, so that a NaN score poisons its row as in the definition)
    m_new = blk_max if (blk_max > m_old or blk_max != blk_max) else m_old
    if m_new == -INFINITY:  # nothing visible yet: exp(-inf - -inf) would be NaN
        memset(x, 0, n * sizeof(floating))
        return
    cdef floating block_sum = exp_shift_sum(x, n, m_new)
    if m_new != m_old:
        # Rescale what earlier blocks accumulated to the new maximum.
        corr = exp_scalar(m_old - m_new)
        run_sum[r] *= corr
        acc += r * Ev
        for j in range(Ev):
            acc[j] *= corr
    run_sum[r] += block_sum
    run_max[r] = m_new


cdef inline void block_scores(const Plan* p, Py_ssize_t rows, Py_ssize_t n_keys,
                              const floating* q_block, const floating* k_block,
                              floating* packed, floating* scores, Py_ssize_t ld) noexcept nogil:
    """scores[rows, n_keys] (row stride ld) = scale · Q_blk · K_blkᵀ."""
    if p.microkernels and rows <= CATTN_DIRECT_ROWS:  # decoding: stream K, no packing
        if floating is float:
            cattn_gemm_qkt_direct_f32(rows, n_keys, p.E, <float> p.scale, q_block, p.q_rs,
                                      k_block, p.k_rs, scores, ld)
        else:
            cattn_gemm_qkt_direct_f64(rows, n_keys, p.E, p.scale, q_block, p.q_rs,
                                      k_block, p.k_rs, scores, ld)
    elif p.microkernels:
        if floating is float:
            cattn_pack_keys_f32(k_block, p.k_rs, n_keys, p.E, packed)
            cattn_gemm_qkt_f32(rows, n_keys, p.E, <float> p.scale, q_block, p.q_rs, packed,
                               scores, ld)
        else:
            cattn_pack_keys_f64(k_block, p.k_rs, n_keys, p.E, packed)
            cattn_gemm_qkt_f64(rows, n_keys, p.E, p.scale, q_block, p.q_rs, packed,
                               scores, ld)
    else:
        gemm_abt(<int> rows, <int> n_keys, <int> p.E, <floating> p.scale, q_block,
                 <int> p.q_rs, k_block, <int> p.k_rs, <floating> 0, scores, <int> ld)


cdef inline void block_pv(const Plan* p, Py_ssize_t rows, Py_ssize_t n_keys,
                          const floating* probs, Py_ssize_t ld, const floating* v_block,
                          floating* acc) noexcept nogil:
    """acc[rows, Ev] += P[rows, n_keys] · V_blk."""
    if p.microkernels and rows <= CATTN_DIRECT_ROWS:  # decoding: stream V
        if floating is float:
            cattn_gemm_pv_direct_f32(rows, p.Ev, n_keys, probs, ld, v_block, p.v_rs, acc,
                                     p.Ev)
        else:
            cattn_gemm_pv_direct_f64(rows, p.Ev, n_keys, probs, ld, v_block, p.v_rs, acc,
                                     p.Ev)
    elif p.microkernels:
        if floating is float:
            cattn_gemm_pv_f32(rows, p.Ev, n_keys, probs, ld, v_block, p.v_rs, acc, p.Ev)
        else:
            cattn_gemm_pv_f64(rows, p.Ev, n_keys, probs, ld, v_block, p.v_rs, acc, p.Ev)
    else:
        gemm_ab(<int> rows, <int> p.Ev, <int> n_keys, <floating> 1, probs, <int> ld,
                v_block, <int> p.v_rs, <floating> 1, acc, <int> p.Ev)


cdef inline void fold_block(const Plan* p, const Py_ssize_t* item, Py_ssize_t i0,
                            Py_ssize_t rows, Py_ssize_t kb0, Py_ssize_t n_keys,
                            floating* scores, Py_ssize_t ld,
                            const floating* mask_add, const uint8_t* mask_bool,
                            floating* acc, floating* run_max, floating* run_sum) noexcept nogil:
    """Fold the scores of keys [kb0, kb0 + n_keys) into the online softmax of every row."""
    cdef Py_ssize_t r, i, lo, hi
    cdef Py_ssize_t kv_len = item[COL_KV_LEN], diag = item[COL_DIAG]
    for r in range(rows):
        i = i0 + r
        lo = clamp(i + diag - p.win_left, 0, kv_len)
        hi = clamp(i + diag + p.win_right + 1, 0, kv_len)
        fold_row(scores + r * ld, n_keys, clamp(lo - kb0, 0, n_keys),
                 clamp(hi - kb0, 0, n_keys), r,
                 item[COL_MASK] + i * p.mask_rs + kb0 * p.mask_cs, p,
                 mask_add, mask_bool, acc, run_max, run_sum)


cdef void attend_query_block(const Plan* p, Py_ssize_t task,
                             const floating* q, const floating* k, const floating* v,
                             const floating* mask_add, const uint8_t* mask_bool,
                             floating* out, floating* lse, floating* weights,
                             floating* partials, floating* scratch) noexcept nogil:
    """One block of query rows of one batch item, over the key blocks it can see (of one
    chunk of keys, when the keys are split: then the unnormalized rows, row max and row
    sum go to `partials`, for merge_split_row).

    scratch (this thread's own) holds, in order: running row max and row sum (block_q
    each), the unnormalized output rows (block_q × Ev), the block scores (block_q ×
    block_k, absent when the scores go straight into the weights output) and the packed
    keys of one block (block_k × E rounded up to whole panels; micro-kernels only).
    """
    cdef Py_ssize_t split = task % p.n_splits
    cdef Py_ssize_t n = task // p.n_splits // p.n_q_blocks
    cdef Py_ssize_t i0 = (task // p.n_splits % p.n_q_blocks) * p.block_q
    cdef const Py_ssize_t* item = p.table + n * N_COLS
    cdef Py_ssize_t i1 = i0 + p.block_q if i0 + p.block_q < p.L else p.L
    cdef Py_ssize_t rows = i1 - i0, Ev = p.Ev
    cdef Py_ssize_t kv_len = item[COL_KV_LEN], diag = item[COL_DIAG]
    cdef Py_ssize_t r, i, j, kb0, kb1
    cdef floating* run_max = scratch
    cdef floating* run_sum = scratch + p.block_q
    cdef floating* acc = scratch + 2 * p.block_q
    cdef floating* scores = acc + p.block_q * Ev
    cdef floating* packed = scores + (0 if p.weights_mode else p.block_q * p.block_k)
    cdef floating* weights_rows = NULL
    cdef floating* out_row
    cdef floating inv_sum
    cdef const floating* q_block = q + item[COL_Q] + i0 * p.q_rs
    cdef const floating* k_item = k + item[COL_K]
    cdef const floating* v_item = v + item[COL_V]

    # Keys any row of the block may see; lo and hi grow with i, so the first row gives
    # the start and the last row the end.
    cdef Py_ssize_t k_begin = clamp(i0 + diag - p.win_left, 0, kv_len)
    cdef Py_ssize_t k_end = clamp(i1 - 1 + diag + p.win_right + 1, 0, kv_len)
    cdef floating* part_row
    if p.n_splits > 1:
        k_begin = clamp(k_begin, split * p.split_keys, (split + 1) * p.split_keys)
        k_end = clamp(k_end, k_begin, (split + 1) * p.split_keys)

    for r in range(rows):
        run_max[r] = -INFINITY
        run_sum[r] = 0
    memset(acc, 0, rows * Ev * sizeof(floating))

    if p.weights_mode:
        # The scores of all visible keys go straight into the weights output, are turned
        # into probabilities in one fold (one max per row: no rescaling of earlier
        # blocks), normalized at the end; the GEMMs still run block by block.
        weights_rows = weights + (n * p.L + i0) * p.S
        kb0 = k_begin
        while kb0 < k_end:
            kb1 = kb0 + p.block_k if kb0 + p.block_k < k_end else k_end
            block_scores(p, rows, kb1 - kb0, q_block, k_item + kb0 * p.k_rs, packed,
                         weights_rows + kb0, p.S)
            kb0 = kb1
        if k_end > k_begin:
            fold_block(p, item, i0, rows, k_begin, k_end - k_begin,
                       weights_rows + k_begin, p.S, mask_add, mask_bool, acc, run_max,
                       run_sum)
        kb0 = k_begin
        while kb0 < k_end:
            kb1 = kb0 + p.block_k if kb0 + p.block_k < k_end else k_end
            block_pv(p, rows, kb1 - kb0, weights_rows + kb0, p.S, v_item + kb0 * p.v_rs,
                     acc)
            kb0 = kb1
    else:
        kb0 = k_begin
        while kb0 < k_end:
            kb1 = kb0 + p.block_k if kb0 + p.block_k < k_end else k_end
            block_scores(p, rows, kb1 - kb0, q_block, k_item + kb0 * p.k_rs, packed,
                         scores, p.block_k)
            fold_block(p, item, i0, rows, kb0, kb1 - kb0, scores, p.block_k, mask_add,
                       mask_bool, acc, run_max, run_sum)
            block_pv(p, rows, kb1 - kb0, scores, p.block_k, v_item + kb0 * p.v_rs, acc)
            kb0 = kb1

    if p.n_splits > 1:  # one chunk of the keys: leave the merging to merge_split_row
        for r in range(rows):
            part_row = partials + ((split * p.n_items + n) * p.L + i0 + r) * (Ev + 2)
            memcpy(part_row, acc + r * Ev, Ev * sizeof(floating))
            part_row[Ev] = run_max[r]
            part_row[Ev + 1] = run_sum[r]
        return

    for r in range(rows):
        i = i0 + r
        out_row = out + item[COL_OUT] + i * p.out_rs
        if run_sum[r] == 0:  # no visible key: output 0, lse -inf (never NaN)
            for j in range(Ev):
                out_row[j * p.out_cs] = 0
            if lse != NULL:
                lse[n * p.L + i] = -INFINITY
            continue
        inv_sum = 1 / run_sum[r]
        for j in range(Ev):
            out_row[j * p.out_cs] = acc[r * Ev + j] * inv_sum
        if lse != NULL:
            lse[n * p.L + i] = run_max[r] + <floating> log(run_sum[r])
        if p.weights_mode:
            for j in range(k_begin, k_end):
                weights_rows[r * p.S + j] *= inv_sum


cdef void merge_split_row(const Plan* p, Py_ssize_t row, const floating* partials,
                          floating* out, floating* lse) noexcept nogil:
    """Combine the chunks of keys of one query row (row = n·L + i): each chunk's sum and
    unnormalized output are rescaled to the common maximum, as in the online softmax."""
    cdef Py_ssize_t n = row // p.L, i = row % p.L, s, j, Ev = p.Ev
    cdef Py_ssize_t part_stride = p.n_items * p.L * (Ev + 2)
    cdef const floating* part = partials + row * (Ev + 2)
    cdef floating* out_row = out + p.table[n * N_COLS + COL_OUT] + i * p.out_rs
    cdef floating m = -INFINITY, total = 0, w
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


cdef void run_tasks(const Plan* p, int num_threads,
                    const floating* q, const floating* k, const floating* v,
                    const floating* mask_add, const uint8_t* mask_bool,
                    floating* out, floating* lse, floating* weights, floating* partials,
                    floating* scratch_base, Py_ssize_t scratch_stride) noexcept nogil:
    cdef Py_ssize_t n_tasks = p.n_items * p.n_q_blocks * p.n_splits
    cdef Py_ssize_t n_rows = p.n_items * p.L
    cdef Py_ssize_t task, row
    cdef floating* mine = scratch_base
    if num_threads <= 1:  # no parallel region at all: it costs microseconds on tiny inputs
        for task in range(n_tasks):
            attend_query_block(p, task, q, k, v, mask_add, mask_bool, out, lse, weights,
                               partials, mine)
        if p.n_splits > 1:
            for row in range(n_rows):
                merge_split_row(p, row, partials, out, lse)
        return
    with parallel(num_threads=num_threads):
        # Each thread owns one slice of the scratch array (no shared mutable state).
        mine = scratch_base + threadid() * scratch_stride
        for task in prange(n_tasks, schedule='dynamic', chunksize=1):
            attend_query_block(p, task, q, k, v, mask_add, mask_bool, out, lse, weights,
                               partials, mine)
        # (prange ends with a barrier: every chunk is done before any row is merged)
        if p.n_splits > 1:
            for row in prange(n_rows, schedule='static'):
                merge_split_row(p, row, partials, out, lse)


cdef Py_ssize_t scratch_elements(Py_ssize_t block_q, Py_ssize_t block_k, Py_ssize_t E,
                                 Py_ssize_t Ev, bint weights_mode) noexcept:
    """Elements of per-thread scratch, padded to 64 bytes so threads never share a line."""
    cdef Py_ssize_t n = 2 * block_q + block_q * Ev + (0 if weights_mode else block_q * block_k)
    if cattn_gemm_available():  # packed keys: whole panels of up to 16 keys
        n += (block_k + 15) // 16 * 16 * E
    return (n + 15) // 16 * 16


cdef inline void* data_or_null(object arr):
    if arr is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray> arr)


def attention(object q, object k, object v, object out, object lse, object weights,
              object mask, int mask_kind, cnp.ndarray table,
              Py_ssize_t L, Py_ssize_t S, Py_ssize_t E, Py_ssize_t Ev,
              Py_ssize_t q_rs, Py_ssize_t k_rs, Py_ssize_t v_rs,
              Py_ssize_t out_rs, Py_ssize_t out_cs, Py_ssize_t mask_rs, Py_ssize_t mask_cs,
              Py_ssize_t win_left, Py_ssize_t win_right, double scale, double softcap,
              Py_ssize_t block_q, Py_ssize_t block_k, bint weights_mode,
              object partials, Py_ssize_t n_splits, Py_ssize_t split_keys, int num_threads):
    """Run the loop nest on validated operands (see cattn._api for their meaning).

    q, k, v, out, lse, weights and mask are arrays whose data pointers point at element 0
    of every operand; all offsets are in elements and come from `table`. Per-thread scratch
    is allocated here, for num_threads threads.
    With n_splits > 1 the keys are cut into chunks of split_keys keys, processed as
    separate tasks and merged; partials then holds (n_splits, n_items, L, Ev + 2).
    """
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
    p.microkernels = cattn_gemm_available()
    cdef Py_ssize_t stride = scratch_elements(block_q, block_k, E, Ev, weights_mode)
    cdef void* qp = data_or_null(q)
    cdef void* kp = data_or_null(k)
    cdef void* vp = data_or_null(v)
    cdef void* op = data_or_null(out)
    cdef void* lp = data_or_null(lse)
    cdef void* wp = data_or_null(weights)
    cdef size_t item = sizeof(double) if (<cnp.ndarray> q).descr.type_num == cnp.NPY_DOUBLE \
        else sizeof(float)
    cdef void* sp
    cdef void* mp = data_or_null(mask)
    cdef void* pp = data_or_null(partials)
    if p.n_items * p.n_q_blocks == 0:
        return
    sp = PyMem_RawMalloc(max(num_threads, 1) * stride * item)
    if sp == NULL:
        raise MemoryError(f"cannot allocate {max(num_threads, 1) * stride * item} bytes of "
                          f"scratch for {num_threads} threads")
    run_on_operands(&p, num_threads, qp, kp, vp, mp, op, lp, wp, pp, sp, stride,
                    item == sizeof(double))
    PyMem_RawFree(sp)


cdef void run_on_operands(const Plan* p, int num_threads, void* qp, void* kp, void* vp,
                          void* mp, void* op, void* lp, void* wp, void* pp, void* sp,
                          Py_ssize_t stride, bint is_double) noexcept:
    with nogil:
        if is_double:
            run_tasks[double](p, num_threads, <double*> qp, <double*> kp, <double*> vp,
                              <double*> mp, <uint8_t*> mp, <double*> op, <double*> lp,
                              <double*> wp, <double*> pp, <double*> sp, stride)
        else:
            run_tasks[float](p, num_threads, <float*> qp, <float*> kp, <float*> vp,
                             <float*> mp, <uint8_t*> mp, <float*> op, <float*> lp,
                             <float*> wp, <float*> pp, <float*> sp, stride)


def stream_sum(float[::1] x, int num_threads):
    """Sum of a float32 array read once by num_threads threads: the benchmark's probe of
    the machine's streaming read rate (bytes / time of this call)."""
    cdef Py_ssize_t n = x.shape[0], chunk, c, n_chunks = 64 * max(num_threads, 1)
    cdef double total = 0
    chunk = (n + n_chunks - 1) // n_chunks
    if n == 0:
        return 0.0
    with nogil:
        for c in prange(n_chunks, num_threads=max(num_threads, 1), schedule='static'):
            if c * chunk < n:
                total += cattn_stream_sum_f32(&x[c * chunk], min(chunk, n - c * chunk))
    return total


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


def fill_offsets(Py_ssize_t[:, ::1] table, int col, object x_or_none, tuple batch_shape,
                 Py_ssize_t group=1):
    """table[:, col] = element offset of each batch item's matrix in x (0 for None).

    Items run in C order over batch_shape; x's leading axes broadcast against it,
    right-aligned (an axis of size 1 always gives offset 0). With group > 1, x has
    batch_shape[-1] // group heads on its last leading axis and item head h reads x's
    head h // group (grouped-query attention).
    """
    cdef Py_ssize_t n, offset, n_items = table.shape[0]
    if x_or_none is None:
        for n in range(n_items):
            table[n, col] = 0
        return
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
        table[n, col] = offset
        a = nb - 1
        while a >= 0:  # next item: increment the multi-index, last axis fastest
            idx[a] += 1
            if idx[a] < dims[a]:
                break
            idx[a] = 0
            a -= 1


def fill_column(Py_ssize_t[:, ::1] table, int col, object values):
    """table[:, col] = values: one int for every item, or one per item (1-D intp array)."""
    cdef Py_ssize_t n, value
    cdef const Py_ssize_t[:] per_item
    if not isinstance(values, cnp.ndarray):
        value = values
        for n in range(table.shape[0]):
            table[n, col] = value
    else:
        per_item = values
        for n in range(table.shape[0]):
            table[n, col] = per_item[n]


def calls_blas():
    """Whether the kernel calls BLAS on this CPU (only without the AVX2 micro-kernels)."""
    return not cattn_gemm_available()


def openmp_enabled():
    """Whether this build was compiled with OpenMP (otherwise it runs on one thread)."""
    return bool(CATTN_OPENMP_ENABLED)


def default_num_threads():
    """OpenMP's default team size (OMP_NUM_THREADS, else the number of cores)."""
    return omp_get_max_threads()


def simd_path():
    """The row-operation code path this CPU takes: 'avx2+fma' or 'generic'."""
    return cattn_simd_path().decode()

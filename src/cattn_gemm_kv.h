/*
 * The routines of one block-GEMM instance (cattn_gemm_impl.h) that read keys or values
 * from the caller's arrays: the packing of K, and the decoding streams of K and V. Included
 * once per element type the instance reads, with
 *   ET          the stored element type (T itself, or uint16_t for float16/bfloat16
 *               bits, int8_t)
 *   ESFX        its suffix (f32/f64 for T itself; f16, bf16, i8)
 *   ELOAD(p)    W elements at p, as a vector of T
 *   ECVT(x)     one element as T
 *   ETAIL_T, ETAIL(n), ELOAD_TAIL(p, t)
 *               how the first n < W elements of a row are loaded (masked-off lanes read
 *               0, never touched): a lane mask for T itself, a count otherwise
 * Other element types are converted to T as they are loaded, in registers: the micro-
 * kernels stay those of T, and a decoding step reads only the bytes the cache holds.
 */
/* Accumulator vectors the P·V stream keeps in registers (shared by its rows and its
 * stretches of keys): half the registers, which leaves room for the loaded values (8 of
 * AVX2's 16, 16 of AVX-512's 32). */
#ifdef NREGS
#define PV_ACC_VECS (NREGS / 2)
#else
#define PV_ACC_VECS 8
#endif
/* A decoding stream reads its rows as several stretches at once. A core's read rate from
 * memory grows with the sequential streams it has in flight: with one stream, the
 * hardware prefetcher keeps too few lines coming, most of all when each line takes more
 * instructions (a float16 or int8 row converts before its FMAs). Measured on an Ice Lake
 * Xeon, one core summing 256 MiB: one stream 10.0 (float32) / 8.2 (float16) / 7.7 (int8)
 * GB/s, two 11.2 / 10.9 / 10.5, four 12.6 / 12.6 / 12.4.
 * The scores read the keys as CATTN_KEY_STREAMS stretches: free, since every score is
 * its own sum. (A whole decode gains less than a pure read: 0.97-1.07x one stream there,
 * within that VM's noise; its stretches restart every block.) Since P·V's order of keys is
 * part of its result, its stretches are chosen per row count below. */
#ifndef CATTN_KEY_STREAMS
#define CATTN_KEY_STREAMS 4
#endif
/* P·V's stretches need their own accumulators. One query row keeps 2 sets where 32
 * registers hold them (AVX-512), 8 vectors each, so a row of up to 128 values is read whole
 * in one pass: measured 1.2-1.3x four sets of 4 vectors (two passes, each reading half of
 * every row) on an AMD EPYC Zen 4, 1 and 2 threads; an Ice Lake Xeon had measured four sets
 * 1.06-1.11x two (an older kernel, a noisier machine): two sets lose less on the CPUs
 * measured. 1 set with 16 registers (AVX2: more stretches there meant narrower column
 * chunks, more passes over each block, and measured 0.85-0.96x on the Xeon). Two to four
 * rows (grouped heads) keep one set: four sets left them one vector of columns per pass,
 * eight passes over each block of 128-wide values, each touching one line of every value
 * row; one set reads a block in two passes, measured 1.4-1.7x four sets on the Zen 4 (4
 * rows, 1 thread) and 1.05-1.2x two sets. */
#ifdef CATTN_VALUE_STREAMS
#define VALUE_STREAMS CATTN_VALUE_STREAMS
#elif defined(NREGS) && NREGS >= 32
#define VALUE_STREAMS 2
#else
#define VALUE_STREAMS 1
#endif
#ifdef CATTN_ROWS_VALUE_STREAMS
#define ROWS_VALUE_STREAMS CATTN_ROWS_VALUE_STREAMS
#else
#define ROWS_VALUE_STREAMS 1
#endif

#define CATTN_CAT3E_(a, b, c) a##_##b##_##c
#define CATTN_CAT3E(a, b, c) CATTN_CAT3E_(a, b, c)
#define FNE(name) CATTN_CAT3E(name, ESFX, ISFX)

/* Pack keys [0, n_keys) of a block as panels of NR keys: panel p holds, for each feature e,
 * the NR values k[p·NR + c][e] side by side (zeros past n_keys), so the Q·Kᵀ tile loads its
 * vectors per feature instead of gathering. Done once per key block and reused by every
 * row tile of the query block. Where the instance has an in-register transpose
 * (VTRANSPOSE), W keys × W features move at a time: a scalar transpose cost about a quarter
 * of the Q·Kᵀ time. */
TGT_KV static void FNE(cattn_pack_keys)(const ET *k, ptrdiff_t k_rs, ptrdiff_t n_keys, ptrdiff_t E,
                                    T *packed)
{
#ifdef VTRANSPOSE
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += W) {
        const ptrdiff_t nk = n_keys - j0 < W ? n_keys - j0 : W;
        T *panel = packed + (j0 / NR) * NR * E + j0 % NR;
        ptrdiff_t e0 = 0;
        if (nk == W) /* whole squares: no masks and no per-row tests (a third of the time) */
            for (; e0 + W <= E; e0 += W) {
                V r[W];
#pragma GCC unroll 16
                for (int c = 0; c < W; c++) r[c] = ELOAD(k + (j0 + c) * k_rs + e0);
                VTRANSPOSE(r);
#pragma GCC unroll 16
                for (int e = 0; e < W; e++) VSTORE(panel + (e0 + e) * NR, r[e]);
            }
        for (; e0 < E; e0 += W) {
            const ETAIL_T me = ETAIL(E - e0);
            V r[W];
            for (int c = 0; c < W; c++)
                r[c] = c < nk ? ELOAD_TAIL(k + (j0 + c) * k_rs + e0, me) : VZERO();
            VTRANSPOSE(r);
            const ptrdiff_t ne = E - e0 < W ? E - e0 : W;
            for (ptrdiff_t e = 0; e < ne; e++) VSTORE(panel + (e0 + e) * NR, r[e]);
        }
    }
    /* the keys of the last panel past the last group of W read zeros */
    const ptrdiff_t filled = (n_keys + W - 1) / W * W;
    if (filled % NR) {
        T *panel = packed + (filled / NR) * NR * E;
        for (ptrdiff_t e = 0; e < E; e++)
            for (ptrdiff_t c = filled % NR; c < NR; c += W) VSTORE(panel + e * NR + c, VZERO());
    }
#else
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += NR) {
        ptrdiff_t nc = n_keys - j0 < NR ? n_keys - j0 : NR;
        T *panel = packed + j0 * E;
        for (ptrdiff_t c = 0; c < nc; c++) {
            const ET *row = k + (j0 + c) * k_rs;
            for (ptrdiff_t e = 0; e < E; e++) panel[e * NR + c] = ECVT(row[e]);
        }
        for (ptrdiff_t c = nc; c < NR; c++)
            for (ptrdiff_t e = 0; e < E; e++) panel[e * NR + c] = 0;
    }
#endif
}


/* ---- Few query rows (decoding): memory-bound, so keys and values are streamed in place,
 * each read exactly once, without packing. */

/* dots[r] = the products q[r][e]·kj[e] for r < MR_ (≤ 4), summed over e in a vector (a
 * key's score is the sum of its lanes), two accumulators per row to halve the FMA
 * dependency chain. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_key_dots)(const int MR_, ptrdiff_t E, const T *q, ptrdiff_t q_rs, const ET *kj,
                    V dots[4])
{
    const ptrdiff_t E_full = E - E % W;
    V acc0[4], acc1[4];
#pragma GCC unroll 4
    for (int r = 0; r < MR_; r++) acc0[r] = acc1[r] = VZERO();
    ptrdiff_t e = 0;
    for (; e + 2 * W <= E_full; e += 2 * W) {
        const V k0 = ELOAD(kj + e), k1 = ELOAD(kj + e + W);
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            acc0[r] = VFMA(VLOAD(q + r * q_rs + e), k0, acc0[r]);
            acc1[r] = VFMA(VLOAD(q + r * q_rs + e + W), k1, acc1[r]);
        }
    }
    if (e < E_full) {
        const V k0 = ELOAD(kj + e);
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) acc0[r] = VFMA(VLOAD(q + r * q_rs + e), k0, acc0[r]);
        e += W;
    }
    if (e < E) {
        const VI tail = VMASK(E % W);
        const V k1 = ELOAD_TAIL(kj + e, ETAIL(E % W));
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++)
            acc1[r] = VFMA(VMASKLOAD(q + r * q_rs + e, tail), k1, acc1[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR_; r++) dots[r] = VADD(acc0[r], acc1[r]);
}

/* c[r][j] = alpha · q[r]·k[j] for r < MR_ (≤ 4) and keys [0, n_keys), one key at a time,
 * each score ending in a reduction across a vector's lanes (the keys past the last group
 * of W, or every key where the instance has no merges of sums). */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_qkt_direct_rows)(const int MR_, ptrdiff_t n_keys, ptrdiff_t E, T alpha, const T *q,
                          ptrdiff_t q_rs, const ET *k, ptrdiff_t k_rs, T *c, ptrdiff_t ldc)
{
    for (ptrdiff_t j = 0; j < n_keys; j++) {
        V dots[4];
        FNE(cattn_key_dots)(MR_, E, q, q_rs, k + j * k_rs, dots);
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) c[r * ldc + j] = alpha * VHSUM(dots[r]);
    }
}

/* acc[r][0:NC_·W] += Σ_j p[r][j] · v[j][0:NC_·W] for r < MR_ (≤ 4): the accumulators stay
 * in registers for all the block's keys, loaded and stored once per block, so the stream
 * costs per element of V only its load (and conversion) and one FMA per row; each value
 * vector is loaded once for all the rows. (Loading and storing them every few keys cost
 * as many instructions per element as the conversion of a narrow V.) The keys are read as
 * VS stretches at once, the first into the accumulators, each other one into its own set
 * from zero, added in stretch order at the end: the FMAs of an element run in key order
 * within each stretch, and every element is summed in the same order whatever the thread
 * count. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_pv_stream_columns)(const int MR_, const int VS, const int NC_, ptrdiff_t n_keys,
                             const T *p, ptrdiff_t ldp, const ET *v, ptrdiff_t v_rs, T *acc,
                             ptrdiff_t ld_acc)
{
    /* stretch s holds keys [s·len, (s + 1)·len); the last one also the keys past VS·len */
    const ptrdiff_t len = n_keys / VS;
    V a[4][4][PV_ACC_VECS];
#pragma GCC unroll 4
    for (int r = 0; r < MR_; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NC_; c++) {
            a[0][r][c] = VLOAD(acc + r * ld_acc + c * W);
#pragma GCC unroll 4
            for (int s = 1; s < VS; s++) a[s][r][c] = VZERO();
        }
    for (ptrdiff_t j = 0; j < len; j++) {
#pragma GCC unroll 4
        for (int s = 0; s < VS; s++) {
            const ET *vj = v + (s * len + j) * v_rs;
            V x[PV_ACC_VECS];
#pragma GCC unroll 8
            for (int c = 0; c < NC_; c++) x[c] = ELOAD(vj + c * W);
#pragma GCC unroll 4
            for (int r = 0; r < MR_; r++) {
                const V pr = VBCAST(p + r * ldp + s * len + j);
#pragma GCC unroll 8
                for (int c = 0; c < NC_; c++) a[s][r][c] = VFMA(pr, x[c], a[s][r][c]);
            }
        }
    }
    for (ptrdiff_t j = VS * len; j < n_keys; j++) { /* the last stretch's last keys */
        const ET *vj = v + j * v_rs;
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            const V pr = VBCAST(p + r * ldp + j);
#pragma GCC unroll 8
            for (int c = 0; c < NC_; c++)
                a[VS - 1][r][c] = VFMA(pr, ELOAD(vj + c * W), a[VS - 1][r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR_; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NC_; c++) {
            V sum = a[0][r][c];
#pragma GCC unroll 4
            for (int s = 1; s < VS; s++) sum = VADD(sum, a[s][r][c]);
            VSTORE(acc + r * ld_acc + c * W, sum);
        }
}

/* acc[r] += Σ_j p[r][j] · v[j] for r < MR_ (≤ 4): the full vectors of a row in chunks of
 * as many accumulators as the registers hold (PV_ACC_VECS for all the rows and all the
 * stretches together: VALUE_STREAMS of them for one row, ROWS_VALUE_STREAMS for more),
 * then a partial last vector key by key. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_pv_direct_rows)(const int MR_, ptrdiff_t Ev, ptrdiff_t n_keys, const T *p,
                         ptrdiff_t ldp, const ET *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc)
{
    const int VS = MR_ == 1 ? VALUE_STREAMS : ROWS_VALUE_STREAMS;
    const int share = MR_ == 1 ? PV_ACC_VECS / VS : MR_ == 2 ? PV_ACC_VECS / (2 * VS)
                                                            : PV_ACC_VECS / (4 * VS);
    const int chunk = share > 0 ? share : 1;
    const ptrdiff_t Ev_full = Ev - Ev % W;
    ptrdiff_t e = 0;
    for (; e + chunk * W <= Ev_full; e += chunk * W)
        FNE(cattn_pv_stream_columns)(MR_, VS, chunk, n_keys, p, ldp, v + e, v_rs, acc + e, ld_acc);
    for (; e < Ev_full; e += W)
        FNE(cattn_pv_stream_columns)(MR_, VS, 1, n_keys, p, ldp, v + e, v_rs, acc + e, ld_acc);
    if (e < Ev) {
        const VI tail = VMASK(Ev % W);
        const ETAIL_T v_tail = ETAIL(Ev % W);
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            T *ar = acc + r * ld_acc + e;
            V x = VMASKLOAD(ar, tail);
            for (ptrdiff_t j = 0; j < n_keys; j++)
                x = VFMA(VBCAST(p + r * ldp + j), ELOAD_TAIL(v + j * v_rs + e, v_tail), x);
            VMASKSTORE(ar, tail, x);
        }
    }
}

#ifdef VMERGE_SUMS
/* c[r][j] = alpha · q[r]·k[j] for r < MR_ (≤ 4) and the first n_keys / W · W keys, W keys
 * at a time: each key's products summed in a vector per row, and the W vectors of a row
 * merged into one vector of their W sums as they are made (VMERGE_SUMS). A reduction across
 * the lanes per key and row cost about as many instructions as the key's FMAs; the merges
 * share them among W keys. The W keys come from KS stretches of the keys read at once (see
 * CATTN_KEY_STREAMS), W / KS from each, and a stretch's keys fill adjacent lanes; reads
 * alternate between the stretches. Every score is the same whatever stretch or slot it is
 * read in. Returns the keys done. */
static inline __attribute__((always_inline)) TGT_KV ptrdiff_t
FNE(cattn_qkt_direct_rows_by_lanes)(const int MR_, ptrdiff_t n_keys, ptrdiff_t E, T alpha,
                                    const T *q, ptrdiff_t q_rs, const ET *k, ptrdiff_t k_rs,
                                    T *c, ptrdiff_t ldc)
{
    enum { KS = W < CATTN_KEY_STREAMS ? W : CATTN_KEY_STREAMS, PER = W / KS,
           PART = 16 / (int)sizeof(T),        /* lanes of a 128-bit part */
           LEVELS = W == 16 ? 4 : W == 8 ? 3 : W == 4 ? 2 : 1 /* log2 W: the merges' levels */ };
    const ptrdiff_t groups = n_keys / W, stretch = groups * PER;
    const V alpha_v = VBCAST(&alpha);
    for (ptrdiff_t g = 0; g < groups; g++) {
        /* waiting[r][l]: row r's merge of 2^l keys, until its partner is made */
        V waiting[4][LEVELS + 1];
#pragma GCC unroll 16
        for (int slot = 0; slot < W; slot++) {
            const int lane = CATTN_SLOT_LANE(W, PART, slot);
            const ET *kj = k + ((lane / PER) * stretch + g * PER + lane % PER) * k_rs;
            V dots[4];
            FNE(cattn_key_dots)(MR_, E, q, q_rs, kj, dots);
#pragma GCC unroll 4
            for (int r = 0; r < MR_; r++) {
                V sum = dots[r];
                int level = 0;
#pragma GCC unroll 4
                for (int bits = slot; bits & 1; bits >>= 1, level++)
                    sum = VMERGE_SUMS(level, waiting[r][level], sum);
                waiting[r][level] = sum;
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            T scores[W];
            VSTORE(scores, VMUL(alpha_v, waiting[r][LEVELS]));
#pragma GCC unroll 4
            for (int s = 0; s < KS; s++)
                memcpy(c + r * ldc + s * stretch + g * PER, scores + s * PER, PER * sizeof(T));
        }
    }
    return groups * W;
}
#endif

/* c[r][j] = alpha · q[r]·k[j] for r < MR_ (≤ 4) and every key: W keys at a time where the
 * instance merges sums across lanes, then the keys left over. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_qkt_direct_rows_all)(const int MR_, ptrdiff_t n_keys, ptrdiff_t E, T alpha,
                               const T *q, ptrdiff_t q_rs, const ET *k, ptrdiff_t k_rs, T *c,
                               ptrdiff_t ldc)
{
#ifdef VMERGE_SUMS
    const ptrdiff_t done = FNE(cattn_qkt_direct_rows_by_lanes)(MR_, n_keys, E, alpha, q, q_rs,
                                                               k, k_rs, c, ldc);
#else
    const ptrdiff_t done = 0;
#endif
    FNE(cattn_qkt_direct_rows)(MR_, n_keys - done, E, alpha, q, q_rs, k + done * k_rs, k_rs,
                               c + done, ldc);
}

TGT_KV static void
FNE(cattn_gemm_qkt_direct)(ptrdiff_t rows, ptrdiff_t n_keys, ptrdiff_t E, T alpha,
                          const T *q, ptrdiff_t q_rs, const ET *k, ptrdiff_t k_rs, T *c,
                          ptrdiff_t ldc)
{
    for (; rows >= 4; rows -= 4, q += 4 * q_rs, c += 4 * ldc)
        FNE(cattn_qkt_direct_rows_all)(4, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc);
    switch (rows) {
    case 3: FNE(cattn_qkt_direct_rows_all)(3, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    case 2: FNE(cattn_qkt_direct_rows_all)(2, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    case 1: FNE(cattn_qkt_direct_rows_all)(1, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    default: break;
    }
}

TGT_KV static void
FNE(cattn_gemm_pv_direct)(ptrdiff_t rows, ptrdiff_t Ev, ptrdiff_t n_keys, const T *p,
                         ptrdiff_t ldp, const ET *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc)
{
    for (; rows >= 4; rows -= 4, p += 4 * ldp, acc += 4 * ld_acc)
        FNE(cattn_pv_direct_rows)(4, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc);
    switch (rows) {
    case 3: FNE(cattn_pv_direct_rows)(3, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc); break;
    case 2: FNE(cattn_pv_direct_rows)(2, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc); break;
    case 1: FNE(cattn_pv_direct_rows)(1, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc); break;
    default: break;
    }
}



#ifndef ELEMENT_IS_T
/* dst[r][0:cols] = src[r][0:cols] as T for r < rows (row strides in elements): a block of
 * values converted once for the P·V micro-kernels, which every row tile then reads. */
TGT_KV static void
FNE(cattn_convert_rows)(const ET *src, ptrdiff_t src_rs, ptrdiff_t rows, ptrdiff_t cols,
                        T *dst, ptrdiff_t dst_rs)
{
    const ptrdiff_t full = cols - cols % W;
    const ETAIL_T tail = ETAIL(cols % W);
    const VI tail_mask = VMASK(cols % W);
    for (ptrdiff_t r = 0; r < rows; r++) {
        const ET *s = src + r * src_rs;
        T *d = dst + r * dst_rs;
        ptrdiff_t e = 0;
        for (; e < full; e += W) VSTORE(d + e, ELOAD(s + e));
        if (e < cols) VMASKSTORE(d + e, tail_mask, ELOAD_TAIL(s + e, tail));
    }
}
#endif

#undef FNE
#undef PV_ACC_VECS
#undef VALUE_STREAMS
#undef ROWS_VALUE_STREAMS
#undef CATTN_CAT3E
#undef CATTN_CAT3E_
/* The parameters of this element type (set by cattn_gemm_impl.h). */
#undef ET
#undef ESFX
#undef ELOAD
#undef ECVT
#undef ETAIL_T
#undef ETAIL
#undef ELOAD_TAIL
#undef ELEMENT_IS_T

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
/* Accumulator vectors the P·V stream keeps in registers (shared by its rows): 8 leave room
 * for the loaded values within AVX2's 16 registers. */
#ifndef CATTN_PV_STREAM_VECS
#define CATTN_PV_STREAM_VECS 8
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

/* c[r][j] = alpha · q[r]·k[j] for r < MR_ (≤ 4), two accumulators per row to halve the
 * FMA dependency chain. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_qkt_direct_rows)(const int MR_, ptrdiff_t n_keys, ptrdiff_t E, T alpha, const T *q,
                          ptrdiff_t q_rs, const ET *k, ptrdiff_t k_rs, T *c, ptrdiff_t ldc)
{
    const ptrdiff_t E_full = E - E % W;
    const VI tail = VMASK(E % W);
    const ETAIL_T k_tail = ETAIL(E % W);
    for (ptrdiff_t j = 0; j < n_keys; j++) {
        const ET *kj = k + j * k_rs;
        V acc0[4], acc1[4];
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) acc0[r] = acc1[r] = VZERO();
        ptrdiff_t e = 0;
        for (; e + 2 * W <= E_full; e += 2 * W) {
            V k0 = ELOAD(kj + e), k1 = ELOAD(kj + e + W);
#pragma GCC unroll 4
            for (int r = 0; r < MR_; r++) {
                acc0[r] = VFMA(VLOAD(q + r * q_rs + e), k0, acc0[r]);
                acc1[r] = VFMA(VLOAD(q + r * q_rs + e + W), k1, acc1[r]);
            }
        }
        if (e < E_full) {
            V k0 = ELOAD(kj + e);
#pragma GCC unroll 4
            for (int r = 0; r < MR_; r++) acc0[r] = VFMA(VLOAD(q + r * q_rs + e), k0, acc0[r]);
            e += W;
        }
        if (e < E) {
            V k1 = ELOAD_TAIL(kj + e, k_tail);
#pragma GCC unroll 4
            for (int r = 0; r < MR_; r++)
                acc1[r] = VFMA(VMASKLOAD(q + r * q_rs + e, tail), k1, acc1[r]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) c[r * ldc + j] = alpha * VHSUM(VADD(acc0[r], acc1[r]));
    }
}

/* acc[r][0:NC_·W] += Σ_j p[r][j] · v[j][0:NC_·W] for r < MR_ (≤ 4): the accumulators stay
 * in registers for all the block's keys, loaded and stored once per block, so the stream
 * costs per element of V only its load (and conversion) and one FMA per row; each value
 * vector is loaded once for all the rows. (Loading and storing them every few keys cost
 * as many instructions per element as the conversion of a narrow V.) The FMAs of an
 * element run in key order, as a key-by-key loop would. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_pv_stream_columns)(const int MR_, const int NC_, ptrdiff_t n_keys, const T *p,
                             ptrdiff_t ldp, const ET *v, ptrdiff_t v_rs, T *acc,
                             ptrdiff_t ld_acc)
{
    V a[4][CATTN_PV_STREAM_VECS];
#pragma GCC unroll 4
    for (int r = 0; r < MR_; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NC_; c++) a[r][c] = VLOAD(acc + r * ld_acc + c * W);
    for (ptrdiff_t j = 0; j < n_keys; j++) {
        const ET *vj = v + j * v_rs;
        V x[CATTN_PV_STREAM_VECS];
#pragma GCC unroll 8
        for (int c = 0; c < NC_; c++) x[c] = ELOAD(vj + c * W);
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            const V pr = VBCAST(p + r * ldp + j);
#pragma GCC unroll 8
            for (int c = 0; c < NC_; c++) a[r][c] = VFMA(pr, x[c], a[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR_; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NC_; c++) VSTORE(acc + r * ld_acc + c * W, a[r][c]);
}

/* acc[r] += Σ_j p[r][j] · v[j] for r < MR_ (≤ 4): the full vectors of a row in chunks of
 * as many accumulators as the registers hold (CATTN_PV_STREAM_VECS for all the rows
 * together), then a partial last vector key by key. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_pv_direct_rows)(const int MR_, ptrdiff_t Ev, ptrdiff_t n_keys, const T *p,
                         ptrdiff_t ldp, const ET *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc)
{
    const int chunk = MR_ == 1 ? CATTN_PV_STREAM_VECS : MR_ == 2 ? CATTN_PV_STREAM_VECS / 2
                                                                 : CATTN_PV_STREAM_VECS / 4;
    const ptrdiff_t Ev_full = Ev - Ev % W;
    ptrdiff_t e = 0;
    for (; e + chunk * W <= Ev_full; e += chunk * W)
        FNE(cattn_pv_stream_columns)(MR_, chunk, n_keys, p, ldp, v + e, v_rs, acc + e, ld_acc);
    for (; e < Ev_full; e += W)
        FNE(cattn_pv_stream_columns)(MR_, 1, n_keys, p, ldp, v + e, v_rs, acc + e, ld_acc);
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

#ifdef VTRANSPOSE
/* c[j] = alpha · q·k[j] for one query row and keys [0, the last multiple of W), W keys at a
 * time: each key's products summed in a vector, then the W vectors transposed in registers
 * and added, which gives the W scores as one vector. A reduction across the lanes per key
 * cost about as many instructions as converting a narrow key; the transpose shares them
 * among W keys. Returns the keys done. */
static inline __attribute__((always_inline)) TGT_KV ptrdiff_t
FNE(cattn_qkt_direct_row_by_lanes)(ptrdiff_t n_keys, ptrdiff_t E, T alpha, const T *q,
                                   const ET *k, ptrdiff_t k_rs, T *c)
{
    const ptrdiff_t E_full = E - E % W;
    const VI tail = VMASK(E % W);
    const ETAIL_T k_tail = ETAIL(E % W);
    const V alpha_v = VBCAST(&alpha);
    ptrdiff_t j0 = 0;
    for (; j0 + W <= n_keys; j0 += W) {
        V sums[W];
#pragma GCC unroll 16
        for (int jj = 0; jj < W; jj++) {
            const ET *kj = k + (j0 + jj) * k_rs;
            V acc0 = VZERO(), acc1 = VZERO();
            ptrdiff_t e = 0;
            for (; e + 2 * W <= E_full; e += 2 * W) {
                acc0 = VFMA(VLOAD(q + e), ELOAD(kj + e), acc0);
                acc1 = VFMA(VLOAD(q + e + W), ELOAD(kj + e + W), acc1);
            }
            if (e < E_full) {
                acc0 = VFMA(VLOAD(q + e), ELOAD(kj + e), acc0);
                e += W;
            }
            if (e < E) acc1 = VFMA(VMASKLOAD(q + e, tail), ELOAD_TAIL(kj + e, k_tail), acc1);
            sums[jj] = VADD(acc0, acc1);
        }
        VTRANSPOSE(sums);
        V total = sums[0];
#pragma GCC unroll 16
        for (int lane = 1; lane < W; lane++) total = VADD(total, sums[lane]);
        VSTORE(c + j0, VMUL(alpha_v, total));
    }
    return j0;
}
#endif

TGT_KV static void
FNE(cattn_gemm_qkt_direct)(ptrdiff_t rows, ptrdiff_t n_keys, ptrdiff_t E, T alpha,
                          const T *q, ptrdiff_t q_rs, const ET *k, ptrdiff_t k_rs, T *c,
                          ptrdiff_t ldc)
{
    for (; rows >= 4; rows -= 4, q += 4 * q_rs, c += 4 * ldc)
        FNE(cattn_qkt_direct_rows)(4, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc);
    switch (rows) {
    case 3: FNE(cattn_qkt_direct_rows)(3, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    case 2: FNE(cattn_qkt_direct_rows)(2, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    case 1: {
#ifdef VTRANSPOSE
        const ptrdiff_t done = FNE(cattn_qkt_direct_row_by_lanes)(n_keys, E, alpha, q, k, k_rs, c);
#else
        const ptrdiff_t done = 0;
#endif
        FNE(cattn_qkt_direct_rows)(1, n_keys - done, E, alpha, q, q_rs, k + done * k_rs, k_rs,
                                   c + done, ldc);
        break;
    }
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

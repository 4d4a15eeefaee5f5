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
        for (ptrdiff_t e0 = 0; e0 < E; e0 += W) {
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

/* acc[r] += Σ_j p[r][j] · v[j] for r < MR_ (≤ 4): four keys per pass over the accumulator
 * rows, so each accumulator vector is loaded and stored once per four keys. */
static inline __attribute__((always_inline)) TGT_KV void
FNE(cattn_pv_direct_rows)(const int MR_, ptrdiff_t Ev, ptrdiff_t n_keys, const T *p,
                         ptrdiff_t ldp, const ET *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc)
{
    const ptrdiff_t Ev_full = Ev - Ev % W;
    const VI tail = VMASK(Ev % W);
    const ETAIL_T v_tail = ETAIL(Ev % W);
    ptrdiff_t j = 0;
    for (; j + 4 <= n_keys; j += 4) {
        const ET *v0 = v + j * v_rs, *v1 = v0 + v_rs, *v2 = v1 + v_rs, *v3 = v2 + v_rs;
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            const T *pr = p + r * ldp + j;
            V a0 = VBCAST(pr), a1 = VBCAST(pr + 1), a2 = VBCAST(pr + 2), a3 = VBCAST(pr + 3);
            T *ar = acc + r * ld_acc;
            ptrdiff_t e = 0;
            for (; e < Ev_full; e += W) {
                V x = VFMA(a0, ELOAD(v0 + e), VLOAD(ar + e));
                x = VFMA(a1, ELOAD(v1 + e), x);
                x = VFMA(a2, ELOAD(v2 + e), x);
                VSTORE(ar + e, VFMA(a3, ELOAD(v3 + e), x));
            }
            if (e < Ev) {
                V x = VFMA(a0, ELOAD_TAIL(v0 + e, v_tail), VMASKLOAD(ar + e, tail));
                x = VFMA(a1, ELOAD_TAIL(v1 + e, v_tail), x);
                x = VFMA(a2, ELOAD_TAIL(v2 + e, v_tail), x);
                VMASKSTORE(ar + e, tail, VFMA(a3, ELOAD_TAIL(v3 + e, v_tail), x));
            }
        }
    }
    for (; j < n_keys; j++) {
        const ET *vj = v + j * v_rs;
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            V a = VBCAST(p + r * ldp + j);
            T *ar = acc + r * ld_acc;
            ptrdiff_t e = 0;
            for (; e < Ev_full; e += W) VSTORE(ar + e, VFMA(a, ELOAD(vj + e), VLOAD(ar + e)));
            if (e < Ev)
                VMASKSTORE(ar + e, tail, VFMA(a, ELOAD_TAIL(vj + e, v_tail), VMASKLOAD(ar + e, tail)));
        }
    }
}

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
    case 1: FNE(cattn_qkt_direct_rows)(1, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
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

/*
 * One (precision, instruction set) instance of the block GEMMs; included by cattn_gemm.h
 * once per instance with
 *   T       element type            SFX   precision suffix (f32/f64)
 *   ISFX    instruction-set suffix  TGT   the function attribute that enables it
 *   V       vector of T             W     lanes per vector      VI  lane mask type
 *   MR, NV  the register tile: MR rows × NV vectors (NR = NV·W columns)
 * and the intrinsic macros VLOAD, VSTORE, VBCAST, VFMA, VMUL, VADD, VZERO, VHSUM (horizontal
 * sum), VMASK (lanes < n, any n), VMASKLOAD (masked-off lanes read 0, never touched),
 * VMASKSTORE, and optionally VTRANSPOSE (an array of W vectors, transposed in registers).
 * Every instance shares this one code; only the vector width, the register
 * tile and the intrinsics differ.
 *
 * Register tile: MR rows × NR columns, 2·MR accumulators, two loads and MR broadcasts per
 * 2·MR FMAs (AVX2: 6 rows, 12 of 16 ymm; AVX-512: 12 rows, 24 of 32 zmm).
 */
#define CATTN_CAT3_(a, b, c) a##_##b##_##c
#define CATTN_CAT3(a, b, c) CATTN_CAT3_(a, b, c)
#define FN(name) CATTN_CAT3(name, SFX, ISFX)
#define NR (NV * W)
#define PV_KC 128

/* Rows [0, rows) as tiles of MR rows, then the rest as tiles of 8, 4, 2 and 1 (each tile
 * height a compile-time constant after inlining); TILE(R, i) handles rows [i, i + R). */
#define CATTN_FOR_ROW_TILES(rows, TILE)                                                    \
    do {                                                                                   \
        ptrdiff_t i_ = 0;                                                                  \
        for (; i_ + MR <= (rows); i_ += MR) TILE(MR, i_);                                  \
        if (8 < MR && (rows) - i_ >= 8) { TILE((8 < MR ? 8 : 1), i_); i_ += 8; }           \
        if (4 < MR && (rows) - i_ >= 4) { TILE((4 < MR ? 4 : 1), i_); i_ += 4; }           \
        if (2 < MR && (rows) - i_ >= 2) { TILE((2 < MR ? 2 : 1), i_); i_ += 2; }           \
        if (1 < MR && (rows) - i_ >= 1) TILE(1, i_);                                       \
    } while (0)

/* Pack keys [0, n_keys) of a block as panels of NR keys: panel p holds, for each feature e,
 * the NR values k[p·NR + c][e] side by side (zeros past n_keys), so the Q·Kᵀ tile loads its
 * vectors per feature instead of gathering. Done once per key block and reused by every
 * row tile of the query block. Where the instance has an in-register transpose
 * (VTRANSPOSE), W keys × W features move at a time: a scalar transpose cost about a quarter
 * of the Q·Kᵀ time. */
TGT static void FN(cattn_pack_keys)(const T *k, ptrdiff_t k_rs, ptrdiff_t n_keys, ptrdiff_t E,
                                    T *packed)
{
#ifdef VTRANSPOSE
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += W) {
        const ptrdiff_t nk = n_keys - j0 < W ? n_keys - j0 : W;
        T *panel = packed + (j0 / NR) * NR * E + j0 % NR;
        for (ptrdiff_t e0 = 0; e0 < E; e0 += W) {
            const VI me = VMASK(E - e0);
            V r[W];
            for (int c = 0; c < W; c++)
                r[c] = c < nk ? VMASKLOAD(k + (j0 + c) * k_rs + e0, me) : VZERO();
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
            const T *row = k + (j0 + c) * k_rs;
            for (ptrdiff_t e = 0; e < E; e++) panel[e * NR + c] = row[e];
        }
        for (ptrdiff_t c = nc; c < NR; c++)
            for (ptrdiff_t e = 0; e < E; e++) panel[e * NR + c] = 0;
    }
#endif
}

/* c[r][0:nc] = alpha · Σ_e q[r][e] · panel[e][0:nc] for r < MR_ (a compile-time constant
 * after inlining, so the MR_ × NV accumulators live in registers). */
static inline __attribute__((always_inline)) TGT void
FN(cattn_qkt_tile)(const int MR_, ptrdiff_t E, T alpha, const T *q, ptrdiff_t q_rs,
                   const T *panel, T *c, ptrdiff_t ldc, ptrdiff_t nc)
{
    V acc[MR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) acc[r][u] = VZERO();
    for (ptrdiff_t e = 0; e < E; e++) {
        V b[NV];
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) b[u] = VLOAD(panel + e * NR + u * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++) {
            V a = VBCAST(q + r * q_rs + e);
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++) acc[r][u] = VFMA(a, b[u], acc[r][u]);
        }
    }
    V va = VBCAST(&alpha);
    if (nc == NR) {
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++) VSTORE(c + r * ldc + u * W, VMUL(acc[r][u], va));
    } else {
        VI m[NV];
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) m[u] = VMASK(nc - u * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++)
                VMASKSTORE(c + r * ldc + u * W, m[u], VMUL(acc[r][u], va));
    }
}

/* One row tile (MR_ rows) against every panel: the tile's queries stay in L1 while the
 * packed keys stream through in order. */
static inline __attribute__((always_inline)) TGT void
FN(cattn_qkt_rows)(const int MR_, ptrdiff_t n_keys, ptrdiff_t E, T alpha, const T *q,
                   ptrdiff_t q_rs, const T *packed, T *c, ptrdiff_t ldc)
{
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += NR) {
        ptrdiff_t nc = n_keys - j0 < NR ? n_keys - j0 : NR;
        FN(cattn_qkt_tile)(MR_, E, alpha, q, q_rs, packed + j0 * E, c + j0, ldc, nc);
    }
}

/* C[rows, n_keys] = alpha · Q[rows, E] · Kᵀ, K given as cattn_pack_keys panels. */
TGT static void
FN(cattn_gemm_qkt)(ptrdiff_t rows, ptrdiff_t n_keys, ptrdiff_t E, T alpha,
                   const T *q, ptrdiff_t q_rs, const T *packed, T *c, ptrdiff_t ldc)
{
#define QKT_ROWS(R, i) \
    FN(cattn_qkt_rows)(R, n_keys, E, alpha, q + (i) * q_rs, q_rs, packed, c + (i) * ldc, ldc)
    CATTN_FOR_ROW_TILES(rows, QKT_ROWS);
#undef QKT_ROWS
}

/* acc[r][0:nc] += Σ_j p[r][j] · v[j][0:nc] for r < MR_. MASKED_ (nc < NR) reads and writes
 * only the first nc lanes, never past the end of a row of V or of the accumulator; both
 * MR_ and MASKED_ are compile-time constants after inlining. */
#define PV_LOAD(ptr, m) (MASKED_ ? VMASKLOAD(ptr, m) : VLOAD(ptr))
static inline __attribute__((always_inline)) TGT void
FN(cattn_pv_tile)(const int MR_, const int MASKED_, ptrdiff_t n_keys, const T *p,
                  ptrdiff_t ldp, const T *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc,
                  ptrdiff_t nc)
{
    V c[MR][NV];
    VI m[NV];
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++) m[u] = VMASK(nc - u * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) c[r][u] = PV_LOAD(acc + r * ld_acc + u * W, m[u]);
    for (ptrdiff_t j = 0; j < n_keys; j++) {
        V b[NV];
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) b[u] = PV_LOAD(v + j * v_rs + u * W, m[u]);
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++) {
            V a = VBCAST(p + r * ldp + j);
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++) c[r][u] = VFMA(a, b[u], c[r][u]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) {
            if (MASKED_)
                VMASKSTORE(acc + r * ld_acc + u * W, m[u], c[r][u]);
            else
                VSTORE(acc + r * ld_acc + u * W, c[r][u]);
        }
}
#undef PV_LOAD

/* All rows of one column tile (the V slab of a tile is reused by every row tile from L1). */
static inline __attribute__((always_inline)) TGT void
FN(cattn_pv_column)(const int MASKED_, ptrdiff_t rows, ptrdiff_t n_keys, const T *p,
                    ptrdiff_t ldp, const T *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc,
                    ptrdiff_t nc)
{
#define PV_ROWS(R, i) \
    FN(cattn_pv_tile)(R, MASKED_, n_keys, p + (i) * ldp, ldp, v, v_rs, acc + (i) * ld_acc, ld_acc, nc)
    CATTN_FOR_ROW_TILES(rows, PV_ROWS);
#undef PV_ROWS
}

/* ACC[rows, Ev] += P[rows, n_keys] · V[n_keys, Ev] (row-major, V rows read in place). */
TGT static void
FN(cattn_gemm_pv)(ptrdiff_t rows, ptrdiff_t Ev, ptrdiff_t n_keys, const T *p, ptrdiff_t ldp,
                  const T *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc)
{
    /* Keys in chunks of PV_KC, so that the column slab of V a tile reads (PV_KC × NR)
     * stays in L1 while every row tile of the block reuses it. */
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += PV_KC) {
        ptrdiff_t kc = n_keys - j0 < PV_KC ? n_keys - j0 : PV_KC;
        const T *pj = p + j0, *vj = v + j0 * v_rs;
        ptrdiff_t c = 0;
        for (; c + NR <= Ev; c += NR)
            FN(cattn_pv_column)(0, rows, kc, pj, ldp, vj + c, v_rs, acc + c, ld_acc, NR);
        if (c < Ev)
            FN(cattn_pv_column)(1, rows, kc, pj, ldp, vj + c, v_rs, acc + c, ld_acc, Ev - c);
    }
}

/* ---- Few query rows (decoding): memory-bound, so keys and values are streamed in place,
 * each read exactly once, without packing. */

/* c[r][j] = alpha · q[r]·k[j] for r < MR_ (≤ 4), two accumulators per row to halve the
 * FMA dependency chain. */
static inline __attribute__((always_inline)) TGT void
FN(cattn_qkt_direct_rows)(const int MR_, ptrdiff_t n_keys, ptrdiff_t E, T alpha, const T *q,
                          ptrdiff_t q_rs, const T *k, ptrdiff_t k_rs, T *c, ptrdiff_t ldc)
{
    const ptrdiff_t E_full = E - E % W;
    const VI tail = VMASK(E % W);
    for (ptrdiff_t j = 0; j < n_keys; j++) {
        const T *kj = k + j * k_rs;
        V acc0[4], acc1[4];
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) acc0[r] = acc1[r] = VZERO();
        ptrdiff_t e = 0;
        for (; e + 2 * W <= E_full; e += 2 * W) {
            V k0 = VLOAD(kj + e), k1 = VLOAD(kj + e + W);
#pragma GCC unroll 4
            for (int r = 0; r < MR_; r++) {
                acc0[r] = VFMA(VLOAD(q + r * q_rs + e), k0, acc0[r]);
                acc1[r] = VFMA(VLOAD(q + r * q_rs + e + W), k1, acc1[r]);
            }
        }
        if (e < E_full) {
            V k0 = VLOAD(kj + e);
#pragma GCC unroll 4
            for (int r = 0; r < MR_; r++) acc0[r] = VFMA(VLOAD(q + r * q_rs + e), k0, acc0[r]);
            e += W;
        }
        if (e < E) {
            V k1 = VMASKLOAD(kj + e, tail);
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
static inline __attribute__((always_inline)) TGT void
FN(cattn_pv_direct_rows)(const int MR_, ptrdiff_t Ev, ptrdiff_t n_keys, const T *p,
                         ptrdiff_t ldp, const T *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc)
{
    const ptrdiff_t Ev_full = Ev - Ev % W;
    const VI tail = VMASK(Ev % W);
    ptrdiff_t j = 0;
    for (; j + 4 <= n_keys; j += 4) {
        const T *v0 = v + j * v_rs, *v1 = v0 + v_rs, *v2 = v1 + v_rs, *v3 = v2 + v_rs;
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            const T *pr = p + r * ldp + j;
            V a0 = VBCAST(pr), a1 = VBCAST(pr + 1), a2 = VBCAST(pr + 2), a3 = VBCAST(pr + 3);
            T *ar = acc + r * ld_acc;
            ptrdiff_t e = 0;
            for (; e < Ev_full; e += W) {
                V x = VFMA(a0, VLOAD(v0 + e), VLOAD(ar + e));
                x = VFMA(a1, VLOAD(v1 + e), x);
                x = VFMA(a2, VLOAD(v2 + e), x);
                VSTORE(ar + e, VFMA(a3, VLOAD(v3 + e), x));
            }
            if (e < Ev) {
                V x = VFMA(a0, VMASKLOAD(v0 + e, tail), VMASKLOAD(ar + e, tail));
                x = VFMA(a1, VMASKLOAD(v1 + e, tail), x);
                x = VFMA(a2, VMASKLOAD(v2 + e, tail), x);
                VMASKSTORE(ar + e, tail, VFMA(a3, VMASKLOAD(v3 + e, tail), x));
            }
        }
    }
    for (; j < n_keys; j++) {
        const T *vj = v + j * v_rs;
#pragma GCC unroll 4
        for (int r = 0; r < MR_; r++) {
            V a = VBCAST(p + r * ldp + j);
            T *ar = acc + r * ld_acc;
            ptrdiff_t e = 0;
            for (; e < Ev_full; e += W) VSTORE(ar + e, VFMA(a, VLOAD(vj + e), VLOAD(ar + e)));
            if (e < Ev)
                VMASKSTORE(ar + e, tail, VFMA(a, VMASKLOAD(vj + e, tail), VMASKLOAD(ar + e, tail)));
        }
    }
}

TGT static void
FN(cattn_gemm_qkt_direct)(ptrdiff_t rows, ptrdiff_t n_keys, ptrdiff_t E, T alpha,
                          const T *q, ptrdiff_t q_rs, const T *k, ptrdiff_t k_rs, T *c,
                          ptrdiff_t ldc)
{
    for (; rows >= 4; rows -= 4, q += 4 * q_rs, c += 4 * ldc)
        FN(cattn_qkt_direct_rows)(4, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc);
    switch (rows) {
    case 3: FN(cattn_qkt_direct_rows)(3, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    case 2: FN(cattn_qkt_direct_rows)(2, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    case 1: FN(cattn_qkt_direct_rows)(1, n_keys, E, alpha, q, q_rs, k, k_rs, c, ldc); break;
    default: break;
    }
}

TGT static void
FN(cattn_gemm_pv_direct)(ptrdiff_t rows, ptrdiff_t Ev, ptrdiff_t n_keys, const T *p,
                         ptrdiff_t ldp, const T *v, ptrdiff_t v_rs, T *acc, ptrdiff_t ld_acc)
{
    for (; rows >= 4; rows -= 4, p += 4 * ldp, acc += 4 * ld_acc)
        FN(cattn_pv_direct_rows)(4, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc);
    switch (rows) {
    case 3: FN(cattn_pv_direct_rows)(3, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc); break;
    case 2: FN(cattn_pv_direct_rows)(2, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc); break;
    case 1: FN(cattn_pv_direct_rows)(1, Ev, n_keys, p, ldp, v, v_rs, acc, ld_acc); break;
    default: break;
    }
}


#undef FN
#undef NR
#undef PV_KC
#undef CATTN_FOR_ROW_TILES
#undef CATTN_CAT3
#undef CATTN_CAT3_
/* The parameters of this precision (set by cattn_gemm.h). */
#undef T
#undef SFX
#undef ISFX
#undef TGT
#undef MR
#undef NV
#undef W
#undef V
#undef VI
#undef VLOAD
#undef VSTORE
#undef VBCAST
#undef VFMA
#undef VMUL
#undef VZERO
#undef VMASK
#undef VMASKLOAD
#undef VMASKSTORE
#undef VADD
#undef VHSUM
#undef VTRANSPOSE

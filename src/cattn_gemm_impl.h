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
 * A float instance may also give VLOAD_F16, VLOAD_BF16 and VLOAD_I8 (W stored elements as
 * a vector of floats) and TGT_KV (their target): it then reads float16, bfloat16 and int8
 * keys and values too (cattn_gemm_kv.h).
 * Every instance shares this one code; only the vector width, the register
 * tile and the intrinsics differ.
 *
 *   LMR     (optional, default MR) the row tile of the linear layers' GEMM
 * Register tile: MR rows × NR columns, 2·MR accumulators, two loads and MR broadcasts per
 * 2·MR FMAs (AVX2: 6 rows, 12 of 16 ymm; AVX-512: 12 rows, 24 of 32 zmm).
 */
#define CATTN_CAT3_(a, b, c) a##_##b##_##c
#define CATTN_CAT3(a, b, c) CATTN_CAT3_(a, b, c)
#define FN(name) CATTN_CAT3(name, SFX, ISFX)
#define NR (NV * W)
#define PV_KC 128
#ifndef LMR
#define LMR MR
#endif
/* Linear layers: a slice of LKC inputs of a weight panel (32 KB) stays in L1 while every
 * row tile of a block of LMC rows (their inputs in L2) passes over it. */
#define LKC (32768 / (NR * (ptrdiff_t)sizeof(T)))
#define LMC 128

/* Rows [0, rows) as tiles of MR rows, then the rest as tiles of 8, 4, 2 and 1 (each tile
 * height a compile-time constant after inlining); TILE(R, i) handles rows [i, i + R). */
#define CATTN_FOR_ROW_TILES(rows, TILE) CATTN_FOR_ROW_TILES_OF(MR, rows, TILE)
#define CATTN_FOR_ROW_TILES_OF(M, rows, TILE)                                              \
    do {                                                                                   \
        ptrdiff_t i_ = 0;                                                                  \
        for (; i_ + (M) <= (rows); i_ += (M)) TILE((M), i_);                               \
        if (8 < (M) && (rows) - i_ >= 8) { TILE((8 < (M) ? 8 : 1), i_); i_ += 8; }         \
        if (4 < (M) && (rows) - i_ >= 4) { TILE((4 < (M) ? 4 : 1), i_); i_ += 4; }         \
        if (2 < (M) && (rows) - i_ >= 2) { TILE((2 < (M) ? 2 : 1), i_); i_ += 2; }         \
        if (1 < (M) && (rows) - i_ >= 1) TILE(1, i_);                                      \
    } while (0)

/* Rows [0, rows) as tiles of M rows, then the rest as one tile (its height a compile-time
 * constant after inlining, M ≤ 12). For the attention GEMMs, whose few-row calls are the
 * grouped heads of one K/V head while decoding (7 rows for 14 query heads over 2): each
 * tile passes over all of the block's keys or values, so 7 rows as tiles of 4, 2 and 1
 * read them three times. Every element is summed in the same order whatever its tile. */
#define CATTN_EXACT_TILE_(R, M, i_, TILE) \
    case R: if ((R) < (M)) TILE(((R) < (M) ? (R) : 1), i_); break
#define CATTN_FOR_EXACT_ROW_TILES(M, rows, TILE)                                           \
    do {                                                                                   \
        ptrdiff_t i_ = 0;                                                                  \
        for (; i_ + (M) <= (rows); i_ += (M)) TILE((M), i_);                               \
        switch ((rows) - i_) {                                                             \
            CATTN_EXACT_TILE_(1, M, i_, TILE); CATTN_EXACT_TILE_(2, M, i_, TILE);          \
            CATTN_EXACT_TILE_(3, M, i_, TILE); CATTN_EXACT_TILE_(4, M, i_, TILE);          \
            CATTN_EXACT_TILE_(5, M, i_, TILE); CATTN_EXACT_TILE_(6, M, i_, TILE);          \
            CATTN_EXACT_TILE_(7, M, i_, TILE); CATTN_EXACT_TILE_(8, M, i_, TILE);          \
            CATTN_EXACT_TILE_(9, M, i_, TILE); CATTN_EXACT_TILE_(10, M, i_, TILE);         \
            CATTN_EXACT_TILE_(11, M, i_, TILE);                                            \
            default: break;                                                                \
        }                                                                                  \
    } while (0)

/* acc[r][0:NR] += Σ_e a[r][e] · panel[e][0:NR] for r < MR_ (≤ LMR, a compile-time constant
 * after inlining: the accumulators stay in registers). */
static inline __attribute__((always_inline)) TGT void
FN(cattn_panel_fma)(const int MR_, ptrdiff_t E, const T *a, ptrdiff_t a_rs, const T *panel,
                    V acc[][NV])
{
    for (ptrdiff_t e = 0; e < E; e++) {
        V b[NV];
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) b[u] = VLOAD(panel + e * NR + u * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++) {
            V x = VBCAST(a + r * a_rs + e);
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++) acc[r][u] = VFMA(x, b[u], acc[r][u]);
        }
    }
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
    FN(cattn_panel_fma)(MR_, E, q, q_rs, panel, acc);
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
    CATTN_FOR_EXACT_ROW_TILES(MR, rows, QKT_ROWS);
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
    CATTN_FOR_EXACT_ROW_TILES(MR, rows, PV_ROWS);
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

/* ---- Linear layers: C = A · Wᵀ + bias with W (outputs, inputs) packed once, as the keys
 * are (cattn_pack_keys: panels of NR outputs, input-major). */

/* c[r][0:nc] = init + Σ_k a[r][k] · panel[k][0:nc] for r < MR_, where init is c itself
 * (ACCUMULATE_), else the bias (NULL: zero). Masked loads and stores past nc. */
static inline __attribute__((always_inline)) TGT void
FN(cattn_linear_tile)(const int MR_, const int ACCUMULATE_, ptrdiff_t K, const T *a,
                      ptrdiff_t lda, const T *panel, const T *bias, T *c, ptrdiff_t ldc,
                      ptrdiff_t nc)
{
    V acc[LMR][NV];
    VI m[NV];
    const int full = nc == NR;
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++) m[u] = VMASK(nc - u * W);
    if (ACCUMULATE_) {
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++)
                acc[r][u] = full ? VLOAD(c + r * ldc + u * W) : VMASKLOAD(c + r * ldc + u * W, m[u]);
    } else {
        V b[NV];
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++)
            b[u] = !bias ? VZERO() : full ? VLOAD(bias + u * W) : VMASKLOAD(bias + u * W, m[u]);
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++) acc[r][u] = b[u];
    }
    FN(cattn_panel_fma)(MR_, K, a, lda, panel, acc);
    if (full) {
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++) VSTORE(c + r * ldc + u * W, acc[r][u]);
    } else {
#pragma GCC unroll 16
        for (int r = 0; r < MR_; r++)
#pragma GCC unroll 4
            for (int u = 0; u < NV; u++) VMASKSTORE(c + r * ldc + u * W, m[u], acc[r][u]);
    }
}

/* C[rows, n_out] = A[rows, K] · Wᵀ + bias (bias may be NULL), W packed by cattn_pack_keys
 * (n_keys = n_out, E = K). Blocks of LMC rows; per block, slices of LKC inputs (K split
 * evenly); per slice, each panel's slice is reused by every row tile of the block. */
TGT static void
FN(cattn_linear)(ptrdiff_t rows, ptrdiff_t n_out, ptrdiff_t K, const T *a, ptrdiff_t lda,
                 const T *packed, const T *bias, T *c, ptrdiff_t ldc)
{
    const ptrdiff_t slices = K > LKC ? (K + LKC - 1) / LKC : 1;
    const ptrdiff_t kc_max = (K + slices - 1) / slices;
    for (ptrdiff_t i0 = 0; i0 < rows; i0 += LMC) {
        const ptrdiff_t mc = rows - i0 < LMC ? rows - i0 : LMC;
        const T *ab = a + i0 * lda;
        T *cb = c + i0 * ldc;
        for (ptrdiff_t k0 = 0; k0 == 0 || k0 < K; k0 += kc_max) {
            const ptrdiff_t kc = K - k0 < kc_max ? K - k0 : kc_max;
            for (ptrdiff_t j0 = 0; j0 < n_out; j0 += NR) {
                const ptrdiff_t nc = n_out - j0 < NR ? n_out - j0 : NR;
                const T *panel = packed + j0 * K + k0 * NR;
                const T *bj = bias ? bias + j0 : NULL;
                if (k0) {
#define LINEAR_ROWS(R, i) FN(cattn_linear_tile)(R, 1, kc, ab + (i) * lda + k0, lda, panel, \
                                                bj, cb + (i) * ldc + j0, ldc, nc)
                    CATTN_FOR_ROW_TILES_OF(LMR, mc, LINEAR_ROWS);
#undef LINEAR_ROWS
                } else {
#define LINEAR_ROWS(R, i) FN(cattn_linear_tile)(R, 0, kc, ab + (i) * lda, lda, panel, bj,   \
                                                cb + (i) * ldc + j0, ldc, nc)
                    CATTN_FOR_ROW_TILES_OF(LMR, mc, LINEAR_ROWS);
#undef LINEAR_ROWS
                }
            }
        }
    }
}

/* ---- The routines that read K and V: for T itself, and, where the instance gives the
 * conversions (float instances: VLOAD_F16, VLOAD_BF16, VLOAD_I8, W elements each, under
 * the target TGT_KV), for float16, bfloat16 and int8 elements too. */
#ifndef TGT_KV
#define TGT_KV TGT
#endif
#define ET T
#define ESFX SFX
#define ELOAD(p) VLOAD(p)
#define ECVT(x) (x)
#define ETAIL_T VI
#define ETAIL(n) VMASK(n)
#define ELOAD_TAIL(p, m) VMASKLOAD(p, m)
#define ELEMENT_IS_T 1
#include "cattn_gemm_kv.h"

#ifdef VLOAD_F16
/* (a partial row is copied into a zeroed buffer first: it never reads past the row) */
#define CATTN_ELOAD_PART(ET_, LOAD, p, n) ({                                            \
    ET_ b_[W];                                                                          \
    const ptrdiff_t n_ = (n);                                                           \
    memset(b_, 0, sizeof b_);                                                           \
    if (n_ > 0) memcpy(b_, (p), (size_t)(n_ < W ? n_ : W) * sizeof(ET_));               \
    LOAD(b_);                                                                           \
})

#define ET uint16_t
#define ESFX f16
#define ELOAD(p) VLOAD_F16(p)
#define ECVT(x) cattn_f16_to_f32(x)
#define ETAIL_T ptrdiff_t
#define ETAIL(n) (n)
#define ELOAD_TAIL(p, n) CATTN_ELOAD_PART(uint16_t, VLOAD_F16, p, n)
#include "cattn_gemm_kv.h"

#define ET uint16_t
#define ESFX bf16
#define ELOAD(p) VLOAD_BF16(p)
#define ECVT(x) cattn_bf16_to_f32(x)
#define ETAIL_T ptrdiff_t
#define ETAIL(n) (n)
#define ELOAD_TAIL(p, n) CATTN_ELOAD_PART(uint16_t, VLOAD_BF16, p, n)
#include "cattn_gemm_kv.h"

#define ET int8_t
#define ESFX i8
#define ELOAD(p) VLOAD_I8(p)
#define ECVT(x) ((float)(x))
#define ETAIL_T ptrdiff_t
#define ETAIL(n) (n)
#define ELOAD_TAIL(p, n) CATTN_ELOAD_PART(int8_t, VLOAD_I8, p, n)
#include "cattn_gemm_kv.h"
#undef CATTN_ELOAD_PART
#endif

#undef FN
#undef NR
#undef PV_KC
#undef LMR
#undef LKC
#undef LMC
#undef CATTN_FOR_ROW_TILES
#undef CATTN_FOR_EXACT_ROW_TILES
#undef CATTN_EXACT_TILE_
#undef CATTN_FOR_ROW_TILES_OF
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
#undef VMERGE_SUMS
#undef NREGS
#undef TGT_KV
#undef VLOAD_F16
#undef VLOAD_BF16
#undef VLOAD_I8

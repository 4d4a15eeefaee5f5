/*
 * Native bfloat16 block products, for the levels above AVX-512 (cattn_cpu.h):
 *   CATTN_ISA_AVX512_BF16  vdpbf16ps: 16 float lanes, each the sum of two bf16 products
 *   CATTN_ISA_AMX          AMX-BF16 tiles (tdpbf16ps, 16×16 floats per 16×32 by 32×16
 *                          product) for blocks of 16 rows or more; fewer rows use the
 *                          AVX512-BF16 kernels
 *
 *   scores = alpha · Q_blk · K_blkᵀ   Q and K bfloat16, products exact, float32 sums
 *   acc   += P · V_blk                P (float32 probabilities) rounded to bfloat16 to
 *                                     nearest even, V bfloat16, float32 sums
 *
 * Both instructions multiply pairs of bf16 along the inner dimension, so every operand is
 * first rewritten as rows of 32-bit "pairs" (two bf16 of consecutive inner index, the lower
 * index in the low half) in a per-thread work area:
 *   Q  rows × ldq pairs (ldq = the E/2 pairs rounded up to 16: one 64-byte tile row),
 *      rows rounded up to 32 with zeros;
 *   K  panels of 32 keys: for each pair index, the 32 keys' pairs side by side (the tile
 *      layout AMX wants for its second operand, 16 keys per tile);
 *   P  rows × ldp pairs of keys, as Q;
 *   V  for each pair of keys, the Ev columns' pairs side by side (Ev rounded up to 32).
 * Padding is zero in both operands of a product (a bf16 0 times a bf16 0), so padded lanes
 * add exact zeros; padded results are computed but never stored.
 *
 * The bf16 conversions flush subnormal probabilities (below 1.2e-38) to zero, as the
 * hardware's dot products do for subnormal inputs: a weight that small changes no float32
 * output. Q and K are copied as bits, never rounded.
 *
 * Every function carries a target attribute; the callers only reach them when the CPU (and
 * for AMX, the operating system) supports the level.
 */
#ifndef CATTN_BF16_H
#define CATTN_BF16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cattn_cpu.h"

#define CATTN_BF16_PANEL 32   /* keys per packed K panel, columns per register/tile block */
#define CATTN_BF16_ROWS_PAD 32 /* Q and P buffers: rows rounded up to two 16-row tiles */
#define CATTN_BF16_PAIRS_PAD 16 /* pairs per buffer row rounded up to a 64-byte tile row */
#define CATTN_BF16_MR 8        /* register tile of the AVX512-BF16 kernels: 8 rows × 32 */
#define CATTN_BF16_PV_PAIRS 64 /* P·V: key pairs per pass (a 64 × 32 slab of V stays in L1) */

static inline ptrdiff_t cattn_bf16_round_up(ptrdiff_t x, ptrdiff_t m)
{
    return (x + m - 1) / m * m;
}

/* Two work areas per thread (sizes in 32-bit pairs): the queries of a block of rows, loaded
 * once and kept while its key blocks pass; and either the packed keys or P and the packed
 * values of one key block. */
static inline ptrdiff_t cattn_bf16_pairs_ld(ptrdiff_t n)
{
    return cattn_bf16_round_up((n + 1) / 2, CATTN_BF16_PAIRS_PAD);
}

static inline ptrdiff_t cattn_bf16_query_words(ptrdiff_t rows, ptrdiff_t E)
{
    return cattn_bf16_round_up(rows, CATTN_BF16_ROWS_PAD) * cattn_bf16_pairs_ld(E);
}

static inline ptrdiff_t cattn_bf16_key_words(ptrdiff_t n_keys, ptrdiff_t E)
{
    return cattn_bf16_round_up(n_keys, CATTN_BF16_PANEL) * cattn_bf16_pairs_ld(E);
}

static inline ptrdiff_t cattn_bf16_pv_words(ptrdiff_t rows, ptrdiff_t n_keys, ptrdiff_t Ev)
{
    const ptrdiff_t ldp = cattn_bf16_pairs_ld(n_keys);
    return cattn_bf16_round_up(rows, CATTN_BF16_ROWS_PAD) * ldp +
           ldp * cattn_bf16_round_up(Ev, CATTN_BF16_PANEL);
}

/* Bytes of each work area for blocks of up to block_q rows × block_k keys (with room to
 * align them to 64 bytes). */
static inline size_t cattn_bf16_queries_bytes(ptrdiff_t block_q, ptrdiff_t E)
{
    return (size_t)cattn_bf16_query_words(block_q, E) * 4 + 64;
}

static inline size_t cattn_bf16_work_bytes(ptrdiff_t block_q, ptrdiff_t block_k, ptrdiff_t E,
                                           ptrdiff_t Ev)
{
    const ptrdiff_t k = cattn_bf16_key_words(block_k, E);
    const ptrdiff_t pv = cattn_bf16_pv_words(block_q, block_k, Ev);
    return (size_t)(k > pv ? k : pv) * 4 + 64;
}

/* Whether a level computes bf16 products natively. */
static inline int cattn_isa_has_bf16_products(int isa)
{
    return isa == CATTN_ISA_AVX512_BF16 || isa == CATTN_ISA_AMX;
}

#if CATTN_HAVE_X86_PATHS

#if CATTN_ISA_EMULATED /* the instructions below are cattn_emulate.h's, on AVX-512 */
#define CATTN_BF16_TGT CATTN_EMU_TGT
#define CATTN_AMX_TGT CATTN_EMU_TGT
#else
#define CATTN_BF16_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#define CATTN_AMX_TGT \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")))
#endif

static inline __mmask32 cattn_mask32(ptrdiff_t n)
{
    return n <= 0 ? 0 : n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
}

static inline uint32_t *cattn_bf16_align64(void *p)
{
    return (uint32_t *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

/* ---- operands into pairs */

/* dst[r][0:ld] = the bf16 row x[r][0:n] as pairs (zeros past n), rows [rows, rows_pad)
 * all zero. x_f32 says x holds float32 values that are bf16 exactly (their upper halves). */
CATTN_BF16_TGT static void cattn_bf16_rows_to_pairs(ptrdiff_t rows, ptrdiff_t n,
                                                    const void *x, int x_f32, ptrdiff_t x_rs,
                                                    uint32_t *dst, ptrdiff_t ld,
                                                    ptrdiff_t rows_pad)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        uint32_t *d = dst + r * ld;
        for (ptrdiff_t c = 0; c < 2 * ld; c += 32) {
            __m512i w;
            if (x_f32) {
                const float *xr = (const float *)x + r * x_rs + c;
                __m512i lo = _mm512_maskz_loadu_epi32(cattn_mask16(n - c), xr);
                __m512i hi = _mm512_maskz_loadu_epi32(cattn_mask16(n - c - 16), xr + 16);
                __m256i l16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(lo, 16));
                __m256i h16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(hi, 16));
                w = _mm512_inserti64x4(_mm512_castsi256_si512(l16), h16, 1);
            } else {
                w = _mm512_maskz_loadu_epi16(cattn_mask32(n - c),
                                             (const uint16_t *)x + r * x_rs + c);
            }
            _mm512_storeu_si512(d + c / 2, w);
        }
    }
    if (rows_pad > rows) memset(dst + rows * ld, 0, (size_t)((rows_pad - rows) * ld) * 4);
}

/* dst[r][0:ld] = the float32 row p[r][0:n] rounded to bf16 (nearest even), as pairs. */
CATTN_BF16_TGT static void cattn_bf16_round_to_pairs(ptrdiff_t rows, ptrdiff_t n,
                                                     const float *p, ptrdiff_t ldp,
                                                     uint32_t *dst, ptrdiff_t ld,
                                                     ptrdiff_t rows_pad)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *pr = p + r * ldp;
        uint32_t *d = dst + r * ld;
        for (ptrdiff_t c = 0; c < 2 * ld; c += 32) {
            __m512 lo = _mm512_maskz_loadu_ps(cattn_mask16(n - c), pr + c);
            __m512 hi = _mm512_maskz_loadu_ps(cattn_mask16(n - c - 16), pr + c + 16);
            _mm512_storeu_si512(d + c / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
    if (rows_pad > rows) memset(dst + rows * ld, 0, (size_t)((rows_pad - rows) * ld) * 4);
}

/* Keys [0, n_keys) as panels of 32 keys × ldq pairs (keys past n_keys up to the panel's
 * end read zeros), 16 keys × 16 pairs at a time through an in-register transpose of
 * 32-bit lanes. */
CATTN_BF16_TGT static void cattn_bf16_pack_keys(const uint16_t *k, ptrdiff_t k_rs,
                                                ptrdiff_t n_keys, ptrdiff_t E, ptrdiff_t ldq,
                                                uint32_t *packed)
{
    const ptrdiff_t n_pad = cattn_bf16_round_up(n_keys, CATTN_BF16_PANEL);
    for (ptrdiff_t j0 = 0; j0 < n_pad; j0 += 16) {
        uint32_t *panel = packed + (j0 / CATTN_BF16_PANEL) * CATTN_BF16_PANEL * ldq +
                          j0 % CATTN_BF16_PANEL;
        for (ptrdiff_t e0 = 0; e0 < ldq; e0 += 16) {
            const __mmask32 m = cattn_mask32(E - 2 * e0);
            __m512 r[16];
            for (int c = 0; c < 16; c++)
                r[c] = j0 + c < n_keys
                           ? _mm512_castsi512_ps(
                                 _mm512_maskz_loadu_epi16(m, k + (j0 + c) * k_rs + 2 * e0))
                           : _mm512_setzero_ps();
            cattn_transpose16_ps(r);
            for (int e = 0; e < 16; e++)
                _mm512_storeu_ps((float *)(panel + (e0 + e) * CATTN_BF16_PANEL), r[e]);
        }
    }
}

/* Values of keys [0, n_keys) as pairs of keys: out[jp][c] = (v[2jp][c], v[2jp+1][c]) for
 * jp < ldp pairs and c < ldv columns (zeros past n_keys and Ev). */
CATTN_BF16_TGT static void cattn_bf16_pack_values(const uint16_t *v, ptrdiff_t v_rs,
                                                  ptrdiff_t n_keys, ptrdiff_t Ev,
                                                  ptrdiff_t ldp, ptrdiff_t ldv, uint32_t *out)
{
    for (ptrdiff_t jp = 0; jp < ldp; jp++) {
        const ptrdiff_t j = 2 * jp;
        uint32_t *o = out + jp * ldv;
        for (ptrdiff_t c = 0; c < ldv; c += 16) {
            const __mmask16 m = cattn_mask16(Ev - c);
            __m256i a = j < n_keys ? _mm256_maskz_loadu_epi16(m, v + j * v_rs + c)
                                   : _mm256_setzero_si256();
            __m256i b = j + 1 < n_keys ? _mm256_maskz_loadu_epi16(m, v + (j + 1) * v_rs + c)
                                       : _mm256_setzero_si256();
            __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                                        _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
            _mm512_storeu_si512(o + c, w);
        }
    }
}

/* Row tiles of MR rows, then 4, 2, 1 (each height a compile-time constant after inlining). */
#define CATTN_BF16_ROW_TILES(rows, TILE)                                                  \
    do {                                                                                  \
        ptrdiff_t i_ = 0;                                                                 \
        for (; i_ + CATTN_BF16_MR <= (rows); i_ += CATTN_BF16_MR) TILE(CATTN_BF16_MR, i_); \
        if ((rows) - i_ >= 4) { TILE(4, i_); i_ += 4; }                                   \
        if ((rows) - i_ >= 2) { TILE(2, i_); i_ += 2; }                                   \
        if ((rows) - i_ >= 1) TILE(1, i_);                                                \
    } while (0)

/* ---- AVX512-BF16 micro-kernels */

/* acc[r][0:32] += Σ_j a[r][j] · b[j][0:32] for r < MR_, over n_pairs pairs j: a row's pair
 * broadcast against 32 columns of pairs (row stride ldb). */
static inline __attribute__((always_inline)) CATTN_BF16_TGT void
cattn_bf16_tile_products(const int MR_, ptrdiff_t n_pairs, const uint32_t *a, ptrdiff_t lda,
                         const uint32_t *b, ptrdiff_t ldb, __m512 acc[][2])
{
    for (ptrdiff_t j = 0; j < n_pairs; j++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + j * ldb);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + j * ldb + 16);
#pragma GCC unroll 8
        for (int r = 0; r < MR_; r++) {
            const __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[r * lda + j]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
        }
    }
}

/* c[r][0:nc] = alpha · Σ_pairs q[r]·panel for r < MR_, one 32-key panel. */
static inline __attribute__((always_inline)) CATTN_BF16_TGT void
cattn_bf16_qkt_tile(const int MR_, ptrdiff_t n_pairs, float alpha, const uint32_t *q,
                    ptrdiff_t ldq, const uint32_t *panel, float *c, ptrdiff_t ldc,
                    ptrdiff_t nc)
{
    __m512 acc[CATTN_BF16_MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR_; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    cattn_bf16_tile_products(MR_, n_pairs, q, ldq, panel, CATTN_BF16_PANEL, acc);
    const __m512 va = _mm512_set1_ps(alpha);
    const __mmask16 m0 = cattn_mask16(nc), m1 = cattn_mask16(nc - 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR_; r++) {
        _mm512_mask_storeu_ps(c + r * ldc, m0, _mm512_mul_ps(acc[r][0], va));
        _mm512_mask_storeu_ps(c + r * ldc + 16, m1, _mm512_mul_ps(acc[r][1], va));
    }
}

CATTN_BF16_TGT static void cattn_bf16_qkt_avx512(ptrdiff_t rows, ptrdiff_t n_keys,
                                                 ptrdiff_t n_pairs, float alpha,
                                                 const uint32_t *q, ptrdiff_t ldq,
                                                 const uint32_t *packed, float *c,
                                                 ptrdiff_t ldc)
{
#define QKT_TILE(R, i)                                                                    \
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += CATTN_BF16_PANEL)                           \
        cattn_bf16_qkt_tile(R, n_pairs, alpha, q + (i) * ldq, ldq, packed + j0 * ldq,     \
                            c + (i) * ldc + j0, ldc, n_keys - j0);
    CATTN_BF16_ROW_TILES(rows, QKT_TILE);
#undef QKT_TILE
}

/* acc[r][0:nc] += Σ_key-pairs p[r]·vp for r < MR_, one 32-column slab of V. */
static inline __attribute__((always_inline)) CATTN_BF16_TGT void
cattn_bf16_pv_tile(const int MR_, ptrdiff_t n_pairs, const uint32_t *p, ptrdiff_t ldp,
                   const uint32_t *vp, ptrdiff_t ldv, float *acc, ptrdiff_t ld_acc,
                   ptrdiff_t nc)
{
    const __mmask16 m0 = cattn_mask16(nc), m1 = cattn_mask16(nc - 16);
    __m512 c[CATTN_BF16_MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR_; r++) {
        c[r][0] = _mm512_maskz_loadu_ps(m0, acc + r * ld_acc);
        c[r][1] = _mm512_maskz_loadu_ps(m1, acc + r * ld_acc + 16);
    }
    cattn_bf16_tile_products(MR_, n_pairs, p, ldp, vp, ldv, c);
#pragma GCC unroll 8
    for (int r = 0; r < MR_; r++) {
        _mm512_mask_storeu_ps(acc + r * ld_acc, m0, c[r][0]);
        _mm512_mask_storeu_ps(acc + r * ld_acc + 16, m1, c[r][1]);
    }
}

CATTN_BF16_TGT static void cattn_bf16_pv_avx512(ptrdiff_t rows, ptrdiff_t Ev,
                                                ptrdiff_t n_pairs, const uint32_t *p,
                                                ptrdiff_t ldp, const uint32_t *vp,
                                                ptrdiff_t ldv, float *acc, ptrdiff_t ld_acc)
{
    for (ptrdiff_t j0 = 0; j0 < n_pairs; j0 += CATTN_BF16_PV_PAIRS) {
        const ptrdiff_t kc = n_pairs - j0 < CATTN_BF16_PV_PAIRS ? n_pairs - j0
                                                                : CATTN_BF16_PV_PAIRS;
        for (ptrdiff_t c0 = 0; c0 < Ev; c0 += CATTN_BF16_PANEL) {
#define PV_TILE(R, i)                                                                     \
    cattn_bf16_pv_tile(R, kc, p + (i) * ldp + j0, ldp, vp + j0 * ldv + c0, ldv,           \
                       acc + (i) * ld_acc + c0, ld_acc, Ev - c0)
            CATTN_BF16_ROW_TILES(rows, PV_TILE);
#undef PV_TILE
        }
    }
}

/* ---- AMX-BF16 tiles: tmm0-3 a 32 × 32 block of float results (two row tiles × two
 * column tiles), tmm4-5 two row tiles of the left operand, tmm6-7 two column tiles of the
 * right operand; every tile 16 rows × 64 bytes. Configured at the start of each block
 * product and released at its end, so no tile state outlives a call on the thread. */

/* The 32 × 32 result block in tmm0-3 set to zero. */
#define CATTN_AMX_ZERO_RESULT()                                                           \
    do {                                                                                  \
        _tile_zero(0);                                                                    \
        _tile_zero(1);                                                                    \
        _tile_zero(2);                                                                    \
        _tile_zero(3);                                                                    \
    } while (0)

/* The 32 × 32 result block from tmm0-3 into buf (row stride 32 floats). */
#define CATTN_AMX_STORE_RESULT(buf)                                                       \
    do {                                                                                  \
        _tile_stored(0, (buf), 128);                                                      \
        _tile_stored(1, (buf) + 16, 128);                                                 \
        _tile_stored(2, (buf) + 16 * 32, 128);                                            \
        _tile_stored(3, (buf) + 16 * 32 + 16, 128);                                       \
    } while (0)

/* Two row tiles of the left operand (tmm4-5: rows [0, 16) and [16, 32) of a, row stride
 * lda pairs, from pair e0) and two column tiles of the right one (tmm6-7: 16 + 16 columns
 * of b, row stride ldb words). */
#define CATTN_AMX_LOAD_ROWS(a, lda, e0)                                                   \
    do {                                                                                  \
        _tile_loadd(4, (a) + (e0), (lda) * 4);                                            \
        _tile_loadd(5, (a) + 16 * (lda) + (e0), (lda) * 4);                               \
    } while (0)
#define CATTN_AMX_LOAD_COLUMNS(b, ldb)                                                    \
    do {                                                                                  \
        _tile_loadd(6, (b), (ldb) * 4);                                                   \
        _tile_loadd(7, (b) + 16, (ldb) * 4);                                              \
    } while (0)

#define CATTN_AMX_PRODUCTS()                                                              \
    do {                                                                                  \
        _tile_dpbf16ps(0, 4, 6);                                                          \
        _tile_dpbf16ps(1, 4, 7);                                                          \
        _tile_dpbf16ps(2, 5, 6);                                                          \
        _tile_dpbf16ps(3, 5, 7);                                                          \
    } while (0)

/* dst[r][0:nc] = buf[r] · scale + (add0, add1) for r < nr: a 32 × 32 result block (row
 * stride 32 in buf) written out, columns past nc left alone. */
static inline __attribute__((always_inline)) CATTN_AMX_TGT void
cattn_amx_write_block(const float *buf, ptrdiff_t nr, ptrdiff_t nc, __m512 scale,
                      __m512 add0, __m512 add1, float *dst, ptrdiff_t ldd)
{
    const __mmask16 m0 = cattn_mask16(nc), m1 = cattn_mask16(nc - 16);
    for (ptrdiff_t r = 0; r < nr; r++) {
        _mm512_mask_storeu_ps(dst + r * ldd, m0,
                              _mm512_fmadd_ps(_mm512_load_ps(buf + r * 32), scale, add0));
        _mm512_mask_storeu_ps(dst + r * ldd + 16, m1,
                              _mm512_fmadd_ps(_mm512_load_ps(buf + r * 32 + 16), scale, add1));
    }
}

/* c = alpha · Q·Kᵀ: q has rows rounded up to 32 (zeros), ldq pairs a multiple of 16. */
CATTN_AMX_TGT static void cattn_bf16_qkt_amx(ptrdiff_t rows, ptrdiff_t n_keys, float alpha,
                                             const uint32_t *q, ptrdiff_t ldq,
                                             const uint32_t *packed, float *c, ptrdiff_t ldc)
{
    float buf[32 * 32] __attribute__((aligned(64)));
    const __m512 va = _mm512_set1_ps(alpha);
    cattn_amx_configure();
    for (ptrdiff_t i0 = 0; i0 < rows; i0 += 32) {
        const uint32_t *q0 = q + i0 * ldq;
        const ptrdiff_t nr = rows - i0 < 32 ? rows - i0 : 32;
        for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += CATTN_BF16_PANEL) {
            const uint32_t *panel = packed + j0 * ldq;
            CATTN_AMX_ZERO_RESULT();
            for (ptrdiff_t e0 = 0; e0 < ldq; e0 += 16) {
                CATTN_AMX_LOAD_ROWS(q0, ldq, e0);
                CATTN_AMX_LOAD_COLUMNS(panel + e0 * CATTN_BF16_PANEL, CATTN_BF16_PANEL);
                CATTN_AMX_PRODUCTS();
            }
            CATTN_AMX_STORE_RESULT(buf);
            cattn_amx_write_block(buf, nr, n_keys - j0, va, _mm512_setzero_ps(),
                                  _mm512_setzero_ps(), c + i0 * ldc + j0, ldc);
        }
    }
    _tile_release();
}

/* acc += P·V: p has rows rounded up to 32 (zeros) and ldp pairs (a multiple of 16), vp
 * ldp pairs of keys × ldv columns (a multiple of 32). */
CATTN_AMX_TGT static void cattn_bf16_pv_amx(ptrdiff_t rows, ptrdiff_t Ev, const uint32_t *p,
                                            ptrdiff_t ldp, const uint32_t *vp, ptrdiff_t ldv,
                                            float *acc, ptrdiff_t ld_acc)
{
    float buf[32 * 32] __attribute__((aligned(64)));
    cattn_amx_configure();
    for (ptrdiff_t i0 = 0; i0 < rows; i0 += 32) {
        const uint32_t *p0 = p + i0 * ldp;
        const ptrdiff_t nr = rows - i0 < 32 ? rows - i0 : 32;
        for (ptrdiff_t c0 = 0; c0 < Ev; c0 += CATTN_BF16_PANEL) {
            const ptrdiff_t nc = Ev - c0;
            const __mmask16 m0 = cattn_mask16(nc), m1 = cattn_mask16(nc - 16);
            float *ar = acc + i0 * ld_acc + c0;
            for (ptrdiff_t r = 0; r < 32; r++) {
                __m512 x0 = _mm512_setzero_ps(), x1 = x0;
                if (r < nr) {
                    x0 = _mm512_maskz_loadu_ps(m0, ar + r * ld_acc);
                    x1 = _mm512_maskz_loadu_ps(m1, ar + r * ld_acc + 16);
                }
                _mm512_store_ps(buf + r * 32, x0);
                _mm512_store_ps(buf + r * 32 + 16, x1);
            }
            _tile_loadd(0, buf, 128);
            _tile_loadd(1, buf + 16, 128);
            _tile_loadd(2, buf + 16 * 32, 128);
            _tile_loadd(3, buf + 16 * 32 + 16, 128);
            for (ptrdiff_t j0 = 0; j0 < ldp; j0 += 16) {
                CATTN_AMX_LOAD_ROWS(p0, ldp, j0);
                CATTN_AMX_LOAD_COLUMNS(vp + j0 * ldv + c0, ldv);
                CATTN_AMX_PRODUCTS();
            }
            CATTN_AMX_STORE_RESULT(buf);
            cattn_amx_write_block(buf, nr, nc, _mm512_set1_ps(1.0f), _mm512_setzero_ps(),
                                  _mm512_setzero_ps(), ar, ld_acc);
        }
    }
    _tile_release();
}

/* ---- Float32 linear layers from split bfloat16 products (float32 matmul precision
 * "high", as PyTorch names it): each float32 x is x_hi + x_lo + r with x_hi the nearest
 * bf16 to x and x_lo the nearest bf16 to x - x_hi (exact in float32), so |r| <= 2^-16 |x|,
 * and a·w is taken as a_hi·w_hi + a_hi·w_lo + a_lo·w_hi: three AMX products (16 times the
 * float32 FMA rate each) for one, with an error of at most about 3·2^-16·|a|·|w| per
 * product (float32: 2^-24) plus float32 sums.
 *
 * The weight (n_out, K) is split and packed once by cattn._encoder_ops.pack_linear_weight:
 * hi then lo, each n_panels panels of 32 outputs × ldq pairs (the key-panel layout above,
 * zeros past n_out and K). The inputs are split here, CATTN_SPLIT_MC rows at a time, into a
 * work area that stays in L2 while every panel of the weight passes over it. */

#define CATTN_SPLIT_MC 128

/* Bytes of the work area cattn_linear_split_bf16 needs for K inputs. */
static inline size_t cattn_split_work_bytes(ptrdiff_t K)
{
    return (size_t)CATTN_SPLIT_MC * 2 * (size_t)cattn_bf16_pairs_ld(K) * 4 + 64;
}

/* hi[r] and lo[r] (ld pairs each) = the split of the float32 row x[r][0:n] (zeros past n);
 * rows [rows, rows_pad) all zero. */
CATTN_BF16_TGT static void cattn_split_rows_to_pairs(ptrdiff_t rows, ptrdiff_t n,
                                                     const float *x, ptrdiff_t x_rs,
                                                     uint32_t *hi, uint32_t *lo, ptrdiff_t ld,
                                                     ptrdiff_t rows_pad)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_rs;
        for (ptrdiff_t c = 0; c < 2 * ld; c += 32) {
            const __m512 x0 = _mm512_maskz_loadu_ps(cattn_mask16(n - c), xr + c);
            const __m512 x1 = _mm512_maskz_loadu_ps(cattn_mask16(n - c - 16), xr + c + 16);
            const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
            /* a bf16 back to float32: its bits in the upper half */
            const __m512 h0 = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
            const __m512 h1 = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
            const __m512i l = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1),
                                                           _mm512_sub_ps(x0, h0));
            _mm512_storeu_si512(hi + r * ld + c / 2, h);
            _mm512_storeu_si512(lo + r * ld + c / 2, l);
        }
    }
    if (rows_pad > rows) {
        memset(hi + rows * ld, 0, (size_t)((rows_pad - rows) * ld) * 4);
        memset(lo + rows * ld, 0, (size_t)((rows_pad - rows) * ld) * 4);
    }
}

/* c[rows, n_out] = a[rows, K] · Wᵀ + bias (bias may be NULL), W split and packed (above). */
CATTN_AMX_TGT static void cattn_linear_split_amx(ptrdiff_t rows, ptrdiff_t n_out, ptrdiff_t K,
                                                 const float *a, ptrdiff_t lda,
                                                 const uint32_t *packed, const float *bias,
                                                 float *c, ptrdiff_t ldc, void *work)
{
    float buf[32 * 32] __attribute__((aligned(64)));
    const ptrdiff_t ldq = cattn_bf16_pairs_ld(K);
    const ptrdiff_t n_pad = cattn_bf16_round_up(n_out, CATTN_BF16_PANEL);
    const uint32_t *w_hi = packed, *w_lo = packed + n_pad * ldq;
    uint32_t *a_hi = cattn_bf16_align64(work), *a_lo = a_hi + CATTN_SPLIT_MC * ldq;
    cattn_amx_configure();
    for (ptrdiff_t i0 = 0; i0 < rows; i0 += CATTN_SPLIT_MC) {
        const ptrdiff_t mc = rows - i0 < CATTN_SPLIT_MC ? rows - i0 : CATTN_SPLIT_MC;
        cattn_split_rows_to_pairs(mc, K, a + i0 * lda, lda, a_hi, a_lo, ldq,
                                  cattn_bf16_round_up(mc, CATTN_BF16_ROWS_PAD));
        for (ptrdiff_t j0 = 0; j0 < n_out; j0 += CATTN_BF16_PANEL) {
            const uint32_t *ph = w_hi + j0 * ldq, *pl = w_lo + j0 * ldq;
            const ptrdiff_t nc = n_out - j0;
            const __m512 b0 = bias ? _mm512_maskz_loadu_ps(cattn_mask16(nc), bias + j0)
                                   : _mm512_setzero_ps();
            const __m512 b1 = bias ? _mm512_maskz_loadu_ps(cattn_mask16(nc - 16), bias + j0 + 16)
                                   : _mm512_setzero_ps();
            for (ptrdiff_t r0 = 0; r0 < mc; r0 += 32) {
                const uint32_t *h0 = a_hi + r0 * ldq, *l0 = a_lo + r0 * ldq;
                CATTN_AMX_ZERO_RESULT();
                for (ptrdiff_t e0 = 0; e0 < ldq; e0 += 16) {
                    CATTN_AMX_LOAD_ROWS(h0, ldq, e0);
                    CATTN_AMX_LOAD_COLUMNS(ph + e0 * CATTN_BF16_PANEL, CATTN_BF16_PANEL);
                    CATTN_AMX_PRODUCTS(); /* a_hi · w_hi */
                    CATTN_AMX_LOAD_COLUMNS(pl + e0 * CATTN_BF16_PANEL, CATTN_BF16_PANEL);
                    CATTN_AMX_PRODUCTS(); /* a_hi · w_lo */
                    CATTN_AMX_LOAD_ROWS(l0, ldq, e0);
                    CATTN_AMX_LOAD_COLUMNS(ph + e0 * CATTN_BF16_PANEL, CATTN_BF16_PANEL);
                    CATTN_AMX_PRODUCTS(); /* a_lo · w_hi */
                }
                CATTN_AMX_STORE_RESULT(buf);
                cattn_amx_write_block(buf, mc - r0 < 32 ? mc - r0 : 32, nc,
                                      _mm512_set1_ps(1.0f), b0, b1,
                                      c + (i0 + r0) * ldc + j0, ldc);
            }
        }
    }
    _tile_release();
}

/* The entry point (AMX level only; callers check); work: cattn_split_work_bytes(K) bytes. */
static inline void cattn_linear_split_bf16(ptrdiff_t rows, ptrdiff_t n_out, ptrdiff_t K,
                                           const float *a, ptrdiff_t lda,
                                           const uint32_t *packed, const float *bias,
                                           float *c, ptrdiff_t ldc, void *work)
{
    cattn_linear_split_amx(rows, n_out, K, a, lda, packed, bias, c, ldc, work);
}

/* Blocks of at least this many rows use the tiles on the AMX level (a tile holds 16). */
#define CATTN_AMX_MIN_ROWS 16

/* ---- entry points */

/* The queries of a block of rows into their work area, for every cattn_bf16_qkt of the
 * block: Q (bf16, or float32 holding bf16 values when q_f32) with row stride q_rs. */
static inline void cattn_bf16_load_queries(ptrdiff_t rows, ptrdiff_t E, const void *q,
                                           int q_f32, ptrdiff_t q_rs, void *queries)
{
    cattn_bf16_rows_to_pairs(rows, E, q, q_f32, q_rs, cattn_bf16_align64(queries),
                             cattn_bf16_pairs_ld(E),
                             cattn_bf16_round_up(rows, CATTN_BF16_ROWS_PAD));
}

/* c[rows, n_keys] (row stride ldc) = alpha · Q·Kᵀ, Q the rows loaded by
 * cattn_bf16_load_queries, K bf16 with row stride k_rs in elements. */
static inline void cattn_bf16_qkt(int isa, ptrdiff_t rows, ptrdiff_t n_keys, ptrdiff_t E,
                                  float alpha, const uint16_t *k, ptrdiff_t k_rs, float *c,
                                  ptrdiff_t ldc, void *queries, void *work)
{
    const ptrdiff_t ldq = cattn_bf16_pairs_ld(E);
    const uint32_t *qp = cattn_bf16_align64(queries);
    uint32_t *kp = cattn_bf16_align64(work);
    cattn_bf16_pack_keys(k, k_rs, n_keys, E, ldq, kp);
    if (isa == CATTN_ISA_AMX && rows >= CATTN_AMX_MIN_ROWS)
        cattn_bf16_qkt_amx(rows, n_keys, alpha, qp, ldq, kp, c, ldc);
    else
        cattn_bf16_qkt_avx512(rows, n_keys, (E + 1) / 2, alpha, qp, ldq, kp, c, ldc);
}

/* acc[rows, Ev] (row stride ld_acc) += P·V, P float32 (row stride ldp) rounded to bf16,
 * V bf16 (row stride v_rs). */
static inline void cattn_bf16_pv(int isa, ptrdiff_t rows, ptrdiff_t Ev, ptrdiff_t n_keys,
                          const float *p, ptrdiff_t ldp, const uint16_t *v, ptrdiff_t v_rs,
                          float *acc, ptrdiff_t ld_acc, void *work)
{
    const ptrdiff_t ldpp = cattn_bf16_pairs_ld(n_keys);
    const ptrdiff_t ldv = cattn_bf16_round_up(Ev, CATTN_BF16_PANEL);
    const ptrdiff_t rows_pad = cattn_bf16_round_up(rows, CATTN_BF16_ROWS_PAD);
    uint32_t *pp = cattn_bf16_align64(work), *vp = pp + rows_pad * ldpp;
    cattn_bf16_round_to_pairs(rows, n_keys, p, ldp, pp, ldpp, rows_pad);
    cattn_bf16_pack_values(v, v_rs, n_keys, Ev, ldpp, ldv, vp);
    if (isa == CATTN_ISA_AMX && rows >= CATTN_AMX_MIN_ROWS)
        cattn_bf16_pv_amx(rows, Ev, pp, ldpp, vp, ldv, acc, ld_acc);
    else
        cattn_bf16_pv_avx512(rows, Ev, (n_keys + 1) / 2, pp, ldpp, vp, ldv, acc, ld_acc);
}

#undef CATTN_BF16_ROW_TILES

#else /* no x86 paths: the levels are never supported, so these are never called */

static inline void cattn_bf16_load_queries(ptrdiff_t rows, ptrdiff_t E, const void *q,
                                           int q_f32, ptrdiff_t q_rs, void *queries)
{
    (void)rows, (void)E, (void)q, (void)q_f32, (void)q_rs, (void)queries;
}

static inline void cattn_bf16_qkt(int isa, ptrdiff_t rows, ptrdiff_t n_keys, ptrdiff_t E,
                                  float alpha, const uint16_t *k, ptrdiff_t k_rs, float *c,
                                  ptrdiff_t ldc, void *queries, void *work)
{
    (void)isa, (void)rows, (void)n_keys, (void)E, (void)alpha, (void)k, (void)k_rs, (void)c;
    (void)ldc, (void)queries, (void)work;
}

static inline void cattn_bf16_pv(int isa, ptrdiff_t rows, ptrdiff_t Ev, ptrdiff_t n_keys,
                          const float *p, ptrdiff_t ldp, const uint16_t *v, ptrdiff_t v_rs,
                          float *acc, ptrdiff_t ld_acc, void *work)
{
    (void)isa, (void)rows, (void)Ev, (void)n_keys, (void)p, (void)ldp, (void)v, (void)v_rs;
    (void)acc, (void)ld_acc, (void)work;
}

static inline size_t cattn_split_work_bytes(ptrdiff_t K)
{
    return (size_t)K;
}

static inline void cattn_linear_split_bf16(ptrdiff_t rows, ptrdiff_t n_out, ptrdiff_t K,
                                           const float *a, ptrdiff_t lda,
                                           const uint32_t *packed, const float *bias,
                                           float *c, ptrdiff_t ldc, void *work)
{
    (void)rows, (void)n_out, (void)K, (void)a, (void)lda, (void)packed, (void)bias, (void)c;
    (void)ldc, (void)work;
}

#endif /* CATTN_HAVE_X86_PATHS */

#endif /* CATTN_BF16_H */

/*
 * int8 linear layers: out = x · Wᵀ + bias with W quantized once (symmetric int8, one scale
 * per output) and each row of x quantized at run time (asymmetric uint8, one scale and
 * zero point per row), int8 products summed exactly in int32:
 *
 *   acc[r, n] = Σ_k qx[r, k] · qw[n, k]                      (uint8 × int8, int32)
 *   out[r, n] = (acc[r, n] - zp[r] · Σ_k qw[n, k]) · sx[r] · sw[n] + bias[n]
 *
 * The zero point is taken out through the weight's column sums, so the products are the
 * uint8 × int8 form of vpdpbusd. Paths, chosen at run time (cattn_i8_supported):
 *
 *   CATTN_I8_AMX          AMX-INT8 tiles (tdpbusd: 16 × 16 sums from 16 × 64 bytes by
 *                         16 groups × 16 outputs), blocks of 32 rows × 32 outputs, for
 *                         blocks of 16 rows or more; fewer rows take the AVX512-VNNI tiles
 *   CATTN_I8_AVX512_VNNI  vpdpbusd on 16 int32 lanes, tiles of 6 rows × 64 outputs
 *   CATTN_I8_AVX_VNNI     the VEX vpdpbusd on 8 lanes (Alder Lake and later without AVX-512)
 *   CATTN_I8_AVX2         vpdpbusd emulated exactly: bytes widened to 16 bits, vpmaddwd
 *                         (vpmaddubsw would saturate 2 · 255 · 127)
 *   CATTN_I8_PORTABLE     plain C, any CPU
 *
 * Every path gives the same int32 sums bit for bit, and the same quantized rows (x · 1/sx
 * rounded to nearest even, as rintf and vcvtps2dq under the default rounding mode).
 *
 * Weight layout ("packed"): panels of 16 outputs, each a run of groups of 4 inputs, each
 * group 16 outputs × 4 consecutive inputs (64 bytes: the operand of one vpdpbusd):
 *   packed[(panel · k_groups + g) · 64 + j · 4 + t] = qw[panel · 16 + j, g · 4 + t]
 * zeros past n_out and past n_in. Quantized rows hold k_groups · 4 bytes, zeros past n_in.
 */
#ifndef CATTN_INT8_GEMM_H
#define CATTN_INT8_GEMM_H

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cattn_cpu.h"

enum { CATTN_I8_PORTABLE = 0, CATTN_I8_AVX2 = 1, CATTN_I8_AVX_VNNI = 2,
       CATTN_I8_AVX512_VNNI = 3, CATTN_I8_AMX = 4 };

#define CATTN_I8_PANEL 16

/* A quantized weight as the layers hold it: packed levels, their sum and scale per output,
 * and the path the weight's products take. */
typedef struct {
    const int8_t *packed;
    const int32_t *col_sums;
    const float *scale;
    int path;
} cattn_i8_weight;
/* Rows quantized at a time: their bytes and a 64-output slice of the weight stay in the
 * caches while every tile of the slice is computed. */
#define CATTN_I8_ROW_BLOCK 96

typedef ptrdiff_t i8_size;

#if CATTN_HAVE_X86_PATHS
#define CATTN_I8_HAVE_X86 1
#define CATTN_I8_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CATTN_I8_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vnni")))
/* the VEX form of vpdpbusd needs GCC 11 or clang 12 */
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define CATTN_I8_HAVE_AVX_VNNI 1
#if CATTN_ISA_EMULATED /* the VEX vpdpbusd as AVX512-VNNI's (cattn_emulate.h) */
#define CATTN_I8_TARGET_AVX_VNNI \
    __attribute__((target("avx2,fma,avx512f,avx512vl,avx512vnni")))
#else
#define CATTN_I8_TARGET_AVX_VNNI __attribute__((target("avx2,fma,avxvnni")))
#endif
#else
#define CATTN_I8_HAVE_AVX_VNNI 0
#endif
/* the AMX-INT8 intrinsics need GCC 11 or clang 12 as well */
#define CATTN_I8_HAVE_AMX CATTN_I8_HAVE_AVX_VNNI
#if CATTN_ISA_EMULATED /* tdpbusd and the tile state in software (cattn_emulate.h) */
#define CATTN_I8_TARGET_AMX CATTN_EMU_TGT
#else
#define CATTN_I8_TARGET_AMX __attribute__((target("avx2,fma,avx512f,amx-tile,amx-int8")))
#endif
#else
#define CATTN_I8_HAVE_X86 0
#define CATTN_I8_HAVE_AVX_VNNI 0
#define CATTN_I8_HAVE_AMX 0
#endif

#define I8_INLINE static inline __attribute__((always_inline))

/* The best int8 path of this CPU (and operating system, for the wide registers). */
static int cattn_i8_supported(void)
{
#if CATTN_I8_HAVE_X86
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return CATTN_I8_PORTABLE;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni")) {
#if CATTN_I8_HAVE_AMX
        if (CATTN_ISA_EMULATED ? __builtin_cpu_supports("avx512bw") &&
                                     __builtin_cpu_supports("avx512vl") &&
                                     __builtin_cpu_supports("avx512dq")
                               : cattn_os_grants_tiles(CATTN_AMX_INT8_BIT))
            return CATTN_I8_AMX;
#endif
        return CATTN_I8_AVX512_VNNI;
    }
#if CATTN_I8_HAVE_AVX_VNNI && !CATTN_ISA_EMULATED /* (emulated, it needs AVX512-VNNI) */
    /* AVX-VNNI: CPUID leaf 7 subleaf 1, EAX bit 4 (a VEX encoding: AVX2's OS support) */
    if (__get_cpuid_max(0, 0) >= 7) {
        __cpuid_count(7, 1, a, b, c, d);
        if ((a >> 4) & 1) return CATTN_I8_AVX_VNNI;
    }
#endif
    (void)a; (void)b; (void)c; (void)d;
    return CATTN_I8_AVX2;
#else
    return CATTN_I8_PORTABLE;
#endif
}

/* ---- Quantizing rows ------------------------------------------------------------------ */

/* Scale, its inverse and zero point of a row whose values span [lo, hi] (lo <= 0 <= hi,
 * so zero is exact). A row of zeros (or of a range too small to divide) quantizes to
 * zeros with scale 0. */
I8_INLINE void i8_row_params(float lo, float hi, float *scale, float *inv, int32_t *zp)
{
    float s = (hi - lo) / 255.0f;
    if (!(s >= FLT_MIN) || !(s <= FLT_MAX)) {
        *scale = 0.0f; *inv = 0.0f; *zp = 0;
        return;
    }
    *scale = s;
    *inv = 1.0f / s;
    float z = rintf(-lo * *inv);
    *zp = z < 0.0f ? 0 : z > 255.0f ? 255 : (int32_t)z;
}

I8_INLINE uint8_t i8_quantize_value(float x, float inv, int32_t zp)
{
    int32_t q = (int32_t)rintf(x * inv) + zp;
    return (uint8_t)(q < 0 ? 0 : q > 255 ? 255 : q);
}

static void i8_quantize_row_portable(const float *x, i8_size K, i8_size Kp, uint8_t *q,
                                     float *scale, int32_t *zp)
{
    float lo = 0.0f, hi = 0.0f, inv;
    for (i8_size k = 0; k < K; k++) {
        lo = x[k] < lo ? x[k] : lo;
        hi = x[k] > hi ? x[k] : hi;
    }
    i8_row_params(lo, hi, scale, &inv, zp);
    for (i8_size k = 0; k < K; k++) q[k] = i8_quantize_value(x[k], inv, *zp);
    for (i8_size k = K; k < Kp; k++) q[k] = 0;
}

#if CATTN_I8_HAVE_X86
CATTN_I8_TARGET_AVX2 static void i8_quantize_row_avx2(const float *x, i8_size K, i8_size Kp,
                                                      uint8_t *q, float *scale, int32_t *zp)
{
    __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
    i8_size k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
    }
    float los[8], his[8], lo = 0.0f, hi = 0.0f, inv;
    _mm256_storeu_ps(los, vlo);
    _mm256_storeu_ps(his, vhi);
    for (int i = 0; i < 8; i++) {
        lo = los[i] < lo ? los[i] : lo;
        hi = his[i] > hi ? his[i] : hi;
    }
    for (; k < K; k++) {
        lo = x[k] < lo ? x[k] : lo;
        hi = x[k] > hi ? x[k] : hi;
    }
    i8_row_params(lo, hi, scale, &inv, zp);
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i vzp = _mm256_set1_epi32(*zp), zero = _mm256_setzero_si256();
    const __m256i top = _mm256_set1_epi32(255);
    for (k = 0; k + 8 <= K; k += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
        v = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(v, vzp), zero), top);
        __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(v, v), zero);
        int32_t lo4 = _mm_cvtsi128_si32(_mm256_castsi256_si128(w));
        int32_t hi4 = _mm_cvtsi128_si32(_mm256_extracti128_si256(w, 1));
        memcpy(q + k, &lo4, 4);
        memcpy(q + k + 4, &hi4, 4);
    }
    for (; k < K; k++) q[k] = i8_quantize_value(x[k], inv, *zp);
    for (k = K; k < Kp; k++) q[k] = 0;
}

CATTN_I8_TARGET_AVX512 static void i8_quantize_row_avx512(const float *x, i8_size K,
                                                          i8_size Kp, uint8_t *q,
                                                          float *scale, int32_t *zp)
{
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    i8_size k;
    for (k = 0; k < K; k += 16) {
        /* the masked lanes read as 0, inside the range anyway */
        __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(m, x + k);
        vlo = _mm512_min_ps(vlo, v);
        vhi = _mm512_max_ps(vhi, v);
    }
    float inv;
    i8_row_params(_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi), scale, &inv, zp);
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i vzp = _mm512_set1_epi32(*zp), zero = _mm512_setzero_si512();
    const __m512i top = _mm512_set1_epi32(255);
    for (k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv));
        v = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(v, vzp), zero), top);
        _mm512_mask_cvtepi32_storeu_epi8(q + k, m, v);
    }
    for (k = K; k < Kp; k++) q[k] = 0;
}
#endif

/* Rows of x (rows × K, row stride ldx) quantized into q (row stride ldq >= Kp, the input
 * count rounded up to 4), with each row's scale and zero point. */
static void cattn_i8_quantize_rows(int path, i8_size rows, i8_size K, const float *x,
                                   i8_size ldx, uint8_t *q, i8_size ldq, float *scale,
                                   int32_t *zp)
{
    i8_size Kp = (K + 3) / 4 * 4;
    for (i8_size r = 0; r < rows; r++) {
#if CATTN_I8_HAVE_X86
        if (path >= CATTN_I8_AVX512_VNNI) {
            i8_quantize_row_avx512(x + r * ldx, K, Kp, q + r * ldq, scale + r, zp + r);
            continue;
        }
        if (path != CATTN_I8_PORTABLE) {
            i8_quantize_row_avx2(x + r * ldx, K, Kp, q + r * ldq, scale + r, zp + r);
            continue;
        }
#endif
        i8_quantize_row_portable(x + r * ldx, K, Kp, q + r * ldq, scale + r, zp + r);
    }
}

/* ---- The way out: raw sums, or dequantized with the bias ------------------------------ */

typedef struct {
    const int32_t *col_sums;   /* NULL: write the raw int32 sums to out */
    const float *w_scale, *bias; /* bias may be NULL */
    const float *row_scale;
    const int32_t *zp;
    void *out;
    i8_size ldo;
} i8_epilogue;

/* tile: `mr` rows of `ld` int32 sums, for outputs [n0, n0 + cols) and rows [r0, r0 + mr) */
I8_INLINE void i8_write_tile(const i8_epilogue *e, const int32_t *tile, i8_size ld, int mr,
                             i8_size r0, i8_size n0, i8_size cols)
{
    for (int r = 0; r < mr; r++) {
        const int32_t *t = tile + r * ld;
        if (!e->col_sums) {
            memcpy((int32_t *)e->out + (r0 + r) * e->ldo + n0, t, (size_t)cols * 4);
            continue;
        }
        float *o = (float *)e->out + (r0 + r) * e->ldo + n0;
        const int32_t zp = e->zp[r0 + r], *cs = e->col_sums + n0;
        const float rs = e->row_scale[r0 + r], *ws = e->w_scale + n0;
        if (e->bias) {
            const float *b = e->bias + n0;
            for (i8_size j = 0; j < cols; j++)
                o[j] = (float)(t[j] - zp * cs[j]) * (rs * ws[j]) + b[j];
        } else {
            for (i8_size j = 0; j < cols; j++)
                o[j] = (float)(t[j] - zp * cs[j]) * (rs * ws[j]);
        }
    }
}

/* ---- Block products ------------------------------------------------------------------- */

/* Each path: rows × N sums of quantized rows a (row stride lda) with the packed weight,
 * k_groups groups of 4 inputs, written through the epilogue. */

static void i8_gemm_portable(i8_size rows, i8_size N, i8_size kg, const uint8_t *a,
                             i8_size lda, const int8_t *packed, const i8_epilogue *e)
{
    int32_t tile[CATTN_I8_PANEL];
    for (i8_size p = 0; p * CATTN_I8_PANEL < N; p++) {
        const int8_t *w = packed + p * kg * 64;
        i8_size cols = N - p * CATTN_I8_PANEL < CATTN_I8_PANEL ? N - p * CATTN_I8_PANEL
                                                               : CATTN_I8_PANEL;
        for (i8_size r = 0; r < rows; r++) {
            const uint8_t *x = a + r * lda;
            for (int j = 0; j < CATTN_I8_PANEL; j++) tile[j] = 0;
            for (i8_size g = 0; g < kg; g++)
                for (int j = 0; j < CATTN_I8_PANEL; j++)
                    for (int t = 0; t < 4; t++)
                        tile[j] += (int32_t)x[g * 4 + t] * (int32_t)w[g * 64 + j * 4 + t];
            i8_write_tile(e, tile, CATTN_I8_PANEL, 1, r, p * CATTN_I8_PANEL, cols);
        }
    }
}

#if CATTN_I8_HAVE_X86

I8_INLINE int32_t i8_load4(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* AVX-512 VNNI: mr rows × np panels of 16 outputs in registers */
#define CATTN_I8_MR512 6
#define CATTN_I8_NP512 4
CATTN_I8_TARGET_AVX512 I8_INLINE void i8_tile_avx512(int mr, int np, i8_size kg,
                                                      const uint8_t *a, i8_size lda,
                                                      const int8_t *w, i8_size panel_bytes,
                                                      int32_t *tile)
{
    __m512i acc[CATTN_I8_MR512][CATTN_I8_NP512];
    for (int r = 0; r < mr; r++)
        for (int p = 0; p < np; p++) acc[r][p] = _mm512_setzero_si512();
    for (i8_size g = 0; g < kg; g++) {
        __m512i wv[CATTN_I8_NP512];
        for (int p = 0; p < np; p++) wv[p] = _mm512_loadu_si512(w + p * panel_bytes + g * 64);
        for (int r = 0; r < mr; r++) {
            __m512i av = _mm512_set1_epi32(i8_load4(a + r * lda + g * 4));
            for (int p = 0; p < np; p++) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], av, wv[p]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int p = 0; p < np; p++)
            _mm512_storeu_si512(tile + r * 64 + p * 16, acc[r][p]);
}

#define I8_TILE512_CASE(MR, NP) \
    case (MR) * 8 + (NP): i8_tile_avx512(MR, NP, kg, x, lda, w, panel_bytes, tile); break;
#define I8_TILE512_ROWS(NP) I8_TILE512_CASE(1, NP) I8_TILE512_CASE(2, NP) \
    I8_TILE512_CASE(3, NP) I8_TILE512_CASE(4, NP) I8_TILE512_CASE(5, NP) I8_TILE512_CASE(6, NP)

CATTN_I8_TARGET_AVX512 static void i8_gemm_avx512(i8_size rows, i8_size N, i8_size kg,
                                                  const uint8_t *a, i8_size lda,
                                                  const int8_t *packed, const i8_epilogue *e)
{
    int32_t tile[CATTN_I8_MR512 * 64];
    const i8_size panel_bytes = kg * 64;
    for (i8_size n0 = 0; n0 < N; n0 += 64) {
        int np = (int)((N - n0 + 15) / 16 < CATTN_I8_NP512 ? (N - n0 + 15) / 16 : CATTN_I8_NP512);
        i8_size cols = N - n0 < 64 ? N - n0 : 64;
        const int8_t *w = packed + (n0 / 16) * panel_bytes;
        for (i8_size r0 = 0; r0 < rows; r0 += CATTN_I8_MR512) {
            int mr = (int)(rows - r0 < CATTN_I8_MR512 ? rows - r0 : CATTN_I8_MR512);
            const uint8_t *x = a + r0 * lda;
            switch (mr * 8 + np) {
                I8_TILE512_ROWS(1) I8_TILE512_ROWS(2) I8_TILE512_ROWS(3) I8_TILE512_ROWS(4)
            }
            i8_write_tile(e, tile, 64, mr, r0, n0, cols);
        }
    }
}
#undef I8_TILE512_ROWS
#undef I8_TILE512_CASE

/* 256-bit paths: mr rows × one panel (two vectors of 8 outputs) */
#define CATTN_I8_MR256 6

/* vpdpbusd emulated: the even and odd bytes widened to 16 bits, each pair multiplied and
 * summed by vpmaddwd (exact: |255 · 127 · 2| < 2^31) */
CATTN_I8_TARGET_AVX2 I8_INLINE __m256i i8_dot4_avx2(__m256i acc, __m256i a, __m256i w_even,
                                                     __m256i w_odd)
{
    __m256i a_even = _mm256_and_si256(a, _mm256_set1_epi16(0xFF));
    __m256i a_odd = _mm256_srli_epi16(a, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(a_even, w_even),
                                                  _mm256_madd_epi16(a_odd, w_odd)));
}

CATTN_I8_TARGET_AVX2 I8_INLINE void i8_tile_avx2(int mr, i8_size kg, const uint8_t *a,
                                                  i8_size lda, const int8_t *w, int32_t *tile)
{
    __m256i acc[CATTN_I8_MR256][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (i8_size g = 0; g < kg; g++) {
        __m256i we[2], wo[2];
        for (int h = 0; h < 2; h++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + g * 64 + h * 32));
            we[h] = _mm256_srai_epi16(_mm256_slli_epi16(wv, 8), 8);
            wo[h] = _mm256_srai_epi16(wv, 8);
        }
        for (int r = 0; r < mr; r++) {
            __m256i av = _mm256_set1_epi32(i8_load4(a + r * lda + g * 4));
            for (int h = 0; h < 2; h++) acc[r][h] = i8_dot4_avx2(acc[r][h], av, we[h], wo[h]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_si256((__m256i *)(tile + r * 16 + h * 8), acc[r][h]);
}

#if CATTN_I8_HAVE_AVX_VNNI
CATTN_I8_TARGET_AVX_VNNI I8_INLINE void i8_tile_avx_vnni(int mr, i8_size kg, const uint8_t *a,
                                                          i8_size lda, const int8_t *w,
                                                          int32_t *tile)
{
    __m256i acc[CATTN_I8_MR256][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (i8_size g = 0; g < kg; g++) {
        __m256i wv[2];
        for (int h = 0; h < 2; h++)
            wv[h] = _mm256_loadu_si256((const __m256i *)(w + g * 64 + h * 32));
        for (int r = 0; r < mr; r++) {
            __m256i av = _mm256_set1_epi32(i8_load4(a + r * lda + g * 4));
            for (int h = 0; h < 2; h++)
                acc[r][h] = _mm256_dpbusd_avx_epi32(acc[r][h], av, wv[h]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_si256((__m256i *)(tile + r * 16 + h * 8), acc[r][h]);
}
#endif

/* One loop nest for both 256-bit paths; TILE is the path's tile function. */
#define I8_GEMM256_BODY(TILE)                                                              \
    int32_t tile[CATTN_I8_MR256 * 16];                                                           \
    for (i8_size p = 0; p * 16 < N; p++) {                                                 \
        const int8_t *w = packed + p * kg * 64;                                            \
        i8_size cols = N - p * 16 < 16 ? N - p * 16 : 16;                                  \
        for (i8_size r0 = 0; r0 < rows; r0 += CATTN_I8_MR256) {                                  \
            const uint8_t *x = a + r0 * lda;                                               \
            switch (rows - r0 < CATTN_I8_MR256 ? (int)(rows - r0) : CATTN_I8_MR256) {                 \
            case 1: TILE(1, kg, x, lda, w, tile); break;                                   \
            case 2: TILE(2, kg, x, lda, w, tile); break;                                   \
            case 3: TILE(3, kg, x, lda, w, tile); break;                                   \
            case 4: TILE(4, kg, x, lda, w, tile); break;                                   \
            case 5: TILE(5, kg, x, lda, w, tile); break;                                   \
            default: TILE(6, kg, x, lda, w, tile); break;                                  \
            }                                                                              \
            int mr = (int)(rows - r0 < CATTN_I8_MR256 ? rows - r0 : CATTN_I8_MR256);                   \
            i8_write_tile(e, tile, 16, mr, r0, p * 16, cols);                     \
        }                                                                                  \
    }

CATTN_I8_TARGET_AVX2 static void i8_gemm_avx2(i8_size rows, i8_size N, i8_size kg,
                                              const uint8_t *a, i8_size lda,
                                              const int8_t *packed, const i8_epilogue *e)
{
    I8_GEMM256_BODY(i8_tile_avx2)
}

#if CATTN_I8_HAVE_AVX_VNNI
CATTN_I8_TARGET_AVX_VNNI static void i8_gemm_avx_vnni(i8_size rows, i8_size N, i8_size kg,
                                                      const uint8_t *a, i8_size lda,
                                                      const int8_t *packed,
                                                      const i8_epilogue *e)
{
    I8_GEMM256_BODY(i8_tile_avx_vnni)
}
#endif
#undef I8_GEMM256_BODY

#if CATTN_I8_HAVE_AMX
/* ---- AMX-INT8: tmm0-3 a 32 × 32 block of int32 sums (two row tiles × two panels), tmm4-5
 * two row tiles of quantized rows, tmm6-7 two panels of the weight, 16 groups of 4 inputs
 * at a time. A panel's groups are already the tile layout tdpbusd wants for its second
 * operand (16 outputs × 4 inputs per 64-byte row), so the weight is read in place. A
 * block's last rows (under 16) and last groups (under 16) go through zero-padded copies:
 * tile loads read whole 16-row, 64-byte tiles, which would run past the rows and into the
 * next panel. */

#define CATTN_I8_AMX_MIN_ROWS 16

/* 16 quantized rows (`left` of them real) × groups [g0, g0 + 16) of `kg` as the first
 * operand: the rows in place when whole, else a zero-padded copy in buf (1 KiB). */
I8_INLINE const uint8_t *i8_amx_rows(const uint8_t *x, i8_size ld, i8_size left, i8_size g0,
                                     i8_size kg, uint8_t *buf, i8_size *stride)
{
    const i8_size nr = left < 16 ? left : 16, ng = kg - g0 < 16 ? kg - g0 : 16;
    if (nr == 16 && ng == 16) {
        *stride = ld;
        return x + g0 * 4;
    }
    memset(buf, 0, 1024);
    for (i8_size r = 0; r < nr; r++) memcpy(buf + r * 64, x + r * ld + g0 * 4, (size_t)ng * 4);
    *stride = 64;
    return buf;
}

/* Groups [g0, g0 + 16) of a weight panel (16 outputs × 4 inputs per group) as the second
 * operand: in place when whole, else a zero-padded copy in buf. */
I8_INLINE const uint8_t *i8_amx_groups(const uint8_t *panel, i8_size g0, i8_size kg,
                                       uint8_t *buf)
{
    const i8_size ng = kg - g0 < 16 ? kg - g0 : 16;
    if (ng == 16) return panel + g0 * 64;
    memset(buf, 0, 1024);
    memcpy(buf, panel + g0 * 64, (size_t)ng * 64);
    return buf;
}

CATTN_I8_TARGET_AMX static void i8_gemm_amx(i8_size rows, i8_size N, i8_size kg,
                                            const uint8_t *a, i8_size lda,
                                            const int8_t *packed, const i8_epilogue *e)
{
    int32_t sums[32 * 32] __attribute__((aligned(64)));
    uint8_t pad[4][1024] __attribute__((aligned(64)));
    const i8_size panel_bytes = kg * 64;
    cattn_amx_configure();
    for (i8_size n0 = 0; n0 < N; n0 += 32) {
        const int two_panels = N - n0 > 16;
        /* a panel's groups as the 16 rows of a tile: row g at packed + g · 64 */
        const uint8_t *w0 = (const uint8_t *)packed + (n0 / 16) * panel_bytes;
        const uint8_t *w1 = w0 + panel_bytes;
        for (i8_size r0 = 0; r0 < rows; r0 += 32) {
            const int two_rows = rows - r0 > 16;
            const uint8_t *x0 = a + r0 * lda, *x1 = x0 + 16 * lda;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (i8_size g0 = 0; g0 < kg; g0 += 16) {
                i8_size s; /* (set by i8_amx_rows before the load reads it) */
                const uint8_t *p = i8_amx_rows(x0, lda, rows - r0, g0, kg, pad[0], &s);
                _tile_loadd(4, p, s);
                _tile_loadd(6, i8_amx_groups(w0, g0, kg, pad[2]), 64);
                _tile_dpbusd(0, 4, 6);
                if (two_panels) {
                    _tile_loadd(7, i8_amx_groups(w1, g0, kg, pad[3]), 64);
                    _tile_dpbusd(1, 4, 7);
                }
                if (two_rows) {
                    p = i8_amx_rows(x1, lda, rows - r0 - 16, g0, kg, pad[1], &s);
                    _tile_loadd(5, p, s);
                    _tile_dpbusd(2, 5, 6);
                    if (two_panels) _tile_dpbusd(3, 5, 7);
                }
            }
            _tile_stored(0, sums, 128);
            _tile_stored(1, sums + 16, 128);
            _tile_stored(2, sums + 16 * 32, 128);
            _tile_stored(3, sums + 16 * 32 + 16, 128);
            i8_write_tile(e, sums, 32, (int)(rows - r0 < 32 ? rows - r0 : 32), r0, n0,
                          N - n0 < 32 ? N - n0 : 32);
        }
    }
    _tile_release();
}
#endif

#endif /* CATTN_I8_HAVE_X86 */

static void i8_gemm(int path, i8_size rows, i8_size N, i8_size kg, const uint8_t *a,
                    i8_size lda, const int8_t *packed, const i8_epilogue *e)
{
#if CATTN_I8_HAVE_X86
#if CATTN_I8_HAVE_AMX
    if (path == CATTN_I8_AMX && rows >= CATTN_I8_AMX_MIN_ROWS) {
        i8_gemm_amx(rows, N, kg, a, lda, packed, e);
        return;
    }
#endif
    if (path == CATTN_I8_AVX512_VNNI || path == CATTN_I8_AMX) {
        i8_gemm_avx512(rows, N, kg, a, lda, packed, e);
        return;
    }
#if CATTN_I8_HAVE_AVX_VNNI
    if (path == CATTN_I8_AVX_VNNI) {
        i8_gemm_avx_vnni(rows, N, kg, a, lda, packed, e);
        return;
    }
#endif
    if (path != CATTN_I8_PORTABLE) {
        i8_gemm_avx2(rows, N, kg, a, lda, packed, e);
        return;
    }
#endif
    i8_gemm_portable(rows, N, kg, a, lda, packed, e);
}

/* c[rows, N] (int32, row stride ldc) = quantized rows a (uint8, k_groups · 4 each, row
 * stride lda) · qwᵀ: the raw sums. */
static void cattn_i8_gemm_raw(int path, i8_size rows, i8_size N, i8_size kg, const uint8_t *a,
                              i8_size lda, const int8_t *packed, int32_t *c, i8_size ldc)
{
    i8_epilogue e = {NULL, NULL, NULL, NULL, NULL, c, ldc};
    i8_gemm(path, rows, N, kg, a, lda, packed, &e);
}

/* Bytes of work area cattn_i8_linear needs for K inputs. */
static size_t cattn_i8_work_bytes(i8_size K)
{
    return (size_t)CATTN_I8_ROW_BLOCK * (size_t)((K + 3) / 4 * 4 + 8);
}

/* out[rows, N] (row stride ldo) = x[rows, K] (row stride ldx) · Wᵀ + bias, W quantized and
 * packed (col_sums, w_scale: one per output; bias may be NULL), on one thread. */
static void cattn_i8_linear(int path, i8_size rows, i8_size N, i8_size K, const float *x,
                            i8_size ldx, const int8_t *packed, const int32_t *col_sums,
                            const float *w_scale, const float *bias, float *out, i8_size ldo,
                            void *work)
{
    const i8_size kg = (K + 3) / 4, ldq = kg * 4;
    float *row_scale = (float *)work;
    int32_t *zp = (int32_t *)(row_scale + CATTN_I8_ROW_BLOCK);
    uint8_t *q = (uint8_t *)(zp + CATTN_I8_ROW_BLOCK);
    for (i8_size r0 = 0; r0 < rows; r0 += CATTN_I8_ROW_BLOCK) {
        i8_size m = rows - r0 < CATTN_I8_ROW_BLOCK ? rows - r0 : CATTN_I8_ROW_BLOCK;
        cattn_i8_quantize_rows(path, m, K, x + r0 * ldx, ldx, q, ldq, row_scale, zp);
        i8_epilogue e = {col_sums, w_scale, bias, row_scale, zp, out + r0 * ldo, ldo};
        i8_gemm(path, m, N, kg, q, ldq, packed, &e);
    }
}

#undef I8_INLINE
#endif /* CATTN_INT8_GEMM_H */

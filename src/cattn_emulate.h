/*
 * The emulation build (CATTN_EMULATE_ISA=1 at build time, see setup.py), for tests only.
 *
 * The bfloat16 levels' instructions -- vcvtne2ps2bf16, vdpbf16ps, the AMX tile state,
 * tdpbf16ps and tdpbusd -- are implemented here in software on AVX-512F/BW/VL/DQ, and the
 * VEX vpdpbusd of AVX-VNNI by its EVEX twin of AVX512-VNNI (the same operation). A CPU with
 * AVX-512F/BW/VL/DQ is then reported as having the amx level (and, with AVX512-VNNI, the
 * amx and avx_vnni int8 paths), so
 * a machine without those instructions still runs their kernels' own logic -- packing,
 * layouts, tails, tile shapes -- through the test suite. Each instruction follows the
 * pseudo-code of Intel's manual: round to nearest even, NaNs quieted, subnormal inputs of
 * the products and a subnormal accumulator read as zero, each sum's subnormal result
 * flushed to zero, the order of a lane's two products. Checked against vdpbf16ps on an AMD
 * EPYC Zen 4: bitwise the same results, subnormal ones included (the AMX tiles' flush
 * follows the manual, unchecked on hardware). A tile instruction before a configuration,
 * or with shapes the configuration does not allow, aborts where the CPU would fault.
 *
 * Emulated products are far slower than the real ones: show_config() names an emulation
 * build, and a release build contains none of this.
 */
#ifndef CATTN_EMULATE_H
#define CATTN_EMULATE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CATTN_EMU_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define CATTN_EMU_INLINE static inline __attribute__((always_inline)) CATTN_EMU_TGT

/* ---- bfloat16 conversions and products */

/* The bfloat16 in the upper half of each 32-bit lane as float32, a subnormal read as a
 * signed zero. */
CATTN_EMU_INLINE __m512 cattn_emu_bf16_upper(__m512i x)
{
    const __m512i v = _mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 subnormal = _mm512_testn_epi32_mask(v, _mm512_set1_epi32(0x7F800000));
    return _mm512_castsi512_ps(
        _mm512_mask_and_epi32(v, subnormal, v, _mm512_set1_epi32((int)0x80000000u)));
}

CATTN_EMU_INLINE __m512 cattn_emu_bf16_lower(__m512i x)
{
    return cattn_emu_bf16_upper(_mm512_slli_epi32(x, 16));
}

/* 16 float32 to bfloat16: zeros and subnormals to a signed zero, NaNs quieted (their upper
 * half with the mantissa's top bit set), the rest rounded to nearest even. */
CATTN_EMU_INLINE __m256i cattn_emu_float_to_bf16(__m512 x)
{
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    r = _mm512_mask_mov_epi32(r, tiny, _mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000u)));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* vcvtne2ps2bf16: the lower 16 bfloat16 from b, the upper 16 from a. */
CATTN_EMU_INLINE __m512i cattn_emu_cvtne2ps_pbh(__m512 a, __m512 b)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(cattn_emu_float_to_bf16(b)),
                              cattn_emu_float_to_bf16(a), 1);
}

/* x with its subnormal lanes as signed zeros (the bfloat16 products' DAZ and FTZ). */
CATTN_EMU_INLINE __m512 cattn_emu_flush(__m512 x)
{
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 subnormal = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000));
    return _mm512_castsi512_ps(
        _mm512_mask_and_epi32(u, subnormal, u, _mm512_set1_epi32((int)0x80000000u)));
}

/* acc + x·y as vdpbf16ps and tdpbf16ps add a product of two bfloat16 (x, y widened): the
 * product exact in float32, the sum rounded, then flushed. */
CATTN_EMU_INLINE __m512 cattn_emu_add_product(__m512 acc, __m512 x, __m512 y)
{
    return cattn_emu_flush(_mm512_add_ps(acc, _mm512_mul_ps(x, y)));
}

/* vdpbf16ps: each float32 lane (a subnormal read as zero) += the product of the pairs'
 * upper halves, then += the product of their lower halves. */
CATTN_EMU_INLINE __m512 cattn_emu_dpbf16_ps(__m512 acc, __m512i a, __m512i b)
{
    acc = cattn_emu_add_product(cattn_emu_flush(acc), cattn_emu_bf16_upper(a),
                                cattn_emu_bf16_upper(b));
    return cattn_emu_add_product(acc, cattn_emu_bf16_lower(a), cattn_emu_bf16_lower(b));
}

#undef _mm512_cvtne2ps_pbh
#undef _mm512_dpbf16_ps
#define _mm512_cvtne2ps_pbh(a, b) cattn_emu_cvtne2ps_pbh((a), (b))
#define _mm512_dpbf16_ps(acc, a, b) cattn_emu_dpbf16_ps((acc), (__m512i)(a), (__m512i)(b))

/* ---- AMX: eight tiles of up to 16 rows × 64 bytes per thread, palette 1 */

struct cattn_emu_tile_state {
    uint8_t data[8][16][64] __attribute__((aligned(64)));
    uint16_t colsb[8];
    uint8_t rows[8];
    int configured;
};

static __thread struct cattn_emu_tile_state cattn_emu_tiles;

static void cattn_emu_fault(const char *what)
{
    fprintf(stderr, "cattn emulation build: %s (the CPU would fault here)\n", what);
    fflush(stderr);
    abort();
}

/* The 64-byte configuration: palette at byte 0, colsb[16] (16-bit) from byte 16, rows[16]
 * from byte 48; tiles 8-15 must be unused. Loading it zeroes every tile. */
static void cattn_emu_tile_loadconfig(const void *config)
{
    const uint8_t *c = (const uint8_t *)config;
    struct cattn_emu_tile_state *s = &cattn_emu_tiles;
    memset(s, 0, sizeof *s);
    if (c[0] == 0) return; /* palette 0: the tiles released */
    if (c[0] != 1) cattn_emu_fault("tile configuration with an unknown palette");
    for (int t = 0; t < 16; t++) {
        const unsigned colsb = (unsigned)c[16 + 2 * t] | (unsigned)c[17 + 2 * t] << 8;
        const unsigned rows = c[48 + t];
        if (t >= 8 ? colsb || rows : colsb > 64 || rows > 16 || (colsb == 0) != (rows == 0))
            cattn_emu_fault("tile configuration out of palette 1's limits");
        if (t < 8) {
            s->colsb[t] = (uint16_t)colsb;
            s->rows[t] = (uint8_t)rows;
        }
    }
    s->configured = 1;
}

static inline void cattn_emu_tile_check(int t)
{
    if (!cattn_emu_tiles.configured) cattn_emu_fault("tile instruction without a configuration");
    if (t < 0 || t > 7 || cattn_emu_tiles.rows[t] == 0) cattn_emu_fault("unconfigured tile");
}

static void cattn_emu_tile_loadd(int t, const void *base, ptrdiff_t stride)
{
    cattn_emu_tile_check(t);
    struct cattn_emu_tile_state *s = &cattn_emu_tiles;
    memset(s->data[t], 0, sizeof s->data[t]);
    for (int r = 0; r < s->rows[t]; r++)
        memcpy(s->data[t][r], (const char *)base + r * stride, s->colsb[t]);
}

static void cattn_emu_tile_stored(int t, void *base, ptrdiff_t stride)
{
    cattn_emu_tile_check(t);
    const struct cattn_emu_tile_state *s = &cattn_emu_tiles;
    for (int r = 0; r < s->rows[t]; r++)
        memcpy((char *)base + r * stride, s->data[t][r], s->colsb[t]);
}

static void cattn_emu_tile_zero(int t)
{
    cattn_emu_tile_check(t);
    memset(cattn_emu_tiles.data[t], 0, sizeof cattn_emu_tiles.data[t]);
}

/* The shapes of a tile product c += a · b (4-byte elements of c, groups of 4 bytes in a
 * and b's rows): rows of c and a alike, one row of b per 4 bytes of a row of a, rows of b
 * and c equally wide; anything else faults. */
static void cattn_emu_tile_product_shapes(int c, int a, int b, const char *instruction)
{
    cattn_emu_tile_check(c);
    cattn_emu_tile_check(a);
    cattn_emu_tile_check(b);
    const struct cattn_emu_tile_state *s = &cattn_emu_tiles;
    if (s->rows[a] != s->rows[c] || s->rows[b] != s->colsb[a] / 4 ||
        s->colsb[b] != s->colsb[c] || s->colsb[a] % 4 || s->colsb[c] % 4) {
        char what[80];
        snprintf(what, sizeof what, "%s with tile shapes that do not fit", instruction);
        cattn_emu_fault(what);
    }
}

/* tdpbf16ps: c[m][n] += Σ_k a[m].pair[k] · b[k].pair[n], per k the lower halves' product
 * first, then the upper halves'. */
CATTN_EMU_TGT static void cattn_emu_tile_dpbf16ps(int c, int a, int b)
{
    cattn_emu_tile_product_shapes(c, a, b, "tdpbf16ps");
    struct cattn_emu_tile_state *s = &cattn_emu_tiles;
    const int m_rows = s->rows[c], k_pairs = s->colsb[a] / 4, n_cols = s->colsb[c] / 4;
    const __mmask16 lanes = n_cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n_cols) - 1);
    for (int m = 0; m < m_rows; m++) {
        __m512 acc = cattn_emu_flush(_mm512_maskz_loadu_ps(lanes, s->data[c][m]));
        for (int k = 0; k < k_pairs; k++) {
            int32_t pair;
            memcpy(&pair, s->data[a][m] + 4 * k, 4);
            const __m512i x = _mm512_set1_epi32(pair);
            const __m512i y = _mm512_maskz_loadu_epi32(lanes, s->data[b][k]);
            acc = cattn_emu_add_product(acc, cattn_emu_bf16_lower(x), cattn_emu_bf16_lower(y));
            acc = cattn_emu_add_product(acc, cattn_emu_bf16_upper(x), cattn_emu_bf16_upper(y));
        }
        _mm512_mask_storeu_ps(s->data[c][m], lanes, acc);
    }
}

/* tdpbusd: c[m][n] += Σ_k the four products of a[m].bytes[4k..4k+3] (unsigned) and
 * b[k].bytes[4n..4n+3] (signed), in int32 (wrapping, as the hardware's). */
static void cattn_emu_tile_dpbusd(int c, int a, int b)
{
    cattn_emu_tile_product_shapes(c, a, b, "tdpbusd");
    struct cattn_emu_tile_state *s = &cattn_emu_tiles;
    const int m_rows = s->rows[c], k_groups = s->colsb[a] / 4, n_cols = s->colsb[c] / 4;
    for (int m = 0; m < m_rows; m++) {
        int32_t acc[16];
        memcpy(acc, s->data[c][m], sizeof acc);
        for (int k = 0; k < k_groups; k++) {
            const uint8_t *x = s->data[a][m] + 4 * k;
            const int8_t *y = (const int8_t *)s->data[b][k];
            for (int n = 0; n < n_cols; n++) {
                const int32_t dot = (int32_t)x[0] * y[4 * n] + (int32_t)x[1] * y[4 * n + 1] +
                                    (int32_t)x[2] * y[4 * n + 2] + (int32_t)x[3] * y[4 * n + 3];
                acc[n] = (int32_t)((uint32_t)acc[n] + (uint32_t)dot);
            }
        }
        memcpy(s->data[c][m], acc, (size_t)n_cols * 4);
    }
}

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbusd
#define _tile_loadconfig(config) cattn_emu_tile_loadconfig(config)
#define _tile_release() memset(&cattn_emu_tiles, 0, sizeof cattn_emu_tiles)
#define _tile_loadd(t, base, stride) cattn_emu_tile_loadd((t), (base), (stride))
#define _tile_stored(t, base, stride) cattn_emu_tile_stored((t), (base), (stride))
#define _tile_zero(t) cattn_emu_tile_zero(t)
#define _tile_dpbf16ps(c, a, b) cattn_emu_tile_dpbf16ps((c), (a), (b))
#define _tile_dpbusd(c, a, b) cattn_emu_tile_dpbusd((c), (a), (b))

/* ---- AVX-VNNI: the VEX vpdpbusd is AVX512-VNNI's EVEX one on 256 bits */

#undef _mm256_dpbusd_avx_epi32
#define _mm256_dpbusd_avx_epi32(acc, a, b) _mm256_dpbusd_epi32((acc), (a), (b))

#endif /* CATTN_EMULATE_H */

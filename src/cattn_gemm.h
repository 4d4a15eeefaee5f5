/*
 * The two block GEMMs of the attention loop, as register-tiled micro-kernels:
 *   scores = alpha · Q_blk · K_blkᵀ   (inner dimension E, often only 64)
 *   acc   += P · V_blk                (inner dimension block_k)
 *
 * Why not BLAS here: each call is small (a few hundred rows, inner dimension 64), and a
 * general sgemm packs both operands on every call: for the P·V product that is a copy of
 * the whole probability block, measured at ~12% of the run time with OpenBLAS. Here Q and
 * P are read in place, V rows are read in place, and K is packed once per key block and
 * reused by every row tile. On the portable path (no AVX2) the caller uses BLAS instead:
 * other CPUs still get a vendor-tuned GEMM.
 *
 * One template (cattn_gemm_impl.h), instantiated per precision and instruction set; the
 * functions without a suffix dispatch on the plan's `isa` (cattn_cpu.h).
 */
#ifndef CATTN_GEMM_H
#define CATTN_GEMM_H

#include "cattn_simd.h"
#include "cattn_convert.h"

/* Up to this many query rows, the block GEMMs stream K and V in place (decoding); and Q·Kᵀ
 * does so for fewer keys than this, where packing them would cost more than it saves (a
 * tiny call of 5 keys spent a tenth of its time packing). */
#define CATTN_DIRECT_ROWS 4
#define CATTN_DIRECT_KEYS 16

/* Register tile of the portable instances: 6 rows × 4 vectors where there are 32 vector
 * registers (ARM64), 6 × 2 where there are 16 (SSE2). */
#if defined(__aarch64__)
#define CATTN_PORTABLE_NV 4
#else
#define CATTN_PORTABLE_NV 2
#endif

#ifndef CATTN_AVX512_MR
#define CATTN_AVX512_MR 8
#define CATTN_AVX512_NV 2
#endif
/* The linear layers' row tile on AVX-512 (long inner dimensions: taller tiles pay) */
#ifndef CATTN_AVX512_LMR
#define CATTN_AVX512_LMR 12
#endif

/* ---- Generic vectors (GCC and clang): the portable micro-kernels, compiled for the
 * platform's baseline (SSE2 on x86-64, NEON on ARM64), and the 16-wide test instances. */
#if defined(__GNUC__) || defined(__clang__)
#define CATTN_HAVE_GENERIC_VECTORS 1
typedef float cattn_w4f __attribute__((vector_size(16)));
typedef double cattn_w2d __attribute__((vector_size(16)));
typedef int cattn_w4i __attribute__((vector_size(16)));
typedef long long cattn_w2i __attribute__((vector_size(16)));
typedef float cattn_w16f __attribute__((vector_size(64)));
typedef double cattn_w8d __attribute__((vector_size(64)));
typedef int cattn_w16i __attribute__((vector_size(64)));
typedef long long cattn_w8i __attribute__((vector_size(64)));

/* (statement expressions, not functions: a function returning a 64-byte vector would
 * change the ABI without AVX-512) */
#define CATTN_WIDE_LOAD(V, p) ({ V x_; memcpy(&x_, (p), sizeof x_); x_; })
#define CATTN_WIDE_STORE(p, x) ({ __typeof__(x) x_ = (x); memcpy((p), &x_, sizeof x_); })
#define CATTN_WIDE_MASK(VI, W, n) ({                                                    \
    VI m_;                                                                              \
    ptrdiff_t n_ = (n);                                                                 \
    for (int l_ = 0; l_ < (W); l_++) m_[l_] = l_ < n_ ? -1 : 0;                         \
    m_;                                                                                 \
})
#define CATTN_WIDE_MASKLOAD(V, W, p, m) ({                                              \
    V x_;                                                                               \
    const __typeof__(*(p)) *p_ = (p);                                                   \
    __typeof__(m) m_ = (m);                                                             \
    for (int l_ = 0; l_ < (W); l_++) x_[l_] = m_[l_] ? p_[l_] : 0;                      \
    x_;                                                                                 \
})
#define CATTN_WIDE_MASKSTORE(W, p, m, x) ({                                             \
    __typeof__(x) x_ = (x);                                                             \
    __typeof__(m) m_ = (m);                                                             \
    for (int l_ = 0; l_ < (W); l_++)                                                    \
        if (m_[l_]) (p)[l_] = x_[l_];                                                   \
})
#define CATTN_WIDE_HSUM(T, W, x) ({                                                     \
    __typeof__(x) x_ = (x);                                                             \
    T s_ = 0;                                                                           \
    for (int l_ = 0; l_ < (W); l_++) s_ += x_[l_];                                      \
    s_;                                                                                 \
})


/* W stored elements converted lane by lane (the generic-vector instances). */
#define CATTN_WIDE_CVT_LOAD(V, W, CVT, p) ({                                            \
    float f_[W];                                                                        \
    for (int l_ = 0; l_ < (W); l_++) f_[l_] = CVT((p)[l_]);                             \
    CATTN_WIDE_LOAD(V, f_);                                                             \
})
#define CATTN_I8_TO_F32(x) ((float)(x))

/* ---- portable, float: 4 lanes, 6×(4·NV) register tile */
#define T float
#define SFX f32
#define ISFX portable
#define TGT
#define W 4
#define MR 6
#define NV CATTN_PORTABLE_NV
#define V cattn_w4f
#define VI cattn_w4i
#define VLOAD(p) CATTN_WIDE_LOAD(cattn_w4f, p)
#define VSTORE(p, x) CATTN_WIDE_STORE(p, x)
#define VBCAST(p) (*(p) + (cattn_w4f){0})
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VMUL(a, b) ((a) * (b))
#define VZERO() ((cattn_w4f){0})
#define VMASK(n) CATTN_WIDE_MASK(cattn_w4i, W, n)
#define VMASKLOAD(p, m) CATTN_WIDE_MASKLOAD(cattn_w4f, W, p, m)
#define VMASKSTORE(p, m, x) CATTN_WIDE_MASKSTORE(W, p, m, x)
#define VADD(a, b) ((a) + (b))
#define VHSUM(x) CATTN_WIDE_HSUM(float, W, x)
#define VLOAD_F16(p) CATTN_WIDE_CVT_LOAD(cattn_w4f, W, cattn_f16_to_f32, p)
#define VLOAD_BF16(p) CATTN_WIDE_CVT_LOAD(cattn_w4f, W, cattn_bf16_to_f32, p)
#define VLOAD_I8(p) CATTN_WIDE_CVT_LOAD(cattn_w4f, W, CATTN_I8_TO_F32, p)
#include "cattn_gemm_impl.h"

/* ---- portable, double: 2 lanes, 6×(2·NV) register tile */
#define T double
#define SFX f64
#define ISFX portable
#define TGT
#define W 2
#define MR 6
#define NV CATTN_PORTABLE_NV
#define V cattn_w2d
#define VI cattn_w2i
#define VLOAD(p) CATTN_WIDE_LOAD(cattn_w2d, p)
#define VSTORE(p, x) CATTN_WIDE_STORE(p, x)
#define VBCAST(p) (*(p) + (cattn_w2d){0})
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VMUL(a, b) ((a) * (b))
#define VZERO() ((cattn_w2d){0})
#define VMASK(n) CATTN_WIDE_MASK(cattn_w2i, W, n)
#define VMASKLOAD(p, m) CATTN_WIDE_MASKLOAD(cattn_w2d, W, p, m)
#define VMASKSTORE(p, m, x) CATTN_WIDE_MASKSTORE(W, p, m, x)
#define VADD(a, b) ((a) + (b))
#define VHSUM(x) CATTN_WIDE_HSUM(double, W, x)
#include "cattn_gemm_impl.h"
#else
#define CATTN_HAVE_GENERIC_VECTORS 0 /* (MSVC) the portable path calls BLAS */
#endif

#if CATTN_HAVE_X86_PATHS
__attribute__((target("avx2,fma"))) static inline float cattn_hsum_ps(__m256 x)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx2,fma"))) static inline double cattn_hsum_pd(__m256d x)
{
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

/* In-register transposes of W vectors of W lanes, for the packing of the keys. */
__attribute__((target("avx2,fma"))) static inline void cattn_transpose8_ps(__m256 r[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    /* u[4i + m] holds, in 128-bit lane l, feature 4l + m of rows 4i..4i+3 */
    for (int m = 0; m < 4; m++) {
        r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
        r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
}

__attribute__((target("avx2,fma"))) static inline void cattn_transpose4_pd(__m256d r[4])
{
    __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

__attribute__((target("avx512f"))) static inline void cattn_transpose16_ps(__m512 r[16])
{
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    /* u[4i + m] holds, in 128-bit lane l, feature 4l + m of rows 4i..4i+3 */
    for (int m = 0; m < 4; m++) {
        __m512 a = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
        __m512 b = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
        __m512 c = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
        __m512 d = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
        r[m] = _mm512_shuffle_f32x4(a, c, 0x88);
        r[4 + m] = _mm512_shuffle_f32x4(b, d, 0x88);
        r[8 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);
        r[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);
    }
}

__attribute__((target("avx512f"))) static inline void cattn_transpose8_pd(__m512d r[8])
{
    __m512d t[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
    }
    /* t[2i + m] holds, in 128-bit lane l, feature 2l + m of rows 2i, 2i+1 */
    for (int m = 0; m < 2; m++) {
        __m512d a = _mm512_shuffle_f64x2(t[m], t[2 + m], 0x88);
        __m512d b = _mm512_shuffle_f64x2(t[m], t[2 + m], 0xDD);
        __m512d c = _mm512_shuffle_f64x2(t[4 + m], t[6 + m], 0x88);
        __m512d d = _mm512_shuffle_f64x2(t[4 + m], t[6 + m], 0xDD);
        r[m] = _mm512_shuffle_f64x2(a, c, 0x88);
        r[2 + m] = _mm512_shuffle_f64x2(b, d, 0x88);
        r[4 + m] = _mm512_shuffle_f64x2(a, c, 0xDD);
        r[6 + m] = _mm512_shuffle_f64x2(b, d, 0xDD);
    }
}

/* Merges that turn W vectors into one vector of their W sums, two at a time: merge level
 * l adds two vectors each holding 2^l sums (as partial sums spread over W / 2^l lanes) into
 * one holding 2^(l+1) such sums. Applied as a binary counter while the vectors are made
 * (slot s merges once per trailing 1 bit of s), at most one vector per level waits in a
 * register. A tree of W - 1 merges of three instructions each: fewer than a transpose
 * followed by W - 1 adds, and far fewer than a reduction across the lanes per vector. The
 * last two levels work within 128-bit parts (P lanes each), so the sum of slot s lands in
 * lane CATTN_SLOT_LANE(W, P, s). */
#define CATTN_SLOT_LANE(W, P, s) ((P) * ((s) % ((W) / (P))) + (s) / ((W) / (P)))

__attribute__((target("avx2,fma"))) static inline __m256
cattn_merge_sums8_ps(int level, __m256 a, __m256 b)
{
    __m256 x, y;
    switch (level) {
    case 0: /* halves: [a's 4 partials, b's 4] */
        x = _mm256_permute2f128_ps(a, b, 0x20); y = _mm256_permute2f128_ps(a, b, 0x31); break;
    case 1: /* pairs of lanes */
        x = _mm256_shuffle_ps(a, b, 0x44); y = _mm256_shuffle_ps(a, b, 0xEE); break;
    default: /* single lanes */
        x = _mm256_shuffle_ps(a, b, 0x88); y = _mm256_shuffle_ps(a, b, 0xDD); break;
    }
    return _mm256_add_ps(x, y);
}

__attribute__((target("avx2,fma"))) static inline __m256d
cattn_merge_sums4_pd(int level, __m256d a, __m256d b)
{
    if (level == 0)
        return _mm256_add_pd(_mm256_permute2f128_pd(a, b, 0x20), _mm256_permute2f128_pd(a, b, 0x31));
    return _mm256_add_pd(_mm256_unpacklo_pd(a, b), _mm256_unpackhi_pd(a, b));
}

__attribute__((target("avx512f"))) static inline __m512
cattn_merge_sums16_ps(int level, __m512 a, __m512 b)
{
    __m512 x, y;
    switch (level) {
    case 0: /* 256-bit halves */
        x = _mm512_shuffle_f32x4(a, b, 0x44); y = _mm512_shuffle_f32x4(a, b, 0xEE); break;
    case 1: /* 128-bit parts */
        x = _mm512_shuffle_f32x4(a, b, 0x88); y = _mm512_shuffle_f32x4(a, b, 0xDD); break;
    case 2: /* pairs of lanes within each part */
        x = _mm512_shuffle_ps(a, b, 0x44); y = _mm512_shuffle_ps(a, b, 0xEE); break;
    default: /* single lanes */
        x = _mm512_shuffle_ps(a, b, 0x88); y = _mm512_shuffle_ps(a, b, 0xDD); break;
    }
    return _mm512_add_ps(x, y);
}

__attribute__((target("avx512f"))) static inline __m512d
cattn_merge_sums8_pd(int level, __m512d a, __m512d b)
{
    __m512d x, y;
    switch (level) {
    case 0:
        x = _mm512_shuffle_f64x2(a, b, 0x44); y = _mm512_shuffle_f64x2(a, b, 0xEE); break;
    case 1:
        x = _mm512_shuffle_f64x2(a, b, 0x88); y = _mm512_shuffle_f64x2(a, b, 0xDD); break;
    default:
        x = _mm512_unpacklo_pd(a, b); y = _mm512_unpackhi_pd(a, b); break;
    }
    return _mm512_add_pd(x, y);
}

/* ---- AVX2 + FMA, float: 8 lanes, 6×16 register tile */
#define T float
#define SFX f32
#define ISFX avx2
#define TGT __attribute__((target("avx2,fma")))
#define W 8
#define MR 6
#define NV 2
#define V __m256
#define VI __m256i
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, x) _mm256_storeu_ps(p, x)
#define VBCAST(p) _mm256_broadcast_ss(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VZERO() _mm256_setzero_ps()
#define VMASK(n) _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n)), \
                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
#define VMASKLOAD(p, m) _mm256_maskload_ps(p, m)
#define VMASKSTORE(p, m, x) _mm256_maskstore_ps(p, m, x)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VHSUM(x) cattn_hsum_ps(x)
#define VTRANSPOSE(r) cattn_transpose8_ps(r)
#define VMERGE_SUMS(level, a, b) cattn_merge_sums8_ps(level, a, b)
/* float16 through F16C, bfloat16 widened and shifted into the top half of a float */
#define TGT_KV __attribute__((target("avx2,fma,f16c")))
#define VLOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define VLOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(                              \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define VLOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                               \
    _mm_loadl_epi64((const __m128i *)(p))))
#include "cattn_gemm_impl.h"

/* ---- AVX2 + FMA, double: 4 lanes, 6×8 register tile */
#define T double
#define SFX f64
#define ISFX avx2
#define TGT __attribute__((target("avx2,fma")))
#define W 4
#define MR 6
#define NV 2
#define V __m256d
#define VI __m256i
#define VLOAD(p) _mm256_loadu_pd(p)
#define VSTORE(p, x) _mm256_storeu_pd(p, x)
#define VBCAST(p) _mm256_broadcast_sd(p)
#define VFMA(a, b, c) _mm256_fmadd_pd(a, b, c)
#define VMUL(a, b) _mm256_mul_pd(a, b)
#define VZERO() _mm256_setzero_pd()
#define VMASK(n) _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)(n)), \
                                    _mm256_setr_epi64x(0, 1, 2, 3))
#define VMASKLOAD(p, m) _mm256_maskload_pd(p, m)
#define VMASKSTORE(p, m, x) _mm256_maskstore_pd(p, m, x)
#define VADD(a, b) _mm256_add_pd(a, b)
#define VHSUM(x) cattn_hsum_pd(x)
#define VTRANSPOSE(r) cattn_transpose4_pd(r)
#define VMERGE_SUMS(level, a, b) cattn_merge_sums4_pd(level, a, b)
#include "cattn_gemm_impl.h"

/* ---- AVX-512F, float: 16 lanes, 12×32 register tile (the broadcasts fold into the FMAs
 * as embedded-broadcast memory operands) */
#define T float
#define SFX f32
#define ISFX avx512
#define NREGS 32
#define TGT __attribute__((target("avx512f,fma")))
#define W 16
#define MR CATTN_AVX512_MR
#define LMR CATTN_AVX512_LMR
#define NV CATTN_AVX512_NV
#define V __m512
#define VI __mmask16
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, x) _mm512_storeu_ps(p, x)
#define VBCAST(p) _mm512_set1_ps(*(p))
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VZERO() _mm512_setzero_ps()
#define VMASK(n) cattn_mask16(n)
#define VMASKLOAD(p, m) _mm512_maskz_loadu_ps(m, p)
#define VMASKSTORE(p, m, x) _mm512_mask_storeu_ps(p, m, x)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VHSUM(x) _mm512_reduce_add_ps(x)
#define VTRANSPOSE(r) cattn_transpose16_ps(r)
#define VMERGE_SUMS(level, a, b) cattn_merge_sums16_ps(level, a, b)
#define VLOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define VLOAD_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(                               \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define VLOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(                               \
    _mm_loadu_si128((const __m128i *)(p))))
#include "cattn_gemm_impl.h"

/* ---- AVX-512F, double: 8 lanes, 12×16 register tile */
#define T double
#define SFX f64
#define ISFX avx512
#define NREGS 32
#define TGT __attribute__((target("avx512f,fma")))
#define W 8
#define MR CATTN_AVX512_MR
#define LMR CATTN_AVX512_LMR
#define NV CATTN_AVX512_NV
#define V __m512d
#define VI __mmask8
#define VLOAD(p) _mm512_loadu_pd(p)
#define VSTORE(p, x) _mm512_storeu_pd(p, x)
#define VBCAST(p) _mm512_set1_pd(*(p))
#define VFMA(a, b, c) _mm512_fmadd_pd(a, b, c)
#define VMUL(a, b) _mm512_mul_pd(a, b)
#define VZERO() _mm512_setzero_pd()
#define VMASK(n) cattn_mask8(n)
#define VMASKLOAD(p, m) _mm512_maskz_loadu_pd(m, p)
#define VMASKSTORE(p, m, x) _mm512_mask_storeu_pd(p, m, x)
#define VADD(a, b) _mm512_add_pd(a, b)
#define VHSUM(x) _mm512_reduce_add_pd(x)
#define VTRANSPOSE(r) cattn_transpose8_pd(r)
#define VMERGE_SUMS(level, a, b) cattn_merge_sums8_pd(level, a, b)
#include "cattn_gemm_impl.h"

/* ---- (tests only) 16-wide generic vectors on AVX2: the AVX-512 instances' shapes. GCC
 * splits each 64-byte vector into two ymm registers; masked lanes are handled lane by lane,
 * so masked-off memory is never touched. Slow, and only there to run the 16-wide tiles,
 * tails and masks on CPUs without AVX-512. */
#define T float
#define SFX f32
#define ISFX wide16
#define TGT __attribute__((target("avx2,fma")))
#define W 16
#define MR CATTN_AVX512_MR
#define LMR CATTN_AVX512_LMR
#define NV CATTN_AVX512_NV
#define V cattn_w16f
#define VI cattn_w16i
#define VLOAD(p) CATTN_WIDE_LOAD(cattn_w16f, p)
#define VSTORE(p, x) CATTN_WIDE_STORE(p, x)
#define VBCAST(p) (*(p) + (cattn_w16f){0})
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VMUL(a, b) ((a) * (b))
#define VZERO() ((cattn_w16f){0})
#define VMASK(n) CATTN_WIDE_MASK(cattn_w16i, W, n)
#define VMASKLOAD(p, m) CATTN_WIDE_MASKLOAD(cattn_w16f, W, p, m)
#define VMASKSTORE(p, m, x) CATTN_WIDE_MASKSTORE(W, p, m, x)
#define VADD(a, b) ((a) + (b))
#define VHSUM(x) CATTN_WIDE_HSUM(float, W, x)
#define VLOAD_F16(p) CATTN_WIDE_CVT_LOAD(cattn_w16f, W, cattn_f16_to_f32, p)
#define VLOAD_BF16(p) CATTN_WIDE_CVT_LOAD(cattn_w16f, W, cattn_bf16_to_f32, p)
#define VLOAD_I8(p) CATTN_WIDE_CVT_LOAD(cattn_w16f, W, CATTN_I8_TO_F32, p)
#include "cattn_gemm_impl.h"

#define T double
#define SFX f64
#define ISFX wide16
#define TGT __attribute__((target("avx2,fma")))
#define W 8
#define MR CATTN_AVX512_MR
#define LMR CATTN_AVX512_LMR
#define NV CATTN_AVX512_NV
#define V cattn_w8d
#define VI cattn_w8i
#define VLOAD(p) CATTN_WIDE_LOAD(cattn_w8d, p)
#define VSTORE(p, x) CATTN_WIDE_STORE(p, x)
#define VBCAST(p) (*(p) + (cattn_w8d){0})
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VMUL(a, b) ((a) * (b))
#define VZERO() ((cattn_w8d){0})
#define VMASK(n) CATTN_WIDE_MASK(cattn_w8i, W, n)
#define VMASKLOAD(p, m) CATTN_WIDE_MASKLOAD(cattn_w8d, W, p, m)
#define VMASKSTORE(p, m, x) CATTN_WIDE_MASKSTORE(W, p, m, x)
#define VADD(a, b) ((a) + (b))
#define VHSUM(x) CATTN_WIDE_HSUM(double, W, x)
#include "cattn_gemm_impl.h"

#endif /* CATTN_HAVE_X86_PATHS */

/* Keys per packed panel: the micro-kernels' column width NR = NV·W (16 floats on AVX2,
 * 16·NV on AVX-512 and the 16-wide test path, 8 on the portable path; half as many doubles). */
static inline ptrdiff_t cattn_panel_keys(int isa, int is_double)
{
    const int wide = isa == CATTN_ISA_AVX512 || isa == CATTN_ISA_WIDE16;
    const int keys = wide ? 16 * CATTN_AVX512_NV : isa == CATTN_ISA_AVX2 ? 16 : 4 * CATTN_PORTABLE_NV;
    return keys / (is_double ? 2 : 1);
}

/* Whether the plan's path computes its block GEMMs with BLAS (else the micro-kernels). */
static inline int cattn_isa_uses_blas(int isa)
{
    return isa == CATTN_ISA_BLAS || (isa == CATTN_ISA_PORTABLE && !CATTN_HAVE_GENERIC_VECTORS);
}

#if CATTN_HAVE_X86_PATHS
#define CATTN_GEMM_OP(isa, name, sfx, args)                                              \
    ((isa) == CATTN_ISA_AVX512   ? name##_##sfx##_avx512 args                              \
     : (isa) == CATTN_ISA_WIDE16 ? name##_##sfx##_wide16 args                              \
     : (isa) == CATTN_ISA_AVX2   ? name##_##sfx##_avx2 args                                \
                                 : name##_##sfx##_portable args)
#elif CATTN_HAVE_GENERIC_VECTORS
#define CATTN_GEMM_OP(isa, name, sfx, args) ((void)(isa), name##_##sfx##_portable args)
#else /* the portable path uses BLAS and never calls these */
#define CATTN_GEMM_OP(isa, name, sfx, args) ((void)(isa))
#endif

/* The entry points: the plan's instruction set picks the instance. */
#define CATTN_GEMM_ENTRY_POINTS(T, sfx)                                                     \
    static inline void cattn_pack_keys_##sfx(int isa, const T *k, ptrdiff_t k_rs,            \
                                             ptrdiff_t n_keys, ptrdiff_t E, T *packed)       \
    {                                                                                        \
        CATTN_GEMM_OP(isa, cattn_pack_keys, sfx, (k, k_rs, n_keys, E, packed));              \
    }                                                                                        \
    static inline void cattn_gemm_qkt_##sfx(int isa, ptrdiff_t rows, ptrdiff_t n_keys,       \
                                            ptrdiff_t E, T alpha, const T *q, ptrdiff_t q_rs,\
                                            const T *packed, T *c, ptrdiff_t ldc)            \
    {                                                                                        \
        CATTN_GEMM_OP(isa, cattn_gemm_qkt, sfx, (rows, n_keys, E, alpha, q, q_rs, packed, c, \
                                                 ldc));                                      \
    }                                                                                        \
    static inline void cattn_linear_##sfx(int isa, ptrdiff_t rows, ptrdiff_t n_out,        \
                                          ptrdiff_t K, const T *a, ptrdiff_t lda,          \
                                          const T *packed, const T *bias, T *c,            \
                                          ptrdiff_t ldc)                                   \
    {                                                                                        \
        CATTN_GEMM_OP(isa, cattn_linear, sfx, (rows, n_out, K, a, lda, packed, bias, c, ldc)); \
    }                                                                                        \
    static inline void cattn_gemm_pv_##sfx(int isa, ptrdiff_t rows, ptrdiff_t Ev,            \
                                           ptrdiff_t n_keys, const T *p, ptrdiff_t ldp,      \
                                           const T *v, ptrdiff_t v_rs, T *acc,               \
                                           ptrdiff_t ld_acc)                                 \
    {                                                                                        \
        CATTN_GEMM_OP(isa, cattn_gemm_pv, sfx, (rows, Ev, n_keys, p, ldp, v, v_rs, acc,      \
                                                ld_acc));                                    \
    }                                                                                        \
    static inline void cattn_gemm_qkt_direct_##sfx(int isa, ptrdiff_t rows,                  \
                                                   ptrdiff_t n_keys, ptrdiff_t E, T alpha,   \
                                                   const T *q, ptrdiff_t q_rs, const T *k,   \
                                                   ptrdiff_t k_rs, T *c, ptrdiff_t ldc)      \
    {                                                                                        \
        CATTN_GEMM_OP(isa, cattn_gemm_qkt_direct, sfx, (rows, n_keys, E, alpha, q, q_rs, k,  \
                                                        k_rs, c, ldc));                      \
    }                                                                                        \
    static inline void cattn_gemm_pv_direct_##sfx(int isa, ptrdiff_t rows, ptrdiff_t Ev,     \
                                                  ptrdiff_t n_keys, const T *p,              \
                                                  ptrdiff_t ldp, const T *v, ptrdiff_t v_rs, \
                                                  T *acc, ptrdiff_t ld_acc)                  \
    {                                                                                        \
        CATTN_GEMM_OP(isa, cattn_gemm_pv_direct, sfx, (rows, Ev, n_keys, p, ldp, v, v_rs,    \
                                                       acc, ld_acc));                        \
    }

CATTN_GEMM_ENTRY_POINTS(float, f32)
CATTN_GEMM_ENTRY_POINTS(double, f64)
#undef CATTN_GEMM_ENTRY_POINTS

/* The routines that read float16, bfloat16 or int8 keys and values (computing in float32):
 * the element type (CATTN_ELEM_*) and the plan's instruction set pick the instance; ARGS
 * name the stored elements kv_. */
#define CATTN_BY_ELEMENT(isa, elem, name, src, ARGS)                                       \
    switch (elem) {                                                                        \
    case CATTN_ELEM_F16: {                                                                 \
        const uint16_t *kv_ = (const uint16_t *)(src);                                     \
        CATTN_GEMM_OP(isa, name, f16, ARGS);                                               \
        break;                                                                             \
    }                                                                                      \
    case CATTN_ELEM_BF16: {                                                                \
        const uint16_t *kv_ = (const uint16_t *)(src);                                     \
        CATTN_GEMM_OP(isa, name, bf16, ARGS);                                              \
        break;                                                                             \
    }                                                                                      \
    case CATTN_ELEM_I8: {                                                                  \
        const int8_t *kv_ = (const int8_t *)(src);                                         \
        CATTN_GEMM_OP(isa, name, i8, ARGS);                                                \
        break;                                                                             \
    }                                                                                      \
    default: break;                                                                        \
    }

static inline void cattn_pack_keys_cvt(int isa, int elem, const void *k, ptrdiff_t k_rs,
                                       ptrdiff_t n_keys, ptrdiff_t E, float *packed)
{
    CATTN_BY_ELEMENT(isa, elem, cattn_pack_keys, k, (kv_, k_rs, n_keys, E, packed));
}

static inline void cattn_gemm_qkt_direct_cvt(int isa, int elem, ptrdiff_t rows,
                                             ptrdiff_t n_keys, ptrdiff_t E, float alpha,
                                             const float *q, ptrdiff_t q_rs, const void *k,
                                             ptrdiff_t k_rs, float *c, ptrdiff_t ldc)
{
    CATTN_BY_ELEMENT(isa, elem, cattn_gemm_qkt_direct, k,
                     (rows, n_keys, E, alpha, q, q_rs, kv_, k_rs, c, ldc));
}

static inline void cattn_gemm_pv_direct_cvt(int isa, int elem, ptrdiff_t rows, ptrdiff_t Ev,
                                            ptrdiff_t n_keys, const float *p, ptrdiff_t ldp,
                                            const void *v, ptrdiff_t v_rs, float *acc,
                                            ptrdiff_t ld_acc)
{
    CATTN_BY_ELEMENT(isa, elem, cattn_gemm_pv_direct, v,
                     (rows, Ev, n_keys, p, ldp, kv_, v_rs, acc, ld_acc));
}

/* dst[r][0:cols] = src[r][0:cols] as float32 (a block of keys for BLAS, of values for the
 * P·V micro-kernels). */
static inline void cattn_convert_rows(int isa, int elem, const void *src, ptrdiff_t src_rs,
                                      ptrdiff_t rows, ptrdiff_t cols, float *dst,
                                      ptrdiff_t dst_rs)
{
#if CATTN_HAVE_GENERIC_VECTORS
    CATTN_BY_ELEMENT(isa, elem, cattn_convert_rows, src,
                     (kv_, src_rs, rows, cols, dst, dst_rs));
#else
    (void)isa;
    cattn_convert_rows_scalar(elem, src, src_rs, rows, cols, dst, dst_rs);
#endif
}
#undef CATTN_BY_ELEMENT

/* the native bfloat16 block products of the levels above AVX-512 */
#include "cattn_bf16.h"

#endif /* CATTN_GEMM_H */

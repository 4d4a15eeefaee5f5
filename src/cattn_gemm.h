/*
 * The two block GEMMs of the attention loop, as register-tiled AVX2+FMA micro-kernels:
 *   scores = alpha · Q_blk · K_blkᵀ   (inner dimension E, often only 64)
 *   acc   += P · V_blk                (inner dimension block_k)
 *
 * Why not BLAS here: each call is small (a few hundred rows, inner dimension 64), and a
 * general sgemm packs both operands on every call: for the P·V product that is a copy of
 * the whole probability block, measured at ~12% of the run time with OpenBLAS. Here Q and
 * P are read in place, V rows are read in place, and K is packed once per key block and
 * reused by every row tile. The caller uses BLAS instead when the CPU lacks AVX2+FMA
 * (cattn_gemm_available() is 0): other CPUs still get a vendor-tuned GEMM.
 */
#ifndef CATTN_GEMM_H
#define CATTN_GEMM_H

#include "cattn_simd.h"

#if CATTN_HAVE_AVX2_PATH
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
#endif

/* Up to this many query rows, the block GEMMs stream K and V in place (decoding). */
#define CATTN_DIRECT_ROWS 4

/* ---- float: 8 lanes, 6×16 register tile */
#define T float
#define SFX f32
#define W 8
#if CATTN_HAVE_AVX2_PATH
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
#endif
#include "cattn_gemm_impl.h"

/* ---- double: 4 lanes, 6×8 register tile */
#define T double
#define SFX f64
#define W 4
#if CATTN_HAVE_AVX2_PATH
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
#endif
#include "cattn_gemm_impl.h"

/* Keys per packed panel (the micro-kernels' column width), per precision. */
#define CATTN_PANEL_F32 16
#define CATTN_PANEL_F64 8

/* Whether cattn_gemm_qkt/pv_* are the fast kernels on this CPU (else the caller uses BLAS). */
static inline int cattn_gemm_available(void) { return cattn_cpu_has_avx2_fma(); }

#endif /* CATTN_GEMM_H */

/*
 * The compute ceiling of one core, measured: a loop of independent multiply-adds on
 * registers only (no loads, no stores), per precision and instruction-set path. A library
 * GEMM (the benchmark's other ceiling) can sit well below it (a GEMM library tuned for
 * another core type, say), so that a kernel may run at "150% of sgemm"; the register peak
 * is what no kernel exceeds.
 *
 * Twelve accumulators: enough to cover an FMA latency of 4 cycles on two FMA ports.
 * Each pass is 12 multiply-adds of one vector (2 flops per lane).
 */
#ifndef CATTN_PEAK_H
#define CATTN_PEAK_H

#include "cattn_simd.h"

#define CATTN_PEAK_ACCUMULATORS 12

#if CATTN_HAVE_X86_PATHS
CATTN_AVX2 static double cattn_peak_hsum_ps256(__m256 x)
{
    float lanes[8], s = 0;
    _mm256_storeu_ps(lanes, x);
    for (int l = 0; l < 8; l++) s += lanes[l];
    return s;
}
CATTN_AVX2 static double cattn_peak_hsum_pd256(__m256d x)
{
    double lanes[4], s = 0;
    _mm256_storeu_pd(lanes, x);
    for (int l = 0; l < 4; l++) s += lanes[l];
    return s;
}

#define ISFX avx512
#define TGT CATTN_AVX512
#define VF __m512
#define VD __m512d
#define ZEROF() _mm512_setzero_ps()
#define ZEROD() _mm512_setzero_pd()
#define SET1F(x) _mm512_set1_ps(x)
#define SET1D(x) _mm512_set1_pd(x)
#define FMAF(x, a, b) _mm512_fmadd_ps(x, a, b)
#define FMAD(x, a, b) _mm512_fmadd_pd(x, a, b)
#define ADDF(x, y) _mm512_add_ps(x, y)
#define ADDD(x, y) _mm512_add_pd(x, y)
#define HSUMF(x) _mm512_reduce_add_ps(x)
#define HSUMD(x) _mm512_reduce_add_pd(x)
#include "cattn_peak_impl.h"

#define ISFX avx2
#define TGT CATTN_AVX2
#define VF __m256
#define VD __m256d
#define ZEROF() _mm256_setzero_ps()
#define ZEROD() _mm256_setzero_pd()
#define SET1F(x) _mm256_set1_ps(x)
#define SET1D(x) _mm256_set1_pd(x)
#define FMAF(x, a, b) _mm256_fmadd_ps(x, a, b)
#define FMAD(x, a, b) _mm256_fmadd_pd(x, a, b)
#define ADDF(x, y) _mm256_add_ps(x, y)
#define ADDD(x, y) _mm256_add_pd(x, y)
#define HSUMF(x) cattn_peak_hsum_ps256(x)
#define HSUMD(x) cattn_peak_hsum_pd256(x)
#include "cattn_peak_impl.h"
#endif

/* The portable path: scalars, a multiply and an add (what the baseline build may fuse or
 * vectorize is up to the compiler). */
#define ISFX portable
#define TGT
#define VF float
#define VD double
#define ZEROF() 0.0f
#define ZEROD() 0.0
#define SET1F(x) ((float)(x))
#define SET1D(x) (x)
#define FMAF(x, a, b) ((x) * (a) + (b))
#define FMAD(x, a, b) ((x) * (a) + (b))
#define ADDF(x, y) ((x) + (y))
#define ADDD(x, y) ((x) + (y))
#define HSUMF(x) (x)
#define HSUMD(x) (x)
#include "cattn_peak_impl.h"

/* Flops of one pass on path `isa` (0 for a path this build lacks). */
static inline double cattn_peak_pass_flops(int isa, int is_double)
{
    int lanes = 1;
#if CATTN_HAVE_X86_PATHS
    if (isa == CATTN_ISA_AVX512) lanes = is_double ? 8 : 16;
    else if (isa == CATTN_ISA_AVX2) lanes = is_double ? 4 : 8;
#else
    if (isa != CATTN_ISA_PORTABLE) return 0;
#endif
    return 2.0 * CATTN_PEAK_ACCUMULATORS * lanes;
}

/* `passes` passes of the register loop on path `isa` (AVX-512, AVX2 or portable). */
static inline double cattn_peak_run(int isa, int is_double, long passes)
{
#if CATTN_HAVE_X86_PATHS
    if (isa == CATTN_ISA_AVX512)
        return is_double ? cattn_peak_f64_avx512(passes) : cattn_peak_f32_avx512(passes);
    if (isa == CATTN_ISA_AVX2)
        return is_double ? cattn_peak_f64_avx2(passes) : cattn_peak_f32_avx2(passes);
#endif
    return is_double ? cattn_peak_f64_portable(passes) : cattn_peak_f32_portable(passes);
}

#endif /* CATTN_PEAK_H */

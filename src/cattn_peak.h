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

/* The body of every instance: acc[i] = acc[i] * a + b, `passes` times, returning a value
 * that depends on every accumulator (so that no compiler drops the loop). */
#define CATTN_PEAK_BODY(V, ZERO, SET1, FMA, ADD, HSUM)                                    \
    V acc[CATTN_PEAK_ACCUMULATORS];                                                     \
    const V a = SET1(0.999999), b = SET1(1e-7);                                         \
    for (int i = 0; i < CATTN_PEAK_ACCUMULATORS; i++) acc[i] = ZERO;                    \
    for (long p = 0; p < passes; p++) {                                                 \
        _Pragma("GCC unroll 12")                                                        \
        for (int i = 0; i < CATTN_PEAK_ACCUMULATORS; i++) acc[i] = FMA(acc[i], a, b);   \
    }                                                                                   \
    V total = acc[0];                                                                   \
    for (int i = 1; i < CATTN_PEAK_ACCUMULATORS; i++) total = ADD(total, acc[i]);       \
    return HSUM(total);

#if CATTN_HAVE_X86_PATHS
CATTN_AVX512 static double cattn_peak_f32_avx512(long passes)
{
    CATTN_PEAK_BODY(__m512, _mm512_setzero_ps(), _mm512_set1_ps, _mm512_fmadd_ps,
                    _mm512_add_ps, _mm512_reduce_add_ps)
}
CATTN_AVX512 static double cattn_peak_f64_avx512(long passes)
{
    CATTN_PEAK_BODY(__m512d, _mm512_setzero_pd(), _mm512_set1_pd, _mm512_fmadd_pd,
                    _mm512_add_pd, _mm512_reduce_add_pd)
}
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
CATTN_AVX2 static double cattn_peak_f32_avx2(long passes)
{
    CATTN_PEAK_BODY(__m256, _mm256_setzero_ps(), _mm256_set1_ps, _mm256_fmadd_ps,
                    _mm256_add_ps, cattn_peak_hsum_ps256)
}
CATTN_AVX2 static double cattn_peak_f64_avx2(long passes)
{
    CATTN_PEAK_BODY(__m256d, _mm256_setzero_pd(), _mm256_set1_pd, _mm256_fmadd_pd,
                    _mm256_add_pd, cattn_peak_hsum_pd256)
}
#endif

/* The portable path: scalars, a multiply and an add (what the baseline build may fuse or
 * vectorize is up to the compiler). */
#define CATTN_PEAK_SCALAR_FMA(x, a, b) ((x) * (a) + (b))
#define CATTN_PEAK_SCALAR_ADD(x, y) ((x) + (y))
#define CATTN_PEAK_SCALAR_SET1(x) (x)
#define CATTN_PEAK_SCALAR_HSUM(x) (x)
static double cattn_peak_f32_portable(long passes)
{
    CATTN_PEAK_BODY(float, 0.0f, (float)CATTN_PEAK_SCALAR_SET1, CATTN_PEAK_SCALAR_FMA,
                    CATTN_PEAK_SCALAR_ADD, CATTN_PEAK_SCALAR_HSUM)
}
static double cattn_peak_f64_portable(long passes)
{
    CATTN_PEAK_BODY(double, 0.0, CATTN_PEAK_SCALAR_SET1, CATTN_PEAK_SCALAR_FMA,
                    CATTN_PEAK_SCALAR_ADD, CATTN_PEAK_SCALAR_HSUM)
}

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

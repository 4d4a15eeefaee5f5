/*
 * Row operations of the online softmax: row max, and x <- exp(x - shift) with the row sum.
 *
 * A scalar libm exp per score would dominate the run time of attention, so exp is a
 * polynomial after range reduction (Cephes-style for float, degree-13 Taylor for double,
 * both within about 1 ulp of libm on the range the softmax uses, x <= 0). The vector float
 * paths compute the softmax's exp(x - shift) as a power of 2 (cattn_softmax_exp_*).
 *
 * One build of each function per instruction-set path (cattn_cpu.h): AVX-512F and AVX2+FMA
 * intrinsics, each compiled with a target attribute so a default (baseline x86-64) wheel
 * still carries them, and a portable scalar version. The path is a parameter (`isa`) chosen
 * once per call from the CPU's features, so the same binary runs everywhere and the result
 * never depends on the thread that computes it.
 */
#ifndef CATTN_SIMD_H
#define CATTN_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cattn_cpu.h"

/* ---------------------------------------------------------------- scalar exp */

/* exp(x) for float; 0 below the underflow threshold, NaN stays NaN. */
static inline float cattn_expf_scalar(float x)
{
    if (x < -87.33654f) return 0.0f;
    if (x > 88.0f) x = 88.0f; /* keeps 2^n finite */
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float y = 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.0f;
    if (x != x) return x;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
}

/* Taylor coefficients 1/k!, k = 13 down to 2, for exp on |r| <= ln(2)/2. */
#define CATTN_EXP_D_COEFFS                                                         \
    1.6059043836821614599e-10, 2.0876756987868098979e-9, 2.5052108385441718775e-8, \
    2.7557319223985890653e-7, 2.7557319223985890653e-6, 2.4801587301587301587e-5,  \
    1.9841269841269841270e-4, 1.3888888888888888889e-3, 8.3333333333333333333e-3,  \
    4.1666666666666666667e-2, 1.6666666666666666667e-1, 0.5

static const double cattn_exp_d_coeffs[12] = {CATTN_EXP_D_COEFFS};

/* exp(x) for double; 0 below the underflow threshold, NaN stays NaN. */
static inline double cattn_exp_scalar(double x)
{
    if (x < -708.3964185322641) return 0.0;
    if (x > 709.0) x = 709.0; /* keeps 2^n finite */
    double n = nearbyint(x * 1.4426950408889634074);
    double r = x - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    double y = cattn_exp_d_coeffs[0];
    for (int c = 1; c < 12; c++) y = y * r + cattn_exp_d_coeffs[c];
    y = (y * r + 1.0) * r + 1.0;
    if (x != x) return x;
    int64_t bits = ((int64_t)n + 1023) << 52;
    double two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
}

/* ------------------------------------------------------ portable row functions */

/* Row max; NaN if any element is NaN (a NaN score must poison its row, as in the
 * definition, not vanish from the max). */
static float cattn_row_max_f32_generic(const float *x, ptrdiff_t n)
{
    float m = -INFINITY;
    int nan = 0;
    for (ptrdiff_t j = 0; j < n; j++) {
        m = x[j] > m ? x[j] : m;
        nan |= x[j] != x[j];
    }
    return nan ? NAN : m;
}

static double cattn_row_max_f64_generic(const double *x, ptrdiff_t n)
{
    double m = -INFINITY;
    int nan = 0;
    for (ptrdiff_t j = 0; j < n; j++) {
        m = x[j] > m ? x[j] : m;
        nan |= x[j] != x[j];
    }
    return nan ? NAN : m;
}

static float cattn_exp_shift_sum_f32_generic(float *x, ptrdiff_t n, float shift)
{
    float sum = 0.0f;
    for (ptrdiff_t j = 0; j < n; j++) {
        x[j] = cattn_expf_scalar(x[j] - shift);
        sum += x[j];
    }
    return sum;
}

static double cattn_exp_shift_sum_f64_generic(double *x, ptrdiff_t n, double shift)
{
    double sum = 0.0;
    for (ptrdiff_t j = 0; j < n; j++) {
        x[j] = cattn_exp_scalar(x[j] - shift);
        sum += x[j];
    }
    return sum;
}

/* ------------------------------------------------------------ AVX2 + FMA path */
#if CATTN_HAVE_X86_PATHS
#define CATTN_AVX2 __attribute__((target("avx2,fma")))

CATTN_AVX2 static inline __m256d cattn_exp_avx2_pd(__m256d x)
{
    const __m256d too_small = _mm256_cmp_pd(x, _mm256_set1_pd(-708.3964185322641), _CMP_LT_OQ);
    x = _mm256_min_pd(_mm256_set1_pd(709.0), x);
    __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634074)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93145751953125e-1), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.42860682030941723212e-6), r);
    __m256d y = _mm256_set1_pd(cattn_exp_d_coeffs[0]);
    for (int c = 1; c < 12; c++) y = _mm256_fmadd_pd(y, r, _mm256_set1_pd(cattn_exp_d_coeffs[c]));
    y = _mm256_fmadd_pd(y, r, _mm256_set1_pd(1.0));
    y = _mm256_fmadd_pd(y, r, _mm256_set1_pd(1.0));
    /* n is integral and within [-1022, 1024] here: build 2^n from its 64-bit exponent. */
    __m256i n64 = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
    __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(n64, _mm256_set1_epi64x(1023)), 52);
    y = _mm256_mul_pd(y, _mm256_castsi256_pd(bits));
    return _mm256_andnot_pd(too_small, y);
}

CATTN_AVX2 static float cattn_row_max_f32_avx2(const float *x, ptrdiff_t n)
{
    /* max_ps drops NaN depending on operand order: NaN is tracked separately. */
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, nan = _mm256_setzero_ps();
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
        m0 = _mm256_max_ps(m0, a);
        m1 = _mm256_max_ps(m1, b);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    }
    for (; j + 8 <= n; j += 8) {
        __m256 a = _mm256_loadu_ps(x + j);
        m0 = _mm256_max_ps(m0, a);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    }
    m0 = _mm256_max_ps(m0, m1);
    float lanes[8];
    _mm256_storeu_ps(lanes, m0);
    float m = cattn_row_max_f32_generic(lanes, 8);
    float tail = cattn_row_max_f32_generic(x + j, n - j);
    if (_mm256_movemask_ps(nan) || tail != tail) return NAN;
    return tail > m ? tail : m;
}

CATTN_AVX2 static double cattn_row_max_f64_avx2(const double *x, ptrdiff_t n)
{
    __m256d m0 = _mm256_set1_pd(-INFINITY), m1 = m0, nan = _mm256_setzero_pd();
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256d a = _mm256_loadu_pd(x + j), b = _mm256_loadu_pd(x + j + 4);
        m0 = _mm256_max_pd(m0, a);
        m1 = _mm256_max_pd(m1, b);
        nan = _mm256_or_pd(nan, _mm256_cmp_pd(a, b, _CMP_UNORD_Q));
    }
    for (; j + 4 <= n; j += 4) {
        __m256d a = _mm256_loadu_pd(x + j);
        m0 = _mm256_max_pd(m0, a);
        nan = _mm256_or_pd(nan, _mm256_cmp_pd(a, a, _CMP_UNORD_Q));
    }
    m0 = _mm256_max_pd(m0, m1);
    double lanes[4];
    _mm256_storeu_pd(lanes, m0);
    double m = cattn_row_max_f64_generic(lanes, 4);
    double tail = cattn_row_max_f64_generic(x + j, n - j);
    if (_mm256_movemask_pd(nan) || tail != tail) return NAN;
    return tail > m ? tail : m;
}

/* The softmax's exp(x - shift), as 2^t with t = x·log2(e) - shift·log2(e): one fused
 * multiply-add against shift·log2(e) rounded (hi), then its rounding error (lo) taken off,
 * three operations fewer than exp's two-step range reduction. Without lo, the row's terms
 * would all be off by the same factor, up to 2^(ulp(hi)/2) (3.5e-4 at scores of 1e4), and
 * blocks of keys folded with different maxima would disagree by it. Rounding t costs a
 * relative error of about ulp(t), large only where exp(x - shift) is tiny against the row's
 * largest term (1 at x = shift). (Cephes' exp2f polynomial on [-1/2, 1/2].) */
#define CATTN_LOG2E_F 1.44269504088896341f
#define CATTN_EXP2_POLY(FMA, SET1, f)                                                   \
    FMA(FMA(FMA(FMA(FMA(SET1(1.535336188319500E-4f), f, SET1(1.339887440266574E-3f)), f, \
                    SET1(9.618437357674640E-3f)),                                       \
                f, SET1(5.550332471162809E-2f)),                                        \
            f, SET1(2.402264791363012E-1f)),                                            \
        f, SET1(6.931472028550421E-1f))

/* -(shift·log2(e)) as hi + lo, hi the float nearest, lo its rounding error (exact). */
__attribute__((target("fma"))) static inline void
cattn_neg_shift_log2e(float shift, float *hi, float *lo)
{
    *hi = -shift * CATTN_LOG2E_F;
    *lo = __builtin_fmaf(-shift, CATTN_LOG2E_F, -*hi);
}

/* Past this |shift|, shift·log2(e) would overflow: such rows (a mask of -1e38, an infinite
 * or NaN score) take the scalar exp(x - shift), which follows IEEE arithmetic exactly. */
#define CATTN_SOFTMAX_EXP2_MAX_SHIFT 1e37f

CATTN_AVX2 static inline __m256 cattn_softmax_exp_avx2_ps(__m256 x, __m256 neg_shift_hi,
                                                         __m256 neg_shift_lo)
{
    __m256 t = _mm256_add_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(CATTN_LOG2E_F), neg_shift_hi),
                             neg_shift_lo);
    const __m256 too_small = _mm256_cmp_ps(t, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
    t = _mm256_min_ps(_mm256_set1_ps(127.0f), t); /* NaN stays NaN (second operand) */
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(t, n);
    __m256 y = _mm256_fmadd_ps(CATTN_EXP2_POLY(_mm256_fmadd_ps, _mm256_set1_ps, f), f,
                               _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(too_small, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

CATTN_AVX2 static float cattn_exp_shift_sum_f32_avx2(float *x, ptrdiff_t n, float shift)
{
    if (!(fabsf(shift) <= CATTN_SOFTMAX_EXP2_MAX_SHIFT))
        return cattn_exp_shift_sum_f32_generic(x, n, shift);
    float hi, lo;
    cattn_neg_shift_log2e(shift, &hi, &lo);
    const __m256 vhi = _mm256_set1_ps(hi), vlo = _mm256_set1_ps(lo);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 e0 = cattn_softmax_exp_avx2_ps(_mm256_loadu_ps(x + j), vhi, vlo);
        __m256 e1 = cattn_softmax_exp_avx2_ps(_mm256_loadu_ps(x + j + 8), vhi, vlo);
        _mm256_storeu_ps(x + j, e0);
        _mm256_storeu_ps(x + j + 8, e1);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    for (; j + 8 <= n; j += 8) {
        __m256 e0 = cattn_softmax_exp_avx2_ps(_mm256_loadu_ps(x + j), vhi, vlo);
        _mm256_storeu_ps(x + j, e0);
        s0 = _mm256_add_ps(s0, e0);
    }
    s0 = _mm256_add_ps(s0, s1);
    float lanes[8];
    _mm256_storeu_ps(lanes, s0);
    float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    return sum + cattn_exp_shift_sum_f32_generic(x + j, n - j, shift);
}

CATTN_AVX2 static double cattn_exp_shift_sum_f64_avx2(double *x, ptrdiff_t n, double shift)
{
    const __m256d vshift = _mm256_set1_pd(shift);
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256d e0 = cattn_exp_avx2_pd(_mm256_sub_pd(_mm256_loadu_pd(x + j), vshift));
        __m256d e1 = cattn_exp_avx2_pd(_mm256_sub_pd(_mm256_loadu_pd(x + j + 4), vshift));
        _mm256_storeu_pd(x + j, e0);
        _mm256_storeu_pd(x + j + 4, e1);
        s0 = _mm256_add_pd(s0, e0);
        s1 = _mm256_add_pd(s1, e1);
    }
    for (; j + 4 <= n; j += 4) {
        __m256d e0 = cattn_exp_avx2_pd(_mm256_sub_pd(_mm256_loadu_pd(x + j), vshift));
        _mm256_storeu_pd(x + j, e0);
        s0 = _mm256_add_pd(s0, e0);
    }
    s0 = _mm256_add_pd(s0, s1);
    double lanes[4];
    _mm256_storeu_pd(lanes, s0);
    double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    return sum + cattn_exp_shift_sum_f64_generic(x + j, n - j, shift);
}

#endif /* CATTN_HAVE_X86_PATHS (AVX2) */

/* ---------------------------------------------------------------- AVX-512F path */
#if CATTN_HAVE_X86_PATHS
#define CATTN_AVX512 __attribute__((target("avx512f,fma")))

/* The same polynomial as the AVX2 double exp; 2^n is applied with scalef, which needs no
 * integer conversion. */
CATTN_AVX512 static inline __m512d cattn_exp_avx512_pd(__m512d x)
{
    const __mmask8 too_small = _mm512_cmp_pd_mask(x, _mm512_set1_pd(-708.3964185322641), _CMP_LT_OQ);
    x = _mm512_min_pd(_mm512_set1_pd(709.0), x);
    __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634074)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93145751953125e-1), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.42860682030941723212e-6), r);
    __m512d y = _mm512_set1_pd(cattn_exp_d_coeffs[0]);
    for (int c = 1; c < 12; c++) y = _mm512_fmadd_pd(y, r, _mm512_set1_pd(cattn_exp_d_coeffs[c]));
    y = _mm512_fmadd_pd(y, r, _mm512_set1_pd(1.0));
    y = _mm512_fmadd_pd(y, r, _mm512_set1_pd(1.0));
    return _mm512_maskz_mov_pd(~too_small, _mm512_scalef_pd(y, n));
}

/* Lanes [0, n) of a 16- or 8-lane mask (n may be <= 0 or past the width). */
static inline __mmask16 cattn_mask16(ptrdiff_t n)
{
    return n <= 0 ? 0 : n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

static inline __mmask8 cattn_mask8(ptrdiff_t n)
{
    return n <= 0 ? 0 : n >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << n) - 1);
}

CATTN_AVX512 static float cattn_row_max_f32_avx512(const float *x, ptrdiff_t n)
{
    /* max_ps drops NaN depending on operand order: NaN is tracked separately. */
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    __m512 m0 = neg_inf, m1 = neg_inf;
    __mmask16 nan = 0;
    ptrdiff_t j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
        m0 = _mm512_max_ps(m0, a);
        m1 = _mm512_max_ps(m1, b);
        nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    }
    for (; j < n; j += 16) { /* masked lanes read -inf, never past the end */
        __m512 a = _mm512_mask_loadu_ps(neg_inf, cattn_mask16(n - j), x + j);
        m0 = _mm512_max_ps(m0, a);
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    }
    return nan ? NAN : _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

CATTN_AVX512 static double cattn_row_max_f64_avx512(const double *x, ptrdiff_t n)
{
    const __m512d neg_inf = _mm512_set1_pd(-INFINITY);
    __m512d m0 = neg_inf, m1 = neg_inf;
    __mmask8 nan = 0;
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512d a = _mm512_loadu_pd(x + j), b = _mm512_loadu_pd(x + j + 8);
        m0 = _mm512_max_pd(m0, a);
        m1 = _mm512_max_pd(m1, b);
        nan |= _mm512_cmp_pd_mask(a, b, _CMP_UNORD_Q);
    }
    for (; j < n; j += 8) {
        __m512d a = _mm512_mask_loadu_pd(neg_inf, cattn_mask8(n - j), x + j);
        m0 = _mm512_max_pd(m0, a);
        nan |= _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q);
    }
    return nan ? NAN : _mm512_reduce_max_pd(_mm512_max_pd(m0, m1));
}

/* The softmax's exp(x - shift) as 2^t, as in cattn_softmax_exp_avx2_ps. */
CATTN_AVX512 static inline __m512 cattn_softmax_exp_avx512_ps(__m512 x, __m512 neg_shift_hi,
                                                             __m512 neg_shift_lo)
{
    const __m512 t = _mm512_add_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(CATTN_LOG2E_F), neg_shift_hi), neg_shift_lo);
    const __mmask16 too_small = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    const __m512 y = _mm512_fmadd_ps(CATTN_EXP2_POLY(_mm512_fmadd_ps, _mm512_set1_ps, f), f,
                                     _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~too_small, _mm512_scalef_ps(y, n)); /* NaN stays NaN */
}

CATTN_AVX512 static float cattn_exp_shift_sum_f32_avx512(float *x, ptrdiff_t n, float shift)
{
    if (!(fabsf(shift) <= CATTN_SOFTMAX_EXP2_MAX_SHIFT))
        return cattn_exp_shift_sum_f32_generic(x, n, shift);
    float hi, lo;
    cattn_neg_shift_log2e(shift, &hi, &lo);
    const __m512 vhi = _mm512_set1_ps(hi), vlo = _mm512_set1_ps(lo);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    ptrdiff_t j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512 e0 = cattn_softmax_exp_avx512_ps(_mm512_loadu_ps(x + j), vhi, vlo);
        __m512 e1 = cattn_softmax_exp_avx512_ps(_mm512_loadu_ps(x + j + 16), vhi, vlo);
        _mm512_storeu_ps(x + j, e0);
        _mm512_storeu_ps(x + j + 16, e1);
        s0 = _mm512_add_ps(s0, e0);
        s1 = _mm512_add_ps(s1, e1);
    }
    for (; j < n; j += 16) {
        __mmask16 m = cattn_mask16(n - j);
        __m512 e0 = cattn_softmax_exp_avx512_ps(_mm512_maskz_loadu_ps(m, x + j), vhi, vlo);
        _mm512_mask_storeu_ps(x + j, m, e0);
        s0 = _mm512_mask_add_ps(s0, m, s0, e0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

CATTN_AVX512 static double cattn_exp_shift_sum_f64_avx512(double *x, ptrdiff_t n, double shift)
{
    const __m512d vshift = _mm512_set1_pd(shift);
    __m512d s0 = _mm512_setzero_pd(), s1 = s0;
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512d e0 = cattn_exp_avx512_pd(_mm512_sub_pd(_mm512_loadu_pd(x + j), vshift));
        __m512d e1 = cattn_exp_avx512_pd(_mm512_sub_pd(_mm512_loadu_pd(x + j + 8), vshift));
        _mm512_storeu_pd(x + j, e0);
        _mm512_storeu_pd(x + j + 8, e1);
        s0 = _mm512_add_pd(s0, e0);
        s1 = _mm512_add_pd(s1, e1);
    }
    for (; j < n; j += 8) {
        __mmask8 m = cattn_mask8(n - j);
        __m512d e0 = cattn_exp_avx512_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(m, x + j), vshift));
        _mm512_mask_storeu_pd(x + j, m, e0);
        s0 = _mm512_mask_add_pd(s0, m, s0, e0);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}
#endif /* CATTN_HAVE_X86_PATHS (AVX-512) */

/* ------------------------------------------------------------------ dispatch */

#if CATTN_HAVE_X86_PATHS
#define CATTN_ROW_OP(isa, name, args)                                                   \
    ((isa) == CATTN_ISA_AVX512 ? name##_avx512 args                                    \
     : ((isa) == CATTN_ISA_AVX2 || (isa) == CATTN_ISA_WIDE16) ? name##_avx2 args      \
                                                              : name##_generic args)
#else
#define CATTN_ROW_OP(isa, name, args) name##_generic args
#endif

static inline float cattn_row_max_f32(int isa, const float *x, ptrdiff_t n)
{
    return CATTN_ROW_OP(isa, cattn_row_max_f32, (x, n));
}

static inline double cattn_row_max_f64(int isa, const double *x, ptrdiff_t n)
{
    return CATTN_ROW_OP(isa, cattn_row_max_f64, (x, n));
}

static inline float cattn_exp_shift_sum_f32(int isa, float *x, ptrdiff_t n, float shift)
{
    return CATTN_ROW_OP(isa, cattn_exp_shift_sum_f32, (x, n, shift));
}

static inline double cattn_exp_shift_sum_f64(int isa, double *x, ptrdiff_t n, double shift)
{
    return CATTN_ROW_OP(isa, cattn_exp_shift_sum_f64, (x, n, shift));
}

/* Sum of a contiguous float array, as fast as the loads go (4 independent accumulators):
 * the probe the benchmark uses for the machine's streaming read rate. */
#if CATTN_HAVE_X86_PATHS
CATTN_AVX2 static float cattn_stream_sum_f32_avx2(const float *x, ptrdiff_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    ptrdiff_t j = 0;
    for (; j + 32 <= n; j += 32) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + j));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + j + 8));
        s2 = _mm256_add_ps(s2, _mm256_loadu_ps(x + j + 16));
        s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x + j + 24));
    }
    float lanes[8], sum = 0;
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (int l = 0; l < 8; l++) sum += lanes[l];
    for (; j < n; j++) sum += x[j];
    return sum;
}
#endif

static inline float cattn_stream_sum_f32(int isa, const float *x, ptrdiff_t n)
{
#if CATTN_HAVE_X86_PATHS
    if (isa == CATTN_ISA_AVX2 || isa == CATTN_ISA_AVX512) return cattn_stream_sum_f32_avx2(x, n);
#endif
    (void)isa;
    float s[4] = {0, 0, 0, 0};
    ptrdiff_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int l = 0; l < 4; l++) s[l] += x[j + l];
    for (; j < n; j++) s[0] += x[j];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

#endif /* CATTN_SIMD_H */

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
 * still carries them, and a portable scalar version. The vector paths are one code,
 * cattn_simd_impl.h, included once per instruction set with its intrinsics as parameter
 * macros (as the GEMMs: cattn_gemm.h, cattn_gemm_impl.h). The path is a parameter (`isa`)
 * chosen once per call from the CPU's features, so the same binary runs everywhere and the
 * result never depends on the thread that computes it.
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

/* ------------------------------------------------------------------ vector paths */
/* name_isa: the functions of one instance of a per-instruction-set template */
#define CATTN_SIMD_CAT_(a, b) a##_##b
#define CATTN_SIMD_CAT(a, b) CATTN_SIMD_CAT_(a, b)

#if CATTN_HAVE_X86_PATHS
#define CATTN_AVX2 __attribute__((target("avx2,fma")))
#define CATTN_AVX512 __attribute__((target("avx512f,fma")))

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

/* AVX2's horizontal steps, lanes through memory: the max by the portable function, the
 * sum as a fixed tree. */
CATTN_AVX2 static inline float cattn_hmax_avx2_ps(__m256 v)
{
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    return cattn_row_max_f32_generic(lanes, 8);
}

CATTN_AVX2 static inline double cattn_hmax_avx2_pd(__m256d v)
{
    double lanes[4];
    _mm256_storeu_pd(lanes, v);
    return cattn_row_max_f64_generic(lanes, 4);
}

CATTN_AVX2 static inline float cattn_hsum_avx2_ps(__m256 v)
{
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
           ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

CATTN_AVX2 static inline double cattn_hsum_avx2_pd(__m256d v)
{
    double lanes[4];
    _mm256_storeu_pd(lanes, v);
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

/* 2^n (n integral, within the exponent's range) from its exponent bits. */
CATTN_AVX2 static inline __m256 cattn_pow2_avx2_ps(__m256 n)
{
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

CATTN_AVX2 static inline __m256d cattn_pow2_avx2_pd(__m256d n)
{
    __m256i n64 = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
    return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(n64, _mm256_set1_epi64x(1023)), 52));
}

/* AVX2 + FMA: 8 floats, 4 doubles; no masked loads, so the rows' tails are scalar. */
#define ISFX avx2
#define TGT CATTN_AVX2
#define SCALAR_TAIL 1
#define VF __m256
#define VD __m256d
#define WF 8
#define WD 4
#define NANF __m256
#define NAND __m256d
#define TAILF int
#define TAILD int
#define TAIL_MASKF(n) 0
#define TAIL_MASKD(n) 0
#define LOADF(p) _mm256_loadu_ps(p)
#define LOADD(p) _mm256_loadu_pd(p)
#define STOREF(p, v) _mm256_storeu_ps(p, v)
#define STORED(p, v) _mm256_storeu_pd(p, v)
#define SET1F(x) _mm256_set1_ps(x)
#define SET1D(x) _mm256_set1_pd(x)
#define ZEROF() _mm256_setzero_ps()
#define ZEROD() _mm256_setzero_pd()
#define ADDF(a, b) _mm256_add_ps(a, b)
#define ADDD(a, b) _mm256_add_pd(a, b)
#define SUBF(a, b) _mm256_sub_ps(a, b)
#define SUBD(a, b) _mm256_sub_pd(a, b)
#define MULD(a, b) _mm256_mul_pd(a, b)
#define MAXF(a, b) _mm256_max_ps(a, b)
#define MAXD(a, b) _mm256_max_pd(a, b)
#define MIND(a, b) _mm256_min_pd(a, b)
#define FMADDF(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FMADDD(a, b, c) _mm256_fmadd_pd(a, b, c)
#define FNMADDD(a, b, c) _mm256_fnmadd_pd(a, b, c)
#define ROUNDF(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define ROUNDD(v) _mm256_round_pd(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define LTF(a, b) _mm256_cmp_ps(a, b, _CMP_LT_OQ)
#define LTD(a, b) _mm256_cmp_pd(a, b, _CMP_LT_OQ)
#define UNORDF(a, b) _mm256_cmp_ps(a, b, _CMP_UNORD_Q)
#define UNORDD(a, b) _mm256_cmp_pd(a, b, _CMP_UNORD_Q)
#define NAN_NONEF() _mm256_setzero_ps()
#define NAN_NONED() _mm256_setzero_pd()
#define NAN_ORF(s, t) _mm256_or_ps(s, t)
#define NAN_ORD(s, t) _mm256_or_pd(s, t)
#define NAN_ANYF(s) _mm256_movemask_ps(s)
#define NAN_ANYD(s) _mm256_movemask_pd(s)
#define ZERO_WHEREF(m, v) _mm256_andnot_ps(m, v)
#define ZERO_WHERED(m, v) _mm256_andnot_pd(m, v)
#define POW2F(y, n) _mm256_mul_ps(y, cattn_pow2_avx2_ps(n))
#define POW2D(y, n) _mm256_mul_pd(y, cattn_pow2_avx2_pd(n))
#define CLAMP_EXP2F(t) _mm256_min_ps(_mm256_set1_ps(127.0f), t) /* NaN stays NaN */
#define HMAXF(v) cattn_hmax_avx2_ps(v)
#define HMAXD(v) cattn_hmax_avx2_pd(v)
#define HSUMF(v) cattn_hsum_avx2_ps(v)
#define HSUMD(v) cattn_hsum_avx2_pd(v)
#define LOAD_TAILF(p, m, fill) _mm256_loadu_ps(p)
#define LOAD_TAILD(p, m, fill) _mm256_loadu_pd(p)
#define STORE_TAILF(p, m, v) _mm256_storeu_ps(p, v)
#define STORE_TAILD(p, m, v) _mm256_storeu_pd(p, v)
#define ADD_TAILF(s, m, v) _mm256_add_ps(s, v)
#define ADD_TAILD(s, m, v) _mm256_add_pd(s, v)
#include "cattn_simd_impl.h"

/* Lanes [0, n) of a 16- or 8-lane mask (n may be <= 0 or past the width). */
static inline __mmask16 cattn_mask16(ptrdiff_t n)
{
    return n <= 0 ? 0 : n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

static inline __mmask8 cattn_mask8(ptrdiff_t n)
{
    return n <= 0 ? 0 : n >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << n) - 1);
}

/* AVX-512F: 16 floats, 8 doubles; comparisons into mask registers, masked row tails, 2^n
 * applied with scalef (no integer conversion, no clamp needed). */
#define ISFX avx512
#define TGT CATTN_AVX512
#define SCALAR_TAIL 0
#define VF __m512
#define VD __m512d
#define WF 16
#define WD 8
#define NANF __mmask16
#define NAND __mmask8
#define TAILF __mmask16
#define TAILD __mmask8
#define TAIL_MASKF(n) cattn_mask16(n)
#define TAIL_MASKD(n) cattn_mask8(n)
#define LOADF(p) _mm512_loadu_ps(p)
#define LOADD(p) _mm512_loadu_pd(p)
#define STOREF(p, v) _mm512_storeu_ps(p, v)
#define STORED(p, v) _mm512_storeu_pd(p, v)
#define SET1F(x) _mm512_set1_ps(x)
#define SET1D(x) _mm512_set1_pd(x)
#define ZEROF() _mm512_setzero_ps()
#define ZEROD() _mm512_setzero_pd()
#define ADDF(a, b) _mm512_add_ps(a, b)
#define ADDD(a, b) _mm512_add_pd(a, b)
#define SUBF(a, b) _mm512_sub_ps(a, b)
#define SUBD(a, b) _mm512_sub_pd(a, b)
#define MULD(a, b) _mm512_mul_pd(a, b)
#define MAXF(a, b) _mm512_max_ps(a, b)
#define MAXD(a, b) _mm512_max_pd(a, b)
#define MIND(a, b) _mm512_min_pd(a, b)
#define FMADDF(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FMADDD(a, b, c) _mm512_fmadd_pd(a, b, c)
#define FNMADDD(a, b, c) _mm512_fnmadd_pd(a, b, c)
#define ROUNDF(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define ROUNDD(v) _mm512_roundscale_pd(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define LTF(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)
#define LTD(a, b) _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ)
#define UNORDF(a, b) _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q)
#define UNORDD(a, b) _mm512_cmp_pd_mask(a, b, _CMP_UNORD_Q)
#define NAN_NONEF() ((__mmask16)0)
#define NAN_NONED() ((__mmask8)0)
#define NAN_ORF(s, t) ((__mmask16)((s) | (t)))
#define NAN_ORD(s, t) ((__mmask8)((s) | (t)))
#define NAN_ANYF(s) (s)
#define NAN_ANYD(s) (s)
#define ZERO_WHEREF(m, v) _mm512_maskz_mov_ps((__mmask16)~(m), v)
#define ZERO_WHERED(m, v) _mm512_maskz_mov_pd((__mmask8)~(m), v)
#define POW2F(y, n) _mm512_scalef_ps(y, n)
#define POW2D(y, n) _mm512_scalef_pd(y, n)
#define CLAMP_EXP2F(t) (t)
#define HMAXF(v) _mm512_reduce_max_ps(v)
#define HMAXD(v) _mm512_reduce_max_pd(v)
#define HSUMF(v) _mm512_reduce_add_ps(v)
#define HSUMD(v) _mm512_reduce_add_pd(v)
#define LOAD_TAILF(p, m, fill) _mm512_mask_loadu_ps(fill, m, p)
#define LOAD_TAILD(p, m, fill) _mm512_mask_loadu_pd(fill, m, p)
#define STORE_TAILF(p, m, v) _mm512_mask_storeu_ps(p, m, v)
#define STORE_TAILD(p, m, v) _mm512_mask_storeu_pd(p, m, v)
#define ADD_TAILF(s, m, v) _mm512_mask_add_ps(s, m, s, v)
#define ADD_TAILD(s, m, v) _mm512_mask_add_pd(s, m, s, v)
#include "cattn_simd_impl.h"
#endif /* CATTN_HAVE_X86_PATHS */

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

/* Sum of a contiguous float array, as fast as the loads go: the probe the benchmark uses
 * for the machine's streaming read rate. The array is read as four stretches at once, one
 * accumulator each: a core reads memory faster with several sequential streams in flight
 * than with one (12.0 against 9.4 GB/s on an Ice Lake Xeon), and the decoding kernels read
 * that way too, so one stream would be a ceiling they pass. */
#if CATTN_HAVE_X86_PATHS
CATTN_AVX2 static float cattn_stream_sum_f32_avx2(const float *x, ptrdiff_t n)
{
    const ptrdiff_t len = n / 32 * 8; /* each stretch's length, in whole vectors */
    const float *x1 = x + len, *x2 = x + 2 * len, *x3 = x + 3 * len;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (ptrdiff_t j = 0; j < len; j += 8) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + j));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x1 + j));
        s2 = _mm256_add_ps(s2, _mm256_loadu_ps(x2 + j));
        s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x3 + j));
    }
    float lanes[8], sum = 0;
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (int l = 0; l < 8; l++) sum += lanes[l];
    for (ptrdiff_t j = 4 * len; j < n; j++) sum += x[j];
    return sum;
}
#endif

static inline float cattn_stream_sum_f32(int isa, const float *x, ptrdiff_t n)
{
#if CATTN_HAVE_X86_PATHS
    if (isa == CATTN_ISA_AVX2 || isa == CATTN_ISA_AVX512) return cattn_stream_sum_f32_avx2(x, n);
#endif
    (void)isa;
    const ptrdiff_t len = n / 4;
    float s[4] = {0, 0, 0, 0};
    for (ptrdiff_t j = 0; j < len; j++)
        for (int l = 0; l < 4; l++) s[l] += x[l * len + j];
    for (ptrdiff_t j = 4 * len; j < n; j++) s[0] += x[j];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

#endif /* CATTN_SIMD_H */

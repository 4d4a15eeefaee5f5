/*
 * One instruction-set instance of the vector row operations (cattn_simd.h); included by
 * cattn_simd.h once per instance with
 *   ISFX      instruction-set suffix of the functions (cattn_row_max_f32_ISFX, ...)
 *   TGT       the function attribute that enables the instruction set
 *   VF, VD    vectors of float and double;  WF, WD  their lanes
 *   NANF, NAND  the type of a lane set from a comparison (a vector, or a mask register)
 *   TAILF, TAILD  the type of a tail mask;  TAIL_MASKF(n), TAIL_MASKD(n)  lanes [0, n)
 *   SCALAR_TAIL  1: the loops stop at the last whole vector and the rest of the row goes
 *                through the scalar functions (no masked loads: AVX2); 0: the last,
 *                partial vector is masked (AVX-512)
 * and the intrinsic macros, each an F (float) and a D (double) form:
 *   LOADF(p) STOREF(p, v) SET1F(x) ZEROF() ADDF(a, b) SUBF(a, b) MAXF(a, b)
 *   MULD(a, b) MIND(a, b)    (double only)
 *   FMADDF(a, b, c)  a·b + c        FNMADDD(a, b, c)  c - a·b (double only)
 *   ROUNDF(v)        to the nearest integer         LTF(a, b)  lanes a < b (NANF)
 *   UNORDF(a, b)     lanes where a or b is NaN (NANF)
 *   NAN_NONEF()  NAN_ORF(s, t)  NAN_ANYF(s)   no lane, union, whether any lane
 *   ZERO_WHEREF(m, v)  v with lanes m set to +0     POW2F(y, n)  y·2^n (n integral)
 *   CLAMP_EXP2F(t)   t clamped where 2^t must stay finite (or t: POW2F needs none)
 *   HMAXF(v) HSUMF(v)  horizontal max and sum
 *   LOAD_TAILF(p, m, fill)  STORE_TAILF(p, m, v)  ADD_TAILF(s, m, v): the masked forms
 *                (SCALAR_TAIL: the whole-vector ones)
 * Every instance shares this one code; only the vector width, the intrinsics and the tail
 * differ. All parameter macros are #undef'd at the end.
 */
#define CATTN_SIMD_FN(name) CATTN_SIMD_CAT(name, ISFX)

/* exp(x) for double, the polynomial of cattn_exp_scalar; 0 below the underflow threshold. */
TGT static inline VD CATTN_SIMD_FN(cattn_exp_pd)(VD x)
{
    const NAND too_small = LTD(x, SET1D(-708.3964185322641));
    x = MIND(SET1D(709.0), x);
    VD n = ROUNDD(MULD(x, SET1D(1.4426950408889634074)));
    VD r = FNMADDD(n, SET1D(6.93145751953125e-1), x);
    r = FNMADDD(n, SET1D(1.42860682030941723212e-6), r);
    VD y = SET1D(cattn_exp_d_coeffs[0]);
    for (int c = 1; c < 12; c++) y = FMADDD(y, r, SET1D(cattn_exp_d_coeffs[c]));
    y = FMADDD(y, r, SET1D(1.0));
    y = FMADDD(y, r, SET1D(1.0));
    return ZERO_WHERED(too_small, POW2D(y, n));
}

/* The softmax's exp(x - shift) as 2^t (see CATTN_EXP2_POLY). */
TGT static inline VF CATTN_SIMD_FN(cattn_softmax_exp_ps)(VF x, VF neg_shift_hi,
                                                         VF neg_shift_lo)
{
    VF t = ADDF(FMADDF(x, SET1F(CATTN_LOG2E_F), neg_shift_hi), neg_shift_lo);
    const NANF too_small = LTF(t, SET1F(-126.0f));
    t = CLAMP_EXP2F(t);
    const VF n = ROUNDF(t);
    const VF f = SUBF(t, n);
    const VF y = FMADDF(CATTN_EXP2_POLY(FMADDF, SET1F, f), f, SET1F(1.0f));
    return ZERO_WHEREF(too_small, POW2F(y, n)); /* NaN stays NaN */
}

/* Row max, NaN if any element is NaN: max drops NaN depending on operand order, so NaN
 * is tracked separately. */
#define CATTN_SIMD_ROW_MAX(T, V, W, NAN_T, SFX, LOAD, MAX, SET1, UNORD, NAN_NONE, NAN_OR,     \
                           NAN_ANY, HMAX, TAIL_MASK, LOAD_TAIL)                              \
    TGT static T CATTN_SIMD_FN(cattn_row_max_##SFX)(const T *x, ptrdiff_t n)                 \
    {                                                                                        \
        const V neg_inf = SET1(-INFINITY);                                                   \
        V m0 = neg_inf, m1 = neg_inf;                                                        \
        NAN_T nan = NAN_NONE();                                                              \
        ptrdiff_t j = 0;                                                                     \
        for (; j + 2 * (W) <= n; j += 2 * (W)) {                                             \
            V a = LOAD(x + j), b = LOAD(x + j + (W));                                        \
            m0 = MAX(m0, a);                                                                 \
            m1 = MAX(m1, b);                                                                 \
            nan = NAN_OR(nan, UNORD(a, b));                                                  \
        }                                                                                    \
        for (; SCALAR_TAIL ? j + (W) <= n : j < n; j += (W)) {                               \
            V a = LOAD_TAIL(x + j, TAIL_MASK(n - j), neg_inf);                               \
            m0 = MAX(m0, a);                                                                 \
            nan = NAN_OR(nan, UNORD(a, a));                                                  \
        }                                                                                    \
        if (!SCALAR_TAIL) return NAN_ANY(nan) ? NAN : HMAX(MAX(m0, m1));                     \
        T m = HMAX(MAX(m0, m1));                                                             \
        T tail = cattn_row_max_##SFX##_generic(x + j, n - j);                                \
        if (NAN_ANY(nan) || tail != tail) return NAN;                                        \
        return tail > m ? tail : m;                                                          \
    }
CATTN_SIMD_ROW_MAX(float, VF, WF, NANF, f32, LOADF, MAXF, SET1F, UNORDF, NAN_NONEF, NAN_ORF,
                   NAN_ANYF, HMAXF, TAIL_MASKF, LOAD_TAILF)
CATTN_SIMD_ROW_MAX(double, VD, WD, NAND, f64, LOADD, MAXD, SET1D, UNORDD, NAN_NONED, NAN_ORD,
                   NAN_ANYD, HMAXD, TAIL_MASKD, LOAD_TAILD)
#undef CATTN_SIMD_ROW_MAX

/* x <- exp(x - shift) over the row, returning the row's sum; EXP(v) is the vector
 * exp(v - shift) (its setup in PREPARE). */
#define CATTN_SIMD_EXP_SHIFT_SUM(T, V, W, TAIL_T, SFX, PREPARE, EXP, LOAD, STORE, ADD, ZERO,  \
                                 HSUM, TAIL_MASK, LOAD_TAIL, STORE_TAIL, ADD_TAIL)           \
    TGT static T CATTN_SIMD_FN(cattn_exp_shift_sum_##SFX)(T *x, ptrdiff_t n, T shift)        \
    {                                                                                        \
        PREPARE                                                                              \
        V s0 = ZERO(), s1 = s0;                                                              \
        ptrdiff_t j = 0;                                                                     \
        for (; j + 2 * (W) <= n; j += 2 * (W)) {                                             \
            V e0 = EXP(LOAD(x + j)), e1 = EXP(LOAD(x + j + (W)));                            \
            STORE(x + j, e0);                                                                \
            STORE(x + j + (W), e1);                                                          \
            s0 = ADD(s0, e0);                                                                \
            s1 = ADD(s1, e1);                                                                \
        }                                                                                    \
        for (; SCALAR_TAIL ? j + (W) <= n : j < n; j += (W)) {                               \
            TAIL_T m = TAIL_MASK(n - j);                                                     \
            (void)m;                                                                         \
            V e0 = EXP(LOAD_TAIL(x + j, m, ZERO()));                                         \
            STORE_TAIL(x + j, m, e0);                                                        \
            s0 = ADD_TAIL(s0, m, e0);                                                        \
        }                                                                                    \
        T sum = HSUM(ADD(s0, s1));                                                           \
        return SCALAR_TAIL ? sum + cattn_exp_shift_sum_##SFX##_generic(x + j, n - j, shift)  \
                           : sum;                                                            \
    }
/* Rows whose shift·log2(e) would overflow take the scalar exp (CATTN_SOFTMAX_EXP2_MAX_SHIFT) */
#define CATTN_SIMD_PREPARE_F32                                                               \
    if (!(fabsf(shift) <= CATTN_SOFTMAX_EXP2_MAX_SHIFT))                                     \
        return cattn_exp_shift_sum_f32_generic(x, n, shift);                                 \
    float hi, lo;                                                                            \
    cattn_neg_shift_log2e(shift, &hi, &lo);                                                  \
    const VF vhi = SET1F(hi), vlo = SET1F(lo);
#define CATTN_SIMD_EXP_F32(v) CATTN_SIMD_FN(cattn_softmax_exp_ps)(v, vhi, vlo)
#define CATTN_SIMD_PREPARE_F64 const VD vshift = SET1D(shift);
#define CATTN_SIMD_EXP_F64(v) CATTN_SIMD_FN(cattn_exp_pd)(SUBD(v, vshift))
CATTN_SIMD_EXP_SHIFT_SUM(float, VF, WF, TAILF, f32, CATTN_SIMD_PREPARE_F32, CATTN_SIMD_EXP_F32,
                         LOADF, STOREF, ADDF, ZEROF, HSUMF, TAIL_MASKF, LOAD_TAILF,
                         STORE_TAILF, ADD_TAILF)
CATTN_SIMD_EXP_SHIFT_SUM(double, VD, WD, TAILD, f64, CATTN_SIMD_PREPARE_F64, CATTN_SIMD_EXP_F64,
                         LOADD, STORED, ADDD, ZEROD, HSUMD, TAIL_MASKD, LOAD_TAILD,
                         STORE_TAILD, ADD_TAILD)
#undef CATTN_SIMD_EXP_SHIFT_SUM
#undef CATTN_SIMD_PREPARE_F32
#undef CATTN_SIMD_EXP_F32
#undef CATTN_SIMD_PREPARE_F64
#undef CATTN_SIMD_EXP_F64
#undef CATTN_SIMD_FN

#undef ISFX
#undef TGT
#undef VF
#undef VD
#undef WF
#undef WD
#undef NANF
#undef NAND
#undef TAILF
#undef TAILD
#undef TAIL_MASKF
#undef TAIL_MASKD
#undef SCALAR_TAIL
#undef LOADF
#undef LOADD
#undef STOREF
#undef STORED
#undef SET1F
#undef SET1D
#undef ZEROF
#undef ZEROD
#undef ADDF
#undef ADDD
#undef SUBF
#undef SUBD
#undef MULD
#undef MAXF
#undef MAXD
#undef MIND
#undef FMADDF
#undef FMADDD
#undef FNMADDD
#undef ROUNDF
#undef ROUNDD
#undef LTF
#undef LTD
#undef UNORDF
#undef UNORDD
#undef NAN_NONEF
#undef NAN_NONED
#undef NAN_ORF
#undef NAN_ORD
#undef NAN_ANYF
#undef NAN_ANYD
#undef ZERO_WHEREF
#undef ZERO_WHERED
#undef POW2F
#undef POW2D
#undef CLAMP_EXP2F
#undef HMAXF
#undef HMAXD
#undef HSUMF
#undef HSUMD
#undef LOAD_TAILF
#undef LOAD_TAILD
#undef STORE_TAILF
#undef STORE_TAILD
#undef ADD_TAILF
#undef ADD_TAILD

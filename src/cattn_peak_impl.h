/*
 * One instruction-set instance of the register peak loop (cattn_peak.h), float and double;
 * included by cattn_peak.h once per instance with
 *   ISFX  instruction-set suffix (cattn_peak_f32_ISFX, cattn_peak_f64_ISFX)
 *   TGT   the function attribute that enables it (empty for the portable path)
 *   VF, VD  vectors (or scalars) of float and double
 * and, each in an F and a D form: ZERO(), SET1(x), FMA(x, a, b) x·a + b, ADD(x, y),
 * HSUM(x) (a double). All parameter macros are #undef'd at the end.
 */
#define CATTN_PEAK_FN(name) CATTN_SIMD_CAT(name, ISFX)

/* acc[i] = acc[i] * a + b, `passes` times, returning a value that depends on every
 * accumulator (so that no compiler drops the loop). */
#define CATTN_PEAK_LOOP(V, SFX, ZERO, SET1, FMA, ADD, HSUM)                                 \
    TGT static double CATTN_PEAK_FN(cattn_peak_##SFX)(long passes)                          \
    {                                                                                       \
        V acc[CATTN_PEAK_ACCUMULATORS];                                                     \
        const V a = SET1(0.999999), b = SET1(1e-7);                                         \
        for (int i = 0; i < CATTN_PEAK_ACCUMULATORS; i++) acc[i] = ZERO();                  \
        for (long p = 0; p < passes; p++) {                                                 \
            _Pragma("GCC unroll 12")                                                        \
            for (int i = 0; i < CATTN_PEAK_ACCUMULATORS; i++) acc[i] = FMA(acc[i], a, b);   \
        }                                                                                   \
        V total = acc[0];                                                                   \
        for (int i = 1; i < CATTN_PEAK_ACCUMULATORS; i++) total = ADD(total, acc[i]);       \
        return HSUM(total);                                                                 \
    }
CATTN_PEAK_LOOP(VF, f32, ZEROF, SET1F, FMAF, ADDF, HSUMF)
CATTN_PEAK_LOOP(VD, f64, ZEROD, SET1D, FMAD, ADDD, HSUMD)
#undef CATTN_PEAK_LOOP
#undef CATTN_PEAK_FN

#undef ISFX
#undef TGT
#undef VF
#undef VD
#undef ZEROF
#undef ZEROD
#undef SET1F
#undef SET1D
#undef FMAF
#undef FMAD
#undef ADDF
#undef ADDD
#undef HSUMF
#undef HSUMD

/*
 * Which instruction set the kernels may use: detected once, when cattn._kernel is imported
 * (under the GIL, before any call can run), and passed to every kernel as part of its plan.
 *
 * Each path is compiled with a function-level target attribute, so a default build (the
 * platform's baseline flags) carries all of them and a CPU only ever executes the code of a
 * path it supports: no SIGILL on import or on a call.
 *
 *   CATTN_ISA_PORTABLE  scalar row operations, block GEMMs as micro-kernels on the compiler's
 *                       generic vectors for the platform's baseline (SSE2, NEON; any CPU);
 *                       through BLAS where the compiler has no generic vectors (MSVC)
 *   CATTN_ISA_AVX2      AVX2 + FMA micro-kernels, 8 floats per vector
 *   CATTN_ISA_AVX512    AVX-512F micro-kernels, 16 floats per vector
 *   CATTN_ISA_WIDE16    (tests only) the AVX-512 shapes of the micro-kernels -- 16 floats
 *                       per vector, the same register tiles, tails and masks -- built from
 *                       GCC's generic vectors for AVX2, so that a CPU without AVX-512 still
 *                       checks that logic; never chosen by default
 *   CATTN_ISA_BLAS      (tests only) the portable path with BLAS block GEMMs, as MSVC
 *                       builds run it
 */
#ifndef CATTN_CPU_H
#define CATTN_CPU_H

/* (CATTN_NO_X86_PATHS builds an x86 machine as any other CPU: how the non-x86 build is
 * checked here) */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(CATTN_NO_X86_PATHS)
#define CATTN_HAVE_X86_PATHS 1
#include <immintrin.h>
#else
#define CATTN_HAVE_X86_PATHS 0
#endif

enum { CATTN_ISA_PORTABLE = 0, CATTN_ISA_AVX2 = 1, CATTN_ISA_AVX512 = 2, CATTN_ISA_WIDE16 = 3,
       CATTN_ISA_BLAS = 4 };

/* The best path this CPU (and its operating system: libgcc checks that the OS saves the
 * wide registers) supports, ignoring any cap. */
static int cattn_isa_supported(void)
{
#if CATTN_HAVE_X86_PATHS
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return CATTN_ISA_PORTABLE;
    if (__builtin_cpu_supports("avx512f"))
        return CATTN_ISA_AVX512;
    return CATTN_ISA_AVX2;
#else
    return CATTN_ISA_PORTABLE;
#endif
}

static const char *cattn_isa_name(int isa)
{
    switch (isa) {
    case CATTN_ISA_AVX512: return "avx512";
    case CATTN_ISA_AVX2: return "avx2";
    case CATTN_ISA_WIDE16: return "wide16";
    case CATTN_ISA_BLAS: return "blas";
    default: return "portable";
    }
}

/* Whether a CPU whose best path is `supported` can run path `isa`. */
static inline int cattn_isa_runs_on(int isa, int supported)
{
    if (isa == CATTN_ISA_WIDE16) return supported >= CATTN_ISA_AVX2;
    if (isa == CATTN_ISA_BLAS) return 1;
    return isa >= CATTN_ISA_PORTABLE && isa <= supported;
}

#endif /* CATTN_CPU_H */

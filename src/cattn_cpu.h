/*
 * Which instruction set the kernels may use: detected once, when cattn._kernel is imported
 * (under the GIL, before any call can run), and passed to every kernel as part of its plan.
 *
 * Each path is compiled with a function-level target attribute, so a default build (the
 * platform's baseline flags) carries all of them and a CPU only ever executes the code of a
 * path it supports: no SIGILL on import or on a call.
 *
 *   CATTN_ISA_PORTABLE  scalar row operations, block GEMMs through BLAS (any CPU)
 *   CATTN_ISA_AVX2      AVX2 + FMA micro-kernels, 8 floats per vector
 *   CATTN_ISA_AVX512    AVX-512F micro-kernels, 16 floats per vector
 */
#ifndef CATTN_CPU_H
#define CATTN_CPU_H

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CATTN_HAVE_X86_PATHS 1
#include <immintrin.h>
#else
#define CATTN_HAVE_X86_PATHS 0
#endif

enum { CATTN_ISA_PORTABLE = 0, CATTN_ISA_AVX2 = 1, CATTN_ISA_AVX512 = 2 };

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
    default: return "portable";
    }
}

#endif /* CATTN_CPU_H */

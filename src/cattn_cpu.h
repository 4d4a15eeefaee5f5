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
 *   CATTN_ISA_AVX2      AVX2 + FMA (+ F16C) micro-kernels, 8 floats per vector
 *   CATTN_ISA_AVX512    AVX-512F micro-kernels, 16 floats per vector
 *   CATTN_ISA_AVX512_BF16  AVX-512 for float32/float64; bfloat16 block products with
 *                       vdpbf16ps (cattn_bf16.h)
 *   CATTN_ISA_AMX       as AVX512_BF16, with AMX-BF16 tiles for bfloat16 blocks of 16 rows
 *                       or more (needs the operating system to grant the tile state)
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

/* The paths from portable to AMX form a chain, each level running everything below it;
 * the test-only paths come after it. */
enum { CATTN_ISA_PORTABLE = 0, CATTN_ISA_AVX2 = 1, CATTN_ISA_AVX512 = 2,
       CATTN_ISA_AVX512_BF16 = 3, CATTN_ISA_AMX = 4, CATTN_ISA_BEST = CATTN_ISA_AMX,
       CATTN_ISA_WIDE16 = 5, CATTN_ISA_BLAS = 6 };

/* The emulation build (tests only): the bfloat16 levels' instructions in software. */
#if CATTN_HAVE_X86_PATHS && defined(CATTN_EMULATE_ISA)
#define CATTN_ISA_EMULATED 1
#include "cattn_emulate.h"
#else
#define CATTN_ISA_EMULATED 0
#endif

#if CATTN_HAVE_X86_PATHS
#include <cpuid.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* vdpbf16ps, and the AVX-512 BW/VL loads the bfloat16 packing uses. */
static int cattn_cpu_has_avx512_bf16(void)
{
    unsigned a, b, c, d;
    if (!(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")))
        return 0;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 1, a, b, c, d);
    return (a >> 5) & 1;
}

/* AMX-TILE and the tile products `product_bit` names (CPUID leaf 7 EDX: 22 AMX-BF16, 25
 * AMX-INT8) in the CPU, the tile state enabled by the operating system (XCR0 bits 17-18),
 * and, on Linux, this process granted permission to use it (a request: the kernel refuses
 * tile instructions to a process that never asked; asking again is harmless). Elsewhere,
 * no AMX. */
static int cattn_os_grants_tiles(unsigned product_bit)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    unsigned a, b, c, d, xcr0_lo, xcr0_hi;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 24) & 1) || !((d >> product_bit) & 1)) return 0;
    __cpuid(1, a, b, c, d);
    if (!((c >> 27) & 1)) return 0; /* OSXSAVE: xgetbv is available */
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return 0;
    /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    (void)product_bit;
    return 0;
#endif
}

#define CATTN_AMX_BF16_BIT 22
#define CATTN_AMX_INT8_BIT 25

/* The one tile shape cattn's AMX kernels use: palette 1, tiles 0-7 of 16 rows × 64 bytes.
 * Each block product configures it at its start and releases the tiles at its end, so no
 * tile state outlives a call on the thread. */
struct cattn_tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

#if CATTN_ISA_EMULATED
#define CATTN_TILE_TGT CATTN_EMU_TGT
#else
#define CATTN_TILE_TGT __attribute__((target("amx-tile")))
#endif

CATTN_TILE_TGT static void cattn_amx_configure(void)
{
    struct cattn_tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}
#endif

/* The best path this CPU (and its operating system: libgcc checks that the OS saves the
 * wide registers) supports, ignoring any cap. */
static int cattn_isa_supported(void)
{
#if CATTN_HAVE_X86_PATHS
    __builtin_cpu_init();
    /* (every AVX2 CPU has F16C too; the AVX2 path converts float16 with it) */
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c")))
        return CATTN_ISA_PORTABLE;
    if (!__builtin_cpu_supports("avx512f"))
        return CATTN_ISA_AVX2;
#if CATTN_ISA_EMULATED
    if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
        return CATTN_ISA_AMX; /* cattn_emulate.h runs the bfloat16 levels on AVX-512 */
#endif
    if (!cattn_cpu_has_avx512_bf16())
        return CATTN_ISA_AVX512;
    return cattn_os_grants_tiles(CATTN_AMX_BF16_BIT) ? CATTN_ISA_AMX : CATTN_ISA_AVX512_BF16;
#else
    return CATTN_ISA_PORTABLE;
#endif
}

static const char *cattn_isa_name(int isa)
{
    switch (isa) {
    case CATTN_ISA_AMX: return "amx";
    case CATTN_ISA_AVX512_BF16: return "avx512_bf16";
    case CATTN_ISA_AVX512: return "avx512";
    case CATTN_ISA_AVX2: return "avx2";
    case CATTN_ISA_WIDE16: return "wide16";
    case CATTN_ISA_BLAS: return "blas";
    default: return "portable";
    }
}

/* The path whose float32/float64 kernels and row operations a path uses: the native
 * bfloat16 levels are AVX-512 for every other dtype. */
static inline int cattn_isa_float_path(int isa)
{
    return isa == CATTN_ISA_AVX512_BF16 || isa == CATTN_ISA_AMX ? CATTN_ISA_AVX512 : isa;
}

/* Whether a CPU whose best path is `supported` can run path `isa`. */
static inline int cattn_isa_runs_on(int isa, int supported)
{
    if (isa == CATTN_ISA_WIDE16) return supported >= CATTN_ISA_AVX2;
    if (isa == CATTN_ISA_BLAS) return 1;
    return isa >= CATTN_ISA_PORTABLE && isa <= supported;
}

#endif /* CATTN_CPU_H */

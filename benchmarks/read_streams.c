/*
 * How fast one core reads memory as 1, 2 or 4 sequential streams at once, for rows stored
 * as float32, float16 and int8 (each converted to float32 and summed, as a decoding
 * kernel converts a narrow K/V cache). The decoding streams read their keys and values as
 * several stretches at once because of what this shows.
 *
 *   cc -O2 -mavx512f -mf16c benchmarks/read_streams.c -o /tmp/read_streams && /tmp/read_streams
 *
 * Prints GB/s of stored bytes per pass over 256 MiB (best of 3), one line per stream count.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define LOAD_F32(p) _mm512_loadu_ps((const float *)(p))
#define LOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))

/* Sum of n bytes at x read as `streams` stretches at once, STEP bytes per vector. */
#define SUM_STREAMS(NAME, LOAD, STEP)                                                      \
    static float NAME(const char *x, size_t n, int streams)                                 \
    {                                                                                        \
        __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;                                 \
        const size_t len = n / streams;                                                      \
        if (streams == 1) {                                                                  \
            for (size_t i = 0; i < n; i += 4 * STEP) {                                       \
                a = _mm512_add_ps(a, LOAD(x + i));                                           \
                b = _mm512_add_ps(b, LOAD(x + i + STEP));                                    \
                c = _mm512_add_ps(c, LOAD(x + i + 2 * STEP));                                \
                d = _mm512_add_ps(d, LOAD(x + i + 3 * STEP));                                \
            }                                                                                \
        } else if (streams == 2) {                                                           \
            for (size_t i = 0; i < len; i += 2 * STEP) {                                     \
                a = _mm512_add_ps(a, LOAD(x + i));                                           \
                b = _mm512_add_ps(b, LOAD(x + i + STEP));                                    \
                c = _mm512_add_ps(c, LOAD(x + len + i));                                     \
                d = _mm512_add_ps(d, LOAD(x + len + i + STEP));                              \
            }                                                                                \
        } else {                                                                             \
            for (size_t i = 0; i < len; i += STEP) {                                         \
                a = _mm512_add_ps(a, LOAD(x + i));                                           \
                b = _mm512_add_ps(b, LOAD(x + len + i));                                     \
                c = _mm512_add_ps(c, LOAD(x + 2 * len + i));                                 \
                d = _mm512_add_ps(d, LOAD(x + 3 * len + i));                                 \
            }                                                                                \
        }                                                                                    \
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d))); \
    }

SUM_STREAMS(sum_f32, LOAD_F32, 64)
SUM_STREAMS(sum_f16, LOAD_F16, 32)
SUM_STREAMS(sum_i8, LOAD_I8, 16)

typedef float (*sum_fn)(const char *, size_t, int);

static double rate(sum_fn f, const char *x, size_t n, int streams)
{
    double best = 1e30;
    volatile float sink;
    for (int r = 0; r < 3; r++) {
        const double t0 = now();
        sink = f(x, n, streams);
        const double t = now() - t0;
        if (t < best) best = t;
    }
    (void)sink;
    return n / best / 1e9;
}

int main(void)
{
    const size_t n = (size_t)256 << 20;
    char *x = aligned_alloc(2 << 20, n);
    if (x == NULL) return 1;
    memset(x, 0, n);
    for (int streams = 1; streams <= 4; streams *= 2)
        printf("%d stream(s): float32 %.1f  float16 %.1f  int8 %.1f GB/s\n", streams,
               rate(sum_f32, x, n, streams), rate(sum_f16, x, n, streams),
               rate(sum_i8, x, n, streams));
    free(x);
    return 0;
}

/* Bounds checks of the debug build (CATTN_DEBUG=1 at build time, see setup.py).
 *
 * The kernel trusts its plan: a wrong table offset or task extent writes outside an array,
 * which the release build only shows as a crash somewhere else, or not at all. The debug
 * build checks each write site against the bytes its array spans and aborts at the first
 * one outside, naming it. Without CATTN_DEBUG every check compiles to nothing (its
 * arguments are never evaluated) and CATTN_DEBUG_BUILD is 0, so code under
 * `if CATTN_DEBUG_BUILD:` is removed by the compiler. */
#ifndef CATTN_DEBUG_H
#define CATTN_DEBUG_H

#include <stddef.h>

/* The bytes [lo, hi) an operand spans, whatever its strides. */
typedef struct {
    const char* lo;
    const char* hi;
} cattn_extent;

#ifdef CATTN_DEBUG
#include <stdio.h>
#include <stdlib.h>

#define CATTN_DEBUG_BUILD 1

static void cattn_debug_fail(const char* what, const char* detail, const char* file, int line) {
    fprintf(stderr, "cattn debug build: %s %s (%s:%d)\n", what, detail, file, line);
    fflush(stderr);
    abort();
}

/* Aborts unless the elements of `size` bytes from `first` to `last` (inclusive; last may lie
 * before first, along a negative stride) lie in e. */
static void cattn_debug_inside(cattn_extent e, const void* first, const void* last,
                               size_t size, const char* what, const char* file, int line) {
    const char* a = (const char*)(first < last ? first : last);
    const char* b = (const char*)(first < last ? last : first) + size;
    char detail[200];
    if (a >= e.lo && b <= e.hi)
        return;
    snprintf(detail, sizeof detail,
             "outside its array: bytes [%td, %td) of an array of %td bytes",
             a - e.lo, b - e.lo, e.hi - e.lo);
    cattn_debug_fail(what, detail, file, line);
}

#define CATTN_ASSERT(cond, what) \
    ((cond) ? (void)0 : cattn_debug_fail((what), "check failed: " #cond, __FILE__, __LINE__))
#define CATTN_ASSERT_INSIDE(extent, first, last, size, what) \
    cattn_debug_inside((extent), (first), (last), (size), (what), __FILE__, __LINE__)

#else

#define CATTN_DEBUG_BUILD 0
#define CATTN_ASSERT(cond, what) ((void)0)
#define CATTN_ASSERT_INSIDE(extent, first, last, size, what) ((void)0)

#endif
#endif

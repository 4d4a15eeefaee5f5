/*
 * Keys and values stored in fewer bits than the float32 they are computed in: float16
 * (IEEE binary16), bfloat16 (the top half of a float32) and int8 (symmetric, with a scale
 * per key applied outside the products). The kernel reads them in their own type and
 * converts while packing or streaming, never the whole cache at once.
 *
 * Scalar conversions here are portable C (no intrinsics): the portable vector instances
 * convert lane by lane with them, and the BLAS path converts a block with
 * cattn_convert_rows_scalar before its GEMM.
 */
#ifndef CATTN_CONVERT_H
#define CATTN_CONVERT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* How K or V is stored (the plan's k_type / v_type): in the computing precision itself, or
 * as one of the narrower types converted to float32. */
enum { CATTN_ELEM_NATIVE = 0, CATTN_ELEM_F16 = 1, CATTN_ELEM_BF16 = 2, CATTN_ELEM_I8 = 3 };

static inline float cattn_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float cattn_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) { /* zero or subnormal: mantissa · 2^-24, exact in float */
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) /* infinity or NaN (the payload kept) */
        bits = sign | 0x7f800000u | (mantissa << 13);
    else
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float cattn_element_to_f32(int elem, const void *base, ptrdiff_t index)
{
    switch (elem) {
    case CATTN_ELEM_F16: return cattn_f16_to_f32(((const uint16_t *)base)[index]);
    case CATTN_ELEM_BF16: return cattn_bf16_to_f32(((const uint16_t *)base)[index]);
    case CATTN_ELEM_I8: return (float)((const int8_t *)base)[index];
    default: return ((const float *)base)[index];
    }
}

/* dst[r][0:cols] = src[r][0:cols] as float (row strides in elements). */
static void cattn_convert_rows_scalar(int elem, const void *src, ptrdiff_t src_rs,
                                      ptrdiff_t rows, ptrdiff_t cols, float *dst,
                                      ptrdiff_t dst_rs)
{
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c = 0; c < cols; c++)
            dst[r * dst_rs + c] = cattn_element_to_f32(elem, src, r * src_rs + c);
}

#endif /* CATTN_CONVERT_H */

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, infer_types=False
"""Fused row operations of a transformer encoder: the steps between the GEMMs.

NumPy spends several passes over memory (and temporaries) on each of these; here each is
one pass over a row while it sits in the L1 cache:

    bias_gelu                 x <- GELU(x + bias), BERT's exact erf form
    bias_residual_layernorm   out <- LayerNorm(x + bias + residual)
    embed_layernorm           out <- LayerNorm(word[ids] + position[pos] + token_type[types])
    scatter_rows / gather_rows   packed (tokens, width) rows <-> padded (batch·length, width)
    pool                      mean, max, CLS or mean/√n of each sequence's packed rows
    project_scatter, attention_output_and_feed_forward
                              whole steps of a layer, GEMMs included, one chunk of rows
                              per thread
    pack_linear_weight, linear   out <- x · Wᵀ + bias with W packed once (at load) for the
                              micro-kernels of cattn_gemm.h, on the attention kernel's path

Rows are spread over OpenMP threads (prange); one row is one thread's work, so results do
not depend on the thread count. The loops are plain C that the compiler vectorizes: built
three times, for the platform baseline and (with target attributes) for AVX2+FMA and for
AVX-512, chosen at run time as the attention kernel chooses its path (CATTN_ISA=avx2 or
portable, or CATTN_DISABLE_AVX2=1, pick the lower builds). float32 GELU uses the Abramowitz & Stegun 7.1.26 erfc (absolute error
<= 1.5e-7, about one float32 rounding) with a branch-free polynomial exp; float64 uses
libm's erf.

The Python functions check shapes and dtypes (ValueError) and num_threads (TypeError when
it is no integer); the loops never raise.
"""
from cython cimport floating
from cython.parallel cimport prange
from cattn._blas cimport gemm_ab, gemm_abt, require_blas
from libc.math cimport sqrt
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t

import numpy as np

from cattn import _kernel, _runtime
from cattn._validation import check_int

cdef extern from *:
    """
    #include <math.h>
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>

    #define ENC_INLINE static inline __attribute__((always_inline))
    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    #define ENC_HAVE_AVX2_BUILD 1
    #define ENC_AVX2 __attribute__((target("avx2,fma")))
    /* the attention kernel's AVX-512 level asks for AVX-512F only, so this build too;
       16 float lanes: GCC's generic tuning would keep 256-bit vectors */
    #if defined(__clang__)
    #define ENC_AVX512 __attribute__((target("avx512f,fma")))
    #else
    #define ENC_AVX512 __attribute__((target("avx512f,fma,prefer-vector-width=512")))
    #endif
    #else
    #define ENC_HAVE_AVX2_BUILD 0
    #define ENC_AVX2
    #define ENC_AVX512
    #endif
    /* the builds of the row loops: the platform baseline, AVX2+FMA, AVX-512 */
    enum { ENC_GENERIC = 0, ENC_BUILD_AVX2 = 1, ENC_BUILD_AVX512 = 2 };
    #define ENC_LANES 16  /* independent partial sums: reductions the compiler can vectorize */

    /* exp(x) for x <= 0 in float32: the kernel's Cephes polynomial (cattn_expf_scalar),
       written without branches, libm calls or SSE4.1 rounding so that the GELU loop
       vectorizes on the baseline build too (and runs 1.7x faster with AVX2). Below
       exp(-87) = 1.6e-38 it returns 0. */
    ENC_INLINE float enc_exp_nonpositive_f32(float x)
    {
        const int underflows = x < -87.0f;
        x = underflows ? -87.0f : x;
        /* round to nearest by adding 1.5·2^23 (exact for |n| < 2^22) */
        float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
        float r = x - n * 0.693359375f;
        r = r + n * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        float y = p * r * r + r + 1.0f;
        int32_t bits = ((int32_t)n + 127) << 23;
        float scale;
        memcpy(&scale, &bits, sizeof scale);
        float result = y * scale;
        return underflows ? 0.0f : result;
    }

    /* BERT's GELU, v·Φ(v). With a = |v| and q = Φ(-a) = erfc(a/√2)/2 (A&S 7.1.26 rescaled):
       v·Φ(v) = max(v, 0) - a·q for both signs of v. A NaN stays NaN through a·q;
       GELU(inf) = inf and GELU(-inf) = 0, the limits. */
    ENC_INLINE void enc_bias_gelu_f32_body(float *x, const float *bias, ptrdiff_t n)
    {
        const float p = 0.3275911f * 0.70710678118654752f;
        const float a1 = 0.254829592f / 2, a2 = -0.284496736f / 2, a3 = 1.421413741f / 2,
                    a4 = -1.453152027f / 2, a5 = 1.061405429f / 2;
        for (ptrdiff_t j = 0; j < n; j++) {
            float v = x[j] + bias[j];
            float a = fabsf(v);
            float t = 1.0f / (1.0f + p * a);
            float poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))));
            float q = poly * enc_exp_nonpositive_f32(-0.5f * a * a);
            /* q = 0 far in the tails: a·q = 0 there even for a = inf */
            float aq = a * q;
            x[j] = (v > 0.0f ? v : 0.0f) - (q == 0.0f ? 0.0f : aq);
        }
    }

    static void enc_bias_gelu_f32_generic(float *x, const float *bias, ptrdiff_t n)
    { enc_bias_gelu_f32_body(x, bias, n); }
    #if ENC_HAVE_AVX2_BUILD
    ENC_AVX2 static void enc_bias_gelu_f32_avx2(float *x, const float *bias, ptrdiff_t n)
    { enc_bias_gelu_f32_body(x, bias, n); }
    ENC_AVX512 static void enc_bias_gelu_f32_avx512(float *x, const float *bias, ptrdiff_t n)
    { enc_bias_gelu_f32_body(x, bias, n); }
    #endif

    static void enc_bias_gelu_f64(double *x, const double *bias, ptrdiff_t n)
    {
        for (ptrdiff_t j = 0; j < n; j++) {
            double v = x[j] + bias[j];
            x[j] = 0.5 * v * (1.0 + erf(v * 0.70710678118654752440));
        }
    }

    /* out <- LayerNorm(x + bias + residual) over one row; x is overwritten with the sum.
       bias may be NULL. out may be residual (each element is read before it is written).
       Mean and variance are two passes over the row held in x, with ENC_LANES partial sums. */
    #define ENC_DEFINE_LAYERNORM(NAME, T)                                                   \
    ENC_INLINE void NAME(T *x, const T *bias, const T *residual, const T *weight,         \
                         const T *beta, T eps, T *out, ptrdiff_t n)                        \
    {                                                                                      \
        T acc[ENC_LANES] = {0};                                                            \
        ptrdiff_t j = 0, k;                                                                \
        if (bias) for (j = 0; j < n; j++) x[j] += bias[j];                                 \
        if (residual) for (j = 0; j < n; j++) x[j] += residual[j];                         \
        for (j = 0; j + ENC_LANES <= n; j += ENC_LANES)                                    \
            for (k = 0; k < ENC_LANES; k++) acc[k] += x[j + k];                            \
        T sum = 0;                                                                         \
        for (; j < n; j++) sum += x[j];                                                    \
        for (k = 0; k < ENC_LANES; k++) sum += acc[k];                                     \
        T mean = sum / (T)n;                                                               \
        for (k = 0; k < ENC_LANES; k++) acc[k] = 0;                                        \
        for (j = 0; j + ENC_LANES <= n; j += ENC_LANES)                                    \
            for (k = 0; k < ENC_LANES; k++) {                                              \
                T c = x[j + k] - mean;                                                     \
                acc[k] += c * c;                                                           \
            }                                                                              \
        T ss = 0;                                                                          \
        for (; j < n; j++) ss += (x[j] - mean) * (x[j] - mean);                            \
        for (k = 0; k < ENC_LANES; k++) ss += acc[k];                                      \
        T inv = (T)1 / (T)sqrt((double)(ss / (T)n + eps));                                 \
        for (j = 0; j < n; j++) out[j] = (x[j] - mean) * inv * weight[j] + beta[j];        \
    }
    ENC_DEFINE_LAYERNORM(enc_layernorm_f32_body, float)
    ENC_DEFINE_LAYERNORM(enc_layernorm_f64_body, double)

    #define ENC_DEFINE_BUILDS(BODY, T)                                                     \
    static void BODY##_generic(T *x, const T *bias, const T *residual, const T *weight,    \
                               const T *beta, T eps, T *out, ptrdiff_t n)                  \
    { BODY(x, bias, residual, weight, beta, eps, out, n); }                               \
    ENC_AVX2 static void BODY##_avx2(T *x, const T *bias, const T *residual,               \
                                     const T *weight, const T *beta, T eps, T *out,        \
                                     ptrdiff_t n)                                          \
    { BODY(x, bias, residual, weight, beta, eps, out, n); }                               \
    ENC_AVX512 static void BODY##_avx512(T *x, const T *bias, const T *residual,           \
                                         const T *weight, const T *beta, T eps, T *out,    \
                                         ptrdiff_t n)                                      \
    { BODY(x, bias, residual, weight, beta, eps, out, n); }
    ENC_DEFINE_BUILDS(enc_layernorm_f32_body, float)
    ENC_DEFINE_BUILDS(enc_layernorm_f64_body, double)

    /* dst <- src (+ bias when not NULL): one row of a scatter or gather. */
    #define ENC_DEFINE_ROW_COPY(T, SUFFIX)                                                 \
    static void enc_copy_row_##SUFFIX(T *restrict dst, const T *restrict src,               \
                                      const T *restrict bias, ptrdiff_t n)                  \
    {                                                                                      \
        if (!bias) { memcpy(dst, src, (size_t)n * sizeof(T)); return; }                   \
        for (ptrdiff_t j = 0; j < n; j++) dst[j] = src[j] + bias[j];                       \
    }
    ENC_DEFINE_ROW_COPY(float, f32)
    ENC_DEFINE_ROW_COPY(double, f64)

    typedef void (*enc_gelu_f32_fn)(float *, const float *, ptrdiff_t);
    typedef void (*enc_layernorm_f32_fn)(float *, const float *, const float *, const float *,
                                         const float *, float, float *, ptrdiff_t);
    typedef void (*enc_layernorm_f64_fn)(double *, const double *, const double *,
                                         const double *, const double *, double, double *,
                                         ptrdiff_t);

    #if ENC_HAVE_AVX2_BUILD
    #define ENC_PICK(build, NAME) \
        ((build) == ENC_BUILD_AVX512 ? NAME##_avx512 \
         : (build) == ENC_BUILD_AVX2 ? NAME##_avx2 : NAME##_generic)
    #else
    #define ENC_PICK(build, NAME) ((void)(build), NAME##_generic)
    #endif
    static enc_gelu_f32_fn enc_gelu_f32_impl(int build)
    { return ENC_PICK(build, enc_bias_gelu_f32); }
    static enc_layernorm_f32_fn enc_layernorm_f32_impl(int build)
    { return ENC_PICK(build, enc_layernorm_f32_body); }
    static enc_layernorm_f64_fn enc_layernorm_f64_impl(int build)
    { return ENC_PICK(build, enc_layernorm_f64_body); }
    """
    ctypedef void (*enc_gelu_f32_fn)(float*, const float*, Py_ssize_t) noexcept nogil
    ctypedef void (*enc_layernorm_f32_fn)(float*, const float*, const float*, const float*,
                                          const float*, float, float*, Py_ssize_t) noexcept nogil
    ctypedef void (*enc_layernorm_f64_fn)(double*, const double*, const double*, const double*,
                                          const double*, double, double*,
                                          Py_ssize_t) noexcept nogil
    enc_gelu_f32_fn enc_gelu_f32_impl(int build) noexcept nogil
    int ENC_HAVE_AVX2_BUILD, ENC_GENERIC, ENC_BUILD_AVX2, ENC_BUILD_AVX512
    enc_layernorm_f32_fn enc_layernorm_f32_impl(int build) noexcept nogil
    enc_layernorm_f64_fn enc_layernorm_f64_impl(int build) noexcept nogil
    void enc_bias_gelu_f64(double* x, const double* bias, Py_ssize_t n) noexcept nogil
    void enc_copy_row_f32(float* dst, const float* src, const float* bias,
                          Py_ssize_t n) noexcept nogil
    void enc_copy_row_f64(double* dst, const double* src, const double* bias,
                          Py_ssize_t n) noexcept nogil


cdef extern from "cattn_gemm.h":
    int CATTN_ISA_PORTABLE, CATTN_ISA_AVX2, CATTN_ISA_AVX512, CATTN_ISA_AVX512_BF16
    int CATTN_ISA_AMX, CATTN_ISA_BLAS
    Py_ssize_t cattn_panel_keys(int isa, int is_double) noexcept nogil
    int cattn_isa_uses_blas(int isa) noexcept nogil
    void cattn_pack_keys_f32(int isa, const float* k, Py_ssize_t k_rs, Py_ssize_t n_keys,
                             Py_ssize_t E, float* packed) noexcept nogil
    void cattn_pack_keys_f64(int isa, const double* k, Py_ssize_t k_rs, Py_ssize_t n_keys,
                             Py_ssize_t E, double* packed) noexcept nogil
    void cattn_linear_f32(int isa, Py_ssize_t rows, Py_ssize_t n_out, Py_ssize_t K,
                          const float* a, Py_ssize_t lda, const float* packed,
                          const float* bias, float* c, Py_ssize_t ldc) noexcept nogil
    void cattn_linear_f64(int isa, Py_ssize_t rows, Py_ssize_t n_out, Py_ssize_t K,
                          const double* a, Py_ssize_t lda, const double* packed,
                          const double* bias, double* c, Py_ssize_t ldc) noexcept nogil
    size_t cattn_split_work_bytes(Py_ssize_t K) noexcept nogil
    Py_ssize_t cattn_bf16_pairs_ld(Py_ssize_t n) noexcept nogil
    void cattn_linear_split_bf16(Py_ssize_t rows, Py_ssize_t n_out, Py_ssize_t K,
                                 const float* a, Py_ssize_t lda, const uint32_t* packed,
                                 const float* bias, float* c, Py_ssize_t ldc,
                                 void* work) noexcept nogil


# Below this many elements a call stays on one thread: starting a team costs more.
cdef Py_ssize_t PARALLEL_MIN_ELEMENTS = 32768

cdef enum:
    MEAN = 0
    MAX = 1
    CLS = 2
    MEAN_SQRT_LEN = 3
POOL_MEAN, POOL_MAX, POOL_CLS, POOL_MEAN_SQRT_LEN = MEAN, MAX, CLS, MEAN_SQRT_LEN


# The attention kernel's choice of instruction set (the CPU's best, capped by CATTN_ISA or
# CATTN_DISABLE_AVX2) picks the build of these loops: AVX2 for its AVX2 path, AVX-512 for
# its AVX-512 path and the bfloat16 levels above it.
cdef int _pick_build():
    cdef int isa = _kernel.default_isa_index()
    if not ENC_HAVE_AVX2_BUILD or isa == CATTN_ISA_PORTABLE:
        return ENC_GENERIC
    if isa in (CATTN_ISA_AVX512, CATTN_ISA_AVX512_BF16, CATTN_ISA_AMX):
        return ENC_BUILD_AVX512
    return ENC_BUILD_AVX2


cdef int BUILD = _pick_build()


def simd_path():
    """The code path these loops take on this CPU: 'avx512', 'avx2+fma' or 'generic'."""
    return {ENC_BUILD_AVX512: "avx512", ENC_BUILD_AVX2: "avx2+fma"}.get(BUILD, "generic")


cdef int team_size(Py_ssize_t elements, num_threads):
    """Threads for a call, as the attention kernel counts them (num_threads=, else
    cattn.threads()/set_num_threads()/OpenMP's default, within the process's budget)."""
    if num_threads is None:
        num_threads = _runtime.get_num_threads()
    else:
        num_threads = check_int(num_threads, "num_threads", 1)
    return 1 if elements < PARALLEL_MIN_ELEMENTS else _runtime.team_size(num_threads)


def _check_vector(v, n, name):
    if v.shape[0] != n:
        raise ValueError(f"{name} must have {n} elements (one per column), got {v.shape[0]}")


cdef inline void bias_gelu_row(floating* x, const floating* bias, Py_ssize_t n) noexcept nogil:
    if floating is float:
        enc_gelu_f32_impl(BUILD)(x, bias, n)
    else:
        enc_bias_gelu_f64(x, bias, n)


def bias_gelu(floating[:, ::1] x, const floating[::1] bias, num_threads=None):
    """x <- GELU(x + bias) in place, row by row (x: C-contiguous (rows, n), bias (n,))."""
    cdef Py_ssize_t rows = x.shape[0], n = x.shape[1], i
    _check_vector(bias, n, "bias")
    cdef int nt = team_size(rows * n, num_threads)
    if rows == 0 or n == 0:
        return
    with nogil:
        for i in prange(rows, num_threads=nt, schedule="static"):
            bias_gelu_row(&x[i, 0], &bias[0], n)


cdef inline void layernorm_row(floating* x, const floating* bias, const floating* residual,
                               const floating* weight, const floating* beta, floating eps,
                               floating* out, Py_ssize_t n) noexcept nogil:
    if floating is float:
        enc_layernorm_f32_impl(BUILD)(x, bias, residual, weight, beta, eps, out, n)
    else:
        enc_layernorm_f64_impl(BUILD)(x, bias, residual, weight, beta, eps, out, n)


cdef void layernorm_rows(floating* x, const floating* bias, const floating* residual,
                         const floating* weight, const floating* beta, floating eps,
                         floating* out, Py_ssize_t rows, Py_ssize_t n, int nt) noexcept nogil:
    """LayerNorm of C-contiguous (rows, n) matrices; residual and bias may be NULL."""
    cdef Py_ssize_t i
    for i in prange(rows, num_threads=nt, schedule="static"):
        layernorm_row(x + i * n, bias, residual + i * n if residual != NULL else NULL,
                      weight, beta, eps, out + i * n, n)


def _check_rows(a, rows, n, name):
    if a.shape[0] != rows or a.shape[1] != n:
        raise ValueError(f"{name} must have shape ({rows}, {n}), got "
                         f"({a.shape[0]}, {a.shape[1]})")


def bias_residual_layernorm(floating[:, ::1] x, const floating[::1] bias,
                            floating[:, ::1] residual, const floating[::1] weight,
                            const floating[::1] beta, double eps, floating[:, ::1] out,
                            num_threads=None):
    """out <- LayerNorm(x + bias + residual) row by row; x is used as scratch (it holds
    x + bias + residual afterwards). `bias` and `residual` may be None; `out` may be
    `residual` or `x`."""
    cdef Py_ssize_t rows = x.shape[0], n = x.shape[1]
    if bias is not None:
        _check_vector(bias, n, "bias")
    if residual is not None:
        _check_rows(residual, rows, n, "residual")
    _check_vector(weight, n, "weight")
    _check_vector(beta, n, "beta")
    _check_rows(out, rows, n, "out")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    cdef int nt = team_size(rows * n, num_threads)
    cdef const floating* bias_p = NULL if bias is None else &bias[0]
    if rows == 0 or n == 0:
        return
    cdef const floating* residual_p = NULL if residual is None else &residual[0, 0]
    with nogil:
        layernorm_rows(&x[0, 0], bias_p, residual_p, &weight[0], &beta[0], <floating>eps,
                       &out[0, 0], rows, n, nt)


def embed_layernorm(const int64_t[::1] ids, const int64_t[::1] positions,
                    const int64_t[::1] token_types, const floating[:, ::1] word,
                    const floating[:, ::1] position, const floating[:, ::1] token_type,
                    const floating[::1] weight, const floating[::1] beta, double eps,
                    floating[:, ::1] out, num_threads=None):
    """out[t] <- LayerNorm(word[ids[t]] + position[positions[t]] + token_type[types[t]]):
    BERT's embeddings for packed tokens. Indices must be in range (checked here)."""
    cdef Py_ssize_t rows = ids.shape[0], n = word.shape[1], t, j
    for table, index, name in ((word, ids, "ids"), (position, positions, "positions"),
                               (token_type, token_types, "token_types")):
        if table.shape[1] != n:
            raise ValueError("the embedding tables must have the same width")
        if index.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} elements, got {index.shape[0]}")
        if rows and (np.min(index) < 0 or np.max(index) >= table.shape[0]):
            raise ValueError(f"{name} must lie in [0, {table.shape[0]})")
    _check_vector(weight, n, "weight")
    _check_vector(beta, n, "beta")
    _check_rows(out, rows, n, "out")
    cdef int nt = team_size(rows * n, num_threads)
    if rows == 0 or n == 0:
        return
    with nogil:
        for t in range(rows):  # the gather is memory-bound: one thread streams it
            for j in range(n):
                out[t, j] = (word[ids[t], j] + position[positions[t], j]
                             + token_type[token_types[t], j])
        layernorm_rows(&out[0, 0], NULL, NULL, &weight[0], &beta[0], <floating>eps,
                       &out[0, 0], rows, n, nt)


def _check_offsets(const int64_t[::1] offsets, Py_ssize_t total):
    o = np.asarray(offsets)
    if o.shape[0] < 1 or o[0] != 0 or o[o.shape[0] - 1] != total or np.any(np.diff(o) < 0):
        raise ValueError(f"offsets must rise from 0 to the number of rows ({total})")


def _check_row_index(const int64_t[::1] index, Py_ssize_t rows, Py_ssize_t bound):
    if index.shape[0] != rows:
        raise ValueError(f"the row index must have {rows} elements, got {index.shape[0]}")
    if rows and (np.min(index) < 0 or np.max(index) >= bound):
        raise ValueError(f"row indices must lie in [0, {bound})")


cdef inline void copy_row(floating* dst, const floating* src, const floating* bias,
                          Py_ssize_t n) noexcept nogil:
    if floating is float:
        enc_copy_row_f32(dst, src, bias, n)
    else:
        enc_copy_row_f64(dst, src, bias, n)


def scatter_rows(const floating[:, ::1] src, const floating[::1] bias,
                 const int64_t[::1] dest, floating[:, ::1] dst, num_threads=None):
    """dst[dest[i]] <- src[i] + bias for every row i of src (bias may be None): packed
    token rows into a padded (batch·length, width) layout. Other rows of dst are left as
    they are; dest should not repeat a row."""
    cdef Py_ssize_t rows = src.shape[0], n = src.shape[1], i
    _check_row_index(dest, rows, dst.shape[0])
    if dst.shape[1] != n:
        raise ValueError(f"dst must have {n} columns, got {dst.shape[1]}")
    if bias is not None:
        _check_vector(bias, n, "bias")
    cdef int nt = team_size(rows * n, num_threads)
    if rows == 0 or n == 0:
        return
    cdef const floating* bias_p = NULL if bias is None else &bias[0]
    with nogil:
        for i in prange(rows, num_threads=nt, schedule="static"):
            copy_row(&dst[dest[i], 0], &src[i, 0], bias_p, n)


def gather_rows(const floating[:, ::1] src, const int64_t[::1] index, floating[:, ::1] dst,
                num_threads=None):
    """dst[i] <- src[index[i]]: rows of a padded (batch·length, width) layout, packed."""
    cdef Py_ssize_t rows = dst.shape[0], n = dst.shape[1], i
    _check_row_index(index, rows, src.shape[0])
    if src.shape[1] != n:
        raise ValueError(f"src must have {n} columns, got {src.shape[1]}")
    cdef int nt = team_size(rows * n, num_threads)
    if rows == 0 or n == 0:
        return
    with nogil:
        for i in prange(rows, num_threads=nt, schedule="static"):
            copy_row(&dst[i, 0], &src[index[i], 0], NULL, n)


def pool(const floating[:, ::1] x, const int64_t[::1] offsets, int mode,
         floating[:, ::1] out, num_threads=None):
    """out[b] <- pooling of the packed rows x[offsets[b]:offsets[b+1]] of sequence b:
    POOL_MEAN, POOL_MAX, POOL_CLS (the first row) or POOL_MEAN_SQRT_LEN (sum / √n). An
    empty sequence pools to zeros."""
    cdef Py_ssize_t B = offsets.shape[0] - 1, n = x.shape[1], b, t, j, start, count
    _check_offsets(offsets, x.shape[0])
    _check_rows(out, B, n, "out")
    if mode not in (POOL_MEAN, POOL_MAX, POOL_CLS, POOL_MEAN_SQRT_LEN):
        raise ValueError(f"unknown pooling mode {mode}")
    cdef int nt = team_size(x.shape[0] * n, num_threads)
    cdef floating scale
    if B == 0 or n == 0:
        return
    with nogil:
        for b in prange(B, num_threads=nt, schedule="static"):
            start = offsets[b]
            count = offsets[b + 1] - start
            for j in range(n):
                out[b, j] = x[start, j] if count else 0
            if mode == CLS:
                continue
            for t in range(1, count):
                if mode == MAX:
                    for j in range(n):
                        if x[start + t, j] > out[b, j] or x[start + t, j] != x[start + t, j]:
                            out[b, j] = x[start + t, j]
                else:
                    for j in range(n):
                        out[b, j] = out[b, j] + x[start + t, j]
            if count and mode == MEAN:
                scale = 1 / <floating>count
            elif count and mode == MEAN_SQRT_LEN:
                scale = 1 / <floating>sqrt(<double>count)
            else:
                scale = 1
            if mode != MAX:
                for j in range(n):
                    out[b, j] = out[b, j] * scale


# ------------------------------------------------------------- whole steps of a layer
#
# The projections and the feed-forward of a layer, computed in cattn's OpenMP team: the
# rows are cut into one chunk per thread, and each thread runs its chunk through
# single-threaded GEMMs and the fused row operations, with its activations in its own
# scratch. One parallel region per step, and no second thread pool (the BLAS one) waiting
# for its turn. A weight is either plain (its GEMM is SciPy's BLAS, held on one thread by
# the caller) or packed by pack_linear_weight (cattn's micro-kernels, on path `isa`).

def _weight_width(weight, Py_ssize_t N, Py_ssize_t K, bint transposed, dtype, isa, name):
    """0 for a plain weight ((N, K), or (K, N) when `transposed`), SPLIT_BF16 for one
    packed by pack_linear_weight(..., precision="high"), else the panel width of a packed
    one, INT8_WEIGHT for an Int8Weight; ValueError when it fits none. Loads BLAS when the
    weight's GEMM is BLAS's."""
    if isinstance(weight, Int8Weight):
        return _check_int8_layer(weight, N, K, dtype, name)
    if isinstance(weight, np.ndarray) and weight.dtype == np.uint32:
        return _check_split(weight, N, K, dtype, isa, name)
    if not isinstance(weight, np.ndarray) or weight.dtype != dtype:
        raise TypeError(f"{name} must be a {np.dtype(dtype)} ndarray")
    if weight.ndim == 3:
        return _check_packed(weight, N, K, dtype, isa)
    want = (K, N) if transposed else (N, K)
    if weight.shape != want or not weight.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {want} array or packed by "
                         f"pack_linear_weight, got shape {weight.shape}")
    require_blas()
    return 0


cdef const floating* _weight_data(weight, Py_ssize_t width, const floating* like) except NULL:
    """The data of a weight checked by _weight_width (`like` picks the precision)."""
    cdef const floating[:, :, ::1] packed
    cdef const floating[:, ::1] plain
    cdef const uint32_t[:, :, :, ::1] split
    if width == INT8_WEIGHT:
        return <const floating*><const void*>&(<Int8Weight>weight).c
    if width == SPLIT_BF16:
        split = weight
        return <const floating*><const void*>&split[0, 0, 0, 0]
    if width:
        packed = weight
        return &packed[0, 0, 0]
    plain = weight
    return &plain[0, 0]


cdef inline void layer_gemm(int path, Py_ssize_t m, Py_ssize_t N, Py_ssize_t K,
                            const floating* a, Py_ssize_t lda, const floating* w,
                            Py_ssize_t width, bint transposed, floating* c,
                            Py_ssize_t ldc, void* work) noexcept nogil:
    """c[m, N] = a[m, K] · W: W plain (N, K) or, when `transposed`, (K, N); or packed;
    or an Int8Weight's (float32 only)."""
    cdef const cattn_i8_weight* q
    if width == INT8_WEIGHT:
        if floating is float:
            q = <const cattn_i8_weight*><const void*>w
            cattn_i8_linear(q.path, m, N, K, a, lda, q.packed, q.col_sums, q.scale, NULL, c,
                            ldc, work)
    elif width:
        linear_rows(path, m, N, K, a, lda, w, width, NULL, c, ldc, work)
    elif transposed:
        gemm_ab(<int>m, <int>N, <int>K, <floating>1, a, <int>lda, w, <int>N, <floating>0, c,
                <int>ldc)
    else:
        gemm_abt(<int>m, <int>N, <int>K, <floating>1, a, <int>lda, w, <int>K, <floating>0, c,
                 <int>ldc)


cdef inline void layernorm_row_into(floating* x, const floating* bias, floating* row,
                                    const floating* weight, const floating* beta,
                                    floating eps, Py_ssize_t n) noexcept nogil:
    """row <- LayerNorm(x + bias + row); x is scratch."""
    layernorm_row(x, bias, row, weight, beta, eps, row, n)


def _split_work(Py_ssize_t n_chunks, Py_ssize_t K, *widths):
    """One work area per chunk for the layers' split or int8 inputs (K: their widest
    input), or a placeholder when no weight is either."""
    size = max(cattn_split_work_bytes(K) if SPLIT_BF16 in widths else 1,
               cattn_i8_work_bytes(K) if INT8_WEIGHT in widths else 1)
    return np.empty((max(n_chunks, 1), size), np.uint8)


def _chunks(Py_ssize_t rows, floating[:, :, ::1] scratch, Py_ssize_t width, name):
    if scratch.shape[2] < width:
        raise ValueError(f"{name} must be at least {width} wide, got {scratch.shape[2]}")
    # (C division here: -(-a // b) would truncate, not round up)
    chunk = (rows + scratch.shape[0] - 1) // scratch.shape[0] if scratch.shape[0] else 0
    if chunk > scratch.shape[1]:
        raise ValueError(f"{name} must hold {chunk} rows per chunk, got {scratch.shape[1]}")
    return chunk


def project_scatter(const floating[:, ::1] x, weight, const floating[::1] bias,
                    const int64_t[::1] dest, floating[:, ::1] padded,
                    floating[:, :, ::1] scratch, num_threads=None, isa=None):
    """padded[dest[i]] <- x[i] · weightᵀ + bias: a linear layer (weight (out, in) as
    PyTorch's, or pack_linear_weight(weight, isa)) into a padded layout. scratch (chunks,
    rows per chunk, out): one chunk of rows per thread."""
    cdef Py_ssize_t T = x.shape[0], K = x.shape[1], N = padded.shape[1], c, i, r0, m
    dtype = np.float32 if floating is float else np.float64
    cdef Py_ssize_t width = _weight_width(weight, N, K, False, dtype, isa, "weight")
    _check_vector(bias, N, "bias")
    _check_row_index(dest, T, padded.shape[0])
    cdef Py_ssize_t chunk = _chunks(T, scratch, N, "scratch")
    cdef Py_ssize_t n_chunks = scratch.shape[0]
    cdef int nt = min(team_size(T * N, num_threads), n_chunks)
    cdef int path = linear_isa(isa)
    if T == 0 or N == 0 or K == 0:
        return
    cdef const floating* w = _weight_data(weight, width, &x[0, 0])
    cdef uint8_t[:, ::1] work = _split_work(n_chunks, K, width)
    with nogil:
        for c in prange(n_chunks, num_threads=nt, schedule="static"):
            r0 = c * chunk
            m = min(chunk, T - r0)
            if m > 0:
                layer_gemm(path, m, N, K, &x[r0, 0], K, w, width, False, &scratch[c, 0, 0],
                           scratch.shape[2], &work[c, 0])
                for i in range(m):
                    copy_row(&padded[dest[r0 + i], 0], &scratch[c, i, 0], &bias[0], N)


def attention_output_and_feed_forward(
        const floating[:, ::1] context, const int64_t[::1] index, floating[:, ::1] x,
        w_out, const floating[::1] b_out,
        const floating[::1] norm1_weight, const floating[::1] norm1_bias,
        w_in_t, const floating[::1] b_in,
        w_ff_t, const floating[::1] b_ff,
        const floating[::1] norm2_weight, const floating[::1] norm2_bias, double eps,
        floating[:, :, ::1] scratch_e, floating[:, :, ::1] scratch_f, num_threads=None,
        isa=None):
    """The rest of a post-LayerNorm transformer layer, for the packed rows x (T, E):

        x <- LayerNorm1(context[index] · w_outᵀ + b_out + x)
        x <- LayerNorm2(GELU(x · w_in_t + b_in) · w_ff_t + b_ff + x)

    w_out (E, E) as PyTorch's; w_in_t (E, F) and w_ff_t (F, E) stored (in, out); or any of
    them packed by pack_linear_weight (from the (out, in) layout) for path `isa`. Scratch:
    scratch_e (chunks, rows, >= 2E), scratch_f (chunks, rows, >= F); one chunk per thread."""
    cdef Py_ssize_t T = x.shape[0], E = x.shape[1], F = b_in.shape[0], c, i, r0, m
    dtype = np.float32 if floating is float else np.float64
    if context.shape[1] != E:
        raise ValueError(f"context must be {E} wide")
    cdef Py_ssize_t width_out = _weight_width(w_out, E, E, False, dtype, isa, "w_out")
    cdef Py_ssize_t width_in = _weight_width(w_in_t, F, E, True, dtype, isa, "w_in_t")
    cdef Py_ssize_t width_ff = _weight_width(w_ff_t, E, F, True, dtype, isa, "w_ff_t")
    for v, n, name in ((b_out, E, "b_out"), (norm1_weight, E, "norm1_weight"),
                       (norm1_bias, E, "norm1_bias"), (b_ff, E, "b_ff"),
                       (norm2_weight, E, "norm2_weight"), (norm2_bias, E, "norm2_bias")):
        _check_vector(v, n, name)
    _check_row_index(index, T, context.shape[0])
    cdef Py_ssize_t chunk = _chunks(T, scratch_e, 2 * E, "scratch_e")
    if _chunks(T, scratch_f, F, "scratch_f") != chunk or scratch_f.shape[0] != scratch_e.shape[0]:
        raise ValueError("scratch_e and scratch_f must have the same chunks")
    cdef Py_ssize_t n_chunks = scratch_e.shape[0]
    cdef Py_ssize_t lde = scratch_e.shape[2], ldf = scratch_f.shape[2]
    cdef int nt = min(team_size(T * F, num_threads), n_chunks)
    cdef int path = linear_isa(isa)
    cdef floating feps = <floating>eps
    cdef floating* ctx
    cdef floating* proj
    cdef floating* hidden
    if T == 0 or E == 0 or F == 0:
        return
    cdef const floating* wo = _weight_data(w_out, width_out, &x[0, 0])
    cdef const floating* wi = _weight_data(w_in_t, width_in, &x[0, 0])
    cdef const floating* wf = _weight_data(w_ff_t, width_ff, &x[0, 0])
    cdef uint8_t[:, ::1] work = _split_work(n_chunks, max(E, F), width_out, width_in, width_ff)
    with nogil:
        for c in prange(n_chunks, num_threads=nt, schedule="static"):
            r0 = c * chunk
            m = min(chunk, T - r0)
            if m <= 0:
                continue
            ctx = &scratch_e[c, 0, 0]
            proj = ctx + E
            hidden = &scratch_f[c, 0, 0]
            for i in range(m):
                copy_row(ctx + i * lde, &context[index[r0 + i], 0], NULL, E)
            layer_gemm(path, m, E, E, ctx, lde, wo, width_out, False, proj, lde, &work[c, 0])
            for i in range(m):
                layernorm_row_into(proj + i * lde, &b_out[0], &x[r0 + i, 0],
                                   &norm1_weight[0], &norm1_bias[0], feps, E)
            layer_gemm(path, m, F, E, &x[r0, 0], E, wi, width_in, True, hidden, ldf,
                       &work[c, 0])
            for i in range(m):
                bias_gelu_row(hidden + i * ldf, &b_in[0], F)
            layer_gemm(path, m, E, F, hidden, ldf, wf, width_ff, True, proj, lde,
                       &work[c, 0])
            for i in range(m):
                layernorm_row_into(proj + i * lde, &b_ff[0], &x[r0 + i, 0],
                                   &norm2_weight[0], &norm2_bias[0], feps, E)


# ------------------------------------------------------------- linear layers, packed
#
# A weight (outputs, inputs) as PyTorch stores it is packed once into panels of `width`
# outputs, input-major, the layout the micro-kernels of cattn_gemm.h read with aligned
# vector loads (the attention kernel packs its keys the same way, per key block). A packed
# weight belongs to one path: its shape (panels, inputs, width) says which. On the BLAS
# path (portable builds without generic vectors, and the test-only "blas" path) the width
# is 1: the packed weight is the weight itself, and the GEMM is BLAS's.

def linear_isa(isa=None):
    """The path number for the linear layers: `isa` (a path name, as attention's `_isa=`),
    else the attention kernel's default when it has micro-kernels tuned for this CPU
    (AVX2, AVX-512), else BLAS. The bfloat16 paths (avx512_bf16, amx) compute float32 and
    float64 as avx512 does."""
    path = _kernel.isa_index(isa) if isa is not None else _kernel.default_isa_index()
    if path in (CATTN_ISA_AVX512_BF16, CATTN_ISA_AMX):
        return CATTN_ISA_AVX512
    if isa is None and path not in (CATTN_ISA_AVX2, CATTN_ISA_AVX512):
        return CATTN_ISA_BLAS
    return path


def linear_panel_width(dtype, isa=None):
    """Outputs per packed panel for `dtype` on path `isa` (see linear_isa)."""
    cdef int path = linear_isa(isa)
    if cattn_isa_uses_blas(path):
        return 1
    return int(cattn_panel_keys(path, np.dtype(dtype) == np.float64))


def pack_linear_weight(const floating[:, ::1] weight, isa=None, precision="highest"):
    """The weight (n_out, n_in) packed for `linear` on path `isa`: a new array
    (ceil(n_out / width), n_in, width), zeros past n_out.

    precision: the float32 matmul precision, as PyTorch's set_float32_matmul_precision:
    "highest" (float32 products), or "high": where split bfloat16 products are available
    (split_bf16_available: the amx path), the weight is split into bfloat16 pairs for them
    (a uint32 array of split_packed_shape); elsewhere, and for float64, as "highest"."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    if precision == "high" and floating is float and split_bf16_available(isa):
        return _pack_split(np.asarray(weight))
    cdef Py_ssize_t N = weight.shape[0], K = weight.shape[1]
    cdef int path = linear_isa(isa)
    dtype = np.float32 if floating is float else np.float64
    cdef Py_ssize_t width = linear_panel_width(dtype, isa)
    packed_array = np.zeros(((N + width - 1) // width, K, width), dtype)
    cdef floating[:, :, ::1] packed = packed_array
    if N == 0 or K == 0:
        return packed_array
    if width == 1:
        packed_array[:, :, 0] = np.asarray(weight)
        return packed_array
    with nogil:
        if floating is float:
            cattn_pack_keys_f32(path, &weight[0, 0], K, N, K, &packed[0, 0, 0])
        else:
            cattn_pack_keys_f64(path, &weight[0, 0], K, N, K, &packed[0, 0, 0])
    return packed_array


cdef void linear_rows(int path, Py_ssize_t rows, Py_ssize_t N, Py_ssize_t K,
                      const floating* a, Py_ssize_t lda, const floating* packed,
                      Py_ssize_t width, const floating* bias, floating* c,
                      Py_ssize_t ldc, void* work) noexcept nogil:
    """c[rows, N] = a[rows, K] · Wᵀ + bias (bias may be NULL) on one thread; `work` is
    the split inputs' work area when width is SPLIT_BF16."""
    cdef Py_ssize_t i, j
    if width == SPLIT_BF16:
        if floating is float:
            cattn_linear_split_bf16(rows, N, K, a, lda, <const uint32_t*><const void*>packed,
                                    bias, c, ldc, work)
    elif width == 1:
        gemm_abt(<int>rows, <int>N, <int>K, <floating>1, a, <int>lda, packed, <int>K,
                 <floating>0, c, <int>ldc)
        if bias != NULL:
            for i in range(rows):
                for j in range(N):
                    c[i * ldc + j] += bias[j]
    elif floating is float:
        cattn_linear_f32(path, rows, N, K, a, lda, packed, bias, c, ldc)
    else:
        cattn_linear_f64(path, rows, N, K, a, lda, packed, bias, c, ldc)


cdef Py_ssize_t _check_packed(packed, Py_ssize_t N, Py_ssize_t K, dtype, isa) except -1:
    width = linear_panel_width(dtype, isa)
    want = ((N + width - 1) // width, K, width)
    if tuple(packed.shape[:3]) != want:
        raise ValueError(f"the packed weight must have shape {want} (pack_linear_weight of an "
                         f"({N}, {K}) weight for this path), got {tuple(packed.shape[:3])}")
    if width == 1:  # the BLAS path's: the weight itself
        require_blas()
    return width


# Float32 matmul precisions, as PyTorch's set_float32_matmul_precision ("medium", plain
# bfloat16 products, is not offered: about 3 significant digits).
MATMUL_PRECISIONS = ("highest", "high")
# The width code of a weight split into bfloat16 pairs (pack_linear_weight(..., "high")).
cdef enum:
    SPLIT_BF16 = -1
    INT8_WEIGHT = -2


def split_bf16_available(isa=None):
    """Whether float32 linear layers can take split bfloat16 products on path `isa` (a path
    name, else the default path): on the amx path only, where one split product costs a
    sixteenth of a float32 FMA."""
    path = _kernel.isa_index(isa) if isa is not None else _kernel.default_isa_index()
    return path == CATTN_ISA_AMX


def split_packed_shape(Py_ssize_t n_out, Py_ssize_t n_in):
    """Shape of a weight (n_out, n_in) split and packed: (hi/lo, panels of 32 outputs,
    pairs of inputs rounded up to 16, 32). The shape pins n_out to a panel and n_in to 32
    inputs, not exactly: use a packed weight with the layer it was packed for."""
    return (2, (n_out + 31) // 32, int(cattn_bf16_pairs_ld(n_in)), 32)


def _bf16_round(x):
    """float32 -> the nearest bfloat16 (ties to even), as its 16 bits (uint16); x finite."""
    bits = x.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _pack_split(weight):
    """A float32 weight (n_out, n_in) as hi and lo bfloat16 parts, each in panels of 32
    outputs × pairs of inputs (the layout cattn_linear_split_bf16 reads)."""
    N, K = weight.shape
    if not np.isfinite(weight).all():
        raise ValueError("a weight split into bfloat16 parts must be finite")
    shape = split_packed_shape(N, K)
    packed = np.zeros(shape, np.uint32)
    hi = _bf16_round(weight)
    rest = weight - (hi.astype(np.uint32) << 16).view(np.float32)  # exact in float32
    for part, bits in enumerate((hi, _bf16_round(rest))):
        padded = np.zeros((shape[1] * 32, 2 * shape[2]), np.uint16)
        padded[:N, :K] = bits
        pairs = padded.view(np.uint32)  # (outputs, pairs): the lower input in the low half
        packed[part] = pairs.reshape(shape[1], 32, shape[2]).transpose(0, 2, 1)
    return packed


def _check_split(weight, Py_ssize_t N, Py_ssize_t K, dtype, isa, name):
    if dtype != np.float32:
        raise TypeError(f"{name} is split into bfloat16 parts, which serve float32 layers "
                        f"only, not {np.dtype(dtype)}")
    want = split_packed_shape(N, K)
    if weight.shape != want or not weight.flags.c_contiguous:
        raise ValueError(f"the packed weight must have shape {want} (pack_linear_weight of "
                         f"an ({N}, {K}) weight, precision 'high'), got {weight.shape}")
    if not split_bf16_available(isa):
        raise ValueError(f"{name} is split into bfloat16 parts, which only the amx path "
                         f"computes; pack it with precision='highest' for this path")
    return SPLIT_BF16


def linear(const floating[:, :] x, packed, const floating[::1] bias, floating[:, :] out,
           isa=None, num_threads=None):
    """out <- x · Wᵀ + bias for a weight W (n_out, n_in) given as pack_linear_weight(W, isa)
    (either precision): x (rows, n_in) and out (rows, n_out) with unit column stride (any
    row stride); bias (n_out,) or None. Rows are spread over the threads, or, with fewer
    rows than threads, the packed panels of outputs (float32 and float64 weights)."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], N = out.shape[1], c, r0, m
    if out.shape[0] != M:
        raise ValueError(f"out must have {M} rows (one per row of x), got {out.shape[0]}")
    if x.strides[1] != x.itemsize or out.strides[1] != out.itemsize:
        raise ValueError("x and out must have unit column stride (rows may be strided)")
    dtype = np.float32 if floating is float else np.float64
    if not isinstance(packed, np.ndarray) or packed.ndim not in (3, 4):
        raise ValueError(f"packed must be a weight packed by pack_linear_weight, got "
                         f"{type(packed).__name__} of {getattr(packed, 'ndim', '?')} axes")
    cdef Py_ssize_t width = _weight_width(packed, N, K, False, dtype, isa, "packed")
    if bias is not None:
        _check_vector(bias, N, "bias")
    cdef int path = linear_isa(isa)
    cdef int nt = team_size(M * N * K // 64, num_threads)
    if M == 0 or N == 0:
        return
    if K == 0:
        np.asarray(out)[...] = 0 if bias is None else np.asarray(bias)
        return
    cdef const floating* bias_p = NULL if bias is None else &bias[0]
    cdef Py_ssize_t lda = x.strides[0] // x.itemsize, ldc = out.strides[0] // out.itemsize
    cdef Py_ssize_t chunk = (M + nt - 1) // nt
    cdef const floating* w = _weight_data(packed, width, &x[0, 0])
    cdef uint8_t[:, ::1] work = _split_work(nt, K, width)
    cdef Py_ssize_t panels_each, n0, n1
    if M < nt and width > 1:
        # Fewer rows than threads (a decoder's token): each thread takes a run of the
        # packed panels, all rows. Every output is still summed by one micro-kernel call
        # over its panel, so results do not depend on the thread count.
        panels_each = ((N + width - 1) // width + nt - 1) // nt
        with nogil:
            for c in prange(nt, num_threads=nt, schedule="static"):
                n0 = c * panels_each * width
                n1 = min(N, n0 + panels_each * width)
                if n1 > n0:
                    linear_rows(path, M, n1 - n0, K, &x[0, 0], lda, w + n0 * K, width,
                                NULL if bias_p == NULL else bias_p + n0, &out[0, 0] + n0,
                                ldc, &work[c, 0])
        return
    with nogil:
        for c in prange(nt, num_threads=nt, schedule="static"):
            r0 = c * chunk
            m = min(chunk, M - r0)
            if m > 0:
                linear_rows(path, m, N, K, &x[r0, 0], lda, w, width, bias_p, &out[r0, 0], ldc,
                            &work[c, 0])


# ---- int8 linear layers (cattn_int8_gemm.h) ----------------------------------------------
# A float32 weight is quantized once (int8, one scale per output) and packed in panels of
# 16 outputs × groups of 4 inputs; each call quantizes its rows (uint8, one scale and zero
# point per row) and sums the products exactly in int32 on the best int8 path of the CPU.

cdef extern from "cattn_int8_gemm.h":
    int CATTN_I8_PORTABLE, CATTN_I8_AVX2, CATTN_I8_AVX_VNNI, CATTN_I8_AVX512_VNNI, CATTN_I8_AMX
    int CATTN_I8_HAVE_AVX_VNNI
    const bint CATTN_ISA_EMULATED
    int cattn_i8_supported() noexcept nogil
    size_t cattn_i8_work_bytes(Py_ssize_t K) noexcept nogil
    void cattn_i8_quantize_rows(int path, Py_ssize_t rows, Py_ssize_t K, const float* x,
                                Py_ssize_t ldx, uint8_t* q, Py_ssize_t ldq, float* scale,
                                int32_t* zp) noexcept nogil
    void cattn_i8_gemm_raw(int path, Py_ssize_t rows, Py_ssize_t N, Py_ssize_t kg,
                           const uint8_t* a, Py_ssize_t lda, const int8_t* packed, int32_t* c,
                           Py_ssize_t ldc) noexcept nogil
    ctypedef struct cattn_i8_weight:
        const int8_t* packed
        const int32_t* col_sums
        const float* scale
        int path
    void cattn_i8_linear(int path, Py_ssize_t rows, Py_ssize_t N, Py_ssize_t K, const float* x,
                         Py_ssize_t ldx, const int8_t* packed, const int32_t* col_sums,
                         const float* w_scale, const float* bias, float* out, Py_ssize_t ldo,
                         void* work) noexcept nogil


# best first; the path numbers of cattn_int8_gemm.h are the positions from the end
INT8_PATHS = ("amx", "avx512_vnni", "avx_vnni", "avx2", "portable")
cdef int INT8_SUPPORTED = cattn_i8_supported()


def int8_supported_paths():
    """The int8 paths this CPU runs, best first (avx_vnni only where the CPU has it, not as
    a step below avx512_vnni; but in the emulation build, which runs it on AVX512-VNNI)."""
    return tuple(name for i, name in enumerate(INT8_PATHS[::-1])
                 if i <= INT8_SUPPORTED and (i != CATTN_I8_AVX_VNNI or i == INT8_SUPPORTED
                                             or CATTN_ISA_EMULATED))[::-1]


def int8_path_index(isa=None):
    """The int8 path for a call: `isa` (a name of INT8_PATHS this CPU runs), else the best
    one the attention kernel's path allows (CATTN_ISA=portable: plain C; avx2: the 256-bit
    paths; avx512 and avx512_bf16: no AMX tiles; amx: all)."""
    if isa is not None:
        if isa not in int8_supported_paths():
            raise ValueError(f"the int8 path {isa!r} is not available on this CPU; "
                             f"available: {', '.join(int8_supported_paths())}")
        return len(INT8_PATHS) - 1 - INT8_PATHS.index(isa)
    cap = _kernel.default_isa_index()
    if cap == CATTN_ISA_PORTABLE:
        return CATTN_I8_PORTABLE
    if cap == CATTN_ISA_AVX2:
        return min(INT8_SUPPORTED, CATTN_I8_AVX_VNNI)
    if cap != CATTN_ISA_AMX:
        return min(INT8_SUPPORTED, CATTN_I8_AVX512_VNNI)
    return INT8_SUPPORTED


def int8_path():
    """The int8 path calls take by default: a name of INT8_PATHS."""
    return INT8_PATHS[len(INT8_PATHS) - 1 - int8_path_index()]


cdef class Int8Weight:
    """A float32 weight (n_out, n_in) quantized for linear_int8: int8 levels
    q = round(w / scale) with scale = max|w[n, :]| / 127 per output (1 for a row of zeros),
    packed in panels of 16 outputs (see cattn_int8_gemm.h), the levels' sum per output and
    the scales, both padded with zeros to whole panels. The layer steps (project_scatter,
    attention_output_and_feed_forward) take it in place of a float32 weight; its products
    run on int8 path `isa` (default: int8_path())."""
    cdef readonly object packed, col_sums, scale
    cdef readonly Py_ssize_t n_out, n_in
    cdef cattn_i8_weight c

    def __init__(self, weight, isa=None):
        w = np.asarray(weight)
        if w.ndim != 2 or w.dtype != np.float32:
            raise TypeError(f"an int8 weight is quantized from a float32 (n_out, n_in) "
                            f"array, got {w.dtype} of shape {w.shape}")
        if not np.isfinite(w).all():
            raise ValueError("a weight quantized to int8 must be finite")
        N, K = w.shape
        panels, groups = (N + 15) // 16, (K + 3) // 4
        scale = np.abs(w).max(axis=1, initial=0) / np.float32(127)
        scale[scale == 0] = 1
        levels = np.zeros((panels * 16, max(groups, 1) * 4), np.int8)
        levels[:N, :K] = np.clip(np.rint(w / scale[:, None]), -127, 127)
        self.packed = np.ascontiguousarray(
            levels.reshape(panels, 16, -1, 4).transpose(0, 2, 1, 3))[:, :groups]
        self.col_sums = levels.sum(axis=1, dtype=np.int32)
        self.scale = np.zeros(panels * 16, np.float32)
        self.scale[:N] = scale
        self.n_out, self.n_in = N, K
        cdef const int8_t[:, :, :, ::1] packed = self.packed if N and K else None
        cdef const int32_t[::1] col_sums = self.col_sums
        cdef const float[::1] scales = self.scale
        self.c.packed = &packed[0, 0, 0, 0] if N and K else NULL
        self.c.col_sums = &col_sums[0] if N else NULL
        self.c.scale = &scales[0] if N else NULL
        self.c.path = int8_path_index(isa)

    @property
    def path(self):
        """The int8 path of this weight's products (a name of INT8_PATHS)."""
        return INT8_PATHS[len(INT8_PATHS) - 1 - self.c.path]

    def levels(self):
        """The int8 levels (n_out, n_in), unpacked."""
        panels, groups = self.packed.shape[:2]
        flat = self.packed.transpose(0, 2, 1, 3).reshape(panels * 16, groups * 4)
        return flat[:self.n_out, :self.n_in].copy()

    def dequantized(self):
        """The float32 weight these levels stand for."""
        return self.levels() * self.scale[:self.n_out, None]

    def __repr__(self):
        return f"Int8Weight(n_out={self.n_out}, n_in={self.n_in}, path={self.path!r})"


def quantize_rows(const float[:, :] x, isa=None):
    """Each row of x (unit column stride) quantized as linear_int8 does: (levels (rows,
    n_in rounded up to 4) uint8, zeros past n_in; scale (rows,) float32; zero_point (rows,)
    int32), with x ≈ (levels - zero_point) · scale. The range of a row always holds 0."""
    cdef int path = int8_path_index(isa)
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1]
    if M and x.strides[1] != x.itemsize:
        raise ValueError("x must have unit column stride")
    levels_a = np.zeros((M, (K + 3) // 4 * 4), np.uint8)
    scale_a = np.zeros(M, np.float32)
    zp_a = np.zeros(M, np.int32)
    cdef uint8_t[:, ::1] levels = levels_a
    cdef float[::1] scale = scale_a
    cdef int32_t[::1] zp = zp_a
    if M and K:
        with nogil:
            cattn_i8_quantize_rows(path, M, K, &x[0, 0], x.strides[0] // 4, &levels[0, 0],
                                   levels.shape[1], &scale[0], &zp[0])
    return levels_a, scale_a, zp_a


cdef int _int8_call_path(weight, isa) except -1:
    return int8_path_index(isa) if isa is not None else (<Int8Weight>weight).c.path


def _check_int8_layer(weight, Py_ssize_t N, Py_ssize_t K, dtype, name):
    if dtype != np.float32:
        raise TypeError(f"{name} is an int8 weight, which serves float32 layers only, not "
                        f"{np.dtype(dtype)}")
    if (weight.n_out, weight.n_in) != (N, K):
        raise ValueError(f"{name} must be quantized from an ({N}, {K}) weight, got "
                         f"({weight.n_out}, {weight.n_in})")
    return INT8_WEIGHT


def _check_int8_weight(weight, Py_ssize_t K):
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be an Int8Weight, got {type(weight).__name__}")
    if weight.n_in != K:
        raise ValueError(f"the weight takes {weight.n_in} inputs, the rows have {K}")


def int8_matmul(const uint8_t[:, ::1] levels, weight, isa=None):
    """The raw int32 sums levels · qwᵀ (rows, n_out) of quantized rows (as quantize_rows
    returns them) and an Int8Weight: what linear_int8 dequantizes."""
    cdef Py_ssize_t M = levels.shape[0], groups
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be an Int8Weight, got {type(weight).__name__}")
    cdef int path = _int8_call_path(weight, isa)
    groups = weight.packed.shape[1]
    if levels.shape[1] != groups * 4:
        raise ValueError(f"levels must have {groups * 4} columns (the weight's inputs rounded "
                         f"up to 4), got {levels.shape[1]}")
    out_a = np.zeros((M, weight.n_out), np.int32)
    cdef int32_t[:, ::1] out = out_a
    cdef const int8_t[:, :, :, ::1] packed = weight.packed
    cdef Py_ssize_t N = weight.n_out
    if M and N and groups:
        with nogil:
            cattn_i8_gemm_raw(path, M, N, groups, &levels[0, 0], levels.shape[1],
                              &packed[0, 0, 0, 0], &out[0, 0], N)
    return out_a


def linear_int8(const float[:, :] x, weight, const float[::1] bias, float[:, :] out,
                isa=None, num_threads=None):
    """out <- x · Wᵀ + bias in int8 products: W an Int8Weight, each row of x quantized on
    the way in (quantize_rows), the int32 sums dequantized with the bias on the way out. x
    (rows, n_in) and out (rows, n_out) float32 with unit column stride; bias (n_out,) or
    None. Rows are spread over the threads; a row's result does not depend on them."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], N = out.shape[1], c, r0, m
    _check_int8_weight(weight, K)
    if weight.n_out != N:
        raise ValueError(f"out must have {weight.n_out} columns (the weight's outputs), got {N}")
    if out.shape[0] != M:
        raise ValueError(f"out must have {M} rows (one per row of x), got {out.shape[0]}")
    if (M and K and x.strides[1] != 4) or (M and N and out.strides[1] != 4):
        raise ValueError("x and out must have unit column stride (rows may be strided)")
    if bias is not None:
        _check_vector(bias, N, "bias")
    cdef int path = _int8_call_path(weight, isa)
    cdef int nt = team_size(M * N * K // 256, num_threads)
    if M == 0 or N == 0:
        return
    if K == 0:
        np.asarray(out)[...] = 0 if bias is None else np.asarray(bias)
        return
    cdef const int8_t[:, :, :, ::1] packed = weight.packed
    cdef const int32_t[::1] col_sums = weight.col_sums
    cdef const float[::1] w_scale = weight.scale
    cdef const float* bias_p = NULL if bias is None else &bias[0]
    cdef Py_ssize_t ldx = x.strides[0] // 4, ldo = out.strides[0] // 4
    cdef Py_ssize_t chunk = (M + nt - 1) // nt
    cdef uint8_t[:, ::1] work = np.empty((nt, cattn_i8_work_bytes(K)), np.uint8)
    with nogil:
        for c in prange(nt, num_threads=nt, schedule="static"):
            r0 = c * chunk
            m = min(chunk, M - r0)
            if m > 0:
                cattn_i8_linear(path, m, N, K, &x[r0, 0], ldx, &packed[0, 0, 0, 0],
                                &col_sums[0], &w_scale[0], bias_p, &out[r0, 0], ldo,
                                &work[c, 0])

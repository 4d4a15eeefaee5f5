# Row-major GEMM over the Fortran BLAS that scipy.linalg.cython_blas exports.
#
# A row-major matrix is the transpose of a column-major one with the same leading
# dimension, so a row-major C = A·B is computed as the column-major Cᵀ = Bᵀ·Aᵀ: the
# operands swap places and no data is copied to please Fortran.
#
# sgemm and dgemm are pointers that load_blas() fills from scipy the first time a call
# needs them: most paths never call BLAS, and importing scipy.linalg costs about half a
# second. A caller that will reach gemm_ab or gemm_abt calls require_blas() first, with the
# GIL, outside any nogil block; until then the pointers are NULL.
from cython cimport floating

ctypedef void (*sgemm_fn)(char* transa, char* transb, int* m, int* n, int* k, float* alpha,
                          float* a, int* lda, float* b, int* ldb, float* beta, float* c,
                          int* ldc) noexcept nogil
ctypedef void (*dgemm_fn)(char* transa, char* transb, int* m, int* n, int* k, double* alpha,
                          double* a, int* lda, double* b, int* ldb, double* beta, double* c,
                          int* ldc) noexcept nogil

cdef sgemm_fn sgemm
cdef dgemm_fn dgemm

cdef int load_blas() except -1


cdef inline int require_blas() except -1:
    """Make gemm_ab and gemm_abt callable: a pointer test once BLAS is loaded."""
    if dgemm == NULL:
        return load_blas()
    return 0


cdef inline void gemm_abt(int m, int n, int k, floating alpha,
                          const floating* a, int lda, const floating* b, int ldb,
                          floating beta, floating* c, int ldc) noexcept nogil:
    """C[m, n] = alpha · A[m, k] · B[n, k]ᵀ + beta · C (all row-major)."""
    cdef char trans = b'T'
    cdef char no_trans = b'N'
    if floating is float:
        sgemm(&trans, &no_trans, &n, &m, &k, &alpha, <float*> b, &ldb,
              <float*> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&trans, &no_trans, &n, &m, &k, &alpha, <double*> b, &ldb,
              <double*> a, &lda, &beta, c, &ldc)


cdef inline void gemm_ab(int m, int n, int k, floating alpha,
                         const floating* a, int lda, const floating* b, int ldb,
                         floating beta, floating* c, int ldc) noexcept nogil:
    """C[m, n] = alpha · A[m, k] · B[k, n] + beta · C (all row-major)."""
    cdef char no_trans = b'N'
    if floating is float:
        sgemm(&no_trans, &no_trans, &n, &m, &k, &alpha, <float*> b, &ldb,
              <float*> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&no_trans, &no_trans, &n, &m, &k, &alpha, <double*> b, &ldb,
              <double*> a, &lda, &beta, c, &ldc)

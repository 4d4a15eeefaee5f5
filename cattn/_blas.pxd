# Row-major GEMM over scipy.linalg.cython_blas (column-major Fortran BLAS).
#
# A row-major matrix is the transpose of a column-major one with the same leading
# dimension, so a row-major C = A·B is computed as the column-major Cᵀ = Bᵀ·Aᵀ: the
# operands swap places and no data is copied to please Fortran.
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm


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

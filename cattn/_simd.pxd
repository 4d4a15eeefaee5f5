# The C row operations of src/cattn_simd.h and the OpenMP shim of src/cattn_omp.h.
cdef extern from "cattn_simd.h" nogil:
    float cattn_row_max_f32(const float* x, Py_ssize_t n)
    double cattn_row_max_f64(const double* x, Py_ssize_t n)
    float cattn_exp_shift_sum_f32(float* x, Py_ssize_t n, float shift)
    double cattn_exp_shift_sum_f64(double* x, Py_ssize_t n, double shift)
    float cattn_expf_scalar(float x)
    double cattn_exp_scalar(double x)
    const char* cattn_simd_path()

cdef extern from "cattn_omp.h" nogil:
    int CATTN_OPENMP_ENABLED
    int omp_get_max_threads()

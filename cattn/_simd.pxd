# The instruction-set paths (src/cattn_cpu.h), C row operations (src/cattn_simd.h), block
# GEMM micro-kernels (src/cattn_gemm.h) and the OpenMP shim (src/cattn_omp.h). Every
# kernel takes the plan's `isa` first: the path is chosen once per call, never per thread.
cdef extern from "cattn_cpu.h" nogil:
    enum:
        CATTN_ISA_PORTABLE
        CATTN_ISA_AVX2
        CATTN_ISA_AVX512
        CATTN_ISA_AVX512_BF16
        CATTN_ISA_AMX
        CATTN_ISA_BEST
        CATTN_ISA_WIDE16
        CATTN_ISA_BLAS
    int cattn_isa_supported()
    int cattn_isa_runs_on(int isa, int supported)
    int cattn_isa_float_path(int isa)
    const char* cattn_isa_name(int isa)

cdef extern from "cattn_simd.h" nogil:
    float cattn_row_max_f32(int isa, const float* x, Py_ssize_t n)
    double cattn_row_max_f64(int isa, const double* x, Py_ssize_t n)
    float cattn_exp_shift_sum_f32(int isa, float* x, Py_ssize_t n, float shift)
    double cattn_exp_shift_sum_f64(int isa, double* x, Py_ssize_t n, double shift)
    float cattn_expf_scalar(float x)
    double cattn_exp_scalar(double x)
    float cattn_stream_sum_f32(int isa, const float* x, Py_ssize_t n)

cdef extern from "cattn_gemm.h" nogil:
    int CATTN_DIRECT_ROWS
    int CATTN_DIRECT_KEYS
    Py_ssize_t cattn_panel_keys(int isa, int is_double)
    int cattn_isa_uses_blas(int isa)
    void cattn_gemm_qkt_direct_f32(int isa, Py_ssize_t rows, Py_ssize_t n_keys, Py_ssize_t E,
                                   float alpha, const float* q, Py_ssize_t q_rs,
                                   const float* k, Py_ssize_t k_rs, float* c, Py_ssize_t ldc)
    void cattn_gemm_qkt_direct_f64(int isa, Py_ssize_t rows, Py_ssize_t n_keys, Py_ssize_t E,
                                   double alpha, const double* q, Py_ssize_t q_rs,
                                   const double* k, Py_ssize_t k_rs, double* c,
                                   Py_ssize_t ldc)
    void cattn_gemm_pv_direct_f32(int isa, Py_ssize_t rows, Py_ssize_t Ev, Py_ssize_t n_keys,
                                  const float* p, Py_ssize_t ldp, const float* v,
                                  Py_ssize_t v_rs, float* acc, Py_ssize_t ld_acc)
    void cattn_gemm_pv_direct_f64(int isa, Py_ssize_t rows, Py_ssize_t Ev, Py_ssize_t n_keys,
                                  const double* p, Py_ssize_t ldp, const double* v,
                                  Py_ssize_t v_rs, double* acc, Py_ssize_t ld_acc)
    void cattn_pack_keys_f32(int isa, const float* k, Py_ssize_t k_rs, Py_ssize_t n_keys,
                             Py_ssize_t E, float* packed)
    void cattn_pack_keys_f64(int isa, const double* k, Py_ssize_t k_rs, Py_ssize_t n_keys,
                             Py_ssize_t E, double* packed)
    void cattn_gemm_qkt_f32(int isa, Py_ssize_t rows, Py_ssize_t n_keys, Py_ssize_t E,
                            float alpha, const float* q, Py_ssize_t q_rs,
                            const float* packed, float* c, Py_ssize_t ldc)
    void cattn_gemm_qkt_f64(int isa, Py_ssize_t rows, Py_ssize_t n_keys, Py_ssize_t E,
                            double alpha, const double* q, Py_ssize_t q_rs,
                            const double* packed, double* c, Py_ssize_t ldc)
    void cattn_gemm_pv_f32(int isa, Py_ssize_t rows, Py_ssize_t Ev, Py_ssize_t n_keys,
                           const float* p, Py_ssize_t ldp, const float* v, Py_ssize_t v_rs,
                           float* acc, Py_ssize_t ld_acc)
    void cattn_gemm_pv_f64(int isa, Py_ssize_t rows, Py_ssize_t Ev, Py_ssize_t n_keys,
                           const double* p, Py_ssize_t ldp, const double* v,
                           Py_ssize_t v_rs, double* acc, Py_ssize_t ld_acc)

cdef extern from "cattn_convert.h" nogil:
    enum:
        CATTN_ELEM_NATIVE
        CATTN_ELEM_F16
        CATTN_ELEM_BF16
        CATTN_ELEM_I8

cdef extern from "cattn_gemm.h" nogil:
    void cattn_pack_keys_cvt(int isa, int elem, const void* k, Py_ssize_t k_rs,
                             Py_ssize_t n_keys, Py_ssize_t E, float* packed)
    void cattn_gemm_qkt_direct_cvt(int isa, int elem, Py_ssize_t rows, Py_ssize_t n_keys,
                                   Py_ssize_t E, float alpha, const float* q, Py_ssize_t q_rs,
                                   const void* k, Py_ssize_t k_rs, float* c, Py_ssize_t ldc)
    void cattn_gemm_pv_direct_cvt(int isa, int elem, Py_ssize_t rows, Py_ssize_t Ev,
                                  Py_ssize_t n_keys, const float* p, Py_ssize_t ldp,
                                  const void* v, Py_ssize_t v_rs, float* acc,
                                  Py_ssize_t ld_acc)
    void cattn_convert_rows(int isa, int elem, const void* src, Py_ssize_t src_rs,
                            Py_ssize_t rows, Py_ssize_t cols, float* dst, Py_ssize_t dst_rs)

cdef extern from "cattn_omp.h" nogil:
    int CATTN_OPENMP_ENABLED
    int omp_get_max_threads()

cdef extern from "cattn_bf16.h" nogil:
    int cattn_isa_has_bf16_products(int isa)
    size_t cattn_bf16_work_bytes(Py_ssize_t block_q, Py_ssize_t block_k, Py_ssize_t E,
                                 Py_ssize_t Ev)
    size_t cattn_bf16_queries_bytes(Py_ssize_t block_q, Py_ssize_t E)
    void cattn_bf16_load_queries(Py_ssize_t rows, Py_ssize_t E, const void* q, int q_f32,
                                 Py_ssize_t q_rs, void* queries)
    void cattn_bf16_qkt(int isa, Py_ssize_t rows, Py_ssize_t n_keys, Py_ssize_t E,
                        float alpha, const unsigned short* k, Py_ssize_t k_rs, float* c,
                        Py_ssize_t ldc, void* queries, void* work)
    void cattn_bf16_pv(int isa, Py_ssize_t rows, Py_ssize_t Ev, Py_ssize_t n_keys,
                       const float* p, Py_ssize_t ldp, const unsigned short* v,
                       Py_ssize_t v_rs, float* acc, Py_ssize_t ld_acc, void* work)

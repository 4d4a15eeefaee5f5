/*
 * OpenMP queries that also compile without OpenMP: a build without it runs serially and
 * reports one thread, instead of failing to build.
 */
#ifndef CATTN_OMP_H
#define CATTN_OMP_H
#ifdef _OPENMP
#include <omp.h>
#define CATTN_OPENMP_ENABLED 1
#else
#define CATTN_OPENMP_ENABLED 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif
#endif

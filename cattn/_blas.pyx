# cython: language_level=3
"""The BLAS behind cattn._blas's GEMMs, loaded on first need from scipy.linalg.cython_blas.

scipy exports its BLAS wrappers as capsules named by their C signature; asking for the
pointer under the signature these GEMMs call with fails, rather than calling a function of
another signature, when a scipy release changes it (as a cimport would at import time).
"""
import importlib

from cpython.pycapsule cimport PyCapsule_GetPointer

# cython_blas's float and double are typedefs of its own, which the signatures name.
_SCALAR = "__pyx_t_5scipy_6linalg_11cython_blas_{} *"
_GEMM_SIGNATURE = ("void (char *, char *, int *, int *, int *, {s}, {s}, int *, {s}, int *, "
                   "{s}, {s}, int *)")


cdef void* _capsule_pointer(dict capi, str name, str scalar) except NULL:
    signature = _GEMM_SIGNATURE.format(s=_SCALAR.format(scalar)).encode()
    try:
        return PyCapsule_GetPointer(capi[name], signature)
    except (KeyError, ValueError) as e:
        raise ImportError(
            f"scipy.linalg.cython_blas has no {name} of signature {signature.decode()!r}: "
            f"this scipy is not one cattn can call BLAS through") from e


cdef int load_blas() except -1:
    """Fill sgemm and dgemm (with the GIL; a no-op once done)."""
    global sgemm, dgemm
    if dgemm != NULL:
        return 0
    capi = importlib.import_module("scipy.linalg.cython_blas").__pyx_capi__
    cdef sgemm_fn s = <sgemm_fn> _capsule_pointer(capi, "sgemm", "s")
    cdef dgemm_fn d = <dgemm_fn> _capsule_pointer(capi, "dgemm", "d")
    sgemm = s
    dgemm = d  # last: require_blas() tests it
    return 0


def loaded():
    """Whether BLAS has been loaded."""
    return dgemm != NULL

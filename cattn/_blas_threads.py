"""Keep BLAS on one thread while the kernel's OpenMP threads call it.

Each OpenMP thread of the kernel calls GEMM on its own small blocks; if BLAS also spread
each call over all cores, 2 threads would run 2 × n BLAS threads (oversubscription).
So BLAS is limited to one thread for the duration of a kernel call, once per call, never
per block.

SciPy's wheels bundle OpenBLAS (the library `scipy.linalg.cython_blas` calls), whose
`openblas_set_num_threads` takes effect at once and costs well under a microsecond through
ctypes. threadpoolctl does the same for any BLAS but costs tens of microseconds a call,
which would dominate tiny inputs: it is only the fallback, when installed, for SciPy
builds against another BLAS.

The limit is reference-counted, so concurrent cattn calls from several Python threads
restore the user's setting only when the last of them returns, and only if the count is
still the 1 set here (a count the user sets meanwhile is kept). Every call sets the count
to 1 as it starts, even while another call runs: a count the user set since is the one
restored at the end.

What this promises: a call's result does not depend on the BLAS count in effect when it
starts (every call is bitwise identical to every other). A count another thread sets
while a call runs (threadpoolctl, openblas_set_num_threads) takes effect at once for the
rest of that call: OpenBLAS may then split its block products over threads, which on
some CPUs changes the last bits (OpenBLAS's Haswell and Zen kernels do; its SkylakeX
kernels do not), within the accuracy of the float32 computation.

This is a process-wide setting of scipy's OpenBLAS (NumPy's wheels bundle a separate
OpenBLAS, which is never touched): while a call on this path runs, other threads calling
scipy's BLAS run it on one thread. OpenBLAS has no per-thread count (its
`openblas_set_num_threads_local` changes the global count too), and without the limit this
path is several times slower (each block GEMM would wake BLAS threads). Only builds whose
compiler has no generic vectors (MSVC) call BLAS; every other path, the portable one
included, leaves BLAS alone.
"""
import ctypes
import glob
import os
import threading

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_", "openblas_get_num_threads")


def _find_openblas():
    """(get, set) ctypes functions of the OpenBLAS that SciPy uses, or None."""
    import scipy  # here, not at import: only calls that use BLAS pay for scipy
    root = os.path.dirname(os.path.dirname(scipy.__file__))
    patterns = [os.path.join(root, d, "*openblas*") for d in ("scipy.libs", "scipy/.dylibs")]
    for path in sorted(p for pat in patterns for p in glob.glob(pat)):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in zip(_GETTERS, _SETTERS):
            get = getattr(lib, get_name, None)
            set_ = getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype = ctypes.c_int
                get.argtypes = []
                set_.restype = None
                set_.argtypes = [ctypes.c_int]
                return get, set_
    return None


class _SingleThreadedBlas:
    """Context manager: BLAS on one thread inside, the user's setting restored after."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None
        self._backend = None  # found on first use
        self._openblas = None
        self._threadpoolctl = None

    def _find_backend(self):
        """Find the backend on first use, outside the lock (it imports scipy); threads that
        race here find the same one."""
        if self._backend is not None:
            return
        openblas = _find_openblas()
        backend = "openblas" if openblas is not None else "none"
        if openblas is None:
            try:
                import threadpoolctl
                self._threadpoolctl = threadpoolctl
                backend = "threadpoolctl"
            except ImportError:
                pass
        self._openblas = openblas
        self._backend = backend  # last: the test above reads it without the lock

    @property
    def backend(self):
        """How BLAS is held on one thread: "openblas", "threadpoolctl" or "none"."""
        self._find_backend()
        return self._backend

    def __enter__(self):
        self._find_backend()
        with self._lock:
            if self._openblas is not None:
                get, set_ = self._openblas
                count = get()
                if count != 1:  # the user's: first call, or set while another call runs
                    self._saved = count
                    set_(1)
            elif self._depth == 0 and self._threadpoolctl is not None:
                self._saved = self._threadpoolctl.threadpool_limits(1, user_api="blas")
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._restore()
        return False

    def _restore(self):
        if self._openblas is not None:
            get, set_ = self._openblas
            # A count someone set while cattn ran is theirs to keep: restore only ours.
            if self._saved is not None and self._saved != 1 and get() == 1:
                set_(self._saved)
        elif self._saved is not None:
            self._saved.restore_original_limits()
        self._saved = None

    # fork(): a child must not inherit the lock held, nor a limit no call will lift
    def _before_fork(self):
        self._lock.acquire()

    def _after_fork_in_parent(self):
        self._lock.release()

    def _after_fork_in_child(self):
        self._lock = threading.Lock()
        if self._depth:  # calls of threads that do not exist in the child
            self._depth = 0
            self._restore()


single_threaded_blas = _SingleThreadedBlas()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=single_threaded_blas._before_fork,
                        after_in_parent=single_threaded_blas._after_fork_in_parent,
                        after_in_child=single_threaded_blas._after_fork_in_child)

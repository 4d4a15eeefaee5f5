"""How many threads a call gets: the default, a process-wide budget, and fork safety.

GNU OpenMP (libgomp) keeps one pool of worker threads per Python thread that starts a
parallel region, sized by that thread's last team: N Python threads asking for T threads
each keep N·(T-1) OS threads alive, and a pool that cannot grow makes libgomp print
"Thread creation failed" and exit the process. A pool does not survive fork(): a child
that reuses it waits forever for threads that do not exist. So every call's team comes
from here:

- the default count: `threads(n)` for the calling thread, else `set_num_threads(n)`, else
  OpenMP's default (OMP_NUM_THREADS, else the cores);
- a budget: the worker threads of all pools together stay within 4 x cores, one team
  within 2 x cores; a caller that finds the budget spent runs its call on its own thread;
- before a pool grows, the threads it needs are started (and stopped) here first, where a
  refusal is an exception, not an exit: the call runs on the threads the OS allowed. The
  pool then grows at once, under the same lock as the probe, so that no other caller's
  probe counts the room this pool is about to take;
- before fork(), the forking thread's pool is released (omp_pause_resource_all), so the
  child starts a fresh one. Where that is impossible, the child runs that thread's calls
  on one thread and says so once.
"""
import contextlib
import ctypes
import glob
import os
import threading
import time
import warnings
import weakref
from typing import Iterator, Optional

import numpy as np


# ----------------------------------------------------- idle workers sleep, not spin
# After a parallel region, OpenMP workers busy-wait for the next one (libgomp: 300,000
# spins, a few ms of a core) and so steal the cores NumPy's BLAS threads need between
# cattn calls. The wait policy is read once, when the runtime loads: if cattn is the one
# loading it and the user chose no policy, it loads with OMP_WAIT_POLICY=passive, set in
# the environment only for the moment of loading (subprocesses and later readers see the
# user's environment). Other libraries sharing this OpenMP runtime get the same policy;
# OMP_WAIT_POLICY=active (or GOMP_SPINCOUNT) restores spinning.
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_OPENMP_RUNTIMES = ("libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so",
                    "libomp.dylib", "libiomp5.dylib")


def _openmp_runtime_loaded():
    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None:
        return True  # cannot tell: leave the choice to the runtime
    for name in _OPENMP_RUNTIMES:
        try:
            ctypes.CDLL(name, mode=mode)
            return True
        except OSError:
            pass
    return False


def _import_kernel():
    """cattn._kernel, loading the OpenMP runtime with passive waiting when that is ours to
    choose; and who chose the wait policy."""
    chosen = [f"{v}={os.environ[v]}" for v in _WAIT_VARIABLES if v in os.environ]
    if chosen:
        from cattn import _kernel
        return _kernel, "the user's (" + ", ".join(chosen) + ")"
    if _openmp_runtime_loaded():
        from cattn import _kernel
        return _kernel, "the runtime's default (it was loaded before cattn)"
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        from cattn import _kernel
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    return _kernel, "passive (set by cattn when it loaded the OpenMP runtime)"


_kernel, WAIT_POLICY = _import_kernel()

try:
    _CORES = len(os.sched_getaffinity(0))
except (AttributeError, OSError):
    _CORES = os.cpu_count() or 1
_CORES = max(_CORES, 1)
_OPENMP = _kernel.openmp_enabled()
MAX_TEAM = 2 * _CORES                 # threads of one call, the caller included
WORKER_BUDGET = max(4 * _CORES, 4)    # OpenMP worker threads of all pools together

_lock = threading.RLock()  # (re-entrant: a thread-exit finalizer may run while held)
_pools = {}               # thread ident -> team size its libgomp pool holds (>= 2)
_stale_pool_thread = None  # in a forked child: the thread whose pool could not be released
_process_default = None   # set_num_threads
_local = threading.local()  # .override (threads()), .pool_owner (finalizer anchor)
_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------- the default count

def _check_count(n, name):
    # Imported here, not above: nothing may load a compiled module (which may link the
    # OpenMP runtime) before the runtime is loaded with its wait policy.
    from cattn._validation import check_int
    return check_int(n, name, 1)


def set_num_threads(n: Optional[int]) -> None:
    """Default number of threads of every call in this process (None: OpenMP's default,
    OMP_NUM_THREADS or the cores). A call's num_threads= and `threads(n)` take precedence.

    Parameters
    ----------
    n : int or None
        Threads per call, at least 1; None goes back to OpenMP's default.

    Raises
    ------
    TypeError
        `n` is not an integer (or is a bool).
    ValueError
        `n` is below 1.

    See Also
    --------
    threads : the same for the calls of one Python thread, inside a with block.
    get_num_threads : the count a call would use now.

    Examples
    --------
    >>> import cattn
    >>> cattn.set_num_threads(1)
    >>> cattn.get_num_threads()
    1
    >>> cattn.set_num_threads(None)
    """
    global _process_default
    _process_default = None if n is None else _check_count(n, "set_num_threads(n): n")


def get_num_threads() -> int:
    """The number of threads a call from this thread uses when it does not say
    num_threads= (an upper bound: the budget and the size of the problem may lower it).

    Returns
    -------
    int
        From `threads(n)` in this thread, else `set_num_threads(n)`, else OpenMP's default
        (OMP_NUM_THREADS, else the cores).

    See Also
    --------
    set_num_threads, threads : where the count comes from.
    show_config : OpenMP's default team size and the build's other settings.

    Examples
    --------
    >>> import cattn
    >>> with cattn.threads(2):
    ...     cattn.get_num_threads()
    2
    """
    override = getattr(_local, "override", None)
    if override is not None:
        return override
    if _process_default is not None:
        return _process_default
    return _kernel.default_num_threads()


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """`with cattn.threads(n):` calls from this thread default to n threads inside the
    block (other Python threads are not affected); blocks nest.

    Parameters
    ----------
    n : int
        Threads per call inside the block, at least 1.

    Returns
    -------
    context manager
        Yields `n`; leaving the block restores the previous count of this thread.

    Raises
    ------
    TypeError, ValueError
        As `set_num_threads` does for an `n` that is not an integer of at least 1.

    See Also
    --------
    set_num_threads : the default of the whole process.
    get_num_threads : the count a call would use now.

    Examples
    --------
    >>> import numpy as np
    >>> import cattn
    >>> q = np.ones((1, 4, 8), dtype=np.float32)
    >>> with cattn.threads(1):
    ...     out = cattn.scaled_dot_product_attention(q, q, q)   # runs on one thread
    >>> out.shape
    (1, 4, 8)
    """
    n = _check_count(n, "threads(n): n")
    previous = getattr(_local, "override", None)
    _local.override = n
    try:
        yield n
    finally:
        _local.override = previous


# ----------------------------------------------------------------- the thread budget

def team_size(wanted):
    """Threads to run a call with, the caller included, for at most `wanted` threads."""
    if wanted <= 1 or not _OPENMP:
        return 1
    wanted = min(wanted, MAX_TEAM)
    ident = threading.get_ident()
    if ident == _stale_pool_thread:
        _warn_once("fork", "cattn: in this forked child, calls from the thread that called "
                   "fork() run on one thread: its OpenMP threads did not survive fork() and "
                   "could not be released before it (calls from other threads are not "
                   "affected)")
        return 1
    have = _pools.get(ident, 1)
    if wanted == have:
        return have
    with _lock:
        if wanted < have:  # libgomp lets the extra workers exit: their budget is free again
            _pools[ident] = wanted
            return wanted
        free = WORKER_BUDGET - sum(size - 1 for size in _pools.values()) + (have - 1)
        target = min(wanted, 1 + free)
        if target <= have:
            return have
        started = _can_start_threads(target - have)
        team = have + started
        if started < target - have:
            _warn_once("refused", f"cattn: the system refused to start more threads; "
                       f"calls run on {team} thread(s) where {wanted} were asked for")
        if team > have:
            _grow_pool(team)
        if team > 1:
            if getattr(_local, "pool_owner", None) is None:
                _watch_thread_exit()
            _pools[ident] = team
        return team


def _watch_thread_exit():
    """Free the calling thread's share of the budget when it ends (libgomp then ends its
    pool too): a finalizer on an object only this thread's locals hold."""
    anchor = type("_PoolOwner", (), {})()
    ident = threading.get_ident()
    weakref.finalize(anchor, _forget_pool, ident)
    _local.pool_owner = anchor


def _forget_pool(ident):
    with _lock:
        _pools.pop(ident, None)


_ONE_ELEMENT = np.zeros(1, np.float32)


def _grow_pool(team):
    """Start the calling thread's OpenMP workers for a team of `team` now, with the lock
    held: an empty parallel region of that many threads (libgomp keeps them for this
    thread's next regions, the call's included)."""
    _kernel.stream_sum(_ONE_ELEMENT, team)


def _can_start_threads(n):
    """How many of n more threads the OS lets this process start right now (at most n).

    Started as Python threads, where a refusal is a RuntimeError, and stopped again before
    returning: libgomp then starts its own in the room they leave, instead of exiting the
    process when the OS says no."""
    release = threading.Event()
    started = []
    native_ids = []

    def wait():
        native_ids.append(threading.get_native_id())
        release.wait()

    try:
        for _ in range(n):
            t = threading.Thread(target=wait, daemon=True)
            t.start()
            started.append(t)
    except RuntimeError:  # "can't start new thread": the limit is reached
        pass
    release.set()
    for t in started:
        t.join()
    # join() returns before the OS thread is gone: wait until the kernel has reaped them,
    # so that they do not count against a process limit when libgomp starts its own.
    for tid in native_ids:
        path = f"/proc/self/task/{tid}"
        for _ in range(1000):
            if not os.path.exists(path):
                break
            time.sleep(0.0001)
    return len(started)


def thread_report():
    """{Python thread ident: OpenMP team size its pool holds} (for tests and diagnostics)."""
    with _lock:
        return dict(_pools)


# ------------------------------------------------------------------------ fork safety

def _openmp_library():
    """ctypes handle on omp_pause_resource_all of the libgomp cattn's core uses, or None
    (another runtime, e.g. LLVM's libomp, which re-initializes itself in a forked child)."""
    if not _OPENMP or not hasattr(os, "RTLD_NOLOAD"):
        return None
    # A wheel bundles its own copy under a unique name next to the package (auditwheel).
    package_dir = os.path.dirname(os.path.abspath(__file__))
    bundled = glob.glob(os.path.join(os.path.dirname(package_dir), "cattn.libs", "libgomp*"))
    for name in sorted(bundled) + ["libgomp.so.1"]:
        try:
            release = ctypes.CDLL(name, mode=os.RTLD_NOLOAD).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        release.argtypes = [ctypes.c_int]
        release.restype = ctypes.c_int
        return release
    return None


_pause_resource_all = _openmp_library()
_OMP_PAUSE_HARD = 2


def _release_pool():
    """Stop the calling thread's OpenMP workers; whether that succeeded."""
    if _pause_resource_all is None:
        return False
    return _pause_resource_all(_OMP_PAUSE_HARD) == 0


def _before_fork():
    global _fork_pool_released
    _lock.acquire()  # the child must not inherit it held by a thread that is gone
    ident = threading.get_ident()
    _fork_pool_released = ident not in _pools or _release_pool()
    if _fork_pool_released:
        _pools.pop(ident, None)


def _after_fork_in_parent():
    _lock.release()


def _after_fork_in_child():
    global _lock, _stale_pool_thread
    ident = threading.get_ident()
    stale = ident in _pools and not _fork_pool_released
    _pools.clear()  # the other threads, and their pools, are not in the child
    _stale_pool_thread = ident if stale else None
    _lock = threading.RLock()  # (re-entrant: a thread-exit finalizer may run while held)


_fork_pool_released = True
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


# ---------------------------------------------- the default path of bfloat16 products
# A CPU with AVX512-BF16 but no AMX multiplies bfloat16 blocks either with its vdpbf16ps
# instructions ("avx512_bf16") or by widening them to float32 for the AVX-512 float32
# kernels ("avx512"). Which is faster depends on the CPU: vdpbf16ps measured slower than
# the float32 kernels on a Sapphire Rapids Xeon (bfloat16 prefill L = 2048: 86 vs 108 GF/s)
# and 1.4-1.65x faster on Zen 5. So no rule from one machine: the process times both once,
# interleaved, on a small bfloat16 prefill, and keeps the faster (the native path only if
# clearly faster: it rounds P to bfloat16, the widened path does not). AMX CPUs take their
# tiles; CPUs without bfloat16 instructions widen.
BF16_CALIBRATION_SHAPE = (1, 4, 256, 256, 64)   # (B, H, L, S, E): ~1 ms a call
BF16_CALIBRATION_ROUNDS = 5
BF16_NATIVE_MARGIN = 0.95                      # native kept when it takes < 95% of the time


def choose_bf16_path(supported, time_path=None):
    """(path, reason): the default path for bfloat16 products among `supported` (the
    CPU's paths, best first, as _kernel.supported_isa_paths()). time_path(path) -> seconds
    of one bfloat16 call on that path; called only when the CPU has both candidates."""
    if "amx" in supported:
        return "amx", "AMX-BF16 tiles on this CPU (vdpbf16ps for blocks under 16 rows)"
    if "avx512_bf16" not in supported:
        return supported[0], "no bfloat16 instructions on this CPU: bfloat16 widened to float32"
    if time_path is None:
        return "avx512", "not measured: bfloat16 widened to float32"
    native, widened = [], []
    for _ in range(BF16_CALIBRATION_ROUNDS):
        native.append(time_path("avx512_bf16"))
        widened.append(time_path("avx512"))
    ratio = float(np.median(widened)) / max(float(np.median(native)), 1e-12)
    measured = (f"measured at first use: vdpbf16ps {ratio:.2f}x the speed of the widened "
                f"float32 products")
    if ratio * BF16_NATIVE_MARGIN > 1.0:
        return "avx512_bf16", measured
    return "avx512", measured + ", not enough to round P to bfloat16: widened"


def time_bf16_call(path):
    """Seconds of one bfloat16 call of BF16_CALIBRATION_SHAPE on `path` (the
    calibration's probe; bfloat16 arrays through ml_dtypes)."""
    import importlib
    import ml_dtypes
    # The front is loaded by name when the probe runs (inside a call, long after every
    # module's import): the front imports this module, not the other way round.
    attention = importlib.import_module("cattn._api").scaled_dot_product_attention
    B, H, L, S, E = BF16_CALIBRATION_SHAPE
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, n, E)).astype(ml_dtypes.bfloat16)
               for n in (L, S, S))
    attention(q, k, v, num_threads=1, _isa=path)  # (warm)
    start = time.perf_counter()
    attention(q, k, v, num_threads=1, _isa=path)
    return time.perf_counter() - start


def calibrate_bf16_path(supported, time_path=time_bf16_call):
    """choose_bf16_path on this CPU, timing real calls (without ml_dtypes no bfloat16
    arrays exist to multiply: then the widened path, unmeasured). It runs inside the
    user's first call, so a calibration that fails leaves the widened path and never
    fails that call."""
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return choose_bf16_path(supported)
    try:
        return choose_bf16_path(supported, time_path)
    except Exception as error:
        return "avx512", f"calibration failed ({error!r}): bfloat16 widened to float32"


def bf16_products():
    """(path, reason): the path bfloat16 products take by default, and why."""
    path, reason = _kernel.bf16_products()
    if reason is None:
        asked = os.environ.get("CATTN_ISA", "").strip()
        reason = (f"CATTN_ISA={asked} caps the path" if asked
                  else choose_bf16_path(_kernel.supported_isa_paths())[1])
    return path, reason


_kernel.set_bf16_calibration(calibrate_bf16_path)

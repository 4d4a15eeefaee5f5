"""cattn inside real applications: fork(), many Python threads, a process thread limit,
overlapping outputs, and the validation gaps an adversarial probe found.

Anything that could hang or end the process runs in a child process with a timeout, so
that a regression fails the test instead of hanging or killing the test session.
"""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import cattn
from cattn import _kernel, _runtime
from conftest import assert_matches_reference, reference64, tolerance

sdpa = cattn.scaled_dot_product_attention
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cattn.__file__)))


def run_child(code, timeout=120, env=None):
    """Run a Python script with this tree's cattn; (exit status, stdout, stderr)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + sys.path)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _case(seed=0, dtype=np.float32):
    """Enough (head, query block) tasks for a multi-threaded call."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, 200, 32)).astype(dtype)
    k = rng.standard_normal((2, 4, 300, 32)).astype(dtype)
    v = rng.standard_normal((2, 4, 300, 16)).astype(dtype)
    return q, k, v


# ------------------------------------------------------------------------------ fork

def _check_in_child(seed):
    """In a forked child: multi-threaded calls give the reference's result."""
    q, k, v = _case(seed)
    got = sdpa(q, k, v, is_causal=True, num_threads=2)
    want = reference64(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, **tolerance(np.float32))
    np.testing.assert_array_equal(sdpa(q, k, v, is_causal=True, num_threads=1), got)
    return os.getpid(), _runtime.thread_report().get(threading.get_ident(), 1)


def _wait_for_children(pids, timeout):
    """Exit statuses of the children; any still running at the deadline is killed."""
    deadline = time.monotonic() + timeout
    statuses = {}
    while len(statuses) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    for pid in pids:
        if pid not in statuses:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            statuses[pid] = "hung"
    return [statuses[pid] for pid in pids]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_pool_children_after_multithreaded_calls():
    """A 'fork' multiprocessing pool (gunicorn-like pre-forked workers) after the parent
    ran multi-threaded calls: every worker's multi-threaded calls finish and match."""
    _check_in_child(0)  # the parent's main thread now holds an OpenMP pool
    assert _runtime.thread_report().get(threading.get_ident(), 1) > 1
    pool = multiprocessing.get_context("fork").Pool(3)
    try:
        results = pool.map_async(_check_in_child, range(6), chunksize=1).get(timeout=90)
    except multiprocessing.TimeoutError:
        pytest.fail("a forked pool worker hung in its first multi-threaded call")
    finally:
        pool.terminate()
        pool.join()
    assert len({pid for pid, _ in results}) >= 2
    assert all(team == 2 for _, team in results)  # the children use threads again
    _check_in_child(1)  # and so does the parent


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_raw_fork_children_and_grandchildren_while_another_thread_computes():
    """os.fork() from the main thread while another Python thread runs multi-threaded
    calls; each child computes, forks a grandchild that computes, and checks both."""
    _check_in_child(2)
    stop = threading.Event()

    def busy():
        q, k, v = _case(3)
        while not stop.is_set():
            sdpa(q, k, v, num_threads=2)

    worker = threading.Thread(target=busy)
    worker.start()
    pids = []
    try:
        for seed in range(4):
            time.sleep(0.02)
            pid = os.fork()
            if pid == 0:  # the child: never returns into pytest
                status = 1
                try:
                    _check_in_child(seed)
                    grandchild = os.fork()
                    if grandchild == 0:
                        try:
                            _check_in_child(seed + 10)
                            os._exit(0)
                        except BaseException:
                            os._exit(1)
                    status = 0 if _wait_for_children([grandchild], 60) == [0] else 3
                finally:
                    os._exit(status)
            pids.append(pid)
    finally:
        stop.set()
        worker.join()
    assert _wait_for_children(pids, 90) == [0] * len(pids)


FALLBACK_CHILD = """
import os, threading, warnings, numpy as np, cattn
from cattn import _runtime
_runtime._pause_resource_all = None          # as with an OpenMP runtime that cannot
q = np.random.default_rng(0).standard_normal((4, 256, 32)).astype(np.float32)
want = cattn.scaled_dot_product_attention(q, q, q, num_threads=1)
cattn.scaled_dot_product_attention(q, q, q, num_threads=2)
pid = os.fork()
if pid == 0:
    import signal; signal.alarm(30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = cattn.scaled_dot_product_attention(q, q, q, num_threads=2)
        b = cattn.scaled_dot_product_attention(q, q, q, num_threads=2)
    assert np.array_equal(a, want) and np.array_equal(b, want)
    assert len(caught) == 1 and "forked child" in str(caught[0].message), caught
    assert _runtime.thread_report() == {}
    other = []
    t = threading.Thread(target=lambda: other.append(
        (cattn.scaled_dot_product_attention(q, q, q, num_threads=2),
         _runtime.thread_report().get(threading.get_ident()))))
    t.start(); t.join()
    assert np.array_equal(other[0][0], want) and other[0][1] == 2
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_child_runs_serially_and_says_so_when_the_pool_cannot_be_released():
    status, out, err = run_child(FALLBACK_CHILD, timeout=90)
    assert status == 0 and out.split() == ["child", "0"], err[-3000:]


# ---------------------------------------------------------------- the thread budget

MANY_THREADS = """
import threading, numpy as np, cattn
from cattn import _runtime
def os_threads():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("Threads:")).split()[1])
rng = np.random.default_rng(0)
q = rng.standard_normal((8, 512, 32)).astype(np.float32)
want = cattn.scaled_dot_product_attention(q, q, q, num_threads=1)
baseline = os_threads()
barrier = threading.Barrier(17)
results = []
def worker():
    for _ in range(3):
        results.append(np.array_equal(
            cattn.scaled_dot_product_attention(q, q, q, num_threads=64), want))
    barrier.wait()   # all 16 alive, each done with its calls
    barrier.wait()
threads = [threading.Thread(target=worker) for _ in range(16)]
for t in threads: t.start()
barrier.wait()
alive = os_threads()
teams = _runtime.thread_report()
barrier.wait()
for t in threads: t.join()
print(baseline, alive, len(results), all(results), sum(n - 1 for n in teams.values()),
      _runtime.WORKER_BUDGET, len(_runtime.thread_report()))
"""


def test_sixteen_python_threads_asking_for_64_threads_stay_within_the_budget():
    status, out, err = run_child(MANY_THREADS)
    assert status == 0, err[-3000:]
    baseline, alive, calls, equal, workers, budget, left = map(eval, out.split())
    print(f"OS threads: {baseline} before, {alive} with 16 Python threads x "
          f"num_threads=64 alive (budget {budget} workers)")
    assert calls == 48 and equal
    assert 0 < workers <= budget
    assert alive <= baseline + 16 + budget
    assert left == 0  # ended threads give their share back


# A child under RLIMIT_NPROC counts only its own threads: the limit counts every task of
# the user, so the child first becomes a user no other process runs as (root: a uid of its
# own; others: a new user namespace, where the count starts from the child's tasks). It
# then lets exactly `room` more threads start, whatever runs beside it on the machine.
LIMITED_CHILD = """
import ctypes, os, resource, sys, threading, time
ROOT = os.geteuid() == 0   # root ignores RLIMIT_NPROC: it becomes a uid of its own
if not ROOT:   # a new user namespace, while the process is still single-threaded
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:   # CLONE_NEWUSER
        print("no user of our own"); sys.exit(0)
import numpy as np, numpy.random, warnings, cattn
from cattn import _runtime
# Everything the child uses is loaded now, one thread, no pool: the new uid below may not
# read every file (lazily imported modules, numpy.random, cattn's lazily loaded front).
cattn.scaled_dot_product_attention(*(np.ones((1, 2, 4), np.float32),) * 3, num_threads=1)
if ROOT:   # (after the imports: the new uid may not read every file)
    used = set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                used.add(int(next(l for l in f if l.startswith("Uid:")).split()[1]))
        except (OSError, StopIteration, ValueError):
            pass
    uid = next(u for u in range(1_000_000 + os.getpid(), 2_000_000_000) if u not in used)
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
def startable(cap=64):
    release, started, ids = threading.Event(), [], []
    def wait():
        ids.append(threading.get_native_id()); release.wait()
    try:
        for _ in range(cap):
            t = threading.Thread(target=wait); t.start(); started.append(t)
    except RuntimeError:
        pass
    release.set()
    for t in started: t.join()
    for tid in ids:   # until the kernel has reaped them (they count until then)
        while os.path.exists(f"/proc/self/task/{tid}"):
            time.sleep(0.001)
    return len(started)
def limit_threads(room):
    with open("/proc/self/status") as f:
        mine = int(next(l for l in f if l.startswith("Threads:")).split()[1])
    limit = mine + room
    for _ in range(5):   # a task the kernel still counts (one just ending) tightens it
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
        got = startable()
        if got == room:
            return
        limit -= got - room
    raise AssertionError(f"could not leave room for {room} threads (got {got})")
"""

NPROC_CHILD = LIMITED_CHILD + """
q = np.random.default_rng(0).standard_normal((8, 256, 32)).astype(np.float32)
want = cattn.scaled_dot_product_attention(q, q, q, num_threads=1)
limit_threads(1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = cattn.scaled_dot_product_attention(q, q, q, num_threads=4)
assert np.array_equal(got, want)
assert any("refused" in str(w.message) for w in caught), [str(w.message) for w in caught]
print("alive", _runtime.thread_report())
"""


def _run_limited(code):
    status, out, err = run_child(code)
    if out.startswith("no user of our own"):
        pytest.skip("cannot run a child under a user of its own (not root, no user namespaces)")
    return status, out, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and limits")
def test_a_process_thread_limit_degrades_the_call_instead_of_ending_the_process():
    """RLIMIT_NPROC (ulimit -u; cgroup pids.max acts alike) leaves room for one thread:
    libgomp would print 'Thread creation failed' and exit(1)."""
    status, out, err = _run_limited(NPROC_CHILD)
    assert status == 0 and out.startswith("alive"), f"status {status}\n{err[-3000:]}"


RACING_CHILD = LIMITED_CHILD + """
CALLERS, ROUNDS = 4, 12
rng = np.random.default_rng(0)
q = rng.standard_normal((8, 256, 32)).astype(np.float32)
want = cattn.scaled_dot_product_attention(q, q, q, num_threads=1)
limited, start, results = threading.Event(), threading.Barrier(CALLERS), []
def caller(i):
    limited.wait()
    for r in range(ROUNDS):
        start.wait()   # every caller's pool grows (or shrinks) at the same moment
        n = (8, 2, 5, 3)[(i + r) % 4]
        results.append(np.array_equal(
            cattn.scaled_dot_product_attention(q, q, q, num_threads=n), want))
callers = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
warnings.simplefilter("ignore", RuntimeWarning)   # "the system refused": expected here
for t in callers: t.start()   # (they count against the limit while they wait)
limit_threads(ROOM)
limited.set()
for t in callers: t.join()
print("done", len(results), all(results))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and limits")
@pytest.mark.skipif(not cattn.openmp_enabled(), reason="a serial build starts no threads")
@pytest.mark.parametrize("room", [1, 3, 6])
def test_concurrent_calls_under_a_thread_limit_never_end_the_process(room):
    """Four Python threads whose calls grow their OpenMP pools at once, under a limit that
    leaves room for fewer threads than they ask for: each call either gets its threads or
    runs on fewer, never does libgomp exit the process ('Thread creation failed'), which
    it did when one caller's probe of the room and its pool's growth let another
    caller's probe in between. Repeated in three children per room."""
    for _ in range(3):
        status, out, err = _run_limited(RACING_CHILD.replace("ROOM", str(room)))
        assert status == 0 and out.split() == ["done", "48", "True"], \
            f"status {status}\n{out}\n{err[-3000:]}"


# --------------------------------------------------------- the default thread count

def test_set_num_threads_and_the_threads_context():
    before = cattn.get_num_threads()
    seen = {}
    try:
        cattn.set_num_threads(1)
        assert cattn.get_num_threads() == 1
        with cattn.threads(3):
            assert cattn.get_num_threads() == 3
            with cattn.threads(2):
                assert cattn.get_num_threads() == 2
            assert cattn.get_num_threads() == 3
            # thread-local: another Python thread sees the process default
            t = threading.Thread(target=lambda: seen.update(other=cattn.get_num_threads()))
            t.start()
            t.join()
        assert cattn.get_num_threads() == 1
    finally:
        cattn.set_num_threads(None)
    assert seen["other"] == 1
    assert cattn.get_num_threads() == before
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError),
                       ("2", TypeError)):
        with pytest.raises(error, match="must be"):
            cattn.set_num_threads(bad)
        with pytest.raises(error, match="must be"):
            with cattn.threads(bad):
                pass


def test_the_default_count_is_what_calls_use():
    """A fresh Python thread's calls start an OpenMP pool only when the default allows."""
    q, k, v = _case(4)
    teams = []

    def call():
        got = sdpa(q, k, v)
        teams.append(_runtime.thread_report().get(threading.get_ident(), 1))
        return got

    def in_thread(fn):
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    def call_with_two():
        with cattn.threads(2):
            call()

    want = sdpa(q, k, v, num_threads=1)
    try:
        cattn.set_num_threads(1)
        in_thread(call)
        in_thread(call_with_two)
    finally:
        cattn.set_num_threads(None)
    assert teams == [1, 2]
    np.testing.assert_array_equal(sdpa(q, k, v), want)


@pytest.mark.skipif(not cattn.openmp_enabled(), reason="a serial build starts no threads")
def test_one_call_asking_for_many_threads_gets_at_most_twice_the_cores():
    """Bug caught: the cap on one call's team (2 x cores) dropped: a call asking for
    4 x cores threads, with as many tasks, took every worker the process budget had left
    (at least 2 x cores + 2). Observed in a fresh Python thread; its result must equal
    the one-thread call's, bit for bit."""
    cores = _runtime._CORES
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4 * cores, 16, 8)).astype(np.float32)
               for _ in range(3))
    want = sdpa(q, k, v, num_threads=1)
    seen = {}

    def call():
        seen["out"] = sdpa(q, k, v, num_threads=4 * cores)
        seen["team"] = _kernel.last_call_stats()["team_size"]

    t = threading.Thread(target=call)
    t.start()
    t.join()
    assert 1 <= seen["team"] <= 2 * cores
    np.testing.assert_array_equal(seen["out"], want)


# ------------------------------------------------------------------- overlapping out

def _offsets(shape, strides):
    """Every element's offset (in elements) of a view with these element strides."""
    grids = np.meshgrid(*[np.arange(n) * st for n, st in zip(shape, strides)], indexing="ij")
    return sum(grids).ravel() if grids else np.zeros(1, int)


def _strided_view(buffer, shape, strides):
    """A view of `buffer` with element strides (negative allowed), kept in bounds."""
    offsets = _offsets(shape, strides)
    start = -int(offsets.min())
    item = buffer.itemsize
    base = buffer[start:]
    return as_strided(base, shape=shape, strides=[st * item for st in strides]), start


def test_out_with_overlapping_elements_is_rejected_for_every_stride_pattern():
    """Random shapes and strides (negative, zero, interleaved): out is rejected exactly when
    two of its elements share memory (brute force over every offset), else it is filled
    with the reference result."""
    rng = np.random.default_rng(5)
    rejected = accepted = 0
    for _ in range(400):
        shape = tuple(int(n) for n in rng.integers(1, 4, 3))
        strides = tuple(int(s) for s in rng.integers(-7, 8, 3))
        B, L, Ev = shape
        q = rng.standard_normal((B, L, 4)).astype(np.float32)
        k = rng.standard_normal((B, 5, 4)).astype(np.float32)
        v = rng.standard_normal((B, 5, Ev)).astype(np.float32)
        buffer = np.zeros(200, np.float32)
        out, _ = _strided_view(buffer, shape, strides)
        overlapping = len(set(_offsets(shape, strides).tolist())) < out.size
        if overlapping:
            with pytest.raises(ValueError, match="out has overlapping elements"):
                sdpa(q, k, v, out=out)
            rejected += 1
        else:
            assert sdpa(q, k, v, out=out) is out
            np.testing.assert_allclose(out, reference64(q, k, v), **tolerance(np.float32))
            accepted += 1
    assert rejected > 50 and accepted > 50


def test_out_sharing_memory_with_an_input_is_rejected_for_every_stride_pattern():
    """out and the query in one buffer, each with random strides: rejected exactly when an
    element of out is an element (or part of one) of the query."""
    rng = np.random.default_rng(6)
    rejected = accepted = 0
    for _ in range(300):
        buffer = np.zeros(400, np.float32)
        q_strides = tuple(int(s) for s in rng.choice([-12, -4, 1, 4, 12, 20], 3))
        o_strides = tuple(int(s) for s in rng.choice([-12, -4, 1, 4, 12, 20], 3))
        q_view, q_start = _strided_view(buffer, (2, 3, 4), q_strides)
        shift = int(rng.integers(-120, 120))
        o_shape = (2, 3, 4)
        o_offsets = _offsets(o_shape, o_strides)
        o_start = int(np.clip(q_start + shift, -o_offsets.min(), 399 - o_offsets.max()))
        out = as_strided(buffer[o_start:], shape=o_shape,
                         strides=[st * 4 for st in o_strides])
        if len(set(o_offsets.tolist())) < out.size:
            continue  # internal overlap: covered above
        q_cells = set((q_start + _offsets((2, 3, 4), q_strides)).tolist())
        o_cells = set((o_start + o_offsets).tolist())
        q_view[...] = rng.standard_normal(q_view.shape)
        k = rng.standard_normal((2, 5, 4)).astype(np.float32)
        if q_cells & o_cells:
            with pytest.raises(ValueError, match="out overlaps query"):
                sdpa(q_view, k, k, out=out)
            rejected += 1
        else:
            want = reference64(q_view.copy(), k, k)
            sdpa(q_view, k, k, out=out)
            np.testing.assert_allclose(out, want, **tolerance(np.float32))
            accepted += 1
    assert rejected > 10 and accepted > 10


# ----------------------------------------------------------------------------- softcap

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softcap_whose_reciprocal_overflows_is_rejected_and_the_smallest_allowed_is_exact(
        dtype):
    tiny = float(np.finfo(dtype).smallest_subnormal) * 8
    q = np.zeros((1, 3, 4), dtype)
    with pytest.raises(ValueError, match="softcap must be at least"):
        sdpa(q, q, q, softcap=tiny)
    smallest = float(np.nextafter(dtype(1) / np.finfo(dtype).max, dtype(1)))
    with np.errstate(over="raise"):
        while True:  # the smallest softcap whose reciprocal is finite in the dtype
            try:
                dtype(1) / dtype(smallest)
                break
            except FloatingPointError:
                smallest = float(np.nextafter(dtype(smallest), dtype(1)))
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 6, 4)).astype(dtype)
    q[0, 0] = 0  # zero scores: tanh(0 / softcap) must be 0, never NaN
    with np.errstate(over="ignore"):  # the reference's scores/softcap reach inf: tanh = 1
        out = assert_matches_reference(q, q, q, softcap=smallest)
    assert np.isfinite(out).all()


# ----------------------------------------------------------------- validation gaps

def test_window_without_an_order_is_refused():
    q = np.zeros((1, 3, 4), np.float32)
    for window in ({1, 2}, frozenset({1, 2}), {1: 2}, {"left": 1, "right": 0}, "ab"):
        with pytest.raises(TypeError, match=r"window must be a pair \(left, right\)"):
            sdpa(q, q, q, window=window)
    for window in ((1, 0), [1, 0], np.array([1, 0])):
        np.testing.assert_array_equal(sdpa(q, q, q, window=window),
                                      sdpa(q, q, q, window=(1, 0)))


def test_window_is_a_tuple_list_or_array_of_two_and_nothing_else():
    """A generator (or any iterable of two) was unpacked as a window, and consumed."""
    q = np.zeros((1, 3, 4), np.float32)
    for window in ((i for i in (1, 0)), iter([1, 0]), range(1, 3), (1, 0, 0), [1],
                   np.array([[1, 0]]), np.array(1)):
        with pytest.raises(TypeError, match=r"window must be a pair \(left, right\)"):
            sdpa(q, q, q, window=window)


@pytest.mark.parametrize("bad", [False, True, np.bool_(False), 0j, np.complex64(0),
                                 np.complex128(0.1), 0.1, float("nan"), "0", None])
def test_dropout_p_is_a_real_zero(bad):
    """A bool or a complex zero compared equal to 0 and was accepted as dropout_p."""
    q = np.zeros((1, 3, 4), np.float32)
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        sdpa(q, q, q, dropout_p=bad)
    for zero in (0, 0.0, -0.0, np.float32(0), np.int64(0)):
        np.testing.assert_array_equal(sdpa(q, q, q, dropout_p=zero), sdpa(q, q, q))


def _chunks(seed=9):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 5, 8))
    k = rng.standard_normal((2, 9, 8))
    return [sdpa(q, k[:, s], k[:, s], return_lse=True) for s in (slice(0, 4), slice(4, 9))]


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_merge_attention_refuses_an_lse_of_plus_inf_or_nan_without_a_numpy_warning(bad):
    """+inf (a chunk whose scores overflowed) made merge_attention emit NumPy's 'invalid
    value' RuntimeWarning and return NaN; -inf stays 'this row sees no key here'."""
    (o1, l1), (o2, l2) = _chunks()
    l2 = l2.copy()
    l2[1, 3] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"lses must be finite or -inf"):
            cattn.merge_attention([o1, o2], [l1, l2])
        l2[1, 3] = -np.inf   # the row sees no key in the second chunk: the first one's result
        out, lse = cattn.merge_attention([o1, o2], [l1, l2])
    np.testing.assert_array_equal(out[1, 3], o1[1, 3])
    np.testing.assert_array_equal(lse[1, 3], l1[1, 3])


def test_merge_attention_of_non_finite_outputs_emits_no_numpy_warning():
    """NaN or inf in an output propagate into the merged rows that use it, silently as in
    any cattn call, and leave the other rows exact."""
    (o1, l1), (o2, l2) = _chunks()
    o2 = o2.copy()
    o2[0, 2, 1], o2[1, 4, 0] = np.nan, np.inf
    l2 = l2.copy()
    l2[1, 4] = -np.inf   # inf times a weight of 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = cattn.merge_attention([o1, o2], [l1, l2])
    assert np.isnan(out[0, 2, 1])
    clean = np.ones(out.shape, bool)
    clean[0, 2, 1] = clean[1, 4, 0] = False
    want, _ = cattn.merge_attention([o1, np.nan_to_num(o2, posinf=0)], [l1, l2])
    np.testing.assert_array_equal(out[clean], want[clean])


def test_masked_key_lengths_are_refused():
    q = np.zeros((2, 3, 4), np.float32)
    lengths = np.ma.masked_array([2, 3], mask=[False, True])
    with pytest.raises(TypeError, match="key_lengths must be a plain numpy.ndarray"):
        sdpa(q, q, q, key_lengths=lengths)


def test_kvcache_reset_takes_one_sequence_or_all():
    cache = cattn.KVCache(3, 8, 2, 4)
    cache.lengths[...] = 5
    for bad in (True, False, np.bool_(True), 1.0, "0", [0, 1], slice(None)):
        with pytest.raises(TypeError, match="batch_index must be an int"):
            cache.reset(batch_index=bad)
    for bad in (3, -4):
        with pytest.raises(ValueError, match=r"batch_index must lie in \[-3, 3\)"):
            cache.reset(batch_index=bad)
    assert (cache.lengths == 5).all()
    cache.reset(batch_index=np.int64(1))
    cache.reset(batch_index=-1)
    assert cache.lengths.tolist() == [[5, 0, 0]]
    cache.reset()
    assert (cache.lengths == 0).all()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
def test_layer_refuses_matrix_and_masked_queries_clearly():
    mha = cattn.MultiHeadAttention(8, 2, rng=0)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    for bad in (np.asmatrix(x), np.ma.masked_array(x)):
        with pytest.raises(TypeError, match="query must be a plain numpy.ndarray"):
            mha(bad)
    out, _ = mha(x)
    assert out.shape == (3, 8)


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_torch_state_dict_is_converted(torch_dtype):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(16, 4, batch_first=True).to(getattr(torch, torch_dtype))
    state = module.state_dict()
    mha = cattn.MultiHeadAttention(16, 4)
    mha.load_state_dict(state)
    got = mha.state_dict()
    for name, tensor in state.items():
        np.testing.assert_array_equal(got[name], tensor.float().numpy())


def test_meta_device_state_dict_is_refused_clearly():
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        module = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    mha = cattn.MultiHeadAttention(16, 4, rng=0)
    before = mha.state_dict()
    with pytest.raises(ValueError, match="meta device"):
        mha.load_state_dict(module.state_dict())
    for name, value in mha.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


# ------------------------------------------------------- BLAS settings of other users

BLAS_CHILD = """
import threading, time, numpy as np, threadpoolctl, cattn
from cattn import _kernel
from cattn._blas_threads import _find_openblas, single_threaded_blas
assert _kernel.calls_blas(_kernel.isa_index("blas"))
get, set_ = _find_openblas()                 # scipy's OpenBLAS: the one cattn calls
def numpy_blas_threads():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas" and "numpy" in i["filepath"]]
def call(x):
    return cattn.scaled_dot_product_attention(x, x, x, num_threads=2, _isa="blas")
rng = np.random.default_rng(0)
q = rng.standard_normal((2, 4, 300, 64)).astype(np.float32)
set_(2)
numpy_before = numpy_blas_threads()
want = call(q)

# 1. whatever count the user set before a call: bitwise identical, the count restored
for n in (1, 3, 2, 4, 8):
    set_(n)
    assert np.array_equal(call(q), want), n
    assert get() == n, (n, get())

# 2. a count set while another call runs: the next call starts at 1 again (identical), and
#    the user's latest count is the one restored
set_(2)
with single_threaded_blas:                   # another call, running
    set_(3)
    assert np.array_equal(call(q), want)
    assert get() == 1
assert get() == 3, get()

# 3. another thread keeps changing BLAS limits with threadpoolctl during calls: within the
#    float32 computation's accuracy (bitwise only where OpenBLAS's kernels do not depend
#    on its thread count)
stop = threading.Event()
def other_user():
    while not stop.is_set():
        for n in (1, 3, 2):
            with threadpoolctl.threadpool_limits(n, user_api="blas"):
                time.sleep(0.001)
user = threading.Thread(target=other_user); user.start()
reference = cattn.reference.scaled_dot_product_attention(*[q.astype(np.float64)] * 3)
calls = identical = accurate = 0
while calls < 5:
    got = call(q)
    calls += 1
    identical += np.array_equal(got, want)
    accurate += np.allclose(got, reference, rtol=2e-5, atol=2e-5)   # conftest.TOLERANCE
stop.set(); user.join()

# 4. a count the user sets while a call runs is kept, and NumPy's BLAS is never touched
set_(2)
big = rng.standard_normal((1, 4, 1024, 64)).astype(np.float32)
seen_numpy = []
running = threading.Thread(target=call, args=(big,))
running.start()
while get() != 1 and running.is_alive():
    pass
seen_numpy.append(numpy_blas_threads())
set_(3)
running.join()
print(calls, identical, accurate, get(), seen_numpy[0] == numpy_before,
      numpy_blas_threads() == numpy_before)
"""


PORTABLE_CHILD = """
import threading, numpy as np, cattn
from cattn import _kernel
from cattn._blas_threads import _find_openblas
assert not _kernel.calls_blas()
get, set_ = _find_openblas()
set_(3)
big = np.random.default_rng(0).standard_normal((1, 4, 1024, 64)).astype(np.float32)
call = threading.Thread(target=cattn.scaled_dot_product_attention, args=(big, big, big),
                        kwargs=dict(num_threads=2))
seen = set()
call.start()
while call.is_alive():
    seen.add(get())
call.join()
seen.add(get())
print(sorted(seen))
"""


def test_portable_path_never_touches_blas_settings():
    """CPUs without AVX2 (CATTN_ISA=portable) run micro-kernels on generic vectors: scipy's
    OpenBLAS keeps the count its user set, before, during and after a call."""
    status, out, err = run_child(PORTABLE_CHILD, env=dict(os.environ, CATTN_ISA="portable"))
    assert status == 0, err[-3000:]
    assert out.strip() == "[3]"


@pytest.mark.parametrize("coretype", ["", "Haswell"], ids=["detected", "haswell_kernels"])
def test_blas_path_keeps_other_users_blas_settings(coretype):
    """The BLAS path (compilers without generic vectors; `_isa="blas"` here) limits scipy's
    OpenBLAS to one thread while it runs: its results do not depend on the count the user
    set (bitwise), a count set while a call runs is kept, NumPy's own BLAS is never
    touched. A count another thread changes during a call takes effect in that call:
    OpenBLAS's Haswell and Zen kernels then give other last bits (the README says so),
    which failed the former promise of bitwise results on AMD Zen CPUs; the Haswell
    kernels, forced here, run on every x86 CPU with AVX2."""
    pytest.importorskip("threadpoolctl")
    if coretype and "avx2" not in _kernel.supported_isa_paths():
        pytest.skip("OpenBLAS's Haswell kernels need AVX2")
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype) if coretype else None
    status, out, err = run_child(BLAS_CHILD, env=env)
    assert status == 0, err[-3000:]
    calls, identical, accurate, after, numpy_during, numpy_after = out.split()
    print(f"{calls} BLAS-path calls under a concurrent threadpoolctl user, {identical} "
          f"bitwise identical, {accurate} within the reference's float32 tolerance")
    assert accurate == calls
    assert after == "3"
    assert numpy_during == numpy_after == "True"


# ---------------------------------------------------------- idle OpenMP workers sleep

IDLE_CHILD = """
import os, time, numpy as np, cattn
q = np.random.default_rng(0).standard_normal((4, 8, 128, 64)).astype(np.float32)
cattn.scaled_dot_product_attention(q, q, q, num_threads=2)
burnt = []
for _ in range(10):
    cattn.scaled_dot_product_attention(q, q, q, num_threads=2)
    start = time.process_time()
    time.sleep(0.03)   # the workers are idle: what they burn now is spinning
    burnt.append(time.process_time() - start)
print(sorted(burnt)[5] * 1e3, "OMP_WAIT_POLICY" in os.environ,
      repr(cattn.show_config()["openmp_wait_policy"]))
"""


@pytest.mark.skipif(not cattn.openmp_enabled(), reason="a serial build has no workers")
def test_idle_workers_sleep_after_a_call_without_touching_the_environment():
    """Busy-waiting workers would burn a few ms of CPU after every call (stolen from NumPy's
    BLAS threads in a layer loop); the environment the user sees is unchanged."""
    env = {k: v for k, v in os.environ.items() if k not in _runtime._WAIT_VARIABLES}
    status, out, err = run_child(IDLE_CHILD, env=env)
    assert status == 0, err[-3000:]
    burnt_ms, in_environment, policy = out.split(maxsplit=2)
    assert float(burnt_ms) < 1.0
    assert in_environment == "False" and "passive" in policy
    # the user's choice wins, and show_config says whose it is
    status, out, err = run_child(IDLE_CHILD, env=dict(env, OMP_WAIT_POLICY="active"))
    assert status == 0 and "OMP_WAIT_POLICY=active" in out, err[-3000:]

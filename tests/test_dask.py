"""cattn.dask: attention on Dask arrays, on the local threaded scheduler and on a real
distributed cluster of two worker processes, each result checked against the float64
reference (and head-sharded results against the single call, bitwise)."""
import os
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import cattn  # noqa: E402
import cattn.dask as cdask  # noqa: E402
from cattn import reference  # noqa: E402
from conftest import reference64, tolerance  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def compute(*arrays, scheduler="threads"):
    return dask.compute(*arrays, scheduler=scheduler)


def part_tasks(array, kind="part"):
    """How many (query chunk, key chunk) attention tasks (or merge tasks) the graph holds."""
    return sum(1 for key in dict(array.__dask_graph__())
               if isinstance(key, tuple) and key[0].startswith(f"cattn-{kind}-"))


def assert_matches(got, want, dtype):
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, **tolerance(dtype))


CASES = {  # name: (options, query chunks, key chunks); B, H, L, S = 2, 4, 300, 700
    "plain": ({}, (1, 2, 100, -1), (1, 2, 128, -1)),
    "causal": ({"is_causal": True}, (2, 4, 64, -1), (2, 4, 100, -1)),
    "window": ({"window": (40, 10)}, (1, 4, 75, -1), (1, 4, 175, -1)),
    "bottom-right-lengths": ({"is_causal": True, "alignment": "bottom_right",
                              "key_lengths": np.array([700, 333])},
                             (1, 1, 128, -1), (1, 1, 256, -1)),
    "offsets-softcap": ({"is_causal": True, "q_offset": np.array([400, 0]), "k_offset": 0,
                         "softcap": 3.0, "scale": 0.3}, (1, 2, -1, -1), (1, 4, 90, -1)),
    "gqa": ({"enable_gqa": True, "is_causal": True}, (1, 2, 150, -1), (1, 1, 256, -1)),
    "bool-mask": ({"attn_mask": "bool"}, (2, 2, 100, -1), (2, 2, 300, -1)),
    "float-mask-dask": ({"attn_mask": "float"}, (1, 4, 150, -1), (1, 4, 350, -1)),
}


def case_inputs(rng, name, dtype):
    options, q_chunks, k_chunks = CASES[name]
    options = dict(options)
    Hkv = 2 if options.get("enable_gqa") else 4
    q = randn(rng, (2, 4, 300, 16), dtype)
    k, v = randn(rng, (2, Hkv, 700, 16), dtype), randn(rng, (2, Hkv, 700, 8), dtype)
    if options.get("attn_mask") == "bool":
        mask = rng.random((2, 1, 300, 700)) < 0.7
        mask[0, 0, 5] = False  # a row that sees nothing
        options["attn_mask"] = mask
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = randn(rng, (300, 700), dtype)
    dq = da.from_array(q, chunks=q_chunks)
    dk = da.from_array(k, chunks=k_chunks)
    dv = da.from_array(v, chunks=k_chunks[:-1] + (-1,))
    return (q, k, v), (dq, dk, dv), options


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CASES)
def test_threaded_scheduler_matches_reference(rng, name, dtype):
    (q, k, v), (dq, dk, dv), options = case_inputs(rng, name, dtype)
    want = reference64(q, k, v, return_lse=True, **options)
    if name == "float-mask-dask":
        options["attn_mask"] = da.from_array(options["attn_mask"], chunks=(60, 233))
    out, lse = cdask.scaled_dot_product_attention(dq, dk, dv, return_lse=True, **options)
    assert_matches(compute(out, lse), want, dtype)


@pytest.mark.parametrize("split_every, merges", [(2, 13), (3, 8), (32, 1)])
def test_merge_trees_of_any_depth(rng, split_every, merges):
    # 14 key chunks: a tree of 4 levels (2 at a time), 3 levels (3), or a single merge.
    q = randn(rng, (2, 40, 8), np.float32)
    k, v = randn(rng, (2, 700, 8), np.float32), randn(rng, (2, 700, 8), np.float32)
    out, lse = cdask.scaled_dot_product_attention(
        da.from_array(q, chunks=(1, 40, 8)), da.from_array(k, chunks=(1, 50, 8)),
        da.from_array(v, chunks=(1, 50, 8)), return_lse=True, split_every=split_every)
    assert part_tasks(out) == 2 * 14 and part_tasks(out, "merge") == 2 * merges
    assert_matches(compute(out, lse), reference64(q, k, v, return_lse=True), np.float32)


def test_fully_masked_chunk_pairs_add_no_task(rng):
    # Causal over 4 query chunks x 4 key chunks of 64: only the 10 pairs on or below the
    # diagonal are computed; a window of 10 keys leaves the 4 diagonal pairs and the 3 just
    # below it.
    q = da.from_array(randn(rng, (1, 256, 8), np.float64), chunks=(1, 64, 8))
    causal = cdask.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert part_tasks(causal) == 10
    windowed = cdask.scaled_dot_product_attention(q, q, q, is_causal=True, window=(10, 0))
    assert part_tasks(windowed) == 7
    # Keys past every length are never read; a chunk of queries that sees nothing at all
    # still gets its zeros and -inf.
    lengths = cdask.scaled_dot_product_attention(q, q, q, key_lengths=100, return_lse=True)
    assert part_tasks(lengths[0]) == 4 * 2
    none = cdask.scaled_dot_product_attention(q, q, q, key_lengths=0, return_lse=True)
    assert part_tasks(none[0]) == 0
    out, lse = compute(*none)
    assert not out.any() and np.all(lse == -np.inf)
    assert_matches(compute(*lengths), reference64(q.compute(), q.compute(), q.compute(),
                                                  key_lengths=100, return_lse=True),
                   np.float64)


@pytest.mark.parametrize("window", [(None, 3), (10, 5)])
def test_causal_window_with_a_right_side_computes_only_visible_pairs(rng, window):
    """Bug caught: under is_causal the plan keeping the window's right side (instead of
    min(right, 0)) when it picks the chunk pairs to compute: every pair just above the
    diagonal becomes a task that sees nothing (the kernel masks it, so only the task count
    shows it). The tasks must be exactly the pairs where the reference sees some key."""
    chunk, n_chunks = 64, 4
    q = randn(rng, (1, chunk * n_chunks, 8), np.float64)
    chunked = da.from_array(q, chunks=(1, chunk, 8))
    out = cdask.scaled_dot_product_attention(chunked, chunked, chunked, is_causal=True,
                                             window=window)
    seen = reference.visible_keys(q.shape[1], q.shape[1], is_causal=True, window=window)
    pairs = seen.reshape(n_chunks, chunk, n_chunks, chunk).any(axis=(1, 3))
    assert part_tasks(out) == np.count_nonzero(pairs)
    assert_matches(compute(out), [reference64(q, q, q, is_causal=True, window=window)],
                   np.float64)


@pytest.mark.parametrize("q_offset, k_offset", [(20, 7), (np.array([9, 30]), 4)])
def test_key_offsets_reach_every_key_chunk(rng, q_offset, k_offset):
    """Bug caught: each key chunk's task placed at its start within the key array only,
    without the call's k_offset (keys cut from a longer sequence): the causal diagonal
    and the window then meet the wrong keys in every chunk."""
    q = randn(rng, (2, 3, 40, 8), np.float64)
    k, v = randn(rng, (2, 3, 50, 8), np.float64), randn(rng, (2, 3, 50, 8), np.float64)
    options = dict(is_causal=True, window=(15, 0), q_offset=q_offset, k_offset=k_offset)
    out, lse = cdask.scaled_dot_product_attention(
        da.from_array(q, chunks=(1, 3, 16, 8)), da.from_array(k, chunks=(1, 3, 16, 8)),
        da.from_array(v, chunks=(1, 3, 16, 8)), return_lse=True, **options)
    assert_matches(compute(out, lse), reference64(q, k, v, return_lse=True, **options),
                   np.float64)


@pytest.mark.parametrize("L", [1, 200])
def test_head_and_batch_chunks_equal_the_single_call_bitwise(rng, L):
    # Keys whole, heads and batch in chunks: each task is one cattn call over some heads;
    # L = 1 takes cattn's key-split path inside each task.
    q = randn(rng, (2, 6, L, 32), np.float32)
    k, v = randn(rng, (2, 6, 4200, 32), np.float32), randn(rng, (2, 6, 4200, 16), np.float32)
    want, want_lse = cattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                        alignment="bottom_right",
                                                        return_lse=True)
    chunks = (1, (1, 2, 3), L, 32)
    out, lse = cdask.scaled_dot_product_attention(
        da.from_array(q, chunks=chunks), da.from_array(k, chunks=chunks[:2] + (4200, 32)),
        da.from_array(v, chunks=chunks[:2] + (4200, 16)), is_causal=True,
        alignment="bottom_right", return_lse=True)
    got, got_lse = compute(out, lse)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_lse, want_lse)


def test_numpy_query_against_dask_keys_and_broadcast_batch(rng):
    # One query matrix shared by the batch (NumPy), keys in key chunks (Dask).
    q = randn(rng, (5, 16), np.float64)
    k, v = randn(rng, (3, 1000, 16), np.float64), randn(rng, (3, 1000, 4), np.float64)
    out = cdask.scaled_dot_product_attention(q, da.from_array(k, chunks=(2, 300, 16)),
                                             da.from_array(v, chunks=(3, 500, 4)))
    assert out.shape == (3, 5, 4)
    np.testing.assert_allclose(out.compute(scheduler="threads"), reference64(q, k, v),
                               **tolerance(np.float64))


def test_a_task_runs_one_thread_under_the_threaded_scheduler():
    threads = dask.delayed(cdask._task_threads)().compute(scheduler="threads",
                                                          num_workers=os.cpu_count())
    assert threads == max(1, cattn.get_num_threads() // os.cpu_count())


@pytest.mark.parametrize("nthreads, executing, expected", [(4, 1, 4), (4, 2, 2), (4, 3, 1),
                                                        (1, 1, 1)])
def test_a_task_takes_its_share_of_a_distributed_worker(monkeypatch, nthreads, executing,
                                                        expected):
    class Worker:
        class state:
            pass
    Worker.state.nthreads, Worker.state.executing_count = nthreads, executing
    monkeypatch.setattr(distributed, "get_worker", lambda: Worker)
    assert cdask._task_threads() == expected


BAD_CALLS = [
    (dict(key_lengths=da.from_array(np.array([3]))), TypeError, "compute"),
    (dict(attn_mask=np.ones((4, 9), dtype=bool)), ValueError, "does not broadcast"),
    (dict(attn_mask=[[True]]), TypeError, "Dask or NumPy array"),
    (dict(q_offset=1.5), TypeError, "q_offset must be integers"),
    (dict(key_lengths=np.array([1, 2])), ValueError, "key_lengths of shape"),
    (dict(q_offset=1, alignment="bottom_right"), ValueError, "top_left"),
    (dict(window=(-1, 0)), ValueError, "window left must be >= 0"),
    (dict(split_every=1), ValueError, "split_every must be >= 2"),
    (dict(enable_gqa=True), ValueError, "enable_gqa"),
]


@pytest.mark.parametrize("options, error, message", BAD_CALLS)
def test_bad_calls_are_refused_before_any_task_runs(options, error, message):
    q = da.zeros((1, 3, 4, 8), chunks=2)
    kv_heads = 2 if options.get("enable_gqa") else 3   # 3 query heads over 2: refused
    k = v = da.zeros((1, kv_heads, 6, 8), chunks=2)
    with pytest.raises(error, match=message):
        cdask.scaled_dot_product_attention(q, k, v, **options)


def test_non_float_and_non_array_inputs_are_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        cdask.scaled_dot_product_attention(*(da.zeros((2, 4, 8), dtype=int),) * 3)
    with pytest.raises(TypeError, match="Dask array"):
        cdask.scaled_dot_product_attention([[0.0]], [[0.0]], [[0.0]])


def test_the_module_example_runs():
    import doctest
    result = doctest.testmod(cdask, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_importing_cattn_never_imports_dask():
    code = ("import sys, numpy, cattn; cattn.scaled_dot_product_attention(*[numpy.ones((2, 4))]"
            " * 3); cattn.merge_attention; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('dask', 'distributed')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=os.path.dirname(os.path.dirname(cattn.__file__)))
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- a real cluster

@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       silence_logs=40)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_cluster_matches_reference_and_the_single_call(rng, client):
    (q, k, v), (dq, dk, dv), options = case_inputs(rng, "bottom-right-lengths", np.float32)
    out, lse = cdask.scaled_dot_product_attention(dq, dk, dv, return_lse=True, **options)
    got = client.compute([out, lse], sync=True)
    assert_matches(got, reference64(q, k, v, return_lse=True, **options), np.float32)
    # Head shards on two worker processes equal the single call bitwise.
    heads = dict(chunks=(1, 2, -1, -1))
    out = cdask.scaled_dot_product_attention(
        da.from_array(q, **heads), da.from_array(k, **heads), da.from_array(v, **heads),
        is_causal=True)
    np.testing.assert_array_equal(client.compute(out, sync=True),
                                  cattn.scaled_dot_product_attention(q, k, v,
                                                                     is_causal=True))
    # Each worker runs one task at a time on its one thread: one cattn thread per task.
    assert client.submit(cdask._task_threads, pure=False).result() == 1


def test_decoding_against_a_cache_sharded_on_the_workers(rng, client):
    # The cache is cut into key shards that stay on the workers; each step sends a query
    # and gathers (B, H, 1, Ev) outputs with their lse.
    B, H, S = 1, 4, 4000
    k, v = randn(rng, (B, H, S, 32), np.float32), randn(rng, (B, H, S, 16), np.float32)
    dk, dv = cdask.persist_shards(client, da.from_array(k, chunks=(1, 4, 1000, 32)), v)
    assert dv.chunks == dk.chunks[:-1] + ((16,),)
    distributed.wait([dk, dv])
    held_before = client.who_has([dk, dv])
    for step in range(3):
        q = randn(rng, (B, H, 1, 32), np.float32)
        out, lse = cdask.scaled_dot_product_attention(q, dk, dv, return_lse=True)
        got = client.compute([out, lse], sync=True)
        assert_matches(got, reference64(q, k, v, return_lse=True), np.float32)
    # No shard moved or was copied (a key shard away from its value shard would have been
    # copied to it), and both workers hold shards.
    held = client.who_has([dk, dv])
    assert len(held) == 8 and held == held_before
    assert all(len(where) == 1 for where in held.values())
    assert len(set().union(*held.values())) == 2


class DieAtTheFirstAttentionTask(distributed.WorkerPlugin):
    """Kills its worker process as an attention task starts executing there, the first
    time on any worker (a marker file says so): a worker lost mid-computation."""
    name = "die-at-the-first-attention-task"

    def __init__(self, marker):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or not str(key).startswith("('cattn-part-"):
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os._exit(1)


def test_a_worker_killed_mid_computation_changes_nothing(rng, client, tmp_path):
    q = randn(rng, (1, 2, 256, 16), np.float64)
    k, v = randn(rng, (1, 2, 1024, 16), np.float64), randn(rng, (1, 2, 1024, 8), np.float64)
    out, lse = cdask.scaled_dot_product_attention(
        da.from_array(q, chunks=(1, 1, 128, 16)), da.from_array(k, chunks=(1, 2, 256, 16)),
        da.from_array(v, chunks=(1, 2, 256, 8)), is_causal=True, return_lse=True)
    marker = tmp_path / "died"
    plugin = DieAtTheFirstAttentionTask(str(marker))
    client.register_plugin(plugin)
    try:
        # The scheduler reruns the lost tasks on the surviving (or restarted) worker.
        got = client.compute([out, lse], sync=True)
    finally:
        client.unregister_worker_plugin(plugin.name)
    assert marker.exists(), "no worker was killed"
    assert_matches(got, reference64(q, k, v, is_causal=True, return_lse=True), np.float64)

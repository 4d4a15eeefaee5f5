"""The dask preset: attention on a local two-process Dask cluster (cattn.dask).

1. (1, 8, N, N, 64) float32 with the keys sharded on 2 workers x 1 thread (one key shard
   placed on each, the queries sent to both), against one cattn call on 2 threads.
2. K and V larger than one worker's memory limit, generated on the workers and persisted
   there, then attended to by a small batch of queries: it must complete, right.

Each result is checked against the float64 reference on head 0 (the first rows for case 1).
"""
import logging
import time
from typing import Any, Dict, List

import numpy as np

from cattn.bench.config import BenchConfig

_MIB = 2**20


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _max_diff_to_reference(got, q, k, v) -> float:
    from cattn import reference
    want = reference.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                                  v.astype(np.float64))
    return float(np.abs(got - want).max())


def _cluster(memory_limit: str = "auto"):
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None,
                           memory_limit=memory_limit, silence_logs=logging.ERROR)
    return cluster, Client(cluster)


def _keys_sharded(N: int, config: BenchConfig) -> Dict[str, Any]:
    import dask.array as da
    import cattn
    import cattn.dask
    rng = np.random.default_rng(config.seed)
    B, H, E = 1, 8, 64
    q, k, v = (rng.standard_normal((B, H, N, E), dtype=np.float32) for _ in range(3))
    single = _median_time(lambda: cattn.scaled_dot_product_attention(q, k, v, num_threads=2),
                          config.reps)
    cluster, client = _cluster()
    try:
        workers = sorted(client.scheduler_info()["workers"])
        half = N // 2
        shards = [(client.scatter(k[:, :, s:s + half], workers=[w]),
                   client.scatter(v[:, :, s:s + half], workers=[w]))
                  for s, w in zip((0, half), workers)]
        dk = da.concatenate([da.from_delayed(fk, (B, H, half, E), np.float32)
                             for fk, _ in shards], axis=2)
        dv = da.concatenate([da.from_delayed(fv, (B, H, half, E), np.float32)
                             for _, fv in shards], axis=2)
        dq = da.from_delayed(client.scatter(q, broadcast=True), q.shape, np.float32)
        attention = cattn.dask.scaled_dot_product_attention(dq, dk, dv)
        got = client.compute(attention, sync=True)
        distributed_time = _median_time(lambda: client.compute(attention, sync=True),
                                        config.reps)
    finally:
        client.close()
        cluster.close()
    rows = slice(0, 64)
    diff = _max_diff_to_reference(got[:, :1, rows], q[:, :1, rows], k[:, :1], v[:, :1])
    return {"case": "keys-sharded", "shape": [B, H, N, N, E], "single_2t_s": single,
            "dask_2x1_s": distributed_time, "ratio": distributed_time / single,
            "max_abs_diff": diff}


def _beyond_one_worker(config: BenchConfig) -> Dict[str, Any]:
    import dask.array as da
    import distributed
    import cattn.dask
    limit_mib = 400 if config.quick else 1024
    B, H, E = 1, 8, 64
    S = int(1.5 * limit_mib * _MIB / (2 * B * H * E * 4))  # K + V = 1.5 x one worker's limit
    S -= S % 8
    chunks = (1, H, S // 8, E)
    cluster, client = _cluster(f"{limit_mib}MiB")
    try:
        generator = da.random.default_rng(config.seed)
        k = generator.standard_normal((B, H, S, E), chunks=chunks, dtype=np.float32)
        v = generator.standard_normal((B, H, S, E), chunks=chunks, dtype=np.float32)
        start = time.perf_counter()
        k, v = client.persist([k, v])
        distributed.wait([k, v])
        q = np.random.default_rng(config.seed + 1).standard_normal((B, H, 16, E),
                                                                   dtype=np.float32)
        got = client.compute(cattn.dask.scaled_dot_product_attention(q, k, v), sync=True)
        elapsed = time.perf_counter() - start
        k0, v0 = client.compute([k[:, :1], v[:, :1]], sync=True)
    finally:
        client.close()
        cluster.close()
    diff = _max_diff_to_reference(got[:, :1], q[:, :1], k0, v0)
    return {"case": "kv-beyond-one-worker", "shape": [B, H, 16, S, E],
            "kv_mib": 2 * B * H * S * E * 4 / _MIB, "worker_memory_limit_mib": limit_mib,
            "elapsed_s": elapsed, "max_abs_diff": diff}


def run_dask_preset(config: BenchConfig) -> Dict[str, Any]:
    """Both cases; the N of the first is 16384, 4096 with --quick."""
    cases: List[Dict[str, Any]] = [_keys_sharded(4096 if config.quick else 16384, config),
                                   _beyond_one_worker(config)]
    return {"mode": "quick" if config.quick else "full", "presets": ["dask"],
            "reps": config.reps, "dask_cases": cases}


def format_dask_cases(cases: List[Dict[str, Any]]) -> str:
    lines = ["attention on a local Dask cluster (2 worker processes x 1 thread)"]
    for c in cases:
        if c["case"] == "keys-sharded":
            lines.append(f"  {tuple(c['shape'])} float32, keys in 2 shards: single call on "
                         f"2 threads {c['single_2t_s'] * 1e3:.0f} ms, dask "
                         f"{c['dask_2x1_s'] * 1e3:.0f} ms ({c['ratio']:.2f}x), max abs diff "
                         f"{c['max_abs_diff']:.2g} vs the float64 reference")
        else:
            lines.append(f"  K+V of {c['kv_mib']:.0f} MiB against a worker memory limit of "
                         f"{c['worker_memory_limit_mib']} MiB, {tuple(c['shape'])}: done in "
                         f"{c['elapsed_s']:.1f} s, max abs diff {c['max_abs_diff']:.2g}")
    return "\n".join(lines)

"""Mutation check: does the test suite catch the bugs it exists for?

    python scripts/mutation_check.py               # every mutant (one to several hours on 2 cores)
    python scripts/mutation_check.py --quick       # the few marked quick: CI time (minutes)
    python scripts/mutation_check.py --module cattn.dask cattn.models   # one module's
    python scripts/mutation_check.py --list        # the mutants, what each breaks, its tests
    python scripts/mutation_check.py --only merge-without-max-shift leak-100-bytes
    python scripts/mutation_check.py --keep        # keep the temporary copies (paths printed)
    python scripts/mutation_check.py --check       # only check that every mutant still applies

Each mutant below is a realistic bug: one or more edits, each an exact piece of text in a
named file and its replacement. The script copies this tree (sources and the in-place build)
to a temporary directory, checks that the unmutated copy passes every selected test, then
for each mutant: makes a fresh copy, applies its edits, rebuilds the compiled core when an
edit touches it (.pyx, .pxd, .h, setup.py, or cattn/_api.py, cattn/_plan.py, cattn/_varlen.py
or cattn/_validation.py, which Cython compiles too),
and runs the mutant's tests with `-x` (one mutant at a time, so a kernel rebuild per
compiled mutant: a few minutes each on a loaded machine). A mutant is killed when a test fails; it survives
when they all pass (a crash of the test process counts as killed). The exit status is non-zero when a mutant survives, or when one cannot
be applied or built. An edit finds its text by content: in its named file, or, when the
code has moved to another module, in the one source file that holds it; text that is gone
(or no longer unique) fails loudly as "mutant did not apply", so the list cannot rot
silently.
`--check` copies, builds and runs nothing: it checks that every edit's text occurs exactly once
in its named file (strictly: text that moved to another module counts as stale, so the file
named here stays the module the mutant breaks) and that every test file a mutant names
exists; tests/test_mutation_list.py runs it, so a code move that leaves a mutant stale fails
the test suite at once.
The score is printed per module (the file of a mutant's first edit: `cattn._paged`,
`cattn.models`, `src/cattn_simd.h`...) and in total.

Every new feature adds its mutants here: the bugs its tests exist to catch.
"""
import argparse
import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Directories and files never copied: VCS data, environments, caches, outputs.
SKIP_NAMES = {".git", ".ci-venv", ".hypothesis", ".pytest_cache", "__pycache__", "dist",
              "out", "cattn-demo"}
# Edits to these need a rebuild of the compiled core (as do Python modules built in place).
COMPILED = re.compile(r"(\.pyx|\.pxd|\.h|\.c|setup\.py|cattn/_api\.py|cattn/_plan\.py|"
                      r"cattn/_varlen\.py|cattn/_validation\.py)$")


@dataclasses.dataclass
class Edit:
    path: str          # relative to the tree's root
    find: str          # exact text, which must occur exactly once
    replace: str


@dataclasses.dataclass
class Mutant:
    name: str
    bug: str                   # what a user would see
    edits: list
    tests: list                # pytest arguments: files, node ids, -k expressions
    env: dict = dataclasses.field(default_factory=dict)  # for the build and the tests
    quick: bool = False        # one of the few `--quick` runs (CI)


def cpu_flags():
    """The CPU's feature flags as Linux names them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The bfloat16 levels' mutants run on the CPU's own instructions where it has them, and
# otherwise in the emulation build (src/cattn_emulate.h), whose tests do not skip.
EMULATE = {"CATTN_EMULATE_ISA": "1"}
ON_BF16 = {} if "avx512_bf16" in cpu_flags() else EMULATE
ON_AMX = {} if {"amx_bf16", "amx_tile"} <= cpu_flags() else EMULATE
ON_AMX_INT8 = {} if {"amx_int8", "amx_tile"} <= cpu_flags() else EMULATE

API, KERNEL, REF, LAYERS = "cattn/_api.py", "cattn/_kernel.pyx", "cattn/reference.py", \
    "cattn/layers.py"
PAGED = "cattn/_paged.py"
VARLEN = "cattn/_varlen.py"
BF16, INT8 = "src/cattn_bf16.h", "src/cattn_int8_gemm.h"
CONVERT, GEMM, DTYPES = "src/cattn_convert.h", "src/cattn_gemm.h", "cattn/_dtypes.py"
DASK, RUNTIME = "cattn/dask.py", "cattn/_runtime.py"
SENTENCE, MINILM, BERT = "cattn/models/sentence.py", "cattn/models/minilm.py", "cattn/models/bert.py"
PLAN, VISIBILITY, CACHE = "cattn/_plan.py", "cattn/_visibility.py", "cattn/_cache.py"
DASK_PLAN, DASK_GRAPH = "cattn/_dask_plan.py", "cattn/_dask_graph.py"
SHARED = "cattn/_shared_prefix.py"
HF_BRIDGE = "cattn/integrations/transformers.py"
FOLDER = "cattn/models/_folder.py"

MUTANTS = [
    # ------------------------------------------------------------ found by the audit
    Mutant("key-split-drops-tail",
           "the key-split path ignores the last S % n_splits keys (error 2e-3 at S = 2049)",
           [Edit(PLAN, "    split_keys = -(-split_keys // align) * align\n"
                      "    return -(-S // split_keys), split_keys\n",
                 "    return n_splits, S // n_splits\n")],
           ["tests/test_key_splits.py"]),
    Mutant("decode-blocks-by-query-length-alone",
           "a group of 8 heads decoding packs blocks of 2048 keys (2 MiB of scratch per "
           "thread at E = 128, out of L2)",
           [Edit(PLAN, "    streams = group * block_q <= _kernel.DIRECT_ROWS\n",
                 "    streams = block_q <= _kernel.DIRECT_ROWS\n")],
           ["tests/test_plan.py", "-k", "stream"]),
    Mutant("streaming-chunks-of-the-short-minimum",
           "decoding cuts its keys into chunks of 512 that end its long key blocks early: "
           "the streams restart 4x as often",
           [Edit(PLAN, "STREAM_BLOCK_KEYS if streams else _MIN_SPLIT_KEYS", "_MIN_SPLIT_KEYS")],
           ["tests/test_plan.py", "-k", "stream"]),
    Mutant("streaming-tasks-keep-a-converted-block",
           "a float16 decode allocates a converted key block it never uses (1 MiB per thread "
           "at E = 128) on every call",
           [Edit(KERNEL, "if converts(p) and not streams(p) else 0", "if converts(p) else 0")],
           ["tests/test_plan.py", "-k", "stream"]),
    Mutant("merge-without-max-shift",
           "merge_attention returns NaN once the lse passes exp's range",
           [Edit(API, "safe_max = np.where(np.isfinite(lse_max), lse_max, 0).astype(dtype)",
                 "safe_max = np.zeros_like(lse_max)")],
           ["tests/test_oracles.py", "-k", "merge"]),
    Mutant("window-right-bound-off-by-one-in-front-and-reference",
           "window=(1, 0) lets a query see the next (future) key",
           [Edit(PLAN, 'win_right = min(check_int(right, "window right", 0), UNBOUNDED)',
                 'win_right = min(check_int(right, "window right", 0) + 1, UNBOUNDED)'),
            # (the window's right side only: causal alone stays right, as in the front)
            Edit(REF, "left, right = (None, None) if window is None else window\n",
                 "left, right = (None, None) if window is None else (\n"
                 "        window[0], None if window[1] is None else window[1] + 1)\n")],
           ["tests/test_oracles.py"]),
    Mutant("softcap-before-scale-in-front-and-reference",
           "softcap caps the raw Q·Kᵀ and the scale comes after",
           [Edit(PLAN, "self.softcap = 0.0 if softcap is None else check_softcap(softcap, self.dtype)",
                 "self.softcap = 0.0 if softcap is None else "
                 "check_softcap(softcap, self.dtype) * scale"),
            Edit(REF, "    scores = (query @ np.swapaxes(key, -1, -2)) * scale\n"
                      "    if softcap is not None:\n"
                      "        cap = dtype.type(softcap)\n"
                      "        scores = cap * np.tanh(scores / cap)\n",
                 "    scores = query @ np.swapaxes(key, -1, -2)\n"
                 "    if softcap is not None:\n"
                 "        cap = dtype.type(softcap)\n"
                 "        scores = cap * np.tanh(scores / cap)\n"
                 "    scores = scores * scale\n")],
           ["tests/test_oracles.py"]),
    Mutant("softcap-doubled-in-front-and-reference",
           "softcap=c caps at 2c",
           [Edit(PLAN, "self.softcap = 0.0 if softcap is None else check_softcap(softcap, self.dtype)",
                 "self.softcap = 0.0 if softcap is None else "
                 "2 * check_softcap(softcap, self.dtype)"),
            Edit(REF, "cap = dtype.type(softcap)", "cap = dtype.type(2 * softcap)")],
           ["tests/test_oracles.py"]),
    Mutant("k-offset-sign-flipped-in-front-and-reference",
           "keys cut from a longer sequence are placed at -k_offset: causal blocks see the "
           "wrong keys",
           [Edit(API, 'diag = _offset(q_offset, "q_offset", batch_shape) - \\\n'
                      '            _offset(k_offset, "k_offset", batch_shape)',
                 'diag = _offset(q_offset, "q_offset", batch_shape) + \\\n'
                 '            _offset(k_offset, "k_offset", batch_shape)'),
            Edit(REF, "k_pos = _per_item(0 if k_offset is None else k_offset, batch_shape)",
                 "k_pos = -_per_item(0 if k_offset is None else k_offset, batch_shape)")],
           ["tests/test_oracles.py", "-k", "offset"]),
    Mutant("num-threads-ignored",
           "num_threads has no effect: every call takes OpenMP's default team",
           [Edit(PLAN, "threads = _runtime.team_size(min(plan.num_threads, n_tasks))",
                 "threads = _runtime.team_size(min(_runtime.get_num_threads(), n_tasks))")],
           ["tests/test_plan.py"]),
    Mutant("default-one-thread",
           "without num_threads a call runs on one thread",
           [Edit(PLAN, "self.num_threads = (_runtime.get_num_threads() if num_threads is None",
                 "self.num_threads = (1 if num_threads is None")],
           ["tests/test_plan.py"]),
    Mutant("no-key-tiling",
           "one block of all S keys: scratch grows with S (12.6 MB at S = 16384) and causal "
           "blocks are no longer skipped",
           [Edit(PLAN, "block_k = min(max(S, 1), 256)", "block_k = max(S, 1)")],
           ["tests/test_plan.py"]),
    Mutant("leak-plan-table",
           "each call leaks its plan table (a missing DECREF: about 200 bytes a call)",
           [Edit(KERNEL, "from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree\n",
                 "from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree\n"
                 "from cpython.ref cimport Py_INCREF\n"),
            Edit(KERNEL, "    cdef Plan p\n    p.n_items = table.shape[0]\n",
                 "    cdef Plan p\n    Py_INCREF(table)\n    p.n_items = table.shape[0]\n")],
           ["tests/test_leaks.py"]),
    Mutant("layer-ignores-right-padding",
           "a right-padded key_padding_mask becomes a mask read for every score instead "
           "of key lengths that skip the padding",
           [Edit(LAYERS, "if np.array_equal(kpm, np.arange(S) >= valid[:, None]):",
                 "if False:")],
           ["tests/test_layers.py", "-k", "padding"]),
    # ------------------------------------------------------------------- further bugs
    Mutant("leak-100-bytes",
           "each call leaks 100 bytes of raw memory",
           [Edit(KERNEL, "    finally:\n        PyMem_RawFree(sp)\n",
                 "    finally:\n        PyMem_RawFree(sp)\n        PyMem_RawMalloc(100)\n")],
           ["tests/test_leaks.py"]),
    Mutant("gil-held-in-kernel",
           "the kernel keeps the GIL: other Python threads stop during a call",
           [Edit(KERNEL, "    with nogil:\n        if is_double:\n            run_tasks[double]",
                 "    if True:\n        if is_double:\n            run_tasks[double]")],
           ["tests/test_concurrency.py", "-k", "gil"]),
    Mutant("query-offset-32-bit",
           "query offsets truncated to 32 bits: rows past element 2^31 read wrong data",
           [Edit(KERNEL, "        return q + t.item[COL_Q] + t.i0 * p.q_rs\n",
                 "        return q + <int> (t.item[COL_Q] + t.i0 * p.q_rs)\n"),
            Edit(KERNEL, "src = q + t.item[m * N_COLS + COL_Q] + t.i0 * p.q_rs",
                 "src = q + <int> (t.item[m * N_COLS + COL_Q] + t.i0 * p.q_rs)")],
           ["tests/test_large.py", "--runslow"]),
    Mutant("no-causal-block-skipping",
           "key blocks after the diagonal are computed and thrown away (+27% time)",
           [Edit(KERNEL, "t.k_end = clamp(t.i0 + t.member_rows - 1 + diag + p.win_right + 1, 0, "
                         "kv_len)",
                 "t.k_end = kv_len")],
           ["tests/test_plan.py", "-k", "visit"]),
    Mutant("decode-never-splits",
           "a few heads decoding against a long cache run on one core",
           [Edit(PLAN, "_MIN_TASKS = 16\n", "_MIN_TASKS = 1\n")],
           ["tests/test_variants.py", "-k", "decode_against", "tests/test_key_splits.py"]),
    Mutant("split-merge-without-max-shift",
           "the kernel merges its key chunks without their common max: wrong lse, overflow",
           [Edit(KERNEL, "w = exp_scalar(part[s * part_stride + Ev] - m)",
                 "w = exp_scalar(part[s * part_stride + Ev])")],
           ["tests/test_key_splits.py"]),
    Mutant("reference-bottom-right-ignores-key-lengths",
           "the reference aligns the last query with key S-1 instead of the last valid key",
           [Edit(REF, '(kl - L if alignment == "bottom_right" else 0) + q_pos - k_pos',
                 '(S - L + 0 * kl if alignment == "bottom_right" else 0) + q_pos - k_pos')],
           ["tests/test_oracles.py"]),
    Mutant("reference-window-left-off-by-one",
           "the reference's window leaves out the key `left` positions back",
           [Edit(VISIBILITY, "seen = seen & ((j >= i + diag - left) | (j < kept))",
                 "seen = seen & ((j > i + diag - left) | (j < kept))")],
           ["tests/test_oracles.py"]),
    Mutant("gqa-tiled-heads-in-front-and-reference",
           "grouped-query heads map h -> h % Hkv (tile) instead of h // group (repeat)",
           [Edit(KERNEL, "offset += (idx[a] // group if a == nb - 1 else idx[a]) * steps[a]",
                 "offset += (idx[a] % (dims[a] // group) if a == nb - 1 else idx[a]) "
                 "* steps[a]"),
            Edit(REF, "key = np.repeat(key, group, axis=-3)\n"
                      "        value = np.repeat(value, group, axis=-3)",
                 "key = np.concatenate([key] * group, axis=-3)\n"
                 "        value = np.concatenate([value] * group, axis=-3)")],
           ["tests/test_oracles.py", "-k", "grouped"]),
    Mutant("kernel-team-of-one",
           "the kernel's parallel region runs on one thread whatever it is asked",
           [Edit(KERNEL, "with parallel(num_threads=num_threads):",
                 "with parallel(num_threads=1):")],
           ["tests/test_plan.py", "-k", "team or threads"]),
    Mutant("isa-cap-ignored",
           "CATTN_ISA=avx2|portable has no effect: the best path always runs",
           [Edit(KERNEL, "cdef int DEFAULT_ISA = min(SUPPORTED_ISA, _isa_cap_from_environment())",
                 "cdef int DEFAULT_ISA = SUPPORTED_ISA")],
           ["tests/test_isa_paths.py", "-k", "environment"]),
    Mutant("ctrl-c-not-checked",
           "Ctrl-C waits for the end of a long call (the kernel never checks for signals)",
           [Edit(KERNEL, "PyErr_CheckSignals()  # raises what a signal handler raised",
                 "pass")],
           ["tests/test_isa_paths.py", "-k", "ctrl_c"]),
    Mutant("avx512-request-runs-avx2",
           "the AVX-512 path is never taken (killed only on a CPU with AVX-512)",
           [Edit(KERNEL, "p.isa = cattn_isa_float_path(level)",
                 "p.isa = CATTN_ISA_AVX2 if level == CATTN_ISA_AVX512 else "
                 "cattn_isa_float_path(level)")],
           ["tests/test_isa_paths.py", "-k", "environment"]),
    Mutant("bf16-probabilities-truncated",
           "P is cut to bfloat16 (rounded toward zero) instead of rounded to nearest even",
           [Edit(BF16, "_mm512_storeu_si512(d + c / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));",
                 "_mm512_storeu_si512(d + c / 2, _mm512_inserti64x4(_mm512_castsi256_si512("
                 "_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(lo), 16))), "
                 "_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(hi), 16)), 1));")],
           ["tests/test_bf16_native.py", "-k", "float64"],
           env=ON_BF16),
    Mutant("bf16-values-never-native",
           "bfloat16 values are widened to float32 for P·V on the bfloat16 paths",
           [Edit(KERNEL, "p.bf16_pv = p.bf16_isa and p.v_type == CATTN_ELEM_BF16",
                 "p.bf16_pv = False")],
           ["tests/test_bf16_native.py", "-k", "only_where"],
           env=ON_BF16),
    Mutant("bf16-float32-query-rounded",
           "a float32 query is cut to bfloat16 for Q·Kᵀ against bfloat16 keys",
           [Edit(KERNEL, "p.k_type == CATTN_ELEM_BF16 and bool(bf16_query)",
                 "p.k_type == CATTN_ELEM_BF16")],
           ["tests/test_bf16_native.py", "-k", "only_where"],
           env=ON_BF16),
    Mutant("bf16-queries-of-the-first-block-only",
           "the bfloat16 queries are loaded for the first task of each thread only",
           [Edit(KERNEL, "if p.bf16_scores and t.rows > CATTN_DIRECT_ROWS:",
                 "if p.bf16_scores and t.rows > CATTN_DIRECT_ROWS and "
                 "counters[COUNTER_TASKS] == 0:")],
           ["tests/test_bf16_native.py", "-k", "matches_float64"],
           env=ON_BF16),
    Mutant("bf16-key-rows-read-past-E",
           "the key packing reads whole pairs of 16 past a row's last feature",
           [Edit(BF16, "const __mmask32 m = cattn_mask32(E - 2 * e0);",
                 "const __mmask32 m = cattn_mask32(2 * ldq - 2 * e0);")],
           ["tests/test_bf16_native.py", "-k", "float64 or non_finite"],
           env=ON_BF16),
    Mutant("ctrl-c-never-checked",
           "a long call never checks for signals: Ctrl-C waits for its end, and the output "
           "is left complete instead of NaN",
           [Edit(KERNEL, "                    PyErr_CheckSignals()  # raises what a signal handler raised\n",
                 "                    pass\n")],
           ["tests/test_isa_paths.py", "-k", "ctrl_c"]),
    Mutant("peers-skip-under-ci",
           "under CI=true a missing torch skips the comparisons instead of failing",
           [Edit("tests/conftest.py", "        if in_ci():\n            pytest.fail(",
                 "        if False:\n            pytest.fail(")],
           ["tests/test_harness.py"]),
    Mutant("linear-accumulate-drops-earlier-slices",
           "a linear layer with more inputs than one slice keeps only the last slice's sum",
           [Edit("src/cattn_gemm_impl.h",
                 "#define LINEAR_ROWS(R, i) FN(cattn_linear_tile)(R, 1, kc,",
                 "#define LINEAR_ROWS(R, i) FN(cattn_linear_tile)(R, 0, kc,")],
           ["tests/test_packed_linear.py", "-k", "700 or 1100"]),
    Mutant("exact-row-tile-drops-last-row",
           "a few-row attention GEMM (5 to 7 grouped heads of one K/V head) leaves its last "
           "row's scores and values unwritten",
           [Edit("src/cattn_gemm_impl.h",
                 "case R: if ((R) < (M)) TILE(((R) < (M) ? (R) : 1), i_); break",
                 "case R: if ((R) < (M)) TILE(((R) < (M) && (R) > 4 ? (R) - 1 : (R) < (M) ? (R) : 1), i_); break")],
           ["tests/test_gqa_grouped.py", "-k", "match_reference and g5"]),
    Mutant("key-slots-in-load-order",
           "the scores of W keys merged across lanes are stored as if each key's sum stayed "
           "in its own slot's lane: most scores land on another key",
           [Edit("src/cattn_gemm_kv.h",
                 "            const int lane = CATTN_SLOT_LANE(W, PART, slot);",
                 "            const int lane = slot;")],
           ["tests/test_decode_streams.py", "-k", "match_reference and float32"]),
    Mutant("lane-merge-adds-a-pair-twice",
           "the AVX-512 merge of sums across pairs of lanes adds the first pair to itself "
           "instead of to the second",
           [Edit(GEMM, "        x = _mm512_shuffle_ps(a, b, 0x44); y = _mm512_shuffle_ps(a, b, 0xEE); break;",
                 "        x = _mm512_shuffle_ps(a, b, 0x44); y = _mm512_shuffle_ps(a, b, 0x44); break;")],
           ["tests/test_decode_streams.py", "-k", "match_reference and float32"]),
    Mutant("grouped-rows-merge-with-the-first-row",
           "2-4 query rows merge each key's sum with the first row's waiting sums: every "
           "row but the first gets a mixture of rows' scores",
           [Edit("src/cattn_gemm_kv.h",
                 "                    sum = VMERGE_SUMS(level, waiting[r][level], sum);",
                 "                    sum = VMERGE_SUMS(level, waiting[0][level], sum);")],
           ["tests/test_gqa_grouped.py", "-k", "match_reference"]),
    Mutant("value-stretch-last-keys-dropped",
           "P·V over stretches forgets the keys past VS · (n // VS) of a block (an odd count's last)",
           [Edit("src/cattn_gemm_kv.h",
                 "for (ptrdiff_t j = VS * len; j < n_keys; j++) { /* the last stretch's last keys */",
                 "for (ptrdiff_t j = n_keys; j < n_keys; j++) { /* the last stretch's last keys */")],
           ["tests/test_decode_streams.py", "-k", "match_reference and float32"]),
    Mutant("value-stretches-last-sum-dropped",
           "P·V adds up all its stretches' accumulators but the last",
           [Edit("src/cattn_gemm_kv.h",
                 "            for (int s = 1; s < VS; s++) sum = VADD(sum, a[s][r][c]);",
                 "            for (int s = 1; s < VS - 1; s++) sum = VADD(sum, a[s][r][c]);")],
           ["tests/test_decode_streams.py", "-k", "match_reference and float32"]),
    Mutant("stream-probe-skips-a-stretch",
           "the read-rate probe sums three of its four stretches: it reports a rate 4/3 of "
           "what the memory gave",
           [Edit("src/cattn_simd.h",
                 "        s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x3 + j));\n",
                 "")],
           ["tests/test_bench_ceilings.py", "-k", "stream_sum"]),
    Mutant("packed-key-squares-at-feature-zero",
           "whole squares of packed keys are all written at the first features: scores of "
           "E > one vector of features read the wrong keys",
           [Edit("src/cattn_gemm_kv.h",
                 "for (int e = 0; e < W; e++) VSTORE(panel + (e0 + e) * NR, r[e]);",
                 "for (int e = 0; e < W; e++) VSTORE(panel + e * NR, r[e]);")],
           ["tests/test_core.py"]),
    Mutant("heads-last-rows-with-the-usual-stride",
           "the (batch, L, heads, Ev) result the PyTorch bridge asks for is written with the "
           "row stride of the usual layout: heads overwrite each other's rows",
           [Edit("cattn/_plan.py",
                 "self.out_rs, self.out_cs = heads * Ev, 1",
                 "self.out_rs, self.out_cs = Ev, 1")],
           ["tests/test_core.py", "-k", "heads_last"]),
    Mutant("heads-last-lost-in-rounding",
           "a 16-bit result in the (batch, L, heads, Ev) layout is rounded into a contiguous "
           "(batch, heads, L, Ev) copy: a model's reshape then copies it again",
           [Edit("cattn/_plan.py",
                 "            out = out.astype(self.result_dtype)",
                 "            out = out.astype(self.result_dtype, order=\"C\")")],
           ["tests/test_core.py", "-k", "heads_last"]),
    Mutant("small-calls-rule-reversed",
           "small calls get the team and calls worth one run on one thread",
           [Edit("cattn/_kernel.pyx",
                 "    if serial_seconds >= min(SERIAL_OVERHEADS * cost, MAX_KEPT_SECONDS):",
                 "    if serial_seconds < min(SERIAL_OVERHEADS * cost, MAX_KEPT_SECONDS):")],
           ["tests/test_small_calls.py"]),
    Mutant("small-calls-probe-too-soon",
           "a call kept on one thread probes its team after one team cost of work, not 64: "
           "where the team costs milliseconds, small calls pay it again and again",
           [Edit("cattn/_kernel.pyx",
                 "    if kept_work >= PROBE_AFTER * cost:",
                 "    if kept_work >= cost:")],
           ["tests/test_small_calls.py"]),
    Mutant("small-calls-no-ceiling",
           "any call, however long, runs on one thread while the team's cost measures "
           "milliseconds (a moment of OpenBLAS's workers spinning)",
           [Edit("cattn/_kernel.pyx",
                 "    if serial_seconds >= min(SERIAL_OVERHEADS * cost, MAX_KEPT_SECONDS):",
                 "    if serial_seconds >= SERIAL_OVERHEADS * cost:")],
           ["tests/test_small_calls.py"]),
    Mutant("small-calls-never-probe",
           "a call kept on one thread never runs on its team again: one slow moment's "
           "measurement keeps every later small call on one thread",
           [Edit("cattn/_kernel.pyx",
                 "    if kept_work >= PROBE_AFTER * cost:",
                 "    if False:")],
           ["tests/test_small_calls.py"]),
    Mutant("team-cost-counts-the-work",
           "a team's cost is sampled as its region's whole time, the work included: large "
           "calls make every small call look too small for a team",
           [Edit("cattn/_kernel.pyx",
                 "return max(counters[COUNTER_REGION_NS] - busiest, 0) * 1e-9",
                 "return max(counters[COUNTER_REGION_NS], 0) * 1e-9")],
           ["tests/test_small_calls.py"]),
    Mutant("linear-tail-panel-unmasked-bias",
           "the last panel of outputs takes the bias as zeros (outputs not a multiple of the "
           "panel width)",
           [Edit("src/cattn_gemm_impl.h",
                 "b[u] = !bias ? VZERO() : full ? VLOAD(bias + u * W) : VMASKLOAD(bias + u * W, m[u]);",
                 "b[u] = !bias || !full ? VZERO() : VLOAD(bias + u * W);")],
           ["tests/test_packed_linear.py"]),
    Mutant("split-bf16-input-remainder-dropped",
           "matmul_precision=\"high\" forgets the inputs' low bfloat16 parts: about 8 "
           "significant bits, not 16 (AMX CPUs)",
           [Edit(BF16, "                    CATTN_AMX_PRODUCTS(); /* a_lo · w_hi */\n", "")],
           ["tests/test_packed_linear.py", "-k", "split"],
           env=ON_AMX),
    Mutant("split-bf16-weight-remainder-zero",
           "the weight's low bfloat16 part is packed as zeros",
           [Edit("cattn/_encoder_ops.pyx",
                 "rest = weight - (hi.astype(np.uint32) << 16).view(np.float32)",
                 "rest = weight * 0")],
           ["tests/test_packed_linear.py", "-k", "split"]),
    Mutant("split-bf16-row-blocks-overlap",
           "every block of 128 rows is written over the first (AMX CPUs)",
           [Edit(BF16, "c + (i0 + r0) * ldc + j0, ldc);", "c + r0 * ldc + j0, ldc);")],
           ["tests/test_packed_linear.py", "-k", "split"],
           env=ON_AMX),
    # (Either side's zero padding alone keeps the sums right: zeros times anything. So the
    # realistic bug is the tail forgotten on both sides; one side alone only reads past.)
    Mutant("amx-int8-last-groups-read-as-whole-tiles",
           "int8 layers on AMX: when the inputs do not fill a last tile of 64, both operands "
           "are read as whole tiles, the rows' next bytes against the next panel's weights",
           [Edit(INT8, "    if (nr == 16 && ng == 16) {", "    if (nr == 16) {"),
            Edit(INT8, "    if (ng == 16) return panel + g0 * 64;",
                 "    return panel + g0 * 64;")],
           ["tests/test_int8_linear.py", "-k", "amx"],
           env=ON_AMX_INT8),
    Mutant("amx-int8-second-row-tile-dropped",
           "int8 layers on AMX: rows 16-31 of each 32-row block are never summed",
           [Edit(INT8, "const int two_rows = rows - r0 > 16;",
                 "const int two_rows = rows - r0 > 32;")],
           ["tests/test_int8_linear.py", "-k", "amx"],
           env=ON_AMX_INT8),
    Mutant("amx-int8-under-an-avx512-cap",
           "CATTN_ISA=avx512 still runs int8 layers on AMX tiles",
           [Edit("cattn/_encoder_ops.pyx", "    if cap != CATTN_ISA_AMX:\n",
                 "    if False:\n")],
           ["tests/test_int8_linear.py", "-k", "caps"],
           env=ON_AMX_INT8),
    Mutant("encoder-ignores-matmul-precision",
           "the sentence encoder packs its weights for float32 products whatever "
           "matmul_precision says",
           [Edit(BERT, "return ops.pack_linear_weight(np.ascontiguousarray(weight),\n"
                       "                                              precision=matmul_precision)",
                 "return ops.pack_linear_weight(np.ascontiguousarray(weight))")],
           ["tests/test_sentence_encoder.py", "-k", "precision"]),
    Mutant("serial-build",
           "the build silently drops OpenMP: every call on one thread",
           [Edit("setup.py", 'if os.environ.get("CATTN_NO_OPENMP"):', "if True:")],
           ["tests/test_plan.py", "-k", "openmp"], env={"CI": "true"}),
    Mutant("lse-one-row-late-in-the-debug-build",
           "a packed call's lse entries land one row late, the last past its array: the "
           "debug build (CATTN_DEBUG=1) aborts naming the write, where the release build "
           "writes out of bounds",
           [Edit(KERNEL, "        return row_item(p, t, r)[COL_LSE] + t.i0 + r % t.member_rows\n",
                 "        return row_item(p, t, r)[COL_LSE] + t.i0 + r % t.member_rows + 1\n")],
           ["tests/test_varlen.py", "-k", "lse"], env={"CATTN_DEBUG": "1"}),
    # ---------------------------------------------------- packed variable-length sequences
    Mutant("varlen-tail-block-dropped",
           "a sequence's last partial block of queries is never computed (garbage rows)",
           [Edit(VARLEN, "    blocks = -(-q_len // block_q)\n", "    blocks = q_len // block_q\n")],
           ["tests/test_varlen.py"]),
    Mutant("varlen-keys-at-query-offset",
           "each sequence's keys are read from where its queries start",
           [Edit(VARLEN, "packed_layout(plan, cu_q, q_len, k_len, diag, group, cu_k * k_st[0], k_st[1],",
                 "packed_layout(plan, cu_q, q_len, k_len, diag, group, cu_q * k_st[0], k_st[1],")],
           ["tests/test_varlen.py"]),
    Mutant("varlen-rows-run-past-sequence-end",
           "every task assumes the longest query length: rows spill into the next sequence",
           [Edit(KERNEL, "        n_rows = t.item[COL_Q_LEN]\n", "")],
           ["tests/test_varlen.py"]),
    Mutant("varlen-lse-in-padded-layout",
           "the lse of a packed call lands at item x longest length, not at its tokens",
           [Edit(KERNEL, "        return row_item(p, t, r)[COL_LSE] + t.i0 + r % t.member_rows\n",
                 "        return r // t.member_rows * p.L + t.n * p.L + t.i0 + "
                 "r % t.member_rows\n")],
           ["tests/test_varlen.py"]),
    Mutant("varlen-bottom-right-global-lengths",
           "bottom-right alignment uses the packed totals instead of each sequence's lengths",
           [Edit(VARLEN, "diag = k_len - q_len if alignment", "diag = Tk - Tq + 0 * q_len if alignment")],
           ["tests/test_varlen.py"]),
    Mutant("varlen-int8-scales-transposed",
           "int8 keys of a packed batch are scaled by another head's or token's scales",
           [Edit(VARLEN, "table[:, column] = cu_k[seq] * token_stride + kv_head * head_stride",
                 "table[:, column] = cu_k[seq] * head_stride + kv_head * token_stride")],
           ["tests/test_varlen.py", "-k", "narrow"]),
    # ----------------------------------------------------- attention sinks, kept first keys
    Mutant("sink-in-every-key-chunk",
           "a decode whose keys are split counts the sink once per chunk",
           [Edit(KERNEL, "if p.sinks != NULL and t.split == 0:", "if p.sinks != NULL:")],
           ["tests/test_sinks.py", "-k", "split"]),
    Mutant("sink-missing-from-lse",
           "the lse leaves out the sink's term, so merged chunks overweight the others",
           [Edit(KERNEL, "            lse[row_lse(p, t, r)] = run_max[r] + <floating> log(run_sum[r])",
                 "            lse[row_lse(p, t, r)] = run_max[r] + <floating> log(run_sum[r] - (\n"
                 "                exp_scalar(((<const floating*> p.sinks)[t.n + r // t.member_rows])"
                 " - run_max[r])\n"
                 "                if p.sinks != NULL else 0))")],
           ["tests/test_sinks.py", "-k", "lse or merg"]),
    Mutant("sink-capped-like-the-scores",
           "softcap caps the sink too (gpt-oss does not)",
           [Edit(PLAN, "            self.sinks = sink_logits(sinks, batch_shape, self.dtype)\n",
                 "            self.sinks = sink_logits(sinks, batch_shape, self.dtype)\n"
                 "            if self.softcap:\n"
                 "                self.sinks = (self.softcap * np.tanh(self.sinks / self.softcap)"
                 ").astype(self.dtype)\n")],
           ["tests/test_sinks.py", "-k", "cap"]),
    Mutant("no-visible-key-with-sink-gives-minus-inf",
           "a row that sees no key reports lse -inf instead of the sink",
           [Edit(KERNEL, "        if run_sum[r] == 0:  # no visible key",
                 "        if run_sum[r] == 0 or acc[r * Ev] == 0:  # no visible key")],
           ["tests/test_sinks.py", "-k", "no_key or no_visible"]),
    Mutant("keep-first-ignores-the-window-right-side",
           "kept first keys are visible to queries before them (a causal leak)",
           [Edit(KERNEL, "            if keep_first >= lo:\n                a = 0\n",
                 "            if keep_first >= lo:\n                a = 0\n"
                 "                b = clamp(max(keep_first, hi) - kb0, 0, n_keys)\n")],
           ["tests/test_sinks.py", "-k", "keep"]),
    Mutant("keep-first-gap-not-hidden",
           "keys between the kept first keys and the window leak in when both share a block",
           [Edit(KERNEL, "    for j in range(gap_a, gap_b):\n        row[j] = -INFINITY\n", "")],
           ["tests/test_sinks.py", "-k", "keep"]),
    Mutant("keep-first-range-not-visited-in-split-chunks",
           "with split keys the kept first keys are dropped",
           [Edit(KERNEL, "        t.keep_begin = t.split * p.split_keys\n"
                         "        t.keep_end = clamp(t.keep_end, t.keep_begin, (t.split + 1) * p.split_keys)\n",
                 "        t.keep_begin = t.split * p.split_keys\n"
                 "        t.keep_end = t.keep_begin\n")],
           ["tests/test_sinks.py", "-k", "keep"]),
    Mutant("keep-first-ignores-k-offset",
           "kept first keys counted from the piece's first key, not the sequence's",
           [Edit(PLAN, "    kept = min(keep_first, MAX_OFFSET) - offset(k_offset, \"k_offset\", batch_shape)",
                 "    kept = min(keep_first, MAX_OFFSET)")],
           ["tests/test_sinks.py", "-k", "keep"]),
    # ------------------------------------------------------ position biases and key mass
    # (a stretch one key short is no bug: the key at ±max_distance reads the end value)
    Mutant("t5-stretch-shifted-by-one",
           "the keys within max_distance read the bias of the next distance",
           [Edit(KERNEL, "        x[j] += by_distance[j - query_pos]\n",
                 "        x[j] += by_distance[j - query_pos + 1]\n")],
           ["tests/test_position_bias.py", "-k", "compute_bias"]),
    Mutant("t5-bias-dropped-by-varlen",
           "varlen_attention takes position_bias and never hands it to the plan",
           [Edit(VARLEN, "alibi_slopes,\n                    position_bias)",
                 "alibi_slopes)")],
           ["tests/test_entry_points.py", "-k", "position_bias"]),
    Mutant("key-mass-groups-interleaved",
           "kv_heads sums query heads h, h + Hkv, ... (strided) instead of a group's neighbours",
           [Edit(PLAN, "key_mass.reshape(n_items // plan.mass_group,\n"
                       "                                         plan.mass_group * n_q_blocks, "
                       "plan.S).sum(\n            axis=1)",
                 "key_mass.reshape(plan.mass_group, n_items // plan.mass_group, n_q_blocks, "
                 "plan.S).sum(axis=(0, 2))")],
           ["tests/test_key_mass.py", "-k", "kv_heads"]),
    # ------------------------------------------------------------ shared-prefix decoding
    Mutant("shared-prefix-sinks-counted-twice",
           "the sinks join both the prefix's and the suffix's call: counted twice",
           [Edit(SHARED, "alibi_slopes=alibi_slopes, position_bias=position_bias)\n",
                 "alibi_slopes=alibi_slopes, position_bias=position_bias, sinks=sinks)\n"),
            Edit(SHARED, "key_lengths=key_lengths, window=window, sinks=sinks, return_lse=True, "
                         "**options)",
                 "key_lengths=key_lengths, window=window, return_lse=True, **options)")],
           ["tests/test_shared_prefix.py", "-k", "sinks"]),
    Mutant("shared-prefix-suffix-top-left",
           "the suffix's causal diagonal is top-left: queries miss their own latest keys",
           [Edit(SHARED, 'alignment="bottom_right",\n        key_lengths=key_lengths',
                 'alignment="top_left",\n        key_lengths=key_lengths')],
           ["tests/test_shared_prefix.py"]),
    Mutant("shared-prefix-heads-regrouped-wrongly",
           "under GQA the prefix's rows are regrouped the wrong way round (requests as heads)",
           [Edit(SHARED, "    out = out.reshape(Hkv, group, R, L, Ev).transpose(2, 0, 1, 3, 4)",
                 "    out = out.reshape(Hkv, R, group, L, Ev).transpose(1, 0, 2, 3, 4)")],
           ["tests/test_shared_prefix.py", "-k", "grouped"]),
    # ------------------------------------------------------------------ paged key/value cache
    Mutant("paged-page-index-off-by-one",
           "key j is read from the page of key j + 1: every page but the first is misplaced",
           [Edit(KERNEL, "p.pages[t.item[COL_PAGES] + j // p.page_size]",
                 "p.pages[t.item[COL_PAGES] + (j + 1) // p.page_size]")],
           ["tests/test_paged.py", "-k", "reference or paths"]),
    Mutant("paged-gemm-runs-past-the-page",
           "a key block's GEMM reads on past the end of a page into whatever lies after it",
           [Edit(KERNEL, "    return page_end if page_end < kb1 else kb1\n",
                 "    return kb1\n")],
           ["tests/test_paged.py", "-k", "reference or paths"]),
    Mutant("paged-table-rows-not-offset",
           "every sequence reads its pages from the first sequence's row of the block table",
           [Edit(PAGED, "np.repeat(np.arange(B, dtype=np.intp) * max_blocks, Hq)",
                 "np.repeat(np.arange(B, dtype=np.intp), Hq)")],
           ["tests/test_paged.py", "-k", "reference"]),
    Mutant("paged-range-check-misses-last-page",
           "a page number out of range in a sequence's partly filled last page is read",
           [Edit(PAGED, "used = np.arange(block_table.shape[1]) < (-(-seq_lens // block_size))",
                 "used = np.arange(block_table.shape[1]) < (seq_lens // block_size)")],
           ["tests/test_paged.py", "-k", "bad_input"]),
    Mutant("paged-copy-on-write-skipped",
           "a sequence writes into a page it shares: the other sequence's keys change",
           [Edit(CACHE, "                if count > 1:\n", "                if False:\n")],
           ["tests/test_paged.py", "-k", "fork"], quick=True),
    Mutant("paged-fork-copy-empty",
           "a forked sequence's copy of the partly filled last page holds no keys",
           [Edit(CACHE, "        self.keys[:, new] = self.keys[:, page]\n", "")],
           ["tests/test_paged.py", "-k", "fork"]),
    Mutant("paged-free-releases-shared-pages",
           "freeing a sequence returns pages another sequence still holds",
           [Edit(CACHE, "            if self.ref_counts[page] == 0:\n",
                 "            if True:\n")],
           ["tests/test_paged.py", "-k", "fork or free"]),
    # ------------------------------------------- float16, bfloat16 and int8 keys and values
    Mutant("f16-exponent-bias-off-by-one",
           "the portable float16 conversion halves every value (exponent bias 111, not 112)",
           [Edit(CONVERT, "bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);",
                 "bits = sign | ((exponent + 111u) << 23) | (mantissa << 13);")],
           ["tests/test_dtypes.py", "-k", "half_inputs and float16 and portable"]),
    Mutant("bf16-shift-by-15",
           "AVX-512 reads bfloat16 shifted by 15 bits instead of 16 (values garbled)",
           [Edit(GEMM, "_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))",
                 "_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 15))")],
           ["tests/test_dtypes.py", "-k", "half_inputs and bfloat16 and avx512"]),
    Mutant("converted-tail-drops-last-feature",
           "a float16/bfloat16/int8 row's last partial vector loses its last element",
           [Edit("src/cattn_gemm_impl.h",
                 "if (n_ > 0) memcpy(b_, (p), (size_t)(n_ < W ? n_ : W) * sizeof(ET_));",
                 "if (n_ > 0) memcpy(b_, (p), (size_t)(n_ < W ? n_ - 1 : W) * sizeof(ET_));"),
            # (Cython tracks cattn_gemm.h, not the headers it includes: this forces the build)
            Edit(GEMM, "/* The entry points: the plan's instruction set picks the instance. */",
                 "/* The entry points: the plan's instruction set picks the instance.  */")],
           ["tests/test_dtypes.py", "-k", "half_inputs and float16 and (avx2 or avx512)"]),
    Mutant("int8-key-scale-of-first-key",
           "every key's scores are scaled by the first key's scale",
           [Edit(KERNEL, "row[j] *= k_scale[j * p.k_scale_rs]", "row[j] *= k_scale[0]")],
           ["tests/test_dtypes.py", "-k", "int8"]),
    Mutant("int8-value-scale-in-the-weights",
           "int8 values' scales multiply P in place: returned weights carry them",
           [Edit(KERNEL, "scaled_row = t.p_scaled + r * p.scores_rs",
                 "scaled_row = <float*> probs + r * ld"),
            Edit(KERNEL, "        probs, ld = t.p_scaled, p.scores_rs\n", "")],
           ["tests/test_dtypes.py", "-k", "int8_is_exact"]),
    Mutant("quantize-kv-max-not-abs",
           "quantize_kv scales rows by their largest value, not magnitude: negatives clip",
           [Edit(DTYPES, "largest = np.max(np.abs(wide), axis=-1, initial=0.0)",
                 "largest = np.max(wide, axis=-1, initial=0.0)")],
           ["tests/test_dtypes.py", "-k", "quantize"], quick=True),
    Mutant("int8-cache-value-scales-not-stored",
           "an int8 KVCache keeps its value scales at 1 (values decoded 100x off)",
           [Edit(CACHE, "(self.key_scales, key_scales),\n                      "
                 "(self.value_scales, value_scales)]", "(self.key_scales, key_scales)]")],
           ["tests/test_dtypes.py", "-k", "cache"]),
    # ------------------------------------------------ edges where the easy case passes
    Mutant("varlen-gqa-heads-tiled",
           "packed grouped-query attention maps query head h to kv head h % Hkv (tiled) "
           "instead of h // group: wrong with several kv heads and groups > 1",
           [Edit(VARLEN, "    kv_head = head // group\n", "    kv_head = head % (Hq // group)\n")],
           ["tests/test_edges.py", "-k", "varlen_grouped"], quick=True),
    Mutant("varlen-lse-token-major",
           "a packed call's lse lands token-major (t * Hq + h), not heads first (h * Tq + t)",
           [Edit(VARLEN, "table[:, _Column.LSE] = head * Tq + cu_q[seq]",
                 "table[:, _Column.LSE] = cu_q[seq] * Hq + head")],
           ["tests/test_edges.py", "-k", "lse_values"]),
    Mutant("lse-row-one-past",
           "every item's lse is written one row late: its first row is never written and "
           "the last item's last row lands past the array (a value check, not a crash)",
           [Edit(KERNEL, "    return t.lse_row0 + r // t.member_rows * p.L + t.i0 + "
                         "r % t.member_rows\n",
                 "    return t.lse_row0 + r // t.member_rows * p.L + t.i0 + "
                 "r % t.member_rows + 1\n")],
           ["tests/test_edges.py", "-k", "lse_values"]),
    Mutant("dask-diagonal-pair-skipped",
           "a key chunk starting exactly on a query chunk's causal diagonal is skipped: the "
           "chunk's last query misses its own key",
           [Edit(DASK_PLAN, "q_pos - k_pos, kv_len, left, right)",
                 "q_pos - k_pos, kv_len, left, None if right is None else right - 1)")],
           ["tests/test_edges.py", "-k", "dask_chunk_boundary"], quick=True),
    Mutant("dask-window-edge-pair-skipped",
           "a key chunk ending exactly at a window's left edge is skipped",
           [Edit(DASK_PLAN, "q_pos - k_pos, kv_len, left, right)",
                 "q_pos - k_pos, kv_len, None if left is None else left - 1, right)")],
           ["tests/test_edges.py", "-k", "dask_chunk_boundary"]),
    Mutant("paged-truncate-keeps-a-page-too-many",
           "truncating to a page boundary (or to 0) keeps one more page: the pool leaks it "
           "and the next append writes after a page of stale keys",
           [Edit(CACHE, "keep = -(-length // self.block_size)",
                 "keep = length // self.block_size + 1")],
           ["tests/test_edges.py", "-k", "truncate"], quick=True),
    Mutant("paged-copy-on-write-not-counted",
           "an append's copies of shared pages are not counted before writing: out of blocks "
           "fails half-way (pages taken, lengths grown) with an IndexError",
           [Edit(CACHE, "        if len(plan) > cache.num_free_blocks:\n",
                 "        if sum(i >= len(s.pages) for s, i in plan) > cache.num_free_blocks:\n")],
           ["tests/test_edges.py", "-k", "copy_on_write"]),
    Mutant("bf16-query-through-float16",
           "bfloat16 queries are widened through float16: inf beyond 65504, lost below 6e-5",
           [Edit(PLAN, "return query.astype(np.float32, copy=False), narrow",
                 "return query.astype(np.float16).astype(np.float32), narrow")],
           ["tests/test_edges.py", "-k", "bfloat16_beyond"], quick=True),
    Mutant("bf16-output-through-float16",
           "a float32 result is narrowed to bfloat16 through float16 (inf beyond 65504)",
           [Edit(PLAN, "out = out.astype(self.result_dtype)",
                 "out = out.astype(np.float16).astype(self.result_dtype)")],
           ["tests/test_edges.py", "-k", "bfloat16_beyond"]),
    Mutant("threads-block-not-restored-on-exception",
           "`with cattn.threads(n)` left by an exception keeps n for every later call",
           [Edit(RUNTIME, "    try:\n        yield n\n    finally:\n"
                          "        _local.override = previous\n",
                 "    yield n\n    _local.override = previous\n")],
           ["tests/test_edges.py", "-k", "threads"], quick=True),
    Mutant("int8-cache-layers-share-first-scales",
           "every layer of an int8 KVCache reads layer 0's key scales",
           [Edit(CACHE, "self.key_scales = None if cache.key_scales is None else "
                         "cache.key_scales[index]",
                 "self.key_scales = None if cache.key_scales is None else cache.key_scales[0]")],
           ["tests/test_edges.py", "-k", "int8_cache"]),
    Mutant("encode-normalizes-last-batch-only",
           "normalize_embeddings=True scales only the last batch's rows to unit length",
           [Edit(SENTENCE, "        if normalize_embeddings:\n"
                           "            pooled = _unit_rows(pooled)\n",
                 "        if normalize_embeddings:\n"
                 "            pooled[chunk] = _unit_rows(pooled[chunk])\n")],
           ["tests/test_edges.py", "-k", "normalize_embeddings"], quick=True),
    Mutant("mean-pooling-over-padded-length",
           "the public mean_pooling divides by the padded length, not the real tokens",
           [Edit(MINILM, "return summed / np.maximum(mask.sum(axis=1), 1e-9)",
                 "return summed / mask.shape[1]")],
           ["tests/test_edges.py", "-k", "pooling_helpers"]),
    Mutant("encoder-truncation-left-to-the-tokenizer",
           "max_seq_length is not applied when the tokenizer does not truncate",
           [Edit(SENTENCE, "ids = [e.ids[:self.max_seq_length] for e in encodings]",
                 "ids = [e.ids for e in encodings]")],
           ["tests/test_edges.py", "-k", "truncation"]),
    Mutant("bert-token-types-ignored",
           "the encoder types every token 0 whatever token_type_ids says (sentence pairs)",
           [Edit(BERT, "x += encoder.token_type_embeddings[self.token_type_ids]",
                 "x += encoder.token_type_embeddings[0]")],
           ["tests/test_edges.py", "-k", "token_type"]),
    # ------------------------------------------- likeliest bugs of the public functions
    Mutant("dask-merge-keeps-two-parts-a-group",
           "a merge task of more than two key chunks merges only its first two",
           [Edit(DASK_GRAPH, "layers[node] = (_merge,) + tuple(group)",
                 "layers[node] = (_merge,) + tuple(group[:2])")],
           ["tests/test_dask.py", "-k", "merge_trees"]),
    Mutant("dask-gqa-heads-follow-kv-chunks",
           "with enable_gqa the output's head chunks are the key's, not the key's times the "
           "group: chunks and shape disagree",
           [Edit(DASK_PLAN, "batch_chunks.append(tuple(c * group for c in key.chunks[axis]))",
                 "batch_chunks.append(key.chunks[axis])")],
           ["tests/test_dask.py"]),
    Mutant("quantize-kv-floor",
           "quantize_kv rounds toward minus infinity: a bias of half a step per value",
           [Edit(DTYPES, "q = np.clip(np.rint(wide / scale", "q = np.clip(np.floor(wide / scale")],
           ["tests/test_dtypes.py", "-k", "quantize"]),
    Mutant("kvcache-reset-one-resets-all",
           "KVCache.reset(batch_index) forgets every sequence, not the one named",
           [Edit(CACHE, "self.lengths[:, batch_index] = 0", "self.lengths[...] = 0")],
           ["tests/test_kvcache.py", "tests/test_reliability.py", "-k", "reset"]),
    Mutant("set-num-threads-ignored",
           "cattn.set_num_threads(n) checks n and then keeps OpenMP's default",
           [Edit(RUNTIME, '_process_default = None if n is None else _check_count(n, '
                          '"set_num_threads(n): n")',
                 '_process_default = None if n is None else _check_count(n, '
                 '"set_num_threads(n): n") and None')],
           ["tests/test_reliability.py", "-k", "set_num_threads"], quick=True),
    Mutant("quantize-embeddings-rounds-not-floors",
           "int8/uint8 embedding quantization rounds to nearest (sentence-transformers "
           "floors): levels one step off",
           [Edit(SENTENCE, "levels = np.clip(np.floor((embeddings - ranges[0]) / steps), 0, 255)",
                 "levels = np.clip(np.rint((embeddings - ranges[0]) / steps), 0, 255)")],
           ["tests/test_sentence_encoder.py", "-k", "precisions"]),
    Mutant("cosine-similarity-left-unnormalized",
           "similarity(a, b) 'cosine' normalizes b only",
           [Edit(SENTENCE, "return _unit_rows(a) @ _unit_rows(b).T",
                 "return a @ _unit_rows(b).T")],
           ["tests/test_sentence_encoder.py", "-k", "similarity"]),
    Mutant("pool-mean-sqrt-len-is-the-mean",
           "pooling mean_sqrt_len_tokens divides the sum by n, not sqrt(n) (a .pyx bug)",
           [Edit("cattn/_encoder_ops.pyx", "scale = 1 / <floating>sqrt(<double>count)",
                 "scale = 1 / <floating>count")],
           ["tests/test_encoder_ops.py", "-k", "test_pool"]),
    Mutant("first-call-imports-numpy-ma",
           "every first call imports numpy.ma to recognise masked arrays (30-70 ms, most of "
           "a first call's cost)",
           [Edit("cattn/_validation.py", '    ma = sys.modules.get("numpy.ma")',
                 "    import numpy.ma as ma")],
           ["tests/test_blas_loading.py", "-k", "numpy_ma"]),
    Mutant("linear-token-split-bias-unshifted",
           "a decoder token's projection split over the threads adds the first thread's "
           "bias to every thread's outputs (wrong outputs past the first run of panels)",
           [Edit("cattn/_encoder_ops.pyx", "NULL if bias_p == NULL else bias_p + n0,",
                 "bias_p,")],
           ["tests/test_packed_linear.py", "-k", "fewer_rows_than_threads"]),
    Mutant("scalar-exp-coefficient-off",
           "the scalar float32 exp (the online softmax's rescaling factor) has a wrong "
           "Taylor coefficient: 1e-3 relative error once a row's maximum moves (a C header bug)",
           [Edit("src/cattn_simd.h", "    y = y * r + 5.0000001201E-1f;",
                 "    y = y * r + 4.9E-1f;")],
           ["tests/test_key_splits.py"]),
    Mutant("encode-token-embeddings-out-of-order",
           "output_value='token_embeddings' over several batches returns them in length "
           "order, not the input's",
           [Edit(SENTENCE, "for i, t in zip(chunk, batch_tokens):",
                 "for i, t in zip(sorted(chunk), batch_tokens):")],
           ["tests/test_sentence_encoder.py", "tests/test_edges.py", "-k",
            "token or encode"]),
    Mutant("sentence-pooling-in-the-given-order",
           "several pooling modes concatenated in the order given, not sentence-transformers' "
           "(cls, max, mean, mean_sqrt_len_tokens)",
           [Edit(SENTENCE, "self.pooling = tuple(m for m in POOLING_MODES if m in modes)",
                 "self.pooling = tuple(modes)")],
           ["tests/test_sentence_encoder.py", "tests/test_edges.py", "-k", "pooling"]),
    Mutant("euclidean-similarity-not-negated",
           "similarity 'euclidean' returns the distance: higher means less similar",
           [Edit(SENTENCE, "return -np.sqrt(np.maximum(squared, 0))",
                 "return np.sqrt(np.maximum(squared, 0))")],
           ["tests/test_sentence_encoder.py", "-k", "similarity"]),
    Mutant("paged-append-left-padding-ignored",
           "num_new < T appends the first num_new positions, not the last (left padding)",
           [Edit(CACHE, "step_of.append(np.arange(T - n, T))", "step_of.append(np.arange(n))")],
           ["tests/test_paged.py"]),
    Mutant("kvcache-append-left-padding-ignored",
           "KVCache.append with num_new < T writes the first positions, not the last",
           [Edit(CACHE, "stored[b, :, s:s + n] = new[b, :, T - n:]",
                 "stored[b, :, s:s + n] = new[b, :, :n]")],
           ["tests/test_kvcache.py", "tests/test_layers.py"]),
    Mutant("paged-for-layer-pages-rounded-down",
           "PagedKVCache.for_layer has max_len // block_size pages per sequence: a sequence "
           "of max_len positions runs out",
           [Edit(CACHE, "cache = cls(batch_size * -(-max_len // block_size)",
                 "cache = cls(batch_size * (max_len // block_size)")],
           ["tests/test_paged.py", "tests/test_edges.py", "-k", "for_layer or paged"]),
    Mutant("quantize-kv-zero-row-divides-by-zero",
           "a row of zeros gets scale 0: its int8 values are NaN cast to int8",
           [Edit(DTYPES, "scale[scale == 0] = 1", "pass")],
           ["tests/test_dtypes.py", "-k", "quantize"]),
    Mutant("dask-key-lengths-not-local-to-the-chunk",
           "each key chunk gets the global key length, not the part that lies in it",
           [Edit(DASK_GRAPH, "np.clip(block_len - k0, 0, k1 - k0), block_q + q0, block_k + k0)",
                 "np.clip(block_len, 0, k1 - k0), block_q + q0, block_k + k0)")],
           ["tests/test_dask.py"]),
    Mutant("paged-truncate-first-layer-only",
           "truncate shortens layer 0 only: the other layers keep the dropped positions",
           [Edit(CACHE, "        sequence.lengths[:] = length", "        sequence.lengths[0] = length")],
           ["tests/test_paged.py", "tests/test_edges.py", "-k", "truncat or several_layers"]),
    Mutant("paged-fork-shares-the-lengths",
           "a fork shares its source's length array: appending to one grows both",
           [Edit(CACHE, "self._seqs[dst] = _Sequence(pages, lengths.copy())",
                 "self._seqs[dst] = _Sequence(pages, lengths)")],
           ["tests/test_paged.py", "tests/test_edges.py", "-k",
            "fork or copy_on_write or several_layers"]),
    Mutant("mha-cross-attention-keys-and-values-swapped",
           "cross-attention with key is value (one fused K/V projection) swaps K and V",
           [Edit(LAYERS, "return q, kv_proj[..., :kv], kv_proj[..., kv:]",
                 "return q, kv_proj[..., kv:], kv_proj[..., :kv]")],
           ["tests/test_layers.py"]),
    Mutant("mha-two-bool-masks-intersected",
           "a key_padding_mask and a bool attn_mask hide a key only when both do",
           [Edit(LAYERS, "mask = ~parts[0] if len(parts) == 1 else ~(parts[0] | parts[1])",
                 "mask = ~parts[0] if len(parts) == 1 else ~(parts[0] & parts[1])")],
           ["tests/test_layers.py", "tests/test_edges.py", "-k", "mask"]),
    Mutant("mha-3d-mask-heads-major",
           "a (B·H, L, S) attn_mask is read head-major (h·B + b), not PyTorch's b·H + h",
           [Edit(LAYERS, "am = am.reshape(B, H, L, S)  # PyTorch's layout: item b·H + h",
                 "am = am.reshape(H, B, L, S).transpose(1, 0, 2, 3)")],
           ["tests/test_layers.py"]),
    Mutant("mha-qkv-projection-stand-in-ignored",
           "a stand-in Q/K/V projection (projections.in_proj) is ignored: the layer's float32 "
           "GEMM runs, and an int8 encoder's attention silently projects in float32",
           [Edit(LAYERS, "qkv = _project_rows(in_proj, query, E + 2 * kv)",
                 "qkv = _linear(query, self.in_proj_weight, self.in_proj_bias)")],
           ["tests/test_layers.py", "tests/test_int8_encoder.py", "-k", "projection or int8"]),
    Mutant("mha-cached-call-drops-qkv-projection",
           "decoding with a cache ignores projections.in_proj (the cache gets the layer's own "
           "float keys and values)",
           [Edit(LAYERS, "q, k, v = self._project(query, query, query, True, projections.in_proj)",
                 "q, k, v = self._project(query, query, query, True)")],
           ["tests/test_layers.py", "-k", "projection"]),
    Mutant("mha-output-projection-stand-in-ignored",
           "a stand-in output projection (projections.out_proj) is ignored: the layer's "
           "own runs",
           [Edit(LAYERS, "context = _project_rows(out_proj, context, self.embed_dim)",
                 "context = _linear(context, self.out_proj_weight, self.out_proj_bias)")],
           ["tests/test_layers.py", "-k", "projection"]),
    Mutant("bert-padded-int8-attention-in-float32",
           "the padded int8 encoder call projects Q/K/V in float32 (only the feed-forward "
           "runs int8)",
           [Edit(BERT, "projections = None if weights is None else "
                       "_int8_projections(self.attention, weights)",
                 "projections = None")],
           ["tests/test_int8_encoder.py"]),
    # ------------------------------------------------- a second audit's survivors, ahead
    Mutant("dask-causal-keeps-window-right",
           "under is_causal the Dask plan keeps a window's right side: every chunk pair just "
           "above the diagonal becomes a task that sees nothing",
           [Edit(DASK_PLAN, "right = 0 if right is None else min(right, 0)",
                 "right = 0 if right is None else right")],
           ["tests/test_dask.py", "-k", "right_side"]),
    Mutant("mha-two-additive-masks-keep-one",
           "a float key_padding_mask and a float attn_mask (or a scattered boolean padding "
           "beside a float attn_mask): the layer adds only the attn_mask",
           [Edit(LAYERS, "mask = additive[0] if len(additive) == 1 else additive[0] + additive[1]",
                 "mask = additive[-1]")],
           ["tests/test_layers.py", "-k", "masks_match"]),
    Mutant("paged-truncate-checks-the-longest-layer",
           "truncate checks the length against a sequence's longest layer: mid-step it gives "
           "a shorter layer positions it never wrote",
           [Edit(CACHE, "longest = int(sequence.lengths.min())",
                 "longest = int(sequence.lengths.max())")],
           ["tests/test_edges.py", "-k", "between_layers"]),
    Mutant("token-embeddings-calibration-ignored",
           "quantize_embeddings of a list of token embeddings ignores calibration_embeddings: "
           "int8/uint8 levels ranged over the list itself",
           [Edit(SENTENCE, "data = (np.concatenate(embeddings) if calibration_embeddings is None",
                 "data = (np.concatenate(embeddings) if True")],
           ["tests/test_sentence_encoder.py", "-k", "calibration_ranges"]),
    Mutant("encoder-do-lower-case-ignored",
           "do_lower_case is ignored: with a tokenizer that keeps case, 'The Dog' is not "
           "embedded as 'the dog'",
           [Edit(SENTENCE, "sentences = [s.lower() for s in sentences]",
                 "sentences = list(sentences)")],
           ["tests/test_edges.py", "-k", "keeps_case"]),
    Mutant("transformers-no-mask-window-one-wider",
           "a transformers layer called without a mask turns sliding_window into a causal "
           "window one key wider than transformers' sliding masks",
           [Edit(HF_BRIDGE, "window = (sliding_window - 1, 0) if causal else "
                            "(sliding_window, sliding_window)",
                 "window = (sliding_window, 0) if causal else (sliding_window, sliding_window)")],
           ["tests/test_transformers_bridge.py", "-k", "without_a_mask"]),
    Mutant("team-not-capped-at-twice-the-cores",
           "one call asking for many threads takes every worker the process budget has left "
           "(4 x cores + 1), not at most 2 x cores",
           [Edit(RUNTIME, "wanted = min(wanted, MAX_TEAM)", "pass")],
           ["tests/test_reliability.py", "-k", "twice_the_cores"]),
    Mutant("transformers-16-bit-additive-mask-not-widened",
           "a bfloat16 model's dense additive mask reaches cattn as bfloat16, which it refuses "
           "(TypeError) instead of adding it in float32",
           [Edit(HF_BRIDGE, "            mask = mask.float()  # additive",
                 "            pass  # additive")],
           ["tests/test_transformers_bridge.py", "-k", "bfloat16_model"]),
    Mutant("folder-do-lower-case-not-read",
           "a model folder's do_lower_case (sentence_bert_config.json) is never read: "
           "mixed-case text is embedded as the tokenizer sees it",
           [Edit(FOLDER, 'options["do_lower_case"] = bool(st_config.get("do_lower_case", False))',
                 'options["do_lower_case"] = False')],
           ["tests/test_sentence_encoder.py", "-k", "folder_options"]),
    Mutant("dask-key-chunks-without-k-offset",
           "each key chunk's task is placed at its start in the key array only, without the "
           "call's k_offset: causal and windowed chunks meet the wrong keys",
           [Edit(DASK_GRAPH, "block_q + q0, block_k + k0)", "block_q + q0, 0 * block_k + k0)")],
           ["tests/test_dask.py", "-k", "key_offsets_reach"]),
    Mutant("transformers-grouped-decode-ignores-k-offset",
           "decoding one token with grouped-query heads places the query at q_offset among "
           "the keys, forgetting k_offset: the wrong keys are sliced",
           [Edit(HF_BRIDGE, "position = int(q_offset) - int(k_offset)",
                 "position = int(q_offset)")],
           ["tests/test_transformers_bridge.py", "-k", "key_offset"]),
    Mutant("transformers-grouped-decode-takes-per-head-masks",
           "one-token grouped-query decoding takes a mask with a row per query head down the "
           "path for masks shared by every head: it no longer fits the grouped rows",
           [Edit(HF_BRIDGE, "and (mask is None or mask.shape[1] == 1) and", "and")],
           ["tests/test_transformers_bridge.py", "-k", "mask_per_query_head"]),
    Mutant("folder-similarity-function-not-read",
           "a model folder's similarity_fn_name (config_sentence_transformers.json) is never "
           "read: similarity() is cosine whatever the model says",
           [Edit(FOLDER, 'if st_options.get("similarity_fn_name"):', "if False:")],
           ["tests/test_sentence_encoder.py", "-k", "folder_options"]),
    Mutant("quantize-embeddings-constant-dimension-divides-by-zero",
           "int8/uint8 embedding quantization divides a constant dimension by its step 0: "
           "0 / 0 cast to an integer (undefined; NumPy warns)",
           [Edit(SENTENCE, "steps = np.where(steps == 0, 1, steps)", "pass")],
           ["tests/test_sentence_encoder.py", "-k", "constant_dimension"]),
    Mutant("binary-quantization-sets-zero-bits",
           "binary embedding quantization sets the bit of an exact 0 (x >= 0; "
           "sentence-transformers has x > 0)",
           [Edit(SENTENCE, "packed = np.packbits(embeddings > 0, axis=-1)",
                 "packed = np.packbits(embeddings >= 0, axis=-1)")],
           ["tests/test_sentence_encoder.py", "-k", "exact_zeros"]),
    Mutant("bert-refuses-max-position-embeddings-tokens",
           "the encoder refuses a sequence of exactly max_position_embeddings tokens, the "
           "model's own longest input",
           [Edit(BERT, "if L > cfg.max_position_embeddings:",
                 "if L >= cfg.max_position_embeddings:")],
           ["tests/test_sentence_encoder.py", "-k", "exactly_max_position"]),
]


# --------------------------------------------------------------------------- machinery

def module_of(mutant):
    """The module a mutant breaks: its first edit's file (where its text is now), as a
    dotted name for Python and Cython sources (cattn/models/* together), as a path for C
    headers and the rest."""
    try:
        path = locate(ROOT, mutant, mutant.edits[0])
    except ValueError:
        path = mutant.edits[0].path
    if path.startswith("cattn/models/"):
        return "cattn.models"
    if path.startswith("cattn/") and path.endswith((".py", ".pyx")):
        return path.rsplit(".", 1)[0].replace("/", ".")
    return path


def scores_by_module(results):
    """Lines 'module: killed of n' for (mutant, status, detail) results, by module."""
    by_module = {}
    for mutant, status, _ in results:
        killed, total = by_module.get(module_of(mutant), (0, 0))
        by_module[module_of(mutant)] = (killed + (status == "killed"), total + 1)
    width = max(map(len, by_module), default=0)
    return [f"  {module:<{width}}  {killed:>3} of {total:>3} killed"
            for module, (killed, total) in sorted(by_module.items())]


def copy_tree(src, dst):
    def ignore(directory, names):
        return [n for n in names if n in SKIP_NAMES or n.endswith(".egg-info")]
    shutil.copytree(src, dst, ignore=ignore, symlinks=True)


def _read(tree, path):
    try:
        with open(os.path.join(tree, path), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _sources(tree, like):
    """The tree's source files of the same kind as `like` (Python and Cython modules, C
    headers), where an edit's text may have moved: never generated .c files or builds."""
    kinds = (".h",) if like.endswith(".h") else (".py", ".pyx", ".pxd")
    found = []
    for top in ("cattn", "src"):
        for directory, dirs, files in os.walk(os.path.join(tree, top)):
            dirs[:] = [d for d in dirs if d not in SKIP_NAMES]
            found += [os.path.relpath(os.path.join(directory, f), tree) for f in files
                      if f.endswith(kinds)]
    return sorted(found)


def locate(tree, mutant, edit):
    """The file of `tree` that holds the edit's text exactly once: its named file, or, when
    the code has moved to another module, the one source file that holds it. Raises
    ValueError ("mutant did not apply") when no file, or more than one, does."""
    text = _read(tree, edit.path)
    count = 0 if text is None else text.count(edit.find)
    if count == 1:
        return edit.path
    holders = [path for path in _sources(tree, edit.path)
               if (_read(tree, path) or "").count(edit.find) == 1]
    if len(holders) == 1 and count == 0:
        return holders[0]
    where = (f"occurs {count} times in {edit.path}" if text is not None
             else f"has no file {edit.path}")
    raise ValueError(f"mutant did not apply: {mutant.name}: the text to replace {where} "
                     f"(expected once) and once in {len(holders)} other source files "
                     f"(expected one: the module it moved to):\n{edit.find}")


def check_mutants(tree=ROOT, mutants=None):
    """Problems (strings) that keep mutants from applying to `tree` as written: an edit
    whose text is not exactly once in its named file (after the mutant's earlier edits,
    as apply() makes them), a test file that does not exist, a name used twice. Reads
    files only: no copy, no build, no test run."""
    mutants = MUTANTS if mutants is None else mutants
    problems = []
    seen = set()
    for m in mutants:
        if m.name in seen:
            problems.append(f"{m.name}: the name is used by another mutant too")
        seen.add(m.name)
        if not m.edits:
            problems.append(f"{m.name}: no edits")
        texts = {}
        for n, edit in enumerate(m.edits, 1):
            text = texts.get(edit.path, _read(tree, edit.path))
            if text is None:
                problems.append(f"{m.name}: edit {n}: no file {edit.path}")
                continue
            count = text.count(edit.find)
            if count != 1:
                holders = [path for path in _sources(tree, edit.path) if path != edit.path
                           and edit.find in (_read(tree, path) or "")]
                where = f" (now in {', '.join(holders)})" if holders else ""
                problems.append(f"{m.name}: edit {n}: its text occurs {count} times in "
                                f"{edit.path}, expected once{where}:\n    "
                                + edit.find[:200].replace("\n", "\n    "))
                continue
            if edit.find == edit.replace:
                problems.append(f"{m.name}: edit {n} changes nothing")
            texts[edit.path] = text.replace(edit.find, edit.replace)
        for arg in m.tests:
            if arg.startswith("tests/") or arg.endswith(".py") or "::" in arg:
                if not os.path.isfile(os.path.join(tree, arg.split("::")[0])):
                    problems.append(f"{m.name}: no test file {arg.split('::')[0]}")
        if "-k" in m.tests and m.tests[-1] == "-k":
            problems.append(f"{m.name}: -k without an expression")
    return problems


def apply(mutant, tree):
    """Apply the mutant's edits in `tree`; returns whether the compiled core changed."""
    rebuild = False
    for edit in mutant.edits:
        path = locate(tree, mutant, edit)
        text = _read(tree, path)
        with open(os.path.join(tree, path), "w", encoding="utf-8") as f:
            f.write(text.replace(edit.find, edit.replace))
        rebuild |= needs_build(tree, path)
    return rebuild


def needs_build(tree, path):
    """Whether an edit of `path` needs the build: C, Cython and setup.py, and a Python
    module that setup.py compiles (its built module shadows the .py)."""
    return bool(COMPILED.search(path)) or (
        path.endswith(".py") and bool(glob.glob(os.path.join(tree, path[:-3]) + ".*.so")))


def child_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CI")}
    env.update(extra or {})
    return env


# Environment variables setup.py reads: a mutant's build with one of them is a full build.
BUILD_FLAGS = {"CATTN_EMULATE_ISA", "CATTN_DEBUG", "CATTN_NO_OPENMP", "CATTN_CFLAGS"}


def build(tree, env, force=False):
    """Build in place; incremental (only what changed) unless forced (build flags changed)."""
    command = [sys.executable, "setup.py", "build_ext", "--inplace", "-q"]
    proc = subprocess.run(command + (["--force"] if force else []), cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"build failed in {tree}:\n{proc.stdout[-3000:]}"
                           f"{proc.stderr[-3000:]}")


def default_sigint():
    """In the test process: SIGINT raises KeyboardInterrupt even when this script runs in
    the background (where the shell ignores SIGINT and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_tests(tree, args, env):
    """(pytest exit code, its last lines) for the tests `args` run in `tree`."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           "-p", "no:randomly", *args], cwd=tree, env=env,
                          capture_output=True, text=True,
                          preexec_fn=default_sigint if os.name == "posix" else None)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines


def first_failure(lines):
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            return line[:160]
    return lines[-1][:160] if lines else ""


def check_imports_its_own_copy(tree, env):
    proc = subprocess.run([sys.executable, "-c", "import cattn; print(cattn.__file__)"],
                          cwd=tree, env=env, capture_output=True, text=True)
    where = proc.stdout.strip()
    if proc.returncode or not os.path.realpath(where).startswith(os.path.realpath(tree)):
        raise RuntimeError(f"the copy in {tree} imports cattn from {where!r} "
                           f"{proc.stderr[-1000:]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--quick", action="store_true",
                        help="run only the mutants marked quick (a subset for CI)")
    parser.add_argument("--module", nargs="+", metavar="MODULE",
                        help="run only the mutants of these modules (as --list names them)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip checking that the unmutated copy passes the tests")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant's edits apply exactly once in "
                             "their named files and its test files exist (no copy, build "
                             "or test run); exit 1 listing the stale ones")
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.quick:
        mutants = [m for m in mutants if m.quick]
    if args.module:
        unknown = set(args.module) - {module_of(m) for m in MUTANTS}
        if unknown:
            parser.error(f"no mutants in modules: {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if module_of(m) in args.module]
    if args.check:
        problems = check_mutants(ROOT, mutants)
        if problems:
            print("\n".join(problems) + f"\n\n{len(problems)} problems: update these mutants "
                  f"to the code as it is now")
            return 1
        print(f"{len(mutants)} mutants, {sum(len(m.edits) for m in mutants)} edits: each "
              f"applies exactly once, every test file exists")
        return 0
    if args.list:
        for m in mutants:
            files = sorted({e.path for e in m.edits})
            print(f"{m.name}{'  (quick)' if m.quick else ''}\n    module: {module_of(m)}\n"
                  f"    bug:    {m.bug}\n    edits:  {', '.join(files)}\n"
                  f"    tests:  {' '.join(m.tests)}")
        print(f"\n{len(mutants)} mutants")
        return 0

    # Every mutant applies to the tree as it is (fail before spending any time).
    stale = []
    for m in mutants:
        for edit in m.edits:
            try:
                locate(ROOT, m, edit)
            except ValueError as e:
                stale.append(str(e))
    if stale:
        print("\n\n".join(stale) + "\n\nupdate these mutants to the code as it is now")
        return 2

    work = tempfile.mkdtemp(prefix="cattn-mutants-")
    base = os.path.join(work, "base")
    start = time.perf_counter()
    results = []
    try:
        copy_tree(ROOT, base)
        build(base, child_env())
        check_imports_its_own_copy(base, child_env())
        if not args.no_baseline:
            selections = {}  # each distinct selection once
            for m in mutants:
                selections.setdefault((tuple(m.tests), tuple(sorted(m.env.items()))), m)
            # (a selection whose environment sets a build flag runs on an unmutated copy
            # built with it: tests that skip on the plain build must pass on that one)
            flagged_bases = {}
            for m in selections.values():
                flags = tuple(sorted((k, v) for k, v in m.env.items() if k in BUILD_FLAGS))
                if flags and flags not in flagged_bases:
                    flagged = os.path.join(work, "base-" + "-".join(k for k, _ in flags))
                    copy_tree(base, flagged)
                    build(flagged, child_env(m.env), force=True)
                    flagged_bases[flags] = flagged
            for m in selections.values():
                flags = tuple(sorted((k, v) for k, v in m.env.items() if k in BUILD_FLAGS))
                tree = flagged_bases.get(flags, base)
                code, lines = run_tests(tree, m.tests, child_env(m.env))
                if code != 0:  # a timing test on a loaded machine: one more try
                    print(f"baseline: {m.name}'s tests failed once, retrying: "
                          f"{first_failure(lines)}", flush=True)
                    code, lines = run_tests(tree, m.tests, child_env(m.env))
                if code != 0:
                    print(f"the unmutated tree fails the tests of {m.name} "
                          f"({' '.join(m.tests)}): {first_failure(lines)}")
                    return 2
            print(f"baseline: the unmutated copy passes every mutant's tests "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        for m in mutants:
            t0 = time.perf_counter()
            tree = os.path.join(work, m.name)
            copy_tree(base, tree)
            env = child_env(m.env)
            try:
                # (a build flag in the mutant's environment rebuilds every module with it)
                if apply(m, tree) or m.env.keys() & BUILD_FLAGS:
                    build(tree, env, force=any(e.path == "setup.py" for e in m.edits)
                          or bool(m.env.keys() & BUILD_FLAGS))
                code, lines = run_tests(tree, m.tests, env)
                if code == 1:
                    status, detail = "killed", first_failure(lines)
                elif code < 0:  # the tests crashed the interpreter (a signal): caught too
                    status, detail = "killed", f"crashed (signal {-code}) in {' '.join(m.tests)}"
                    # (the debug build's bounds checks name the access they aborted on)
                    detail += "".join(f": {line}" for line in lines
                                      if line.startswith("cattn debug build:"))[:300]
                elif code == 0:
                    status, detail = "SURVIVED", lines[-1] if lines else ""
                else:
                    status, detail = "ERROR", f"pytest exit {code}: {first_failure(lines)}"
            except (RuntimeError, ValueError) as e:
                status, detail = "ERROR", str(e).splitlines()[0]
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
            results.append((m, status, detail))
            print(f"{status:<9} {m.name} ({time.perf_counter() - t0:.0f} s): {detail}",
                  flush=True)
    finally:
        if args.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    killed = sum(status == "killed" for _, status, _ in results)
    print("\nby module:\n" + "\n".join(scores_by_module(results)))
    print(f"\n{killed} of {len(results)} mutants killed in "
          f"{time.perf_counter() - start:.0f} s")
    for m, status, detail in results:
        if status != "killed":
            print(f"  {status}: {m.name}: {detail}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

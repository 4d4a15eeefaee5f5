#!/usr/bin/env bash
# Build cattn with AddressSanitizer + UndefinedBehaviorSanitizer in a temporary copy of this
# tree and run the test suite against that build. The in-place build of the tree itself is
# never touched.
#
#   scripts/sanitize.sh                     # the default suite (as CI runs it)
#   scripts/sanitize.sh tests/test_bad_input.py -x   # any pytest arguments
#   PYTHON=/path/to/python scripts/sanitize.sh       # another interpreter (default: python3)
#   KEEP=1 scripts/sanitize.sh              # keep the temporary copy (its path is printed)
#
# Needs gcc with the sanitizer runtimes (libasan, libubsan). Python itself is not
# instrumented: libasan is preloaded so that it starts first (with libstdc++, or C++
# exceptions thrown in other extensions, matplotlib's for one, make ASan abort), leak
# detection is off (the interpreter keeps memory until exit by design), and malloc may
# return NULL so that the tests of impossible allocations get their MemoryError. Any ASan
# or UBSan report aborts the run with a non-zero status; the reports are written to files
# (pytest would swallow them with the output of the aborted process) and printed at the end.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
CC=${CC:-gcc}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cattn-sanitize.XXXXXX")
if [ -z "${KEEP:-}" ]; then
  trap 'rm -rf "$WORK"' EXIT
fi
START=$(date +%s)

# ---- a copy of the sources (tracked and new files; no build products)
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
     | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK"
else
  tar -C "$REPO" --exclude=build --exclude='*.so' --exclude='cattn/_kernel.c' -cf - . \
    | tar -xf - -C "$WORK"
fi
echo "sanitize: sources copied to $WORK"

# ---- the instrumented build (-O1 -g: readable reports; -fno-omit-frame-pointer: stacks)
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
(
  cd "$WORK"
  CC="$CC" CATTN_CFLAGS="$SAN -O1 -g" LDFLAGS="-fsanitize=address,undefined" \
    "$PYTHON" setup.py build_ext --inplace -q >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; echo "sanitize: build failed" >&2; exit 1; }
)
SO=$(ls "$WORK"/cattn/_kernel*.so)
if ! nm -D "$SO" | grep __asan_init >/dev/null; then
  echo "sanitize: $SO is not instrumented" >&2
  exit 1
fi
LIBASAN=$("$CC" -print-file-name=libasan.so)
LIBSTDCXX=$("$CC" -print-file-name=libstdc++.so)
if [ ! -e "$LIBASAN" ]; then
  echo "sanitize: $CC has no libasan.so (install the sanitizer runtime)" >&2
  exit 1
fi
echo "sanitize: built in $(( $(date +%s) - START )) s; running the tests"

# ---- the tests, against the instrumented build only (run from the copy, which comes
# first on the path; the check below makes sure of it)
cd "$WORK"
export LD_PRELOAD="$LIBASAN${LIBSTDCXX:+ $LIBSTDCXX}"
REPORTS="$WORK/sanitizer-report"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:log_path=$REPORTS"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS"
export PYTHONMALLOC=malloc  # every Python allocation through ASan's malloc
export PYTHONPATH="$WORK"
"$PYTHON" -c "
import cattn, sys
assert cattn.__file__.startswith('$WORK'), cattn.__file__
print('sanitize: testing', cattn.__file__)
"
set +e
"$PYTHON" -m pytest -p no:cacheprovider -q "${@:-tests}"
status=$?
set -e
unset LD_PRELOAD
# Reports: errors fail the run; warnings (an impossible allocation refused, as the
# MemoryError tests ask) are only counted.
warnings=0
for report in "$REPORTS".*; do
  [ -e "$report" ] || continue
  if grep -E "ERROR: |runtime error|CHECK failed|SUMMARY: " "$report" >/dev/null; then
    echo "sanitize: ---- $report"
    cat "$report"
    [ "$status" -ne 0 ] || status=1
  else
    warnings=$(( warnings + $(wc -l <"$report") ))
  fi
done
[ "$warnings" -eq 0 ] || echo "sanitize: $warnings sanitizer warning lines (refused allocations)"
echo "sanitize: exit status $status after $(( $(date +%s) - START )) s"
exit $status

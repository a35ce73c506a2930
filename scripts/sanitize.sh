#!/usr/bin/env bash
# Runs GPU fixtures under compute-sanitizer (memcheck and racecheck) on the GPU machine, following every
# rank process, and prints each tool's error summary. Exits non-zero if any tool reports an error.
#   there: scripts/device.sh run -- scripts/sanitize.sh [ranks]        (logs under $OUT or /tmp)
# Kernels run far slower under the sanitizer, so device waits get a long bound (TSEP_TIMEOUT_S=300).
set -uo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
logs=${OUT:-/tmp}/sanitizer
mkdir -p "$logs"
if ! command -v compute-sanitizer >/dev/null; then
  echo "sanitize: compute-sanitizer not found on PATH" >&2
  exit 2
fi
export TSEP_TIMEOUT_S=300
status=0
fixtures=(
  "test/gpu/fixtures/normal-check.ts 1 tiny"
  "test/gpu/fixtures/ll-check.ts 1 quick"
)
for tool in memcheck racecheck; do
  for f in "${fixtures[@]}"; do
    name=$(basename "${f%% *}" .ts)
    log="$logs/$tool-$name"
    # shellcheck disable=SC2086
    compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 99 --log-file "$log.%p.log" \
      node src/cli/main.ts launch -n "$ranks" --timeout 1200 -- node $f >"$log.out" 2>&1
    rc=$?
    summary=$(cat "$log".*.log 2>/dev/null | grep -h "ERROR SUMMARY" | sort | uniq -c | tr '\n' ';')
    echo "sanitize: $tool $name (ranks $ranks): exit $rc; ${summary:-no summary (see $log.out)}"
    [ "$rc" -eq 0 ] || status=1
  done
done
exit $status

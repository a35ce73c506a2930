#!/usr/bin/env bash
# Runs GPU fixtures under compute-sanitizer (memcheck and racecheck), one sanitizer per rank process, and
# prints each tool's error summary. Exits non-zero if any tool reports an error or a rank logged nothing.
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
    rm -f "$log".rank*.log
    # Each rank runs under its own sanitizer (following a launcher that spawns wrappers that spawn the ranks
    # did not reach the ranks): a log per rank, named by the RANK the launcher gives it.
    # shellcheck disable=SC2016,SC2086
    node src/cli/main.ts launch -n "$ranks" --timeout 1200 -- bash -c \
      'exec compute-sanitizer --tool "$1" --error-exitcode 99 --log-file "$2.rank$RANK.log" node ${@:3}' \
      sanitize "$tool" "$log" $f >"$log.out" 2>&1
    rc=$?
    summary=$(cat "$log".rank*.log 2>/dev/null | grep -h -E "(ERROR|RACECHECK) SUMMARY" | sort | uniq -c | tr '\n' ';')
    logged=$(ls "$log".rank*.log 2>/dev/null | wc -l)
    echo "sanitize: $tool $name (ranks $ranks, $logged rank logs): exit $rc; ${summary:-no summary}"
    # One file per check (the device tool returns few files): the run's output, then every rank's log.
    for l in "$log".rank*.log; do
      [ -e "$l" ] && { echo "=== $l"; cat "$l"; } >>"$log.out" && rm -f "$l"
    done
    [ "$rc" -eq 0 ] && [ "$logged" -eq "$ranks" ] || status=1
  done
done
exit $status

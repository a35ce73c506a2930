#!/usr/bin/env bash
# The GPU machine's work in stages that each fit one device call (≤ 10 minutes), logs under $OUT (or /tmp):
#   scripts/device.sh run -- scripts/gpu-suite.sh tests        smoke, process group, normal-mode tests (SM send)
#   scripts/device.sh run -- scripts/gpu-suite.sh tests-ce     normal-mode tests with the copy-engine combine
#   scripts/device.sh run -- scripts/gpu-suite.sh tests2       low-latency (both transports), failure tests
#   scripts/device.sh run -- scripts/gpu-suite.sh tests3       2 virtual hosts × 2 ranks (needs 4 GPUs)
#   scripts/device.sh run -- scripts/gpu-suite.sh benches      normal (NVLink + NCCL-transport columns, per-
#                                                               kernel profile) and low-latency benches, EP=all GPUs
#   scripts/device.sh run -- scripts/gpu-suite.sh decide       24 SMs: the defaults and one alternative per knob, + LL
#   scripts/device.sh run -- scripts/gpu-suite.sh splits       bench normal with other SM splits beside the sends
#   scripts/device.sh run -- scripts/gpu-suite.sh copy-engines the copy engines' all-to-all (bench/tools/peer-bandwidth.cu)
#                                                               and bench normal with the copy-engine combine, P = 0, 4, 16
#   scripts/device.sh run -- scripts/gpu-suite.sh unroll       bench normal with TSEP_NORMAL_UNROLL 4, 8 (default), 16
#   scripts/device.sh run -- scripts/gpu-suite.sh soak         soak (10,000 iterations, alternating modes)
#   scripts/device.sh run -- scripts/gpu-suite.sh sanitize     compute-sanitizer memcheck and racecheck, 2 ranks
#   scripts/device.sh run -- scripts/gpu-suite.sh shared       one-GPU machine: the multi-rank tests with ranks
#                                                               sharing the GPU (TSEP_TEST_SHARE_GPUS=1; NCCL skips)
# Each step has its own time limit, so one slow step cannot eat the others' time; every step's summary
# lines are printed, the whole log is in $OUT/<step>.log. Record the numbers in bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
status=0

step() {
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s, $(date +%T))"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "--- $name: exit $rc after $(($(date +%s) - t0)) s"
  grep -E "^(✔|✖|﹣)|ℹ (tests|pass|fail|skipped)|^\[rank 0\] (dispatch|combine|layout|op|best|tsep|device time|  )|all ok|soak|sanitize:|rror" \
    "$out/$name.log" | head -60
  [ "$rc" -eq 0 ] || status=1
}


case "${1:-}" in
  tests)
    step smoke-pg 120 node --test --test-reporter=spec test/gpu/smoke.test.ts test/gpu/process-group.test.ts
    # TEST_PATTERN (e.g. "4 ranks") narrows the normal-mode tests to what still needs running; the
    # copy-engine cases have their own stage (the whole file takes longer than one device call).
    step normal 560 node --test --test-concurrency=1 --test-reporter=spec \
      --test-name-pattern="${TEST_PATTERN:-^normal mode(,| over NCCL)}" test/gpu/normal.test.ts
    ;;
  tests-ce)
    step normal-ce 560 node --test --test-concurrency=1 --test-reporter=spec \
      --test-name-pattern="copy-engine combine${TEST_PATTERN:+.*$TEST_PATTERN}" test/gpu/normal.test.ts
    ;;
  tests2)
    step low-latency 440 node --test --test-concurrency=1 --test-reporter=spec test/gpu/low-latency.test.ts
    step failure 140 node --test --test-concurrency=1 --test-reporter=spec test/gpu/failure.test.ts
    ;;
  tests3)
    step virtual-hosts 560 node --test --test-concurrency=1 --test-reporter=spec test/gpu/virtual-hosts.test.ts
    ;;
  benches)
    step bench-normal 240 env TSEP_PROFILE=1 TSEP_BENCH_OUT="$out/normal.json" node src/cli/main.ts bench normal -n "$gpus" --timeout 230 -- --sms 24,32 --iters 20
    step bench-ll 120 env TSEP_BENCH_OUT="$out/low-latency.json" node src/cli/main.ts bench low-latency -n "$gpus" --timeout 110
    ;;
  decide)
    # One call for the defaults' open questions at 24 SMs (the issues' budget): the defaults with NCCL's
    # columns and the per-kernel profile, then one alternative each — the old 50 % reduce share, a 25 %
    # share, 16 loads per lane, the copy-engine combine — then the low-latency bench.
    step decide-default 150 env TSEP_PROFILE=1 TSEP_BENCH_OUT="$out/normal.json" node src/cli/main.ts bench normal -n "$gpus" \
      --timeout 140 -- --sms 24 --iters 20
    for alt in TSEP_NORMAL_REDUCE_PCT=50 TSEP_NORMAL_REDUCE_PCT=25 TSEP_NORMAL_UNROLL=16 TSEP_NORMAL_COMBINE_PIECES=4; do
      name=${alt#TSEP_NORMAL_}
      step "decide-${name/=/-}" 90 env "$alt" node src/cli/main.ts bench normal -n "$gpus" --timeout 80 -- \
        --sms 24 --iters 20 --no-nccl --no-nccl-transport
    done
    step decide-ll 90 env TSEP_BENCH_OUT="$out/low-latency.json" node src/cli/main.ts bench low-latency -n "$gpus" --timeout 80
    ;;
  splits)
    # The SM split beside the sends: the defaults (33 % receive, 33 % reduce) against the old 50 % reduce
    # and two narrower splits, in one call.
    for split in "33 33" "33 50" "25 25" "20 20"; do
      read -r rp dp <<<"$split"
      step "bench-normal-split-$rp-$dp" 120 env TSEP_NORMAL_RECV_PCT="$rp" TSEP_NORMAL_REDUCE_PCT="$dp" \
        TSEP_BENCH_OUT="$out/normal-split-$rp-$dp.json" node src/cli/main.ts bench normal -n "$gpus" --timeout 110 -- \
        --sms 24,32 --iters 20 --no-nccl-transport
    done
    ;;
  copy-engines)
    step peer-bandwidth-ce 150 bash -c "nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/peer-bandwidth bench/tools/peer-bandwidth.cu && /tmp/peer-bandwidth 14336 ce"
    grep -E "^(ce|16-SM|G=)" "$out/peer-bandwidth-ce.log"
    for p in 0 4 16; do
      step "bench-normal-pieces-$p" 120 env TSEP_PROFILE=1 TSEP_NORMAL_COMBINE_PIECES="$p" \
        TSEP_BENCH_OUT="$out/normal-pieces-$p.json" node src/cli/main.ts bench normal -n "$gpus" --timeout 110 -- \
        --sms 24,32 --iters 20 --no-nccl-transport
    done
    ;;
  unroll)
    # Loads per lane in flight in the send copies and the reduce (default 8; chosen at one rank, where the
    # copies are local): does NVLink want more or fewer?
    for u in 4 8 16; do
      step "bench-normal-unroll-$u" 150 env TSEP_PROFILE=1 TSEP_NORMAL_UNROLL="$u" TSEP_BENCH_OUT="$out/normal-unroll-$u.json" \
        node src/cli/main.ts bench normal -n "$gpus" --timeout 140 -- --sms 24,32 --iters 20 --no-nccl-transport
    done
    ;;
  soak)
    # 10,000 iterations took 180 s on x4 (2026-11-28, run 8); the limit leaves room for slower machines.
    step soak 585 env TSEP_BENCH_OUT="$out/soak.json" node src/cli/main.ts bench soak -n "$gpus" --timeout 575
    ;;
  sanitize)
    step sanitize 400 scripts/sanitize.sh 2
    ;;
  shared)
    # Step limits from the one-GPU runs of 2026-11-28/29: about 20, 55, 85 (2 ranks ≈65; 1 rank ≈20, an
    # estimate from its normal-check run), 45 and 125 s
    # (≈330 s in all; the limits are for a slow machine and add up to more than one device call).
    export TSEP_TEST_SHARE_GPUS=1
    step failure 90 node --test --test-concurrency=1 --test-reporter=spec test/gpu/failure.test.ts
    step low-latency 120 node --test --test-concurrency=1 --test-reporter=spec test/gpu/low-latency.test.ts
    step normal 150 node --test --test-concurrency=1 --test-reporter=spec --test-name-pattern="^normal mode, (1 rank|2 ranks)" \
      test/gpu/normal.test.ts
    step normal-ce 100 node --test --test-concurrency=1 --test-reporter=spec \
      --test-name-pattern="copy-engine combine on even ranks, 2 ranks" test/gpu/normal.test.ts
    step virtual-hosts 240 node --test --test-concurrency=1 --test-reporter=spec test/gpu/virtual-hosts.test.ts
    ;;
  *)
    echo "usage: scripts/gpu-suite.sh tests|tests-ce|tests2|tests3|benches|decide|splits|copy-engines|unroll|soak|sanitize|shared" >&2
    exit 2
    ;;
esac
exit $status

#!/usr/bin/env bash
# Compiles every kernels/*.cu for sm_90a with nvcc, as the run-time compiler would, so a kernel that does
# not build fails CI even on machines without a GPU; then the same specializations through the library's
# own NVRTC path (scripts/check-nvrtc.ts) where an NVRTC is found. Skips (exit 0, with a message) where nvcc
# is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then NVCC="$d/bin/nvcc"; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "check:kernels: skipped, nvcc not found (looked on PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Sources that always need NVSHMEM's headers (built in the NVSHMEM section below).
needs_nvshmem() { grep -qE '^#include (<nvshmem.h>|"engine.cuh")' "$1"; }
# unpack_wheel WHEEL DEST PATTERN...: the members whose path contains one of the patterns.
unpack_wheel() {
  command -v python3 >/dev/null || return 1
  python3 -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if any(p in n for p in sys.argv[3:])])' "$@"
}
n=0
for f in kernels/*.cu; do
  if needs_nvshmem "$f"; then continue; fi
  "$NVCC" -cubin -gencode=arch=compute_90a,code=sm_90a -std=c++17 -Werror all-warnings \
    -o "$out/$(basename "$f" .cu).cubin" "$f"
  echo "check:kernels: ok $f"
  n=$((n + 1))
done
# Specializations the library really compiles, beyond each file's defaults: EP8 FP8 with scales and int32
# ids, a cached dispatch / weightless combine (no top-k), and the copy-unroll knob's ends; the low-latency
# NCCL kernels at EP16 over two hosts (offsets from src/ep/gpu/ll-nccl-layout.ts) and at EP2, top-1.
variants=(
  "normal.cu -DTSEP_R=8 -DTSEP_EL=32 -DTSEP_H=7168 -DTSEP_ELT=1 -DTSEP_SW=56 -DTSEP_K=8 -DTSEP_IDX64=0 -DTSEP_WEIGHTS=1 -DTSEP_TMAX=4096"
  "normal.cu -DTSEP_R=4 -DTSEP_EL=64 -DTSEP_H=7168 -DTSEP_ELT=2 -DTSEP_SW=0 -DTSEP_K=0 -DTSEP_WEIGHTS=0 -DTSEP_TMAX=4096"
  "normal.cu -DTSEP_R=2 -DTSEP_H=2560 -DTSEP_UNROLL=1"
  "normal.cu -DTSEP_R=4 -DTSEP_H=4096 -DTSEP_UNROLL=16"
  "layout.cu -DTSEP_R=8 -DTSEP_EL=32 -DTSEP_IDX64=0"
  "ll_nccl.cu -DLL_R=16 -DLL_EL=18 -DLL_H=4096 -DLL_TMAX=256 -DLL_KMAX=8 -DLLN_ROUTE=128 -DLLN_MSGS=8320 -DLLN_CROWS=128"
  "ll_nccl.cu -DLL_R=2 -DLL_EL=4 -DLL_H=2048 -DLL_TMAX=7 -DLL_KMAX=1 -DLLN_ROUTE=128 -DLLN_MSGS=256 -DLLN_CROWS=128"
)
for v in "${variants[@]}"; do
  read -r file defines <<<"$v"
  # shellcheck disable=SC2086
  "$NVCC" -cubin -gencode=arch=compute_90a,code=sm_90a -std=c++17 -Werror all-warnings $defines \
    -o "$out/variant.cubin" "kernels/$file"
  echo "check:kernels: ok $file $defines"
done
# The diagnostic programs in bench/tools (host + device, run by hand on the GPU machine) must keep building
# against the kernels they include.
for f in bench/tools/*.cu; do
  case "$f" in bench/tools/nvshmem-*) continue ;; esac # device code for the JIT, checked below
  "$NVCC" -O3 -arch=sm_90a -std=c++17 -I kernels -o "$out/tool" "$f"
  echo "check:kernels: ok $f (program)"
done
# NVSHMEM's headers (for the sources below), from the folders the library itself searches, in its order
# (src/native/nvshmem.ts nvshmemHomeCandidates: TSEP_NVSHMEM_HOME alone, else NVSHMEM_HOME, the wheel's).
nvshmem=""
candidates=$(node --input-type=module -e \
  'const m = await import(process.argv[1]); console.log(m.nvshmemHomeCandidates().join("\n"));' \
  "$PWD/src/native/nvshmem.ts" 2>/dev/null || true)
while IFS= read -r d; do
  if [ -n "$d" ] && [ -f "$d/include/nvshmem.h" ]; then nvshmem="$d"; break; fi
done <<<"$candidates"
# No install, but the nvidia-nvshmem-cu13 wheel on disk (a pinned file, as on this project's machines):
# its headers and device library are enough to compile and link, so unpack them into the scratch folder.
if [ -z "$nvshmem" ]; then
  for w in "${TSEP_NVSHMEM_WHEEL:-}" /opt/pypi-more/files/nvidia_nvshmem_cu13-3.4.5-*.whl; do
    if [ -n "$w" ] && [ -f "$w" ]; then
      unpack_wheel "$w" "$out/wheel" nvidia/nvshmem/include/ nvidia/nvshmem/lib/libnvshmem_device.a &&
        nvshmem="$out/wheel/nvidia/nvshmem" && echo "check:kernels: NVSHMEM headers from $w"
      break
    fi
  done
fi
# NVSHMEM device code (src/jit/link.ts compiles it with NVRTC -rdc and links libnvshmem_device.a): the
# spike kernel, the low-latency kernels with ranks on other hosts (LL_ENGINE, 2 hosts x 2 and 2 x 8), and
# the normal mode across hosts (hier.cu, its stand-alone defaults: 2 hosts x 2).
engine_variants=(
  "bench/tools/nvshmem-put-signal.cu"
  "kernels/low_latency.cu -DLL_ENGINE=1 -DLL_RPH=2 -DLL_R=4 -DLL_EL=2 -DLL_H=2048 -DLL_TMAX=16 -DLL_KMAX=4"
  "kernels/low_latency.cu -DLL_ENGINE=1 -DLL_RPH=8 -DLL_R=16 -DLL_EL=18 -DLL_H=7168 -DLL_TMAX=128 -DLL_KMAX=8"
  "kernels/hier.cu"
)
if [ -z "$nvshmem" ]; then
  echo "check:kernels: skipped ${#engine_variants[@]} NVSHMEM sources, NVSHMEM headers not found (set TSEP_NVSHMEM_HOME)"
else
  for v in "${engine_variants[@]}"; do
    read -r file defines <<<"$v"
    # shellcheck disable=SC2086
    "$NVCC" -cubin -rdc=true -gencode=arch=compute_90a,code=sm_90a -std=c++17 -I "$nvshmem/include" -I kernels $defines \
      -o "$out/nvshmem-rdc.cubin" "$file"
    linked="relocatable only; no lib/libnvshmem_device.a to link"
    if [ -f "$nvshmem/lib/libnvshmem_device.a" ]; then
      # What cuLink does at run time: the -rdc cubin plus the archive's sm_90 relocatable code -> sm_90a.
      "$NVCC" -dlink -cubin -arch=sm_90a -o "$out/nvshmem.cubin" "$out/nvshmem-rdc.cubin" -L "$nvshmem/lib" \
        -lnvshmem_device
      linked="linked with libnvshmem_device.a"
    fi
    echo "check:kernels: ok $file $defines (nvcc -rdc, $linked; NVSHMEM at $nvshmem)"
  done
fi
echo "check:kernels: $n kernel source(s) and ${#variants[@]} specializations compiled for sm_90a with $("$NVCC" --version | tail -n 1)"

# The same sources through the library's own run-time path (NVRTC; scripts/check-nvrtc.ts): NVRTC as the
# library finds it, else the nvidia-cuda-nvrtc wheel on disk (a pinned file, as on this project's machines).
have_nvrtc() {
  node --input-type=module -e 'const m = await import(process.argv[1]); m.nvrtcVersion();' \
    "$PWD/src/native/nvrtc.ts" >/dev/null 2>&1
}
if ! have_nvrtc; then
  for w in "${TSEP_NVRTC_WHEEL:-}" /opt/pypi-more/files/nvidia_cuda_nvrtc-13.*.whl; do
    [ -n "$w" ] && [ -f "$w" ] || continue
    unpack_wheel "$w" "$out/nvrtc" /lib/libnvrtc || continue
    lib=$(find "$out/nvrtc" -name 'libnvrtc.so.*' ! -name '*alt*' | head -n 1)
    [ -n "$lib" ] || continue
    export TSEP_NVRTC_LIB="$lib" LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "check:kernels: NVRTC from $w"
    break
  done
fi
if have_nvrtc; then
  specs=()
  for f in kernels/*.cu; do
    needs_nvshmem "$f" || specs+=("$(basename "$f")")
  done
  specs+=("${variants[@]}")
  if [ -n "$nvshmem" ]; then specs+=(--nvshmem "${engine_variants[@]}"); fi
  # NVSHMEM sources need the CUDA headers of the toolkit nvcc belongs to.
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")} TSEP_NVSHMEM_HOME="$nvshmem" \
    node scripts/check-nvrtc.ts "${specs[@]}"
else
  echo "check:kernels: NVRTC check skipped, no libnvrtc found (set TSEP_NVRTC_LIB)"
fi

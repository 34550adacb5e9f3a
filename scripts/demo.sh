#!/usr/bin/env bash
# Makes a small sample chain with qemu-img/qemu-io (base with plain, compressed and zero
# clusters; an overlay over it), then runs qcow2kit's main jobs on it: info, map, convert to raw,
# and checks the raw output against qemu-img's with compare.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/qcow2kit"
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -c 'write -P 0xab 0 4M' -c 'write -c -P 0xcd 8M 64k' -c 'write -P 0xef 32M 1M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
qemu-io -c 'write -P 0x11 1M 128k' -c 'write -z 2M 64k' overlay.qcow2 >/dev/null
echo "== qcow2kit info --backing-chain overlay.qcow2"
"$bin" info --backing-chain overlay.qcow2
echo "== qcow2kit map --output json overlay.qcow2"
"$bin" map --output json overlay.qcow2
echo "== qcow2kit convert -O raw overlay.qcow2 overlay.raw"
"$bin" convert -p -O raw overlay.qcow2 overlay.raw
qemu-img convert -O raw overlay.qcow2 reference.raw
echo "== qemu-img compare (our raw output vs qemu-img's)"
qemu-img compare -f raw -F raw overlay.raw reference.raw

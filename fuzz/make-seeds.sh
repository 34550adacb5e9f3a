#!/usr/bin/env bash
# Regenerates fuzz/seeds/ from small images made by qemu-img and qemu-io (every option variant
# the read path handles). The seeds are committed; run this only to refresh them.
set -euo pipefail
cd "$(dirname "$0")"
out=seeds/open_read
mkdir -p "$out" seeds/decompress
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mk() { # name, create options, qemu-io commands...
  local name=$1 opts=$2
  shift 2
  qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name" 256k
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  [ ${#args[@]} -gt 0 ] && qemu-io "${args[@]}" "$tmp/$name" >/dev/null
  cp "$tmp/$name" "$out/$name"
}
mk v3-512 cluster_size=512 'write -P 1 0 3k' 'write -z 4k 1k' 'discard 1k 512'
mk v2-512 cluster_size=512,compat=0.10 'write -P 2 512 2k'
mk v3-4k-rc1 cluster_size=4k,refcount_bits=1 'write -P 3 8k 12k'
mk v3-4k-rc64 cluster_size=4k,refcount_bits=64 'write -P 4 0 4k'
mk zlib-4k cluster_size=4k 'write -c -P 5 0 4k' 'write -c -P 6 8k 4k'
mk zstd-4k cluster_size=4k,compression_type=zstd 'write -c -P 7 0 4k'
mk ext-l2-16k cluster_size=16k,extended_l2=on 'write -P 8 1k 1k' 'write -z 4k 512'
mk lazy-4k cluster_size=4k,lazy_refcounts=on 'write -P 9 0 8k'
qemu-img create -q -f qcow2 -o cluster_size=512 "$tmp/base" 256k
qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 "$tmp/overlay"
cp "$tmp/overlay" "$out/overlay-512"
qemu-img create -q -f qcow2 -o cluster_size=4k "$tmp/snap" 256k
qemu-io -c 'write -P 10 0 4k' "$tmp/snap" >/dev/null
qemu-img snapshot -c s1 "$tmp/snap"
qemu-io -c 'write -P 11 0 4k' "$tmp/snap" >/dev/null
cp "$tmp/snap" "$out/snapshot-4k"
qemu-img create -q -f qcow2 -o cluster_size=4k "$tmp/bm" 256k
qemu-img bitmap --add "$tmp/bm" b0
cp "$tmp/bm" "$out/bitmap-4k"
# Decompressor seeds: byte 0 = kind (0 zlib, 1 zstd), byte 1 = cluster bits - 9.
python3 - <<'PY'
import zlib
data = bytes(i * 7 % 251 for i in range(4096))
c = zlib.compressobj(6, zlib.DEFLATED, -15)
z = c.compress(data) + c.flush()
open("seeds/decompress/zlib-4k", "wb").write(b"\x00\x03" + z)
PY
if command -v zstd >/dev/null; then
  python3 -c "import sys; sys.stdout.buffer.write(bytes(i*7%251 for i in range(4096)))" | zstd -q -c > "$tmp/z"
  { printf '\x01\x03'; cat "$tmp/z"; } > seeds/decompress/zstd-4k
fi
# Check/repair seeds: the images above, a dirty lazy-refcounts image after a crash, and one
# whose refcounts were damaged (a leak on the header cluster, a lost count on a data cluster).
mkdir -p seeds/check_repair
cp "$out"/* seeds/check_repair/
qemu-img create -q -f qcow2 -o cluster_size=4k,lazy_refcounts=on "$tmp/dirty" 256k
qemu-io -c 'write -P 12 0 8k' -c abort "$tmp/dirty" >/dev/null 2>&1 || true
cp "$tmp/dirty" seeds/check_repair/dirty-lazy-4k
qemu-img create -q -f qcow2 -o cluster_size=4k "$tmp/damaged" 256k
qemu-io -c 'write -P 13 0 8k' "$tmp/damaged" >/dev/null
python3 - "$tmp/damaged" seeds/check_repair/refcounts-damaged-4k <<'PY'
import struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
u64 = lambda o: struct.unpack_from(">Q", b, o)[0]
mask = (1 << 56) - 512
block = u64(u64(48)) & mask               # first refcount block
l2 = u64(u64(40)) & mask                  # L2 table of guest cluster 0
data = u64(l2) & mask                     # host cluster of guest cluster 0
struct.pack_into(">H", b, block, 2)       # header cluster: a leak
struct.pack_into(">H", b, block + 2 * (data >> 12), 0)  # data cluster: refcount lost
open(sys.argv[2], "wb").write(b)
PY
ls -la "$out" seeds/decompress seeds/check_repair
# A legacy AES image (the fuzz targets open encrypted images with the passphrase "fuzz").
qemu-img create -q -f qcow2 --object secret,id=f,data=fuzz \
  -o encrypt.format=aes,encrypt.key-secret=f,cluster_size=4k "$tmp/aes-4k" 256k
qemu-io --object secret,id=f,data=fuzz \
  --image-opts "driver=qcow2,file.filename=$tmp/aes-4k,encrypt.key-secret=f" \
  -c 'write -P 10 1000 9000' -c 'write -z 16k 4k' >/dev/null
cp "$tmp/aes-4k" "$out/aes-4k"
# LUKS header seeds: the header area of qemu-img images, cut after slot 0's key material
# (aes-128 cbc-essiv: 4096 + 16 * 4000 bytes), or to the bare 592-byte header (aes-256 xts).
mkdir -p seeds/luks_header
luks() { # name, extra -o options, bytes kept
  qemu-img create -q -f qcow2 --object secret,id=s,data=pw \
    -o "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10$2" "$tmp/$1" 1M
  python3 - "$tmp/$1" "seeds/luks_header/$1" "$3" <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
at = struct.unpack(">I", d[100:104])[0]
while True:
    kind, n = struct.unpack(">II", d[at:at + 8])
    if kind == 0x0537BE77:
        off, _ = struct.unpack(">QQ", d[at + 8:at + 24])
        break
    at += 8 + (n + 7) // 8 * 8
open(sys.argv[2], "wb").write(d[off:off + int(sys.argv[3])])
PY
}
luks aes128-cbc-essiv ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1" 68096
luks aes256-xts-header "" 592

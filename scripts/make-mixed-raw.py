#!/usr/bin/env python3
"""Writes a raw image of mixed data: per 1 MiB block, in turn, zeros, random bytes,
compressible text and a block of alternating 64 KiB random/zero runs.

usage: make-mixed-raw.py PATH SIZE_MIB [SEED]
"""
import random
import sys

path, size_mib = sys.argv[1], int(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
rng = random.Random(seed)
words = [b"qcow2", b"cluster", b"refcount", b"backing", b"snapshot", b"guest", b"host",
         b"table", b"offset", b"sector", b"zero", b"data", b"image", b"layer", b"\n"]
MIB = 1 << 20
text = b" ".join(rng.choice(words) for _ in range(400_000))
with open(path, "wb") as f:
    for i in range(size_mib):
        kind = i % 4
        if kind == 0:
            f.seek(MIB, 1)
        elif kind == 1:
            f.write(rng.randbytes(MIB))
        elif kind == 2:
            start = rng.randrange(0, len(text) - MIB)
            f.write(text[start:start + MIB])
        else:
            for j in range(16):
                if j % 2:
                    f.seek(64 << 10, 1)
                else:
                    f.write(rng.randbytes(64 << 10))
    f.truncate(size_mib * MIB)

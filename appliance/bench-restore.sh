#!/usr/bin/env bash
# Restore benchmark: a reproducible 4 GiB raw VM disk with ~537 MB allocated (256
# scattered 2 MiB extents, half text-like and compressible, half random; every 64 KiB
# chunk unique so dedup does not help), backed up once, then restored to raw and qcow2
# several times. Prints the time of each run (best and median) and the peak RSS.
#
#   appliance/bench-restore.sh [BLOCKVAULT_BINARY] [WORKDIR] [RUNS]
#
# Default binary: target/release/blockvault (build it with `cargo build --release`).
# The work dir (default /tmp/bv-bench) keeps the image and the vault between runs; the
# comparison lines are `qemu-img convert -O raw` of the same image (no fsync) and the
# same followed by `sync -f` (a restore fsyncs its image before renaming it into place).
# Peak RSS is per process (wait4). On a shared machine, compare A/B runs interleaved.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
BV="$(realpath "${1:-$here/target/release/blockvault}")"
WORK="${2:-/tmp/bv-bench}"
RUNS="${3:-5}"
mkdir -p "$WORK"
IMG="$WORK/disk.raw"
if [ ! -f "$IMG" ]; then
  python3 - "$IMG" <<'PY'
import random, sys
path = sys.argv[1]
SIZE, EXTENTS, EXT_LEN, CHUNK = 4 << 30, 256, 2 << 20, 64 << 10
rng = random.Random(20261128)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
         for _ in range(2000)]
text = bytearray()
while len(text) < (4 << 20) + CHUNK:
    line = b" ".join(rng.choice(words) for _ in range(rng.randint(5, 14)))
    text += line + b"\n"
text = bytes(text)
with open(path, "wb") as f:
    f.truncate(SIZE)
    slot = SIZE // EXTENTS
    for e in range(EXTENTS):
        # Scattered: somewhere in each 16 MiB slot, 64 KiB aligned.
        off = e * slot + rng.randrange(0, (slot - EXT_LEN) // CHUNK) * CHUNK
        f.seek(off)
        if e % 2 == 0:
            buf = bytearray()
            for c in range(EXT_LEN // CHUNK):
                head = b"extent %05d chunk %03d\n" % (e, c)
                o = rng.randrange(0, 4 << 20)
                buf += head + text[o:o + CHUNK - len(head)]
            f.write(buf)
        else:
            f.write(rng.randbytes(EXT_LEN))
PY
fi
DATA="$WORK/data"
if [ ! -d "$DATA" ]; then
  "$BV" --data "$DATA" --quiet vault create bench
  "$BV" --data "$DATA" --quiet backup "$IMG" --vault bench --id bench --name bench
fi
echo "image: $(du -B1 --apparent-size "$IMG" | cut -f1) bytes, $(du -B1 "$IMG" | cut -f1) allocated; $(nproc) cores; $BV"
python3 - "$BV" "$DATA" "$WORK" "$RUNS" "$IMG" <<'PY'
import os, subprocess, sys, time, statistics
bv, data, work, runs, img = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def run(name, argv, out):
    times, rss = [], 0
    for _ in range(runs):
        if os.path.exists(out):
            os.remove(out)
        subprocess.run(["sync"])
        t = time.perf_counter()
        child = subprocess.Popen(argv)
        _, status, usage = os.wait4(child.pid, 0)
        times.append(time.perf_counter() - t)
        assert os.waitstatus_to_exitcode(status) == 0, f"{argv} failed"
        rss = max(rss, usage.ru_maxrss)
    os.remove(out)
    print(f"{name:28s} best {min(times):.3f} s  median {statistics.median(times):.3f} s  peak RSS {rss // 1024} MiB")
for fmt in ["raw", "qcow2"]:
    out = os.path.join(work, "restored." + fmt)
    run(f"blockvault restore {fmt}", [bv, "--data", data, "--quiet", "restore", "bench", "--to", out, "--format", fmt], out)
out = os.path.join(work, "converted.raw")
run("qemu-img convert raw", ["qemu-img", "convert", "-O", "raw", img, out], out)
run("qemu-img convert raw + sync", ["sh", "-c", f"qemu-img convert -O raw {img} {out} && sync -f {out}"], out)
PY

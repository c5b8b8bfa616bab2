#!/usr/bin/env bash
# Bench: a live 2-disk incremental over QMP whose dirty bitmaps mark ~238 MB of changed
# 64 KiB chunks (scattered 8 KiB "database page" writes), against qemu-storage-daemon.
#   bash appliance/bench-live-incremental.sh [BLOCKVAULT_BINARY]
# Two 2 GiB qcow2 disks, 512 MiB written in each; a full live backup (creates the
# bitmaps); then 1816 distinct chunks per disk get one 8 KiB write each through the
# daemon's NBD export (so the bitmaps see them); then the incremental is timed (best of
# RUNS, each run preceded by the same writes at fresh places). Prints the wall time of
# the whole command (QMP capture included), MB/s, and the manifest's own `seconds`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/blockvault}"
[ -x "$bin" ] || cargo build --release --locked
runs="${RUNS:-3}"
per_disk="${CHUNKS_PER_DISK:-1816}"
dir="$(mktemp -d /tmp/bv-bench-XXXXXX)"
qsd_pid=
cleanup() { [ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
for d in a b; do
  qemu-img create -q -f qcow2 "$dir/$d.qcow2" 2G
  qemu-io -f qcow2 -c "write -P 0x5$([ $d = a ] && echo 1 || echo 2) 0 512M" "$dir/$d.qcow2" >/dev/null
done
qemu-storage-daemon \
  --blockdev "driver=file,node-name=fa,filename=$dir/a.qcow2" --blockdev driver=qcow2,node-name=a,file=fa \
  --blockdev "driver=file,node-name=fb,filename=$dir/b.qcow2" --blockdev driver=qcow2,node-name=b,file=fb \
  --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
  --export type=nbd,id=ea,node-name=a,name=a,writable=on \
  --export type=nbd,id=eb,node-name=b,name=b,writable=on \
  --chardev "socket,path=$dir/qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
  >/dev/null 2>&1 &
qsd_pid=$!
for _ in $(seq 200); do [ -S "$dir/qmp.sock" ] && [ -S "$dir/nbd.sock" ] && break; sleep 0.05; done
bv() { "$bin" --data "$dir/data" --quiet "$@"; }
bv vault create v >/dev/null
backup() { bv --json backup "qmp:$dir/qmp.sock" --vault v --id srv --nbd-server "$dir/nbd.sock"; }
backup >/dev/null
# Scattered 8 KiB writes: one in each of $per_disk distinct 64 KiB chunks per disk.
scatter() { # $1 = disk, $2 = seed
  python3 - "$per_disk" "$2" <<'PY' > "$dir/cmds"
import random, sys
n, seed = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(seed)
for c in r.sample(range(2 << 30 >> 16), n):
    print(f"write -P {r.randrange(1, 255)} {c * 65536 + r.randrange(8) * 8192} 8k")
PY
  qemu-io -f raw "nbd+unix:///$1?socket=$dir/nbd.sock" < "$dir/cmds" >/dev/null
}
best=
for run in $(seq "$runs"); do
  scatter a "$((run * 2))"
  scatter b "$((run * 2 + 1))"
  t0=$(date +%s.%N)
  out="$(backup)"
  t1=$(date +%s.%N)
  read -r inner bytes <<<"$(python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["seconds"], sum(d["bytes_read"] for d in m["disks"]))' <<<"$out")"
  secs=$(python3 -c "print(round($t1 - $t0, 3))")
  echo "run $run: incremental read $bytes bytes; command $secs s ($(python3 -c "print(round($bytes/$secs/1e6))") MB/s), reading+storing $inner s"
  if [ -z "$best" ] || python3 -c "import sys; sys.exit(0 if $secs < $best else 1)"; then best=$secs; fi
done
echo "best: $best s"

#!/usr/bin/env bash
# S3 benchmark: the same backup, incremental, restore and instant-access read into a
# vault on a throwaway single-node Garage (127.0.0.1) and into a local vault, side by
# side, with the S3 requests each step sent. Prints one table.
#
#   appliance/bench-s3.sh [BLOCKVAULT_BINARY] [WORKDIR] [GIB]
#   CORES=split appliance/bench-s3.sh ...   # blockvault on core 0, Garage on core 1
#   REPEAT=3 appliance/bench-s3.sh ...      # restores and instant reads: best of 3
#
# Default binary: target/release/blockvault (`cargo build --release`); work dir
# /tmp/bv-bench-s3 (removed at the end unless KEEP=1); image size 4 GiB. Garage is
# `$BLOCKVAULT_GARAGE`, `garage` on PATH or ~/.cargo/bin/garage (as tests/it/garage.rs).
#
# The image (raw, sparse): per 256 MiB slot, 64 MiB random, 64 MiB repeated text-like
# data (compressible, every 64 KiB chunk unique), 32 MiB of a 1 MiB pattern repeated
# (dedups), 32 MiB written zeros, 64 MiB hole. The incremental rewrites ~1 % of the disk
# (scattered 64 KiB writes) and is given as a change list (--changed-extents), so both
# vaults read exactly the same bytes. Instant access: `serve-nbd` of the full backup read
# sequentially by `qemu-img convert` into /dev/null-like raw output.
#
# On this 2-core machine Garage shares the CPU with blockvault, and it spends about as
# much on a full backup as blockvault does (MD5 for the ETag, BLAKE2 for its blocks, the
# payload hash, page-cache writes): the ratio then measures the two programs together.
# CORES=split gives each one core (blockvault's local runs get the same core), which is
# what an object store on its own hardware looks like from the client's side.
#
# Garage runs with `compression_level = "none"`, as recommended for blockvault buckets
# (packs are zstd-compressed, or encrypted, already: Garage's zstd pass gains nothing and
# cost a quarter of its CPU). Before the runs, Garage's own ceiling is measured with
# `curl --aws-sigv4` (16 objects of 96 MiB, 4 at a time; signed payload, as blockvault
# sends over http://).
#
# Request counts come from the S3 store's own counter (logged as "S3 requests" at
# RUST_LOG=blockvault=info when a command's store is dropped); object counts and bytes
# from `garage bucket info`. Objects per TB = objects in the bucket / stored bytes.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
BV="$(realpath "${1:-$here/target/release/blockvault}")"
WORK="${2:-/tmp/bv-bench-s3}"
GIB="${3:-4}"
if [ -n "${BLOCKVAULT_GARAGE:-}" ]; then GARAGE="$BLOCKVAULT_GARAGE"
elif command -v garage >/dev/null; then GARAGE="$(command -v garage)"
else GARAGE="$HOME/.cargo/bin/garage"; fi
[ -x "$GARAGE" ] || { echo "Garage missing: cargo install garage --version 2.5.0 --locked" >&2; exit 2; }
[ -x "$BV" ] || { echo "no binary $BV: cargo build --release" >&2; exit 2; }
mkdir -p "$WORK"
WORK="$(realpath "$WORK")"
GPID=""
cleanup() {
  [ -n "$GPID" ] && kill "$GPID" 2>/dev/null && wait "$GPID" 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

# ---- a throwaway Garage (same recipe as tests/it/garage.rs) ----
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3P="$(free_port)"; RPCP="$(free_port)"
G="$WORK/garage"; rm -rf "$G"; mkdir -p "$G"
cat >"$G/garage.toml" <<EOF
compression_level = "none"
metadata_dir = "$G/meta"
data_dir = "$G/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPCP"
rpc_public_addr = "127.0.0.1:$RPCP"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3P"
EOF
gcli() { "$GARAGE" -c "$G/garage.toml" "$@"; }
BVRUN=""; GRUN=""
if [ "${CORES:-}" = split ]; then BVRUN="taskset -c 0"; GRUN="taskset -c 1"; fi
$GRUN "$GARAGE" -c "$G/garage.toml" server >"$G/server.log" 2>&1 &
GPID=$!
for _ in $(seq 600); do gcli status >/dev/null 2>&1 && break; sleep 0.1; done
gcli status >/dev/null
NODE="$(gcli node id -q | cut -d@ -f1)"
gcli layout assign -z dc1 -c 100G "$NODE" >/dev/null
gcli layout apply --version 1 >/dev/null
gcli bucket create bench >/dev/null
KEY="$(gcli key create bench-key)"
export AWS_ACCESS_KEY_ID="$(sed -n 's/^Key ID: *//p' <<<"$KEY")"
export AWS_SECRET_ACCESS_KEY="$(sed -n 's/^Secret key: *//p' <<<"$KEY")"
gcli bucket allow --read --write --owner bench --key bench-key >/dev/null
ENDPOINT="http://127.0.0.1:$S3P"

# ---- Garage's own ceiling: curl, 16 x 96 MiB, 4 at a time ----
ceiling() {
  local f="$WORK/ceiling.bin" sig="aws:amz:garage:s3" user="$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
  gcli bucket create ceiling >/dev/null
  gcli bucket allow --read --write --owner ceiling --key bench-key >/dev/null
  head -c $((96 << 20)) /dev/urandom >"$f"
  local t0 t1 t2
  t0=$(date +%s.%N)
  seq 16 | xargs -P 4 -I{} curl -sf -o /dev/null --aws-sigv4 "$sig" --user "$user" \
    -H "x-amz-content-sha256: $(sha256sum "$f" | cut -d' ' -f1)" -T "$f" "$ENDPOINT/ceiling/o{}"
  t1=$(date +%s.%N)
  seq 16 | xargs -P 4 -I{} curl -sf -o /dev/null --aws-sigv4 "$sig" --user "$user" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$ENDPOINT/ceiling/o{}"
  t2=$(date +%s.%N)
  rm -f "$f"
  python3 -c "b=16*96*2**20; print(f'Garage ceiling (curl, 16 x 96 MiB, 4 at a time): PUT {b/($t1-$t0)/1e6:.0f} MB/s, GET {b/($t2-$t1)/1e6:.0f} MB/s')"
  seq 16 | xargs -P 4 -I{} curl -sf -o /dev/null --aws-sigv4 "$sig" --user "$user" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X DELETE "$ENDPOINT/ceiling/o{}"
}
CEILING="$(ceiling)"
export CEILING BVRUN

export BV WORK GIB ENDPOINT GARAGE G
python3 - <<'PY'
import json, os, random, re, subprocess, sys, time
bv, work, gib, endpoint = os.environ["BV"], os.environ["WORK"], float(os.environ["GIB"]), os.environ["ENDPOINT"]
garage_cfg = os.path.join(os.environ["G"], "garage.toml")
PIN = os.environ.get("BVRUN", "").split()
img = os.path.join(work, "disk.raw")
SLOT, CHUNK = 256 << 20, 64 << 10
size = int(gib * 4) * SLOT
rng = random.Random(20261128)

def make_image():
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    text = bytearray()
    while len(text) < (8 << 20):
        text += b" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) + b"\n"
    text = bytes(text)
    pattern = rng.randbytes(1 << 20)
    with open(img, "wb") as f:
        f.truncate(size)
        for s in range(size // SLOT):
            base = s * SLOT
            f.seek(base)
            f.write(rng.randbytes(64 << 20))
            buf = bytearray()
            for c in range((64 << 20) // CHUNK):
                head = b"slot %05d chunk %05d\n" % (s, c)
                o = rng.randrange(0, len(text) - CHUNK)
                buf += head + text[o:o + CHUNK - len(head)]
            f.write(buf)
            f.write(pattern * 32)
            f.write(bytes(32 << 20))
    os.sync()

def change_one_percent():
    n = size // 100 // CHUNK
    slots = rng.sample(range(size // CHUNK), n)
    extents = []
    with open(img, "r+b") as f:
        for c in sorted(slots):
            f.seek(c * CHUNK)
            f.write(rng.randbytes(CHUNK))
            extents.append({"start": c * CHUNK, "length": CHUNK})
    os.sync()
    path = os.path.join(work, "changed.json")
    with open(path, "w") as f:
        json.dump(extents, f)
    return path, n * CHUNK

REQ = re.compile(r"S3 requests.*")
def run(argv, data, env_extra=None):
    env = dict(os.environ, RUST_LOG="blockvault=info")
    if env_extra:
        env.update(env_extra)
    subprocess.run(["sync"])
    t = time.perf_counter()
    p = subprocess.run(PIN + [bv, "--data", data] + argv, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{argv} failed:\n{p.stderr}")
    counts = {}
    for line in p.stderr.splitlines():
        if "S3 requests" in line:
            for k in ("get", "head", "put", "list", "delete", "bytes_in", "bytes_out"):
                m = re.search(r"\b%s=(\d+)" % k, line)
                if m:
                    counts[k] = counts.get(k, 0) + int(m.group(1))
    return dt, counts, p.stdout

def instant_read(data, backup):
    return best(lambda: instant_once(data, backup))

def instant_once(data, backup):
    sock = os.path.join(work, "nbd.sock")
    if os.path.exists(sock):
        os.remove(sock)
    env = dict(os.environ, RUST_LOG="blockvault=info")
    srv = subprocess.Popen(PIN + [bv, "--data", data, "serve-nbd", backup, "--listen", "unix:" + sock],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri = srv.stdout.readline().strip()
    if not uri:
        sys.exit("serve-nbd printed no URI: " + srv.stderr.read())
    out = os.path.join(work, "instant.raw")
    t = time.perf_counter()
    subprocess.run(PIN + ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out], check=True)
    dt = time.perf_counter() - t
    same = subprocess.run(["cmp", "-s", out, img]).returncode == 0
    os.remove(out)
    srv.terminate()
    _, err = srv.communicate(timeout=60)
    counts = {}
    for line in err.splitlines():
        if "S3 requests" in line or "disk reads" in line:
            for k in ("get", "head", "put", "list", "delete", "bytes_in", "bytes_out",
                      "chunks_read", "prefetched", "prefetch_gets", "reader_fetches"):
                m = re.search(r"\b%s=(\d+)" % k, line)
                if m:
                    counts[k] = counts.get(k, 0) + int(m.group(1))
    return dt, counts, same

REPEAT = max(1, int(os.environ.get("REPEAT", "1")))

def best(step):
    # The fastest of REPEAT runs (a restore's time here swings with the host's writeback);
    # every run's output must match.
    runs = [step() for _ in range(REPEAT)]
    fastest = min(runs, key=lambda r: r[0])
    return fastest[0], fastest[1], all(r[2] for r in runs)

def restore(data, backup):
    return best(lambda: restore_once(data, backup))

def restore_once(data, backup):
    out = os.path.join(work, "restored.raw")
    dt, counts, _ = run(["--quiet", "restore", backup, "--to", out, "--format", "raw"], data)
    same = subprocess.run(["cmp", "-s", out, img]).returncode == 0
    os.remove(out)
    return dt, counts, same

def bucket_objects():
    out = subprocess.run([os.environ["GARAGE"], "-c", garage_cfg, "bucket", "info", "bench"],
                         capture_output=True, text=True).stdout
    objs = re.search(r"Objects:\s*(\d+)", out)
    return int(objs.group(1)) if objs else None

def stored_bytes(data):
    out = subprocess.run([bv, "--data", data, "--json", "backups", "list"], capture_output=True, text=True).stdout
    try:
        return sum(b.get("bytes_stored", 0) for b in json.loads(out))
    except Exception:
        return None

if not os.path.exists(img):
    t = time.perf_counter(); make_image()
    print(f"image: {size / 2**30:g} GiB, made in {time.perf_counter() - t:.0f} s", file=sys.stderr)
pristine = os.path.join(work, "pristine.raw")
subprocess.run(["cp", "--sparse=always", img, pristine], check=True)
alloc = int(subprocess.run(["du", "-B1", img], capture_output=True, text=True).stdout.split()[0])

rows, counts_rows = [], []
vaults = {}
for kind in ("local", "garage"):
    data = os.path.join(work, "data-" + kind)
    subprocess.run(["rm", "-rf", data])
    create = ["--quiet", "vault", "create", "v"]
    if kind == "garage":
        create += ["--s3", "s3://bench/v", "--endpoint", endpoint, "--region", "garage"]
    run(create, data)
    vaults[kind] = data
# Identical starting image for both vaults.
results = {}
for kind, data in vaults.items():
    subprocess.run(["cp", "--sparse=always", pristine, img], check=True)
    r = {}
    r["full"] = run(["--quiet", "backup", img, "--vault", "v", "--id", "disk", "--name", "full"], data)
    r["restore"] = restore(data, "full")
    r["instant"] = instant_read(data, "full")
    if kind == "garage":
        r["objects_full"] = bucket_objects()
    r["stored_full"] = stored_bytes(data)
    rng.seed(7)
    changed, changed_bytes = change_one_percent()
    r["incr"] = run(["--quiet", "backup", img, "--vault", "v", "--id", "disk", "--name", "incr",
                     "--changed-extents", changed, "--since", "full"], data)
    r["restore_incr"] = restore(data, "incr")
    if kind == "garage":
        r["objects_incr"] = bucket_objects()
    r["changed_bytes"] = changed_bytes
    results[kind] = r

def mbps(dt):
    return f"{size / dt / 1e6:8.0f} MB/s"
print(f"\nimage {size / 2**30:g} GiB ({alloc / 1e9:.2f} GB allocated); {os.cpu_count()} cores"
      f"{' (blockvault and qemu-img on core 0, Garage on core 1)' if PIN else ' shared by blockvault and Garage'}; {bv}")
print(os.environ["CEILING"])
if REPEAT > 1:
    print(f"restores and instant reads: best of {REPEAT}")
print(f"{'step':34s} {'local':>22s} {'garage':>22s} {'garage/local':>12s}")
for step, label in (("full", "full backup"), ("incr", "incremental (1 % changed)"),
                    ("restore", "restore full (raw)"), ("restore_incr", "restore incremental (raw)"),
                    ("instant", "instant access seq. read")):
    l, g = results["local"][step][0], results["garage"][step][0]
    print(f"{label:34s} {l:7.1f} s {mbps(l)} {g:7.1f} s {mbps(g)} {100 * l / g:10.0f} %")
for step in ("restore", "restore_incr", "instant"):
    for kind in ("local", "garage"):
        if not results[kind][step][2]:
            print(f"!! {kind} {step}: output differs from the image")
print("\nS3 requests (garage vault)")
print(f"{'step':34s} {'GET':>7s} {'HEAD':>7s} {'PUT':>7s} {'LIST':>7s} {'DELETE':>7s} {'MB out':>8s} {'MB in':>8s}")
for step, label in (("full", "full backup"), ("incr", "incremental (1 % changed)"),
                    ("restore", "restore full"), ("restore_incr", "restore incremental"),
                    ("instant", "instant access seq. read")):
    c = results["garage"][step][1]
    print(f"{label:34s} {c.get('get', 0):7d} {c.get('head', 0):7d} {c.get('put', 0):7d} {c.get('list', 0):7d} "
          f"{c.get('delete', 0):7d} {c.get('bytes_out', 0) / 1e6:8.1f} {c.get('bytes_in', 0) / 1e6:8.1f}")
g = results["garage"]
if g.get("objects_incr") and g.get("stored_full"):
    print(f"\nobjects in bucket: {g['objects_full']} after the full, {g['objects_incr']} after the incremental; "
          f"{g['stored_full'] / 1e9:.2f} GB stored by the full -> {g['objects_full'] / g['stored_full'] * 1e12:,.0f} objects per TB stored")
print(f"incremental changed {g['changed_bytes'] / 1e6:.1f} MB")
for kind in ("local", "garage"):
    c = results[kind]["instant"][1]
    if "chunks_read" in c:
        print(f"instant access ({kind}): {c['chunks_read']} chunks read, {c.get('prefetched', 0)} fetched ahead "
              f"in {c.get('prefetch_gets', 0)} GETs, {c.get('reader_fetches', 0)} fetched by the reader")
PY

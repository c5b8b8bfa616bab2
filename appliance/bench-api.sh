#!/usr/bin/env bash
# API load benchmark: requests/s of `GET /api/v1/health` (with a token) and
# `GET /api/v1/backups` (50 backups in the catalog) against a real `blockvault serve`
# on 127.0.0.1, measured with wrk (Debian package `wrk`):
#   1. with 10,000 ended tasks in the history,
#   2. the same while two long backups run (nbdkit pattern disks behind the delay
#      filter: every read waits, so the backups hold task workers and catalog
#      connections for the whole measurement without taking the CPU).
#
#   appliance/bench-api.sh [BLOCKVAULT_BINARY] [WORKDIR] [SECONDS] [CONNECTIONS]
#
# HTTPS (the appliance's self-signed certificate; curl trusts it with --cacert, wrk does
# not verify certificates) unless BENCH_PLAIN_HTTP=1 (serve --plain-http on loopback):
# run both to see what TLS costs.
#
# Default binary: target/release/blockvault (`cargo build --release`). The work dir
# (default /tmp/bv-bench-api) is recreated. On a shared machine run A/B binaries back to
# back with the same arguments and compare the relative figures.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
BV="$(realpath "${1:-$here/target/release/blockvault}")"
WORK="${2:-/tmp/bv-bench-api}"
SECS="${3:-10}"
CONNS="${4:-32}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
rm -rf "$WORK"
mkdir -p "$WORK"
DATA="$WORK/data"
bv() { "$BV" --data "$DATA" --quiet "$@"; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

bv vault create v >/dev/null
TOKEN="$(bv token create --role admin --name bench | tail -n1 | tr -d '[:space:]')"

# 50 backups of a small image that changes a little each time.
python3 - "$WORK/disk.raw" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 20)
PY
for i in $(seq 1 50); do
  python3 - "$WORK/disk.raw" "$i" <<'PY'
import sys, os
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]) * (1 << 20))
    f.write(os.urandom(256 << 10))
PY
  bv backup "$WORK/disk.raw" --vault v --id bench-disk >/dev/null
done

# 10,000 ended tasks in the history (as the registry records them).
python3 - "$DATA/catalog.sqlite" <<'PY'
import json, sqlite3, sys, datetime
db = sqlite3.connect(sys.argv[1])
now = datetime.datetime.now(datetime.timezone.utc)
rows = []
for i in range(10000):
    created = (now - datetime.timedelta(seconds=10000 - i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    tid = "hist-%05d" % i
    body = {"id": tid, "kind": "backup", "target": "bench", "state": "succeeded",
            "by": "bench", "created": created, "started": created, "finished": created,
            "progress_percent": 100.0, "bytes_done": 0, "bytes_total": 0,
            "bytes_per_second": 0.0, "eta_seconds": None, "log": [], "error": None,
            "result": None}
    rows.append((tid, json.dumps(body), "succeeded", created))
db.executemany("INSERT INTO tasks (id, body, state, created) VALUES (?, ?, ?, ?)", rows)
db.commit()
PY

# Two slow NBD disks for the long backups.
for n in 1 2; do
  nbdkit --exit-with-parent -f -U "$WORK/slow$n.sock" --filter=delay pattern 8G rdelay=200ms 2>/dev/null &
  pids+=($!)
done

plain=()
[ "${BENCH_PLAIN_HTTP:-0}" = 1 ] && plain=(--plain-http)
# The nbdkit sockets live in $WORK: let API callers name them ([paths] sources).
printf '[paths]\nsources = ["%s"]\n' "$WORK" >"$WORK/bv.toml"
"$BV" --data "$DATA" serve --listen 127.0.0.1:0 --config "$WORK/bv.toml" "${plain[@]}" >"$WORK/serve.out" 2>"$WORK/serve.err" &
pids+=($!)
for _ in $(seq 1 300); do
  grep -q "listening on" "$WORK/serve.out" 2>/dev/null && break
  sleep 0.1
done
URL="$(grep -o 'https\?://[0-9.:]*' "$WORK/serve.out" | head -n1)"
[ -n "$URL" ] || { echo "serve did not start:" >&2; cat "$WORK/serve.err" >&2; exit 1; }
API="$URL/api/v1"
AUTH="Authorization: Bearer $TOKEN"
cacert=()
[ -s "$DATA/tls/cert.pem" ] && cacert=(--cacert "$DATA/tls/cert.pem")
call() { curl -fsS "${cacert[@]}" -H "$AUTH" -H 'content-type: application/json' "$@"; }

measure() {
  local label="$1" path="$2"
  local rps
  rps="$(wrk -t2 -c"$CONNS" -d"${SECS}s" -H "$AUTH" "$API$path" | awk '/Requests\/sec/ {print $2}')"
  printf '%-44s %10s req/s\n' "$label" "$rps"
}

echo "binary: $BV"
echo "history: $(call "$API/tasks?state=succeeded" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') tasks listed (of 10,000)"
echo "backups: $(call "$API/backups" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
measure "GET /health (10,000 tasks in history)" /health
measure "GET /backups (50 backups)" /backups

for n in 1 2; do
  call -X POST "$API/resources" -d "{\"name\":\"slow$n\",\"kind\":\"disk\",\"sources\":[\"nbd+unix:///?socket=$WORK/slow$n.sock\"],\"vault\":\"v\"}" >/dev/null
  call -X POST "$API/backups" -d "{\"resource\":\"slow$n\"}" >/dev/null
done
for _ in $(seq 1 300); do
  running="$(call "$API/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks_running"])')"
  [ "$running" = 2 ] && break
  sleep 0.1
done
echo "backups running: $running"
measure "GET /health (two backups running)" /health
measure "GET /backups (two backups running)" /backups

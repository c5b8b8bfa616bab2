#!/usr/bin/env bash
# Mirror benchmark: 1 GiB of random (incompressible) data backed up into a plaintext and
# into an encrypted vault, each pushed to a mirror vault of a second `serve` on
# 127.0.0.1 (HTTPS, pinned certificate, replication token), then pushed again (nothing
# left to send). Prints bytes sent, seconds and MB/s per push. The encrypted mirror
# holds no key: it checks blob headers only, where a plaintext mirror decodes and
# hashes every blob.
#
#   appliance/bench-mirror.sh [BLOCKVAULT_BINARY] [WORKDIR]
#
# Default binary: target/release/blockvault (`cargo build --release`); the work dir
# (default /tmp/bv-bench-mirror, about 5 GiB at the peak) is removed at the end.
set -euo pipefail
B=$(realpath "${1:-target/release/blockvault}")
D=${2:-/tmp/bv-bench-mirror}
PORT=${PORT:-18421}
rm -rf "$D"; mkdir -p "$D"
trap 'kill $spid 2>/dev/null || true; rm -rf "$D"' EXIT
head -c 1G /dev/urandom > "$D/img.raw"
"$B" --data "$D/a" vault create v >/dev/null
"$B" --data "$D/a" backup "$D/img.raw" --vault v --id d >/dev/null
"$B" --data "$D/e" vault create v --encrypt --keyfile "$D/k" >/dev/null
"$B" --data "$D/e" --keyfile "$D/k" backup "$D/img.raw" --vault v --id d >/dev/null
rm "$D/img.raw"
"$B" --data "$D/r" vault create m >/dev/null
"$B" --data "$D/r" vault create me >/dev/null
printf '[server]\nmirror_vaults = ["m", "me"]\n' > "$D/r.toml"
tok=$("$B" --data "$D/r" token create --role replication --name a | tail -1)
"$B" --data "$D/r" serve --listen "127.0.0.1:$PORT" --config "$D/r.toml" > "$D/serve.out" 2>"$D/serve.err" &
spid=$!
for _ in $(seq 100); do [ -s "$D/serve.out" ] && break; sleep 0.1; done
fp=$(grep -o 'SHA-256 [0-9A-F:]*' "$D/serve.out" | awk '{print $2}')
push() { # MIRROR_VAULT SOURCE_DATA [--keyfile K]
  local to=$1 data=$2; shift 2
  local t0 t1
  t0=$(date +%s.%N)
  BLOCKVAULT_REPLICA_TOKEN=$tok BLOCKVAULT_FINGERPRINT=$fp "$B" --data "$data" "$@" --json \
    replicate --all --from v --to "https://127.0.0.1:$PORT/$to" > "$D/$to.json"
  t1=$(date +%s.%N)
  python3 -c "import json; v=json.load(open('$D/$to.json')); s=$t1-$t0; \
print('%-28s %11d bytes sent in %6.2f s = %4.0f MB/s (wire %d)' % ('$to' + (' (encrypted)' if '$to' == 'me' else ' (plaintext)'), v['bytes_sent'], s, v['bytes_sent'] / s / 1e6, v['wire_bytes']))"
}
push m "$D/a"
push me "$D/e" --keyfile "$D/k"
push m "$D/a"
push me "$D/e" --keyfile "$D/k"

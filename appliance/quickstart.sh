#!/usr/bin/env bash
# Quick start on a new machine: install what is needed, build, run the appliance's main
# job once on its embedded defaults (data dir ./blockvault-data, vault "default", SQLite
# catalog): back up a disk twice, list, restore, compare, verify; then start the
# appliance (HTTPS admin API on 127.0.0.1:8420 with a self-signed certificate made at its
# first start, scheduler, task runner) with a fresh admin token, print the certificate's
# SHA-256 fingerprint and how to call the API with it, and serve until Ctrl-C.
# --no-serve stops after the demo.
#   bash appliance/quickstart.sh [--no-serve] [DISK_IMAGE]
# QUICKSTART_PROFILE=dev builds a debug binary instead (the test of this script uses it
# to reuse the test build's dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
serve=1
if [ "${1:-}" = "--no-serve" ]; then serve=0; shift; fi
if ! command -v qemu-img >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-utils
fi
profile="${QUICKSTART_PROFILE:-release}"
cargo build --profile "$profile" --locked
case "$profile" in dev) profdir=debug ;; *) profdir="$profile" ;; esac
bin="${CARGO_TARGET_DIR:-target}/$profdir/blockvault"
bv() { "$bin" --data "${BLOCKVAULT_DATA:-./blockvault-data}" "$@"; }
disk="${1:-}"
if [ -z "$disk" ]; then
  bash fixtures/make.sh target/fixtures >/dev/null
  disk=target/fixtures/disk.qcow2
fi
bv vault info default >/dev/null 2>&1 || bv vault create default
bv backup "$disk" --vault default --id quickstart
bv backup "$disk" --vault default --id quickstart
bv backups list --disk quickstart
out="$(mktemp -u /tmp/blockvault-restore-XXXXXX).qcow2"
bv backups show latest --disk quickstart
bv restore latest --disk quickstart --to "$out"     # a qcow2 image: from the extension
qemu-img compare "$disk" "$out" && echo "restored image $out equals the source"
bv verify --vault default
bv vault info default
[ "$serve" = 1 ] || exit 0
token="$(bv --quiet token create --role admin --name "quickstart-$(date +%Y%m%d-%H%M%S)")"
data="${BLOCKVAULT_DATA:-./blockvault-data}"
ready="$(mktemp)"
"$bin" --data "$data" serve --listen 127.0.0.1:8420 >"$ready" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; rm -f "$ready"' INT TERM
# Wait for serve to say it listens (after it bound the port; the certificate is made at
# the appliance's first start and kept in $data/tls/). If it stops first (the port is
# taken, say), its error is on the screen and so is its exit status.
for _ in $(seq 600); do
  grep -q "listening on" "$ready" && break
  kill -0 "$pid" 2>/dev/null || { rm -f "$ready"; wait "$pid"; exit $?; }
  sleep 0.1
done
cat "$ready"
rm -f "$ready"
fp="$(bv tls fingerprint)"
echo
echo "admin token (shown once): $token"
echo "certificate SHA-256 fingerprint: $fp"
echo "try: $bin --server https://127.0.0.1:8420 --fingerprint $fp --token $token backups list"
echo "     curl --cacert $data/tls/cert.pem -H 'Authorization: Bearer $token' https://127.0.0.1:8420/api/v1/health"
wait "$pid"

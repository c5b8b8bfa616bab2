#!/usr/bin/env bash
# Quick start on a new machine: install what is needed, build, and run the appliance's
# main job on its embedded defaults (data dir ./blockvault-data, vault "default").
#   bash appliance/quickstart.sh [DISK_IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-img >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-utils
fi
cargo build --release --locked
bin="${CARGO_TARGET_DIR:-target}/release/blockvault"
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
last="$(bv --json backups list --disk quickstart | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')"
bv restore "$last" --to "$out" --format qcow2
qemu-img compare "$disk" "$out" && echo "restored image $out equals the source"
bv verify --vault default
bv vault info default

#!/usr/bin/env bash
# What NBD over TLS costs: full backups of the same image served by qemu-nbd over a Unix
# socket in clear (nbd+unix://) and with STARTTLS (nbds+unix://, x509 certificates made
# here with openssl, a client certificate as qemu-nbd requires by default), each into a
# fresh vault, alternated RUNS times; prints the seconds and MiB/s of each run.
#
#   appliance/bench-nbd-tls.sh [BLOCKVAULT_BINARY] [SIZE_MIB] [RUNS] [WORKDIR]
#
# Default binary: target/release/blockvault (`cargo build --release`); the image is
# SIZE_MIB (default 1024) of random data (incompressible: the backup reads and stores
# everything). On a shared machine compare the two rows of the same run, not runs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
BV="$(realpath "${1:-$here/target/release/blockvault}")"
MIB="${2:-1024}"
RUNS="${3:-2}"
WORK="${4:-/tmp/bv-bench-nbd-tls}"
for t in qemu-nbd openssl python3; do
    command -v "$t" >/dev/null || { echo "bench-nbd-tls.sh: needs $t" >&2; exit 2; }
done
rm -rf "$WORK"
mkdir -p "$WORK/pki"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# --- certificates: a CA, a server and a client certificate (P-256) ---------------------
cd "$WORK/pki"
printf '[req]\ndistinguished_name=dn\nx509_extensions=v3\nprompt=no\n[dn]\nCN=bench CA\n[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n' > ca.cnf
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 2 -config ca.cnf 2>/dev/null
for who in server client; do
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%sAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' "$who" > "$who.ext"
    openssl req "${ec[@]}" -keyout "$who-key.pem" -out "$who.csr" -subj "/CN=$who" 2>/dev/null
    openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
        -out "$who-cert.pem" -days 2 -extfile "$who.ext" 2>/dev/null
done
cd "$WORK"

head -c "$((MIB << 20))" /dev/urandom > disk.raw
serve() { # serve SOCKET [tls]: qemu-nbd on SOCKET, in the background
    local extra=()
    [ "${2:-}" = tls ] && extra=(--object "tls-creds-x509,id=tls0,dir=$WORK/pki,endpoint=server" --tls-creds tls0)
    rm -f "$1"
    qemu-nbd -r -t -f raw -k "$1" "${extra[@]}" disk.raw &
    pids+=($!)
    for _ in $(seq 200); do [ -S "$1" ] && return; sleep 0.05; done
    echo "qemu-nbd did not start" >&2; exit 1
}
serve "$WORK/plain.sock"
serve "$WORK/tls.sock" tls
tls=(--nbd-tls-ca pki/ca-cert.pem --nbd-tls-cert pki/client-cert.pem --nbd-tls-key pki/client-key.pem)

run() { # run NAME URI [flags…]: a full backup into a fresh vault; prints seconds and MiB/s
    local name=$1 uri=$2; shift 2
    rm -rf data
    "$BV" --data data --quiet vault create v >/dev/null
    local t0 t1
    t0=$(date +%s.%N)
    "$BV" --data data --quiet backup "$uri" --vault v --id bench "$@" >/dev/null
    t1=$(date +%s.%N)
    awk -v n="$name" -v a="$t0" -v b="$t1" -v m="$MIB" \
        'BEGIN { printf "%-6s %7.2f s  %8.1f MiB/s\n", n, b - a, m / (b - a) }'
}
echo "full backup of $MIB MiB of random data over qemu-nbd ($("$BV" --version))"
for _ in $(seq "$RUNS"); do
    run nbd "nbd+unix:///?socket=$WORK/plain.sock"
    run nbds "nbds+unix:///?socket=$WORK/tls.sock" "${tls[@]}"
done

#!/usr/bin/env bash
# Build the blockvault appliance: a bootable x86_64 disk image (qcow2, or an OVA).
#
#   appliance/build-image.sh [--out FILE.qcow2] [--size 8G] [--format qcow2|ova]
#                            [--binary PATH] [--cache DIR] [--nbd-hosts HOST,…]
#
# --nbd-hosts: the NBD servers API callers may back up from or restore onto ([paths]
# nbd_hosts of the shipped config; default none).
#
# Debian bookworm packages only (mmdebstrap), plus the release binary, the systemd unit
# appliance/blockvault.service, /etc/blockvault/blockvault.toml and the first-boot units in
# appliance/firstboot/. No loop devices and no host mounts: every file system is written
# into a file: the boot partition is made as its own file and spliced in with dd, the root
# file system's used blocks are copied into its partition by e2image -ra -O.
#
# Disk layout (MBR, boots with SeaBIOS on -machine pc and q35):
#
#   0         1 MiB                     257 MiB                                 SIZE
#   +---------+-------------------------+---------------------------------------+
#   | MBR     | p1: FAT16 "BVBOOT"      | p2: ext4 "blockvault-root" (/)         |
#   | syslinux| syslinux, vmlinuz,      | Debian bookworm + blockvault           |
#   | mbr.bin | initrd.img, syslinux.cfg| (fstab: root by UUID)                  |
#   +---------+-------------------------+---------------------------------------+
#
# The MBR code is syslinux's mbr.bin; it chains to the active partition p1, whose boot
# sector `syslinux --install` (the mtools variant: works on a plain file) wrote. The
# kernel command line is: root=UUID=<p2> ro console=ttyS0,115200 console=tty0 (kernel
# messages on both; /dev/console, where systemd reports, is the VGA console).
#
# Incremental: the root file system tarball is cached under --cache (default
# ~/.cache/blockvault-appliance) keyed by the package list and the tarball hooks; it is
# rebuilt only when those change. Every step prints how long it took.
#
# Needs (Debian): mmdebstrap, fdisk (sfdisk), syslinux, syslinux-common, mtools,
# dosfstools, e2fsprogs, qemu-utils; cargo unless --binary is given.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out="$repo/blockvault-appliance.qcow2"
size=8G
format=qcow2
binary=""
cache="${XDG_CACHE_HOME:-$HOME/.cache}/blockvault-appliance"
suite=bookworm
mirror="${BLOCKVAULT_MIRROR:-http://deb.debian.org/debian}"

nbd_hosts=""

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --cache) cache=$2; shift 2 ;;
        --nbd-hosts) nbd_hosts=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "build-image.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
case "$format" in qcow2|ova) ;; *) echo "build-image.sh: --format must be qcow2 or ova" >&2; exit 2 ;; esac
for t in mmdebstrap sfdisk syslinux mcopy mkfs.vfat mke2fs qemu-img; do
    command -v "$t" >/dev/null || {
        echo "build-image.sh: $t is missing: apt-get install mmdebstrap fdisk syslinux syslinux-common mtools dosfstools e2fsprogs qemu-utils" >&2
        exit 2
    }
done
[ "$(id -u)" = 0 ] || { echo "build-image.sh: run as root (mmdebstrap and mke2fs -d keep file owners)" >&2; exit 2; }

t_all=$(date +%s.%N)
step_start=""
step() { step_start=$(date +%s.%N); echo "==> $*"; }
secs_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
done_step() { echo "    $(secs_since "$step_start") s"; }

# --- 1. the root file system tarball (cached) ------------------------------------------
packages=(
    linux-image-amd64 initramfs-tools systemd systemd-sysv udev dbus
    iproute2 procps util-linux e2fsprogs openssl ca-certificates
    qemu-utils nbdkit less
)
# Hooks run inside the tarball build; changing them changes the cache key.
hooks=(
    'chroot "$1" groupadd -f -r kvm'
    'chroot "$1" useradd --system --home-dir /var/lib/blockvault --shell /usr/sbin/nologin --user-group --groups kvm blockvault'
    'chroot "$1" systemctl enable systemd-networkd'
    'echo blockvault > "$1/etc/hostname"'
)
key=$( { echo "$suite $mirror"; printf '%s\n' "${packages[@]}" "${hooks[@]}"; } | sha256sum | cut -c1-16)
tarball="$cache/rootfs-$suite-$key.tar"
mkdir -p "$cache"
step "root file system tarball ($tarball)"
if [ -f "$tarball" ]; then
    echo "    cached"
else
    hook_args=()
    for h in "${hooks[@]}"; do hook_args+=(--customize-hook="$h"); done
    include=$(IFS=,; echo "${packages[*]}")
    mmdebstrap --mode=root --variant=minbase --include="$include" \
        --components=main "${hook_args[@]}" "$suite" "$cache/partial-$key.tar" "$mirror"
    mv "$cache/partial-$key.tar" "$tarball"
fi
done_step

# --- 2. the binary -------------------------------------------------------------------
step "release binary"
if [ -z "$binary" ]; then
    (cd "$repo" && cargo build --release --quiet)
    binary="$repo/target/release/blockvault"
fi
[ -x "$binary" ] || { echo "build-image.sh: $binary is not an executable" >&2; exit 2; }
done_step

work=$(mktemp -d "${TMPDIR:-/tmp}/blockvault-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"

# --- 3. staging tree: tarball + blockvault ------------------------------------------------
step "staging tree"
mkdir -p "$root"
tar -C "$root" --numeric-owner -xpf "$tarball"
root_uuid=$(cat /proc/sys/kernel/random/uuid)
install -m 0755 "$binary" "$root/usr/local/bin/blockvault"
install -m 0644 "$here/blockvault.service" "$root/etc/systemd/system/blockvault.service"
install -d -m 0755 "$root/etc/blockvault"
# The shipped config, with the API on every address (the appliance is driven over the
# network; only [server] listen: [instant] has its own) and the example webhook, mirror
# appliance and S3 endpoint commented out (they name hosts and files that do not exist).
awk -v nbd="$nbd_hosts" '
    /^\[/ { section = $0 }
    section == "[server]" && /^listen = / { print "listen = \"0.0.0.0:8420\""; next }
    /^\[remote\.|^\[s3\./ { skip = 1 }
    /^nbd_hosts = / && nbd != "" { n = split(nbd, h, ","); line = "nbd_hosts = ["
        for (i = 1; i <= n; i++) line = line (i > 1 ? ", " : "") "\"" h[i] "\""
        print line "]"; next }
    /^\[\[alerts\.webhook\]\]/ { skip = 1 }
    /^# Freeze\/thaw hook sets/ { skip = 0 }
    { if (skip && $0 !~ /^#/ && $0 != "") print "# " $0; else print }
' "$here/blockvault.toml" > "$root/etc/blockvault/blockvault.toml"
chroot_gid=$(awk -F: '$1 == "blockvault" { print $3 }' "$root/etc/group")
chown "0:$chroot_gid" "$root/etc/blockvault/blockvault.toml"
chmod 0640 "$root/etc/blockvault/blockvault.toml"
install -m 0755 "$here/firstboot/blockvault-firstboot" "$root/usr/local/sbin/blockvault-firstboot"
install -m 0755 "$here/firstboot/blockvault-banner" "$root/usr/local/sbin/blockvault-banner"
install -m 0644 "$here/firstboot/blockvault-firstboot.service" "$here/firstboot/blockvault-banner.service" \
    "$root/etc/systemd/system/"
install -m 0644 "$here/firstboot/20-wired.network" "$root/etc/systemd/network/20-wired.network"
install -d -m 0755 "$root/etc/systemd/system/multi-user.target.wants"
for u in blockvault.service blockvault-firstboot.service blockvault-banner.service; do
    ln -sf "/etc/systemd/system/$u" "$root/etc/systemd/system/multi-user.target.wants/$u"
done
install -d -m 2770 -g "$chroot_gid" "$root/var/lib/blockvault-scratch"
install -d -m 0750 "$root/var/lib/blockvault"
chown "$(awk -F: '$1 == "blockvault" { print $3 }' "$root/etc/passwd"):$chroot_gid" "$root/var/lib/blockvault"
install -d -m 0755 "$root/usr/share/doc/blockvault"
install -m 0644 "$repo/README.md" "$root/usr/share/doc/blockvault/README.md"
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$root_uuid" > "$root/etc/fstab"
# No console password is set: the appliance is driven over its API; root can be given a
# password from the boot loader (init=/bin/sh) or through a cloud-init-free rescue.
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
done_step

# --- 4. partitions as files ----------------------------------------------------------------
mib=$((1024 * 1024))
total=$(numfmt --from=iec "$size")
boot_start=$((1 * mib)); boot_size=$((256 * mib))
root_start=$((boot_start + boot_size)); root_size=$(( (total - root_start) / mib * mib ))
[ "$root_size" -ge $((1024 * mib)) ] || { echo "build-image.sh: --size $size is too small (at least 2G)" >&2; exit 2; }

step "boot FAT16 (syslinux, kernel, initrd)"
mkfs.vfat -n BVBOOT -C "$work/boot.fat" $((boot_size / 1024)) >/dev/null
cat > "$work/syslinux.cfg" <<CFG
SERIAL 0 115200
DEFAULT blockvault
PROMPT 0
TIMEOUT 10
LABEL blockvault
    LINUX /vmlinuz
    INITRD /initrd.img
    APPEND root=UUID=$root_uuid ro console=ttyS0,115200 console=tty0
CFG
mcopy -i "$work/boot.fat" "$kernel" ::/vmlinuz
mcopy -i "$work/boot.fat" "$initrd" ::/initrd.img
mcopy -i "$work/boot.fat" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$work/boot.fat"
done_step

# --- 5. the disk: partition table, MBR code, partitions spliced in ----------------------
raw="$work/disk.raw"
step "disk image: partition table (sfdisk), MBR code, boot partition (dd)"
truncate -s "$total" "$raw"
sfdisk -q "$raw" <<PT
label: dos
start=$((boot_start / 512)), size=$((boot_size / 512)), type=6, bootable
start=$((root_start / 512)), size=$((root_size / 512)), type=83
PT
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/boot.fat" of="$raw" bs=1M seek=$((boot_start / mib)) conv=notrunc,sparse status=none
rm -f "$work/boot.fat"
done_step

# The root file system is made as its own file and its used blocks only are copied into
# p2 (e2image -ra -O: no pass over gigabytes of free space).
step "root ext4 ($((root_size / mib)) MiB, mke2fs -d)"
truncate -s "$root_size" "$work/root.ext4"
mke2fs -q -t ext4 -L blockvault-root -U "$root_uuid" -d "$root" "$work/root.ext4"
rm -rf "$root"
done_step
step "root ext4 into p2 (e2image -ra: used blocks only)"
e2image -ra -O "$root_start" "$work/root.ext4" "$raw"
rm -f "$work/root.ext4"
done_step

case "$format" in
qcow2)
    step "qcow2 ($out)"
    qemu-img convert -f raw -O qcow2 "$raw" "$out.tmp"
    mv "$out.tmp" "$out"
    done_step
    ;;
ova)
    # The exporter is blockvault's own: back the disk up into a throwaway vault and
    # restore it as a full-server OVA (OVF + streamOptimized VMDK).
    step "ova ($out)"
    bv="$work/bv"
    "$binary" --data "$bv" -q vault create export
    "$binary" --data "$bv" -q backup --vault export --id blockvault-appliance --name appliance \
        "raw:$raw" >/dev/null
    rm -f "$raw"
    "$binary" --data "$bv" -q restore appliance --image ova --to "$out.tmp.ova"
    mv "$out.tmp.ova" "$out"
    done_step
    ;;
esac

printf '==> %s: %s on disk, %s virtual; built in %s s\n' "$out" \
    "$(du -h "$out" | cut -f1)" "$size" "$(secs_since "$t_all")"

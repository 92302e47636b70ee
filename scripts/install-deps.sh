#!/usr/bin/env bash
# Installs what virtio-scsid needs at run time and in tests, if it is missing:
# qemu-system-x86 (the machine whose virtio-scsi device the daemon drives), qemu-utils, and the
# NBD clients the gateway tests use: libnbd-bin (nbdinfo, nbdcopy) and fio (nbd ioengine), and
# the partitioning tools gdisk and fdisk (partition and RedoxFS tests), and glibc's static
# libraries (libc6-dev) for the statically linked binaries the Linux-guest tests boot.
# Those tests fetch their guest kernel and busybox themselves (Debian's linux-image-amd64 and
# busybox-static, with `apt-get download` into target/guest-cache: nothing is installed on the
# host for them; see tests/src/guest.rs).
# Debian/Ubuntu: apt-get, as root (or through sudo when not root).
set -euo pipefail

missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
command -v fio >/dev/null 2>&1 || missing+=(fio)
# Partitioning tools the partition and RedoxFS tests run (in /usr/sbin, not always on PATH):
# gdisk (sgdisk: GPT) and fdisk (fdisk, sfdisk: GPT on 4096-byte sectors, MBR).
PATH="$PATH:/usr/sbin:/sbin" command -v sgdisk >/dev/null 2>&1 || missing+=(gdisk)
PATH="$PATH:/usr/sbin:/sbin" command -v sfdisk >/dev/null 2>&1 || missing+=(fdisk)
# glibc's static libc.a (+crt-static builds of virtio-scsid and vscsi for the test guests).
[ -e "/usr/lib/$(uname -m)-linux-gnu/libc.a" ] || missing+=(libc6-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "need root to run: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v qemu-system-x86_64 >/dev/null

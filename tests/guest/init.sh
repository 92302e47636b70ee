#!/bin/sh
# /init of the Linux test guests (tests/src/guest.rs puts it in every initramfs).
#
# Mounts proc, sys and devtmpfs, installs busybox's applets, loads the modules the test asked
# for (uio, uio_pci_generic), reads the test's parameters from /etc/guest.env, then runs the
# test's own script /test.sh with `set -e` in a subshell. The host reads the results from the
# serial console: `VSCSI-GUEST: key=value` lines (the `mark` function), then one final
# `VSCSI-GUEST-DONE rc=N` line, and the guest powers off. Helpers for the test scripts are
# defined here: mark, wait_for_file, show, start_daemon, stop_daemon,
# give_to_kernel, seq_pattern, sha, run_plan, check_writes, and the read/write functions
# kernel_read, kernel_write (sd) and scheme_read, scheme_write (the daemon, through vscsi).

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Kernel warnings would interleave with our lines on the console; dmesg keeps them.
echo 1 > /proc/sys/kernel/printk

# One result for the host: `VSCSI-GUEST: KEY=VALUE` on a line of its own.
mark() {
    echo "VSCSI-GUEST: $1=$2"
}

# wait_for_file PATH SECONDS: waits until PATH exists.
wait_for_file() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ "$i" -le $(($2 * 10)) ] || { echo "timed out waiting for $1" >&2; return 1; }
        usleep 100000
    done
}

# show FILE PREFIX: copies FILE to the console, each line prefixed.
show() {
    [ -e "$1" ] && sed "s/^/$2| /" "$1"
    return 0
}

# start_daemon [ARGS...]: starts virtio-scsid on the device at $PCI with the socket $SOCK,
# waits until it serves disk 0 and its socket accepts a listing, and marks `daemon=serving`.
start_daemon() {
    RUST_LOG=${RUST_LOG:-info} virtio-scsid --pci "$PCI" --socket "$SOCK" --queues 2 \
        --allow-any-user "$@" >/tmp/daemon.log 2>&1 &
    DAEMON_PID=$!
    # Up to 120 s for disk 0 and a socket that answers, unless the daemon exits first.
    i=0
    until grep -qF 'virtio-scsid: disk.virtio-scsi:/0 ' /tmp/daemon.log \
        && [ -S "$SOCK" ] && vscsi --socket "$SOCK" ls >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 1200 ] || ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            echo "virtio-scsid is not serving (after $((i / 10)) s)" >&2
            return 1
        fi
        usleep 100000
    done
    mark daemon serving
}

# stop_daemon: SIGTERM (flush every disk, exit), marks `daemon_rc`, shows the daemon's log.
stop_daemon() {
    kill -TERM "$DAEMON_PID"
    daemon_rc=0
    wait "$DAEMON_PID" || daemon_rc=$?
    mark daemon_rc "$daemon_rc"
    show /tmp/daemon.log daemon
    mv /tmp/daemon.log /tmp/daemon.log.shown
}

# give_to_kernel: hands the device at $PCI (wherever it is bound) to the kernel's drivers
# (virtio_pci, virtio_scsi, sd_mod) and waits for /dev/sda.
give_to_kernel() {
    dev=/sys/bus/pci/devices/$PCI
    if [ -e "$dev/driver" ]; then
        echo "$PCI" > "$dev/driver/unbind"
    fi
    # Whichever way the device was given to uio_pci_generic (driver_override or a dynamic id),
    # take it back so that the probe below finds virtio-pci.
    echo > "$dev/driver_override"
    if [ -e /sys/bus/pci/drivers/uio_pci_generic/remove_id ]; then
        ids="$(sed 's/^0x//' "$dev/vendor") $(sed 's/^0x//' "$dev/device")"
        echo "$ids" > /sys/bus/pci/drivers/uio_pci_generic/remove_id 2>/dev/null || true
    fi
    loadmod virtio_pci virtio_scsi sd_mod
    [ -e "$dev/driver" ] || echo "$PCI" > /sys/bus/pci/drivers_probe
    wait_for_file /dev/sda 60
    mark kernel_driver "$(basename "$(readlink "$dev/driver")")"
}

# seq_pattern FIRST LENGTH FILE: the first LENGTH bytes of `seq FIRST ...` (numbers, one a
# line), which the host rebuilds to check the bytes.
seq_pattern() {
    seq "$1" $(($1 + $2)) | head -c "$2" > "$3"
    [ "$(wc -c < "$3")" -eq "$2" ]
}

# sha FILE: the SHA-256 of FILE, in hex.
sha() {
    sha256sum "$1" | cut -d' ' -f1
}

# run_plan READ WRITE: the host's plan of reads and writes. For the I-th entry DISK:OFFSET:LENGTH
# of $READS, `READ DISK OFFSET LENGTH FILE` and marks read_I_sha (the host hashes the same
# bytes of its image). For the I-th entry DISK:OFFSET:LENGTH:FIRST of $WRITES, writes
# `seq_pattern FIRST LENGTH` with `WRITE DISK OFFSET FILE` and marks write_I_sha (the host
# compares its image's bytes with the pattern after power-off). DISK is 0 or 0pM (partition M
# of disk 0, from 0).
run_plan() {
    read_fn=$1
    write_fn=$2
    i=0
    for entry in $READS; do
        set -- $(echo "$entry" | tr : ' ')
        "$read_fn" "$1" "$2" "$3" "/tmp/read_$i"
        [ "$(wc -c < "/tmp/read_$i")" -eq "$3" ] || { echo "short read $entry" >&2; return 1; }
        mark "read_${i}_sha" "$(sha "/tmp/read_$i")"
        i=$((i + 1))
    done
    i=0
    for entry in $WRITES; do
        set -- $(echo "$entry" | tr : ' ')
        seq_pattern "$4" "$3" "/tmp/write_$i"
        "$write_fn" "$1" "$2" "/tmp/write_$i"
        mark "write_${i}_sha" "$(sha "/tmp/write_$i")"
        i=$((i + 1))
    done
}

# check_writes READ PREFIX: reads back every entry of $WRITES with `READ DISK OFFSET LENGTH
# FILE` and marks PREFIX_I_sha.
check_writes() {
    read_fn=$1
    prefix=$2
    i=0
    for entry in $WRITES; do
        set -- $(echo "$entry" | tr : ' ')
        "$read_fn" "$1" "$2" "$3" "/tmp/check_$i"
        mark "${prefix}_${i}_sha" "$(sha "/tmp/check_$i")"
        i=$((i + 1))
    done
}

# The kernel's view of DISK (0 or 0pM): /dev/sda or /dev/sda(M+1).
kdev() {
    case "$1" in
    0) echo /dev/sda ;;
    0p*) echo "/dev/sda$((${1#0p} + 1))" ;;
    *) echo "kdev: no kernel device for disk $1" >&2; return 1 ;;
    esac
}

# Reads and writes through the kernel's driver (sd) and through the daemon (vscsi).
kernel_read() {
    dd if="$(kdev "$1")" of="$4" bs=64k iflag=skip_bytes,count_bytes skip="$2" count="$3" 2>/dev/null
}
kernel_write() {
    dd if="$3" of="$(kdev "$1")" bs=64k oflag=seek_bytes seek="$2" conv=notrunc,fsync 2>/dev/null
}
scheme_read() {
    vscsi --socket "$SOCK" read "disk.virtio-scsi:/$1" --offset "$2" --length "$3" > "$4"
}
scheme_write() {
    vscsi --socket "$SOCK" write "disk.virtio-scsi:/$1" --offset "$2" < "$3"
    vscsi --socket "$SOCK" sync "disk.virtio-scsi:/$1"
}

. /etc/guest.env
mark uname "$(uname -r)"
rc=0
if [ -n "$MODULES" ]; then
    loadmod $MODULES || rc=$?
fi
if [ "$rc" -eq 0 ]; then
    (set -e; . /test.sh)
    rc=$?
fi
if [ "$rc" -ne 0 ]; then
    # The daemon's log, unless stop_daemon showed it already.
    show /tmp/daemon.log daemon
    dmesg | tail -n 30 | sed 's/^/dmesg| /'
fi
sync
echo "VSCSI-GUEST-DONE rc=$rc"
poweroff -f

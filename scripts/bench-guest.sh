#!/usr/bin/env bash
# Owns the in-guest comparison of issue 8: virtio-scsid driving a virtio-scsi PCI device from
# inside a Linux guest (`--pci`, through uio_pci_generic) against Linux's own virtio-scsi driver
# on the same device, in one boot of one QEMU machine (Debian's kernel under KVM if it boots
# there, else TCG; -smp 2, 2 GiB, virtio-scsi-pci with num_queues=2 at 0000:00:04.0, disk 0 a
# 1 GiB null-co drive that reads zeroes, so the figures are the software paths: no storage
# behind them).
#
# In the guest (tests/guest/bench.sh, booted by the ignored test `bench_guest` in
# tests/tests/linux_guest.rs through the harness tests/src/guest.rs; our binaries are built
# statically in release mode into target/guest):
#   1. virtio-scsid --pci 0000:00:04.0 --queues 2, then for each queue depth
#      vscsi bench disk.virtio-scsi:/0 --rw randread --bs 4k --iodepth QD --runtime S --json
#   2. the daemon stops (SIGTERM), the device goes back to the kernel (unbind from
#      uio_pci_generic, clear driver_override, insmod virtio_pci virtio_scsi sd_mod, probe), and
#      fio --filename=/dev/sda --direct=1 --ioengine=io_uring (libaio if this fio lacks it)
#          --rw=randread --bs=4k --iodepth=QD --runtime=S --time_based --lat_percentiles=1
# It prints IOPS and total latency p50/p99 of both, the ratios ours/kernel, the exact commands,
# and writes the figures as JSON.
#
# Usage: scripts/bench-guest.sh [--runtime S] [--qd "1 32"] [--ipc socket|shm|shm-copy]
#            [--daemon-args 'FLAGS'] [--drive 'QEMU-DRIVE-OPTIONS'] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
Usage: scripts/bench-guest.sh [OPTIONS]
  --runtime S     seconds per measurement point (default 10; a run takes ~90 s + 4 x S per QD
                  after the first build of the static binaries)
  --qd "LIST"     queue depths, space-separated (default "1 32")
  --ipc MODE      transport of vscsi bench: socket, shm or shm-copy (default socket)
  --daemon-args F more virtio-scsid flags in the guest (e.g. '--poll-us 200'; default none)
  --drive OPTS    QEMU -drive options of disk 0 (default driver=null-co,size=1G,read-zeroes=on;
                  e.g. file=/path/img.raw,format=raw)
  --json FILE     where to write the results (default target/bench-guest.json)
EOF
}

runtime=10
qds="1 32"
ipc=socket
daemon_args=
drive="driver=null-co,size=1G,read-zeroes=on"
json=target/bench-guest.json
while [ $# -gt 0 ]; do
    case "$1" in
    --runtime) runtime=$2; shift 2 ;;
    --qd) qds=$2; shift 2 ;;
    --ipc) ipc=$2; shift 2 ;;
    --daemon-args) daemon_args=$2; shift 2 ;;
    --drive) drive=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done
case "$json" in /*) ;; *) json="$PWD/$json" ;; esac

scripts/install-deps.sh
export VSCSI_GUEST_BENCH_RUNTIME="$runtime" VSCSI_GUEST_BENCH_QDS="$qds" \
    VSCSI_GUEST_BENCH_IPC="$ipc" VSCSI_GUEST_BENCH_DAEMON_ARGS="$daemon_args" \
    VSCSI_GUEST_BENCH_DRIVE="$drive" VSCSI_GUEST_BENCH_JSON="$json"
set -x
cargo test --locked -p vscsi-tests --test linux_guest bench_guest -- \
    --ignored --exact --nocapture

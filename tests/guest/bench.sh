# Guest half of tests/linux_guest.rs `bench_guest` (scripts/bench-guest.sh; sourced by /init,
# `set -e`): 4 KiB random reads on disk 0 at each queue depth of $QDS for $RUNTIME seconds,
# first through virtio-scsid (`vscsi bench` over the disk.virtio-scsi scheme), then through our
# driver in process (`inproc-bench --engine poll`: one polling thread, no IPC, as SPDK's perf
# drives its drivers), then, after the device is handed back to Linux, through the kernel's
# virtio-scsi driver (fio on /dev/sda, O_DIRECT, $FIO_ENGINE; latency percentiles of
# submission to completion, as ours). Each result is one JSON line (`ours_qdN`, `inproc_qdN`,
# `kernel_qdN`), each command is marked too (`cmd_ours_qdN`, `cmd_inproc_qdN`,
# `cmd_kernel_qdN`).
# $DAEMON_ARGS: more flags for virtio-scsid (e.g. --poll-us 200), split on spaces.
# shellcheck disable=SC2086
# The clock every timestamp reads, and what a reading costs (with hpet, each is a system call
# and an emulated MMIO read).
mark clocksource "$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
mark clock_cost "$(inproc-bench --clock-cost)"
# measure NAME COMMAND...: runs COMMAND once per queue depth (each QD in it written @QD@),
# marks the command as cmd_NAME_qdN and its JSON output (one line) as NAME_qdN.
measure() {
    name=$1
    shift
    for qd in $QDS; do
        cmd=$(echo "$*" | sed "s/@QD@/$qd/g")
        mark "cmd_${name}_qd$qd" "$cmd"
        $cmd > /tmp/out.json
        mark "${name}_qd$qd" "$(tr -d '\n' < /tmp/out.json)"
    done
}
start_daemon $DAEMON_ARGS
mark cmd_daemon "virtio-scsid --pci $PCI --socket $SOCK --queues 2 --allow-any-user $DAEMON_ARGS"
measure ours vscsi --socket "$SOCK" bench disk.virtio-scsi:/0 --rw randread --bs 4k \
    --iodepth @QD@ --runtime "$RUNTIME" --ipc "$IPC" --json
stop_daemon
# The device is still bound to uio_pci_generic; inproc-bench takes it as the daemon did.
measure inproc inproc-bench --pci "$PCI" --queues 2 --engine poll --zero-copy --rw randread \
    --bs 4096 --iodepth @QD@ --runtime "$RUNTIME"
give_to_kernel
measure kernel fio --name=randread --filename=/dev/sda --direct=1 --ioengine="$FIO_ENGINE" \
    --rw=randread --bs=4k --iodepth=@QD@ --runtime="$RUNTIME" --time_based \
    --clocksource=clock_gettime --lat_percentiles=1 --output-format=json

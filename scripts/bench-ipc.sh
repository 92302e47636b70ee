#!/usr/bin/env bash
# IPC benchmark (BENCHMARKS.md, issue 4): the same QEMU machine and driver driven (a) in
# process, by threads calling the driver directly (`inproc-bench`), and (b) by a separate
# client process through the daemon over the zero-copy shared-memory IPC (`--ipc shm`), the
# shared-memory path with one copy (`shm-copy`) and the socket path (`socket`). The disk is
# QEMU's null-co (no storage cost). 32 requests in flight for the throughput rows, 1 for the
# latency row. Rounds are interleaved; figures are medians; ratios are against the in-process
# client of the same round set.
# Usage: scripts/bench-ipc.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-6}
scripts/install-deps.sh
cargo build --release --locked -p virtio-scsid -p vscsi >&2
dir=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
disk='driver=null-co,size=1G'
res="$dir/results"
: > "$res"
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/" <<<"$2"; }
start_daemon() {
    target/release/virtio-scsid --disk-qemu "$disk" --queues 4 --arena-mib 32 \
        --socket "$dir/sock" --state-dir "$dir/state" > "$dir/daemon.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
        grep -q '^virtio-scsid: ready' "$dir/daemon.log" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$dir/daemon.log" >&2
    exit 1
}
# name rw bs jobs iodepth
cases=("randread4k randread 4096 4 8" "randwrite4k randwrite 4096 4 8" "read128k read 131072 4 8" "qd1 randread 4096 1 1")
for round in $(seq 1 "$rounds"); do
    for c in "${cases[@]}"; do
        set -- $c
        name=$1 rw=$2 bs=$3 jobs=$4 depth=$5
        j=$(target/release/inproc-bench --disk-qemu "$disk" --rw "$rw" --bs "$bs" \
            --jobs "$jobs" --iodepth "$depth" --runtime "$secs" 2>/dev/null | tail -1)
        echo "$name inproc $(field iops "$j") $(field lat_p50_us "$j") $(field lat_p99_us "$j")" >> "$res"
        start_daemon
        for ipc in shm shm-copy socket; do
            j=$(target/release/vscsi --socket "$dir/sock" bench /0 --ipc "$ipc" --rw "$rw" \
                --bs "$bs" --jobs "$jobs" --iodepth "$depth" --runtime "$secs" --json)
            echo "$name $ipc $(field iops "$j") $(field lat_p50_us "$j") $(field lat_p99_us "$j")" >> "$res"
        done
        kill -TERM "$pid"; wait "$pid" || true; pid=
        echo "round $round: $name done" >&2
    done
done
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf "%-12s %-9s %12s %10s %10s %10s\n" case client "IOPS(med)" "vs inproc" "p50 us" "p99 us"
for c in "${cases[@]}"; do
    set -- $c
    base=$(awk -v n="$1" '$1==n && $2=="inproc"{print $3}' "$res" | median)
    for cl in inproc shm shm-copy socket; do
        iops=$(awk -v n="$1" -v c="$cl" '$1==n && $2==c{print $3}' "$res" | median)
        p50=$(awk -v n="$1" -v c="$cl" '$1==n && $2==c{print $4}' "$res" | median)
        p99=$(awk -v n="$1" -v c="$cl" '$1==n && $2==c{print $5}' "$res" | median)
        awk -v n="$1" -v c="$cl" -v i="$iops" -v b="$base" -v p="$p50" -v q="$p99" \
            'BEGIN{printf "%-12s %-9s %12.0f %9.3fx %10.1f %10.1f\n", n, c, i, i/b, p, q}'
    done
done

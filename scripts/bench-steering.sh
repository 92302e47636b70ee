#!/usr/bin/env bash
# End-to-end steering benchmark (BENCHMARKS.md): 4 KiB random reads, 32 requests in flight
# (4 jobs x iodepth 8, one disk = one SCSI target per job), through client -> IPC -> scheme ->
# driver -> QEMU's virtio-scsi, for each steering configuration, all in one run. The
# configurations are interleaved round by round so machine noise hits them alike; the figure
# per configuration is the median over rounds, reported as a ratio to the `single` baseline
# measured in the same run.
# Usage: scripts/bench-steering.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-10}
scripts/install-deps.sh
cargo build --release --locked -p virtio-scsid -p vscsi >&2
dir=$(mktemp -d /dev/shm/vscsi-bench-XXXXXX 2>/dev/null || mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
disks=()
paths=()
for i in 0 1 2 3; do
    truncate -s 1G "$dir/d$i.img"
    disks+=(--disk "$dir/d$i.img")
    paths+=("disk.virtio-scsi:/$i")
done
configs=("single seqcount" "per-cpu seqcount" "per-target seqcount" "per-target spinlock")
results="$dir/results"
: > "$results"
for round in $(seq 1 "$rounds"); do
    for c in "${configs[@]}"; do
        set -- $c
        target/release/virtio-scsid "${disks[@]}" --queues 4 --steering "$1" --steering-lock "$2" \
            --socket "$dir/sock" --state-dir "$dir/state" > "$dir/daemon.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 600); do
            grep -q '^virtio-scsid: ready' "$dir/daemon.log" && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if ! grep -q '^virtio-scsid: ready' "$dir/daemon.log"; then
            echo "the daemon did not start ($1/$2):" >&2
            cat "$dir/daemon.log" >&2
            exit 1
        fi
        json=$(target/release/vscsi --socket "$dir/sock" bench "${paths[@]}" --rw randread --bs 4K \
            --jobs 4 --iodepth 8 --runtime "$secs" --json)
        kill -TERM "$pid"; wait "$pid" || true; pid=
        iops=$(sed -E 's/.*"iops":([0-9.]+).*/\1/' <<<"$json")
        p99=$(sed -E 's/.*"lat_p99_us":([0-9.]+).*/\1/' <<<"$json")
        echo "round $round: $1/$2 $iops IOPS p99 $p99 us" >&2
        echo "$1/$2 $iops $p99" >> "$results"
    done
done
echo "config                 median IOPS   vs single   p99 us (median)"
base=$(awk '$1=="single/seqcount"{print $2}' "$results" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
for c in "${configs[@]}"; do
    set -- $c
    k="$1/$2"
    med=$(awk -v k="$k" '$1==k{print $2}' "$results" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
    p99=$(awk -v k="$k" '$1==k{print $3}' "$results" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
    awk -v k="$k" -v m="$med" -v b="$base" -v p="$p99" 'BEGIN{printf "%-22s %11.0f   %8.3fx   %8.0f\n", k, m, m/b, p}'
done

#!/usr/bin/env bash
# Owns the four-way IOPS comparison of issue 7 (BENCHMARKS.md, docs/bench-qd.png): in one run on
# one raw image, 4 KiB random reads at several queue depths through
#   1. fio on the image file itself (io_uring; libaio if this fio lacks it): the host limit,
#   2. qemu-img bench on the same file (QEMU's block layer alone, no device, no driver),
#   3. fio --ioengine=nbd through our NBD gateway (vscsi nbd -> daemon -> QEMU virtio-scsi),
#   4. vscsi bench through the disk.virtio-scsi scheme (client library -> daemon -> QEMU),
# then prints a table of IOPS with ratios against (1) from this same run, and writes a CSV.
# With --rounds N the sweep is repeated N times (tools interleaved, so machine noise hits them
# alike) and each figure is the median over the rounds.
# With --plot it draws IOPS against queue depth (gnuplot, installed with apt-get if missing).
#
# Page cache, not O_DIRECT: the daemon's QEMU opens the image with QEMU's default cache mode
# (cache=writeback: no O_DIRECT), so fio runs with --direct=0 and qemu-img bench with
# -t writeback, and the image is read once before measuring: all four read the same resident
# page-cache pages, and the differences are the software paths. The image lives on /dev/shm when
# it has room (tmpfs: the page cache is the storage), else in a temp dir.
#
# Usage: scripts/bench-compare.sh [--runtime S] [--qd "1 4 16 32 64"] [--size 1G] [--csv FILE]
#            [--rounds N] [--plot] [--png FILE] [--bin-dir DIR] [--accel auto|tcg|kvm]
#            [--queues N] [--ipc socket|shm|shm-copy] [--smoke]
#        scripts/bench-compare.sh --plot-only CSV [--png FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
Usage: scripts/bench-compare.sh [OPTIONS]
  --runtime S      seconds per measurement point (default 5; the whole run takes ~25 s per QD)
  --rounds N       repeat the whole sweep N times, report medians (default 1)
  --qd "LIST"      queue depths, space-separated (default "1 4 16 32 64")
  --size SIZE      raw image size (default 1G)
  --csv FILE       CSV to write (default target/bench-compare.csv)
  --plot           also draw IOPS against queue depth to --png (installs gnuplot-nox if missing)
  --png FILE       the plot's file (default docs/bench-qd.png)
  --plot-only CSV  only draw the plot of an existing CSV (no measurement)
  --bin-dir DIR    take virtio-scsid and vscsi from DIR (default: cargo build --release)
  --accel A        the daemon's accelerator: auto, tcg or kvm (default auto)
  --queues N       the daemon's request queues (default 4)
  --ipc MODE       transport of vscsi bench: socket, shm or shm-copy (default socket)
  --smoke          plumbing check: QD 1, 1-second runs, 64 MiB image, no plot
EOF
}

die() { echo "bench-compare: $*" >&2; exit 1; }

runtime=5
rounds=1
qds="1 4 16 32 64"
size=1G
csv=target/bench-compare.csv
plot=0
png=docs/bench-qd.png
plot_only=
bin_dir=
accel=auto
queues=4
ipc=socket
smoke=0
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=${2:?--runtime needs seconds}; shift 2 ;;
        --rounds) rounds=${2:?--rounds needs a number}; shift 2 ;;
        --qd) qds=${2:?--qd needs a list}; shift 2 ;;
        --size) size=${2:?--size needs a size}; shift 2 ;;
        --csv) csv=${2:?--csv needs a file}; shift 2 ;;
        --plot) plot=1; shift ;;
        --png) png=${2:?--png needs a file}; shift 2 ;;
        --plot-only) plot_only=${2:?--plot-only needs a CSV}; shift 2 ;;
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --accel) accel=${2:?--accel needs a value}; shift 2 ;;
        --queues) queues=${2:?--queues needs a number}; shift 2 ;;
        --ipc) ipc=${2:?--ipc needs a mode}; shift 2 ;;
        --smoke) smoke=1; runtime=1; qds=1; size=64M; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$runtime" =~ ^[0-9]+$ ]] && [ "$runtime" -ge 1 ] || die "--runtime must be whole seconds >= 1"
[[ "$rounds" =~ ^[0-9]+$ ]] && [ "$rounds" -ge 1 ] || die "--rounds must be a number >= 1"
for qd in $qds; do
    [[ "$qd" =~ ^[0-9]+$ ]] && [ "$qd" -ge 1 ] || die "--qd: '$qd' is not a queue depth"
done
[ -n "$qds" ] || die "--qd is empty"

# Installs gnuplot-nox with apt-get if gnuplot is missing (only when plotting is asked for).
need_gnuplot() {
    command -v gnuplot >/dev/null 2>&1 && return 0
    echo "bench-compare: installing gnuplot-nox" >&2
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "gnuplot is missing: apt-get install gnuplot-nox (as root)"
        sudo=(sudo)
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        gnuplot-nox >/dev/null
    command -v gnuplot >/dev/null 2>&1 || die "gnuplot-nox installed but gnuplot is not on PATH"
}

# draw CSV PNG: IOPS against queue depth, one line per tool, log-log.
draw() {
    local data=$1 out=$2
    [ -f "$data" ] || die "no such CSV: $data"
    need_gnuplot
    local header host_name title
    header=$(head -n 1 "$data")
    [[ "$header" == qd,fio_* ]] || die "$data is not a bench-compare CSV (header: $header)"
    host_name=$(cut -d, -f2 <<<"$header")
    host_name=${host_name#fio_}
    title=$(sed -n 's/^# //p' "${data%.csv}.txt" 2>/dev/null | head -n 1)
    [ -n "$title" ] || title="4 KiB random reads, one raw image"
    mkdir -p "$(dirname "$out")"
    local term=png
    gnuplot -e 'set terminal' 2>&1 | grep -q pngcairo && term=pngcairo
    gnuplot <<EOF || die "gnuplot failed"
set terminal $term size 900,680 noenhanced font "sans,11"
set output "$out"
set datafile separator ","
set title "4 KiB random reads: IOPS against queue depth\n$title"
set xlabel "queue depth (requests in flight, one job)"
set ylabel "IOPS (log scale)"
set logscale x 2
set logscale y 10
set format y "%.0s%c"
set grid xtics ytics mytics
set key below box width 2 height 0.5
set bmargin 8
set xrange [0.7:92]
plot "$data" using 1:2 skip 1 with linespoints lw 2 pt 7 ps 1.2 title "fio $host_name on the image (host limit)", \\
     "$data" using 1:3 skip 1 with linespoints lw 2 pt 5 ps 1.2 title "qemu-img bench (QEMU block layer)", \\
     "$data" using 1:4 skip 1 with linespoints lw 2 pt 9 ps 1.4 title "fio nbd via vscsi nbd gateway", \\
     "$data" using 1:5 skip 1 with linespoints lw 2 pt 11 ps 1.4 title "vscsi bench via disk.virtio-scsi"
EOF
    echo "bench-compare: plot written to $out" >&2
}

if [ -n "$plot_only" ]; then
    draw "$plot_only" "$png"
    exit 0
fi

scripts/install-deps.sh
if [ -n "$bin_dir" ]; then
    daemon_bin=$bin_dir/virtio-scsid
    vscsi_bin=$bin_dir/vscsi
else
    cargo build --release --locked -p virtio-scsid -p vscsi >&2
    daemon_bin=target/release/virtio-scsid
    vscsi_bin=target/release/vscsi
fi
[ -x "$daemon_bin" ] || die "$daemon_bin is not built"
[ -x "$vscsi_bin" ] || die "$vscsi_bin is not built"
if [ "$plot" = 1 ]; then need_gnuplot; fi

bytes=$(numfmt --from=iec "$size" 2>/dev/null) || die "--size: '$size' is not a size (e.g. 1G)"
[ $((bytes % (1 << 20))) -eq 0 ] && [ "$bytes" -ge $((16 << 20)) ] \
    || die "--size must be a whole number of MiB, at least 16M"
mib=$((bytes >> 20))

# The image on tmpfs when it has room for it plus 256 MiB.
shm_free_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }') || shm_free_kib=0
if [ "${shm_free_kib:-0}" -gt $(((mib + 256) * 1024)) ]; then
    dir=$(mktemp -d /dev/shm/vscsi-bench-compare-XXXXXX)
else
    dir=$(mktemp -d "${TMPDIR:-/tmp}/vscsi-bench-compare-XXXXXX")
fi
fs_type=$(stat -f -c %T "$dir")
daemon_pid=
gateway_pid=
qemu_pid=

# Stops a process we started: SIGTERM, up to 20 s, then SIGKILL.
stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$gateway_pid"
    stop_pid "$daemon_pid"
    # The daemon stops its QEMU; if it was killed, QEMU may be left: end it by its pid.
    if [ -n "$qemu_pid" ] && grep -q '^qemu' "/proc/$qemu_pid/comm" 2>/dev/null; then
        kill -KILL "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# show_log FILE: its last lines on stderr (after a failure).
show_log() { echo "--- last lines of $(basename "$1"):" >&2; tail -n 20 "$1" >&2 || true; }

# Waits up to 120 s for a line starting with $2 in log $1 while process $3 lives.
wait_ready() {
    local log=$1 prefix=$2 pid=$3
    for _ in $(seq 1 1200); do
        grep -q "^$prefix" "$log" && return 0
        kill -0 "$pid" 2>/dev/null || { show_log "$log"; die "$prefix: the process exited"; }
        sleep 0.1
    done
    show_log "$log"
    die "no '$prefix' line within 120 s"
}

img=$dir/disk.img
echo "bench-compare: writing a ${mib} MiB raw image in $dir ($fs_type)" >&2
# Zeros written for real (not a sparse file, not fallocate): every read copies a real page.
dd if=/dev/zero of="$img" bs=1M count="$mib" status=none
cat "$img" >/dev/null # resident in the page cache before anything measures

# The host engine: io_uring when this fio and kernel have it, else libaio.
engine=io_uring
if ! fio --name=probe --filename="$img" --ioengine=io_uring --rw=randread --bs=4k --iodepth=2 \
    --direct=0 --size=1M --io_size=64k --invalidate=0 --output=/dev/null >/dev/null 2>&1; then
    engine=libaio
    echo "bench-compare: this fio/kernel has no usable io_uring; the host limit is measured with libaio" >&2
fi

# fio_iops JSON: IOPS of the first job's reads (the first "iops" after "read" : {); fails when
# fio reported an error.
fio_iops() {
    awk '/"error" : [1-9]/ { bad = 1 }
         /"read" : \{/ { r = 1 }
         r && /"iops" :/ && !done { v = $3; gsub(/[ ,]/, "", v); done = 1 }
         END { if (bad || v == "") exit 1; print v }' "$1"
}

fio_common=(--rw=randread --bs=4k --runtime="$runtime" --time_based --norandommap
    --randrepeat=0 --numjobs=1 --output-format=json)

measure_host() {
    local qd=$1 out=$dir/fio-host-$1.json
    fio --name=host --filename="$img" --ioengine="$engine" --direct=0 --invalidate=0 \
        --iodepth="$qd" "${fio_common[@]}" >"$out" 2>"$dir/fio-host.err" \
        || { show_log "$dir/fio-host.err"; die "fio $engine failed at QD $qd"; }
    fio_iops "$out" || { show_log "$out"; die "no IOPS in fio's output (QD $qd)"; }
}

# qemu-img bench counts requests, not seconds: a short calibration run, then a run of
# ~runtime seconds. It reads at a fixed stride: an odd number of 4 KiB blocks near 0.38 of the
# image (wrapping modulo its size), so successive reads are spread over the image instead of
# sequential. -U: the daemon's QEMU has the image open.
qemu_img_run() {
    local qd=$1 count=$2 out
    out=$(qemu-img bench -U -f raw -t writeback -i threads -d "$qd" -s 4k -S "$stride" \
        -c "$count" "$img" 2>&1) || { echo "$out" >&2; die "qemu-img bench failed at QD $qd"; }
    local secs
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out")
    [ -n "$secs" ] || { echo "$out" >&2; die "no 'Run completed in' line from qemu-img bench"; }
    awk -v c="$count" -v s="$secs" 'BEGIN { if (s <= 0) s = 0.001; printf "%.1f\n", c / s }'
}
blocks=$((bytes / 4096))
stride_blocks=$(((blocks * 38 / 100) | 1))
stride=$((stride_blocks * 4096))
measure_qemu_img() {
    local qd=$1 rate count
    rate=$(qemu_img_run "$qd" $((smoke ? 2000 : 20000)))
    count=$(awk -v r="$rate" -v t="$runtime" 'BEGIN { c = int(r * t); if (c < 1000) c = 1000; print c }')
    qemu_img_run "$qd" "$count"
}

measure_nbd() {
    local qd=$1 out=$dir/fio-nbd-$1.json
    fio --name=nbd --ioengine=nbd --uri="nbd+unix:///0?socket=$dir/nbd.sock" --iodepth="$qd" \
        "${fio_common[@]}" >"$out" 2>"$dir/fio-nbd.err" \
        || { show_log "$dir/fio-nbd.err"; show_log "$dir/gateway.log"; die "fio nbd failed at QD $qd"; }
    fio_iops "$out" || { show_log "$out"; die "no IOPS in fio nbd's output (QD $qd)"; }
}

measure_vscsi() {
    local qd=$1 json
    json=$("$vscsi_bin" --socket "$dir/sock" bench disk.virtio-scsi:/0 --rw randread --bs 4K \
        --iodepth "$qd" --jobs 1 --runtime "$runtime" --ipc "$ipc" --json 2>"$dir/vscsi-bench.err") \
        || { show_log "$dir/vscsi-bench.err"; show_log "$dir/daemon.log"; die "vscsi bench failed at QD $qd"; }
    sed -nE 's/.*"iops":([0-9.]+).*/\1/p' <<<"$json" | grep . \
        || die "no iops in vscsi bench's output: $json"
}

# The daemon on the image, and the NBD gateway in front of it.
"$daemon_bin" --disk "$img" --queues "$queues" --accel "$accel" --socket "$dir/sock" \
    --state-dir "$dir/state" >"$dir/daemon.log" 2>&1 &
daemon_pid=$!
wait_ready "$dir/daemon.log" "virtio-scsid: ready" "$daemon_pid"
qemu_pid=$(sed -n 's/.*QEMU pid \([0-9]*\).*/\1/p' "$dir/daemon.log" | head -n 1)
"$vscsi_bin" --socket "$dir/sock" nbd --listen "unix:$dir/nbd.sock" >"$dir/gateway.log" 2>&1 &
gateway_pid=$!
wait_ready "$dir/gateway.log" "vscsi nbd: ready" "$gateway_pid"

accel_used=$(grep -o -m1 'accel[= ][a-z]*' "$dir/daemon.log" | head -n 1 || true)
describe="${mib} MiB raw image on $fs_type, ${runtime} s per point"
[ "$rounds" -gt 1 ] && describe+=", median of $rounds rounds"
describe+=", fio --direct=0 ($engine), $(nproc) CPUs"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench-compare: $describe; $(fio --version), $(qemu-img --version | head -n 1)${accel_used:+, daemon $accel_used}" >&2

# One line per round and QD: round qd host qemu-img nbd vscsi.
rounds_file=$dir/rounds
: >"$rounds_file"
for round in $(seq 1 "$rounds"); do
    for qd in $qds; do
        tag="QD $qd"
        [ "$rounds" -gt 1 ] && tag="round $round/$rounds, QD $qd"
        echo "bench-compare: $tag: fio $engine" >&2
        host=$(measure_host "$qd")
        echo "bench-compare: $tag: qemu-img bench" >&2
        qimg=$(measure_qemu_img "$qd")
        echo "bench-compare: $tag: fio nbd through the gateway" >&2
        nbd=$(measure_nbd "$qd")
        echo "bench-compare: $tag: vscsi bench ($ipc)" >&2
        vs=$(measure_vscsi "$qd")
        echo "$round $qd $host $qimg $nbd $vs" >>"$rounds_file"
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# median QD COLUMN: the median over rounds (the lower middle one for an even count).
median() {
    awk -v q="$1" -v c="$2" '$2 == q { print $c }' "$rounds_file" | sort -g \
        | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}
results=$dir/results
: >"$results"
for qd in $qds; do
    echo "$qd $(median "$qd" 3) $(median "$qd" 4) $(median "$qd" 5) $(median "$qd" 6)" >>"$results"
done

mkdir -p "$(dirname "$csv")"
awk -v engine="$engine" 'BEGIN {
        print "qd,fio_" engine ",qemu_img_bench,fio_nbd_gateway,vscsi_bench,ratio_qemu_img,ratio_fio_nbd,ratio_vscsi"
    }
    { h = ($2 > 0) ? $2 : 1
      printf "%d,%.0f,%.0f,%.0f,%.0f,%.4f,%.4f,%.4f\n", $1, $2, $3, $4, $5, $3 / h, $4 / h, $5 / h }' \
    "$results" >"$csv"
# The run's description beside the CSV (the plot's title comes from it).
{
    printf '# %s\n' "$describe"
    printf '# vscsi bench transport: %s; daemon queues: %s; %s; %s\n' "$ipc" "$queues" \
        "$(fio --version)" "$(qemu-img --version | head -n 1)"
    printf '# load average (1/5/15 min) before: %s, after: %s\n' "$load_before" "$load_after"
    printf '# source: %s\n' "$(git describe --always --dirty 2>/dev/null || echo 'not a git checkout')"
    if [ "$rounds" -gt 1 ]; then
        echo "# every round: round qd fio_$engine qemu_img_bench fio_nbd_gateway vscsi_bench"
        sed 's/^/# /' "$rounds_file"
    fi
} >"${csv%.csv}.txt"

echo
echo "4 KiB random reads: $describe"
echo "IOPS per tool; ratios are against fio $engine on the image (the host limit), same run"
awk -v engine="$engine" 'BEGIN {
        printf "%4s %14s %15s %15s %13s | %9s %9s %9s\n", "QD", "fio " engine, "qemu-img bench",
            "fio nbd (gw)", "vscsi bench", "qemu-img", "fio nbd", "vscsi"
    }
    { h = ($2 > 0) ? $2 : 1
      printf "%4d %14.0f %15.0f %15.0f %13.0f | %8.3fx %8.3fx %8.3fx\n", $1, $2, $3, $4, $5,
          $3 / h, $4 / h, $5 / h }' "$results"
echo "load average (1/5/15 min) before: $load_before, after: $load_after"
echo "CSV: $csv (run description: ${csv%.csv}.txt)"

if [ "$plot" = 1 ]; then
    draw "$csv" "$png"
fi

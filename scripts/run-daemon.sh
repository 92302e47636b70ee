#!/usr/bin/env bash
# The main job: builds virtio-scsid and vscsi (release) and runs the daemon on its embedded
# default (a QEMU machine with a sparse 1 GiB disk image it creates in its state directory),
# installing QEMU first if it is missing. Extra arguments go to virtio-scsid.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p virtio-scsid -p vscsi
exec target/release/virtio-scsid "$@"

# Guest half of tests/linux_guest.rs `daemon_pci_in_guest` (sourced by /init, `set -e`):
# virtio-scsid drives the guest's virtio-scsi PCI device through uio_pci_generic (`--pci`),
# the host's plan of reads and writes goes through the disk.virtio-scsi scheme with the vscsi
# CLI, the daemon is stopped (SIGTERM: flush, exit); a second daemon with busy polling
# (`--poll-us`) reads the written ranges back through a shared-memory session; then the device
# is handed back to Linux's own driver, which reads them again (a cross-check of what reached
# the disk).
start_daemon
mark ls "$(vscsi --socket "$SOCK" ls --json)"
run_plan scheme_read scheme_write
stop_daemon
shm_read() {
    vscsi --socket "$SOCK" --shm 4 read "disk.virtio-scsi:/$1" --offset "$2" --length "$3" > "$4"
}
start_daemon --poll-us 2000
check_writes shm_read polled_check
stop_daemon
give_to_kernel
wait_for_file /dev/sda2 30
check_writes kernel_read kernel_check

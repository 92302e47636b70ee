# Guest half of tests/linux_guest.rs `kernel_driver_in_guest` (sourced by /init, `set -e`):
# Linux's own drivers (virtio_pci, virtio_scsi, sd_mod) on the device, the host's plan of reads
# and writes through /dev/sda and /dev/sdaN. Proves the harness, the kernel and its modules,
# and the hand-over that the benchmark's kernel half uses.
give_to_kernel
wait_for_file /dev/sda2 30
run_plan kernel_read kernel_write

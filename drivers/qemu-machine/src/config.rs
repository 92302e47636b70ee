//! What a machine is made of: [`MachineConfig`] (QEMU binary, work directory, RAM, queues,
//! accelerator, extra arguments) and the [`DiskSpec`]s attached as `scsi-hd` devices. Also the
//! checks that reject a configuration QEMU would refuse or misread.

use std::collections::HashSet;
use std::path::PathBuf;

/// Which QEMU accelerator runs the (halting) guest CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accel {
    /// KVM when `/dev/kvm` can be opened read-write (with TCG as QEMU's fallback), else TCG.
    #[default]
    Auto,
    /// The TCG emulator: works everywhere.
    Tcg,
    /// KVM: fails to launch where `/dev/kvm` is missing or not accessible.
    Kvm,
}

/// Image format of a disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw image: byte `N` of the disk is byte `N` of the file.
    #[default]
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU's `format=` option uses.
    pub fn qemu_name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One disk: an image file attached as a `scsi-hd` on the virtio-scsi bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image file.
    pub path: PathBuf,
    /// Image format.
    pub format: DiskFormat,
    /// Logical (and physical) block size, 512 or 4096; `None` is QEMU's default (512).
    pub logical_block_size: Option<u32>,
    /// Attach read-only (`readonly=on`): writes fail with a SCSI error.
    pub readonly: bool,
    /// SCSI target (`scsi-id`), 0..=255.
    pub target: u8,
    /// LUN, 0..=16383.
    pub lun: u16,
    /// QEMU `-drive` options given verbatim instead of `path`/`format`/`readonly` (e.g.
    /// `driver=null-co,size=1G,latency-ns=1000` or a `blkdebug` chain); `if=none,id=dN` is
    /// appended, so they must not set `if` or `id`. Items written `device.NAME=VALUE` are
    /// not drive options but `scsi-hd` properties: they move to the disk's `-device` (e.g.
    /// `device.serial=S1,device.wwn=0x5000c500a1b2c3d4,device.vendor=ACME`); they must not
    /// set what the launcher sets (`drive`, `bus`, `channel`, `scsi-id`, `lun`, `id`).
    pub drive_options: Option<String>,
}

/// Prefix of the `drive_options` items that are `scsi-hd` properties.
pub(crate) const DEVICE_OPTION_PREFIX: &str = "device.";

/// `scsi-hd` properties the launcher sets itself.
const RESERVED_DEVICE_OPTIONS: [&str; 6] = ["drive", "bus", "channel", "scsi-id", "lun", "id"];

/// Splits QEMU options at single commas (a doubled comma is part of an item and stays
/// doubled, so each item can be joined again as it was written).
fn split_options(opts: &str) -> Vec<&str> {
    let b = opts.as_bytes();
    let mut items = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        if b[i] == b',' {
            if b.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            items.push(&opts[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    items.push(&opts[start..]);
    items
}

/// Splits `drive_options` into the `-drive` options and the `scsi-hd` properties written
/// `device.NAME=VALUE` (returned without the prefix), each part joined with commas as
/// written. Either part may be empty.
pub(crate) fn split_drive_options(opts: &str) -> (String, String) {
    let (mut drive, mut device) = (Vec::new(), Vec::new());
    for item in split_options(opts) {
        match item.strip_prefix(DEVICE_OPTION_PREFIX) {
            Some(prop) => device.push(prop),
            None => drive.push(item),
        }
    }
    (drive.join(","), device.join(","))
}

impl DiskSpec {
    /// A writable raw disk at target 0, LUN 0 with the default block size.
    pub fn new(path: impl Into<PathBuf>) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            format: DiskFormat::Raw,
            logical_block_size: None,
            readonly: false,
            target: 0,
            lun: 0,
            drive_options: None,
        }
    }
}

/// Everything [`crate::QemuMachine::launch`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// The QEMU binary, looked up in `PATH` when it has no slash.
    pub qemu_binary: PathBuf,
    /// Existing directory for the sockets, the firmware, the QEMU log (and the RAM file when
    /// `/dev/shm` cannot hold it). Its path must be short enough for Unix socket names.
    pub work_dir: PathBuf,
    /// Guest RAM in MiB (the DMA window is this minus the low megabyte).
    pub ram_mib: u32,
    /// `num_queues` of virtio-scsi-pci: request queues (the device adds control and event).
    pub num_queues: u16,
    /// Disks on the virtio-scsi bus.
    pub disks: Vec<DiskSpec>,
    /// Accelerator.
    pub accel: Accel,
    /// Appended verbatim to QEMU's command line.
    pub extra_args: Vec<String>,
    /// Memory slots for shared windows (client arenas) plugged at run time as `pc-dimm`s.
    pub arena_slots: u32,
    /// Largest shared window in MiB (sizes the machine's `maxmem`).
    pub arena_max_mib: u32,
}

/// Largest RAM accepted: q35 keeps at most this much RAM below 4 GiB when the RAM is smaller
/// than 0xB000_0000 bytes; with more, part of it moves above 4 GiB and guest-physical addresses
/// would no longer equal file offsets.
pub(crate) const MAX_RAM_MIB: u32 = 0xB000_0000 / (1 << 20) - 1;
/// Smallest RAM accepted: the low megabyte is not DMA memory, leave at least one more.
pub(crate) const MIN_RAM_MIB: u32 = 2;

impl MachineConfig {
    /// Defaults (`qemu-system-x86_64`, 128 MiB, 4 request queues, no disks, `Accel::Auto`) in
    /// `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> MachineConfig {
        MachineConfig {
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            work_dir: work_dir.into(),
            ram_mib: 128,
            num_queues: 4,
            disks: Vec::new(),
            accel: Accel::Auto,
            extra_args: Vec::new(),
            arena_slots: 16,
            arena_max_mib: 256,
        }
    }

    /// Adds a disk (builder style).
    pub fn with_disk(mut self, disk: DiskSpec) -> MachineConfig {
        self.disks.push(disk);
        self
    }

    /// Checks what QEMU would reject or misread; `Err` says what is wrong.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(MIN_RAM_MIB..=MAX_RAM_MIB).contains(&self.ram_mib) {
            return Err(format!(
                "ram_mib {} is outside {MIN_RAM_MIB}..={MAX_RAM_MIB}",
                self.ram_mib
            ));
        }
        // virtio-scsi's limit is VIRTIO_QUEUE_MAX (1024) minus the control and event queues.
        if !(1..=1022).contains(&self.num_queues) {
            return Err(format!(
                "num_queues {} is outside 1..=1022",
                self.num_queues
            ));
        }
        let mut seen = HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            if let Some(bs) = d.logical_block_size.filter(|bs| ![512, 4096].contains(bs)) {
                return Err(format!(
                    "disk {i} ({}): logical_block_size {bs} is not 512 or 4096",
                    d.path.display()
                ));
            }
            // QEMU's virtio-scsi bus: max_lun is 16383.
            if d.lun > 16383 {
                return Err(format!(
                    "disk {i} ({}): lun {} is above 16383",
                    d.path.display(),
                    d.lun
                ));
            }
            if let Some(opts) = &d.drive_options {
                let (_, device) = split_drive_options(opts);
                for prop in split_options(&device).into_iter().filter(|p| !p.is_empty()) {
                    let name = prop.split_once('=').map_or(prop, |(n, _)| n);
                    if RESERVED_DEVICE_OPTIONS.contains(&name) {
                        return Err(format!(
                            "disk {i}: {DEVICE_OPTION_PREFIX}{name} is set by the launcher"
                        ));
                    }
                    if !prop.contains('=') {
                        return Err(format!(
                            "disk {i}: {DEVICE_OPTION_PREFIX}{prop} needs a value"
                        ));
                    }
                }
            }
            if !seen.insert((d.target, d.lun)) {
                return Err(format!(
                    "disk {i} ({}): target {} lun {} is used twice",
                    d.path.display(),
                    d.target,
                    d.lun
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = MachineConfig::new("/tmp").with_disk(DiskSpec::new("/a"));
        assert_eq!(ok.validate(), Ok(()));

        let mut c = ok.clone();
        c.ram_mib = 1;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.num_queues = 0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.disks[0].logical_block_size = Some(1024);
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.disks[0].logical_block_size = Some(4096);
        assert_eq!(c.validate(), Ok(()));
        let mut c = ok.clone();
        c.disks[0].lun = 16384;
        assert!(c.validate().is_err());
        let c = ok.clone().with_disk(DiskSpec::new("/b"));
        assert!(c.validate().unwrap_err().contains("used twice"));
        let mut c = ok.clone();
        c.disks[0].drive_options = Some("file=/a,device.serial=S,device.wwn=0x5000".into());
        assert_eq!(c.validate(), Ok(()));
        for bad in [
            "device.lun=3",
            "file=/a,device.scsi-id=1",
            "device.drive=x",
            "device.x",
        ] {
            c.disks[0].drive_options = Some(bad.into());
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn device_options_are_split_from_drive_options() {
        assert_eq!(
            split_drive_options("file=/a,,b.img,format=raw,device.serial=S,,1,discard=unmap"),
            (
                "file=/a,,b.img,format=raw,discard=unmap".to_owned(),
                "serial=S,,1".to_owned()
            )
        );
        assert_eq!(
            split_drive_options("driver=null-co,size=1G"),
            ("driver=null-co,size=1G".to_owned(), String::new())
        );
        assert_eq!(
            split_drive_options("device.vendor=ACME,device.product=A B"),
            (String::new(), "vendor=ACME,product=A B".to_owned())
        );
        assert_eq!(split_options("a,,,b"), vec!["a,,", "b"]);
        assert_eq!(split_options(""), vec![""]);
    }
}

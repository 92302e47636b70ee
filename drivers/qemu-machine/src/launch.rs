//! How QEMU is started: the halting firmware, the accelerator choice, the command line (with
//! QEMU-style escaping of paths), finding the binary, and reading the tail of QEMU's log for
//! error messages. Nothing here spawns a process; `lib.rs` does.

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::config::{Accel, MachineConfig, split_drive_options};

/// Size of the firmware image (`-bios`): 64 KiB, mapped by QEMU just below 4 GiB.
pub(crate) const FIRMWARE_SIZE: usize = 64 * 1024;
/// Offset of the x86 reset vector (0xFFFF_FFF0) in the firmware image.
pub(crate) const RESET_VECTOR: usize = 0xFFF0;
/// `cli; hlt; jmp $-3` (back to the `hlt`): the CPU halts forever with interrupts off, so the
/// guest never touches the devices or RAM that the daemon drives through qtest.
pub(crate) const HALT_CODE: [u8; 4] = [0xFA, 0xF4, 0xEB, 0xFD];

/// Longest path a Unix socket address can hold (`sun_path` is 108 bytes with the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// PCI slot of the virtio-scsi-pci device (`addr=01.0`).
pub(crate) const VIRTIO_SCSI_SLOT: u8 = 1;

/// The firmware image: all 0xFF (erased flash) except the reset vector.
pub(crate) fn firmware_image() -> Vec<u8> {
    let mut image = vec![0xFFu8; FIRMWARE_SIZE];
    image[RESET_VECTOR..RESET_VECTOR + HALT_CODE.len()].copy_from_slice(&HALT_CODE);
    image
}

/// Writes the firmware image to `path`.
pub(crate) fn write_firmware(path: &Path) -> io::Result<()> {
    fs::write(path, firmware_image())
}

/// True when this process can open `/dev/kvm` read-write (what QEMU needs for `-accel kvm`).
pub(crate) fn kvm_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The `-accel` arguments for `accel`. For `Auto` with a usable `/dev/kvm` this is
/// `-accel kvm -accel tcg`: QEMU tries them in order, so a KVM that fails to initialise (nested
/// virtualisation quirks) still falls back to TCG.
pub(crate) fn accel_args(accel: Accel, kvm_usable: bool) -> Vec<OsString> {
    let names: &[&str] = match accel {
        Accel::Tcg => &["tcg"],
        Accel::Kvm => &["kvm"],
        Accel::Auto if kvm_usable => &["kvm", "tcg"],
        Accel::Auto => &["tcg"],
    };
    names
        .iter()
        .flat_map(|n| [OsString::from("-accel"), OsString::from(n)])
        .collect()
}

/// Escapes a value for QEMU's `key=value,...` option syntax: a comma is written twice.
pub(crate) fn escape_opt(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Concatenates pieces (strings and escaped paths) into one argument.
fn arg(parts: &[&OsStr]) -> OsString {
    let mut s = OsString::new();
    for p in parts {
        s.push(p);
    }
    s
}

/// The files of one machine.
#[derive(Clone, Debug)]
pub(crate) struct LaunchPaths {
    /// qtest socket: this process listens, QEMU connects.
    pub qtest_socket: PathBuf,
    /// QMP socket: QEMU listens.
    pub qmp_socket: PathBuf,
    /// Halting firmware.
    pub firmware: PathBuf,
    /// Guest RAM file.
    pub ram_file: PathBuf,
}

impl LaunchPaths {
    /// The standard names in `work_dir` (the RAM file is chosen elsewhere).
    pub(crate) fn in_dir(work_dir: &Path, ram_file: PathBuf) -> LaunchPaths {
        LaunchPaths {
            qtest_socket: work_dir.join("qtest.sock"),
            qmp_socket: work_dir.join("qmp.sock"),
            firmware: work_dir.join("halt-firmware.bin"),
            ram_file,
        }
    }
}

/// QEMU's full argument list (without the binary).
pub(crate) fn qemu_args(
    config: &MachineConfig,
    paths: &LaunchPaths,
    accel: &[OsString],
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: OsString| a.push(s);
    let ram = format!("{}M", config.ram_mib);
    for s in ["-machine", "q35", "-nodefaults", "-display", "none", "-m"] {
        push(s.into());
    }
    if config.arena_slots > 0 {
        let maxmem = u64::from(config.ram_mib)
            + u64::from(config.arena_slots) * u64::from(config.arena_max_mib.max(2));
        push(format!("{ram},slots={},maxmem={maxmem}M", config.arena_slots).into());
    } else {
        push(ram.clone().into());
    }
    push("-object".into());
    push(arg(&[
        OsStr::new("memory-backend-file,id=mem,size="),
        OsStr::new(&ram),
        OsStr::new(",mem-path="),
        &escape_opt(paths.ram_file.as_os_str()),
        OsStr::new(",share=on"),
    ]));
    push("-machine".into());
    push("memory-backend=mem".into());
    // `-bios` takes the file name as it is (no option parsing, so no escaping).
    push("-bios".into());
    push(paths.firmware.clone().into_os_string());
    for s in accel {
        push(s.clone());
    }
    push("-qtest".into());
    push(arg(&[
        OsStr::new("unix:"),
        &escape_opt(paths.qtest_socket.as_os_str()),
    ]));
    push("-qtest-log".into());
    push("/dev/null".into());
    push("-qmp".into());
    push(arg(&[
        OsStr::new("unix:"),
        &escape_opt(paths.qmp_socket.as_os_str()),
        OsStr::new(",server=on,wait=off"),
    ]));
    for s in ["-serial", "none", "-monitor", "none", "-device"] {
        push(s.into());
    }
    push(
        format!(
            "virtio-scsi-pci,id=scsi0,num_queues={},disable-legacy=on,addr={:02x}.0",
            config.num_queues, VIRTIO_SCSI_SLOT
        )
        .into(),
    );
    for (i, d) in config.disks.iter().enumerate() {
        push("-drive".into());
        // `device.NAME=VALUE` items of the drive options are scsi-hd properties.
        let mut device_props = String::new();
        if let Some(opts) = &d.drive_options {
            let (drive, device) = split_drive_options(opts);
            device_props = device;
            if drive.is_empty() {
                push(format!("if=none,id=d{i}").into());
            } else {
                push(format!("{drive},if=none,id=d{i}").into());
            }
        } else {
            let mut drive = arg(&[OsStr::new("file="), &escape_opt(d.path.as_os_str())]);
            drive.push(format!(",if=none,format={},id=d{i}", d.format.qemu_name()));
            if d.readonly {
                drive.push(",readonly=on");
            }
            push(drive);
        }
        push("-device".into());
        let mut dev = format!(
            "scsi-hd,drive=d{i},bus=scsi0.0,channel=0,scsi-id={},lun={}",
            d.target, d.lun
        );
        if let Some(bs) = d.logical_block_size {
            dev.push_str(&format!(
                ",logical_block_size={bs},physical_block_size={bs}"
            ));
        }
        if !device_props.is_empty() {
            dev.push(',');
            dev.push_str(&device_props);
        }
        push(dev.into());
    }
    for s in &config.extra_args {
        push(s.into());
    }
    a
}

/// Finds the QEMU binary: a path with a slash must be a file; a bare name is searched in `PATH`.
pub(crate) fn find_binary(binary: &Path) -> Option<PathBuf> {
    if binary.as_os_str().as_bytes().contains(&b'/') {
        return binary.is_file().then(|| binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// The last `max_lines` lines (at most the last 8 KiB) of QEMU's log, for error messages.
pub(crate) fn log_tail(path: &Path, max_lines: usize) -> String {
    const MAX_BYTES: u64 = 8192;
    let read = || -> io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            let tail = lines[start..].join("\n");
            if tail.trim().is_empty() {
                "(QEMU's log is empty)".to_string()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read QEMU's log {}: {e})", path.display()),
    }
}

/// Checks that a socket path fits a `sockaddr_un`.
pub(crate) fn check_socket_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(format!(
            "socket path {} is {len} bytes, more than the {MAX_SOCKET_PATH} a Unix socket \
             address holds: use a shorter work_dir",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskFormat, DiskSpec};

    #[test]
    fn firmware_has_halt_loop_at_reset_vector() {
        let image = firmware_image();
        assert_eq!(image.len(), 65536);
        assert_eq!(&image[0xFFF0..0xFFF4], &[0xFA, 0xF4, 0xEB, 0xFD]);
    }

    #[test]
    fn commas_are_doubled() {
        assert_eq!(
            escape_opt(OsStr::new("/a,b,,c")),
            OsString::from("/a,,b,,,,c")
        );
        assert_eq!(escape_opt(OsStr::new("/plain")), OsString::from("/plain"));
    }

    #[test]
    fn accel_choice() {
        let s = |v: Vec<OsString>| {
            v.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(s(accel_args(Accel::Auto, true)), "-accel kvm -accel tcg");
        assert_eq!(s(accel_args(Accel::Auto, false)), "-accel tcg");
        assert_eq!(s(accel_args(Accel::Tcg, true)), "-accel tcg");
        assert_eq!(s(accel_args(Accel::Kvm, false)), "-accel kvm");
    }

    #[test]
    fn command_line() {
        let mut config = MachineConfig::new("/w");
        config.ram_mib = 64;
        config.num_queues = 2;
        config.disks.push(DiskSpec {
            path: "/img/a,b.qcow2".into(),
            format: DiskFormat::Qcow2,
            logical_block_size: Some(4096),
            readonly: true,
            target: 3,
            lun: 7,
            drive_options: None,
        });
        config.disks.push(DiskSpec {
            path: PathBuf::new(),
            format: DiskFormat::Raw,
            logical_block_size: None,
            readonly: false,
            target: 4,
            lun: 0,
            drive_options: Some("file=/i,,j,device.serial=S 1,discard=unmap,device.wwn=0x5".into()),
        });
        config.extra_args.push("-S".into());
        let paths = LaunchPaths::in_dir(Path::new("/w,x"), "/dev/shm/r".into());
        let args = qemu_args(&config, &paths, &accel_args(Accel::Tcg, false));
        let line = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            line,
            "-machine q35 -nodefaults -display none -m 64M,slots=16,maxmem=4160M \
             -object memory-backend-file,id=mem,size=64M,mem-path=/dev/shm/r,share=on \
             -machine memory-backend=mem -bios /w,x/halt-firmware.bin -accel tcg \
             -qtest unix:/w,,x/qtest.sock -qtest-log /dev/null \
             -qmp unix:/w,,x/qmp.sock,server=on,wait=off -serial none -monitor none \
             -device virtio-scsi-pci,id=scsi0,num_queues=2,disable-legacy=on,addr=01.0 \
             -drive file=/img/a,,b.qcow2,if=none,format=qcow2,id=d0,readonly=on \
             -device scsi-hd,drive=d0,bus=scsi0.0,channel=0,scsi-id=3,lun=7,\
             logical_block_size=4096,physical_block_size=4096 \
             -drive file=/i,,j,discard=unmap,if=none,id=d1 \
             -device scsi-hd,drive=d1,bus=scsi0.0,channel=0,scsi-id=4,lun=0,serial=S 1,wwn=0x5 -S"
        );
    }

    #[test]
    fn socket_path_length() {
        assert!(check_socket_path(Path::new("/tmp/x/qtest.sock")).is_ok());
        let long = PathBuf::from(format!("/{}", "a".repeat(120)));
        assert!(check_socket_path(&long).is_err());
    }

    #[test]
    fn log_tail_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(&p, "1\n2\n3\n4\n").unwrap();
        assert_eq!(log_tail(&p, 2), "3\n4");
        assert!(log_tail(&dir.path().join("none"), 2).contains("cannot read"));
    }
}

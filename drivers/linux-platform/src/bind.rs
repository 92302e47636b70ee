//! Handing a PCI function to `uio_pci_generic` and back to the kernel's own driver, through
//! sysfs: `driver_override` names the driver the function may bind to, `driver/unbind` releases
//! it from its current driver and `/sys/bus/pci/drivers_probe` binds it again. Nothing here
//! loads a module: the machine's init does (`modprobe uio_pci_generic`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Bdf, Error};

/// The UIO driver for PCI functions with INTx masking.
pub const UIO_DRIVER: &str = "uio_pci_generic";

/// How long a bind may take to show its UIO device.
const BIND_WAIT: Duration = Duration::from_secs(5);

/// A sysfs tree (`/sys` in production, a directory of plain files in tests).
pub(crate) struct Sysfs {
    root: PathBuf,
    /// How long a bind may take to show its UIO device.
    wait: Duration,
}

impl Sysfs {
    pub(crate) fn system() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
            wait: BIND_WAIT,
        }
    }

    /// The function's directory, `/sys/bus/pci/devices/BDF`.
    pub(crate) fn device(&self, bdf: &Bdf) -> PathBuf {
        self.root.join("bus/pci/devices").join(bdf.to_string())
    }

    fn driver_dir(&self, name: &str) -> PathBuf {
        self.root.join("bus/pci/drivers").join(name)
    }

    fn existing_device(&self, bdf: &Bdf) -> Result<PathBuf, Error> {
        let dev = self.device(bdf);
        if dev.exists() {
            Ok(dev)
        } else {
            Err(Error::Setup(format!(
                "no PCI function {bdf} ({} does not exist; `ls /sys/bus/pci/devices` lists them)",
                dev.display()
            )))
        }
    }

    /// The driver the function is bound to now, if any.
    pub(crate) fn current_driver(&self, bdf: &Bdf) -> Result<Option<String>, Error> {
        let link = self.existing_device(bdf)?.join("driver");
        match fs::read_link(&link) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", link.display()))(e)),
        }
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), Error> {
        fs::write(path, value).map_err(Error::io(format!(
            "writing {value:?} to {}",
            path.display()
        )))
    }

    /// Releases the function from its current driver, if it has one.
    fn unbind(&self, bdf: &Bdf) -> Result<(), Error> {
        if let Some(driver) = self.current_driver(bdf)? {
            log::info!("unbinding PCI {bdf} from {driver}");
            self.write(&self.device(bdf).join("driver/unbind"), &bdf.to_string())?;
        }
        Ok(())
    }

    /// Asks the PCI core to bind the function to a driver that will take it.
    fn probe(&self, bdf: &Bdf) -> Result<(), Error> {
        self.write(&self.root.join("bus/pci/drivers_probe"), &bdf.to_string())
    }

    /// The block devices (`sda`, `sda1`, ...) on the function's disks that something uses:
    /// mounted (their `major:minor` in `mountinfo`, the text of `/proc/self/mountinfo`), swap
    /// (`/dev/NAME` in `swaps`, the text of `/proc/swaps`), or held by another block device
    /// (RAID, LVM, dm: `holders/` not empty). Taking the function from its kernel driver would
    /// pull them from under their users. Sysfs symlinks are not followed (they loop), and the
    /// walk is bounded in depth.
    pub(crate) fn disks_in_use(&self, bdf: &Bdf, mountinfo: &str, swaps: &str) -> Vec<String> {
        let mounted: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        let swapped: Vec<&str> = swaps
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let mut found = Vec::new();
        let mut check = |dir: &Path, name: &str| {
            let dev = fs::read_to_string(dir.join("dev")).unwrap_or_default();
            let dev = dev.trim();
            let held = fs::read_dir(dir.join("holders")).is_ok_and(|mut d| d.next().is_some());
            let node = format!("/dev/{name}");
            let why = if !dev.is_empty() && mounted.contains(&dev) {
                Some("mounted")
            } else if swapped.contains(&node.as_str()) {
                Some("swap")
            } else if held {
                Some("held by another block device")
            } else {
                None
            };
            if let Some(why) = why {
                found.push(format!("{name} ({why})"));
            }
        };
        // Disks are `.../block/NAME`; their partitions are subdirectories with a `partition`
        // file.
        let mut stack = vec![(self.device(bdf), 0u32)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue; // files, and symlinks (`driver`, `subsystem`, ...)
                }
                if e.file_name() == "block" {
                    for disk in fs::read_dir(&path).into_iter().flatten().flatten() {
                        let name = disk.file_name().to_string_lossy().into_owned();
                        check(&disk.path(), &name);
                        for part in fs::read_dir(disk.path()).into_iter().flatten().flatten() {
                            if part.path().join("partition").exists() {
                                check(&part.path(), &part.file_name().to_string_lossy());
                            }
                        }
                    }
                } else if depth < 8 {
                    stack.push((path, depth + 1));
                }
            }
        }
        found.sort();
        found
    }

    /// See [`bind_uio`].
    pub(crate) fn bind_uio(&self, bdf: &Bdf) -> Result<PathBuf, Error> {
        let dev = self.existing_device(bdf)?;
        let current = self.current_driver(bdf)?;
        if current.as_deref() != Some(UIO_DRIVER) {
            let busy = self.disks_in_use(
                bdf,
                &fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
                &fs::read_to_string("/proc/swaps").unwrap_or_default(),
            );
            if !busy.is_empty() {
                return Err(Error::Setup(format!(
                    "PCI {bdf} carries disks in use: {}; unmount them (swapoff, stop what holds \
                     them) first: taking the function from {} would pull them from under \
                     their users",
                    busy.join(", "),
                    current.as_deref().unwrap_or("its driver")
                )));
            }
            if !self.driver_dir(UIO_DRIVER).exists() {
                return Err(Error::Setup(format!(
                    "the {UIO_DRIVER} driver is not loaded (no {}): `modprobe {UIO_DRIVER}`, or \
                     insmod uio.ko then uio_pci_generic.ko",
                    self.driver_dir(UIO_DRIVER).display()
                )));
            }
            self.write(&dev.join("driver_override"), UIO_DRIVER)?;
            self.unbind(bdf)?;
            // A failed probe (the driver refused the function) is reported by the check below,
            // which says more than the write's error.
            if let Err(e) = self.probe(bdf) {
                log::warn!("{e}");
            }
            let now = self.current_driver(bdf)?;
            if now.as_deref() != Some(UIO_DRIVER) {
                return Err(Error::Setup(format!(
                    "PCI {bdf} did not bind to {UIO_DRIVER} (bound to {}); the kernel log \
                     (dmesg) says why, e.g. no INTx masking support",
                    now.as_deref().unwrap_or("nothing")
                )));
            }
            log::info!("PCI {bdf} bound to {UIO_DRIVER}");
        }
        self.wait_uio(bdf)
    }

    /// The function's `/dev/uioN`, waiting a little for udev/devtmpfs after a fresh bind.
    pub(crate) fn wait_uio(&self, bdf: &Bdf) -> Result<PathBuf, Error> {
        let dir = self.device(bdf).join("uio");
        let deadline = Instant::now() + self.wait;
        loop {
            let name = fs::read_dir(&dir).ok().and_then(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with("uio"))
            });
            if let Some(name) = name {
                let node = PathBuf::from("/dev").join(&name);
                if node.exists() {
                    return Ok(node);
                }
                if Instant::now() >= deadline {
                    return Err(Error::Setup(format!(
                        "PCI {bdf} is {name}, but {} does not exist (is devtmpfs mounted on /dev?)",
                        node.display()
                    )));
                }
            } else if Instant::now() >= deadline {
                return Err(Error::Setup(format!(
                    "PCI {bdf} is bound to {UIO_DRIVER} but has no UIO device ({} is empty)",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// See [`rebind_kernel`].
    pub(crate) fn rebind_kernel(&self, bdf: &Bdf) -> Result<Option<String>, Error> {
        let dev = self.existing_device(bdf)?;
        // An empty override (a lone newline) clears it.
        self.write(&dev.join("driver_override"), "\n")?;
        self.unbind(bdf)?;
        if let Err(e) = self.probe(bdf) {
            log::warn!("{e}");
        }
        let now = self.current_driver(bdf)?;
        log::info!(
            "PCI {bdf} handed back to the kernel: bound to {}",
            now.as_deref().unwrap_or("nothing")
        );
        Ok(now)
    }
}

/// Makes `uio_pci_generic` the driver of PCI function `bdf` and returns its `/dev/uioN`.
///
/// When the function is bound to another driver (e.g. `virtio-pci`), it is unbound first; then
/// `driver_override` is set to `uio_pci_generic` (so no other driver takes it on a later probe)
/// and `/sys/bus/pci/drivers_probe` binds it. Needs root and the module loaded. Does nothing
/// but find the UIO device when the function is already bound to `uio_pci_generic`.
pub fn bind_uio(bdf: &Bdf) -> Result<PathBuf, Error> {
    Sysfs::system().bind_uio(bdf)
}

/// Releases PCI function `bdf` from its driver (if any), leaving `driver_override` as it is.
pub fn unbind(bdf: &Bdf) -> Result<(), Error> {
    Sysfs::system().unbind(bdf)
}

/// Hands PCI function `bdf` back to the kernel: clears `driver_override`, unbinds it and probes
/// it again, so its usual driver (e.g. `virtio-pci`) takes it. Returns the driver it is bound
/// to afterwards.
pub fn rebind_kernel(bdf: &Bdf) -> Result<Option<String>, Error> {
    Sysfs::system().rebind_kernel(bdf)
}

/// The driver PCI function `bdf` is bound to now, if any.
pub fn current_driver(bdf: &Bdf) -> Result<Option<String>, Error> {
    Sysfs::system().current_driver(bdf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(driver: Option<&str>, uio_loaded: bool) -> (tempfile::TempDir, Sysfs, Bdf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let bdf: Bdf = "0000:00:04.0".parse().expect("bdf");
        let sys = Sysfs {
            root: dir.path().to_path_buf(),
            wait: Duration::from_millis(50),
        };
        let dev = sys.device(&bdf);
        fs::create_dir_all(&dev).expect("device dir");
        fs::write(dev.join("driver_override"), "(null)\n").expect("override");
        fs::write(dir.path().join("bus/pci/drivers_probe"), "").expect("probe");
        for d in [Some("virtio-pci"), uio_loaded.then_some(UIO_DRIVER)]
            .into_iter()
            .flatten()
        {
            let ddir = sys.driver_dir(d);
            fs::create_dir_all(&ddir).expect("driver dir");
            fs::write(ddir.join("unbind"), "").expect("unbind");
        }
        if let Some(d) = driver {
            std::os::unix::fs::symlink(sys.driver_dir(d), dev.join("driver")).expect("link");
        }
        (dir, sys, bdf)
    }

    #[test]
    fn missing_function_and_missing_module_are_clear() {
        let (_d, sys, _) = tree(None, true);
        let other: Bdf = "0000:00:05.0".parse().expect("bdf");
        let e = sys.bind_uio(&other).expect_err("no such function");
        assert!(
            e.to_string().contains("no PCI function 0000:00:05.0"),
            "{e}"
        );

        let (_d, sys, bdf) = tree(Some("virtio-pci"), false);
        let e = sys.bind_uio(&bdf).expect_err("module missing");
        assert!(e.to_string().contains("modprobe uio_pci_generic"), "{e}");
        // Nothing was touched.
        let o = fs::read_to_string(sys.device(&bdf).join("driver_override")).expect("read");
        assert_eq!(o, "(null)\n");
    }

    #[test]
    fn binding_unbinds_overrides_and_probes() {
        let (d, sys, bdf) = tree(Some("virtio-pci"), true);
        assert_eq!(
            sys.current_driver(&bdf).expect("driver").as_deref(),
            Some("virtio-pci")
        );
        // The fake tree cannot really rebind, so the final check fails; the writes before it
        // are what the kernel needs, in that order.
        let e = sys.bind_uio(&bdf).expect_err("fake sysfs does not bind");
        assert!(e.to_string().contains("did not bind"), "{e}");
        let dev = sys.device(&bdf);
        let read = |p: PathBuf| fs::read_to_string(p).expect("read");
        assert_eq!(read(dev.join("driver_override")), UIO_DRIVER);
        assert_eq!(
            read(sys.driver_dir("virtio-pci").join("unbind")),
            "0000:00:04.0"
        );
        assert_eq!(read(d.path().join("bus/pci/drivers_probe")), "0000:00:04.0");

        let now = sys.rebind_kernel(&bdf).expect("rebind");
        assert_eq!(now.as_deref(), Some("virtio-pci"));
        assert_eq!(read(dev.join("driver_override")), "\n");
    }

    #[test]
    fn disks_in_use_are_found_and_refuse_the_bind() {
        let (_d, sys, bdf) = tree(Some("virtio-pci"), true);
        let sda = sys
            .device(&bdf)
            .join("virtio1/host0/target0:0:0/0:0:0:0/block/sda");
        for (dir, dev) in [
            (sda.clone(), "8:0"),
            (sda.join("sda1"), "8:1"),
            (sda.join("sda2"), "8:2"),
        ] {
            fs::create_dir_all(dir.join("holders")).expect("holders");
            fs::write(dir.join("dev"), format!("{dev}\n")).expect("dev");
        }
        fs::write(sda.join("sda1/partition"), "1\n").expect("partition");
        fs::write(sda.join("sda2/partition"), "2\n").expect("partition");
        let mountinfo = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n";
        let swaps = "Filename Type Size Used Priority\n/dev/sda2 partition 1024 0 -2\n";
        assert_eq!(
            sys.disks_in_use(&bdf, mountinfo, swaps),
            vec!["sda1 (mounted)".to_string(), "sda2 (swap)".to_string()]
        );
        assert!(sys.disks_in_use(&bdf, "", "").is_empty());
        fs::create_dir_all(sda.join("holders/dm-0")).expect("holder");
        assert_eq!(
            sys.disks_in_use(&bdf, "", ""),
            vec!["sda (held by another block device)".to_string()]
        );
    }

    #[test]
    fn already_bound_needs_only_the_uio_node() {
        let (_d, sys, bdf) = tree(Some(UIO_DRIVER), true);
        let uio = sys.device(&bdf).join("uio/uio-not-a-real-node-0");
        fs::create_dir_all(&uio).expect("uio dir");
        let e = sys.wait_uio(&bdf).err();
        // `/dev/uio-not-a-real-node-0` does not exist on the test host.
        assert!(
            e.as_ref()
                .is_some_and(|e| e.to_string().contains("devtmpfs")),
            "{e:?}"
        );
    }
}

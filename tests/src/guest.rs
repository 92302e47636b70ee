//! Harness for the tests that run inside a Linux guest (issue 8): the daemon inside a QEMU
//! machine booted with Debian's kernel, driving the guest's own virtio-scsi PCI device through
//! `uio_pci_generic` (`virtio-scsid --pci`), with Linux's own virtio-scsi driver as the
//! comparison.
//!
//! What it provides, each piece cached and safe against tests running in parallel (lock files
//! under the target directory):
//! - the guest kernel and busybox: Debian's `linux-image-amd64` (resolved to the real image
//!   package with `apt-cache depends`) and `busybox-static`, fetched with `apt-get download` and
//!   unpacked with `dpkg-deb -x` into `target/guest-cache/PACKAGE/` (never the host's /boot);
//! - our binaries statically linked (`+crt-static`, a separate target dir `target/guest`);
//! - an initramfs builder (cpio newc): busybox, kernel modules with the modules they depend on
//!   (read from each module's `.modinfo`, since the package ships no modules.dep) behind a
//!   generated `/bin/loadmod`, programs with their shared libraries (`ldd`), the common `/init`
//!   (tests/guest/init.sh), the test's script and its parameters (`/etc/guest.env`);
//! - the boot: QEMU q35 under KVM where a probe shows KVM boots this kernel, TCG otherwise
//!   (KVM with this kernel does not get past early boot on the development machines:
//!   [`accel_args`]), a virtio-scsi-pci controller at 0000:00:04.0 with the test's drives,
//!   the serial console in a file, an overall timeout, and QEMU killed by pid when the run ends
//!   or the test panics;
//! - the results: the `VSCSI-GUEST: key=value` lines and the final `VSCSI-GUEST-DONE rc=N`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The PCI function of the guest's virtio-scsi controller (`addr=0x4` on `pcie.0`).
pub const GUEST_PCI: &str = "0000:00:04.0";
/// The daemon's socket inside the guest.
pub const GUEST_SOCKET: &str = "/run/vscsi.sock";
/// Debian's metapackage whose dependency is the real kernel image package.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// Debian's statically linked busybox.
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// The target our static binaries are built for.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The guest's /init (helpers for the test scripts, markers, power-off).
const INIT_SCRIPT: &str = include_str!("../guest/init.sh");
/// Modules every guest gets, loaded by /init (the daemon's `--pci` needs `uio_pci_generic`).
const INIT_MODULES: &[&str] = &["uio", "uio_pci_generic"];
/// Modules every guest carries for handing the device to Linux's own driver.
const KERNEL_DRIVER_MODULES: &[&str] = &["virtio_pci", "virtio_scsi", "sd_mod"];

/// A harness failure (no QEMU, a download or build that failed, a guest that timed out). Its
/// `Debug` is the message itself, so that `expect` shows logs with their line breaks.
pub struct GuestError(pub String);

impl std::fmt::Debug for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GuestError {}

type Result<T> = std::result::Result<T, GuestError>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(GuestError(msg.into()))
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The workspace's target directory (`$CARGO_TARGET_DIR`, else `target/`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Where downloaded and unpacked Debian packages are kept across tests and runs.
pub fn cache_dir() -> PathBuf {
    target_dir().join("guest-cache")
}

/// Why guest tests cannot run on this machine at all (no QEMU for x86-64), if so. Anything
/// else that goes wrong (a download, a build, the boot) is a test failure, not a skip.
pub fn skip_reason() -> Option<String> {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    (!found).then(|| {
        "qemu-system-x86_64 is not installed (scripts/install-deps.sh installs it)".to_string()
    })
}

/// How the guests run: `-accel kvm -cpu host` where KVM boots this kernel, else TCG with
/// `-cpu max`. Decided once per process: when `/dev/kvm` opens read-write, a probe boots the
/// kernel (no initramfs; it panics at the root mount) under KVM and accepts KVM if it prints
/// its banner within 10 s. On the development machines it does not: they are themselves
/// virtual machines, and under their nested KVM `-cpu host` fails on MSR 0x10a
/// (IA32_ARCH_CAPABILITIES), while with `-arch-capabilities` or other models the kernel's
/// decompressor runs at about 100 KB/s (its output pointer sampled from the QEMU monitor), so
/// the banner would take minutes. They use TCG.
/// `VSCSI_GUEST_ACCEL=tcg|kvm` skips the probe.
pub fn accel_args(kernel: &Path) -> &'static [&'static str] {
    CHOSEN_ACCEL.get_or_init(|| {
        match std::env::var("VSCSI_GUEST_ACCEL").as_deref() {
            Ok("kvm") => return KVM,
            Ok("tcg") => return TCG,
            _ => {}
        }
        let usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if usable && kvm_boots(kernel, KVM) {
            eprintln!("guest: KVM boots this kernel; using it");
            KVM
        } else {
            eprintln!(
                "guest: using TCG (KVM {})",
                if usable {
                    "does not boot this kernel here within 10 s"
                } else {
                    "not available"
                }
            );
            TCG
        }
    })
}

const KVM: &[&str] = &["-accel", "kvm", "-cpu", "host"];
const TCG: &[&str] = &["-accel", "tcg", "-cpu", "max"];
static CHOSEN_ACCEL: OnceLock<&'static [&'static str]> = OnceLock::new();

/// `"kvm"` or `"tcg"` once a guest has been booted in this process ([`accel_args`]).
pub fn accel_name() -> Option<&'static str> {
    CHOSEN_ACCEL.get().and_then(|a| a.get(1)).copied()
}

/// Whether `kernel` gets as far as its banner under `accel` within 10 s.
fn kvm_boots(kernel: &Path, accel: &[&str]) -> bool {
    let Ok(dir) = tempfile::Builder::new()
        .prefix("vscsi-kvm-probe-")
        .tempdir()
    else {
        return false;
    };
    let serial = dir.path().join("serial.log");
    let child = Command::new("qemu-system-x86_64")
        .args(["-M", "q35"])
        .args(accel)
        .args(["-smp", "1", "-m", "256M", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else { return false };
    let mut qemu = QemuGuard(Some(child));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if fs::read_to_string(&serial).is_ok_and(|s| s.contains("Linux version")) {
            return true;
        }
        if let Ok(Some(_)) = qemu.try_wait() {
            // QEMU gave up (e.g. an MSR the host refuses) or the kernel already ended.
            return fs::read_to_string(&serial).is_ok_and(|s| s.contains("Linux version"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// An exclusive `flock` on a file, released when dropped (the descriptor is closed).
struct FileLock(#[allow(dead_code)] File);

fn lock(path: &Path) -> Result<FileLock> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| GuestError(format!("create {}: {e}", dir.display())))?;
    }
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| GuestError(format!("open lock file {}: {e}", path.display())))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| GuestError(format!("lock {}: {e}", path.display())))?;
    Ok(FileLock(f))
}

/// Runs a command to its end; its stdout, or an error with what it printed.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| GuestError(format!("{what}: cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return err(format!(
            "{what} failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `apt-get update`, at most once per process and only as root (the lists may be missing or
/// stale on a fresh machine, and a stale list names a package version the mirror dropped).
fn apt_update_once() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        if rustix::process::geteuid().as_raw() != 0 {
            return Err("the apt package lists need `apt-get update`, which needs root".into());
        }
        run(
            Command::new("apt-get").args(["update", "-qq"]),
            "apt-get update",
        )
        .map(drop)
        .map_err(|e| e.0)
    })
    .clone()
    .map_err(GuestError)
}

/// The real kernel image package `linux-image-amd64` depends on (`linux-image-6.1.0-N-amd64`).
pub fn kernel_package() -> Result<String> {
    let resolve = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_METAPACKAGE])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends:")?.trim();
            dep.starts_with("linux-image-").then(|| dep.to_string())
        })
    };
    if let Some(p) = resolve() {
        return Ok(p);
    }
    apt_update_once().map_err(|e| {
        GuestError(format!(
            "cannot resolve {KERNEL_METAPACKAGE} with apt-cache: {e}"
        ))
    })?;
    resolve().ok_or_else(|| {
        GuestError(format!(
            "`apt-cache depends {KERNEL_METAPACKAGE}` names no linux-image package (is this \
             Debian with its package lists?)"
        ))
    })
}

/// The unpacked contents of a Debian package (`dpkg-deb -x`), downloaded with `apt-get
/// download` the first time and kept in [`cache_dir`]. Made under a lock and published with a
/// rename, so that concurrent tests never see half of it.
pub fn debian_package(package: &str) -> Result<PathBuf> {
    let cache = cache_dir();
    let dest = cache.join(package);
    if dest.is_dir() {
        return Ok(dest);
    }
    let _lock = lock(&cache.join(".lock"))?;
    if dest.is_dir() {
        return Ok(dest);
    }
    // Work dirs of runs that were killed half-way (nobody else works here while we hold the
    // lock).
    for entry in fs::read_dir(&cache).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let work = cache.join(format!(".tmp-{package}-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(|e| GuestError(format!("create {}: {e}", work.display())))?;
    let download = || {
        run(
            Command::new("apt-get")
                .args(["download", "-qq", package])
                .current_dir(&work),
            &format!("apt-get download {package}"),
        )
    };
    if let Err(first) = download() {
        apt_update_once().map_err(|e| GuestError(format!("{first}\n(and no retry: {e})")))?;
        download()?;
    }
    let deb = fs::read_dir(&work)
        .map_err(|e| GuestError(format!("list {}: {e}", work.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| GuestError(format!("apt-get download {package} left no .deb")))?;
    let root = work.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    fs::rename(&root, &dest)
        .map_err(|e| GuestError(format!("rename into {}: {e}", dest.display())))?;
    let _ = fs::remove_dir_all(&work);
    Ok(dest)
}

/// Debian's kernel, unpacked: the image and its modules.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The release, e.g. `6.1.0-57-amd64`.
    pub version: String,
    /// The bootable image.
    pub vmlinuz: PathBuf,
    /// Its `lib/modules/VERSION` directory.
    pub modules: PathBuf,
}

impl Kernel {
    /// Downloads (once) and returns the kernel of Debian's `linux-image-amd64`.
    pub fn debian() -> Result<Kernel> {
        let mut package = kernel_package()?;
        let root = match debian_package(&package) {
            Ok(root) => root,
            Err(e) => {
                // Stale package lists may name a kernel the mirror has dropped: debian_package
                // refreshed them, so resolve again.
                let again = kernel_package()?;
                if again == package {
                    return Err(e);
                }
                package = again;
                debian_package(&package)?
            }
        };
        let version = package
            .strip_prefix("linux-image-")
            .unwrap_or(&package)
            .to_string();
        let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&version))
            .find(|d| d.is_dir())
            .ok_or_else(|| GuestError(format!("{package} has no modules directory")))?;
        if !vmlinuz.is_file() {
            return err(format!("{package} has no {}", vmlinuz.display()));
        }
        Ok(Kernel {
            version,
            vmlinuz,
            modules,
        })
    }
}

/// Debian's statically linked busybox, unpacked from `busybox-static`.
pub fn busybox() -> Result<PathBuf> {
    let root = debian_package(BUSYBOX_PACKAGE)?;
    ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| GuestError(format!("{BUSYBOX_PACKAGE} has no busybox binary")))
}

/// How our binaries for the guest are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `dev` (about 35 s from scratch on 2 cores): the tests.
    Debug,
    /// `release` (about 60 s from scratch): the benchmark.
    Release,
}

/// Our binaries, statically linked for the guest.
#[derive(Clone, Debug)]
pub struct GuestBinaries {
    /// The daemon.
    pub virtio_scsid: PathBuf,
    /// The CLI.
    pub vscsi: PathBuf,
    /// The in-process driver benchmark (`drivers/virtio-scsid/src/bin/inproc-bench.rs`; not
    /// in the initramfs unless a test adds it).
    pub inproc_bench: PathBuf,
}

/// Builds `virtio-scsid`, `vscsi` and `inproc-bench` statically linked (`-C target-feature=+crt-static`, glibc's
/// static libraries) into `target/guest`, a target dir of their own so that the main build is
/// not invalidated by the different flags. Without debug info (smaller initramfs, faster
/// build). One build at a time across processes (a lock file; cargo would block on its own
/// lock anyway, this keeps the waiting explicit).
pub fn build_binaries(profile: Profile) -> Result<GuestBinaries> {
    let target = target_dir().join("guest");
    let _lock = lock(&target.join(".vscsi-tests-build.lock"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--locked", "--target", STATIC_TARGET])
        .args(["-p", "virtio-scsid", "-p", "vscsi"])
        .args([
            "--bin",
            "virtio-scsid",
            "--bin",
            "vscsi",
            "--bin",
            "inproc-bench",
        ])
        .arg("--target-dir")
        .arg(&target)
        // Flags from an outer cargo would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        // A cold build (CI) is faster without, and the directory smaller.
        .env("CARGO_INCREMENTAL", "0")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    run(&mut cmd, "building the static guest binaries")?;
    let dir = target
        .join(STATIC_TARGET)
        .join(if profile == Profile::Release {
            "release"
        } else {
            "debug"
        });
    let bins = GuestBinaries {
        virtio_scsid: dir.join("virtio-scsid"),
        vscsi: dir.join("vscsi"),
        inproc_bench: dir.join("inproc-bench"),
    };
    for b in [&bins.virtio_scsid, &bins.vscsi, &bins.inproc_bench] {
        if !b.is_file() {
            return err(format!("the build left no {}", b.display()));
        }
    }
    Ok(bins)
}

/// Whether the daemon built for the guest has the `--pci` option (the Linux platform backend).
pub fn daemon_has_pci(bins: &GuestBinaries) -> Result<bool> {
    let help = run(
        Command::new(&bins.virtio_scsid).arg("--help"),
        "virtio-scsid --help",
    )?;
    Ok(help.contains("--pci"))
}

/// The key/value pairs of a kernel module's `.modinfo` ELF section (`depends=...`,
/// `softdep=...`, `alias=...`), read from the `.ko` file.
pub fn modinfo(path: &Path) -> Result<Vec<(String, String)>> {
    let data = fs::read(path).map_err(|e| GuestError(format!("read {}: {e}", path.display())))?;
    let bad = |why: &str| GuestError(format!("{}: {why}", path.display()));
    // ELF64 little-endian only (x86-64 modules); compressed modules (.ko.xz) are refused.
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad("not an uncompressed 64-bit little-endian ELF module"));
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let header = (|| {
        Some((
            usize::try_from(u64_at(0x28)?).ok()?,
            usize::from(u16_at(0x3A)?),
            usize::from(u16_at(0x3C)?),
            usize::from(u16_at(0x3E)?),
        ))
    })();
    let (shoff, shentsize, shnum, shstrndx) = header.ok_or_else(|| bad("truncated ELF header"))?;
    // Section header: sh_name (u32) at 0, sh_offset (u64) at 0x18, sh_size (u64) at 0x20.
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(at)? as usize,
            usize::try_from(u64_at(at + 0x18)?).ok()?,
            usize::try_from(u64_at(at + 0x20)?).ok()?,
        ))
    };
    let (_, names_at, _) = section(shstrndx).ok_or_else(|| bad("no section names"))?;
    for i in 0..shnum {
        let (name, offset, size) = section(i).ok_or_else(|| bad("truncated section table"))?;
        let name = data
            .get(names_at + name..)
            .and_then(|n| n.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name != b".modinfo" {
            continue;
        }
        let bytes = data
            .get(offset..offset.saturating_add(size))
            .ok_or_else(|| bad("truncated .modinfo"))?;
        return Ok(bytes
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect());
    }
    Err(bad("no .modinfo section"))
}

/// A module's name from its file name (`t10-pi.ko` is `t10_pi`, as in /sys/module).
fn module_name(file: &str) -> String {
    file.trim_end_matches(".ko").replace('-', "_")
}

/// The modules of an unpacked kernel: where each is, and which are built in.
pub struct ModuleTree {
    dir: PathBuf,
    by_name: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

impl ModuleTree {
    /// Indexes `kernel`'s modules directory.
    pub fn open(kernel: &Kernel) -> Result<ModuleTree> {
        let mut by_name = HashMap::new();
        let mut dirs = vec![PathBuf::from("kernel")];
        while let Some(rel) = dirs.pop() {
            let entries = fs::read_dir(kernel.modules.join(&rel))
                .map_err(|e| GuestError(format!("list {}: {e}", rel.display())))?;
            for entry in entries {
                let entry = entry.map_err(|e| GuestError(format!("list modules: {e}")))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = rel.join(&name);
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    dirs.push(path);
                } else if name.ends_with(".ko") {
                    by_name.insert(module_name(&name), path);
                }
            }
        }
        let builtin = fs::read_to_string(kernel.modules.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .map(module_name)
            .collect();
        Ok(ModuleTree {
            dir: kernel.modules.clone(),
            by_name,
            builtin,
        })
    }

    /// The modules to load for `name`, in load order (what it depends on first), as (name,
    /// path relative to the modules directory). Empty when it is built in. Soft dependencies
    /// are followed when they name a module; those naming only an alias (crc-t10dif's
    /// `crct10dif`, a faster implementation it finds through the crypto API) are left out: the
    /// module falls back to its generic code without them.
    pub fn load_order(&self, name: &str) -> Result<Vec<(String, PathBuf)>> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        self.visit(&module_name(name), true, &mut order, &mut seen)?;
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        required: bool,
        order: &mut Vec<(String, PathBuf)>,
        seen: &mut HashSet<String>,
    ) -> Result<()> {
        if seen.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        let Some(rel) = self.by_name.get(name) else {
            if required {
                return err(format!(
                    "module {name} is neither in {} nor built in",
                    self.dir.display()
                ));
            }
            return Ok(());
        };
        seen.insert(name.to_string());
        let info = modinfo(&self.dir.join(rel))?;
        let (mut pre, mut post) = (Vec::new(), Vec::new());
        for (key, value) in &info {
            match key.as_str() {
                "depends" => pre.extend(
                    value
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(|d| (module_name(d), true)),
                ),
                "softdep" => {
                    let mut post_part = false;
                    for word in value.split_whitespace() {
                        match word {
                            "pre:" => post_part = false,
                            "post:" => post_part = true,
                            m if post_part => post.push(module_name(m)),
                            m => pre.push((module_name(m), false)),
                        }
                    }
                }
                _ => {}
            }
        }
        for (dep, required) in pre {
            self.visit(&dep, required, order, seen)?;
        }
        order.push((name.to_string(), rel.clone()));
        for dep in post {
            self.visit(&dep, false, order, seen)?;
        }
        Ok(())
    }
}

/// One entry of an initramfs.
enum Entry {
    Dir,
    Bytes(Vec<u8>, u32),
    File(PathBuf, u32),
    Symlink(String),
}

/// An initramfs (cpio newc, uncompressed: the kernel unpacks it as it is).
#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, dest: &str, entry: Entry) {
        let dest = dest.trim_start_matches('/').to_string();
        // Parents first: a path sorts before every path it is a prefix of.
        let mut at = 0;
        while let Some(i) = dest[at..].find('/') {
            self.entries
                .entry(dest[..at + i].to_string())
                .or_insert(Entry::Dir);
            at += i + 1;
        }
        self.entries.insert(dest, entry);
    }

    /// A directory.
    pub fn dir(&mut self, dest: &str) -> &mut Self {
        self.insert(dest, Entry::Dir);
        self
    }

    /// A file with these contents and permission bits.
    pub fn bytes(&mut self, dest: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        self.insert(dest, Entry::Bytes(data.into(), mode));
        self
    }

    /// A copy of the host file `src` with these permission bits.
    pub fn file(&mut self, dest: &str, src: &Path, mode: u32) -> &mut Self {
        self.insert(dest, Entry::File(src.to_path_buf(), mode));
        self
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, dest: &str, target: &str) -> &mut Self {
        self.insert(dest, Entry::Symlink(target.to_string()));
        self
    }

    /// A dynamically linked host program at `dest`, with every shared library `ldd` lists at
    /// the path it lists (fio for the benchmark).
    pub fn program_with_libs(&mut self, dest: &str, src: &Path) -> Result<&mut Self> {
        let out = run(
            Command::new("ldd").arg(src),
            &format!("ldd {}", src.display()),
        )?;
        for line in out.lines() {
            let line = line.trim();
            if line.contains("not found") {
                return err(format!("ldd {}: {line}", src.display()));
            }
            // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)`, `/lib64/ld-...so.2 (0x...)`
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            let Some(path) = path.filter(|p| p.starts_with('/')) else {
                continue; // linux-vdso.so.1
            };
            let real = fs::canonicalize(path)
                .map_err(|e| GuestError(format!("resolve {path} for {}: {e}", src.display())))?;
            self.file(path, &real, 0o755);
        }
        self.file(dest, src, 0o755);
        Ok(self)
    }

    /// The kernel modules `names` and everything they need, under /lib/modules/VERSION, and
    /// `/bin/loadmod NAME...`, a script that loads each with its dependencies in order
    /// (skipping what is loaded already).
    pub fn modules(&mut self, kernel: &Kernel, names: &[&str]) -> Result<&mut Self> {
        let tree = ModuleTree::open(kernel)?;
        let dir = format!("lib/modules/{}", kernel.version);
        let mut script = format!(
            "#!/bin/sh\n\
             # Generated by tests/src/guest.rs: loads kernel modules and the modules they need,\n\
             # in order (resolved on the host from each module's .modinfo).\n\
             load() {{ [ -e /sys/module/$1 ] || insmod /{dir}/$2; }}\n\
             for m in \"$@\"; do\n    case \"$m\" in\n"
        );
        for name in names {
            let order = tree.load_order(name)?;
            let loads: Vec<String> = order
                .iter()
                .map(|(m, rel)| format!("load {m} {} || exit 1", rel.display()))
                .collect();
            script.push_str(&format!(
                "    {}) {} ;;\n",
                module_name(name),
                if loads.is_empty() {
                    ":".to_string() // built in
                } else {
                    loads.join("; ")
                }
            ));
            for (_, rel) in order {
                self.file(
                    &format!("{dir}/{}", rel.display()),
                    &kernel.modules.join(&rel),
                    0o644,
                );
            }
        }
        script.push_str(
            "    *) echo \"loadmod: $m is not in this initramfs\" >&2; exit 1 ;;\n    esac\ndone\n",
        );
        self.bytes("bin/loadmod", script, 0o755);
        Ok(self)
    }

    /// Writes the archive.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io_err = |e: io::Error| GuestError(format!("write {}: {e}", path.display()));
        let f = File::create(path).map_err(io_err)?;
        let mut w = BufWriter::new(f);
        for (ino, (name, entry)) in self.entries.iter().enumerate() {
            let b = cpio::NewcBuilder::new(name).ino(ino as u32 + 1);
            w = match entry {
                Entry::Dir => b.mode(0o040755).nlink(2).write(w, 0).finish(),
                Entry::Bytes(data, mode) => write_entry(b, w, 0o100000 | mode, data),
                Entry::Symlink(target) => write_entry(b, w, 0o120777, target.as_bytes()),
                Entry::File(src, mode) => {
                    let mut f = File::open(src)
                        .map_err(|e| GuestError(format!("open {}: {e}", src.display())))?;
                    let len = f
                        .metadata()
                        .map_err(|e| GuestError(format!("stat {}: {e}", src.display())))?
                        .len();
                    let len = u32::try_from(len)
                        .map_err(|_| GuestError(format!("{} is too large", src.display())))?;
                    let mut fw = b.mode(0o100000 | mode).write(w, len);
                    let copied =
                        io::copy(&mut (&mut f).take(u64::from(len)), &mut fw).map_err(io_err)?;
                    if copied != u64::from(len) {
                        return err(format!("{} changed while being read", src.display()));
                    }
                    fw.finish()
                }
            }
            .map_err(io_err)?;
        }
        let w = cpio::newc::trailer(w).map_err(io_err)?;
        w.into_inner()
            .map_err(|e| io_err(e.into_error()))?
            .sync_all()
            .map_err(io_err)
    }
}

fn write_entry<W: Write>(b: cpio::NewcBuilder, w: W, mode: u32, data: &[u8]) -> io::Result<W> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry too large"))?;
    let mut fw = b.mode(mode).write(w, len);
    fw.write_all(data)?;
    fw.finish()
}

/// A guest to boot: Debian's kernel, an initramfs with busybox, our static binaries, the
/// modules, /init and the test's script, and the drives of its virtio-scsi controller.
pub struct Guest {
    kernel: Kernel,
    initramfs: Initramfs,
    env: Vec<(String, String)>,
    drives: Vec<String>,
    memory_mib: u32,
    timeout: Duration,
    /// Our binaries in it.
    pub binaries: GuestBinaries,
}

impl Guest {
    /// Fetches (once) the kernel and busybox, builds our binaries with `profile`, and lays out
    /// the common initramfs; `script` is the test's part of /init (run with `set -e`).
    pub fn new(profile: Profile, script: &str) -> Result<Guest> {
        let kernel = Kernel::debian()?;
        let busybox = busybox()?;
        let binaries = build_binaries(profile)?;
        let mut initramfs = Initramfs::new();
        initramfs
            .file("bin/busybox", &busybox, 0o755)
            .symlink("bin/sh", "busybox")
            .bytes("init", INIT_SCRIPT, 0o755)
            .bytes("test.sh", script, 0o644)
            .file("bin/virtio-scsid", &binaries.virtio_scsid, 0o755)
            .file("bin/vscsi", &binaries.vscsi, 0o755)
            .dir("proc")
            .dir("sys")
            .dir("dev")
            .dir("tmp")
            .dir("run");
        let mut modules = INIT_MODULES.to_vec();
        modules.extend_from_slice(KERNEL_DRIVER_MODULES);
        initramfs.modules(&kernel, &modules)?;
        let mut guest = Guest {
            kernel,
            initramfs,
            env: Vec::new(),
            drives: Vec::new(),
            memory_mib: 1024,
            timeout: Duration::from_secs(150),
            binaries,
        };
        guest
            .env("PCI", GUEST_PCI)
            .env("SOCK", GUEST_SOCKET)
            .env("MODULES", &INIT_MODULES.join(" "));
        Ok(guest)
    }

    /// A parameter for the script, in /etc/guest.env (`KEY='value'`).
    pub fn env(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A drive on the virtio-scsi controller (SCSI target = the number of drives before it, LUN
    /// 0): `options` are QEMU `-drive` options, e.g. `file=IMG,format=raw` or
    /// `driver=null-co,size=1G,read-zeroes=on`.
    pub fn drive(&mut self, options: &str) -> &mut Self {
        self.drives.push(options.to_string());
        self
    }

    /// A raw image file as the next drive.
    pub fn raw_image(&mut self, path: &Path) -> &mut Self {
        let file = path.display().to_string().replace(',', ",,");
        self.drive(&format!("file={file},format=raw"))
    }

    /// Guest memory (default 1 GiB).
    pub fn memory_mib(&mut self, mib: u32) -> &mut Self {
        self.memory_mib = mib;
        self
    }

    /// How long the whole boot may take before QEMU is killed (default 150 s).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = timeout;
        self
    }

    /// The initramfs, to add files (e.g. fio with [`Initramfs::program_with_libs`]).
    pub fn initramfs(&mut self) -> &mut Initramfs {
        &mut self.initramfs
    }

    /// Boots the guest and waits (bounded) until it powers off. Errors: QEMU could not start,
    /// or the guest did not power off in time (QEMU is killed; the console is in the message).
    /// A guest that ran its script and failed is a [`GuestRun`] with a non-zero `rc`.
    pub fn run(&mut self) -> Result<GuestRun> {
        let dir = tempfile::Builder::new()
            .prefix("vscsi-guest-")
            .tempdir()
            .map_err(|e| GuestError(format!("temp dir: {e}")))?;
        let mut env = String::new();
        for (k, v) in &self.env {
            env.push_str(&format!("{k}='{}'\n", v.replace('\'', r"'\''")));
        }
        self.initramfs.bytes("etc/guest.env", env, 0o644);
        let initrd = dir.path().join("initrd.cpio");
        self.initramfs.write(&initrd)?;
        let serial = dir.path().join("serial.log");
        let qemu_log = dir.path().join("qemu.log");
        let log = File::create(&qemu_log)
            .map_err(|e| GuestError(format!("create {}: {e}", qemu_log.display())))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "q35"])
            .args(accel_args(&self.kernel.vmlinuz))
            .args(["-smp", "2"])
            .args(["-m", &format!("{}M", self.memory_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .args([
                "-device",
                "virtio-scsi-pci,id=scsi0,num_queues=2,bus=pcie.0,addr=0x4",
            ]);
        for (n, options) in self.drives.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!("{options},if=none,id=d{n}"))
                .arg("-device")
                .arg(format!(
                    "scsi-hd,drive=d{n},bus=scsi0.0,channel=0,scsi-id={n},lun=0"
                ));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| GuestError(format!("cannot start qemu-system-x86_64: {e}")))?;
        let mut qemu = QemuGuard(Some(child));
        let console = || fs::read_to_string(&serial).unwrap_or_default();
        let status = loop {
            match qemu.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return err(format!("wait for QEMU: {e}")),
            }
            if started.elapsed() > self.timeout {
                drop(qemu);
                return err(format!(
                    "the guest did not power off within {:?}; QEMU killed. Console:\n{}\nQEMU:\n{}",
                    self.timeout,
                    console(),
                    fs::read_to_string(&qemu_log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let elapsed = started.elapsed();
        let run = GuestRun::parse(&console(), elapsed);
        if !status.success() && run.rc.is_none() {
            return err(format!(
                "QEMU exited with {status} before the guest finished. Console:\n{}\nQEMU:\n{}",
                run.serial,
                fs::read_to_string(&qemu_log).unwrap_or_default()
            ));
        }
        Ok(run)
    }
}

/// QEMU, killed by pid (and reaped) when dropped: the test ended, failed or panicked.
struct QemuGuard(Option<Child>);

impl QemuGuard {
    fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self.0.as_mut() {
            Some(child) => {
                let status = child.try_wait()?;
                if status.is_some() {
                    self.0 = None;
                }
                Ok(status)
            }
            None => Ok(None),
        }
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a guest reported on its console.
#[derive(Clone, Debug)]
pub struct GuestRun {
    /// The whole console.
    pub serial: String,
    /// The script's status from `VSCSI-GUEST-DONE rc=N` (None: the guest never got there).
    pub rc: Option<i32>,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
    marks: Vec<(String, String)>,
}

impl GuestRun {
    /// Reads the markers out of a console log.
    pub fn parse(serial: &str, elapsed: Duration) -> GuestRun {
        let mut marks = Vec::new();
        let mut rc = None;
        for line in serial.lines() {
            let line = line.trim_end_matches('\r');
            if let Some((_, rest)) = line.split_once("VSCSI-GUEST: ") {
                if let Some((k, v)) = rest.split_once('=') {
                    marks.push((k.to_string(), v.to_string()));
                }
            } else if let Some((_, rest)) = line.split_once("VSCSI-GUEST-DONE rc=") {
                rc = rest.trim().parse().ok();
            }
        }
        GuestRun {
            serial: serial.to_string(),
            rc,
            elapsed,
            marks,
        }
    }

    /// The last value marked under `key`.
    pub fn mark(&self, key: &str) -> Option<&str> {
        self.marks
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value marked under `key`, in order.
    pub fn marks(&self, key: &str) -> Vec<&str> {
        self.marks
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The last value marked under `key`; panics with the console if there is none.
    pub fn expect_mark(&self, key: &str) -> &str {
        self.mark(key)
            .unwrap_or_else(|| panic!("the guest reported no `{key}`; console:\n{}", self.serial))
    }

    /// Panics with the console unless the guest's script finished with status 0.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.rc,
            Some(0),
            "the guest's script failed; console:\n{}",
            self.serial
        );
    }
}

/// The bytes the guest's `seq_pattern FIRST LENGTH` makes: `seq FIRST ...` (decimal numbers,
/// one a line) cut to `len` bytes.
pub fn seq_pattern(first: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 24);
    let mut n = first;
    while out.len() < len {
        out.extend_from_slice(format!("{n}\n").as_bytes());
        n += 1;
    }
    out.truncate(len);
    out
}

/// SHA-256 of `data` in hex, by coreutils' `sha256sum` (what the guest's busybox computes).
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum (coreutils)");
    let mut input = child.stdin.take().expect("sha256sum stdin");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    writer
        .join()
        .expect("sha256sum writer")
        .expect("write to sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_pattern_matches_seq() {
        assert_eq!(seq_pattern(8, 7), b"8\n9\n10\n");
        assert_eq!(seq_pattern(8, 6), b"8\n9\n10");
        assert!(seq_pattern(1, 0).is_empty());
    }

    #[test]
    fn markers_are_parsed() {
        let run = GuestRun::parse(
            "noise\r\nVSCSI-GUEST: a=1\r\n[  1.0] x VSCSI-GUEST: b=x=y\nVSCSI-GUEST: a=2\n\
             VSCSI-GUEST-DONE rc=3\r\n",
            Duration::ZERO,
        );
        assert_eq!(run.mark("a"), Some("2"));
        assert_eq!(run.mark("b"), Some("x=y"));
        assert_eq!(run.mark("c"), None);
        assert_eq!(run.rc, Some(3));
    }

    #[test]
    fn initramfs_lists_parents_first() {
        let mut i = Initramfs::new();
        i.bytes("a/b/c", "x", 0o644).symlink("a-b", "a").dir("a/b");
        let names: Vec<&str> = i.entries.keys().map(String::as_str).collect();
        assert_eq!(names, ["a", "a-b", "a/b", "a/b/c"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.cpio");
        i.write(&path).expect("write archive");
        let mut r = File::open(&path).expect("open archive");
        let mut seen = Vec::new();
        loop {
            let entry = cpio::NewcReader::new(r).expect("read entry");
            if entry.entry().is_trailer() {
                break;
            }
            seen.push((entry.entry().name().to_string(), entry.entry().mode()));
            r = entry.finish().expect("next entry");
        }
        assert_eq!(
            seen,
            [
                ("a".to_string(), 0o040755),
                ("a-b".to_string(), 0o120777),
                ("a/b".to_string(), 0o040755),
                ("a/b/c".to_string(), 0o100644),
            ]
        );
    }
}

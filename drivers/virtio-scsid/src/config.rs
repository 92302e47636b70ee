//! Command-line configuration of the daemon: the `--disk` spec syntax and the default state
//! directory with its embedded default disk.

use std::path::{Path, PathBuf};

/// Image format of a `--disk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

/// One `--disk PATH[,format=raw|qcow2][,block-size=512|4096][,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskArg {
    /// Image file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Logical block size the device reports (QEMU's default, 512, when absent).
    pub block_size: Option<u32>,
    /// Attach read-only.
    pub readonly: bool,
    /// QEMU `-drive` options given verbatim (`--disk-qemu`) instead of an image path.
    pub qemu_options: Option<String>,
}

/// Parses a `--disk` value. A path containing commas is written with each comma doubled
/// (`a,,b.img` for `a,b.img`), as QEMU does.
pub fn parse_disk(spec: &str) -> Result<DiskArg, String> {
    let mut parts = split_unescaped(spec).into_iter();
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("--disk {spec:?}: missing image path"))?;
    let mut disk = DiskArg {
        path: PathBuf::from(path),
        format: Format::Raw,
        block_size: None,
        readonly: false,
        qemu_options: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("format", "raw")) => disk.format = Format::Raw,
            Some(("format", "qcow2")) => disk.format = Format::Qcow2,
            Some(("block-size", "512")) => disk.block_size = Some(512),
            Some(("block-size", "4096")) => disk.block_size = Some(4096),
            None if opt == "readonly" => disk.readonly = true,
            Some(("readonly", "on" | "true" | "1")) => disk.readonly = true,
            Some(("readonly", "off" | "false" | "0")) => disk.readonly = false,
            _ => {
                return Err(format!(
                    "--disk {spec:?}: unknown option {opt:?} (expected format=raw|qcow2, \
                     block-size=512|4096, readonly)"
                ));
            }
        }
    }
    Ok(disk)
}

/// Splits on single commas; a doubled comma is a literal comma.
fn split_unescaped(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(p) = out.last_mut() {
                    p.push(',')
                }
            } else {
                out.push(String::new());
            }
        } else {
            if let Some(p) = out.last_mut() {
                p.push(c)
            }
        }
    }
    out
}

/// A `--disk-qemu` value: QEMU `-drive` options, passed verbatim (they must not set `if` or
/// `id`, which the daemon sets).
pub fn parse_disk_qemu(opts: &str) -> Result<DiskArg, String> {
    if opts.trim().is_empty() {
        return Err("--disk-qemu needs QEMU -drive options".into());
    }
    let mut parts = split_unescaped(opts).into_iter();
    if parts.any(|p| p.starts_with("if=") || p.starts_with("id=")) {
        return Err(format!(
            "--disk-qemu {opts:?}: if= and id= are set by the daemon"
        ));
    }
    Ok(DiskArg {
        path: PathBuf::new(),
        format: Format::Raw,
        block_size: None,
        readonly: opts.split(',').any(|p| p == "readonly=on"),
        qemu_options: Some(opts.to_string()),
    })
}

/// Where the daemon keeps its default disk: `$VSCSID_STATE_DIR`, else `/var/lib/virtio-scsid`
/// for root, else `$XDG_STATE_HOME/virtio-scsid`, else `~/.local/state/virtio-scsid`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VSCSID_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/virtio-scsid");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("virtio-scsid");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/state/virtio-scsid")
}

/// Size of the embedded default disk.
pub const DEFAULT_DISK_BYTES: u64 = 1 << 30;

/// The embedded default: `<state_dir>/disk0.img`, a sparse 1 GiB raw image created on first
/// use and kept (with its data) across runs.
pub fn default_disk(state_dir: &Path) -> Result<DiskArg, String> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("cannot create state directory {}: {e}", state_dir.display()))?;
    let path = state_dir.join("disk0.img");
    if !path.exists() {
        let f = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        f.set_len(DEFAULT_DISK_BYTES)
            .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
        log::info!("created sparse 1 GiB default disk {}", path.display());
    }
    Ok(DiskArg {
        path,
        format: Format::Raw,
        block_size: None,
        readonly: false,
        qemu_options: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert_eq!(
            parse_disk("/a.img").expect("plain path"),
            DiskArg {
                path: "/a.img".into(),
                format: Format::Raw,
                block_size: None,
                readonly: false,
                qemu_options: None
            }
        );
        let d = parse_disk("/x,,y.qcow2,format=qcow2,block-size=4096,readonly").expect("full");
        assert_eq!(d.path, PathBuf::from("/x,y.qcow2"));
        assert_eq!(d.format, Format::Qcow2);
        assert_eq!(d.block_size, Some(4096));
        assert!(d.readonly);
        assert!(parse_disk("").is_err());
        assert!(parse_disk(",readonly").is_err());
        assert!(parse_disk("/a,block-size=1024").is_err());
        assert!(parse_disk("/a,format=vmdk").is_err());
        assert!(parse_disk("/a,bogus").is_err());
    }
}

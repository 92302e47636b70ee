//! The configuration file (`--config PATH`, TOML): every setting is a long flag of the
//! command line, spelled the same, with the same values and checks, and flags given on the
//! command line override the file.
//!
//! How: the file's settings become flags placed before the real command-line arguments, and
//! the command is parsed with `args_override_self`, so for a single-valued setting the later
//! (command-line) value wins. A repeatable setting (`disk`, `allow-uid`, `allow-gid`) given on
//! the command line replaces the file's list instead of adding to it. A boolean flag is
//! `true`/`false` in the file (`false` = absent). Example:
//!
//! ```toml
//! disk = ["/var/lib/virtio-scsid/disk0.img", "/srv/data.qcow2,format=qcow2,block-size=4096"]
//! queues = 4
//! socket = "/run/virtio-scsid.sock"
//! socket-mode = "0660"
//! allow-gid = [6]
//! accel = "auto"
//! ```
//!
//! Inside a Linux machine, driving its own virtio-scsi function instead of launching QEMU:
//! `pci = "0000:00:04.0"` and optionally `dma-mib = 64` (no `disk` then).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Flags that cannot be settings in the file.
const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

/// Parses the process's command line into `A`, merging the `--config` file if one is given.
/// Exits with clap's message (status 2) on a bad flag or setting, like a plain clap parse.
pub fn parse_args<A: clap::Parser>() -> A {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match try_parse_from::<A>(argv) {
        Ok(a) => a,
        Err(Failure::Clap(e)) => e.exit(),
        Err(Failure::File(msg)) => {
            eprintln!("virtio-scsid: {msg}");
            std::process::exit(2);
        }
    }
}

/// Why parsing failed.
#[derive(Debug)]
pub enum Failure {
    /// A bad flag (or `--help`/`--version`, which clap reports this way).
    Clap(clap::Error),
    /// The config file could not be read or has a bad setting.
    File(String),
}

/// [`parse_args`] over an explicit argument vector (`argv[0]` is the program name).
pub fn try_parse_from<A: clap::Parser>(argv: Vec<OsString>) -> Result<A, Failure> {
    let cmd = A::command().args_override_self(true);
    let cli = cmd
        .clone()
        .try_get_matches_from(&argv)
        .map_err(Failure::Clap)?;
    let matches = match cli.get_one::<PathBuf>("config") {
        None => cli,
        Some(path) => {
            let file = file_flags(path, &cmd, &cli).map_err(Failure::File)?;
            let mut merged = argv.iter().take(1).cloned().collect::<Vec<_>>();
            merged.extend(file.into_iter().map(OsString::from));
            merged.extend(argv.iter().skip(1).cloned());
            cmd.try_get_matches_from(merged).map_err(|e| {
                // Values from the file are checked by the same parser; say where they came from.
                Failure::File(format!(
                    "{} (settings from {} are checked as flags)",
                    e.render().to_string().trim_end(),
                    path.display()
                ))
            })?
        }
    };
    A::from_arg_matches(&matches).map_err(Failure::Clap)
}

/// The flags that the settings in the file at `path` stand for.
fn file_flags(path: &Path, cmd: &Command, cli: &ArgMatches) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    let known: Vec<&str> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !NOT_IN_FILE.contains(l))
        .collect();
    let mut flags = Vec::new();
    for (key, value) in &table {
        let bad = |why: &str| format!("config file {}: setting {key:?}: {why}", path.display());
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| bad(&format!("unknown (settings: {})", known.join(", "))))?;
        if !arg.get_action().takes_values() {
            match value {
                toml::Value::Boolean(true) => flags.push(format!("--{key}")),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("expected true or false")),
            }
            continue;
        }
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        if repeatable && cli.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue; // the command line's list replaces the file's
        }
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) if repeatable => items.iter().collect(),
            toml::Value::Array(_) => return Err(bad("takes one value, not a list")),
            v => vec![v],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                // A TOML octal integer (0o660) for the one octal setting keeps its meaning.
                toml::Value::Integer(i) if key == "socket-mode" => format!("0o{i:o}"),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => return Err(bad("expected a string or a number")),
            };
            flags.push(format!("--{key}={text}"));
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "disk")]
        disks: Vec<String>,
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        check_steering: bool,
        #[arg(long, value_parser = crate::parse_mode)]
        socket_mode: Option<u32>,
    }

    fn parse(file: &str, args: &[&str]) -> Result<T, Failure> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).expect("write config");
        let mut argv: Vec<OsString> = vec!["virtio-scsid".into(), "--config".into()];
        argv.push(path.into_os_string());
        argv.extend(args.iter().map(OsString::from));
        try_parse_from::<T>(argv)
    }

    fn file_error(r: Result<T, Failure>) -> String {
        match r {
            Err(Failure::File(m)) => m,
            other => panic!("expected a file error, got {other:?}"),
        }
    }

    #[test]
    fn file_settings_and_command_line_overrides() {
        let file = "disk = [\"/a.img\", \"/b,,c.img,readonly\"]\nqueues = 8\n\
                    socket = \"/run/x.sock\"\ncheck-steering = true\nsocket-mode = 0o640\n";
        let t = parse(file, &[]).expect("file only");
        assert_eq!(t.disks, vec!["/a.img", "/b,,c.img,readonly"]);
        assert_eq!(t.queues, 8);
        assert_eq!(t.socket, Some("/run/x.sock".into()));
        assert!(t.check_steering);
        assert_eq!(t.socket_mode, Some(0o640));

        let t = parse(
            file,
            &["--queues", "2", "--disk", "/z.img", "--socket-mode", "0600"],
        )
        .expect("overrides");
        assert_eq!(t.queues, 2);
        assert_eq!(
            t.disks,
            vec!["/z.img"],
            "command-line disks replace the file's"
        );
        assert_eq!(t.socket, Some("/run/x.sock".into()));
        assert_eq!(t.socket_mode, Some(0o600));

        let t = parse("socket-mode = \"0660\"\ncheck-steering = false", &[]).expect("strings");
        assert_eq!(t.socket_mode, Some(0o660));
        assert!(!t.check_steering);
        let t = parse("", &["--queues=3"]).expect("empty file");
        assert_eq!(t.queues, 3);
    }

    /// The example config in `dist/` is valid for the daemon's real flags, and the Redox
    /// pcid-spawner file matches virtio-scsi's PCI ids.
    #[test]
    fn shipped_files_parse() {
        let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist");
        let argv: Vec<OsString> = vec![
            "virtio-scsid".into(),
            "--config".into(),
            dist.join("virtio-scsid.toml").into_os_string(),
            "--queues".into(),
            "2".into(),
        ];
        let args = match try_parse_from::<crate::Args>(argv) {
            Ok(a) => a,
            Err(e) => panic!("dist/virtio-scsid.toml: {e:?}"),
        };
        assert_eq!(args.queues, 2);
        assert_eq!(args.socket_mode, 0o660);
        assert_eq!(args.socket, Some("/run/virtio-scsid.sock".into()));
        assert_eq!(args.disks.len(), 1);

        let pcid = std::fs::read_to_string(dist.join("redox/pcid.d/virtio-scsid.toml"))
            .expect("pcid-spawner file");
        let table: toml::Table = pcid.parse().expect("pcid-spawner TOML");
        let drivers = table
            .get("drivers")
            .and_then(|d| d.as_array())
            .expect("[[drivers]]");
        let ids: Vec<(i64, i64, i64, i64)> = drivers
            .iter()
            .map(|d| {
                let n = |k: &str| d.get(k).and_then(|v| v.as_integer()).expect(k);
                (n("class"), n("subclass"), n("vendor"), n("device"))
            })
            .collect();
        assert_eq!(ids, vec![(1, 0, 0x1af4, 0x1004), (1, 0, 0x1af4, 0x1048)]);
        for d in drivers {
            let cmd = d
                .get("command")
                .and_then(|c| c.as_array())
                .expect("command");
            assert_eq!(cmd[0].as_str(), Some("virtio-scsid"));
        }
    }

    /// `--pci` and `--dma-mib` work from the file too, and contradictions are refused.
    #[test]
    fn pci_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "pci = \"0000:00:04.0\"\ndma-mib = 64\n").expect("write");
        let argv = |extra: &[&str]| {
            let mut v: Vec<OsString> = vec!["virtio-scsid".into(), "--config".into()];
            v.push(path.clone().into_os_string());
            v.extend(extra.iter().map(OsString::from));
            v
        };
        let args = match try_parse_from::<crate::Args>(argv(&[])) {
            Ok(a) => a,
            Err(e) => panic!("pci settings: {e:?}"),
        };
        assert_eq!(args.pci.map(|b| b.to_string()), Some("0000:00:04.0".into()));
        assert_eq!(args.dma_mib, Some(64));
        assert_eq!(crate::check_backend(&args), Ok(()));

        let args = match try_parse_from::<crate::Args>(argv(&["--disk", "/a.img"])) {
            Ok(a) => a,
            Err(e) => panic!("pci with a disk parses: {e:?}"),
        };
        let e = crate::check_backend(&args).expect_err("--pci with --disk");
        assert!(e.contains("--pci"), "{e}");

        let plain = |a: &[&str]| {
            let mut v: Vec<OsString> = vec!["virtio-scsid".into()];
            v.extend(a.iter().map(OsString::from));
            try_parse_from::<crate::Args>(v)
        };
        let args = plain(&["--dma-mib", "8"]).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            crate::check_backend(&args).is_err(),
            "--dma-mib without --pci"
        );
        let args =
            plain(&["--pci", "00:04.0", "--queues", "8"]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(crate::dma_mib(&args), 56);
        let args =
            plain(&["--pci", "00:04.0", "--queues", "2"]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(crate::dma_mib(&args), 32);
        assert!(matches!(
            plain(&["--pci", "00:20.0"]),
            Err(Failure::Clap(_))
        ));
        assert!(matches!(
            plain(&["--pci", "00:04.0", "--dma-mib", "1"]),
            Err(Failure::Clap(_))
        ));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        assert!(file_error(parse("bogus = 1", &[])).contains("unknown"));
        assert!(file_error(parse("config = \"x\"", &[])).contains("unknown"));
        assert!(file_error(parse("queues = [1, 2]", &[])).contains("one value"));
        assert!(file_error(parse("check-steering = 1", &[])).contains("true or false"));
        assert!(file_error(parse("queues = 0", &[])).contains("queues"));
        assert!(file_error(parse("queues = {a = 1}", &[])).contains("string or a number"));
        assert!(file_error(parse("queues = ", &[])).contains("config file"));
        let missing = try_parse_from::<T>(vec![
            "x".into(),
            "--config".into(),
            "/nonexistent/vscsid.toml".into(),
        ]);
        assert!(file_error(missing).contains("cannot read"));
        // Command-line errors stay clap errors.
        assert!(matches!(
            parse("", &["--queues", "99"]),
            Err(Failure::Clap(_))
        ));
    }
}

//! Path parsing and scheme-path splitting, including garbage input.

use syscall::error::{EINVAL, ENOENT};

use super::{Rng, errno};
use crate::path::format_path;
use crate::{SchemePath, parse_path, split_scheme_path};

#[test]
fn valid_paths() {
    let cases: &[(&str, SchemePath)] = &[
        ("", SchemePath::Root),
        ("/", SchemePath::Root),
        ("0", SchemePath::Disk(0)),
        ("/0", SchemePath::Disk(0)),
        ("7", SchemePath::Disk(7)),
        ("/123", SchemePath::Disk(123)),
        ("0p0", SchemePath::Partition { disk: 0, part: 0 }),
        ("/0p1", SchemePath::Partition { disk: 0, part: 1 }),
        ("12p34", SchemePath::Partition { disk: 12, part: 34 }),
    ];
    for &(p, want) in cases {
        assert_eq!(parse_path(p), Ok(want), "path {p:?}");
    }
    let max = usize::MAX.to_string();
    assert_eq!(parse_path(&max), Ok(SchemePath::Disk(usize::MAX)));
    assert_eq!(
        parse_path(&format!("/{max}p{max}")),
        Ok(SchemePath::Partition {
            disk: usize::MAX,
            part: usize::MAX
        })
    );
}

#[test]
fn garbage_paths_are_enoent() {
    let over = format!("{}0", usize::MAX);
    let bad = [
        "x",
        "-1",
        "+1",
        "00",
        "01",
        "007",
        "0p",
        "p0",
        "p",
        "0p00",
        "0p01",
        "0p1p2",
        "0pp1",
        "0/",
        "//",
        "//0",
        "/0/",
        "0/1",
        " 0",
        "0 ",
        "0x1",
        "1e3",
        "0.5",
        "١",
        "0\u{0}",
        "０",
        "0P1",
        "0p-1",
        "0p+1",
        "disk",
        "/disk.virtio-scsi:0",
        "99999999999999999999999999",
        &over,
    ];
    for p in bad {
        assert_eq!(errno(parse_path(p)), ENOENT, "path {p:?}");
    }
    assert_eq!(errno(parse_path(&format!("0p{over}"))), ENOENT);
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng::new(7);
    let alphabet: Vec<char> = "0123456789p/:.-+ xé١\u{0}".chars().collect();
    for _ in 0..20_000 {
        let n = rng.below(12) as usize;
        let s: String = (0..n)
            .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
            .collect();
        // Whatever it returns, a success must round-trip through the canonical form.
        if let Ok(t) = parse_path(&s) {
            let canon = format_path(t);
            assert_eq!(parse_path(&canon), Ok(t), "{s:?}");
            assert_eq!(
                s.trim_start_matches('/').len(),
                canon.len(),
                "{s:?} is not canonical"
            );
        }
        let _ = split_scheme_path(&s);
    }
}

#[test]
fn split_legacy_form() {
    assert_eq!(
        split_scheme_path("disk.virtio-scsi:/0"),
        Ok(("disk.virtio-scsi", "/0"))
    );
    assert_eq!(
        split_scheme_path("disk.virtio-scsi:0p1"),
        Ok(("disk.virtio-scsi", "0p1"))
    );
    assert_eq!(
        split_scheme_path("disk.virtio-scsi:"),
        Ok(("disk.virtio-scsi", ""))
    );
    assert_eq!(
        split_scheme_path("disk.virtio-scsi:/"),
        Ok(("disk.virtio-scsi", "/"))
    );
    // Split at the first colon; the rest is the inner path (which parse_path then rejects).
    assert_eq!(split_scheme_path("disk.x:0:1"), Ok(("disk.x", "0:1")));
    assert_eq!(errno(parse_path("0:1")), ENOENT);
}

#[test]
fn split_scheme_dir_form() {
    assert_eq!(
        split_scheme_path("/scheme/disk.virtio-scsi/0"),
        Ok(("disk.virtio-scsi", "/0"))
    );
    assert_eq!(
        split_scheme_path("/scheme/disk.virtio-scsi/0p1"),
        Ok(("disk.virtio-scsi", "/0p1"))
    );
    assert_eq!(
        split_scheme_path("/scheme/disk.virtio-scsi"),
        Ok(("disk.virtio-scsi", ""))
    );
    assert_eq!(
        split_scheme_path("/scheme/disk.virtio-scsi/"),
        Ok(("disk.virtio-scsi", "/"))
    );
}

#[test]
fn split_malformed_is_einval() {
    for s in [
        "",
        "0",
        "/0",
        "disk.virtio-scsi",
        ":0",
        ":",
        "/scheme/",
        "/scheme//0",
        "/scheme/a:b/0",
        "a/b:0",
        "disk virtio:0",
        "disk\n:0",
    ] {
        assert_eq!(errno(split_scheme_path(s)), EINVAL, "{s:?}");
    }
}

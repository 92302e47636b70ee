//! The sysfs `resource` file of a PCI function: one line per resource, `start end flags` in
//! hexadecimal (`0x%016llx`); lines 0..6 are the BARs, an unused one is all zeroes.

/// `IORESOURCE_IO`: an I/O-port range.
pub const IORESOURCE_IO: u64 = 0x0000_0100;
/// `IORESOURCE_MEM`: a memory range.
pub const IORESOURCE_MEM: u64 = 0x0000_0200;

/// One BAR as the kernel placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// First address (a CPU physical address; on x86 also the bus address).
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
    /// `IORESOURCE_*` flags.
    pub flags: u64,
}

impl Resource {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: an empty resource is not parsed into a `Resource`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether it is a memory BAR (rather than I/O ports).
    pub fn is_memory(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0
    }
}

/// Parses a `resource` file into its six BARs (`None` for an unused one).
pub fn parse(text: &str) -> Result<[Option<Resource>; 6], String> {
    let mut out = [None; 6];
    let mut lines = text.lines();
    for (i, slot) in out.iter_mut().enumerate() {
        let line = lines
            .next()
            .ok_or_else(|| format!("resource file has {i} lines, expected at least 6"))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(|f| {
                let digits = f
                    .strip_prefix("0x")
                    .ok_or_else(|| format!("resource line {i}: {f:?} is not 0x-hex"))?;
                u64::from_str_radix(digits, 16)
                    .map_err(|_| format!("resource line {i}: {f:?} is not 0x-hex"))
            })
            .collect::<Result<_, _>>()?;
        let [start, end, flags] = fields[..] else {
            return Err(format!("resource line {i}: {line:?} has not 3 fields"));
        };
        if start == 0 && end == 0 {
            continue;
        }
        if end < start {
            return Err(format!(
                "resource line {i}: end {end:#x} before start {start:#x}"
            ));
        }
        *slot = Some(Resource { start, end, flags });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A virtio-scsi-pci function of a q35 guest, as Linux 6.1 prints it.
    const Q35_VIRTIO: &str = "\
0x0000000000006040 0x000000000000607f 0x0000000000040101
0x00000000febd1000 0x00000000febd1fff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x000000fe00000000 0x000000fe00003fff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000feb80000 0x00000000febbffff 0x0000000000046200
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn parses_a_real_file() {
        let bars = parse(Q35_VIRTIO).expect("parse");
        let io = bars[0].expect("BAR0");
        assert!(!io.is_memory());
        assert_eq!(io.len(), 0x40);
        let bar1 = bars[1].expect("BAR1");
        assert!(bar1.is_memory());
        assert_eq!((bar1.start, bar1.len()), (0xfebd_1000, 0x1000));
        assert_eq!(bars[2], None);
        assert_eq!(bars[3], None);
        let bar4 = bars[4].expect("BAR4");
        assert!(bar4.is_memory());
        assert_eq!((bar4.start, bar4.len()), (0xfe_0000_0000, 0x4000));
        assert_eq!(bars[5], None);
    }

    #[test]
    fn rejects_malformed_files() {
        assert!(parse("").is_err());
        assert!(parse(&Q35_VIRTIO.lines().take(5).collect::<Vec<_>>().join("\n")).is_err());
        let bad_hex = Q35_VIRTIO.replacen("0x00000000febd1000", "0xfebd10zz", 1);
        assert!(parse(&bad_hex).is_err());
        let no_prefix = Q35_VIRTIO.replacen("0x00000000febd1000", "febd1000", 1);
        assert!(parse(&no_prefix).is_err());
        let two_fields = Q35_VIRTIO.replacen(" 0x0000000000040200", "", 1);
        assert!(parse(&two_fields).is_err());
        let backwards = Q35_VIRTIO.replacen("0x00000000febd1fff", "0x00000000febd0fff", 1);
        assert!(parse(&backwards).is_err());
    }
}

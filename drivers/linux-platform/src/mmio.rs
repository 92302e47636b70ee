//! Bus addresses of memory BARs → offsets into their `resourceN` mappings, with the bounds
//! and alignment checks every MMIO access goes through.

/// One memory BAR: where it is on the bus and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRange {
    /// BAR index (0..6).
    pub index: usize,
    /// Bus address of the first byte.
    pub bus: u64,
    /// Length in bytes (as mapped).
    pub len: u64,
}

/// Finds the BAR holding `[addr, addr + width)` and the access's offset in it. The access must
/// lie entirely inside one BAR and be naturally aligned (`width` a power of two).
/// Returns the position in `bars` and the offset.
pub fn translate(bars: &[BarRange], addr: u64, width: u64) -> Option<(usize, usize)> {
    if width == 0 || !width.is_power_of_two() {
        return None;
    }
    bars.iter().enumerate().find_map(|(i, b)| {
        let off = addr.checked_sub(b.bus)?;
        let end = off.checked_add(width)?;
        (end <= b.len && off.is_multiple_of(width))
            .then(|| usize::try_from(off).ok().map(|o| (i, o)))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BARS: [BarRange; 2] = [
        BarRange {
            index: 1,
            bus: 0xfebd_1000,
            len: 0x1000,
        },
        BarRange {
            index: 4,
            bus: 0xfe_0000_0000,
            len: 0x4000,
        },
    ];

    #[test]
    fn translates_inside_bars() {
        assert_eq!(translate(&BARS, 0xfebd_1000, 4), Some((0, 0)));
        assert_eq!(translate(&BARS, 0xfebd_1ffc, 4), Some((0, 0xffc)));
        assert_eq!(translate(&BARS, 0xfebd_1fff, 1), Some((0, 0xfff)));
        assert_eq!(translate(&BARS, 0xfe_0000_3000, 2), Some((1, 0x3000)));
        assert_eq!(translate(&BARS, 0xfe_0000_0020, 8), Some((1, 0x20)));
    }

    #[test]
    fn refuses_outside_crossing_and_misaligned() {
        assert_eq!(translate(&BARS, 0xfebd_0fff, 1), None, "just below");
        assert_eq!(translate(&BARS, 0xfebd_2000, 1), None, "just above");
        assert_eq!(translate(&BARS, 0xfebd_1ffe, 4), None, "crosses the end");
        assert_eq!(translate(&BARS, 0xfe_0000_4000, 4), None);
        assert_eq!(translate(&BARS, 0xfebd_1002, 4), None, "misaligned");
        assert_eq!(translate(&BARS, 0xfebd_1001, 2), None, "misaligned");
        assert_eq!(translate(&BARS, 0xfebd_1000, 3), None, "odd width");
        assert_eq!(translate(&BARS, 0xfebd_1000, 0), None, "no width");
        assert_eq!(translate(&BARS, u64::MAX, 8), None, "wraps");
        assert_eq!(translate(&[], 0, 1), None);
    }
}

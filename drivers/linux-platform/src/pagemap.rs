//! `/proc/self/pagemap` entries and the search for physically contiguous hugepages.
//!
//! Each 4 KiB virtual page has one little-endian u64 entry (Documentation/admin-guide/mm/
//! pagemap.rst): bit 63 "present", bits 0..=54 the page frame number. Without
//! `CAP_SYS_ADMIN` the kernel reports present pages with a PFN of 0.

/// Size of the pages the pagemap counts in.
pub const PAGEMAP_PAGE: u64 = 4096;
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// What one pagemap entry says about a virtual page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// In memory at this physical address.
    Present(u64),
    /// Present, but the kernel hides where (the reader lacks `CAP_SYS_ADMIN`).
    Hidden,
    /// Not in memory (never touched, or swapped out).
    Absent,
}

/// Decodes one pagemap entry into the physical address of its page.
pub fn decode(entry: u64) -> Frame {
    if entry & PRESENT == 0 {
        return Frame::Absent;
    }
    match entry & PFN_MASK {
        0 => Frame::Hidden,
        pfn => Frame::Present(pfn * PAGEMAP_PAGE),
    }
}

/// The byte offset in the pagemap file of the entry for virtual address `virt`.
pub fn entry_offset(virt: usize) -> u64 {
    (virt as u64 / PAGEMAP_PAGE) * 8
}

/// Among pages of `page` bytes at physical addresses `phys` (index = page number in the
/// caller's allocation), finds `n` that form one physically contiguous run. Returns their
/// indices in ascending physical order (the lowest such run), or `None`.
pub fn contiguous_run(phys: &[u64], page: u64, n: usize) -> Option<Vec<usize>> {
    if n == 0 || page == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..phys.len()).collect();
    order.sort_by_key(|&i| phys[i]);
    let mut start = 0;
    for k in 0..order.len() {
        let follows = k > start
            && phys[order[k - 1]]
                .checked_add(page)
                .is_some_and(|next| next == phys[order[k]]);
        if k > start && !follows {
            start = k;
        }
        if k + 1 - start == n {
            return Some(order[start..=k].to_vec());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const M2: u64 = 2 << 20;

    #[test]
    fn decodes_entries() {
        assert_eq!(decode(0), Frame::Absent);
        assert_eq!(decode(0x1234), Frame::Absent, "PFN without the present bit");
        assert_eq!(decode(PRESENT), Frame::Hidden);
        assert_eq!(decode(PRESENT | 0x12345), Frame::Present(0x1234_5000));
        // Soft-dirty (55), exclusive (56), file/shared (61) flags are not part of the PFN.
        let flags = (1 << 55) | (1 << 56) | (1 << 61);
        assert_eq!(decode(PRESENT | flags | 0x200), Frame::Present(0x20_0000));
        // Swapped (62) without present is absent.
        assert_eq!(decode((1 << 62) | 0x55), Frame::Absent);
        assert_eq!(entry_offset(0x7f00_0020_0000), 0x7f00_0020_0000 / 4096 * 8);
    }

    #[test]
    fn finds_runs_in_any_order() {
        // Pages handed out in descending physical order, as a fresh hugepage pool often is.
        let phys: Vec<u64> = (0..8u64).rev().map(|i| 0x4000_0000 + i * M2).collect();
        assert_eq!(contiguous_run(&phys, M2, 8), Some((0..8).rev().collect()));
        assert_eq!(contiguous_run(&phys, M2, 3), Some(vec![7, 6, 5]));
        assert_eq!(contiguous_run(&phys, M2, 9), None);
    }

    #[test]
    fn skips_gaps() {
        // Runs: {0x0, 0x2M}, {0x10M, 0x12M, 0x14M}, {0x40M}.
        let phys = [0x14 << 20, 0, 0x40 << 20, 0x10 << 20, 2 << 20, 0x12 << 20];
        assert_eq!(contiguous_run(&phys, M2, 1), Some(vec![1]));
        assert_eq!(contiguous_run(&phys, M2, 2), Some(vec![1, 4]));
        assert_eq!(contiguous_run(&phys, M2, 3), Some(vec![3, 5, 0]));
        assert_eq!(contiguous_run(&phys, M2, 4), None);
        assert_eq!(contiguous_run(&phys, M2, 0), None);
        assert_eq!(contiguous_run(&[], M2, 1), None);
    }

    #[test]
    fn duplicates_and_overflow_do_not_count_as_contiguous() {
        let phys = [0x20_0000, 0x20_0000, 0x40_0000];
        assert_eq!(contiguous_run(&phys, M2, 2), Some(vec![1, 2]));
        assert_eq!(contiguous_run(&phys, M2, 3), None);
        let top = [u64::MAX - M2 + 1, 0];
        assert_eq!(contiguous_run(&top, M2, 2), None);
    }
}

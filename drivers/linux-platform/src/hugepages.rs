//! The DMA window: physically contiguous 2 MiB hugepages, pinned for the window's lifetime.
//!
//! How: hugepages are allocated into one hugetlb memfd (`fallocate`), their physical addresses
//! are read from `/proc/self/pagemap` (root only: other readers see PFN 0), and a run of
//! physically consecutive pages is looked for; if there is none, more pages are allocated (up
//! to [`SEARCH_FACTOR`] times what is needed). The run's file pages are then mapped, in
//! physical order, with `MAP_FIXED` into one reserved virtual range, so the window is contiguous
//! both ways; the other pages are punched out of the file (back to the pool). When the pool has
//! too few free pages, its size (`nr_hugepages` of the 2 MiB size) is raised by what is missing
//! and set back afterwards (pages in use then stay as surplus pages until they are freed).
//!
//! Pinning: hugetlb pages are never swapped or reclaimed while the file holds them (`mlock` is
//! a no-op for them); the kernel may migrate them only for memory offlining or gigantic-page
//! allocation, which a machine running this driver must not do (as with SPDK/DPDK). The memfd
//! stays open as long as the window, and its descriptor is placed above the UIO device's (see
//! [`HugeWindow::allocate`]) so that on process exit the kernel stops the device's bus
//! mastering before it frees these pages.

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::Error;
use crate::pagemap::{self, Frame};

/// Size of the hugepages used.
pub const HUGE: usize = 2 << 20;
/// The 2 MiB pool's counters.
const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
/// How many times the needed pages the search for a contiguous run may allocate.
pub const SEARCH_FACTOR: usize = 8;

/// A physically contiguous, zeroed DMA window of hugepages, unmapped (and freed) on drop.
pub struct HugeWindow {
    ptr: NonNull<u8>,
    len: usize,
    phys: u64,
    /// Holds the pages; closed after the mapping is gone.
    _memfd: OwnedFd,
}

// SAFETY: the window is plain memory owned by this value; the driver accesses it through raw
// pointers with its own synchronisation (the `DmaWindow` contract).
unsafe impl Send for HugeWindow {}
// SAFETY: as above.
unsafe impl Sync for HugeWindow {}

impl HugeWindow {
    /// First byte as this process sees it.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes (a multiple of [`HUGE`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Physical (= device, without an IOMMU) address of the first byte.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// Allocates at least `bytes` of physically contiguous hugepage memory. Its memfd gets a
    /// descriptor number above `keep_above` (the UIO device): the kernel closes descriptors in
    /// ascending order at exit, so the device's bus mastering is off (uio_pci_generic's release)
    /// before the pages are freed.
    pub fn allocate(bytes: usize, keep_above: BorrowedFd<'_>) -> Result<Self, Error> {
        let need = bytes.div_ceil(HUGE).max(1);
        let memfd = rustix::fs::memfd_create(
            "vscsi-dma",
            MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
        )
        .map_err(|e| {
            Error::io("a hugetlb memfd (a kernel with CONFIG_HUGETLBFS is needed)")(e.into())
        })?;
        let memfd = if memfd.as_raw_fd() < keep_above.as_raw_fd() {
            rustix::io::fcntl_dupfd_cloexec(&memfd, keep_above.as_raw_fd() + 1)
                .map_err(|e| Error::io("duplicating the memfd")(e.into()))?
        } else {
            memfd
        };
        let pagemap = File::open("/proc/self/pagemap").map_err(Error::io("/proc/self/pagemap"))?;
        let mut pool = Pool::default();
        let found = find_run(memfd.as_fd(), &pagemap, need, &mut pool);
        let window = found.and_then(|(run, pages)| {
            let window = map_run(memfd.as_fd(), &pagemap, &run)?;
            // The pages outside the run go back to the pool.
            for page in (0..pages).filter(|p| !run.contains(p)) {
                let r = rustix::fs::fallocate(
                    &memfd,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    (page * HUGE) as u64,
                    HUGE as u64,
                );
                if let Err(e) = r {
                    log::warn!("releasing an unused hugepage: {e}");
                }
            }
            Ok(window)
        });
        let window = match window {
            Ok((ptr, phys)) => HugeWindow {
                ptr,
                len: need * HUGE,
                phys,
                _memfd: memfd,
            },
            Err(e) => {
                drop(memfd); // frees every page before the pool shrinks back
                pool.restore();
                return Err(e);
            }
        };
        pool.restore();
        Ok(window)
    }
}

impl Drop for HugeWindow {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `map_run` mapped; the window's owner (the platform)
        // has stopped the device's bus mastering and nothing uses the memory any more.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            log::warn!("unmapping the DMA window: {e}");
        }
    }
}

/// Allocates pages into `memfd` until `need` of them are physically contiguous. Returns the
/// run's file page numbers in physical order and how many pages the file holds.
fn find_run(
    memfd: BorrowedFd<'_>,
    pagemap: &File,
    need: usize,
    pool: &mut Pool,
) -> Result<(Vec<usize>, usize), Error> {
    let max = need * SEARCH_FACTOR;
    let mut have = 0usize;
    let mut target = need;
    loop {
        let want = target - have;
        let available = pool.make_available(want)?;
        let add = want.min(available);
        if add == 0 {
            return Err(Error::Setup(format!(
                "no free 2 MiB hugepages left, and the {have} allocated hold no {need} physically \
                 contiguous ones ({} MiB); give the machine more memory or a smaller --dma-mib",
                (need * HUGE) >> 20
            )));
        }
        rustix::fs::ftruncate(memfd, ((have + add) * HUGE) as u64)
            .map_err(|e| Error::io("sizing the hugetlb memfd")(e.into()))?;
        rustix::fs::fallocate(
            memfd,
            FallocateFlags::empty(),
            (have * HUGE) as u64,
            (add * HUGE) as u64,
        )
        .map_err(|e| Error::io(format!("allocating {add} hugepages"))(e.into()))?;
        have += add;
        let phys = physical_addresses(memfd, have, pagemap)?;
        if let Some(run) = pagemap::contiguous_run(&phys, HUGE as u64, need) {
            log::debug!("{need} contiguous hugepages found among {have}");
            return Ok((run, have));
        }
        if have >= max {
            return Err(Error::Setup(format!(
                "no {need} physically contiguous 2 MiB hugepages among {have} allocated (memory \
                 is fragmented: reserve hugepages early, e.g. hugepages= on the kernel command \
                 line, or use a smaller --dma-mib)"
            )));
        }
        target = (have * 2).min(max);
    }
}

/// The physical address of each of the first `pages` hugepages of `memfd`.
fn physical_addresses(
    memfd: BorrowedFd<'_>,
    pages: usize,
    pagemap: &File,
) -> Result<Vec<u64>, Error> {
    let len = pages * HUGE;
    // SAFETY: a new shared mapping of our own memfd at an address the kernel picks (it aliases
    // nothing); it is never dereferenced, only looked up in the pagemap, then unmapped.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::SHARED | MapFlags::POPULATE,
            memfd,
            0,
        )
    }
    .map_err(|e| Error::io("mapping the hugepages")(e.into()))?;
    let phys = (0..pages)
        .map(|i| frame(pagemap, ptr as usize + i * HUGE))
        .collect();
    // SAFETY: unmaps exactly the mapping made above, which nothing else refers to.
    if let Err(e) = unsafe { rustix::mm::munmap(ptr, len) } {
        log::warn!("unmapping the hugepage scan: {e}");
    }
    phys
}

/// The physical address of the page mapped at `virt`.
fn frame(pagemap: &File, virt: usize) -> Result<u64, Error> {
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, pagemap::entry_offset(virt))
        .map_err(Error::io("reading /proc/self/pagemap"))?;
    match pagemap::decode(u64::from_le_bytes(entry)) {
        Frame::Present(phys) => Ok(phys),
        Frame::Hidden => Err(Error::Setup(
            "the kernel hides physical addresses from this process (/proc/self/pagemap \
             shows PFN 0): run as root (CAP_SYS_ADMIN)"
                .into(),
        )),
        Frame::Absent => Err(Error::Setup(format!(
            "hugepage at {virt:#x} is not resident after MAP_POPULATE"
        ))),
    }
}

/// Maps the file pages `run` (in physical order) back to back into one fresh virtual range
/// and checks that it is physically contiguous. Returns its start and physical address.
fn map_run(
    memfd: BorrowedFd<'_>,
    pagemap: &File,
    run: &[usize],
) -> Result<(NonNull<u8>, u64), Error> {
    let len = run.len() * HUGE;
    // Reserve len + one page so a HUGE-aligned start fits.
    // SAFETY: a new inaccessible anonymous mapping at an address the kernel picks.
    let reserve = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len + HUGE,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .map_err(|e| Error::io("reserving address space for the DMA window")(e.into()))?;
    let start = reserve as usize;
    let base = start.next_multiple_of(HUGE);
    let trims = [(start, base - start), (base + len, HUGE - (base - start))];
    for (at, n) in trims {
        if n > 0 {
            // SAFETY: `[at, at + n)` is the part of our own reservation outside the aligned
            // window; nothing uses it.
            if let Err(e) = unsafe { rustix::mm::munmap(at as *mut _, n) } {
                log::warn!("trimming the DMA reservation: {e}");
            }
        }
    }
    let unmap_all = || {
        // SAFETY: `[base, base + len)` is our own reservation (or mappings we put in it).
        let _ = unsafe { rustix::mm::munmap(base as *mut _, len) };
    };
    for (j, &page) in run.iter().enumerate() {
        // SAFETY: MAP_FIXED replaces only part of our own reservation `[base, base + len)`,
        // which nothing else in the process uses.
        let r = unsafe {
            rustix::mm::mmap(
                (base + j * HUGE) as *mut _,
                HUGE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED | MapFlags::POPULATE,
                memfd,
                (page * HUGE) as u64,
            )
        };
        if let Err(e) = r {
            unmap_all();
            return Err(Error::io("mapping the DMA window")(e.into()));
        }
    }
    let check = || -> Result<u64, Error> {
        let phys = frame(pagemap, base)?;
        for j in 1..run.len() {
            let p = frame(pagemap, base + j * HUGE)?;
            if p != phys + (j * HUGE) as u64 {
                return Err(Error::Setup(format!(
                    "DMA window page {j} is at {p:#x}, expected {:#x}",
                    phys + (j * HUGE) as u64
                )));
            }
        }
        Ok(phys)
    };
    match check() {
        // `base` is a non-null mapping address.
        Ok(phys) => NonNull::new(base as *mut u8)
            .map(|p| (p, phys))
            .ok_or_else(|| Error::Setup("mmap returned null".into())),
        Err(e) => {
            unmap_all();
            Err(e)
        }
    }
}

/// The 2 MiB hugepage pool: grown on demand, set back to its old size when done.
#[derive(Default)]
struct Pool {
    /// `nr_hugepages` before this allocation first raised it.
    raised_from: Option<u64>,
}

fn read_count(name: &str) -> Result<u64, Error> {
    let path = format!("{POOL}/{name}");
    let text = fs::read_to_string(&path).map_err(Error::io(format!(
        "{path} (a kernel with 2 MiB hugepages is needed)"
    )))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Setup(format!("{path}: {text:?} is not a number")))
}

impl Pool {
    /// Free pages nobody has a reservation on.
    fn available() -> Result<u64, Error> {
        Ok(read_count("free_hugepages")?.saturating_sub(read_count("resv_hugepages")?))
    }

    /// Makes `pages` free pages available if it can (raising the pool size), and returns how
    /// many are available now (possibly fewer: memory may be short or fragmented).
    fn make_available(&mut self, pages: usize) -> Result<usize, Error> {
        let pages = pages as u64;
        let available = Self::available()?;
        if available >= pages {
            return Ok(usize::try_from(available).unwrap_or(usize::MAX));
        }
        let nr = read_count("nr_hugepages")?;
        self.raised_from.get_or_insert(nr);
        let want = nr + (pages - available);
        let path = format!("{POOL}/nr_hugepages");
        fs::write(&path, want.to_string()).map_err(Error::io(format!(
            "reserving {} more 2 MiB hugepages (writing {want} to {path} needs root)",
            pages - available
        )))?;
        let now = Self::available()?;
        log::info!(
            "hugepage pool raised from {nr} to {} pages ({now} free)",
            read_count("nr_hugepages")?
        );
        Ok(usize::try_from(now).unwrap_or(usize::MAX))
    }

    /// Sets the pool back to its size before [`Pool::make_available`] raised it: its free
    /// pages go back to the kernel, pages in use become surplus pages, freed when released.
    fn restore(&mut self) {
        if let Some(nr) = self.raised_from.take() {
            let path = format!("{POOL}/nr_hugepages");
            if let Err(e) = fs::write(&path, nr.to_string()) {
                log::warn!("setting {path} back to {nr}: {e}");
            }
        }
    }
}

//! `virtio_drivers::Hal` over the platform's DMA windows.
//!
//! `Hal` is a trait of associated functions (no `self`), so the windows live in a process-wide
//! registry. Each registered window is a piece of device-visible memory (on the QEMU machine:
//! shared guest RAM) with its own page allocator. Translation (`share`) finds the window that
//! holds a CPU pointer and returns the matching device address: there is no bouncing and no
//! copying, because every buffer the driver hands to a queue is already inside a window.
//! Allocation (`dma_alloc`) takes pages from the window the calling thread selected with
//! [`WindowScope`] (a driver initialising a device selects its device's window first), so several
//! devices (several QEMU machines in one test process) never mix memory.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, RwLock};

use buddy_system_allocator::FrameAllocator;
use platform::DmaWindow;
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// One registered window and its page allocator (page numbers relative to the window start).
struct Window {
    cpu_base: usize,
    dev_base: u64,
    len: usize,
    /// Free pages of this window. Lock order: taken alone, never with another lock.
    pages: Mutex<FrameAllocator<32>>,
}

/// Every window of this process. Written when a device is set up or torn down; read on each
/// `share` (every descriptor added), hence an RwLock.
static WINDOWS: RwLock<Vec<Arc<Window>>> = RwLock::new(Vec::new());

thread_local! {
    /// The window `dma_alloc` takes pages from on this thread.
    static CURRENT: RefCell<Option<Arc<Window>>> = const { RefCell::new(None) };
}

fn windows() -> std::sync::RwLockReadGuard<'static, Vec<Arc<Window>>> {
    WINDOWS.read().unwrap_or_else(|p| p.into_inner())
}

fn find(cpu: usize) -> Option<Arc<Window>> {
    windows()
        .iter()
        .find(|w| cpu >= w.cpu_base && cpu < w.cpu_base + w.len)
        .cloned()
}

/// Whether `len` bytes at `ptr` lie entirely inside one registered window (so the device can
/// reach them in place).
pub fn is_device_visible(ptr: *const u8, len: usize) -> bool {
    let cpu = ptr as usize;
    windows()
        .iter()
        .any(|w| cpu >= w.cpu_base && cpu.saturating_add(len) <= w.cpu_base + w.len)
}

/// A page-aligned, device-visible allocation that stays valid until dropped.
pub struct DmaPages {
    window: Arc<Window>,
    first_page: usize,
    pages: usize,
}

impl DmaPages {
    /// Address the device uses for the first byte.
    pub fn device_addr(&self) -> u64 {
        self.window.dev_base + (self.first_page * PAGE_SIZE) as u64
    }
    /// Address this process uses for the first byte.
    pub fn cpu_ptr(&self) -> NonNull<u8> {
        let addr = self.window.cpu_base + self.first_page * PAGE_SIZE;
        // SAFETY: cpu_base is a non-null mapping and the offset stays inside the window, so the
        // sum is non-null.
        unsafe { NonNull::new_unchecked(addr as *mut u8) }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }
    /// Always false: allocations have at least one page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

impl Drop for DmaPages {
    fn drop(&mut self) {
        let mut pages = self.window.pages.lock().unwrap_or_else(|p| p.into_inner());
        pages.dealloc(self.first_page, self.pages);
    }
}

/// A registered DMA window. Dropping it unregisters the window; allocations made from it keep
/// their pages alive (they hold the window), but the memory itself must stay mapped by the
/// platform as long as the device may use it.
pub struct DmaArena {
    window: Arc<Window>,
}

impl DmaArena {
    /// Registers `window` so queues and buffers can live in it.
    ///
    /// # Safety
    /// `window` must describe memory that is mapped for this process for as long as the arena
    /// and any allocation or queue made from it exist, that nothing else in the process uses,
    /// and whose device addresses reach the same bytes.
    pub unsafe fn register(window: DmaWindow) -> Result<Self, &'static str> {
        let cpu_base = window.cpu_ptr.as_ptr() as usize;
        if !cpu_base.is_multiple_of(PAGE_SIZE)
            || !window.device_addr.is_multiple_of(PAGE_SIZE as u64)
        {
            return Err("DMA window is not page aligned");
        }
        let npages = window.len / PAGE_SIZE;
        if npages == 0 {
            return Err("DMA window is smaller than a page");
        }
        let mut pages = FrameAllocator::new();
        pages.add_frame(0, npages);
        let w = Arc::new(Window {
            cpu_base,
            dev_base: window.device_addr,
            len: npages * PAGE_SIZE,
            pages: Mutex::new(pages),
        });
        let mut all = WINDOWS.write().unwrap_or_else(|p| p.into_inner());
        if all
            .iter()
            .any(|o| cpu_base < o.cpu_base + o.len && o.cpu_base < cpu_base + w.len)
        {
            return Err("DMA window overlaps a registered window");
        }
        all.push(w.clone());
        Ok(DmaArena { window: w })
    }

    /// Allocates `bytes` (rounded up to pages), zeroed.
    pub fn alloc(&self, bytes: usize) -> Option<DmaPages> {
        alloc_in(&self.window, bytes)
    }

    /// The CPU address of device address `dev` when `len` bytes from it lie in this window.
    /// (Device addresses are per machine: two machines in one process may both use the same
    /// device address, so the translation is always asked of the right window.)
    pub fn cpu_ptr_of(&self, dev: u64, len: usize) -> Option<NonNull<u8>> {
        let w = &self.window;
        let off = usize::try_from(dev.checked_sub(w.dev_base)?).ok()?;
        (off.checked_add(len)? <= w.len).then(|| {
            // SAFETY: `cpu_base + off` is inside the window's mapping, which is not null.
            unsafe { NonNull::new_unchecked((w.cpu_base + off) as *mut u8) }
        })
    }

    /// Makes this arena the one `virtio_drivers` allocates from on this thread until the
    /// returned scope is dropped.
    pub fn scope(&self) -> WindowScope {
        let prev = CURRENT.with(|c| c.replace(Some(self.window.clone())));
        WindowScope { prev }
    }
}

impl Drop for DmaArena {
    fn drop(&mut self) {
        let mut all = WINDOWS.write().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| !Arc::ptr_eq(w, &self.window));
    }
}

/// Allocates zeroed pages from `window`.
fn alloc_in(window: &Arc<Window>, bytes: usize) -> Option<DmaPages> {
    let pages = bytes.div_ceil(PAGE_SIZE).max(1);
    let first = {
        let mut alloc = window.pages.lock().unwrap_or_else(|p| p.into_inner());
        alloc.alloc(pages)?
    };
    let dma = DmaPages {
        window: window.clone(),
        first_page: first,
        pages,
    };
    // SAFETY: the pages were just allocated from this window, which the registration contract
    // keeps mapped; nobody else (the device included) has their address yet.
    unsafe { std::ptr::write_bytes(dma.cpu_ptr().as_ptr(), 0, dma.len()) };
    Some(dma)
}

/// Restores the previously selected window on drop.
pub struct WindowScope {
    prev: Option<Arc<Window>>,
}

impl Drop for WindowScope {
    fn drop(&mut self) {
        let prev = self.prev.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// The `Hal` the driver's virtqueues use.
pub struct ShmHal;

// SAFETY: dma_alloc returns zeroed, page-aligned memory from a registered window that is not
// handed out twice until dma_dealloc; share translates only pointers inside a registered
// window, whose device address reaches the same bytes (the DmaArena::register contract).
unsafe impl Hal for ShmHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let window = CURRENT.with(|c| c.borrow().clone());
        let Some(window) = window else {
            log::error!("dma_alloc outside a DmaArena scope");
            return (0, NonNull::dangling());
        };
        match alloc_in(&window, pages * PAGE_SIZE) {
            Some(dma) => {
                let out = (dma.device_addr(), dma.cpu_ptr());
                // Ownership passes to virtio_drivers until dma_dealloc.
                std::mem::forget(dma);
                out
            }
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let cpu = vaddr.as_ptr() as usize;
        let Some(window) = find(cpu) else {
            return -1;
        };
        let first_page = (cpu - window.cpu_base) / PAGE_SIZE;
        drop(DmaPages {
            window,
            first_page,
            pages,
        });
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Our transport reaches MMIO through the platform, never through a pointer; nothing in
        // virtio_drivers that we use calls this.
        NonNull::dangling()
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let cpu = buffer.as_ptr() as *mut u8 as usize;
        match find(cpu) {
            Some(w) if cpu + buffer.len() <= w.cpu_base + w.len => {
                w.dev_base + (cpu - w.cpu_base) as u64
            }
            // Every buffer the driver queues is carved from a window (queue.rs); anything else
            // is a bug in this crate, and handing the device a made-up address would corrupt
            // memory, so stop here.
            _ => panic!("virtio-scsi: buffer {cpu:#x} is not in a registered DMA window"),
        }
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Nothing to do: buffers are device-visible in place.
    }
}

//! Runs real QEMU machines: launch and PCI enumeration, BAR assignment, shared RAM, death of
//! QEMU, posted-write ordering, QMP, and the INTx path with a real virtio-scsi request.
//! Each test has its own temporary work directory; the machine's `Drop` kills QEMU even when
//! an assertion fails.

use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use platform::{IrqWait, PciAddress, Platform, PlatformError, Width};
use qemu_machine::{
    Accel, DMA_BASE, DiskSpec, MMIO_BASE, MachineConfig, MachineError, QemuMachine,
};
use serde_json::{Value, json};

const VIRTIO_SCSI: PciAddress = PciAddress {
    bus: 0,
    device: 1,
    function: 0,
};

struct Fixture {
    machine: Arc<QemuMachine>,
    // Dropped after the machine (fields drop in declaration order).
    _dir: tempfile::TempDir,
}

fn launch_with(f: impl FnOnce(&mut MachineConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk,0.img");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, data).unwrap();
    let mut config = MachineConfig::new(dir.path()).with_disk(DiskSpec::new(&image));
    config.ram_mib = 64;
    // Auto (KVM when usable) unless QEMU_MACHINE_TEST_ACCEL says tcg or kvm.
    match std::env::var("QEMU_MACHINE_TEST_ACCEL").as_deref() {
        Ok("tcg") => config.accel = Accel::Tcg,
        Ok("kvm") => config.accel = Accel::Kvm,
        _ => {}
    }
    f(&mut config);
    let machine = QemuMachine::launch(config).unwrap_or_else(|e| panic!("{e}"));
    Fixture { machine, _dir: dir }
}

fn launch() -> Fixture {
    launch_with(|_| {})
}

/// Assigns BAR4 (64-bit) at MMIO_BASE, enables memory space and bus mastering, and returns
/// the bus address of the virtio structure with `cfg_type` (1 common, 2 notify, 3 ISR, 4 device).
fn setup_bar4(m: &QemuMachine) -> impl Fn(u8) -> u64 + '_ {
    let bar4 = m.pci_read32(VIRTIO_SCSI, 0x20).unwrap();
    assert_eq!(bar4 & 0x7, 0x4, "BAR4 is a 64-bit memory BAR: {bar4:#x}");
    m.pci_write32(VIRTIO_SCSI, 0x20, 0xFFFF_FFFF).unwrap();
    m.pci_write32(VIRTIO_SCSI, 0x24, 0xFFFF_FFFF).unwrap();
    let lo = m.pci_read32(VIRTIO_SCSI, 0x20).unwrap();
    let hi = m.pci_read32(VIRTIO_SCSI, 0x24).unwrap();
    let size = !((u64::from(hi) << 32) | u64::from(lo & !0xF)) + 1;
    assert!(
        size.is_power_of_two() && size >= 0x4000,
        "BAR4 size {size:#x}"
    );
    let window = m.mmio_window();
    assert!(size <= window.len);
    m.pci_write32(VIRTIO_SCSI, 0x20, window.base as u32)
        .unwrap();
    m.pci_write32(VIRTIO_SCSI, 0x24, (window.base >> 32) as u32)
        .unwrap();
    assert_eq!(
        m.pci_read32(VIRTIO_SCSI, 0x20).unwrap() & !0xF,
        window.base as u32
    );
    let cmd = m.pci_read32(VIRTIO_SCSI, 0x04).unwrap();
    m.pci_write32(VIRTIO_SCSI, 0x04, (cmd & 0xFFFF) | 0x6)
        .unwrap();

    move |cfg_type| {
        let status = m.pci_read32(VIRTIO_SCSI, 0x04).unwrap() >> 16;
        assert!(status & 0x10 != 0, "capability list");
        let mut ptr = (m.pci_read32(VIRTIO_SCSI, 0x34).unwrap() & 0xFC) as u8;
        while ptr != 0 {
            let head = m.pci_read32(VIRTIO_SCSI, ptr).unwrap();
            let (id, next, ty) = (head & 0xFF, (head >> 8) & 0xFC, (head >> 24) & 0xFF);
            if id == 0x09 && ty == u32::from(cfg_type) {
                let bar = m.pci_read32(VIRTIO_SCSI, ptr + 4).unwrap() & 0xFF;
                assert_eq!(bar, 4);
                let offset = m.pci_read32(VIRTIO_SCSI, ptr + 8).unwrap();
                return window.base + u64::from(offset);
            }
            ptr = next as u8;
        }
        panic!("no virtio capability of type {cfg_type}");
    }
}

#[test]
fn launch_and_enumerate_bus0() {
    let fx = launch();
    let m = &fx.machine;
    assert!(m.health().is_ok());
    let mut found = Vec::new();
    for device in 0..32 {
        let dev = PciAddress {
            bus: 0,
            device,
            function: 0,
        };
        let id = m.pci_read32(dev, 0).unwrap();
        if id & 0xFFFF != 0xFFFF {
            found.push((dev, id));
        }
    }
    let (dev, _) = found
        .iter()
        .find(|(_, id)| *id == 0x1048_1AF4)
        .unwrap_or_else(|| panic!("no 1af4:1048 among {found:x?}"));
    assert_eq!(*dev, VIRTIO_SCSI);
    let class = m.pci_read32(VIRTIO_SCSI, 0x08).unwrap() >> 16;
    assert_eq!(class, 0x0100, "mass storage / SCSI");
    // The host bridge is there too (q35's MCH, 8086:29c0).
    assert!(
        found
            .iter()
            .any(|(d, id)| d.device == 0 && *id == 0x29C0_8086)
    );
    // INTA, wired to the line `irq_line` names.
    assert_eq!((m.pci_read32(VIRTIO_SCSI, 0x3C).unwrap() >> 8) & 0xFF, 1);
    assert_eq!(m.irq_line(), 21);
    assert!(m.cpu_count() >= 1);
    assert!(m.current_cpu() < m.cpu_count());
    assert!(m.ram_path().exists());
    assert!(m.log_path().exists());
}

#[test]
fn bar_assignment_and_common_config() {
    let fx = launch_with(|c| c.num_queues = 3);
    let m = &fx.machine;
    let cap = setup_bar4(m);
    let common = cap(1);
    assert_eq!(m.mmio_read(common + 0x12, Width::U16).unwrap(), 3 + 2);
    // The other structures are in the same BAR, where DESIGN.md says.
    assert_eq!(cap(3), MMIO_BASE + 0x1000);
    assert_eq!(cap(4), MMIO_BASE + 0x2000);
    assert_eq!(cap(2), MMIO_BASE + 0x3000);
    // Outside the window: refused without asking QEMU.
    assert!(matches!(
        m.mmio_read(0x1000, Width::U32),
        Err(PlatformError::Invalid(_))
    ));
}

#[test]
fn shared_memory_is_guest_ram() {
    let fx = launch();
    let m = &fx.machine;
    let dma = m.dma_window();
    assert_eq!(dma.device_addr, DMA_BASE);
    assert_eq!(dma.len, (64 << 20) - DMA_BASE as usize);
    let ptr = |gpa: u64| {
        assert!(gpa >= dma.device_addr && gpa + 8 <= dma.device_addr + dma.len as u64);
        // SAFETY: inside the window (checked above); the machine is alive.
        unsafe { dma.cpu_ptr.as_ptr().add((gpa - dma.device_addr) as usize) }
    };
    // Host writes, guest reads.
    for (gpa, value) in [
        (0x20_0000u64, 0xDEAD_BEEFu32),
        (0x10_0000, 0x0102_0304),
        (0x3FF_FFF8, 0xA5A5_5A5A),
    ] {
        // SAFETY: aligned, inside the window; nobody else uses these bytes.
        unsafe { ptr(gpa).cast::<u32>().write_volatile(value) };
        assert_eq!(m.mem_read(gpa, Width::U32).unwrap(), u64::from(value));
    }
    // Guest writes, host reads.
    m.mem_write(0x30_0000, Width::U64, 0x1122_3344_5566_7788)
        .unwrap();
    // SAFETY: aligned, inside the window.
    let v = unsafe { ptr(0x30_0000).cast::<u64>().read_volatile() };
    assert_eq!(v, 0x1122_3344_5566_7788);
    m.qtest_command("writel 0x300010 0xcafef00d").unwrap();
    // SAFETY: aligned, inside the window.
    let v = unsafe { ptr(0x30_0010).cast::<u32>().read_volatile() };
    assert_eq!(v, 0xCAFE_F00D);
    // The file is the RAM too.
    let file = std::fs::read(m.ram_path()).unwrap();
    assert_eq!(&file[0x30_0010..0x30_0014], &0xCAFE_F00Du32.to_le_bytes());
}

#[test]
fn killed_qemu_is_gone_promptly() {
    let fx = launch();
    let m = fx.machine.clone();
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let m = m.clone();
        thread::spawn(move || {
            let r = m.wait_irq(None);
            let _ = tx.send(r);
        })
    };
    thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err(), "wait_irq returned early");

    let start = Instant::now();
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGKILL) }, 0);
    let r = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("wait_irq woke");
    assert!(matches!(r, Err(PlatformError::Gone(_))), "{r:?}");
    let r = m.mmio_read(MMIO_BASE, Width::U32);
    assert!(start.elapsed() < Duration::from_secs(2));
    let Err(PlatformError::Gone(reason)) = r else {
        panic!("{r:?}")
    };
    assert!(
        reason.contains("SIGKILL") || reason.contains("signal"),
        "{reason}"
    );
    assert!(m.pci_read32(VIRTIO_SCSI, 0).is_err());
    assert!(m.mmio_write_posted(MMIO_BASE, Width::U32, 0).is_err());
    assert!(matches!(m.health(), Err(PlatformError::Gone(_))));
    assert!(matches!(
        m.qmp("query-status", Value::Null),
        Err(MachineError::Platform(PlatformError::Gone(_)))
    ));
    assert!(m.exit_status().is_some());
    waiter.join().unwrap();
}

#[test]
fn posted_writes_are_ordered() {
    let fx = launch();
    let m = &fx.machine;
    let common = setup_bar4(m)(1);
    // queue_select (16 bit) and device_feature_select (32 bit) read back what was written.
    for i in 0..200u64 {
        m.mmio_write_posted(common + 0x16, Width::U16, i % 5)
            .unwrap();
        m.mmio_write_posted(common, Width::U32, i).unwrap();
        m.mmio_write_posted(common, Width::U32, i + 1).unwrap();
        assert_eq!(m.mmio_read(common + 0x16, Width::U16).unwrap(), i % 5);
        assert_eq!(m.mmio_read(common, Width::U32).unwrap(), i + 1);
    }
    assert!(m.health().is_ok());
}

#[test]
fn qmp_works() {
    let fx = launch();
    let m = &fx.machine;
    let status = m.qmp("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    let err = m
        .qmp("device_del", json!({ "id": "no-such-device" }))
        .unwrap_err();
    assert!(matches!(err, MachineError::Qmp(_)), "{err}");
    // The connection survives an error answer.
    let block = m.qmp("query-block", Value::Null).unwrap();
    assert!(block.as_array().is_some_and(|a| !a.is_empty()), "{block}");
    m.shutdown();
    assert!(matches!(m.health(), Err(PlatformError::Gone(_))));
    assert!(m.exit_status().is_some());
}

#[test]
fn missing_binary_and_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = MachineConfig::new(dir.path());
    config.qemu_binary = "qemu-system-does-not-exist".into();
    let err = QemuMachine::launch(config.clone()).unwrap_err();
    assert!(matches!(err, MachineError::QemuNotFound(_)), "{err}");
    assert!(err.to_string().contains("apt-get install qemu-system-x86"));

    let mut bad = MachineConfig::new(dir.path());
    bad.disks.push(DiskSpec {
        logical_block_size: Some(1000),
        ..DiskSpec::new("/x")
    });
    assert!(matches!(
        QemuMachine::launch(bad).unwrap_err(),
        MachineError::InvalidConfig(_)
    ));

    // QEMU refuses the drive: the error carries QEMU's own message from its log.
    let mut missing = MachineConfig::new(dir.path()).with_disk(DiskSpec::new("/no/such.img"));
    missing.accel = Accel::Tcg;
    let err = QemuMachine::launch(missing).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, MachineError::LaunchFailed { .. }), "{text}");
    assert!(text.contains("/no/such.img"), "{text}");
}

/// The INTx path end to end: an INQUIRY on request queue 0 raises the line, `wait_irq` sees
/// it, the ISR read lowers it before the read returns.
#[test]
fn inquiry_raises_and_isr_read_lowers_the_line() {
    let fx = launch();
    let m = &fx.machine;
    let cap = setup_bar4(m);
    let (common, notify, isr) = (cap(1), cap(2), cap(3));
    let w8 = |off, v| m.mmio_write(common + off, Width::U8, v).unwrap();
    let w16 = |off, v| m.mmio_write(common + off, Width::U16, v).unwrap();
    let w32 = |off, v| m.mmio_write(common + off, Width::U32, v).unwrap();
    let w64 = |off, v| m.mmio_write(common + off, Width::U64, v).unwrap();
    w8(0x14, 0);
    w8(0x14, 1 | 2);
    w32(0x08, 1);
    w32(0x0C, 1); // VIRTIO_F_VERSION_1
    w8(0x14, 1 | 2 | 8);
    assert_eq!(m.mmio_read(common + 0x14, Width::U8).unwrap() & 8, 8);

    let dma = m.dma_window();
    let base = dma.device_addr + 0x10_0000;
    let (desc, avail, used, req, resp, data) = (
        base,
        base + 0x1000,
        base + 0x2000,
        base + 0x3000,
        base + 0x4000,
        base + 0x5000,
    );
    let put = |gpa: u64, bytes: &[u8]| {
        let off = (gpa - dma.device_addr) as usize;
        assert!(off + bytes.len() <= dma.len);
        // SAFETY: inside the window; the device does not own these bytes until notified.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                dma.cpu_ptr.as_ptr().add(off),
                bytes.len(),
            )
        };
    };
    let get = |gpa: u64, len: usize| -> Vec<u8> {
        let off = (gpa - dma.device_addr) as usize;
        let mut v = vec![0; len];
        // SAFETY: inside the window; the device has completed (used index checked first).
        unsafe {
            std::ptr::copy_nonoverlapping(dma.cpu_ptr.as_ptr().add(off), v.as_mut_ptr(), len)
        };
        v
    };

    w16(0x16, 2); // request queue 0
    w16(0x18, 8);
    w64(0x20, desc);
    w64(0x28, avail);
    w64(0x30, used);
    let notify_off = m.mmio_read(common + 0x1E, Width::U16).unwrap();
    w16(0x1C, 1);
    w8(0x14, 1 | 2 | 4 | 8);

    // virtio-scsi request header (51 bytes with cdb_size 32): LUN 0 of target 0, INQUIRY.
    let mut r = vec![1u8, 0, 0x40, 0, 0, 0, 0, 0];
    r.extend_from_slice(&7u64.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0]);
    let mut cdb = [0u8; 32];
    cdb[..6].copy_from_slice(&[0x12, 0, 0, 0, 36, 0]);
    r.extend_from_slice(&cdb);
    put(req, &r);
    let d = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut v = addr.to_le_bytes().to_vec();
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&next.to_le_bytes());
        v
    };
    let mut table = d(req, r.len() as u32, 1, 1);
    table.extend(d(resp, 108, 1 | 2, 2));
    table.extend(d(data, 36, 2, 0));
    put(desc, &table);

    assert_eq!(
        m.wait_irq(Some(Duration::from_millis(1))).unwrap(),
        IrqWait::TimedOut
    );
    // Published only now: QEMU kicks every queue once by itself when it starts ioeventfd at
    // DRIVER_OK, so a request made available earlier may complete before the notify.
    put(avail, &[0, 0, 1, 0, 0, 0]);
    m.mmio_write_posted(notify + notify_off * 4, Width::U16, 2)
        .unwrap();
    assert_eq!(
        m.wait_irq(Some(Duration::from_secs(5))).unwrap(),
        IrqWait::Asserted
    );
    assert!(m.irq_asserted());
    assert_eq!(get(used + 2, 2), [1, 0]);
    assert_eq!(&get(data + 8, 28), b"QEMU    QEMU HARDDISK   2.5+");
    // Level-triggered: still asserted until acknowledged.
    assert_eq!(
        m.wait_irq(Some(Duration::from_millis(1))).unwrap(),
        IrqWait::Asserted
    );
    assert_eq!(m.mmio_read(isr, Width::U8).unwrap(), 1);
    // `IRQ lower` came before the read's answer: already low, no race.
    assert!(!m.irq_asserted());
    assert_eq!(
        m.wait_irq(Some(Duration::from_millis(20))).unwrap(),
        IrqWait::TimedOut
    );
    assert_eq!(m.mmio_read(isr, Width::U8).unwrap(), 0);
}

/// Many threads at once: every answer reaches the thread that asked, and CF8/CFC pairs are
/// never split by another thread's.
#[test]
fn concurrent_callers_get_their_own_answers() {
    let fx = launch();
    let m = &fx.machine;
    let common = setup_bar4(m)(1);
    let host_bridge = PciAddress {
        bus: 0,
        device: 0,
        function: 0,
    };
    thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in 0..150u64 {
                    match (t + i) % 3 {
                        0 => assert_eq!(m.pci_read32(VIRTIO_SCSI, 0).unwrap(), 0x1048_1AF4),
                        1 => assert_eq!(m.pci_read32(host_bridge, 0).unwrap(), 0x29C0_8086),
                        _ => {
                            let gpa = 0x40_0000 + t * 8;
                            m.mem_write(gpa, Width::U64, i << 8 | t).unwrap();
                            m.mmio_write_posted(common + 0x16, Width::U16, t).unwrap();
                            assert_eq!(m.mem_read(gpa, Width::U64).unwrap(), i << 8 | t);
                            assert_eq!(m.mmio_read(common + 0x12, Width::U16).unwrap(), 6);
                        }
                    }
                }
            });
        }
    });
    assert!(m.health().is_ok());
}

/// A shared window is device-visible memory of its own: bytes written through the fd's mapping
/// are what the machine reads at the window's device address, and the other way round.
#[test]
fn shared_windows_are_separate_device_visible_files() {
    let f = launch();
    let m = &f.machine;
    let a = m.alloc_shared_window(3 << 20).expect("first window");
    let b = m.alloc_shared_window(1 << 20).expect("second window");
    assert!(a.window.len >= 3 << 20 && b.window.len >= 1 << 20);
    assert!(
        a.window.device_addr >= 1 << 32,
        "windows live in the device-memory region"
    );
    let a_end = a.window.device_addr + a.window.len as u64;
    assert!(
        b.window.device_addr >= a_end
            || b.window.device_addr + b.window.len as u64 <= a.window.device_addr
    );

    // Map the fd as a client would: the whole file, offset 0.
    let file = std::fs::File::from(a.fd);
    assert_eq!(
        file.metadata().expect("fd metadata").len() as usize,
        a.window.len
    );
    use std::os::unix::fs::FileExt;
    file.write_all_at(&0xfeed_f00du32.to_le_bytes(), 4096)
        .expect("write through the fd");
    assert_eq!(
        m.mem_read(a.window.device_addr + 4096, Width::U32)
            .expect("device read"),
        0xfeed_f00d
    );
    m.mem_write(a.window.device_addr + 8192, Width::U32, 0x1234_5678)
        .expect("device write");
    let mut back = [0u8; 4];
    file.read_exact_at(&mut back, 8192)
        .expect("read through the fd");
    assert_eq!(u32::from_le_bytes(back), 0x1234_5678);
    assert!(
        m.alloc_shared_window(usize::MAX / 2).is_err(),
        "oversized window refused"
    );
}

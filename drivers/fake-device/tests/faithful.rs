//! The honest fake is faithful enough to run the real driver: bring-up through
//! `ScsiHost::start`, disk discovery (INQUIRY, REPORT LUNS, the power-on UNIT ATTENTION, VPD,
//! READ CAPACITY, MODE SENSE), and data round trips checked against the fake's medium.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{host_config, pattern, record_panics, start, with_watchdog};
use fake_virtio_scsi::{DiskSpec, FakeSpec, UsedLen};
use virtio_scsi::DriverError;

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn round_trip_through_the_driver() {
    record_panics();
    with_watchdog("faithful", LIMIT, || {
        let (fake, host) = start(FakeSpec::default(), host_config(Duration::from_secs(5)));
        let host = host.expect("host starts on an honest fake");
        let disks = host.disks();
        assert_eq!(disks.len(), 1, "one disk");
        let d = &disks[0];
        assert_eq!((d.target, d.lun, d.block_size, d.blocks), (0, 0, 512, 4096));
        assert!(!d.readonly);
        assert_eq!(d.vendor, "FAKE");
        assert_eq!(d.product, "VIRTIO-SCSI DISK");
        assert_eq!(d.serial.as_deref(), Some("FAKE000000"));
        assert!(d.wwn.is_some());

        // Several commands' worth (16 KiB slots), at an odd LBA.
        let data = pattern(1, 0, 100 * 512);
        host.write(d, 7, &data).expect("write");
        assert_eq!(
            fake.disk_read(0, 0, 7 * 512, data.len()).expect("medium"),
            data,
            "the medium holds what the driver wrote"
        );
        let mut back = vec![0u8; data.len()];
        host.read(d, 7, &mut back).expect("read");
        assert_eq!(back, data);
        host.flush(d).expect("flush");
        assert_eq!(fake.flushes(0, 0), Some(1));

        // Data put on the medium behind the driver's back reads back too.
        let other = pattern(2, 0, 4096);
        assert!(fake.disk_write(0, 0, 4000 * 512, &other));
        let mut b = vec![0u8; 4096];
        host.read(d, 4000, &mut b).expect("read");
        assert_eq!(b, other);

        // The last block, and one past the end (refused before the device).
        host.read(d, 4095, &mut b[..512]).expect("last block");
        assert!(matches!(
            host.read(d, 4096, &mut b[..512]),
            Err(DriverError::Invalid(_))
        ));

        host.shutdown();
        let s = fake.stats();
        assert!(s.driver_faults.is_empty(), "{:?}", s.driver_faults);
        assert_eq!(s.stray_mmio, 0, "{:?}", s.stray_log);
        assert_eq!(s.status, 0, "shutdown resets the device");
        assert_eq!(s.held, 0);
    })
    .unwrap();
    assert!(common::panics_in(&["vscsi-completion", "faithful"]).is_empty());
}

#[test]
fn several_units_block_sizes_and_readonly() {
    record_panics();
    with_watchdog("faithful-units", LIMIT, || {
        let mut ro = DiskSpec::new(2, 512, 64);
        ro.readonly = true;
        let mut limited = DiskSpec::new(1, 512, 2048);
        limited.lun = 3;
        limited.max_transfer_blocks = 8;
        let spec = FakeSpec {
            disks: vec![
                DiskSpec::new(0, 4096, 512),
                DiskSpec::new(1, 512, 1024),
                limited,
                ro,
            ],
            used_len: UsedLen::Spec,
            ..FakeSpec::default()
        };
        let (fake, host) = start(spec, host_config(Duration::from_secs(5)));
        let host = host.expect("starts");
        let disks = host.disks();
        let ids: Vec<(u8, u16, u32, u64, bool)> = disks
            .iter()
            .map(|d| (d.target, d.lun, d.block_size, d.blocks, d.readonly))
            .collect();
        assert_eq!(
            ids,
            vec![
                (0, 0, 4096, 512, false),
                (1, 0, 512, 1024, false),
                (1, 3, 512, 2048, false),
                (2, 0, 512, 64, true),
            ]
        );
        assert_eq!(
            disks[2].max_transfer_bytes,
            8 * 512,
            "Block Limits honoured"
        );

        for (i, d) in disks.iter().enumerate().take(3) {
            let bs = d.block_size as usize;
            let data = pattern(10 + i as u64, 0, 9 * bs);
            host.write(d, 3, &data).expect("write");
            assert_eq!(
                fake.disk_read(d.target, d.lun, 3 * bs as u64, data.len())
                    .expect("medium"),
                data
            );
            let mut back = vec![0u8; data.len()];
            host.read(d, 3, &mut back).expect("read");
            assert_eq!(back, data);
        }
        assert!(matches!(
            host.write(&disks[3], 0, &[0u8; 512]),
            Err(DriverError::ReadOnly)
        ));
        host.shutdown();
        let s = fake.stats();
        assert!(s.driver_faults.is_empty(), "{:?}", s.driver_faults);
    })
    .unwrap();
}

#[test]
fn concurrent_writers_and_readers_on_two_queues() {
    concurrent_round_trips(Duration::ZERO);
}

/// The same with busy polling (`HostConfig::poll`): completions found by the polling
/// completion thread, interrupts suppressed while it polls and back on when it stops.
#[test]
fn concurrent_round_trips_with_busy_polling() {
    concurrent_round_trips(Duration::from_micros(300));
}

fn concurrent_round_trips(poll: Duration) {
    record_panics();
    with_watchdog("faithful-concurrent", LIMIT, move || {
        let spec = FakeSpec {
            disks: vec![DiskSpec::new(0, 512, 8192), DiskSpec::new(1, 512, 8192)],
            ..FakeSpec::default()
        };
        let mut cfg = host_config(Duration::from_secs(10));
        cfg.queues = Some(2);
        cfg.poll = poll;
        let (fake, host) = start(spec, cfg);
        let host = host.expect("starts");
        assert_eq!(host.queues().len(), 2);
        let mut threads = Vec::new();
        for t in 0..4u64 {
            let host = Arc::clone(&host);
            threads.push(thread::spawn(move || {
                let d = host.disk((t % 2) as usize).expect("disk");
                for round in 0..20u64 {
                    let lba = (t / 2) * 4000 + round * 64;
                    let data = pattern(t * 100 + round, lba * 512, 64 * 512);
                    host.write(&d, lba, &data).expect("write");
                    let mut back = vec![0u8; data.len()];
                    host.read(&d, lba, &mut back).expect("read");
                    assert_eq!(back, data);
                }
            }));
        }
        for t in threads {
            t.join().expect("worker");
        }
        let stats = host.stats();
        assert!(stats.submitted.iter().sum::<u64>() > 0);
        host.shutdown();
        let s = fake.stats();
        assert!(s.driver_faults.is_empty(), "{:?}", s.driver_faults);
        assert_eq!(s.held, 0);
    })
    .unwrap();
}

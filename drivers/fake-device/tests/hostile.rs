//! Hostile-device scenarios, one fault class at a time: every value the device controls is
//! set to something wrong, and the driver must answer with `Ok` or a clear `DriverError` —
//! no panic (in the caller or the `vscsi-completion` thread), no hang, no access to memory
//! outside the DMA window, and no success for data the device did not move.
//!
//! The last group reproduces the driver bugs this fake found (all fixed since); each keeps its
//! bug fixed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{CaseReport, Op, host_config, panics_in, record_panics, run_case, with_watchdog};
use fake_virtio_scsi::{
    CapKind, CapOverride, CommandFault, CommandFaults, ConfigFaults, FakeSpec, FaultPlan,
    PciFaults, TransportFaults,
};

const TIMEOUT: Duration = Duration::from_millis(150);

fn ops() -> Vec<Op> {
    vec![
        Op::Write {
            disk: 0,
            lba: 5,
            blocks: 40,
            seed: 1,
        },
        Op::Read {
            disk: 0,
            lba: 5,
            blocks: 40,
        },
        Op::Flush { disk: 0 },
        Op::Read {
            disk: 0,
            lba: 100,
            blocks: 2,
        },
    ]
}

/// Runs one scenario under the watchdog and applies the checks every scenario shares.
fn scenario(name: &str, spec: FakeSpec, io_plan: Option<FaultPlan>, ops: Vec<Op>) -> CaseReport {
    record_panics();
    let before = panics_in(common::DRIVER_THREADS).len();
    let label = name.to_string();
    let r = with_watchdog("hostile-case", Duration::from_secs(20), move || {
        run_case(spec, io_plan, ops, host_config(TIMEOUT))
    })
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    eprintln!(
        "{name}: start {:?}; ops {:?}; lies {} faults {} verified {}",
        r.start,
        r.results
            .iter()
            .map(|(n, res)| format!(
                "{n}: {}",
                res.as_ref().map_or_else(|e| e.as_str(), |_| "ok")
            ))
            .collect::<Vec<_>>(),
        r.stats.lies,
        r.stats.faults_applied,
        r.verified,
    );
    let after = panics_in(common::DRIVER_THREADS);
    assert_eq!(
        after.len(),
        before,
        "{name}: a driver thread panicked: {after:?}"
    );
    assert!(r.data_errors.is_empty(), "{name}: {:?}", r.data_errors);
    assert!(
        r.unclear.is_empty(),
        "{name}: unclear errors {:?}",
        r.unclear
    );
    assert!(
        r.stats.driver_faults.is_empty(),
        "{name}: the driver misused the device: {:?}",
        r.stats.driver_faults
    );
    r
}

fn with_plan(plan: FaultPlan) -> FakeSpec {
    FakeSpec {
        plan,
        ..FakeSpec::default()
    }
}

fn transport(t: TransportFaults) -> FakeSpec {
    with_plan(FaultPlan {
        transport: t,
        ..FaultPlan::default()
    })
}

fn config(c: ConfigFaults) -> FakeSpec {
    with_plan(FaultPlan {
        config: c,
        ..FaultPlan::default()
    })
}

fn pci(p: PciFaults) -> FakeSpec {
    with_plan(FaultPlan {
        pci: p,
        ..FaultPlan::default()
    })
}

fn every(f: CommandFault) -> FaultPlan {
    FaultPlan {
        commands: CommandFaults {
            from: Some((0, f)),
            ..CommandFaults::default()
        },
        seed: 7,
        ..FaultPlan::default()
    }
}

fn nth(n: u64, f: CommandFault) -> FaultPlan {
    FaultPlan {
        commands: CommandFaults {
            by_index: BTreeMap::from([(n, f)]),
            ..CommandFaults::default()
        },
        seed: 7,
        ..FaultPlan::default()
    }
}

fn opcode(op: u8, f: CommandFault) -> FaultPlan {
    FaultPlan {
        commands: CommandFaults {
            by_opcode: vec![(op, f)],
            ..CommandFaults::default()
        },
        seed: 11,
        ..FaultPlan::default()
    }
}

fn start_err(r: &CaseReport) -> &str {
    match &r.start {
        Err(e) => e,
        Ok(n) => panic!("expected start to fail, it found {n} disks"),
    }
}

#[test]
fn config_fields_out_of_range() {
    // Values a driver can live with: it must start and move data.
    for (name, c) in [
        (
            "num_queues 0",
            ConfigFaults {
                num_queues: Some(0),
                ..ConfigFaults::default()
            },
        ),
        (
            "seg_max 0, max_sectors 0",
            ConfigFaults {
                seg_max: Some(0),
                max_sectors: Some(0),
                ..ConfigFaults::default()
            },
        ),
        (
            "max_target/max_lun/channel huge",
            ConfigFaults {
                max_target: Some(u16::MAX),
                max_lun: Some(u32::MAX),
                max_channel: Some(u16::MAX),
                cmd_per_lun: Some(0),
                event_info_size: Some(u32::MAX),
                ..ConfigFaults::default()
            },
        ),
        (
            "cdb_size/sense_size 0 (driver writes its own)",
            ConfigFaults {
                cdb_size: Some(0),
                sense_size: Some(0),
                ..ConfigFaults::default()
            },
        ),
        (
            "cdb_size/sense_size huge (driver writes its own)",
            ConfigFaults {
                cdb_size: Some(u32::MAX),
                sense_size: Some(u32::MAX),
                ..ConfigFaults::default()
            },
        ),
        (
            "cdb_size 200, sense_size 250 (accepted as is)",
            ConfigFaults {
                cdb_size: Some(200),
                sense_size: Some(250),
                ..ConfigFaults::default()
            },
        ),
    ] {
        let r = scenario(name, config(c), None, ops());
        assert_eq!(r.start, Ok(1), "{name}");
        assert!(r.results.iter().all(|(_, x)| x.is_ok()), "{name}: {r:?}");
    }
    // Values it must refuse, clearly.
    for (name, c) in [
        (
            "cdb_size too large and fixed",
            ConfigFaults {
                cdb_size: Some(4096),
                ignore_writes: true,
                ..ConfigFaults::default()
            },
        ),
        (
            "sense_size 0 and fixed",
            ConfigFaults {
                sense_size: Some(0),
                ignore_writes: true,
                ..ConfigFaults::default()
            },
        ),
    ] {
        let r = scenario(name, config(c), None, ops());
        assert!(start_err(&r).contains("insists"), "{name}: {:?}", r.start);
    }
}

#[test]
fn transport_registers_and_negotiation() {
    for (name, t, want) in [
        (
            "two virtqueues",
            TransportFaults {
                num_queues: Some(2),
                ..TransportFaults::default()
            },
            "virtqueues",
        ),
        (
            "zero virtqueues",
            TransportFaults {
                num_queues: Some(0),
                ..TransportFaults::default()
            },
            "virtqueues",
        ),
        (
            "queue max size 0",
            TransportFaults {
                queue_max_size: Some(0),
                ..TransportFaults::default()
            },
            "queue",
        ),
        (
            "queue max size 64 (too small for request queues)",
            TransportFaults {
                queue_max_size: Some(64),
                ..TransportFaults::default()
            },
            "virtqueue 2",
        ),
        (
            "queue already enabled",
            TransportFaults {
                queue_enable_reads: Some(1),
                ..TransportFaults::default()
            },
            "control queue",
        ),
        (
            "notify offset outside the notify area",
            TransportFaults {
                queue_notify_off: Some(u16::MAX),
                ..TransportFaults::default()
            },
            "notify",
        ),
        (
            "no VERSION_1",
            TransportFaults {
                features: Some(0xffff_ffff),
                ..TransportFaults::default()
            },
            "VERSION_1",
        ),
        (
            "FEATURES_OK refused",
            TransportFaults {
                refuse_features: true,
                ..TransportFaults::default()
            },
            "refused",
        ),
        (
            "DEVICE_NEEDS_RESET at DRIVER_OK",
            TransportFaults {
                needs_reset_at_driver_ok: true,
                ..TransportFaults::default()
            },
            "needs reset",
        ),
    ] {
        let r = scenario(name, transport(t), None, ops());
        let e = start_err(&r);
        assert!(e.contains(want), "{name}: {e}");
    }

    // Every queue's notify offset 0: the driver kicks the control queue's doorbell for every
    // request queue, nothing completes, and everything times out (bounded).
    let r = scenario(
        "all notify offsets 0",
        transport(TransportFaults {
            queue_notify_off: Some(0),
            ..TransportFaults::default()
        }),
        None,
        ops(),
    );
    assert_eq!(r.start, Ok(0), "INQUIRYs time out, no disk");

    // All features offered (the driver must take VERSION_1 only).
    let r = scenario(
        "every feature offered",
        transport(TransportFaults {
            features: Some(u64::MAX),
            ..TransportFaults::default()
        }),
        None,
        ops(),
    );
    assert_eq!(r.start, Ok(1));
    assert!(r.results.iter().all(|(_, x)| x.is_ok()), "{r:?}");
}

#[test]
fn device_needs_reset_while_running() {
    let r = scenario(
        "DEVICE_NEEDS_RESET after 3 I/O commands",
        FakeSpec::default(),
        Some(FaultPlan {
            transport: TransportFaults {
                needs_reset_after: Some(3),
                ..TransportFaults::default()
            },
            ..FaultPlan::default()
        }),
        ops(),
    );
    assert_eq!(r.start, Ok(1));
    assert!(r.results.iter().any(|(_, x)| x.is_err()), "{r:?}");
}

/// A device that sets DEVICE_NEEDS_RESET (and raises a configuration-change interrupt) is
/// reset at once, not after its commands time out: with a 20 s command timeout the read
/// caught by it is answered within a few seconds, and once the device behaves I/O works.
#[test]
fn device_needs_reset_is_acted_on_at_once() {
    record_panics();
    with_watchdog("needs-reset-at-once", Duration::from_secs(60), || {
        let (fake, host) = common::start(
            FakeSpec::default(),
            host_config(Duration::from_secs(20)),
        );
        let host = host.expect("host starts");
        let disk = host.disk(0).expect("a disk");
        let mut buf = vec![0u8; disk.block_size as usize * 4];
        host.read(&disk, 0, &mut buf).expect("read before the fault");
        // From the next command on, the device stops and asks for a reset; it behaves again
        // once the test has seen the driver reset it.
        fake.set_plan(FaultPlan {
            transport: TransportFaults {
                needs_reset_after: Some(0),
                ..TransportFaults::default()
            },
            ..FaultPlan::default()
        });
        let t0 = std::time::Instant::now();
        let reader = {
            let (host, disk) = (host.clone(), disk.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; disk.block_size as usize * 4];
                host.read(&disk, 8, &mut buf)
            })
        };
        while host.stats().resets == 0 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(100));
        }
        let reset_after = t0.elapsed();
        fake.set_plan(FaultPlan::default());
        // Either answer is fine for the read caught by it (the driver retries after the
        // reset); a wait for the 20 s command timeout is not.
        let r = reader.join().expect("reader thread");
        eprintln!(
            "read across DEVICE_NEEDS_RESET: {r:?}; reset after {reset_after:?}, answered after {:?}",
            t0.elapsed()
        );
        assert!(
            reset_after < Duration::from_secs(5),
            "the driver took {reset_after:?} (its command timeout is 20 s) to reset"
        );
        assert!(host.stats().resets >= 1, "{}", host.stats());
        // The device behaves again: the reset brought it back, I/O works.
        fake.set_plan(FaultPlan::default());
        host.read(&disk, 8, &mut buf).expect("read after the reset");
        assert!(host.health().is_ok());
        host.shutdown();
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(panics_in(common::DRIVER_THREADS).is_empty());
}

/// A device that asks for a reset again right after every reset is given up on (the host
/// goes down with a reason), instead of being reset forever.
#[test]
fn device_that_always_needs_reset_is_given_up_on() {
    record_panics();
    with_watchdog("needs-reset-forever", Duration::from_secs(60), || {
        let (fake, host) = common::start(FakeSpec::default(), host_config(Duration::from_secs(20)));
        let host = host.expect("host starts");
        let disk = host.disk(0).expect("a disk");
        fake.set_plan(FaultPlan {
            transport: TransportFaults {
                needs_reset_after: Some(0),
                ..TransportFaults::default()
            },
            ..FaultPlan::default()
        });
        let mut buf = vec![0u8; disk.block_size as usize];
        let t0 = std::time::Instant::now();
        while host.health().is_ok() && t0.elapsed() < Duration::from_secs(30) {
            assert!(host.read(&disk, 0, &mut buf).is_err());
        }
        let down = host.health().expect_err("the host gave up on the device");
        assert!(down.to_string().contains("reset"), "{down}");
        host.shutdown();
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(panics_in(common::DRIVER_THREADS).is_empty());
}

#[test]
fn pci_capabilities_and_bars() {
    let cap = |kind, o: CapOverride| PciFaults {
        caps: BTreeMap::from([(kind, o)]),
        ..PciFaults::default()
    };
    for (name, p, want) in [
        (
            "BAR4 absent (reads 0)",
            PciFaults {
                bar4_sizing: Some(0),
                bar4_flags: Some(0),
                ..PciFaults::default()
            },
            "common config",
        ),
        (
            "BAR4 sizes to 0 bytes",
            PciFaults {
                bar4_sizing: Some(0b0100),
                ..PciFaults::default()
            },
            "BAR4",
        ),
        (
            "BAR4 of 2^40 bytes",
            PciFaults {
                bar4_sizing: Some(!((1u64 << 40) - 1) | 0b0100),
                ..PciFaults::default()
            },
            "does not fit",
        ),
        (
            "BAR4 of 2^63 bytes",
            PciFaults {
                bar4_sizing: Some((1u64 << 63) | 0b0100),
                ..PciFaults::default()
            },
            "does not fit",
        ),
        (
            "BAR4 with a reserved type",
            PciFaults {
                bar4_flags: Some(0b0110),
                ..PciFaults::default()
            },
            "BAR4",
        ),
        (
            "BAR4 is an I/O BAR",
            PciFaults {
                bar4_flags: Some(0b0001),
                ..PciFaults::default()
            },
            "common config",
        ),
        (
            "no common capability",
            PciFaults {
                missing: vec![CapKind::Common],
                ..PciFaults::default()
            },
            "common config",
        ),
        (
            "no ISR capability",
            PciFaults {
                missing: vec![CapKind::Isr],
                ..PciFaults::default()
            },
            "ISR",
        ),
        (
            "no notify capability",
            PciFaults {
                missing: vec![CapKind::Notify],
                ..PciFaults::default()
            },
            "notify",
        ),
        (
            "no device capability",
            PciFaults {
                missing: vec![CapKind::Device],
                ..PciFaults::default()
            },
            "config",
        ),
        (
            "common capability in BAR 7",
            cap(
                CapKind::Common,
                CapOverride {
                    bar: Some(7),
                    ..CapOverride::default()
                },
            ),
            "common config",
        ),
        (
            "common capability 16 bytes long",
            cap(
                CapKind::Common,
                CapOverride {
                    length: Some(16),
                    ..CapOverride::default()
                },
            ),
            "common config is 16 bytes",
        ),
        (
            "notify multiplier huge",
            PciFaults {
                notify_multiplier: Some(u32::MAX),
                ..PciFaults::default()
            },
            "notify",
        ),
    ] {
        let r = scenario(name, pci(p), None, ops());
        let e = start_err(&r);
        assert!(e.contains(want), "{name}: {e}");
    }
    // The device config says 4 bytes: the driver's config reads past it fail cleanly.
    let r = scenario(
        "device config 4 bytes long",
        pci(cap(
            CapKind::Device,
            CapOverride {
                length: Some(4),
                ..CapOverride::default()
            },
        )),
        None,
        ops(),
    );
    assert!(start_err(&r).contains("config"));
}

#[test]
fn pci_capabilities_outside_the_bar() {
    // Structures placed outside BAR4: the driver must refuse them rather than read and write
    // addresses no BAR decodes (on real hardware: another device's registers).
    for kind in [
        CapKind::Common,
        CapKind::Isr,
        CapKind::Device,
        CapKind::Notify,
    ] {
        let name = format!("{kind:?} capability outside BAR4");
        let p = PciFaults {
            caps: BTreeMap::from([(
                kind,
                CapOverride {
                    offset: Some(0x10_0000),
                    ..CapOverride::default()
                },
            )]),
            ..PciFaults::default()
        };
        let r = scenario(&name, pci(p), None, ops());
        eprintln!(
            "{name}: {} MMIO accesses outside every BAR: {:?}",
            r.stats.stray_mmio, r.stats.stray_log
        );
    }
}

/// Every command fault class, applied to every command once the host is up.
#[test]
fn command_faults_on_every_io_command() {
    let classes = [
        CommandFault::NeverComplete,
        CommandFault::Delay { ms: 20 },
        CommandFault::Delay { ms: 400 },
        CommandFault::CompleteTwice,
        CommandFault::UsedId(128),
        CommandFault::UsedId(u32::MAX),
        CommandFault::UsedId(0x1_0000),
        CommandFault::UsedIdHigh(1),
        CommandFault::UsedIdNeverIssued,
        CommandFault::UsedIdxJump(1),
        CommandFault::UsedIdxJump(u16::MAX),
        CommandFault::UsedLen(0),
        CommandFault::UsedLen(u32::MAX),
        CommandFault::ShortResponse(0),
        CommandFault::ShortResponse(11),
        CommandFault::SenseLen(u32::MAX),
        CommandFault::Resid(u32::MAX),
        CommandFault::Resid(1),
        CommandFault::Status(0x02),
        CommandFault::Status(0xff),
        CommandFault::Status(0x04),
        CommandFault::Response(1),
        CommandFault::Response(0xff),
        CommandFault::RandomPayload,
        CommandFault::RandomResponse,
        CommandFault::NoData,
        CommandFault::Busy,
        CommandFault::CheckCondition {
            key: 0x06,
            asc: 0x29,
            ascq: 0,
        },
        CommandFault::CheckCondition {
            key: 0x03,
            asc: 0x11,
            ascq: 0,
        },
        CommandFault::CheckCondition {
            key: 0xff,
            asc: 0xff,
            ascq: 0xff,
        },
        CommandFault::Die,
    ];
    for f in classes {
        let name = format!("every I/O command: {f:?}");
        let r = scenario(&name, FakeSpec::default(), Some(every(f.clone())), ops());
        assert_eq!(r.start, Ok(1), "{name}");
        let lie = f.can_lie() || r.stats.lies > 0;
        // Faults that make every command fail must make every operation fail.
        let must_fail = !lie
            && !matches!(
                f,
                CommandFault::Delay { .. }
                    | CommandFault::Status(0x04)
                    | CommandFault::SenseLen(_)
                    | CommandFault::UsedLen(_)
            );
        if must_fail {
            assert!(
                r.results.iter().all(|(_, x)| x.is_err()),
                "{name}: an operation succeeded: {:?}",
                r.results
            );
        }
    }
}

/// One fault on one command of a longer sequence: the rest must still work.
#[test]
fn one_bad_completion_in_a_sequence() {
    let many: Vec<Op> = (0..6)
        .flat_map(|i| {
            [
                Op::Write {
                    disk: 0,
                    lba: 200 * i,
                    blocks: 70,
                    seed: i,
                },
                Op::Read {
                    disk: 0,
                    lba: 200 * i,
                    blocks: 70,
                },
            ]
        })
        .collect();
    for f in [
        CommandFault::UsedLen(u32::MAX),
        CommandFault::ShortResponse(3),
        CommandFault::Resid(u32::MAX),
        CommandFault::Delay { ms: 400 },
        CommandFault::NeverComplete,
        CommandFault::UsedId(u32::MAX),
        CommandFault::Busy,
    ] {
        for n in [0u64, 3, 9] {
            let name = format!("command {n} of the I/O: {f:?}");
            let r = scenario(
                &name,
                FakeSpec::default(),
                Some(nth(n, f.clone())),
                many.clone(),
            );
            let failed = r.results.iter().filter(|(_, x)| x.is_err()).count();
            eprintln!("{name}: {failed} of {} operations failed", r.results.len());
        }
    }
}

/// Random bytes where the probe expects INQUIRY, VPD, REPORT LUNS, READ CAPACITY or MODE
/// SENSE data, at start-up.
#[test]
fn random_probe_payloads() {
    for op in [0x12u8, 0xa0, 0x25, 0x9e, 0x5a, 0x00] {
        for seed in 0..4u64 {
            let mut plan = opcode(op, CommandFault::RandomPayload);
            plan.seed = seed;
            let name = format!("random payload for opcode {op:#04x}, seed {seed}");
            let _ = scenario(&name, with_plan(plan), None, ops());
        }
    }
    for op in [0x12u8, 0xa0, 0x25, 0x9e, 0x5a, 0x00] {
        for f in [
            CommandFault::RandomResponse,
            CommandFault::Resid(u32::MAX),
            CommandFault::Resid(3),
            CommandFault::Response(3),
            CommandFault::Status(0x02),
            CommandFault::SenseLen(u32::MAX),
            CommandFault::ShortResponse(5),
            CommandFault::Busy,
        ] {
            let name = format!("probe opcode {op:#04x}: {f:?}");
            let _ = scenario(&name, with_plan(opcode(op, f)), None, ops());
        }
    }
}

#[test]
fn machine_dies_at_every_point_of_start_up() {
    let mut n = 0;
    while n < 1200 {
        let name = format!("machine dies after {n} accesses");
        let r = scenario(
            &name,
            with_plan(FaultPlan {
                die_after_accesses: Some(n),
                ..FaultPlan::default()
            }),
            None,
            ops(),
        );
        if !r.stats.dead {
            break; // start-up and the I/O needed fewer accesses
        }
        if r.start.is_ok() {
            // (Start-up may still report Ok with the disks found before the machine died; see
            // `start_fails_when_the_machine_dies_during_the_scan`.) The host must know.
            assert!(
                r.health_at_end.is_err(),
                "{name}: host healthy on a dead machine"
            );
            if let Some((_, last)) = r.results.last() {
                assert!(last.is_err(), "{name}: I/O on a dead machine succeeded");
            }
        }
        n += if n < 200 { 7 } else { 53 };
    }
}

#[test]
fn machine_dies_during_io() {
    for n in [0u64, 1, 2, 5, 10, 40] {
        let name = format!("machine dies {n} accesses into the I/O");
        let r = scenario(
            &name,
            FakeSpec::default(),
            Some(FaultPlan {
                die_after_accesses: Some(n),
                ..FaultPlan::default()
            }),
            ops(),
        );
        assert_eq!(r.start, Ok(1));
        if r.stats.dead {
            assert!(r.results.last().is_some_and(|(_, x)| x.is_err()), "{name}");
        }
    }
}

/// Events: hot-plug, unplug and resize reported honestly on the event queue are acted on; and
/// garbage on the event queue (random contents, bad lengths, ids out of range) is dropped
/// while I/O goes on.
#[test]
fn events_honest_and_garbage() {
    record_panics();
    let before = panics_in(common::DRIVER_THREADS).len();
    with_watchdog("events", Duration::from_secs(30), || {
        let (fake, host) = common::start(FakeSpec::default(), host_config(TIMEOUT));
        let host = host.expect("starts");
        let wait_for = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !f() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "timed out waiting for {what}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        assert!(fake.hotplug(fake_virtio_scsi::DiskSpec::new(3, 512, 256)));
        wait_for("hot-plugged disk", &|| {
            host.disks().iter().any(|d| d.target == 3)
        });
        assert!(fake.resize(3, 0, 512));
        wait_for("resize", &|| {
            host.disks()
                .iter()
                .any(|d| d.target == 3 && d.blocks == 512)
        });
        assert!(fake.unplug(3, 0));
        wait_for("unplug", &|| !host.disks().iter().any(|d| d.target == 3));

        // Garbage events.
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..200u32 {
            let mut b = [0u8; 64];
            for x in b.iter_mut() {
                *x = next() as u8;
            }
            // Keep some structure half the time so the decoder goes past the type.
            if i % 2 == 0 {
                let kinds = [0u32, 1, 2, 3, 0x8000_0000, 0x8000_0003, 7];
                b[0..4].copy_from_slice(&kinds[(next() % 7) as usize].to_le_bytes());
                b[4] = 1;
                b[5] = (next() % 4) as u8;
            }
            let len = match i % 5 {
                0 => Some(0),
                1 => Some(u32::MAX),
                2 => Some((next() % 64) as u32),
                _ => None,
            };
            fake.inject_event(&b, len);
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let d = host.disk(0).expect("disk 0 is still there");
        let data = common::pattern(9, 0, 4096);
        host.write(&d, 0, &data).expect("write after event garbage");
        let mut back = vec![0u8; 4096];
        host.read(&d, 0, &mut back)
            .expect("read after event garbage");
        assert_eq!(back, data);

        // Used elements on the event and control queues that name no chain.
        for (q, id) in [(1u16, 64u32), (1, u32::MAX), (0, 63), (0, 1 << 20)] {
            fake.inject_used(q, id, 16);
        }
        std::thread::sleep(Duration::from_millis(50));
        let _ = host.read(&d, 0, &mut back);
        host.shutdown();
        assert!(
            fake.stats().driver_faults.is_empty(),
            "{:?}",
            fake.stats().driver_faults
        );
    })
    .unwrap();
    assert_eq!(panics_in(common::DRIVER_THREADS).len(), before);
}

/// Task management the device ignores, or answers without ending the command: recovery must
/// still end with an error (after a device reset), not a hang.
#[test]
fn tmfs_ignored_or_ineffective() {
    for (name, tmf) in [
        (
            "TMFs never answered",
            fake_virtio_scsi::TmfFaults {
                ignore: true,
                ..Default::default()
            },
        ),
        (
            "TMFs answered, commands kept",
            fake_virtio_scsi::TmfFaults {
                keep_commands: true,
                ..Default::default()
            },
        ),
        (
            "TMFs rejected",
            fake_virtio_scsi::TmfFaults {
                response: Some(11),
                keep_commands: true,
                ..Default::default()
            },
        ),
    ] {
        let mut plan = nth(0, CommandFault::NeverComplete);
        plan.tmf = tmf;
        let r = scenario(name, FakeSpec::default(), Some(plan), ops());
        assert!(r.results[0].1.is_err(), "{name}");
        assert!(
            r.results[1..].iter().all(|(_, x)| x.is_ok()),
            "{name}: the device reset must bring the host back: {:?}",
            r.results
        );
    }
}

// ---- Driver bugs found with the fake (each fixed since; these keep them fixed) ----

/// Found (fixed): `read_config` uses `virtio_drivers`' `read_consistent`, which retries without bound
/// while `config_generation` changes: a device whose generation changes on every read keeps
/// `ScsiHost::start` in a busy loop forever.
#[test]
fn config_generation_churn_does_not_hang() {
    let r = with_watchdog("churn", Duration::from_secs(10), || {
        run_case(
            transport(TransportFaults {
                generation_churn: true,
                ..TransportFaults::default()
            }),
            None,
            ops(),
            host_config(TIMEOUT),
        )
    });
    let r = r.expect("ScsiHost::start returns");
    assert!(r.start.is_err(), "a device that never settles is refused");
}

/// Found (fixed): the capability walk (`virtio_drivers`' `CapabilityIterator`, used by
/// `PciTransport::probe`) follows `next` pointers without a bound or a visited set: a
/// capability list that loops keeps `ScsiHost::start` busy forever.
#[test]
fn cyclic_capability_list_does_not_hang() {
    let r = with_watchdog("cyclic-caps", Duration::from_secs(10), || {
        run_case(
            pci(PciFaults {
                cyclic_list: true,
                ..PciFaults::default()
            }),
            None,
            ops(),
            host_config(TIMEOUT),
        )
    });
    let r = r.expect("ScsiHost::start returns");
    assert!(r.start.is_ok() || r.start.is_err());
}

/// Found (fixed): capability regions are not checked against their BAR's size: a structure placed
/// beyond BAR4 is accepted and the driver reads and writes bus addresses no BAR decodes (on
/// real hardware, another device's registers). With the ISR outside, the interrupt is never
/// acknowledged and the completion thread spins (thousands of ISR reads per second).
#[test]
fn capabilities_outside_the_bar_are_refused() {
    for kind in [
        CapKind::Common,
        CapKind::Isr,
        CapKind::Device,
        CapKind::Notify,
    ] {
        let p = PciFaults {
            caps: BTreeMap::from([(
                kind,
                CapOverride {
                    offset: Some(0x10_0000),
                    ..CapOverride::default()
                },
            )]),
            ..PciFaults::default()
        };
        let r = scenario(&format!("{kind:?} outside BAR4"), pci(p), None, ops());
        assert!(
            r.start.is_err(),
            "{kind:?}: accepted a structure outside its BAR"
        );
        assert_eq!(r.stats.stray_mmio, 0, "{kind:?}: {:?}", r.stats.stray_log);
    }
}

/// Found (fixed): an interrupt line that stays asserted after the ISR read (a stuck INTx line, or an
/// ISR register that does not clear) makes the completion thread spin on `wait_irq` at full
/// speed instead of backing off.
#[test]
fn stuck_interrupt_line_does_not_spin() {
    record_panics();
    let waits = with_watchdog("stuck-line", Duration::from_secs(20), || {
        let (fake, host) = common::start(FakeSpec::default(), host_config(TIMEOUT));
        let host = host.expect("starts");
        fake.set_plan(FaultPlan {
            transport: TransportFaults {
                isr_stuck: true,
                ..TransportFaults::default()
            },
            ..FaultPlan::default()
        });
        let d = host.disk(0).expect("disk");
        host.flush(&d).expect("flush");
        // An idle second with the line stuck.
        let before = fake.stats().irq_waits;
        std::thread::sleep(Duration::from_secs(1));
        let waits = fake.stats().irq_waits - before;
        host.shutdown();
        waits
    })
    .unwrap();
    assert!(waits < 100, "{waits} wake-ups in one idle second");
}

/// Found (fixed): the used element's 32-bit id is truncated to 16 bits (`virtio_drivers`' `peek_used`
/// does `id as u16`), so an id of `0x1_0000 + head` is taken as `head`: the driver accepts a
/// completion for an id that names no chain. Combined with a chain the device did not
/// complete, the driver returns that chain's stale response and data as a success.
#[test]
fn used_id_above_the_queue_size_is_refused() {
    let r = scenario(
        "used id head + 0x10000",
        FakeSpec::default(),
        Some(every(CommandFault::UsedIdHigh(1))),
        ops(),
    );
    assert!(
        r.results.iter().all(|(_, x)| x.is_err()),
        "completions with invalid ids were accepted: {:?}",
        r.results
    );
}

/// Found (fixed): after a device reset (recovery, or a queue the device broke) the driver does not
/// write `cdb_size` / `sense_size` again nor check them: a device whose reset restores sizes
/// the driver had to overwrite at start-up now expects a different request and response
/// layout than the driver's slots have, and every later command is malformed.
#[test]
fn sizes_are_reapplied_after_a_device_reset() {
    let spec = config(ConfigFaults {
        cdb_size: Some(0),
        sense_size: Some(5000),
        sizes_survive_reset: true,
        ..ConfigFaults::default()
    });
    let mut ops = ops();
    // A used element naming no chain: the driver resets the device.
    ops.insert(
        1,
        Op::Used {
            queue: 2,
            id: 100,
            len: 0,
        },
    );
    ops.push(Op::Read {
        disk: 0,
        lba: 9,
        blocks: 3,
    });
    let r = scenario("sizes restored by a reset", spec, None, ops);
    assert!(
        r.results.last().is_some_and(|(_, x)| x.is_ok()),
        "{:?}",
        r.results
    );
}

/// Found (minor, fixed): when the machine dies during the scan, `ScsiHost::start` returns `Ok` with
/// the disks found so far (often none) instead of the platform error.
#[test]
fn start_fails_when_the_machine_dies_during_the_scan() {
    let mut n = 140;
    while n < 260 {
        let r = scenario(
            &format!("dies after {n} accesses"),
            with_plan(FaultPlan {
                die_after_accesses: Some(n),
                ..FaultPlan::default()
            }),
            None,
            vec![],
        );
        if r.stats.dead {
            assert!(
                r.start.is_err(),
                "dies after {n}: start returned {:?}",
                r.start
            );
        }
        n += 5;
    }
}

/// Found (fixed): one used element on the event queue that names no posted buffer stops event
/// delivery for good: `EventQueue::drain` logs it and `break`s, leaving it at the head of the
/// used ring, so every later drain stops there and no event (hot-plug, removal, capacity
/// change) is seen again until some unrelated device reset.
#[test]
fn events_still_arrive_after_a_bad_used_element() {
    record_panics();
    with_watchdog("event-wedge", Duration::from_secs(20), || {
        let (fake, host) = common::start(FakeSpec::default(), host_config(TIMEOUT));
        let host = host.expect("starts");
        assert!(fake.inject_used(1, 1000, 16));
        std::thread::sleep(Duration::from_millis(100));
        assert!(fake.hotplug(fake_virtio_scsi::DiskSpec::new(3, 512, 64)));
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while !host.disks().iter().any(|d| d.target == 3) {
            assert!(
                std::time::Instant::now() < deadline,
                "the hot-plugged disk never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        host.shutdown();
    })
    .unwrap();
}

/// Found (fixed): `shutdown` can race with the completion thread: between its `h.health()` check and
/// its `is_broken` check, `shutdown` marks the host down, and `mark_down` breaks every queue
/// (`fail_all`), so the completion thread calls `reset_device`, which sets the device up again
/// (DRIVER_OK, fresh rings, queues back in service) after or around `shutdown`'s own reset.
/// The device is then live after `shutdown`, with rings in memory the host is about to free.
/// Found by the proptest (seed 1); an interrupt storm during `shutdown` makes it likely.
#[test]
fn shutdown_leaves_the_device_reset() {
    record_panics();
    let live = with_watchdog("shutdown-race", Duration::from_secs(120), || {
        let mut live = Vec::new();
        for i in 0..40u64 {
            let (fake, host) = common::start(FakeSpec::default(), host_config(TIMEOUT));
            let host = host.expect("starts");
            // A slow health check (as over a slow transport) widens the window.
            fake.set_plan(FaultPlan {
                slow_health_ms: 3,
                ..FaultPlan::default()
            });
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let storm = {
                let (fake, stop) = (fake.clone(), stop.clone());
                std::thread::spawn(move || {
                    // Events that decode to nothing: each one is an interrupt and a wake-up.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        fake.inject_event(&[0u8; 16], None);
                        std::thread::yield_now();
                    }
                })
            };
            std::thread::sleep(Duration::from_micros(50 * (i % 10)));
            host.shutdown();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            storm.join().expect("storm");
            let status = fake.stats().status;
            if status != 0 {
                live.push((i, status));
            }
        }
        live
    })
    .unwrap();
    assert!(
        live.is_empty(),
        "device left running after shutdown: {live:?}"
    );
}

//! Property test: random fault plans and random I/O sequences against the real driver.
//!
//! Each case builds a fake machine with a generated start-up fault plan (device config,
//! negotiation, PCI layout, per-command faults during the probe, the machine dying), starts
//! `ScsiHost`, switches to a generated I/O fault plan, runs a generated sequence of writes,
//! reads, flushes, events and stray used elements, and shuts down. Properties:
//! - no panic, in the caller or in a driver thread (`vscsi-completion`, `vscsi-events`);
//! - no hang (each case runs under a watchdog);
//! - every call returns `Ok` or a `DriverError` with a message and an errno;
//! - every successful transfer matches the fake's medium while the fake told no lie;
//! - the driver never hands the device a bad ring or buffer (the fake's `driver_faults`);
//! - with an honest plan, every operation succeeds.
//!
//! `FAKE_VSCSI_CASES=N` changes the number of cases (default 40, sized for CI on 2 cores),
//! `FAKE_VSCSI_SEED=N|random` the generator's seed (fixed by default, printed on each run);
//! `FAKE_VSCSI_ALL_INPUTS=1` also generates the inputs of the driver bugs the fake found
//! (fixed since, and checked one by one in `hostile.rs`).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{DRIVER_THREADS, Op, host_config, panics_in, record_panics, run_case, with_watchdog};
use fake_virtio_scsi::{
    CapKind, CapOverride, CommandFault, CommandFaults, ConfigFaults, DiskSpec, FakeSpec, FaultPlan,
    PciFaults, TmfFaults, TransportFaults, UsedLen,
};
use proptest::prelude::*;
use proptest::test_runner::Config;

const TIMEOUT: Duration = Duration::from_millis(80);

fn cases() -> u32 {
    std::env::var("FAKE_VSCSI_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

/// The generator's seed: fixed by default (CI runs the same cases every time),
/// `FAKE_VSCSI_SEED=N` for another one, `FAKE_VSCSI_SEED=random` for a fresh one.
fn seed() -> u64 {
    match std::env::var("FAKE_VSCSI_SEED") {
        Ok(v) if v == "random" => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        Ok(v) => v.parse().unwrap_or(0x5eed),
        Err(_) => 0x5eed,
    }
}

/// Whether to generate the inputs of the driver bugs this fake found (all fixed since; the
/// last group in `hostile.rs` checks each deterministically). Off by default: those cases are
/// slow (recovery, back-off) and timing-sensitive on a loaded 2-core machine; turn them on
/// with `FAKE_VSCSI_ALL_INPUTS=1`.
fn known_bugs() -> bool {
    std::env::var("FAKE_VSCSI_ALL_INPUTS").is_ok_and(|v| v == "1")
}

/// A used id: mostly near the queue (valid, out of range), or large with low 16 bits that are
/// out of range too (ids whose low 16 bits name a chain hit the known truncation bug).
fn used_id() -> BoxedStrategy<u32> {
    if known_bugs() {
        any::<u32>().boxed()
    } else {
        prop_oneof![0u32..300, any::<u32>().prop_map(|v| v | 0xff00)].boxed()
    }
}

fn command_fault(allow_slow: bool) -> BoxedStrategy<CommandFault> {
    let mut v: Vec<BoxedStrategy<CommandFault>> = vec![
        Just(CommandFault::CompleteTwice).boxed(),
        used_id().prop_map(CommandFault::UsedId).boxed(),
        Just(CommandFault::UsedIdNeverIssued).boxed(),
        (1u16..4).prop_map(CommandFault::UsedIdxJump).boxed(),
        any::<u16>().prop_map(CommandFault::UsedIdxJump).boxed(),
        prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>(), 0u32..200]
            .prop_map(CommandFault::UsedLen)
            .boxed(),
        (0u8..12).prop_map(CommandFault::ShortResponse).boxed(),
        prop_oneof![any::<u32>(), 0u32..300]
            .prop_map(CommandFault::SenseLen)
            .boxed(),
        prop_oneof![any::<u32>(), 0u32..70000]
            .prop_map(CommandFault::Resid)
            .boxed(),
        any::<u8>().prop_map(CommandFault::Status).boxed(),
        any::<u8>().prop_map(CommandFault::Response).boxed(),
        Just(CommandFault::RandomPayload).boxed(),
        Just(CommandFault::RandomResponse).boxed(),
        Just(CommandFault::NoData).boxed(),
        Just(CommandFault::Busy).boxed(),
        (any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(key, asc, ascq)| CommandFault::CheckCondition { key, asc, ascq })
            .boxed(),
        Just(CommandFault::Die).boxed(),
    ];
    if allow_slow {
        v.push(Just(CommandFault::NeverComplete).boxed());
        v.push(
            (0u32..250)
                .prop_map(|ms| CommandFault::Delay { ms })
                .boxed(),
        );
    }
    if known_bugs() {
        v.push((1u16..4).prop_map(CommandFault::UsedIdHigh).boxed());
    }
    proptest::strategy::Union::new(v).boxed()
}

fn opcode() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(0x12u8), // INQUIRY
        Just(0xa0),   // REPORT LUNS
        Just(0x00),   // TEST UNIT READY
        Just(0x25),   // READ CAPACITY(10)
        Just(0x9e),   // READ CAPACITY(16)
        Just(0x5a),   // MODE SENSE(10)
        Just(0x28),   // READ(10)
        Just(0x2a),   // WRITE(10)
        Just(0x35),   // SYNCHRONIZE CACHE(10)
    ]
}

fn command_faults(max_index: u64) -> impl Strategy<Value = CommandFaults> {
    (
        prop::collection::btree_map(0..max_index, command_fault(true), 0..4),
        prop::collection::vec((opcode(), command_fault(false)), 0..2),
        prop::option::weighted(0.1, (0..max_index, command_fault(false))),
    )
        .prop_map(|(by_index, by_opcode, from)| CommandFaults {
            by_index,
            by_opcode,
            from,
        })
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    p: f64,
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    prop::option::weighted(p, s).boxed()
}

fn config_faults() -> impl Strategy<Value = ConfigFaults> {
    let u32s = || prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>(), 0u32..512];
    let u16s = || prop_oneof![Just(0u16), Just(u16::MAX), any::<u16>(), 0u16..16];
    (
        (opt(0.1, u32s()), opt(0.1, u32s()), opt(0.1, u32s())),
        (opt(0.05, u32s()), opt(0.05, u32s())),
        (opt(0.1, u32s()), opt(0.1, u32s())),
        (opt(0.05, u16s()), opt(0.1, u16s()), opt(0.1, u32s())),
        prop::bool::weighted(0.1),
        prop::bool::weighted(if known_bugs() { 0.5 } else { 0.0 }),
    )
        .prop_map(
            |(
                (num_queues, seg_max, max_sectors),
                (cmd_per_lun, event_info_size),
                (sense_size, cdb_size),
                (max_channel, max_target, max_lun),
                ignore_writes,
                sizes_survive_reset,
            )| ConfigFaults {
                num_queues,
                seg_max,
                max_sectors,
                cmd_per_lun,
                event_info_size,
                sense_size,
                cdb_size,
                max_channel,
                max_target,
                max_lun,
                ignore_writes,
                sizes_survive_reset,
            },
        )
}

fn transport_faults() -> impl Strategy<Value = TransportFaults> {
    let bugs = known_bugs();
    (
        opt(0.05, prop_oneof![0u16..8, Just(u16::MAX)]),
        opt(0.05, prop_oneof![Just(0u16), 1u16..300, Just(u16::MAX)]),
        opt(0.03, prop_oneof![0u16..8, Just(u16::MAX)]),
        opt(0.03, 0u16..3),
        opt(0.05, any::<u64>()),
        prop::bool::weighted(0.03),
        prop::bool::weighted(if bugs { 0.05 } else { 0.0 }),
        opt(0.05, 0u64..40),
        prop::bool::weighted(0.03),
        prop::bool::weighted(if bugs { 0.05 } else { 0.0 }),
    )
        .prop_map(
            |(
                num_queues,
                queue_max_size,
                queue_notify_off,
                queue_enable_reads,
                features,
                refuse_features,
                generation_churn,
                needs_reset_after,
                needs_reset_at_driver_ok,
                isr_stuck,
            )| TransportFaults {
                num_queues,
                queue_max_size,
                queue_notify_off,
                queue_enable_reads,
                features,
                refuse_features,
                generation_churn,
                needs_reset_after,
                needs_reset_at_driver_ok,
                isr_stuck,
            },
        )
}

fn cap_kind() -> impl Strategy<Value = CapKind> {
    prop_oneof![
        Just(CapKind::Common),
        Just(CapKind::Notify),
        Just(CapKind::Isr),
        Just(CapKind::Device)
    ]
}

fn pci_faults() -> impl Strategy<Value = PciFaults> {
    let bugs = known_bugs();
    // Offsets anywhere (outside the BAR went unchecked before a fix, see hostile.rs).
    let offset = if bugs {
        prop_oneof![(0u32..0x4000).prop_map(|o| o & !3), any::<u32>()].boxed()
    } else {
        (0u32..0x4000).prop_map(|o| o & !3).boxed()
    };
    (
        opt(0.03, any::<u64>()),
        opt(0.02, 0u32..16),
        prop::collection::btree_map(
            // A misplaced ISR never deasserts the line (the completion thread spun before the
            // stuck-line fix).
            cap_kind().prop_filter("ISR placement (all inputs only)", move |k| {
                bugs || *k != CapKind::Isr
            }),
            (opt(0.5, 0u8..8), opt(0.5, offset), opt(0.5, any::<u32>())).prop_map(
                |(bar, offset, length)| CapOverride {
                    bar,
                    offset,
                    length,
                },
            ),
            0..2,
        ),
        prop::collection::vec(cap_kind(), 0..2),
        prop::bool::weighted(if bugs { 0.05 } else { 0.0 }),
        opt(0.03, prop_oneof![Just(0u32), 1u32..16, Just(u32::MAX)]),
    )
        .prop_map(
            |(bar4_sizing, bar4_flags, caps, missing, cyclic_list, notify_multiplier)| PciFaults {
                bar4_sizing,
                bar4_flags,
                caps,
                missing,
                cyclic_list,
                notify_multiplier,
            },
        )
}

fn tmf_faults() -> impl Strategy<Value = TmfFaults> {
    (
        prop::bool::weighted(0.1),
        opt(0.1, any::<u8>()),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(ignore, response, keep_commands)| TmfFaults {
            ignore,
            response,
            keep_commands,
        })
}

/// The start-up plan: mostly honest, sometimes anything.
fn start_plan() -> impl Strategy<Value = FaultPlan> {
    prop_oneof![
        3 => any::<u64>().prop_map(|seed| FaultPlan { seed, ..FaultPlan::default() }),
        2 => (
            pci_faults(),
            transport_faults(),
            config_faults(),
            command_faults(60),
            tmf_faults(),
            opt(0.1, 0u64..600),
            any::<u64>(),
        )
            .prop_map(|(pci, transport, config, commands, tmf, die_after_accesses, seed)| {
                FaultPlan {
                    pci,
                    transport,
                    config,
                    commands,
                    tmf,
                    die_after_accesses,
                    seed,
                    slow_health_ms: 0,
                }
            }),
    ]
}

/// The plan once the host is up: command faults, TMF behaviour, late death.
fn io_plan() -> impl Strategy<Value = FaultPlan> {
    prop_oneof![
        1 => Just(FaultPlan::default()),
        3 => (
            command_faults(30),
            tmf_faults(),
            opt(0.05, 0u64..200),
            opt(0.05, 0u64..30),
            any::<u64>(),
        )
            .prop_map(|(commands, tmf, die_after_accesses, needs_reset_after, seed)| FaultPlan {
                commands,
                tmf,
                die_after_accesses,
                transport: TransportFaults {
                    needs_reset_after,
                    ..TransportFaults::default()
                },
                seed,
                ..FaultPlan::default()
            }),
    ]
}

fn event_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(3),
            Just(0x8000_0000),
            Just(0x8000_0001),
            any::<u32>()
        ],
        prop_oneof![Just(1u8), any::<u8>()],
        0u8..4,
        any::<[u8; 2]>(),
        prop_oneof![Just(1u32), Just(2), Just(0x092a), any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..48),
    )
        .prop_map(|(event, one, target, lun, reason, tail)| {
            let mut b = Vec::with_capacity(16 + tail.len());
            b.extend_from_slice(&event.to_le_bytes());
            b.extend_from_slice(&[one, target, lun[0], lun[1], 0, 0, 0, 0]);
            b.extend_from_slice(&reason.to_le_bytes());
            b.extend_from_slice(&tail);
            b
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, any::<u64>(), 0u64..80, any::<u64>())
            .prop_map(|(disk, lba, blocks, seed)| Op::Write { disk, lba, blocks, seed }),
        4 => (0usize..4, any::<u64>(), 0u64..80)
            .prop_map(|(disk, lba, blocks)| Op::Read { disk, lba, blocks }),
        1 => (0usize..4).prop_map(|disk| Op::Flush { disk }),
        1 => (event_bytes(), opt(0.3, prop_oneof![Just(0u32), any::<u32>(), 0u32..64]))
            .prop_map(|(bytes, used_len)| Op::Event { bytes, used_len }),
        1 => (0u16..4, used_id(), any::<u32>())
            .prop_map(|(queue, id, len)| Op::Used { queue, id, len }),
    ]
}

fn disks() -> impl Strategy<Value = Vec<DiskSpec>> {
    prop::collection::vec(
        (
            0u8..3,
            prop_oneof![3 => Just(0u16), 1 => 1u16..300],
            prop_oneof![Just(512u32), Just(4096)],
            16u64..2048,
            prop::bool::weighted(0.1),
            prop_oneof![Just(0u32), 1u32..64],
        )
            .prop_map(|(target, lun, block_size, blocks, readonly, mt)| DiskSpec {
                target,
                lun,
                block_size,
                blocks,
                readonly,
                max_transfer_blocks: mt,
            }),
        1..3,
    )
    .prop_map(|mut v| {
        v.sort_by_key(|d| (d.target, d.lun));
        v.dedup_by_key(|d| (d.target, d.lun));
        v
    })
}

#[derive(Debug, Clone)]
struct Case {
    disks: Vec<DiskSpec>,
    queues: u16,
    use_queues: usize,
    used_len: UsedLen,
    start: FaultPlan,
    io: FaultPlan,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        disks(),
        1u16..4,
        1usize..3,
        prop_oneof![Just(UsedLen::Qemu), Just(UsedLen::Spec)],
        start_plan(),
        io_plan(),
        prop::collection::vec(op(), 1..8),
    )
        .prop_map(
            |(disks, queues, use_queues, used_len, start, io, ops)| Case {
                disks,
                queues,
                use_queues,
                used_len,
                start,
                io,
                ops,
            },
        )
}

static CASES: AtomicU64 = AtomicU64::new(0);
static OPS: AtomicU64 = AtomicU64::new(0);
static VERIFIED: AtomicU64 = AtomicU64::new(0);
static FAULTS: AtomicU64 = AtomicU64::new(0);
static STARTED: AtomicU64 = AtomicU64::new(0);
static LIES: AtomicU64 = AtomicU64::new(0);

fn honest(p: &FaultPlan) -> bool {
    FaultPlan {
        seed: 0,
        ..p.clone()
    } == FaultPlan::default()
}

fn check_case(c: Case) -> Result<(), TestCaseError> {
    record_panics();
    let before = panics_in(DRIVER_THREADS).len();
    let all_honest = honest(&c.start)
        && honest(&c.io)
        && c.ops
            .iter()
            .all(|o| !matches!(o, Op::Event { .. } | Op::Used { .. }));
    let spec = FakeSpec {
        disks: c.disks.clone(),
        request_queues: c.queues,
        used_len: c.used_len,
        plan: c.start.clone(),
        ..FakeSpec::default()
    };
    let mut cfg = host_config(TIMEOUT);
    cfg.queues = Some(c.use_queues);
    let io = Some(c.io.clone());
    let ops = c.ops.clone();
    // Generous: a case with many timeouts and rescans is slow on a loaded machine; a hang is
    // still caught (`FAKE_VSCSI_GDB_ON_HANG=1` then dumps every thread's stack).
    let r = with_watchdog("proptest-case", Duration::from_secs(90), move || {
        run_case(spec, io, ops, cfg)
    })
    .map_err(|e| TestCaseError::fail(format!("case {e}")))?;

    CASES.fetch_add(1, Ordering::Relaxed);
    OPS.fetch_add(r.results.len() as u64, Ordering::Relaxed);
    VERIFIED.fetch_add(r.verified as u64, Ordering::Relaxed);
    FAULTS.fetch_add(r.stats.faults_applied, Ordering::Relaxed);
    LIES.fetch_add(r.stats.lies, Ordering::Relaxed);
    if r.start.is_ok() {
        STARTED.fetch_add(1, Ordering::Relaxed);
    }

    let after = panics_in(DRIVER_THREADS);
    prop_assert_eq!(after.len(), before, "driver thread panicked: {:?}", after);
    prop_assert!(r.data_errors.is_empty(), "wrong data: {:?}", r.data_errors);
    prop_assert!(r.unclear.is_empty(), "unclear errors: {:?}", r.unclear);
    prop_assert!(
        r.stats.driver_faults.is_empty(),
        "driver misused the device: {:?}",
        r.stats.driver_faults
    );
    if all_honest {
        prop_assert_eq!(&r.start, &Ok(c.disks.len()), "honest start");
        for (name, res) in &r.results {
            let readonly_write =
                name.starts_with("write") && res.as_ref().is_err_and(|e| e.contains("read-only"));
            prop_assert!(res.is_ok() || readonly_write, "honest {}: {:?}", name, res);
        }
    }
    // (Failed through the shutdown race of hostile.rs `shutdown_leaves_the_device_reset`.)
    if known_bugs() && r.start.is_ok() && !r.stats.dead {
        prop_assert_eq!(r.status_after_shutdown, 0, "shutdown resets the device");
    }
    Ok(())
}

#[test]
fn random_faults_and_io_never_panic_hang_or_corrupt() {
    let config = Config {
        cases: cases(),
        // A hang costs the watchdog's 40 s per shrink step, and timing-dependent failures do
        // not shrink well: shrink a little, and set `FAKE_VSCSI_SHRINK=0` to see the original.
        max_shrink_iters: std::env::var("FAKE_VSCSI_SHRINK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16),
        failure_persistence: None,
        ..Config::default()
    };
    let seed = seed();
    eprintln!("hostile-device proptest: seed {seed} (FAKE_VSCSI_SEED={seed} replays it)");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = proptest::test_runner::TestRng::from_seed(
        proptest::test_runner::RngAlgorithm::ChaCha,
        &seed_bytes,
    );
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(config, rng);
    let result = runner.run(&case(), check_case);
    eprintln!(
        "hostile-device proptest: {} cases run ({} started), {} operations, {} transfers \
         verified against the medium, {} command faults applied, {} lies",
        CASES.load(Ordering::Relaxed),
        STARTED.load(Ordering::Relaxed),
        OPS.load(Ordering::Relaxed),
        VERIFIED.load(Ordering::Relaxed),
        FAULTS.load(Ordering::Relaxed),
        LIES.load(Ordering::Relaxed),
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A fixed honest case: the generator's honest branch really is faithful.
#[test]
fn honest_case_from_the_generator_shape() {
    let c = Case {
        disks: vec![DiskSpec::new(0, 512, 1024), DiskSpec::new(2, 4096, 100)],
        queues: 3,
        use_queues: 2,
        used_len: UsedLen::Spec,
        start: FaultPlan::default(),
        io: FaultPlan::default(),
        ops: vec![
            Op::Write {
                disk: 1,
                lba: 7,
                blocks: 60,
                seed: 3,
            },
            Op::Read {
                disk: 1,
                lba: 7,
                blocks: 60,
            },
            Op::Flush { disk: 0 },
        ],
    };
    check_case(c).unwrap();
}

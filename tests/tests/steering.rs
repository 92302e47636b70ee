//! Multiqueue under load: four request queues, four targets, twelve submitting clients doing
//! mixed verified reads and writes, with the driver checking on live traffic that all in-flight
//! requests of a target share one queue (`--check-steering`).

use std::collections::HashMap;

use vscsi_ipc::OpenFlags;
use vscsi_tests::{DaemonBuilder, Rng, TestDisk};

const MIB: u64 = 1 << 20;
const TARGETS: usize = 4;
const THREADS: usize = 12;
const REGION: u64 = 512 * 1024;

fn stats_map(text: &str) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // "queue N submitted A completed B kicks C" and "name value" lines.
        if words.first() == Some(&"queue") && words.len() == 8 {
            for pair in words[2..].chunks(2) {
                if let Ok(v) = pair[1].parse() {
                    m.insert(format!("queue{}.{}", words[1], pair[0]), v);
                }
            }
        } else if words.len() == 2 {
            if let Ok(v) = words[1].parse() {
                m.insert(words[0].to_string(), v);
            }
        } else if words.first() == Some(&"target")
            && words.len() == 4
            && let Ok(v) = words[3].parse()
        {
            m.insert(format!("target{}.changes", words[1]), v);
        }
    }
    m
}

fn run(policy: &str) {
    run_with(policy, &[]);
}

fn run_with(policy: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let disks: Vec<TestDisk> = (0..TARGETS)
        .map(|i| {
            let d = TestDisk::create(dir.path(), &format!("t{i}.img"), 8 * MIB, 50 + i as u64);
            if i % 2 == 1 { d.block_size(4096) } else { d }
        })
        .collect();
    let mut b = DaemonBuilder::new(dir.path())
        .arg("--queues")
        .arg("4")
        .arg("--steering")
        .arg(policy)
        .arg("--check-steering");
    for a in extra {
        b = b.arg(a);
    }
    for d in &disks {
        b = b.disk(d);
    }
    let daemon = b.start();

    // Each thread owns one region on every disk, with unaligned pieces, and keeps a model.
    let models: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = daemon.client();
                let disks = &disks;
                s.spawn(move || {
                    let hs: Vec<_> = (0..TARGETS)
                        .map(|i| {
                            client
                                .open(&format!("disk.virtio-scsi:/{i}"), OpenFlags::READ_WRITE)
                                .expect("open")
                        })
                        .collect();
                    let base = t as u64 * REGION;
                    let mut model: Vec<Vec<u8>> = disks
                        .iter()
                        .map(|d| d.read_image(base, REGION as usize))
                        .collect();
                    let mut rng = Rng::new(1000 + t as u64);
                    for _ in 0..120 {
                        let i = rng.below(TARGETS as u64) as usize;
                        let off = rng.below(REGION - 1);
                        let len = 1 + rng.below((REGION - off).min(64 * 1024));
                        let (o, l) = (off as usize, len as usize);
                        if rng.below(2) == 0 {
                            let data = rng.bytes(l);
                            client
                                .write_all_at(&hs[i], base + off, &data)
                                .expect("write");
                            model[i][o..o + l].copy_from_slice(&data);
                        } else {
                            let mut got = vec![0u8; l];
                            client
                                .read_exact_at(&hs[i], base + off, &mut got)
                                .expect("read");
                            assert!(
                                got == model[i][o..o + l],
                                "thread {t} disk {i}: read at {off}+{len} differs"
                            );
                        }
                    }
                    model
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect()
    });

    for (t, model) in models.iter().enumerate() {
        for (i, d) in disks.iter().enumerate() {
            assert!(
                d.read_image(t as u64 * REGION, REGION as usize) == model[i],
                "policy {policy}: thread {t} disk {i}: image differs from the model"
            );
        }
    }

    let text = daemon.client().stats().expect("stats");
    let m = stats_map(&text);
    eprintln!("policy {policy}:\n{text}");
    assert!(text.starts_with(&format!("steering {policy}")), "{text}");
    assert_eq!(
        m.get("invariant_violations"),
        Some(&0),
        "live invariant: {text}"
    );
    let mut total = 0;
    for q in 0..4 {
        let sub = m.get(&format!("queue{q}.submitted")).copied().unwrap_or(0);
        let done = m.get(&format!("queue{q}.completed")).copied().unwrap_or(0);
        assert_eq!(
            sub, done,
            "queue {q}: every submitted command completed once"
        );
        total += sub;
    }
    assert!(
        total >= (THREADS * 120) as u64,
        "commands went through the queues: {text}"
    );
    let changes: u64 = m
        .iter()
        .filter(|(k, _)| k.ends_with(".changes"))
        .map(|(_, v)| v)
        .sum();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if policy == "per-target" && cpus >= 2 {
        // Workers on different CPUs pick different queues for an idle target.
        assert!(changes > 0, "targets never moved between queues: {text}");
    }
    if policy == "single" {
        assert_eq!(
            m.get("queue0.submitted"),
            Some(&total),
            "single uses queue 0 only"
        );
    }
}

#[test]
fn per_target_steering_keeps_each_target_on_one_queue_under_load() {
    run("per-target");
}

#[test]
fn single_queue_baseline_under_load() {
    run("single");
}

/// The same load with busy polling (`--poll-us`): completions found by the polling completion
/// thread with the request queues' interrupts suppressed, every byte still checked.
#[test]
fn per_target_steering_with_busy_polling() {
    run_with("per-target", &["--poll-us", "200"]);
}

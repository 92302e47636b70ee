//! Robustness tests: every parser on every prefix of a good fixture, on
//! oversized and nonsense buffers, and a deterministic fuzz loop (random and
//! mutated inputs) checking that nothing panics and basic invariants hold;
//! plus randomized round-trip checks of the READ/WRITE CDB encoders.

use scsi_commands::inquiry::{
    parse_vpd_block_device_characteristics, parse_vpd_block_limits,
    parse_vpd_device_identification, parse_vpd_logical_block_provisioning,
    parse_vpd_supported_pages, parse_vpd_unit_serial,
};
use scsi_commands::{
    Capacity, Cdb, CdbError, DataDirection, Lun, ModeSense, ReadCapacity10, ReadCapacity16,
    ReportLuns, ScsiError, Sense, StandardInquiry, UnmapRange, parse_virtio_lun,
    unmap_parameter_list, virtio_lun,
};

/// xorshift64*: small deterministic PRNG so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Runs every parser on `buf` and checks invariants of what they return.
fn run_all(buf: &[u8]) {
    if let Ok(s) = Sense::parse(buf) {
        let _ = s.describe();
        let _ = s.to_string();
        let _ = s.field_pointer();
        let _ = s.progress();
    }
    for status in [0x00u8, 0x02, 0x04, 0x08, 0x18, 0x28, 0x30, 0x40, 0x22, 0xFF] {
        if let Err(e) = ScsiError::from_status(status, buf) {
            let _ = e.to_string();
            let _ = (e.is_retryable(), e.errno_class(), e.is_unit_attention());
            let _ = (
                e.is_write_protected(),
                e.is_lba_out_of_range(),
                e.is_medium_error(),
            );
            let _ = (e.is_not_ready(), e.is_lun_not_supported(), e.is_deferred());
        }
    }
    if let Ok(i) = StandardInquiry::parse(buf) {
        assert!(i.vendor.len() <= 8 && i.product.len() <= 16 && i.revision.len() <= 4);
        assert!(i.vendor.is_ascii() && i.product.is_ascii() && i.revision.is_ascii());
        let _ = (i.lu_present(), i.is_disk());
    }
    if let Ok(p) = parse_vpd_supported_pages(buf) {
        assert!(p.len() <= buf.len().saturating_sub(4));
    }
    if let Ok(s) = parse_vpd_unit_serial(buf) {
        assert!(s.is_ascii());
    }
    if let Ok(id) = parse_vpd_device_identification(buf) {
        let total: usize = id.designators.iter().map(|d| d.identifier.len() + 4).sum();
        assert!(total <= buf.len().saturating_sub(4));
        let _ = id.wwn();
        for d in &id.designators {
            let _ = d.identifier_text();
        }
    }
    let _ = parse_vpd_block_limits(buf);
    let _ = parse_vpd_block_device_characteristics(buf);
    let _ = parse_vpd_logical_block_provisioning(buf);
    if let Ok(r) = ReportLuns::parse(buf) {
        assert!(r.luns.len() * 8 <= buf.len() - 8);
        assert!((r.luns.len() as u64) * 8 <= u64::from(r.list_length));
        for l in &r.luns {
            let _ = (l.address(), l.number(), l.to_virtio_lun(0));
        }
        let _ = r.required_allocation_length();
    }
    if let Ok(c) = ReadCapacity10::parse(buf).and_then(|r| r.capacity()) {
        check_capacity(&c);
    }
    if let Ok(c) = ReadCapacity16::parse(buf).and_then(|r| r.capacity()) {
        check_capacity(&c);
        let _ = c.physical_block_size();
    }
    for m in [ModeSense::parse10(buf), ModeSense::parse6(buf)]
        .into_iter()
        .flatten()
    {
        let _ = (m.header.write_protected(), m.caching());
        for p in &m.pages {
            assert!(p.data.len() <= buf.len());
        }
    }
    if let Ok(field) = <[u8; 8]>::try_from(buf) {
        if let Some((t, lun)) = parse_virtio_lun(&field) {
            assert_eq!(
                virtio_lun(t, lun).map(|f| parse_virtio_lun(&f)),
                Ok(Some((t, lun)))
            );
        }
        let _ = Lun::from_raw(field).to_virtio_lun(1);
    }
}

fn check_capacity(c: &Capacity) {
    assert!(c.blocks >= 1);
    assert!(c.block_size.is_power_of_two());
    assert!((512..=65536).contains(&c.block_size));
    assert_eq!(
        c.blocks.checked_mul(u64::from(c.block_size)),
        Some(c.bytes())
    );
    assert_eq!(c.last_lba() + 1, c.blocks);
}

fn fixtures() -> Vec<Vec<u8>> {
    let mut inquiry = vec![0u8; 36];
    inquiry[2] = 5;
    inquiry[3] = 2;
    inquiry[4] = 31;
    inquiry[7] = 2;
    inquiry[8..16].copy_from_slice(b"QEMU    ");
    inquiry[16..32].copy_from_slice(b"QEMU HARDDISK   ");
    inquiry[32..36].copy_from_slice(b"2.5+");

    let mut fixed_sense = vec![0u8; 18];
    fixed_sense[0] = 0xF0;
    fixed_sense[2] = 0x03;
    fixed_sense[3..7].copy_from_slice(&[0, 0, 0x10, 0]);
    fixed_sense[7] = 10;
    fixed_sense[12] = 0x11;
    fixed_sense[15] = 0x80;

    let desc_sense = vec![
        0x72, 0x05, 0x24, 0x00, 0, 0, 0, 28, //
        0x00, 0x0A, 0x80, 0x00, 0, 0, 0, 1, 0, 0, 0, 2, //
        0x02, 0x06, 0x00, 0x00, 0xC0, 0x00, 0x02, 0x00, //
        0x05, 0x02, 0x00, 0x20,
    ];

    let mut devid = vec![0x00, 0x83, 0x00, 0x1A];
    devid.extend_from_slice(&[0x02, 0x00, 0x00, 0x06]);
    devid.extend_from_slice(b"drive0");
    devid.extend_from_slice(&[0x01, 0x03, 0x00, 0x08, 0x50, 0, 0xc5, 0, 1, 2, 3, 4]);

    let mut block_limits = vec![0u8; 64];
    block_limits[1] = 0xB0;
    block_limits[3] = 0x3C;
    block_limits[8..12].copy_from_slice(&0x4000u32.to_be_bytes());
    block_limits[20..24].copy_from_slice(&0xFFFF_FFFFu32.to_be_bytes());
    block_limits[32] = 0x80;

    let mut bdc = vec![0u8; 64];
    bdc[1] = 0xB1;
    bdc[3] = 0x3C;
    bdc[5] = 1;
    bdc[7] = 3;

    let lbp = vec![0x00, 0xB2, 0x00, 0x04, 0x00, 0xC4, 0x02, 0x00];

    let mut luns = vec![0, 0, 0, 24, 0, 0, 0, 0];
    luns.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    luns.extend_from_slice(&[0, 5, 0, 0, 0, 0, 0, 0]);
    luns.extend_from_slice(&[0x41, 0x00, 0, 0, 0, 0, 0, 0]);

    let rc10 = vec![0x00, 0x01, 0xFF, 0xFF, 0x00, 0x00, 0x02, 0x00];
    let mut rc16 = vec![0u8; 32];
    rc16[0..8].copy_from_slice(&0x1_2345_6789u64.to_be_bytes());
    rc16[8..12].copy_from_slice(&4096u32.to_be_bytes());
    rc16[13] = 3;
    rc16[14] = 0xC0;

    let mut mode10 = vec![0x00, 0x1A, 0x00, 0x90, 0x00, 0x00, 0x00, 0x08];
    mode10.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0]);
    mode10.extend_from_slice(&[0x88, 0x12, 0x04]);
    mode10.extend_from_slice(&[0; 17]);

    vec![
        inquiry,
        fixed_sense,
        desc_sense,
        vec![0x00, 0x00, 0x00, 0x03, 0x00, 0x80, 0x83],
        vec![0x00, 0x80, 0x00, 0x04, b'S', b'N', b'0', b'1'],
        devid,
        block_limits,
        bdc,
        lbp,
        luns,
        rc10,
        rc16,
        mode10,
        vec![1, 3, 0x40, 5, 0, 0, 0, 0],
    ]
}

#[test]
fn every_prefix_of_every_fixture() {
    for f in fixtures() {
        for len in 0..=f.len() {
            run_all(&f[..len]);
        }
    }
}

#[test]
fn oversized_and_constant_buffers() {
    for fill in [0x00u8, 0x01, 0x70, 0x72, 0x7F, 0x80, 0xB0, 0xFF] {
        for len in [0usize, 1, 7, 8, 9, 255, 256, 4096, 65_536 + 17] {
            run_all(&vec![fill; len]);
        }
    }
    // Fixtures with lots of trailing garbage.
    let mut rng = Rng(0xDEAD_BEEF);
    for mut f in fixtures() {
        let extra = rng.bytes(1000);
        f.extend_from_slice(&extra);
        run_all(&f);
    }
}

#[test]
fn fuzz_random_bytes() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for _ in 0..20_000 {
        let len = rng.below(300) as usize;
        let mut buf = rng.bytes(len);
        // Steer some inputs at the interesting header values.
        if !buf.is_empty() && rng.below(2) == 0 {
            let pick = rng.below(6) as usize;
            buf[0] = [0x70, 0x71, 0x72, 0x73, 0xF0, 0x00][pick];
        }
        if buf.len() > 1 && rng.below(2) == 0 {
            let pick = rng.below(6) as usize;
            buf[1] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2][pick];
        }
        run_all(&buf);
    }
}

#[test]
fn fuzz_mutated_fixtures() {
    let mut rng = Rng(0x0BAD_CAFE_F00D_D00D);
    let fixtures = fixtures();
    for _ in 0..20_000 {
        let pick = rng.below(fixtures.len() as u64) as usize;
        let mut f = fixtures[pick].clone();
        for _ in 0..=rng.below(4) {
            if f.is_empty() {
                break;
            }
            let at = rng.below(f.len() as u64) as usize;
            let v = rng.next() as u8;
            f[at] = v;
        }
        match rng.below(3) {
            0 => {
                let keep = rng.below(f.len() as u64 + 1) as usize;
                f.truncate(keep);
            }
            1 => {
                let n = rng.below(64) as usize;
                let extra = rng.bytes(n);
                f.extend_from_slice(&extra);
            }
            _ => {}
        }
        run_all(&f);
    }
}

/// Decodes a READ/WRITE(10/16) CDB back into (lba, blocks, fua).
fn decode_rw(c: &Cdb) -> (u64, u64, bool) {
    let b = c.as_slice();
    let fua = b[1] & 0x08 != 0;
    match b.len() {
        10 => (
            u64::from(u32::from_be_bytes(b[2..6].try_into().unwrap())),
            u64::from(u16::from_be_bytes(b[7..9].try_into().unwrap())),
            fua,
        ),
        16 => (
            u64::from_be_bytes(b[2..10].try_into().unwrap()),
            u64::from(u32::from_be_bytes(b[10..14].try_into().unwrap())),
            fua,
        ),
        n => panic!("unexpected CDB length {n}"),
    }
}

#[test]
fn read_write_selection_round_trips() {
    let mut rng = Rng(42);
    let edges = [
        0u64,
        1,
        0xFFFF,
        0x1_0000,
        u64::from(u32::MAX) - 1,
        u64::from(u32::MAX),
        1 << 32,
        u64::MAX - 1,
        u64::MAX,
    ];
    for i in 0..50_000u32 {
        let lba = if i % 3 == 0 {
            let pick = rng.below(edges.len() as u64) as usize;
            edges[pick].wrapping_add(rng.below(3))
        } else {
            let shift = rng.below(64);
            rng.next() >> shift
        };
        let blocks = if i % 2 == 0 {
            let pick = rng.below(edges.len() as u64) as usize;
            edges[pick]
        } else {
            let shift = rng.below(64);
            rng.next() >> shift
        };
        let fua = rng.below(2) == 0;
        let write = rng.below(2) == 0;
        let r = if write {
            Cdb::write(lba, blocks, fua)
        } else {
            Cdb::read(lba, blocks, fua)
        };
        match r {
            Ok(c) => {
                assert_eq!(decode_rw(&c), (lba, blocks, fua));
                let last = lba + (blocks - 1);
                let small = last <= u64::from(u32::MAX) && blocks <= 0xFFFF;
                assert_eq!(c.len(), if small { 10 } else { 16 });
                let expect_dir = if write {
                    DataDirection::ToDevice
                } else {
                    DataDirection::FromDevice
                };
                assert_eq!(c.direction(), expect_dir);
            }
            Err(CdbError::ZeroBlocks) => assert_eq!(blocks, 0),
            Err(CdbError::TooManyBlocks(n)) => {
                assert_eq!(n, blocks);
                assert!(blocks > u64::from(u32::MAX));
            }
            Err(CdbError::LbaRangeOverflow { .. }) => {
                assert!(lba.checked_add(blocks - 1).is_none());
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

#[test]
fn unmap_list_random_round_trip() {
    let mut rng = Rng(7);
    for _ in 0..2_000 {
        let n = 1 + rng.below(32) as usize;
        let ranges: Vec<UnmapRange> = (0..n)
            .map(|_| UnmapRange {
                lba: rng.next() >> 8,
                blocks: 1 + (rng.next() as u32 >> 1),
            })
            .collect();
        let list = unmap_parameter_list(&ranges).unwrap();
        assert_eq!(list.len(), 8 + 16 * n);
        assert_eq!(
            usize::from(u16::from_be_bytes([list[0], list[1]])),
            list.len() - 2
        );
        assert_eq!(usize::from(u16::from_be_bytes([list[2], list[3]])), 16 * n);
        for (i, r) in ranges.iter().enumerate() {
            let d = &list[8 + 16 * i..8 + 16 * (i + 1)];
            assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), r.lba);
            assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), r.blocks);
            assert_eq!(&d[12..16], &[0; 4]);
        }
    }
}

//! Partition tables read from a backup's disk: GPT (primary header, else the backup
//! header at the last LBA) and MBR (four primary entries, logical partitions in an
//! extended partition's EBR chain).
//!
//! Parsed here rather than with the `gpt` or `mbrman` crates: the disk is untrusted
//! input, and `gpt` 4.1 asserts `part_size == 128` (a crafted header with a valid CRC
//! panics it) and loops over `num_parts` without a cap, while `mbrman` 0.6 adds EBR
//! offsets with unchecked `u32` arithmetic (an overflow panic in checked builds). This
//! parser checks every length and offset, caps what it reads, and never panics.
//!
//! ```text
//! GPT header (LBA 1, sector 512 or 4096), little-endian:
//!   0 "EFI PART"  8 revision  12 header size (92..=sector)  16 CRC32 of the header
//!   (with this field zero)  24 my LBA  32 alternate LBA  40 first usable  48 last usable
//!   56 disk GUID  72 entries LBA  80 entry count (<= 4096)  84 entry size (128..=4096,
//!   multiple of 8)  88 CRC32 of the entry array
//! GPT entry: 0 type GUID (all zero: unused)  16 unique GUID  32 first LBA  40 last LBA
//!   (inclusive)  48 attributes  56 name (UTF-16LE, 36 units)
//! MBR (sector 0): 446 four entries of 16 bytes [0 boot, 4 type, 8 first LBA (u32),
//!   12 sectors (u32)], 510 0x55 0xAA. Type 0xEE: protective (GPT follows);
//!   0x05/0x0F/0x85: extended — EBRs chained from its start, at most [`MAX_LOGICAL`].
//! ```

use serde::Serialize;

use crate::disk_reader::DiskView;
use crate::error::{Error, Result};

/// Positioned reads of a byte range: a [`DiskView`], or a byte slice in tests.
pub trait ReadAt {
    fn size(&self) -> u64;
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

impl ReadAt for DiskView {
    fn size(&self) -> u64 {
        self.len()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        DiskView::read_exact_at(self, offset, buf)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| Error::invalid(format!("read past the end at {offset}")))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Most GPT entries read (the spec's minimum array holds 128).
const MAX_GPT_ENTRIES: u32 = 4096;
/// Most logical partitions followed in an EBR chain.
pub const MAX_LOGICAL: usize = 128;

/// The partition scheme of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Gpt,
    Mbr,
    /// No partition table (a file system on the whole disk, or nothing known).
    None,
}

/// One partition as its table describes it.
#[derive(Debug, Clone, Serialize)]
pub struct TableEntry {
    /// 1-based: GPT entry index + 1; MBR 1–4 primary, 5… logical.
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// GPT type GUID or MBR type byte (`0x83`).
    pub type_id: String,
    /// GPT partition name (empty for MBR).
    pub name: String,
}

/// Read the partition table of `disk` (`None` scheme when there is none).
pub fn read_table(disk: &(impl ReadAt + ?Sized)) -> Result<(Scheme, Vec<TableEntry>)> {
    for ss in [512u64, 4096] {
        if let Some(parts) = read_gpt(disk, ss)? {
            return Ok((Scheme::Gpt, parts));
        }
    }
    match read_mbr(disk)? {
        Some(parts) => Ok((Scheme::Mbr, parts)),
        None => Ok((Scheme::None, Vec::new())),
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn read_sector(disk: &(impl ReadAt + ?Sized), lba: u64, ss: u64) -> Result<Option<Vec<u8>>> {
    let Some(off) = lba.checked_mul(ss) else {
        return Ok(None);
    };
    if off.checked_add(ss).is_none_or(|e| e > disk.size()) {
        return Ok(None);
    }
    let mut b = vec![0u8; ss as usize];
    disk.read_exact_at(off, &mut b)?;
    Ok(Some(b))
}

fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        hex::encode_upper(&b[10..16])
    )
}

/// A valid GPT header at `lba`, parsed: (entries LBA, count, entry size, entries CRC).
fn gpt_header(
    disk: &(impl ReadAt + ?Sized),
    lba: u64,
    ss: u64,
) -> Result<Option<(u64, u32, u32, u32)>> {
    let Some(h) = read_sector(disk, lba, ss)? else {
        return Ok(None);
    };
    if &h[..8] != b"EFI PART" {
        return Ok(None);
    }
    let hsize = le32(&h, 12) as usize;
    if hsize < 92 || hsize > ss as usize {
        return Ok(None);
    }
    let mut copy = h[..hsize].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(&h, 16) {
        return Ok(None);
    }
    let (count, esize) = (le32(&h, 80), le32(&h, 84));
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&esize) || esize % 8 != 0 {
        return Ok(None);
    }
    Ok(Some((le64(&h, 72), count, esize, le32(&h, 88))))
}

fn crc32(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(b);
    h.finalize()
}

fn read_gpt(disk: &(impl ReadAt + ?Sized), ss: u64) -> Result<Option<Vec<TableEntry>>> {
    let last = (disk.size() / ss).saturating_sub(1);
    for lba in [1, last] {
        let Some((elba, count, esize, ecrc)) = gpt_header(disk, lba, ss)? else {
            continue;
        };
        let len = count as u64 * esize as u64;
        let Some(off) = elba.checked_mul(ss) else {
            continue;
        };
        if off.checked_add(len).is_none_or(|e| e > disk.size()) {
            continue;
        }
        let mut arr = vec![0u8; len as usize];
        disk.read_exact_at(off, &mut arr)?;
        if crc32(&arr) != ecrc {
            continue;
        }
        let mut parts = Vec::new();
        for (i, e) in arr.chunks_exact(esize as usize).enumerate() {
            if e[..16].iter().all(|&b| b == 0) {
                continue;
            }
            let (first, lastlba) = (le64(e, 32), le64(e, 40));
            let units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            parts.push(TableEntry {
                number: i as u32 + 1,
                start: first.saturating_mul(ss),
                size: lastlba
                    .saturating_sub(first)
                    .saturating_add(1)
                    .saturating_mul(ss),
                type_id: guid(&e[..16]),
                name: String::from_utf16_lossy(&units),
            });
        }
        return Ok(Some(parts));
    }
    Ok(None)
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

/// The four 16-byte entries of an MBR/EBR sector: (type, first LBA, sectors).
fn mbr_entries(s: &[u8]) -> [(u8, u32, u32); 4] {
    let mut out = [(0u8, 0u32, 0u32); 4];
    for (i, o) in out.iter_mut().enumerate() {
        let e = &s[446 + 16 * i..446 + 16 * (i + 1)];
        *o = (e[4], le32(e, 8), le32(e, 12));
    }
    out
}

fn read_mbr(disk: &(impl ReadAt + ?Sized)) -> Result<Option<Vec<TableEntry>>> {
    let Some(s) = read_sector(disk, 0, 512)? else {
        return Ok(None);
    };
    if s[510] != 0x55 || s[511] != 0xAA {
        return Ok(None);
    }
    let entries = mbr_entries(&s);
    // A boot sector whose "entries" are garbage (a FAT volume, a boot loader without a
    // table): every used entry must have a non-zero start and length.
    if entries
        .iter()
        .any(|&(t, start, n)| t != 0 && (start == 0 || n == 0))
        || entries.iter().all(|&(t, _, _)| t == 0)
    {
        return Ok(None);
    }
    let mut parts = Vec::new();
    let mut extended = None;
    for (i, &(t, start, n)) in entries.iter().enumerate() {
        if t == 0 {
            continue;
        }
        if is_extended(t) {
            extended.get_or_insert(start as u64);
            continue;
        }
        parts.push(TableEntry {
            number: i as u32 + 1,
            start: start as u64 * 512,
            size: n as u64 * 512,
            type_id: format!("0x{t:02x}"),
            name: String::new(),
        });
    }
    if let Some(ext) = extended {
        let mut rel = 0u64;
        let mut seen = std::collections::HashSet::new();
        while parts.len() < 4 + MAX_LOGICAL {
            if !seen.insert(rel) {
                return Err(Error::invalid(format!(
                    "MBR: the extended partition's EBR chain loops back to sector {}",
                    ext + rel
                )));
            }
            let Some(ebr) = read_sector(disk, ext + rel, 512)? else {
                break;
            };
            if ebr[510] != 0x55 || ebr[511] != 0xAA {
                break;
            }
            let [(t, start, n), (nt, next, _), ..] = mbr_entries(&ebr);
            if t != 0 && n != 0 {
                parts.push(TableEntry {
                    number: 5 + (seen.len() as u32 - 1),
                    start: (ext + rel + start as u64) * 512,
                    size: n as u64 * 512,
                    type_id: format!("0x{t:02x}"),
                    name: String::new(),
                });
            }
            if nt == 0 || next == 0 {
                break;
            }
            rel = next as u64;
        }
    }
    Ok(Some(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A GPT header at LBA 1 with valid CRCs over `entries` (each 128 bytes).
    fn gpt_disk(entries: &[[u8; 128]], count: u32, esize: u32) -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        let arr: Vec<u8> = entries.iter().flatten().copied().collect();
        d[1024..1024 + arr.len()].copy_from_slice(&arr);
        let h = &mut d[512..1024];
        h[..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&count.to_le_bytes());
        h[84..88].copy_from_slice(&esize.to_le_bytes());
        let len = (count as usize * esize as usize).min(d.len() - 1024);
        let ecrc = crc32(&d[1024..1024 + len]);
        let h = &mut d[512..1024];
        h[88..92].copy_from_slice(&ecrc.to_le_bytes());
        let hcrc = crc32(&h[..92]);
        h[16..20].copy_from_slice(&hcrc.to_le_bytes());
        d
    }

    #[test]
    fn a_gpt_entry_is_read_with_its_name_and_a_bad_crc_is_no_gpt() {
        let mut e = [0u8; 128];
        e[0] = 0xAF;
        e[32..40].copy_from_slice(&2048u64.to_le_bytes());
        e[40..48].copy_from_slice(&4095u64.to_le_bytes());
        for (i, c) in "root".encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        let d = gpt_disk(&[e], 128, 128);
        let (scheme, parts) = read_table(d.as_slice()).unwrap();
        assert_eq!(scheme, Scheme::Gpt);
        assert_eq!(parts.len(), 1);
        assert_eq!((parts[0].start, parts[0].size), (2048 * 512, 2048 * 512));
        assert_eq!(parts[0].name, "root");
        let mut bad = d.clone();
        bad[1024 + 33] ^= 1;
        assert_eq!(read_table(bad.as_slice()).unwrap().0, Scheme::None);
    }

    #[test]
    fn an_ebr_chain_that_loops_is_an_error() {
        let mut d = vec![0u8; 1 << 20];
        d[510] = 0x55;
        d[511] = 0xAA;
        // Primary 1: extended at sector 100, 1000 sectors.
        d[446 + 4] = 0x05;
        d[446 + 8..446 + 12].copy_from_slice(&100u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&1000u32.to_le_bytes());
        // EBR at 100: logical at +10, next EBR at relative 0 + 50; EBR at 150 points back to 50.
        for (ebr, next) in [(100usize, 50u32), (150, 50)] {
            let s = &mut d[ebr * 512..ebr * 512 + 512];
            s[510] = 0x55;
            s[511] = 0xAA;
            s[446 + 4] = 0x83;
            s[446 + 8..446 + 12].copy_from_slice(&10u32.to_le_bytes());
            s[446 + 12..446 + 16].copy_from_slice(&20u32.to_le_bytes());
            s[462 + 4] = 0x05;
            s[462 + 8..462 + 12].copy_from_slice(&next.to_le_bytes());
        }
        let err = read_table(d.as_slice()).unwrap_err();
        assert!(err.to_string().contains("loops"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any bytes in the table sectors: a table, no table or an error — never a panic.
        #[test]
        fn hostile_tables_never_panic(
            mbr in proptest::collection::vec(any::<u8>(), 512),
            gpt_hdr in proptest::collection::vec(any::<u8>(), 92),
            count in 0u32..10_000,
            esize in 0u32..5000,
            entry in proptest::collection::vec(any::<u8>(), 128),
        ) {
            let mut e = [0u8; 128];
            e.copy_from_slice(&entry);
            let mut d = gpt_disk(&[e], count, esize);
            d[512 + 20..512 + 72].copy_from_slice(&gpt_hdr[20..72]);
            d[512 + 16..512 + 20].fill(0);
            let hcrc = crc32(&d[512..512 + 92]);
            d[512 + 16..512 + 20].copy_from_slice(&hcrc.to_le_bytes());
            let _ = read_table(d.as_slice());
            let mut m = vec![0u8; 1 << 20];
            m[..512].copy_from_slice(&mbr);
            m[510] = 0x55;
            m[511] = 0xAA;
            // Its EBRs, wherever they point, are the same random sector.
            for s in (512..m.len()).step_by(512 * 7) {
                let (a, b) = m.split_at_mut(s);
                b[..512].copy_from_slice(&a[..512]);
            }
            let _ = read_table(m.as_slice());
        }
    }
}

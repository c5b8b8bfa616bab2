//! The qcow2 header checks made before imago sees a file: at least as strict as QEMU's
//! `qcow2_do_open` (docs/interop/qcow2.txt), so that an image qemu-img refuses is refused
//! here too, and no allocation is sized by an unchecked field.
//!
//! Header layout (big-endian; QEMU's docs/interop/qcow2.txt):
//! ```text
//!   0 magic "QFI\xfb"        4 version (2|3)          8 backing_file_offset u64
//!  16 backing_file_size u32 20 cluster_bits (9..=21) 24 size u64 (virtual bytes)
//!  32 crypt_method (0 none, 1 AES, 2 LUKS)            36 l1_size u32 (entries)
//!  40 l1_table_offset u64   48 refcount_table_offset u64
//!  56 refcount_table_clusters u32                     60 nb_snapshots u32
//!  64 snapshots_offset u64
//!  -- version 3 only (a v2 header ends at 72; QEMU takes these as 0 / 4 / 72 / zlib) --
//!  72 incompatible_features u64: bit 0 dirty, 1 corrupt, 2 external data file,
//!     3 compression type, 4 extended L2 entries; any other bit: refuse
//!  80 compatible_features u64   88 autoclear_features u64
//!  96 refcount_order u32 (0..=6)                      100 header_length u32 (104..=cluster)
//! 104 compression_type u8 (0 zlib, 1 zstd), read only when header_length > 104
//!     then header extensions (type u32, length u32, data padded to 8) up to the cluster end
//! ```
//! Outcomes: [`ErrorKind::InvalidFormat`] for what QEMU refuses; [`ErrorKind::Corrupt`] for
//! an image QEMU marked corrupt; [`ErrorKind::Unsupported`] (naming the feature) for a
//! valid image using a feature imago does not read (zstd compression, encryption, dirty
//! bit, extended L2 entries), so that the caller can fall back to qemu-storage-daemon.
//! The file-level check ([`check_tables`]) reads the L1 table (capped at QEMU's 32 MiB)
//! and, for a version 2 image, every L2 table once, refusing the zero flag v2 lacks.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;

#[cfg(test)]
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::source::MAX_DISK_SIZE;

/// Bytes of the header we parse: the v3 fields up to and including compression_type.
pub const PARSED_LEN: usize = 112;
/// QEMU's QCOW_MAX_L1_SIZE: the largest L1 table, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's QCOW_MAX_REFTABLE_SIZE.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's QCOW_MAX_SNAPSHOTS.
const MAX_SNAPSHOTS: u32 = 65536;
/// Incompatible feature bits QEMU knows.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
/// Header extension types we look at.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Mask of the host offset in L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The fields of a qcow2 header that we check (v2 images get QEMU's v3 defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
}

fn be32(h: &[u8], o: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[o..o + 4]);
    u32::from_be_bytes(b)
}

fn be64(h: &[u8], o: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[o..o + 8]);
    u64::from_be_bytes(b)
}

fn invalid(reason: String) -> Error {
    Error::invalid(format!("{reason}; qemu-img refuses such an image too"))
}

impl Header {
    /// Parse and check the header in `h` (the file's first bytes, [`PARSED_LEN`] or fewer
    /// when the file is shorter). Checks that need nothing but the header happen here;
    /// a feature we do not read natively is returned, not refused, so that the caller can
    /// first finish the checks that refuse outright (see [`Header::unsupported`]).
    pub fn parse(h: &[u8]) -> Result<Header> {
        if h.len() < 4 || h[..4] != *b"QFI\xfb" {
            return Err(Error::invalid("not a qcow2 image (bad magic)"));
        }
        if h.len() < 72 {
            return Err(Error::invalid(format!(
                "truncated qcow2 header ({} of 72 bytes)",
                h.len()
            )));
        }
        let version = be32(h, 4);
        if version != 2 && version != 3 {
            return Err(invalid(format!(
                "qcow2 version {version} (only 2 and 3 exist)"
            )));
        }
        let mut hd = Header {
            version,
            backing_file_offset: be64(h, 8),
            backing_file_size: be32(h, 16),
            cluster_bits: be32(h, 20),
            size: be64(h, 24),
            crypt_method: be32(h, 32),
            l1_size: be32(h, 36),
            l1_table_offset: be64(h, 40),
            refcount_table_offset: be64(h, 48),
            refcount_table_clusters: be32(h, 56),
            nb_snapshots: be32(h, 60),
            snapshots_offset: be64(h, 64),
            incompatible_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
        };
        if version == 3 {
            if h.len() < 104 {
                return Err(Error::invalid(format!(
                    "truncated qcow2 v3 header ({} of 104 bytes)",
                    h.len()
                )));
            }
            hd.incompatible_features = be64(h, 72);
            hd.refcount_order = be32(h, 96);
            hd.header_length = be32(h, 100);
            if hd.header_length > 104 {
                hd.compression_type = *h.get(104).ok_or_else(|| {
                    Error::invalid("truncated qcow2 v3 header (no compression_type byte)")
                })?;
            }
        }
        hd.check()?;
        Ok(hd)
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The checks QEMU makes on the header fields alone.
    fn check(&self) -> Result<()> {
        if !(9..=21).contains(&self.cluster_bits) {
            return Err(invalid(format!(
                "qcow2 cluster_bits {} outside 9..=21",
                self.cluster_bits
            )));
        }
        let cluster = self.cluster_size();
        if self.version == 3 {
            if self.header_length < 104 {
                return Err(invalid(format!(
                    "qcow2 v3 header_length {} is below 104",
                    self.header_length
                )));
            }
            if u64::from(self.header_length) > cluster {
                return Err(invalid(format!(
                    "qcow2 header_length {} exceeds the {cluster}-byte cluster",
                    self.header_length
                )));
            }
            if self.refcount_order > 6 {
                return Err(invalid(format!(
                    "qcow2 refcount_order {} above 6 (refcounts wider than 64 bits)",
                    self.refcount_order
                )));
            }
            let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
            if unknown != 0 {
                return Err(invalid(format!(
                    "qcow2 unknown incompatible feature bits {unknown:#x}"
                )));
            }
            let flagged = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
            match (self.compression_type, flagged) {
                (0, false) | (1, true) => {}
                (0, true) => {
                    return Err(invalid(
                        "qcow2 compression type bit set with zlib compression".into(),
                    ));
                }
                (1, false) => {
                    return Err(invalid(
                        "qcow2 compression_type zstd without the compression type bit".into(),
                    ));
                }
                (t, _) => return Err(invalid(format!("qcow2 unknown compression type {t}"))),
            }
            if self.incompatible_features & INCOMPAT_EXTL2 != 0 && self.cluster_bits < 14 {
                return Err(invalid(format!(
                    "qcow2 extended L2 entries with {cluster}-byte clusters (needs 16 KiB or more)"
                )));
            }
            if self.incompatible_features & INCOMPAT_DATA_FILE != 0 && self.crypt_method != 0 {
                return Err(invalid(
                    "qcow2 external data file on an encrypted image".into(),
                ));
            }
        }
        if self.crypt_method > 2 {
            return Err(invalid(format!(
                "qcow2 unknown encryption method {}",
                self.crypt_method
            )));
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_offset > cluster {
                return Err(invalid(format!(
                    "qcow2 backing file name offset {} past the first cluster",
                    self.backing_file_offset
                )));
            }
            let room = (cluster - self.backing_file_offset).min(1023);
            if u64::from(self.backing_file_size) > room {
                return Err(invalid(format!(
                    "qcow2 backing file name of {} bytes too long",
                    self.backing_file_size
                )));
            }
        }
        // L1 table: QEMU's cap, the size the disk needs, alignment.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(format!(
                "qcow2 L1 table of {} entries is larger than QEMU's limit of 32 MiB ({} entries)",
                self.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        // Entries needed to map `size` bytes: one L1 entry per L2 table of cluster/8 entries.
        let needed = self.size.div_ceil(cluster * (cluster / 8));
        if u64::from(self.l1_size) < needed {
            return Err(invalid(format!(
                "qcow2 L1 table of {} entries is too small for a {}-byte disk ({needed} needed)",
                self.l1_size, self.size
            )));
        }
        for (what, offset) in [
            ("L1 table", self.l1_table_offset),
            ("refcount table", self.refcount_table_offset),
            ("snapshot table", self.snapshots_offset),
        ] {
            if !offset.is_multiple_of(cluster) || offset > i64::MAX as u64 {
                return Err(invalid(format!(
                    "qcow2 {what} offset {offset} is not a valid cluster offset"
                )));
            }
        }
        if u64::from(self.refcount_table_clusters) * cluster > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "qcow2 refcount table of {} clusters is larger than QEMU's {MAX_REFTABLE_BYTES}-byte limit",
                self.refcount_table_clusters
            )));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(format!(
                "qcow2 image claims {} snapshots (QEMU's limit: {MAX_SNAPSHOTS})",
                self.nb_snapshots
            )));
        }
        if self.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Error::corrupt(
                "QEMU marked this qcow2 image corrupt (incompatible feature bit 1); \
                 repair a copy with `qemu-img check -r all` and back up the copy",
            ));
        }
        if self.size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "disk size {} exceeds the limit of {MAX_DISK_SIZE} bytes",
                self.size
            )));
        }
        Ok(())
    }

    /// The feature of a valid image that imago does not read (`Unsupported`), if any.
    pub fn unsupported(&self) -> Option<Error> {
        let why = if self.crypt_method == 1 {
            "legacy AES encryption (crypt_method 1)"
        } else if self.crypt_method == 2 {
            "LUKS encryption (crypt_method 2)"
        } else if self.compression_type == 1 {
            "compression_type=zstd"
        } else if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            "extended L2 entries (extended_l2=on)"
        } else if self.incompatible_features & INCOMPAT_DIRTY != 0 {
            "the dirty bit (not closed cleanly; lazy refcounts need a repair)"
        } else {
            return None;
        };
        Some(Error::unsupported(format!(
            "qcow2 image uses {why}, which the native qcow2 reader does not read"
        )))
    }
}

/// Names found in a header: the backing file, its format, an external data file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
}

/// Read the backing file name and the header extensions from the first cluster `first`
/// (as many bytes of it as the file has).
pub fn names(hd: &Header, first: &[u8]) -> Result<Names> {
    let mut n = Names::default();
    if hd.backing_file_offset != 0 && hd.backing_file_size != 0 {
        let start = hd.backing_file_offset as usize;
        let end = start + hd.backing_file_size as usize;
        let raw = first.get(start..end).ok_or_else(|| {
            Error::invalid(format!(
                "qcow2 backing file name at bytes {start}..{end} lies past the end of the file"
            ))
        })?;
        n.backing = Some(
            String::from_utf8(raw.to_vec())
                .map_err(|_| Error::invalid("qcow2 backing file name is not UTF-8"))?,
        );
    }
    // Header extensions follow the header (QEMU reads them for v2 too) and end at type 0,
    // the backing file name, or the cluster end.
    let limit = if hd.backing_file_offset != 0 {
        hd.backing_file_offset
    } else {
        hd.cluster_size()
    };
    let limit = (limit.min(first.len() as u64)) as usize;
    let mut pos = hd.header_length as usize;
    while pos + 8 <= limit {
        let kind = be32(first, pos);
        let len = be32(first, pos + 4) as usize;
        pos += 8;
        if kind == EXT_END {
            break;
        }
        let data = first
            .get(pos..pos.saturating_add(len))
            .filter(|_| pos + len <= limit);
        let Some(data) = data else {
            return Err(invalid(format!(
                "qcow2 header extension {kind:#x} of {len} bytes at offset {} overruns the header area",
                pos - 8
            )));
        };
        let text = || String::from_utf8_lossy(data).into_owned();
        match kind {
            EXT_BACKING_FORMAT => n.backing_format = Some(text()),
            EXT_DATA_FILE => n.data_file = Some(text()),
            _ => {}
        }
        pos += len.next_multiple_of(8);
    }
    Ok(n)
}

/// Read `buf.len()` bytes at `offset`, naming `what` in the error.
fn read_exact_at(f: &std::fs::File, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    f.read_exact_at(buf, offset)
        .map_err(|e| Error::io(format!("reading the qcow2 {what} at offset {offset}"), e))
}

/// Check the tables the header points to against the file of `file_len` bytes: the L1
/// table lies in the file, every L2 table it names lies in the file and is
/// cluster-aligned, and (version 2) no L2 entry carries the zero flag, which QEMU refuses
/// to read in a v2 image ("Zero cluster entry found in pre-v3 image").
pub fn check_tables(hd: &Header, f: &std::fs::File, file_len: u64) -> Result<()> {
    let cluster = hd.cluster_size();
    let l1_bytes = u64::from(hd.l1_size) * 8; // at most MAX_L1_BYTES (checked in parse)
    if l1_bytes == 0 {
        return Ok(());
    }
    if hd.l1_table_offset.saturating_add(l1_bytes) > file_len {
        return Err(Error::invalid(format!(
            "qcow2 L1 table at offset {} ({l1_bytes} bytes) lies outside the {file_len}-byte file",
            hd.l1_table_offset
        )));
    }
    let mut l1 = vec![0u8; l1_bytes as usize];
    read_exact_at(f, &mut l1, hd.l1_table_offset, "L1 table")?;
    let per_l2 = cluster / 8;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut l2 = Vec::new();
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let l2_offset = be64(e, 0) & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        if !l2_offset.is_multiple_of(cluster) || l2_offset.saturating_add(cluster) > file_len {
            return Err(Error::invalid(format!(
                "qcow2 L1 entry {i} points to an L2 table at offset {l2_offset}, outside the {file_len}-byte file"
            )));
        }
        if hd.version != 2 || !seen.insert(l2_offset) {
            continue;
        }
        // Distinct L2 tables lie in distinct clusters of the file: this loop reads at most
        // the file's size, whatever the L1 table says.
        l2.resize(cluster as usize, 0);
        read_exact_at(f, &mut l2, l2_offset, "L2 table")?;
        for (j, e) in l2.chunks_exact(8).enumerate() {
            let entry = be64(e, 0);
            let compressed = entry & (1 << 62) != 0;
            if !compressed && entry & 1 != 0 {
                let disk_offset = (i as u64 * per_l2 + j as u64) * cluster;
                return Err(Error::invalid(format!(
                    "qcow2 version 2 L2 entry {j} of the table at offset {l2_offset} (disk offset {disk_offset}) has the zero flag, which exists only in version 3; QEMU refuses to read it too"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid 64 MiB v3 header with 64 KiB clusters, as `qemu-img create` writes it.
    fn v3() -> Vec<u8> {
        let mut h = vec![0u8; PARSED_LEN];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        h[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    fn set32(h: &mut [u8], o: usize, v: u32) {
        h[o..o + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn kind(h: &[u8]) -> Option<ErrorKind> {
        let r = Header::parse(h);
        match r {
            Ok(hd) => hd.unsupported().map(|e| e.kind()),
            Err(e) => Some(e.kind()),
        }
    }

    #[test]
    fn a_plain_v3_header_is_accepted() {
        assert_eq!(kind(&v3()), None);
    }

    #[test]
    fn fields_qemu_refuses_are_invalid_format() {
        let cases: &[(&str, usize, u32)] = &[
            ("version 4", 4, 4),
            ("cluster_bits 8", 20, 8),
            ("cluster_bits 22", 20, 22),
            ("crypt_method 3", 32, 3),
            ("header_length 100", 100, 100),
            ("header_length past the cluster", 100, 1 << 17),
            ("refcount_order 7", 96, 7),
            ("unknown incompatible bit 5", 76, 1 << 5),
            ("l1_size above 32 MiB", 36, (32 << 20) / 8 + 1),
            ("l1_size too small", 36, 0),
            ("snapshots", 60, MAX_SNAPSHOTS + 1),
            ("refcount table too large", 56, 129),
            ("compression bit with zlib", 76, INCOMPAT_COMPRESSION as u32),
        ];
        for (what, off, v) in cases {
            let mut h = v3();
            set32(&mut h, *off, *v);
            assert_eq!(kind(&h), Some(ErrorKind::InvalidFormat), "{what}");
        }
        let mut h = v3();
        h[104] = 2;
        assert_eq!(
            kind(&h),
            Some(ErrorKind::InvalidFormat),
            "compression type 2"
        );
        h[104] = 1;
        assert_eq!(kind(&h), Some(ErrorKind::InvalidFormat), "zstd without bit");
    }

    #[test]
    fn features_imago_lacks_are_unsupported_and_name_the_feature() {
        let mut h = v3();
        h[104] = 1;
        set32(&mut h, 76, INCOMPAT_COMPRESSION as u32);
        let e = Header::parse(&h).unwrap().unsupported().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("zstd"), "{e}");
        for (m, name) in [(1, "AES"), (2, "LUKS")] {
            let mut h = v3();
            set32(&mut h, 32, m);
            let e = Header::parse(&h).unwrap().unsupported().unwrap();
            assert!(e.to_string().contains(name), "{e}");
        }
        let mut h = v3();
        set32(&mut h, 76, INCOMPAT_DIRTY as u32);
        assert_eq!(kind(&h), Some(ErrorKind::Unsupported));
        set32(&mut h, 76, INCOMPAT_CORRUPT as u32);
        assert_eq!(kind(&h), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn a_v2_header_ignores_the_v3_fields() {
        let mut h = v3();
        set32(&mut h, 4, 2);
        set32(&mut h, 76, 0xffff_ffff);
        set32(&mut h, 100, 0);
        let hd = Header::parse(&h).unwrap();
        assert_eq!(hd.incompatible_features, 0);
        assert_eq!(hd.header_length, 72);
        assert!(hd.unsupported().is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Random mutations of a valid header never panic: they parse or are refused.
        #[test]
        fn random_header_mutations_never_panic(
            muts in proptest::collection::vec((0usize..PARSED_LEN, any::<u8>()), 1..12),
            cut in 0usize..=PARSED_LEN,
            first in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut h = v3();
            for (i, b) in muts {
                h[i] = b;
            }
            let _ = kind(&h);
            let _ = kind(&h[..cut]);
            if let Ok(hd) = Header::parse(&h) {
                let mut c = h.clone();
                c.extend_from_slice(&first);
                let _ = names(&hd, &c);
            }
        }
    }
}

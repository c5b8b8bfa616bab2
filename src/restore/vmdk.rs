//! VMDK image writer (VMware "Virtual Disk Format 5.0"): streamOptimized and
//! monolithicSparse hosted sparse extents with an embedded descriptor.
//!
//! Data is fed in ascending order (restore delivers chunks in order); memory stays
//! bounded (one grain, one grain table and, for streamOptimized, the grain directory).
//! All-zero grains are never stored, so the output is thin.
//!
//! Why our own: no crate writes VMDK (`vmdk-core` reads only). Layout, for both:
//! ```text
//!  sector 0      SparseExtentHeader ("KDMV", version 1|3, flags, capacity, grainSize 128,
//!                descriptorOffset/Size, numGTEsPerGT 512, rgd/gd offsets, overHead, ...)
//!  sector 1..    embedded descriptor (createType, extent line, ddb.geometry.*,
//!                ddb.adapterType, ddb.virtualHWVersion)
//!  streamOptimized:  from sector 128: [grain marker (lba, size) + zlib grain]… , after
//!                each 512-grain span with data: GT marker + grain table; at the end GD
//!                marker + grain directory, footer marker + footer (header with the real
//!                gdOffset), end-of-stream marker
//!  monolithicSparse: redundant GD + GTs, GD + GTs (preallocated), then raw grains
//! ```

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

use flate2::Compression;
use flate2::write::ZlibEncoder;

use super::deflate_pool::DeflatePool;

const SECTOR: u64 = 512;
const MAGIC: u32 = 0x564d_444b; // "KDMV" little-endian
const GRAIN_SECTORS: u64 = 128;
const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
const GTES_PER_GT: u64 = 512;
const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR;
const GD_AT_END: u64 = u64::MAX;
const FLAG_NL_TEST: u32 = 1;
const FLAG_RGD: u32 = 1 << 1;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;
/// Grain/table offsets are 32-bit sector numbers, so neither the capacity nor
/// the produced file may exceed 2 TiB.
const MAX_SIZE: u64 = 1 << 41;
/// Descriptor space reserved in monolithicSparse images (as qemu/VMware do).
const SPARSE_DESC_SECTORS: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    StreamOptimized,
    MonolithicSparse,
}

#[derive(Debug, Clone)]
pub struct DescriptorInfo {
    /// ddb.adapterType, e.g. "lsilogic" (default), "ide", "buslogic", "legacyESX".
    pub adapter_type: String,
    /// ddb.virtualHWVersion (default 4).
    pub hw_version: u32,
    /// Content ID written as CID (parentCID is always ffffffff).
    pub cid: u32,
    /// File name used in the extent line, e.g. "disk.vmdk".
    pub extent_name: String,
}

impl Default for DescriptorInfo {
    fn default() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mixed =
            (nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        DescriptorInfo {
            adapter_type: "lsilogic".into(),
            hw_version: 4,
            cid: ((mixed >> 32) as u32).min(0xffff_fffe),
            extent_name: "disk.vmdk".into(),
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn sector_u32(byte_off: u64) -> io::Result<u32> {
    u32::try_from(byte_off / SECTOR).map_err(|_| io::Error::other("VMDK file would exceed 2 TiB"))
}

/// SparseExtentHeader fields that vary between images.
#[derive(Clone, Copy)]
struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    desc_offset: u64,
    desc_size: u64,
    rgd_offset: u64,
    gd_offset: u64,
    overhead: u64,
    compress: u16,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SECTOR as usize);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.capacity.to_le_bytes());
        b.extend_from_slice(&GRAIN_SECTORS.to_le_bytes());
        b.extend_from_slice(&self.desc_offset.to_le_bytes());
        b.extend_from_slice(&self.desc_size.to_le_bytes());
        b.extend_from_slice(&(GTES_PER_GT as u32).to_le_bytes());
        b.extend_from_slice(&self.rgd_offset.to_le_bytes());
        b.extend_from_slice(&self.gd_offset.to_le_bytes());
        b.extend_from_slice(&self.overhead.to_le_bytes());
        // uncleanShutdown, then the newline-corruption check characters.
        b.extend_from_slice(&[0, b'\n', b' ', b'\r', b'\n']);
        b.extend_from_slice(&self.compress.to_le_bytes());
        b.resize(SECTOR as usize, 0);
        b
    }
}

/// A 512-byte metadata marker sector (numSectors, size 0, type).
fn marker(num_sectors: u64, kind: u32) -> Vec<u8> {
    let mut b = vec![0u8; SECTOR as usize];
    b[..8].copy_from_slice(&num_sectors.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

fn descriptor(info: &DescriptorInfo, sub: Subformat, capacity: u64) -> io::Result<String> {
    for (what, s) in [
        ("adapter_type", &info.adapter_type),
        ("extent_name", &info.extent_name),
    ] {
        if s.is_empty() || s.chars().any(|c| c == '"' || c.is_control()) {
            return Err(invalid(&format!(
                "{what} must be non-empty without quotes/control chars"
            )));
        }
    }
    let create_type = match sub {
        Subformat::StreamOptimized => "streamOptimized",
        Subformat::MonolithicSparse => "monolithicSparse",
    };
    // VMware's geometry: 16 heads on IDE (cylinders capped at 16383), 255 on SCSI.
    let heads: u64 = if info.adapter_type == "ide" { 16 } else { 255 };
    let cylinders = (capacity / (heads * 63)).clamp(1, if heads == 16 { 16383 } else { 65535 });
    Ok(format!(
        "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID=ffffffff\n\
         createType=\"{create_type}\"\n\n# Extent description\nRW {capacity} SPARSE \"{}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"{}\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"{}\"\n",
        info.cid, info.extent_name, info.hw_version, info.adapter_type
    ))
}

/// A streamOptimized grain as stored: marker (lba u64, compressed size u32) + zlib
/// data, padded to whole sectors; the whole grain is compressed (a partial last grain is
/// zero-padded).
fn encode_grain(g: u64, grain: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(GRAIN_BYTES as usize / 2);
    out.extend_from_slice(&(g * GRAIN_SECTORS).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    let mut enc = ZlibEncoder::new(out, Compression::fast());
    enc.write_all(grain)?;
    let mut out = enc.finish()?;
    let clen = u32::try_from(out.len() - 12).map_err(io::Error::other)?;
    out[8..12].copy_from_slice(&clen.to_le_bytes());
    out.resize(
        (out.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize,
        0,
    );
    Ok(out)
}

pub struct VmdkWriter {
    file: File,
    sub: Subformat,
    header: Header,
    /// Disk size in bytes.
    size: u64,
    /// Smallest offset the next write_at may start at.
    next_off: u64,
    /// Buffered grain (index, contents) and whether it holds non-zero data.
    cur_grain: Option<u64>,
    grain: Vec<u8>,
    grain_dirty: bool,
    /// Current grain table (index, entries) and whether any entry is set.
    gt_index: u64,
    gt: Vec<u32>,
    gt_dirty: bool,
    /// Grain directory (streamOptimized only; sparse GT locations are fixed).
    gd: Vec<u32>,
    gd_sectors: u64,
    /// Byte offset where the next grain/metadata is appended.
    pos: u64,
    /// streamOptimized: grains are deflated on worker threads, appended in order.
    pool: Option<DeflatePool>,
}

impl VmdkWriter {
    /// Start a new image in `file` (truncated first). `size` is in bytes, non-zero and at
    /// most 2 TiB; VMDK counts whole sectors, so a size that is not a multiple of 512 is
    /// rounded up (as qemu-img does) and the tail reads as zeros.
    pub fn create(
        file: File,
        size: u64,
        sub: Subformat,
        info: DescriptorInfo,
    ) -> io::Result<VmdkWriter> {
        let size = size
            .checked_next_multiple_of(SECTOR)
            .filter(|&s| s > 0 && s <= MAX_SIZE)
            .ok_or_else(|| invalid("a VMDK disk is larger than 0 and at most 2 TiB"))?;
        let capacity = size / SECTOR;
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let gt_count = grains.div_ceil(GTES_PER_GT);
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        let mut desc = descriptor(&info, sub, capacity)?.into_bytes();
        let (header, gd) = match sub {
            Subformat::StreamOptimized => {
                let desc_size = (desc.len() as u64 + 1).div_ceil(SECTOR);
                let h = Header {
                    version: 3,
                    flags: FLAG_NL_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
                    capacity,
                    desc_offset: 1,
                    desc_size,
                    rgd_offset: 0,
                    gd_offset: GD_AT_END,
                    // Grains start at sector 128 like VMware's own tools write them.
                    overhead: (1 + desc_size).max(GRAIN_SECTORS),
                    compress: 1,
                };
                (h, vec![0u32; gt_count as usize])
            }
            Subformat::MonolithicSparse => {
                let desc_size = SPARSE_DESC_SECTORS.max((desc.len() as u64 + 1).div_ceil(SECTOR));
                let rgd_offset = 1 + desc_size;
                let gd_offset = rgd_offset + gd_sectors + gt_count * GT_SECTORS;
                let end = gd_offset + gd_sectors + gt_count * GT_SECTORS;
                let h = Header {
                    version: 1,
                    flags: FLAG_NL_TEST | FLAG_RGD,
                    capacity,
                    desc_offset: 1,
                    desc_size,
                    rgd_offset,
                    gd_offset,
                    overhead: end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS,
                    compress: 0,
                };
                (h, Vec::new())
            }
        };
        desc.resize((header.desc_size * SECTOR) as usize, 0);
        let mut w = VmdkWriter {
            file,
            sub,
            header,
            size,
            next_off: 0,
            cur_grain: None,
            grain: vec![0u8; GRAIN_BYTES as usize],
            grain_dirty: false,
            gt_index: 0,
            gt: vec![0u32; GTES_PER_GT as usize],
            gt_dirty: false,
            gd,
            gd_sectors,
            pos: 0,
            pool: (sub == Subformat::StreamOptimized).then(|| {
                let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
                DeflatePool::new(threads, encode_grain)
            }),
        };
        w.file.set_len(0)?;
        w.put(0, &header.encode())?;
        w.put(SECTOR, &desc)?;
        if sub == Subformat::MonolithicSparse {
            // Both directories point at preallocated (initially zero) tables.
            for dir in [header.rgd_offset, header.gd_offset] {
                let mut b = Vec::with_capacity((gd_sectors * SECTOR) as usize);
                for t in 0..gt_count {
                    let gt_sector = dir + gd_sectors + t * GT_SECTORS;
                    b.extend_from_slice(&sector_u32(gt_sector * SECTOR)?.to_le_bytes());
                }
                b.resize((gd_sectors * SECTOR) as usize, 0);
                w.put(dir * SECTOR, &b)?;
            }
            w.file.set_len(header.overhead * SECTOR)?;
        }
        w.pos = header.overhead * SECTOR;
        Ok(w)
    }

    /// Data at ascending offsets (each call's offset >= the end of the previous
    /// call's data); offset is a multiple of 512 (the length need not be: the
    /// last chunk of a disk of odd size is short, the grain's rest stays zero); data may be
    /// smaller or larger than a grain and need not be grain-aligned (buffer a
    /// partial grain; gaps between calls are zero/unallocated). All-zero grains
    /// are not stored. Writing past `size` or a non-ascending offset is an error.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let len = data.len() as u64;
        if !offset.is_multiple_of(SECTOR) {
            return Err(invalid("VMDK writes start at multiples of 512"));
        }
        if offset < self.next_off {
            return Err(invalid(
                "VMDK writes must be at ascending, non-overlapping offsets",
            ));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| invalid("VMDK write past the end of the disk"))?;
        self.next_off = end;
        let (mut off, mut rest) = (offset, data);
        while !rest.is_empty() {
            let g = off / GRAIN_BYTES;
            let in_g = (off % GRAIN_BYTES) as usize;
            let n = rest.len().min(GRAIN_BYTES as usize - in_g);
            let (chunk, tail) = rest.split_at(n);
            if self.cur_grain != Some(g) {
                self.flush_grain()?;
                self.cur_grain = Some(g);
            }
            // The buffer is zero where nothing was written, so zeros need no copy.
            if chunk.iter().any(|&b| b != 0) {
                self.grain[in_g..in_g + n].copy_from_slice(chunk);
                self.grain_dirty = true;
            }
            off += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// Flush the pending grain, write grain tables/directories/footer/EOS as the
    /// subformat needs, fsync. Returns the file.
    pub fn finish(mut self) -> io::Result<File> {
        self.flush_grain()?;
        self.flush_gt()?;
        if self.sub == Subformat::StreamOptimized {
            let mut gd: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
            gd.resize((self.gd_sectors * SECTOR) as usize, 0);
            self.append(&marker(self.gd_sectors, MARKER_GD))?;
            let gd_offset = self.pos / SECTOR;
            self.append(&gd)?;
            self.append(&marker(1, MARKER_FOOTER))?;
            let footer = Header {
                gd_offset,
                ..self.header
            };
            self.append(&footer.encode())?;
            self.append(&marker(0, MARKER_EOS))?;
        }
        self.file.flush()?;
        self.file.sync_all()?;
        Ok(self.file)
    }

    fn put(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(off))?;
        self.file.write_all(buf)
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.put(self.pos, buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn flush_grain(&mut self) -> io::Result<()> {
        let Some(g) = self.cur_grain.take() else {
            return Ok(());
        };
        if !self.grain_dirty {
            return Ok(());
        }
        let t = g / GTES_PER_GT;
        if t != self.gt_index {
            self.flush_gt()?;
            self.gt_index = t;
        }
        self.grain_dirty = false;
        if let Some(pool) = self.pool.as_mut() {
            let grain = std::mem::replace(&mut self.grain, vec![0u8; GRAIN_BYTES as usize]);
            for (g, out) in pool.submit(g, grain)? {
                self.append_grain(g, &out)?;
            }
            return Ok(());
        }
        let grain = std::mem::take(&mut self.grain);
        let r = self.append_grain(g, &grain);
        self.grain = grain;
        r?;
        self.grain.fill(0);
        Ok(())
    }

    /// Append grain `g` as stored (compressed with its marker, or raw) and point the
    /// current grain table at it.
    fn append_grain(&mut self, g: u64, stored: &[u8]) -> io::Result<()> {
        let entry = sector_u32(self.pos)?;
        self.append(stored)?;
        if let Some(e) = self.gt.get_mut((g % GTES_PER_GT) as usize) {
            *e = entry;
        }
        self.gt_dirty = true;
        Ok(())
    }

    fn flush_gt(&mut self) -> io::Result<()> {
        // Grains still being deflated belong to this table: append them first.
        if let Some(pool) = self.pool.as_mut() {
            for (g, out) in pool.drain()? {
                self.append_grain(g, &out)?;
            }
        }
        if !self.gt_dirty {
            return Ok(());
        }
        let bytes: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
        let t = self.gt_index;
        match self.sub {
            Subformat::StreamOptimized => {
                self.append(&marker(GT_SECTORS, MARKER_GT))?;
                let entry = sector_u32(self.pos)?;
                let slot = self
                    .gd
                    .get_mut(t as usize)
                    .ok_or_else(|| io::Error::other("GT index out of range"))?;
                *slot = entry;
                self.append(&bytes)?;
            }
            Subformat::MonolithicSparse => {
                for dir in [self.header.rgd_offset, self.header.gd_offset] {
                    let gt_sector = dir + self.gd_sectors + t * GT_SECTORS;
                    self.put(gt_sector * SECTOR, &bytes)?;
                }
            }
        }
        self.gt.fill(0);
        self.gt_dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    fn have_qemu_img() -> bool {
        let ok = Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("qemu-img not found: skipping qemu-img validation");
        }
        ok
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn text(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| b"compressible vmdk data! "[i % 24])
            .collect()
    }

    /// Builds raw + VMDK from (offset, data) segments, feeding the writer in
    /// sector-multiple pieces of varying size; validates with qemu-img.
    fn roundtrip(size: u64, segs: &[(u64, Vec<u8>)], sub: Subformat) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let (raw_p, vmdk_p) = (dir.path().join("in.raw"), dir.path().join("out.vmdk"));
        let raw = File::create(&raw_p).unwrap();
        raw.set_len(size).unwrap();
        let mut w = VmdkWriter::create(
            File::create(&vmdk_p).unwrap(),
            size,
            sub,
            DescriptorInfo::default(),
        )
        .unwrap();
        let mut piece = 512;
        for (off, data) in segs {
            std::os::unix::fs::FileExt::write_all_at(&raw, data, *off).unwrap();
            let mut done = 0;
            while done < data.len() {
                let n = piece.min(data.len() - done);
                w.write_at(&data[done..done + n], off + done as u64)
                    .unwrap();
                done += n;
                piece = piece * 3 % (200 * 1024) + 512; // 512 B .. ~200 KiB
                piece -= piece % 512;
            }
        }
        let len = w.finish().unwrap().metadata().unwrap().len();
        if have_qemu_img() {
            let check = Command::new("qemu-img")
                .args(["check", "-f", "vmdk"])
                .arg(&vmdk_p)
                .output()
                .unwrap();
            assert!(check.status.success(), "check: {check:?}");
            let cmp = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "vmdk"])
                .args([&raw_p, &vmdk_p])
                .output()
                .unwrap();
            assert!(cmp.status.success(), "compare: {cmp:?}");
        }
        len
    }

    fn both(size: u64, segs: &[(u64, Vec<u8>)]) -> (u64, u64) {
        let s = roundtrip(size, segs, Subformat::StreamOptimized);
        let m = roundtrip(size, segs, Subformat::MonolithicSparse);
        eprintln!("size {size}: stream {s} bytes, sparse {m} bytes");
        (s, m)
    }

    #[test]
    fn empty_10m() {
        let (s, m) = both(10 * MIB, &[]);
        // Stream: 64 KiB header area (grains start at sector 128) + footer.
        assert!(s <= 64 * 1024 + 4096 && m <= 64 * 1024);
    }

    #[test]
    fn scattered_odd_size() {
        let size = 10 * MIB + 3 * 512;
        let segs = vec![
            (0, random(4096, 1)),
            (3 * GRAIN_BYTES + 1024, random(512, 2)),
            (MIB + 512, random(200 * 1024, 3)),
            (5 * MIB, vec![0u8; 128 * 1024]), // explicit zeros: must stay unallocated
            (size - 1536 - 8192, text(8192)),
            (size - 1536, random(1536, 4)),
        ];
        both(size, &segs);
    }

    #[test]
    fn multi_gt_100m() {
        let size = 100 * MIB;
        let segs = vec![
            (0, text(3 * MIB as usize)),
            (20 * MIB, random(MIB as usize, 5)),
            (96 * MIB - 8192, random(16384, 6)), // crosses a grain-table boundary
            (size - GRAIN_BYTES, random(GRAIN_BYTES as usize, 7)),
        ];
        let (s, m) = both(size, &segs);
        assert!(s < 2 * MIB && m > 4 * MIB);
    }

    #[test]
    fn zero_1g_is_small() {
        let (s, m) = both(1024 * MIB, &[(512 * MIB, vec![0u8; MIB as usize])]);
        assert!(s <= 64 * 1024 + 4096, "stream {s}");
        assert!(m <= 256 * 1024, "sparse {m}");
    }

    #[test]
    fn rejects_bad_input() {
        let f = || tempfile::tempfile().unwrap();
        let info = DescriptorInfo::default;
        for sub in [Subformat::StreamOptimized, Subformat::MonolithicSparse] {
            // An odd size is rounded up to whole sectors.
            assert_eq!(
                VmdkWriter::create(f(), MIB + 1, sub, info()).unwrap().size,
                MIB + 512
            );
            assert!(VmdkWriter::create(f(), u64::MAX, sub, info()).is_err());
            assert!(VmdkWriter::create(f(), 0, sub, info()).is_err());
            assert!(VmdkWriter::create(f(), u64::MAX - 511, sub, info()).is_err());
            let bad = DescriptorInfo {
                extent_name: "a\"b".into(),
                ..info()
            };
            assert!(VmdkWriter::create(f(), MIB, sub, bad).is_err());
            let mut w = VmdkWriter::create(f(), MIB, sub, info()).unwrap();
            w.write_at(&[1u8; 1024], 4096).unwrap();
            assert!(w.write_at(&[1u8; 512], 4096).is_err(), "overlap");
            assert!(w.write_at(&[1u8; 512], 0).is_err(), "backwards");
            w.write_at(&[1u8; 100], 8192).unwrap(); // a short last chunk
            assert!(
                w.write_at(&[1u8; 512], 8192).is_err(),
                "overlaps the short one"
            );
            assert!(w.write_at(&[1u8; 512], 8705).is_err(), "unaligned offset");
            assert!(w.write_at(&[1u8; 1024], MIB - 512).is_err(), "past end");
            assert!(w.write_at(&[1u8; 512], u64::MAX - 511).is_err(), "overflow");
            w.write_at(&[1u8; 512], MIB - 512).unwrap();
            w.finish().unwrap();
        }
    }
}

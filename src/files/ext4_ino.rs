//! Inode numbers and link counts of an ext2/3/4 file system, read from the raw inode
//! table and directory blocks (`ext4-view` keeps both private).
//!
//! Only what hard links need: for a directory, the inode number of each name; for an
//! inode, its link count, mode and size (the caller checks mode and size against what
//! `ext4-view` read, so a disagreement never turns a file into a wrong link). Contents
//! are still read by `ext4-view`.
//!
//! ```text
//! superblock @1024: 0x00 inodes_count u32   0x14 first_data_block u32  0x18 log_block_size u32
//!                   0x28 inodes_per_group u32  0x58 inode_size u16   0x60 feature_incompat u32
//!                   0xFE desc_size u16 (64bit)
//! group descriptor i @ (first_data_block+1)·bs + i·desc_size: 0x08 inode_table_lo u32,
//!                   0x28 inode_table_hi u32 (desc_size ≥ 64)
//! inode n @ table(g)·bs + ((n-1) mod ipg)·inode_size, g = (n-1) / ipg:
//!                   0x00 mode u16  0x04 size_lo u32  0x1A links_count u16  0x20 flags u32
//!                   0x28 i_block[60] (extent tree if flags & 0x80000, else block map)
//!                   0x6C size_high u32
//! extent header: magic 0xF30A u16, entries u16, max u16, depth u16; then 12-byte
//!   index (block u32, leaf_lo u32, leaf_hi u16) or leaf (block u32, len u16,
//!   start_hi u16, start_lo u32) entries
//! dirent: inode u32, rec_len u16, name_len u8 (u16 without the filetype feature),
//!   file_type u8, name   (htree interior blocks look like one empty dirent: skipped)
//! ```
//!
//! Every length is bounded ([`MAX_DIR_BYTES`], [`MAX_DEPTH`] extent levels) and every
//! offset checked, so hostile metadata gives an error, which the caller takes as "inode
//! unknown" (the file is then copied, not linked); an extent tree may not have more
//! nodes than its directory has blocks. Inline-data directories are not
//! parsed (same outcome).

use std::cell::RefCell;
use std::collections::HashMap;

use crate::disk_reader::DiskView;
use crate::error::{Error, Result};

/// Largest directory parsed for inode numbers.
pub const MAX_DIR_BYTES: u64 = 256 << 20;
/// Deepest extent tree followed.
const MAX_DEPTH: u16 = 5;

const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_64BIT: u32 = 0x80;
const FLAG_EXTENTS: u32 = 0x8_0000;
const FLAG_INLINE: u32 = 0x1000_0000;
const ROOT: u32 = 2;

/// What hard links need of one inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawInode {
    pub mode: u16,
    pub links: u16,
    pub size: u64,
    flags: u32,
    block: [u8; 60],
}

/// The inode table and directories of one ext file system.
pub struct Inodes {
    view: DiskView,
    bs: u64,
    inodes_count: u32,
    ipg: u32,
    inode_size: u64,
    desc_size: u64,
    gdt: u64,
    filetype: bool,
    /// Directory path → inode number, filled as paths are resolved.
    dirs: RefCell<HashMap<Vec<u8>, u32>>,
}

fn u16at(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .unwrap_or(0)
}

fn u32at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

impl Inodes {
    /// Read the superblock fields the inode table needs.
    pub fn open(view: DiskView) -> Result<Inodes> {
        let mut sb = [0u8; 1024];
        view.read_exact_at(1024, &mut sb)?;
        let log = u32at(&sb, 0x18);
        if log > 6 {
            return Err(Error::corrupt(format!(
                "ext4 superblock: block size 2^{log} KiB"
            )));
        }
        let bs = 1024u64 << log;
        let ipg = u32at(&sb, 0x28);
        let rev = u32at(&sb, 0x4C);
        let inode_size = if rev == 0 {
            128
        } else {
            u16at(&sb, 0x58) as u64
        };
        let incompat = u32at(&sb, 0x60);
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            u16at(&sb, 0xFE) as u64
        } else {
            32
        };
        if ipg == 0 || !(128..=bs).contains(&inode_size) || !(32..=1024).contains(&desc_size) {
            return Err(Error::corrupt(
                "ext4 superblock: inodes per group, inode size or descriptor size out of range",
            ));
        }
        Ok(Inodes {
            view,
            bs,
            inodes_count: u32at(&sb, 0),
            ipg,
            inode_size,
            desc_size,
            gdt: (u32at(&sb, 0x14) as u64 + 1) * bs,
            filetype: incompat & INCOMPAT_FILETYPE != 0,
            dirs: RefCell::new(HashMap::new()),
        })
    }

    /// Inode `ino` (1-based).
    pub fn inode(&self, ino: u32) -> Result<RawInode> {
        if ino == 0 || ino > self.inodes_count {
            return Err(Error::corrupt(format!("inode {ino} out of range")));
        }
        let group = ((ino - 1) / self.ipg) as u64;
        let mut d = vec![0u8; self.desc_size as usize];
        self.view
            .read_exact_at(self.gdt + group * self.desc_size, &mut d)?;
        let mut table = u32at(&d, 0x08) as u64;
        if self.desc_size >= 64 {
            table |= (u32at(&d, 0x28) as u64) << 32;
        }
        let off = table
            .checked_mul(self.bs)
            .and_then(|t| t.checked_add(((ino - 1) % self.ipg) as u64 * self.inode_size))
            .ok_or_else(|| Error::corrupt(format!("inode {ino}: table out of range")))?;
        let mut raw = vec![0u8; 0x70.min(self.inode_size as usize)];
        self.view.read_exact_at(off, &mut raw)?;
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[0x28..0x64]);
        let high = if raw.len() >= 0x70 {
            u32at(&raw, 0x6C)
        } else {
            0
        };
        Ok(RawInode {
            mode: u16at(&raw, 0),
            links: u16at(&raw, 0x1A),
            size: u32at(&raw, 4) as u64 | (high as u64) << 32,
            flags: u32at(&raw, 0x20),
            block,
        })
    }

    fn read_block(&self, blk: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.bs as usize];
        let off = blk
            .checked_mul(self.bs)
            .ok_or_else(|| Error::corrupt(format!("block {blk} out of range")))?;
        self.view.read_exact_at(off, &mut b)?;
        Ok(b)
    }

    /// Physical block of each logical block `0..n` (0: a hole).
    fn blocks(&self, inode: &RawInode, n: u64) -> Result<Vec<u64>> {
        let mut out = vec![0u64; n as usize];
        if inode.flags & FLAG_INLINE != 0 {
            return Err(Error::unsupported("inline-data directory"));
        }
        if inode.flags & FLAG_EXTENTS != 0 {
            // A sane tree reads at most one node per mapped block; a hostile one whose
            // index entries all point at one node would otherwise be walked 340^4 times.
            let mut budget = n.saturating_add(16);
            self.extents(&inode.block, MAX_DEPTH + 1, &mut out, &mut budget)?;
        } else {
            for (i, o) in out.iter_mut().enumerate().take(12) {
                *o = u32at(&inode.block, i * 4) as u64;
            }
            let per = self.bs / 4;
            let mut base = 12u64;
            for level in 1..=3u32 {
                let ptr = u32at(&inode.block, (11 + level as usize) * 4) as u64;
                if base >= n {
                    break;
                }
                if ptr != 0 {
                    self.indirect(ptr, level, base, &mut out)?;
                }
                base = base.saturating_add(per.saturating_pow(level));
            }
        }
        Ok(out)
    }

    fn indirect(&self, blk: u64, level: u32, base: u64, out: &mut [u64]) -> Result<()> {
        let b = self.read_block(blk)?;
        let per = self.bs / 4;
        let span = per.saturating_pow(level - 1);
        for i in 0..per {
            let at = base.saturating_add(i.saturating_mul(span));
            if at >= out.len() as u64 {
                break;
            }
            let p = u32at(&b, i as usize * 4) as u64;
            if p == 0 {
                continue;
            }
            if level == 1 {
                out[at as usize] = p;
            } else {
                self.indirect(p, level - 1, at, out)?;
            }
        }
        Ok(())
    }

    fn extents(
        &self,
        node: &[u8],
        depth_left: u16,
        out: &mut [u64],
        budget: &mut u64,
    ) -> Result<()> {
        if u16at(node, 0) != 0xF30A {
            return Err(Error::corrupt("extent header: bad magic"));
        }
        let entries = u16at(node, 2) as usize;
        let depth = u16at(node, 6);
        if depth >= depth_left || 12 + entries * 12 > node.len() {
            return Err(Error::corrupt("extent tree: too deep or too many entries"));
        }
        for e in 0..entries {
            let o = 12 + e * 12;
            if depth > 0 {
                let leaf = u32at(node, o + 4) as u64 | (u16at(node, o + 8) as u64) << 32;
                if *budget == 0 {
                    return Err(Error::corrupt("extent tree: more nodes than blocks"));
                }
                *budget -= 1;
                let child = self.read_block(leaf)?;
                self.extents(&child, depth, out, budget)?;
            } else {
                let lblk = u32at(node, o) as u64;
                let mut len = u16at(node, o + 4) as u64;
                let uninit = len > 32768;
                if uninit {
                    len -= 32768;
                }
                let start = u32at(node, o + 8) as u64 | (u16at(node, o + 6) as u64) << 32;
                for i in 0..len {
                    let l = lblk + i;
                    if l >= out.len() as u64 {
                        break;
                    }
                    out[l as usize] = if uninit { 0 } else { start + i };
                }
            }
        }
        Ok(())
    }

    /// Names and inode numbers in directory inode `dir` (without `.` and `..`).
    pub fn entries(&self, dir: u32) -> Result<HashMap<Vec<u8>, u32>> {
        let inode = self.inode(dir)?;
        if inode.mode & 0o170000 != 0o040000 {
            return Err(Error::corrupt(format!("inode {dir}: not a directory")));
        }
        if inode.size > MAX_DIR_BYTES {
            return Err(Error::unsupported(format!(
                "inode {dir}: directory too large"
            )));
        }
        let n = inode.size.div_ceil(self.bs);
        let mut out = HashMap::new();
        for blk in self.blocks(&inode, n)? {
            if blk == 0 {
                continue;
            }
            let b = self.read_block(blk)?;
            let mut o = 0usize;
            while o + 8 <= b.len() {
                let ino = u32at(&b, o);
                let rec = u16at(&b, o + 4) as usize;
                let name_len = if self.filetype {
                    b[o + 6] as usize
                } else {
                    u16at(&b, o + 6) as usize
                };
                if rec < 8 || o + rec > b.len() || 8 + name_len > rec {
                    return Err(Error::corrupt(format!(
                        "directory inode {dir}: bad entry at block {blk} offset {o}"
                    )));
                }
                let name = &b[o + 8..o + 8 + name_len];
                if ino != 0 && !name.is_empty() && name != b"." && name != b".." {
                    out.insert(name.to_vec(), ino);
                }
                o += rec;
            }
        }
        Ok(out)
    }

    /// Inode number of directory `path` (absolute, no trailing slash except `/`).
    pub fn dir_ino(&self, path: &[u8]) -> Result<u32> {
        if path == b"/" || path.is_empty() {
            return Ok(ROOT);
        }
        if let Some(&i) = self.dirs.borrow().get(path) {
            return Ok(i);
        }
        let cut = path.iter().rposition(|&b| b == b'/').unwrap_or(0);
        let parent = self.dir_ino(if cut == 0 { b"/" } else { &path[..cut] })?;
        let ino = self.child(parent, &path[cut + 1..])?;
        self.dirs.borrow_mut().insert(path.to_vec(), ino);
        Ok(ino)
    }

    /// Inode number of `name` in directory inode `dir`.
    pub fn child(&self, dir: u32, name: &[u8]) -> Result<u32> {
        self.entries(dir)?
            .get(name)
            .copied()
            .ok_or_else(|| Error::not_found("name not in its directory's raw entries"))
    }
}

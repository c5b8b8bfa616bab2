//! VMDK images through vmdk-core (monolithicSparse, streamOptimized, monolithicFlat,
//! twoGbMaxExtentSparse/Flat, and delta disks with their parent chain).
//!
//! vmdk-core reads; allocation comes from each layer's grain tables
//! (`iter_allocated_grains`), united over the chain (parents found through
//! `parentFileNameHint`, loops and depth checked). A flat extent counts as allocated
//! throughout, a correct over-approximation.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vmdk::{VmdkChainReader, VmdkFileReader};

use super::{BlockSource, Extent, MAX_DISK_SIZE, SourceFormat, check_read, push_extent};
use crate::error::{Error, Result};

const MAX_CHAIN_DEPTH: usize = 64;

/// A VMDK image (and its parents, for a delta disk).
pub struct VmdkSource {
    path: PathBuf,
    reader: VmdkChainReader,
    size: u64,
    parent: Option<PathBuf>,
}

fn vmdk_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{}: {what}: {e}", path.display()))
}

/// `parentFileNameHint="…"` from a descriptor.
fn parent_hint(descriptor: &str) -> Option<String> {
    descriptor.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "parentFileNameHint").then(|| v.trim().trim_matches('"').to_string())
    })
}

impl VmdkSource {
    pub fn open(path: &Path) -> Result<VmdkSource> {
        // Open the top layer alone first: clearer errors for a broken file.
        let top = VmdkFileReader::open_path(path)
            .map_err(|e| vmdk_err(path, "cannot open VMDK image", e))?;
        let size = top.virtual_disk_size();
        if size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "{}: disk size {size} exceeds the limit of {MAX_DISK_SIZE} bytes",
                path.display()
            )));
        }
        let parent = (top.parent_cid() != 0xffff_ffff)
            .then(|| parent_hint(top.descriptor_text()))
            .flatten()
            .map(|h| path.parent().unwrap_or(Path::new(".")).join(h));
        drop(top);
        let reader =
            VmdkChainReader::open(path).map_err(|e| vmdk_err(path, "cannot open VMDK chain", e))?;
        if reader.virtual_disk_size() != size {
            return Err(Error::invalid(format!(
                "{}: VMDK chain size {} differs from the top layer's {size}",
                path.display(),
                reader.virtual_disk_size()
            )));
        }
        Ok(VmdkSource {
            path: path.to_path_buf(),
            reader,
            size,
            parent,
        })
    }

    /// Grains allocated in the top layer alone (a delta disk's change since its parent).
    pub fn top_layer_extents(&mut self) -> Result<Vec<Extent>> {
        let mut r = VmdkFileReader::open_path(&self.path)
            .map_err(|e| vmdk_err(&self.path, "cannot open VMDK image", e))?;
        layer_extents(&self.path, &mut r, self.size)
    }
}

fn layer_extents(path: &Path, r: &mut VmdkFileReader, size: u64) -> Result<Vec<Extent>> {
    let grains = r
        .iter_allocated_grains()
        .map_err(|e| vmdk_err(path, "reading grain tables", e))?;
    let mut out: Vec<Extent> = Vec::new();
    for g in grains {
        let offset = g.start_lba.saturating_mul(512);
        let end = offset
            .saturating_add(g.sector_count.saturating_mul(512))
            .min(size);
        if end <= offset {
            continue;
        }
        push_extent(&mut out, offset, end - offset);
    }
    Ok(out)
}

/// Union of two sorted, merged extent lists.
fn union(a: Vec<Extent>, b: Vec<Extent>) -> Vec<Extent> {
    let mut all: Vec<Extent> = a.into_iter().chain(b).collect();
    all.sort();
    let mut out: Vec<Extent> = Vec::with_capacity(all.len());
    for e in all {
        push_extent(&mut out, e.offset, e.length);
    }
    out
}

impl BlockSource for VmdkSource {
    fn format(&self) -> SourceFormat {
        SourceFormat::Vmdk
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_read(&self.path.display(), self.size, offset, buf.len())?;
        self.reader
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.reader.read_exact(buf))
            .map_err(|e| vmdk_err(&self.path, &format!("reading disk offset {offset}"), e))
    }

    fn backing(&self) -> Option<PathBuf> {
        self.parent.clone()
    }

    /// Grains allocated in the top layer alone (a delta disk's change since its parent).
    fn top_layer_extents(&mut self) -> Result<Vec<Extent>> {
        let mut r = VmdkFileReader::open_path(&self.path)
            .map_err(|e| vmdk_err(&self.path, "cannot open VMDK image", e))?;
        layer_extents(&self.path, &mut r, self.size)
    }

    fn allocated_extents(&mut self) -> Result<Vec<Extent>> {
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut path = self.path.clone();
        let mut out = Vec::new();
        loop {
            let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if seen.contains(&canon) || seen.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::invalid(format!(
                    "{}: VMDK parent chain loops or is deeper than {MAX_CHAIN_DEPTH}",
                    self.path.display()
                )));
            }
            seen.push(canon);
            let mut r = VmdkFileReader::open_path(&path)
                .map_err(|e| vmdk_err(&path, "cannot open VMDK layer", e))?;
            out = union(out, layer_extents(&path, &mut r, self.size)?);
            if r.parent_cid() == 0xffff_ffff {
                break;
            }
            let Some(hint) = parent_hint(r.descriptor_text()) else {
                // A delta without a parent hint: be safe, everything may be data.
                return Ok(vec![Extent {
                    offset: 0,
                    length: self.size,
                }]);
            };
            path = path.parent().unwrap_or(Path::new(".")).join(hint);
        }
        Ok(out)
    }
}

//! VMDK images through vmdk-core (monolithicSparse, streamOptimized, monolithicFlat,
//! twoGbMaxExtentSparse/Flat, and delta disks with their parent chain).
//!
//! vmdk-core reads; allocation comes from each layer's grain tables
//! (`iter_allocated_grains`), united over the chain (parents found through
//! `parentFileNameHint`, loops and depth checked). A flat extent counts as allocated
//! throughout, a correct over-approximation.
//!
//! Before vmdk-core parses a layer, [`descriptor`] checks its sparse header and
//! descriptor as strictly as QEMU does (a broken extent line, capacity 0: `InvalidFormat`),
//! and parents and extent files must lie in the top image's directory tree.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vmdk::{VmdkChainReader, VmdkFileReader};

use super::{
    BlockSource, Extent, MAX_DISK_SIZE, SourceFormat, check_read, confine, image_root, push_extent,
};
use crate::error::{Error, Result};

mod descriptor;

const MAX_CHAIN_DEPTH: usize = 64;

/// A VMDK image (and its parents, for a delta disk).
pub struct VmdkSource {
    path: PathBuf,
    reader: VmdkChainReader,
    size: u64,
    parent: Option<PathBuf>,
    /// The directory tree every parent and extent file must lie in.
    root: PathBuf,
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
        // Check every layer before vmdk-core parses it: clearer errors for a broken file,
        // and vmdk-core is never handed a descriptor QEMU refuses.
        let root = image_root(path)?;
        let mut size = None;
        let mut parent = None;
        let mut layer = path.to_path_buf();
        let mut seen: Vec<PathBuf> = Vec::new();
        loop {
            let canon = std::fs::canonicalize(&layer)
                .map_err(|e| Error::io(format!("resolving {}", layer.display()), e))?;
            if seen.contains(&canon) || seen.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::invalid(format!(
                    "{}: VMDK parent chain loops or is deeper than {MAX_CHAIN_DEPTH}",
                    path.display()
                )));
            }
            seen.push(canon);
            descriptor::check(&layer)?;
            let r = VmdkFileReader::open_path(&layer)
                .map_err(|e| vmdk_err(&layer, "cannot open VMDK image", e))?;
            let layer_size = r.virtual_disk_size();
            if layer_size == 0 {
                return Err(Error::invalid(format!(
                    "{}: VMDK disk of capacity 0; qemu-img refuses such an image too",
                    layer.display()
                )));
            }
            if layer_size > MAX_DISK_SIZE {
                return Err(Error::unsupported(format!(
                    "{}: disk size {layer_size} exceeds the limit of {MAX_DISK_SIZE} bytes",
                    layer.display()
                )));
            }
            size.get_or_insert(layer_size);
            let next = (r.parent_cid() != 0xffff_ffff)
                .then(|| parent_hint(r.descriptor_text()))
                .flatten()
                .map(|h| layer.parent().unwrap_or(Path::new(".")).join(h));
            let Some(next) = next else { break };
            confine(&root, &layer, "parent disk", &next)?;
            if parent.is_none() {
                parent = Some(next.clone());
            }
            layer = next;
        }
        let size = size.unwrap_or(0);
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
            root,
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
            let next = path.parent().unwrap_or(Path::new(".")).join(hint);
            confine(&self.root, &path, "parent disk", &next)?;
            path = next;
        }
        Ok(out)
    }
}

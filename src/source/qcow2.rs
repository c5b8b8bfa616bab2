//! qcow2 images through imago (plain, compressed clusters, backing chains).
//!
//! imago is opened read-only with [`ChainGate`], our own implicit-open gate, so that a
//! backing chain is followed but never written, and a chain that loops back on itself
//! or is deeper than [`MAX_CHAIN_DEPTH`] is refused instead of recursing forever.
//! Before imago sees a file, its header is checked here (magic, version, virtual size,
//! cluster bits, L1 table placement) so that absurd values from a hostile header give
//! a clear error. Allocation comes from imago's mappings over the whole chain (an
//! explicit zero cluster is not data).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::format::gate::ImplicitOpenGate;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, ShallowMapping, StorageOpenOptions};

use super::{BlockSource, Extent, MAX_DISK_SIZE, SourceFormat, check_read, open_file, push_extent};
use crate::error::{Error, Result};

/// Deepest backing chain we follow.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// A qcow2 image and its backing chain.
pub struct Qcow2Source {
    path: PathBuf,
    image: FormatAccess<ImagoFile>,
    size: u64,
    backing: Option<PathBuf>,
}

/// Implicit-open gate: read-only, loop- and depth-checked.
#[derive(Clone, Default)]
struct ChainGate {
    seen: Vec<PathBuf>,
}

impl ImplicitOpenGate<ImagoFile> for ChainGate {
    fn open_format<F: FormatDriverBuilder<ImagoFile>>(
        &mut self,
        builder: F,
    ) -> std::io::Result<FormatAccess<ImagoFile>> {
        let path = builder
            .get_image_path()
            .ok_or_else(|| std::io::Error::other("backing image without a path"))?;
        let canon = std::fs::canonicalize(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("backing file {}: {e}", path.display()))
        })?;
        if self.seen.contains(&canon) {
            return Err(std::io::Error::other(format!(
                "backing chain loops back to {}",
                canon.display()
            )));
        }
        if self.seen.len() >= MAX_CHAIN_DEPTH {
            return Err(std::io::Error::other(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH} images"
            )));
        }
        if F::FORMAT == imago::format::Format::Qcow2 {
            check_header(&canon).map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let mut next = self.clone();
        next.seen.push(canon);
        let inner = builder.write(false).open(next)?;
        Ok(FormatAccess::new(inner))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> std::io::Result<ImagoFile> {
        use imago::Storage;
        ImagoFile::open(opts.write(false))
    }
}

/// Check the fields of a qcow2 header that size allocations or point into the file.
fn check_header(path: &Path) -> Result<()> {
    let mut f = open_file(path)?;
    let file_len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?
        .len();
    let mut h = [0u8; 72];
    f.read_exact(&mut h)
        .map_err(|_| Error::invalid(format!("{}: truncated qcow2 header", path.display())))?;
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let be64 = |o: usize| {
        u64::from_be_bytes([
            h[o],
            h[o + 1],
            h[o + 2],
            h[o + 3],
            h[o + 4],
            h[o + 5],
            h[o + 6],
            h[o + 7],
        ])
    };
    let bad = |what: String| Err(Error::invalid(format!("{}: {what}", path.display())));
    if &h[..4] != b"QFI\xfb" {
        return bad("not a qcow2 image (bad magic)".into());
    }
    let version = be32(4);
    if version != 2 && version != 3 {
        return bad(format!("unsupported qcow2 version {version}"));
    }
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return bad(format!("qcow2 cluster_bits {cluster_bits} out of range"));
    }
    let size = be64(24);
    if size > MAX_DISK_SIZE {
        return Err(Error::unsupported(format!(
            "{}: disk size {size} exceeds the limit of {MAX_DISK_SIZE} bytes",
            path.display()
        )));
    }
    let cluster = 1u64 << cluster_bits;
    let l1_size = be32(36) as u64;
    let l1_offset = be64(40);
    // Entries needed to map `size` bytes: one L1 entry per L2 table of cluster/8 entries.
    let needed = size.div_ceil(cluster * (cluster / 8));
    if l1_size < needed || l1_size > needed.max(1) * 2 + 1024 {
        return bad(format!(
            "qcow2 L1 table of {l1_size} entries does not fit a {size}-byte disk"
        ));
    }
    if l1_offset % cluster != 0 || l1_offset.saturating_add(l1_size * 8) > file_len {
        return bad(format!(
            "qcow2 L1 table at offset {l1_offset} lies outside the {file_len}-byte file"
        ));
    }
    // Every L2 table the L1 table points to must lie inside the file.
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    f.seek(SeekFrom::Start(l1_offset))
        .and_then(|_| f.read_exact(&mut l1))
        .map_err(|e| Error::io(format!("{}: reading the qcow2 L1 table", path.display()), e))?;
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let l2 = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])
            & 0x00ff_ffff_ffff_fe00;
        if l2 != 0 && (l2 % cluster != 0 || l2.saturating_add(cluster) > file_len) {
            return bad(format!(
                "qcow2 L1 entry {i} points to an L2 table at offset {l2}, outside the {file_len}-byte file"
            ));
        }
    }
    Ok(())
}

impl Qcow2Source {
    pub fn open(path: &Path) -> Result<Qcow2Source> {
        check_header(path)?;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let gate = ChainGate { seen: vec![canon] };
        let qcow2 = Qcow2::<ImagoFile>::builder_path(path)
            .write(false)
            .open(gate)
            .map_err(|e| {
                Error::invalid(format!("{}: cannot open qcow2 image", path.display()))
                    .with_source(e)
            })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let backing = qcow2.implicit_backing_file().map(|b| dir.join(b));
        let image = FormatAccess::new(qcow2);
        let size = image.size();
        Ok(Qcow2Source {
            path: path.to_path_buf(),
            image,
            size,
            backing,
        })
    }

    /// The backing file named in the header, if any.
    pub fn backing_path(&self) -> Option<&Path> {
        self.backing.as_deref()
    }

    fn extents(&mut self, shallow: bool) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let max = self.size - pos;
            let (data, len) = if shallow {
                let (m, len) = self
                    .image
                    .get_shallow_mapping(pos, max)
                    .map_err(|e| self.err(pos, e))?;
                (matches!(m, ShallowMapping::Raw { .. }), len)
            } else {
                let (m, len) = self
                    .image
                    .get_mapping(pos, max)
                    .map_err(|e| self.err(pos, e))?;
                let data = match m {
                    Mapping::Zero { .. } | Mapping::Eof { .. } => false,
                    Mapping::Raw {
                        storage, offset, ..
                    } => {
                        use imago::Storage;
                        let file_len = storage.size().map_err(|e| self.err(pos, e))?;
                        if offset.saturating_add(len.min(max)) > file_len {
                            return Err(Error::invalid(format!(
                                "{}: disk offset {pos} maps to file bytes {offset}..{}, past the end of its {file_len}-byte image file",
                                self.path.display(),
                                offset.saturating_add(len.min(max))
                            )));
                        }
                        true
                    }
                    _ => true,
                };
                (data, len)
            };
            if len == 0 {
                return Err(Error::invalid(format!(
                    "{}: qcow2 mapping at offset {pos} has length 0",
                    self.path.display()
                )));
            }
            let len = len.min(max);
            if data {
                push_extent(&mut out, pos, len);
            }
            pos += len;
        }
        Ok(out)
    }

    fn err(&self, offset: u64, e: std::io::Error) -> Error {
        Error::invalid(format!(
            "{}: qcow2 metadata at disk offset {offset}",
            self.path.display()
        ))
        .with_source(e)
    }
}

impl BlockSource for Qcow2Source {
    fn format(&self) -> SourceFormat {
        SourceFormat::Qcow2
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_read(&self.path.display(), self.size, offset, buf.len())?;
        self.image.read(&mut *buf, offset).map_err(|e| {
            Error::invalid(format!(
                "{}: reading disk offset {offset}",
                self.path.display()
            ))
            .with_source(e)
        })
    }

    fn allocated_extents(&mut self) -> Result<Vec<Extent>> {
        self.extents(false)
    }

    fn backing(&self) -> Option<PathBuf> {
        self.backing.clone()
    }

    fn top_layer_extents(&mut self) -> Result<Vec<Extent>> {
        self.extents(true)
    }
}

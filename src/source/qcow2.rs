//! qcow2 images through imago (plain, compressed clusters, backing chains).
//!
//! imago is opened read-only with [`ChainGate`], our own implicit-open gate, so that a
//! backing chain is followed but never written, and a chain that loops back on itself
//! or is deeper than [`MAX_CHAIN_DEPTH`] is refused instead of recursing forever.
//! Before imago sees a file, the whole chain is checked here ([`header`]: every field
//! QEMU checks, the L1 table capped at QEMU's 32 MiB, L2 tables inside the file, no zero
//! flag in a version 2 image) and every backing or external data file must lie in the
//! top image's directory tree, so that a hostile header gives a clear error and never
//! makes us read an arbitrary host file. A valid image using a feature imago lacks
//! (zstd, encryption, extended L2, dirty bit) is `Unsupported`, naming the feature, so
//! that the caller can fall back to qemu-storage-daemon. Allocation comes from imago's mappings over the whole chain (an
//! explicit zero cluster is not data).

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::format::gate::ImplicitOpenGate;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, ShallowMapping, StorageOpenOptions};

use self::header::{Header, Names};
use super::{
    BlockSource, Extent, SourceFormat, check_read, confine, image_root, open_file, push_extent,
};
use crate::error::{Error, Result};

mod header;

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
#[derive(Clone)]
struct ChainGate {
    seen: Vec<PathBuf>,
    root: PathBuf,
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
            check_layer(&canon).map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let mut next = self.clone();
        next.seen.push(canon);
        let inner = builder.write(false).open(next)?;
        Ok(FormatAccess::new(inner))
    }

    /// Every file imago opens (the image, its backing files, external data files) must
    /// lie in the top image's directory tree.
    fn open_storage(&mut self, opts: StorageOpenOptions) -> std::io::Result<ImagoFile> {
        use imago::Storage;
        if let Some(name) = opts.get_filename() {
            confine(&self.root, name, "file", name)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        ImagoFile::open(opts.write(false))
    }
}

/// Check the image at `path` and every file its chain names before imago opens any of
/// them: each qcow2 header and its tables ([`header`]), and that backing and external
/// data files lie in the top image's directory tree after resolving symlinks
/// ([`confine`]). Outright refusals come first; a feature the native reader lacks
/// (`Unsupported`) is reported only once the whole chain has passed them, so that a
/// fallback reader is never pointed at a chain we refuse.
fn check_chain(path: &Path) -> Result<()> {
    let root = image_root(path)?;
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut unsupported: Option<Error> = None;
    let mut layer = path.to_path_buf();
    loop {
        let canon = std::fs::canonicalize(&layer)
            .map_err(|e| Error::io(format!("resolving {}", layer.display()), e))?;
        if seen.contains(&canon) {
            return Err(Error::invalid(format!(
                "{}: backing chain loops back to {}",
                path.display(),
                canon.display()
            )));
        }
        if seen.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "{}: backing chain deeper than {MAX_CHAIN_DEPTH} images",
                path.display()
            )));
        }
        seen.push(canon);
        let (hd, names) = check_layer(&layer).map_err(|e| e.context_prefix(layer.display()))?;
        if unsupported.is_none() {
            unsupported = hd.unsupported().map(|e| e.context_prefix(layer.display()));
        }
        let dir = layer.parent().unwrap_or(Path::new(".")).to_path_buf();
        if let Some(d) = &names.data_file {
            confine(&root, &layer, "external data file", &dir.join(d))?;
        }
        let Some(b) = &names.backing else { break };
        let next = dir.join(b);
        confine(&root, &layer, "backing file", &next)?;
        let qcow2 = match names.backing_format.as_deref() {
            Some("qcow2") => true,
            Some(_) => false,
            None => has_qcow2_magic(&next)?,
        };
        if !qcow2 {
            break;
        }
        layer = next;
    }
    unsupported.map_or(Ok(()), Err)
}

fn has_qcow2_magic(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let n = open_file(path)?
        .read(&mut magic)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(n == 4 && magic == *b"QFI\xfb")
}

/// Check one qcow2 file: its header ([`Header::parse`]), the names in its first cluster
/// and its L1/L2 tables.
fn check_layer(path: &Path) -> Result<(Header, Names)> {
    let f = open_file(path)?;
    let file_len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?
        .len();
    let mut h = vec![0u8; (header::PARSED_LEN as u64).min(file_len) as usize];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| Error::io(format!("reading the qcow2 header of {}", path.display()), e))?;
    let hd = Header::parse(&h)?;
    let mut first = vec![0u8; hd.cluster_size().min(file_len) as usize];
    f.read_exact_at(&mut first, 0).map_err(|e| {
        Error::io(
            format!("reading the first cluster of {}", path.display()),
            e,
        )
    })?;
    let names = header::names(&hd, &first)?;
    header::check_tables(&hd, &f, file_len)?;
    Ok((hd, names))
}

impl Qcow2Source {
    pub fn open(path: &Path) -> Result<Qcow2Source> {
        check_chain(path)?;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let gate = ChainGate {
            seen: vec![canon],
            root: image_root(path)?,
        };
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

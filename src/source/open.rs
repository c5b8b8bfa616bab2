//! Opening a source from a user's spec: format sniffing from magic bytes, or a forced
//! format with a `raw:`, `qcow2:` or `vmdk:` prefix.

use std::io::Read;
use std::path::Path;

use super::{BlockSource, NbdSource, Qcow2Source, RawSource, VmdkSource, open_file};
use crate::error::{Error, Result};
use crate::nbd::NbdUri;

/// Open the disk named by `spec`.
pub fn open_source(spec: &str) -> Result<Box<dyn BlockSource>> {
    open_source_with(spec, None)
}

/// Open the disk named by `spec`; for an NBD export, also negotiate the dirty bitmap
/// `bitmap`. A bitmap on an image file is refused (files carry no live bitmap).
pub fn open_source_with(spec: &str, bitmap: Option<&str>) -> Result<Box<dyn BlockSource>> {
    if NbdUri::is_nbd(spec) {
        return Ok(Box::new(NbdSource::open(spec, bitmap)?));
    }
    if let Some(b) = bitmap {
        return Err(Error::config(format!(
            "--bitmap {b} needs an NBD source (export the image with qemu-nbd -B {b})"
        )));
    }
    let (forced, path) = match spec.split_once(':') {
        Some((f @ ("raw" | "qcow2" | "vmdk"), rest)) => (Some(f), rest),
        _ => (None, spec),
    };
    let path = Path::new(path);
    let format = match forced {
        Some(f) => f,
        None => sniff(path)?,
    };
    Ok(match format {
        "qcow2" => Box::new(Qcow2Source::open(path)?),
        "vmdk" => Box::new(VmdkSource::open(path)?),
        _ => Box::new(RawSource::open(path)?),
    })
}

/// The format of the image at `path`, from its first bytes.
fn sniff(path: &Path) -> Result<&'static str> {
    let mut f = open_file(path)?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
    let head = &head[..n];
    Ok(if head.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        "vmdk"
    } else {
        "raw"
    })
}

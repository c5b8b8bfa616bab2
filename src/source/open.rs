//! Opening a source from a user's spec: an NBD URI, or an image file whose format is
//! detected by its magic bytes (`detect`), or forced with a `FORMAT:` prefix (`raw:`,
//! `qcow2:`, `vmdk:`, or any QEMU driver name of [`PREFIXES`]). A forced format is never
//! sniffed: `raw:PATH` is read as raw whatever its first sector says.
//!
//! Routing: raw files, qcow2 (imago) and VMDK (vmdk-core) are read natively; every other
//! format, and a qcow2/VMDK that uses a feature the native reader lacks (the reader says
//! `Unsupported`, or the qcow2 header shows zstd, encryption, ...), is read through a
//! private qemu-storage-daemon (`qemu`). An image file is opened only after QEMU's image
//! locks were checked and taken (`lock`): one open for writing elsewhere is refused
//! unless `force_inconsistent`.

use std::path::{Path, PathBuf};

use super::detect::{Detected, Route, detect};
use super::lock::lock_image;
use super::locked::Locked;
use super::{BlockSource, NbdSource, Qcow2Source, QemuImage, QemuSource, RawSource, VmdkSource};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::NbdUri;

/// Format names accepted as a `FORMAT:` prefix of an image path.
pub const PREFIXES: &[&str] = &[
    "raw",
    "qcow2",
    "vmdk",
    "vpc",
    "vhdx",
    "vdi",
    "qed",
    "qcow",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
    "luks",
];

/// How to open a source.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// NBD only: also negotiate this dirty bitmap.
    pub bitmap: Option<String>,
    /// Passphrase file of an encrypted image (LUKS, encrypted qcow2).
    pub secret_file: Option<PathBuf>,
    /// Read an image that another process holds open for writing (the copy is labelled
    /// inconsistent) instead of refusing it.
    pub force_inconsistent: bool,
    /// NBD over TLS (`nbds://`): the CA, client certificate and host name to verify.
    pub nbd_tls: Option<crate::nbd::NbdTlsClient>,
    /// Raised to give up while a qemu-storage-daemon is still starting.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Split `FORMAT:PATH` into the forced format and the path.
pub fn split_spec(spec: &str) -> (Option<&'static str>, &str) {
    if let Some((f, rest)) = spec.split_once(':')
        && let Some(p) = PREFIXES.iter().find(|p| **p == f)
    {
        return (Some(p), rest);
    }
    (None, spec)
}

/// Open the disk named by `spec`.
pub fn open_source(spec: &str) -> Result<Box<dyn BlockSource>> {
    open_source_opts(spec, &OpenOptions::default())
}

/// Open the disk named by `spec`; for an NBD export, also negotiate the dirty bitmap
/// `bitmap`. A bitmap on an image file is refused (files carry no live bitmap).
pub fn open_source_with(spec: &str, bitmap: Option<&str>) -> Result<Box<dyn BlockSource>> {
    let opts = OpenOptions {
        bitmap: bitmap.map(str::to_owned),
        ..OpenOptions::default()
    };
    open_source_opts(spec, &opts)
}

/// Open the disk named by `spec` with `opts`.
pub fn open_source_opts(spec: &str, opts: &OpenOptions) -> Result<Box<dyn BlockSource>> {
    if NbdUri::is_nbd(spec) {
        return Ok(Box::new(NbdSource::open_tls(
            spec,
            opts.bitmap.as_deref(),
            opts.nbd_tls.as_ref(),
        )?));
    }
    if opts
        .nbd_tls
        .as_ref()
        .is_some_and(|t| *t != Default::default())
    {
        return Err(Error::config(format!(
            "NBD TLS settings were given for {spec}, which is not an nbds:// URI"
        )));
    }
    if let Some(b) = &opts.bitmap {
        return Err(Error::config(format!(
            "--bitmap {b} needs an NBD source (export the image with qemu-nbd -B {b})"
        )));
    }
    let (forced, path) = split_spec(spec);
    let path = Path::new(path);
    let lock = lock_image(path, opts.force_inconsistent)?;
    let detected = match forced {
        None => detect(path)?,
        Some(f) => forced_route(f, path)?,
    };
    let no_locking = lock.inconsistent.is_some();
    let inner = open_detected(path, &detected, opts, no_locking)?;
    Ok(Box::new(Locked { inner, lock }))
}

/// The route for a format the user forced: never sniffed for raw; a forced qcow2 or
/// VMDK still has its header looked at so that its features pick the reader.
fn forced_route(f: &'static str, path: &Path) -> Result<Detected> {
    let native = |format, route| Detected { format, route };
    Ok(match f {
        "raw" => native("raw", Route::Raw),
        "qcow2" | "vmdk" => {
            let d = detect(path)?;
            if d.format == f {
                d
            } else if f == "qcow2" {
                native("qcow2", Route::NativeQcow2)
            } else {
                native("vmdk", Route::NativeVmdk)
            }
        }
        other => Detected {
            format: other,
            route: Route::Qemu {
                driver: other,
                encryption: (other == "luks").then_some(super::detect::Encryption::Luks),
                why: format!("{other} forced by its prefix"),
            },
        },
    })
}

fn open_detected(
    path: &Path,
    d: &Detected,
    opts: &OpenOptions,
    no_locking: bool,
) -> Result<Box<dyn BlockSource>> {
    let fallback = |driver: &'static str, encryption, why: &str| -> Result<Box<dyn BlockSource>> {
        tracing::info!(path = %path.display(), driver, "{why}: reading through qemu-storage-daemon");
        Ok(Box::new(QemuSource::open(&QemuImage {
            path,
            driver,
            encryption,
            secret_file: opts.secret_file.as_deref(),
            no_locking,
            cancel: opts.cancel.as_deref(),
        })?))
    };
    match &d.route {
        Route::Raw => Ok(Box::new(RawSource::open(path)?)),
        Route::NativeQcow2 => match Qcow2Source::open(path) {
            Ok(s) => Ok(Box::new(s)),
            Err(e) if e.kind() == ErrorKind::Unsupported => fallback("qcow2", None, &e.to_string()),
            Err(e) => Err(e),
        },
        Route::NativeVmdk => match VmdkSource::open(path) {
            Ok(s) => Ok(Box::new(s)),
            Err(e) if e.kind() == ErrorKind::Unsupported => fallback("vmdk", None, &e.to_string()),
            Err(e) => Err(e),
        },
        Route::Qemu {
            driver,
            encryption,
            why,
        } => {
            // A qcow2 or VMDK whose header asks for the daemon is still checked by the
            // strict native reader first: what QEMU refuses, or a chain file outside the
            // image's tree, is refused here and never handed to the daemon; only what the
            // native reader calls `Unsupported` goes on to QEMU.
            let native: Option<Result<Box<dyn BlockSource>>> = match *driver {
                "qcow2" => Some(Qcow2Source::open(path).map(|s| Box::new(s) as _)),
                "vmdk" => Some(VmdkSource::open(path).map(|s| Box::new(s) as _)),
                _ => None,
            };
            match native {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) if e.kind() != ErrorKind::Unsupported => Err(e),
                _ => fallback(driver, *encryption, why),
            }
        }
    }
}

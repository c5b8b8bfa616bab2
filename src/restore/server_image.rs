//! Full-server images: every disk of a (server) backup as one importable image.
//!
//! - `ova`: `<dir>/<server>.ova` (or `--to X.ova`), a tar archive of, in this order, the OVF descriptor,
//!   the manifest (`.mf`, SHA256 of every file) and one streamOptimized VMDK per disk
//!   (what ESXi, vCenter, VirtualBox and ovftool import).
//! - `qcow2-set`: `<dir>/` (new or empty) holding `<disk>.qcow2` per disk and `server.json` describing
//!   the server (backup id and name, capture, each disk's file, size and id).
//!
//! The OVF descriptor ([`super::ovf`]) describes the VM's vCPUs, memory and disk
//! controllers as a live capture recorded them (`capture.hardware`), else placeholders
//! (1 vCPU, 1 GiB, LSI Logic SCSI) to adjust at import. Everything is built under a hidden staging name (see
//! [`super::partial`]) and renamed into place at the end; on failure or cancel nothing
//! is left. Files get the restore's mode (default `0600`), the qcow2-set directory and
//! any directory the export creates `0700`. The backup is only read.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::partial::{create_private_dir, staging_name, sweep_dir};
use super::{
    ImageFormat, RestoreOptions, RestoreStats, Subformat, create_private, restore_disk_with,
    safe_file_name,
};
use crate::backup::BackupOptions;
use crate::error::{Error, IoContext, Result};
use crate::manifest::BackupManifest;
use crate::vault::Vault;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

/// Kind of full-server image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerImage {
    Ova,
    Qcow2Set,
}

impl std::str::FromStr for ServerImage {
    type Err = Error;
    fn from_str(s: &str) -> Result<ServerImage> {
        match s {
            "ova" => Ok(ServerImage::Ova),
            "qcow2-set" => Ok(ServerImage::Qcow2Set),
            o => Err(Error::config(format!(
                "unknown server image {o:?} (ova or qcow2-set)"
            ))),
        }
    }
}

/// What an export produced.
#[derive(Debug, Clone, Serialize)]
pub struct ServerExport {
    /// The OVA file or the qcow2-set directory.
    pub path: PathBuf,
    pub disks: Vec<String>,
    pub bytes_written: u64,
}

fn staging(dir: &Path, name: &str) -> PathBuf {
    dir.join(staging_name(name))
}

/// Export every disk of backup `m` as a server image into directory `dir`.
pub fn export_server(
    vault: &Vault,
    m: &BackupManifest,
    dir: &Path,
    kind: ServerImage,
    opts: &BackupOptions,
    ropts: &RestoreOptions,
) -> Result<ServerExport> {
    let server = safe_file_name(&m.resource);
    // qcow2-set: `dir` itself (absent or empty). OVA: `dir` if it ends in .ova, else
    // `dir/<server>.ova`.
    let (target, ext) = match kind {
        ServerImage::Ova if dir.extension().is_some_and(|e| e == "ova") => {
            (dir.to_path_buf(), "vmdk")
        }
        ServerImage::Ova => {
            create_private_dir(dir)?;
            (dir.join(format!("{server}.ova")), "vmdk")
        }
        ServerImage::Qcow2Set => (dir.to_path_buf(), "qcow2"),
    };
    let empty_dir = target.is_dir() && fs::read_dir(&target).is_ok_and(|mut d| d.next().is_none());
    if target.exists() && !(kind == ServerImage::Qcow2Set && empty_dir) {
        return Err(Error::conflict(format!(
            "{} already exists; restore never overwrites",
            target.display()
        )));
    }
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    sweep_dir(&parent)?;
    let disk_opts = RestoreOptions {
        size: None,
        ..*ropts
    };
    let work = staging(&parent, &server);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .ctx(|| format!("creating {}", work.display()))?;

    let result = (|| -> Result<ServerExport> {
        let mut files = Vec::new();
        let mut written = 0;
        for d in &m.disks {
            let file = format!("{}.{ext}", safe_file_name(&d.name));
            let format = match kind {
                ServerImage::Ova => ImageFormat::Vmdk(Subformat::StreamOptimized),
                ServerImage::Qcow2Set => ImageFormat::Qcow2,
            };
            let stats = restore_disk_with(vault, d, &work.join(&file), format, opts, &disk_opts)
                .map_err(|e| e.context_prefix(format!("disk {}", d.name)))?;
            let RestoreStats { bytes_written, .. } = stats;
            written += bytes_written;
            files.push(file);
        }
        match kind {
            ServerImage::Qcow2Set => {
                let desc = server_json(m, &files);
                let json = work.join("server.json");
                create_private(&json)
                    .and_then(|mut f| f.write_all(desc.as_bytes()).ctx(|| "writing server.json"))?;
                fs::set_permissions(&json, fs::Permissions::from_mode(ropts.mode))
                    .ctx(|| "setting the mode of server.json")?;
                if empty_dir {
                    fs::remove_dir(&target).ctx(|| format!("replacing {}", target.display()))?;
                }
                super::partial::rename_noreplace(&work, &target)?;
            }
            ServerImage::Ova => {
                let ovf_name = format!("{server}.ovf");
                let ovf = super::ovf::descriptor(m, &server, &work, &files)?;
                let tmp = staging(&parent, &format!("{server}.ova"));
                let r = write_ova(&tmp, &server, &ovf_name, &ovf, &work, &files).and_then(|()| {
                    fs::set_permissions(&tmp, fs::Permissions::from_mode(ropts.mode))
                        .ctx(|| format!("setting the mode of {}", tmp.display()))
                });
                if r.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                r?;
                if let Err(e) = super::partial::rename_noreplace(&tmp, &target) {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                let _ = fs::remove_dir_all(&work);
            }
        }
        Ok(ServerExport {
            path: target.clone(),
            disks: m.disks.iter().map(|d| d.name.clone()).collect(),
            bytes_written: written,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&work);
    }
    result
}

fn server_json(m: &BackupManifest, files: &[String]) -> String {
    let disks: Vec<serde_json::Value> = m
        .disks
        .iter()
        .zip(files)
        .map(|(d, f)| {
            serde_json::json!({"name": d.name, "file": f, "format": "qcow2", "size": d.size,
                               "disk_id": d.disk_id, "source": d.source})
        })
        .collect();
    let v = serde_json::json!({
        "server": m.resource,
        "backup": {"id": m.id, "name": m.name, "created": m.created},
        "capture": m.capture,
        "disks": disks,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Write the OVA tar: descriptor first, manifest second, then the disks.
fn write_ova(
    path: &Path,
    server: &str,
    ovf_name: &str,
    ovf: &str,
    work: &Path,
    files: &[String],
) -> Result<()> {
    let out = create_private(path)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(out));
    let mut mf = format!("SHA256({ovf_name})= {}\n", hex::encode(Sha256::digest(ovf)));
    for f in files {
        mf.push_str(&format!("SHA256({f})= {}\n", sha256_file(&work.join(f))?));
    }
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, data)
            .ctx(|| format!("adding {name} to the OVA"))
    };
    add(ovf_name, ovf.as_bytes())?;
    add(&format!("{server}.mf"), mf.as_bytes())?;
    for f in files {
        let p = work.join(f);
        let mut file = fs::File::open(&p).ctx(|| format!("opening {}", p.display()))?;
        let len = file.metadata().ctx(|| "sizing a disk")?.len();
        let mut h = tar::Header::new_ustar();
        h.set_size(len);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, f, &mut file)
            .ctx(|| format!("adding {f} to the OVA"))?;
    }
    let mut w = tar.into_inner().ctx(|| "finishing the OVA")?;
    w.flush().ctx(|| "flushing the OVA")?;
    w.into_inner()
        .map_err(|e| Error::io("flushing the OVA", e.into_error()))?
        .sync_all()
        .ctx(|| "syncing the OVA")
}

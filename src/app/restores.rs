//! Getting backups back: one [`RestoreRequest`] says what to restore and where, and
//! [`App::run_restore`] picks the way — a new image, every disk of a server into a
//! directory, a full-server image (OVA, qcow2 set), or onto an existing disk over NBD —
//! so that the CLI and the HTTP API offer exactly the same restores.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{App, pick_disk};
use crate::backup::BackupOptions;
use crate::error::{Error, Result};
use crate::manifest::ResourceKind;
use crate::restore::onto::{OntoStats, restore_onto_nbd};
use crate::restore::server_image::{ServerExport, ServerImage, export_server};
use crate::restore::{ImageFormat, RestoreStats, restore_disk, safe_file_name};

/// What to restore and where; the shape of `POST /api/v1/restores`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Backup id or name.
    pub backup: String,
    /// One disk of a multi-disk backup (by name or disk id). Without it a server
    /// backup restores every disk into directory `to`.
    #[serde(default)]
    pub disk: Option<String>,
    /// New image path, a directory (server backups, `image`), or an NBD URI.
    pub to: String,
    /// raw (default), qcow2, vmdk / vmdk-sparse, vmdk-stream.
    #[serde(default)]
    pub format: Option<String>,
    /// Size of the new disk in bytes: may grow it, never shrink it.
    #[serde(default)]
    pub size: Option<u64>,
    /// Full-server image: ova or qcow2-set.
    #[serde(default)]
    pub image: Option<String>,
    /// With an NBD target: the target's dirty bitmap since the backup.
    #[serde(default)]
    pub target_bitmap: Option<String>,
}

/// One disk restored into a directory.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRestored {
    pub disk: String,
    pub to: PathBuf,
    #[serde(flatten)]
    pub stats: RestoreStats,
}

/// What a restore did, by the way it went (`"mode"` in JSON).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum RestoreOutcome {
    /// One disk into a new image.
    Image {
        disk: String,
        to: PathBuf,
        #[serde(flatten)]
        stats: RestoreStats,
    },
    /// Every disk of a server backup into a directory.
    Directory {
        to: PathBuf,
        disks: Vec<DiskRestored>,
    },
    /// A full-server image.
    ServerImage(ServerExport),
    /// Onto an existing disk over NBD.
    Onto {
        to: String,
        #[serde(flatten)]
        stats: OntoStats,
    },
}

impl App {
    /// Carry out `req`. Nothing is ever overwritten but an NBD target, which is
    /// what a restore onto a disk is for.
    pub fn run_restore(
        &self,
        req: &RestoreRequest,
        opts: &BackupOptions,
    ) -> Result<RestoreOutcome> {
        if let Some(kind) = &req.image {
            if req.disk.is_some() || req.format.is_some() || req.size.is_some() {
                return Err(Error::config(
                    "a full-server image takes every disk in its own format: drop disk, format and size",
                ));
            }
            let kind: ServerImage = kind.parse()?;
            return self
                .export_server(&req.backup, Path::new(&req.to), kind, opts)
                .map(RestoreOutcome::ServerImage);
        }
        if crate::nbd::NbdUri::is_nbd(&req.to) {
            if req.format.is_some() || req.size.is_some() {
                return Err(Error::config(
                    "a restore onto an NBD export keeps the export's format and size",
                ));
            }
            let stats = self.restore_onto(
                &req.backup,
                req.disk.as_deref(),
                &req.to,
                req.target_bitmap.as_deref(),
                opts,
            )?;
            return Ok(RestoreOutcome::Onto {
                to: req.to.clone(),
                stats,
            });
        }
        if req.target_bitmap.is_some() {
            return Err(Error::config(
                "a target bitmap applies to a restore onto an NBD export",
            ));
        }
        let format: ImageFormat = req.format.as_deref().unwrap_or("raw").parse()?;
        let to = Path::new(&req.to);
        let m = self.find_backup(&req.backup)?.manifest;
        if req.disk.is_none() && (m.resource_kind == ResourceKind::Server || m.disks.len() > 1) {
            if req.size.is_some() {
                return Err(Error::config(
                    "a size applies to one disk: name it with disk",
                ));
            }
            let disks = self.restore_all(&req.backup, to, format, opts)?;
            return Ok(RestoreOutcome::Directory {
                to: to.to_path_buf(),
                disks,
            });
        }
        let disk = pick_disk(&m, req.disk.as_deref())?.name.clone();
        let stats = self.restore(&req.backup, Some(&disk), to, format, req.size, opts)?;
        Ok(RestoreOutcome::Image {
            disk,
            to: to.to_path_buf(),
            stats,
        })
    }

    /// Export every disk of a backup as a full-server image (OVA or qcow2 set).
    pub fn export_server(
        &self,
        id_or_name: &str,
        dir: &Path,
        kind: ServerImage,
        opts: &BackupOptions,
    ) -> Result<ServerExport> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let _pin = vault.pin(&[&entry.manifest])?;
        export_server(&vault, &entry.manifest, dir, kind, opts)
    }

    /// Restore every disk of a backup into directory `dir` as `<disk name>.<format>`.
    /// Stops at the first failure (disks
    /// restored before it stay; the failed one leaves nothing).
    pub fn restore_all(
        &self,
        id_or_name: &str,
        dir: &Path,
        format: ImageFormat,
        opts: &BackupOptions,
    ) -> Result<Vec<DiskRestored>> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let _pin = vault.pin(&[&entry.manifest])?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let targets: Vec<PathBuf> = entry
            .manifest
            .disks
            .iter()
            .map(|d| {
                dir.join(format!(
                    "{}.{}",
                    safe_file_name(&d.name),
                    format.extension()
                ))
            })
            .collect();
        if let Some(t) = targets.iter().find(|t| t.exists()) {
            return Err(Error::conflict(format!(
                "{} already exists; restore never overwrites a file",
                t.display()
            )));
        }
        let mut out = Vec::new();
        for (d, to) in entry.manifest.disks.iter().zip(targets) {
            let stats = restore_disk(&vault, d, &to, format, None, opts)
                .map_err(|e| e.context_prefix(format!("disk {}", d.name)))?;
            out.push(DiskRestored {
                disk: d.name.clone(),
                to,
                stats,
            });
        }
        Ok(out)
    }

    /// Restore one disk (default: the first) of a backup onto the NBD export at `uri`,
    /// writing only the chunks that differ.
    pub fn restore_onto(
        &self,
        id_or_name: &str,
        disk: Option<&str>,
        uri: &str,
        target_bitmap: Option<&str>,
        opts: &BackupOptions,
    ) -> Result<OntoStats> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let d = pick_disk(&entry.manifest, disk)?;
        let _pin = vault.pin(&[&entry.manifest])?;
        restore_onto_nbd(&vault, d, uri, target_bitmap, opts)
    }

    /// Serve one disk (default: the first) of a backup read-only over NBD until `stop`.
    pub fn serve_nbd(
        &self,
        id_or_name: &str,
        disk: Option<&str>,
        listener: &crate::nbd::server::Listener,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        let entry = self.find_backup(id_or_name)?;
        let vault = std::sync::Arc::new(self.open_vault(&entry.vault)?);
        let d = pick_disk(&entry.manifest, disk)?;
        let _pin = vault.pin(&[&entry.manifest])?;
        crate::instant::serve_backup(vault, d, listener, stop)
    }

    /// Restore one disk (default: the first) of a backup into a new image.
    pub fn restore(
        &self,
        id_or_name: &str,
        disk: Option<&str>,
        to: &Path,
        format: ImageFormat,
        size: Option<u64>,
        opts: &BackupOptions,
    ) -> Result<RestoreStats> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let d = pick_disk(&entry.manifest, disk)?;
        // GC must not delete what the restore is about to read.
        let _pin = vault.pin(&[&entry.manifest])?;
        restore_disk(&vault, d, to, format, size, opts)
    }
}

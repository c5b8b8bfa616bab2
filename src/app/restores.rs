//! Getting backups back: one [`RestoreRequest`] says what to restore and where, and
//! [`App::run_restore`] picks the way — a new image, every disk of a server into a
//! directory, a full-server image (OVA, qcow2 set), or onto an existing disk over NBD —
//! so that the CLI and the HTTP API offer exactly the same restores.
//!
//! While a restore into files runs, a record in `<data>/restores/` (named after the
//! owner, see [`crate::restore::partial`]) names the directories it writes into, so that
//! `serve` can sweep the partial output of a restore that was killed; the record is
//! removed when the restore ends, however it ends.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{App, pick_disk};
use crate::backup::BackupOptions;
use crate::error::{Error, Result};
use crate::manifest::ResourceKind;
use crate::restore::onto::{OntoStats, restore_onto_nbd};
use crate::restore::partial::{self, create_private_dir};
use crate::restore::server_image::{ServerExport, ServerImage, export_server};
use crate::restore::{
    BadRange, ImageFormat, RestoreOptions, RestoreStats, parse_mode, restore_disk_with,
    safe_file_name,
};

/// What to restore and where; the shape of `POST /api/v1/restores`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// raw, qcow2, vmdk / vmdk-sparse, vmdk-stream. Default: from the extension of
    /// `to` (`.qcow2`, `.vmdk`, `.ova` = a full-server OVA, `.raw`/`.img`), else raw.
    /// A format the extension contradicts is refused (`.img` takes any format).
    #[serde(default)]
    pub format: Option<String>,
    /// Write `format` even when the extension of `to` names another one.
    #[serde(default)]
    pub force_format: bool,
    /// Size of the new disk in bytes: may grow it, never shrink it.
    #[serde(default)]
    pub size: Option<u64>,
    /// Full-server image: ova or qcow2-set.
    #[serde(default)]
    pub image: Option<String>,
    /// With an NBD target: the target's dirty bitmap since the backup.
    #[serde(default)]
    pub target_bitmap: Option<String>,
    /// Permission bits of the new files, octal (default `0600`; directories the
    /// restore creates are `0700`).
    #[serde(default)]
    pub mode: Option<String>,
    /// Write everything readable, leave unreadable chunks as zeros, list their disk
    /// ranges (`bad_ranges`) and keep the image; the restore still counts as failed.
    #[serde(default)]
    pub keep_going: bool,
    /// With an `nbds://` target: how to verify the NBD server (CA, optional client
    /// certificate; paths on the machine that runs the restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub nbd_tls: Option<crate::nbd::NbdTlsClient>,
    /// Replace an existing regular file at `to` (one raw or qcow2 image): the new image
    /// is staged beside it and renamed over it at the end, so a failed restore leaves
    /// the old file. A symlink, directory or other file type at `to` is never replaced.
    /// Through the API only an admin token may ask for it. Not sent when false, so the
    /// remote CLI reaches an appliance that predates it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite: bool,
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

impl RestoreOutcome {
    /// The ranges a `keep_going` restore left as zeros, with the image they are in.
    pub fn bad_ranges(&self) -> Vec<(&Path, &BadRange)> {
        fn per_disk<'a>(to: &'a Path, st: &'a RestoreStats) -> Vec<(&'a Path, &'a BadRange)> {
            st.bad_ranges.iter().map(|r| (to, r)).collect()
        }
        match self {
            RestoreOutcome::Image { to, stats, .. } => per_disk(to, stats),
            RestoreOutcome::Directory { disks, .. } => disks
                .iter()
                .flat_map(|d| per_disk(&d.to, &d.stats))
                .collect(),
            RestoreOutcome::ServerImage(_) | RestoreOutcome::Onto { .. } => Vec::new(),
        }
    }
}

/// The format the extension of `to` names: an [`ImageFormat`] name, or `ova` for a
/// full-server image.
fn format_of_extension(to: &str) -> Option<&'static str> {
    let ext = Path::new(to).extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "qcow2" => "qcow2",
        "vmdk" => "vmdk",
        "ova" => "ova",
        "raw" | "img" => "raw",
        _ => return None,
    })
}

impl App {
    /// `req` made explicit: the backup as its full id (`latest` of `disk`, or a unique id
    /// prefix, resolved), and the image format taken from the extension of `to` when none
    /// is given. A format that contradicts the extension is refused unless
    /// `force_format`: `x.qcow2` holding raw bytes would mislead whoever opens it.
    pub fn resolve_restore(&self, req: &RestoreRequest) -> Result<RestoreRequest> {
        let mut r = req.clone();
        let entry = self.resolve_backup(&req.backup, req.disk.as_deref())?;
        if req.backup == "latest" && req.disk.as_deref() == Some(entry.manifest.resource.as_str()) {
            // --disk named the resource, not one disk inside it.
            r.disk = None;
        }
        r.backup = entry.manifest.id;
        if crate::nbd::NbdUri::is_nbd(&req.to) || r.image.is_some() {
            return Ok(r);
        }
        let Some(implied) = format_of_extension(&req.to) else {
            return Ok(r);
        };
        match &r.format {
            None if implied == "ova" => r.image = Some("ova".into()),
            None => r.format = Some(implied.into()),
            // `.img` is any disk image (cloud images are qcow2 named .img): it implies
            // raw only when no format is given.
            Some(_) if implied == "raw" && req.to.to_ascii_lowercase().ends_with(".img") => {}
            Some(f) => {
                let asked: ImageFormat = f.parse()?;
                if asked.extension() != implied && !r.force_format {
                    return Err(Error::config(format!(
                        "{} names a {implied} image but format {f} was asked: name the file \
                         for its format (.{}), drop the format to take {implied}, or force \
                         it (--force-format; force_format in the API)",
                        req.to,
                        asked.extension()
                    )));
                }
            }
        }
        Ok(r)
    }

    /// Carry out `req`. Nothing is ever overwritten but an NBD target, which is
    /// what a restore onto a disk is for.
    pub fn run_restore(
        &self,
        req: &RestoreRequest,
        opts: &BackupOptions,
    ) -> Result<RestoreOutcome> {
        let req = &self.resolve_restore(req)?;
        let ropts = RestoreOptions {
            mode: match &req.mode {
                Some(m) => parse_mode(m)?,
                None => crate::restore::DEFAULT_MODE,
            },
            keep_going: req.keep_going,
            size: None,
            overwrite: req.overwrite,
        };
        if crate::nbd::NbdUri::is_nbd(&req.to) {
            if req.overwrite {
                return Err(Error::config(
                    "overwrite applies to image files; a restore onto an NBD export always writes it",
                ));
            }
            if req.format.is_some() || req.size.is_some() {
                return Err(Error::config(
                    "a restore onto an NBD export keeps the export's format and size",
                ));
            }
            if req.mode.is_some() || req.keep_going {
                return Err(Error::config(
                    "mode and keep_going apply to new images, not to a restore onto an NBD export",
                ));
            }
        } else {
            let to = Path::new(&req.to);
            let _record = RestoreRecord::create(&self.data, &[to, &partial::parent_dir(to)])?;
            return self.restore_to_files(req, opts, &ropts);
        }
        if req.image.is_some() {
            return Err(Error::config(
                "a full-server image is written into a directory, not onto an NBD export",
            ));
        }
        let mut opts = opts.clone();
        if req.nbd_tls.is_some() {
            opts.nbd_tls = req.nbd_tls.clone();
        }
        let stats = self.restore_onto(
            &req.backup,
            req.disk.as_deref(),
            &req.to,
            req.target_bitmap.as_deref(),
            &opts,
        )?;
        Ok(RestoreOutcome::Onto {
            to: req.to.clone(),
            stats,
        })
    }

    /// Remove the partial output of restores that were killed (their records in
    /// `<data>/restores/` name the directories); run at `serve` start. Returns what was
    /// removed.
    pub fn sweep_dead_restores(&self) -> Result<Vec<PathBuf>> {
        let dir = self.data.join("restores");
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if partial::tag_alive(&name) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| !l.is_empty()) {
                removed.extend(partial::sweep_dir(Path::new(line))?);
            }
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(removed)
    }

    /// Does this backup restore into a directory of disks (a server, or several disks)?
    fn is_multi_disk(&self, backup: &str) -> Result<bool> {
        let m = self.find_backup(backup)?.manifest;
        Ok(m.resource_kind == ResourceKind::Server || m.disks.len() > 1)
    }

    fn restore_to_files(
        &self,
        req: &RestoreRequest,
        opts: &BackupOptions,
        ropts: &RestoreOptions,
    ) -> Result<RestoreOutcome> {
        if req.overwrite
            && (req.image.is_some() || req.disk.is_none() && self.is_multi_disk(&req.backup)?)
        {
            return Err(Error::config(
                "overwrite applies to one disk image file, not to a directory of disks or a full-server image",
            ));
        }
        if let Some(kind) = &req.image {
            if req.keep_going {
                return Err(Error::config(
                    "keep_going applies to disk images, not to full-server images",
                ));
            }
            if req.disk.is_some() || req.format.is_some() || req.size.is_some() {
                return Err(Error::config(
                    "a full-server image takes every disk in its own format: drop disk, format and size",
                ));
            }
            let kind: ServerImage = kind.parse()?;
            return self
                .export_server(&req.backup, Path::new(&req.to), kind, opts, ropts)
                .map(RestoreOutcome::ServerImage);
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
            let disks = self.restore_all(&req.backup, to, format, opts, ropts)?;
            return Ok(RestoreOutcome::Directory {
                to: to.to_path_buf(),
                disks,
            });
        }
        let disk = pick_disk(&m, req.disk.as_deref())?.name.clone();
        let stats = self.restore(
            &req.backup,
            Some(&disk),
            to,
            format,
            opts,
            &RestoreOptions {
                size: req.size,
                ..*ropts
            },
        )?;
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
        ropts: &RestoreOptions,
    ) -> Result<ServerExport> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let _pin = vault.pin(&[&entry.manifest])?;
        export_server(&vault, &entry.manifest, dir, kind, opts, ropts)
    }

    /// Restore every disk of a backup into directory `dir` (created `0700` if missing)
    /// as `<disk name>.<format>`. Stops at the first failure (disks restored before it
    /// stay; the failed one leaves nothing; with `keep_going` only a failure to write
    /// stops it).
    pub fn restore_all(
        &self,
        id_or_name: &str,
        dir: &Path,
        format: ImageFormat,
        opts: &BackupOptions,
        ropts: &RestoreOptions,
    ) -> Result<Vec<DiskRestored>> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let _pin = vault.pin(&[&entry.manifest])?;
        create_private_dir(dir)?;
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
            let whole = RestoreOptions {
                size: None,
                ..*ropts
            };
            let stats = restore_disk_with(&vault, d, &to, format, opts, &whole)
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

    /// Serve one disk (default: the first) of a backup read-only over NBD until `stop`;
    /// `secret`: the export's only name (see `instant::serve_backup_as`), else the disk's.
    pub fn serve_nbd(
        &self,
        id_or_name: &str,
        disk: Option<&str>,
        listener: &crate::nbd::server::Listener,
        stop: &std::sync::atomic::AtomicBool,
        tls: Option<&crate::nbd::NbdTlsServer>,
        secret: Option<&str>,
    ) -> Result<()> {
        let entry = self.find_backup(id_or_name)?;
        let vault = std::sync::Arc::new(self.open_vault(&entry.vault)?);
        let d = pick_disk(&entry.manifest, disk)?;
        let _pin = vault.pin(&[&entry.manifest])?;
        crate::instant::serve_backup_as(vault, d, listener, stop, tls, secret)
    }

    /// Restore one disk (default: the first) of a backup into a new image.
    pub fn restore(
        &self,
        id_or_name: &str,
        disk: Option<&str>,
        to: &Path,
        format: ImageFormat,
        opts: &BackupOptions,
        ropts: &RestoreOptions,
    ) -> Result<RestoreStats> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let d = pick_disk(&entry.manifest, disk)?;
        // GC must not delete what the restore is about to read.
        let _pin = vault.pin(&[&entry.manifest])?;
        restore_disk_with(&vault, d, to, format, opts, ropts)
    }
}

/// `<data>/restores/<owner>-<random>`: the directories a running restore writes into,
/// one per line; removed on drop.
struct RestoreRecord {
    path: PathBuf,
}

impl RestoreRecord {
    fn create(data: &Path, dirs: &[&Path]) -> Result<RestoreRecord> {
        let dir = data.join("restores");
        create_private_dir(&dir)?;
        let path = dir.join(format!(
            "{}-{}",
            partial::owner_tag(),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let mut text = String::new();
        for d in dirs {
            let abs = std::path::absolute(d)
                .map_err(|e| Error::io(format!("resolving {}", d.display()), e))?;
            text.push_str(&abs.to_string_lossy());
            text.push('\n');
        }
        let mut f = crate::restore::create_private(&path)?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(RestoreRecord { path })
    }
}

impl Drop for RestoreRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

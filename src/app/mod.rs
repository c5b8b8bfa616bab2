//! The appliance's operations on a data dir: the catalog plus its vaults.
//!
//! The CLI and the HTTP API call these; each one keeps the catalog and the vaults
//! in step (a backup is recorded in the catalog after its manifest is in the vault; a
//! delete removes the manifest first). The data dir holds `catalog.sqlite` and, by
//! default, `vaults/<name>/`.

use std::path::{Path, PathBuf};

use serde::Serialize;

mod restores;
pub use restores::{DiskRestored, RestoreOutcome, RestoreRequest};

use crate::backup::{BackupOptions, DiskJob, backup_disk, backup_resource};
use crate::catalog::{BackupEntry, Catalog, VaultEntry};
use crate::cbt::ChangeHint;
use crate::chunk::ChunkSize;
use crate::error::{Error, Result};
use crate::freeze::FreezeHooks;
use crate::live::{LiveOptions, backup_live, disk_id};
use crate::manifest::{BackupManifest, DiskManifest};
use crate::manifest::{Capture, ResourceKind};
use crate::source::open_source_with;
use crate::vault::Vault;
use crate::vault::gc::{GcStats, gc};
use crate::vault::verify::{VerifyReport, verify};

/// An open data dir.
pub struct App {
    data: PathBuf,
    catalog: Catalog,
}

/// Usage figures of a vault.
#[derive(Debug, Clone, Serialize)]
pub struct VaultInfo {
    pub name: String,
    pub path: String,
    pub id: String,
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub backups: usize,
    /// Sum of the backups' virtual disk sizes.
    pub logical_bytes: u64,
    /// Stored (compressed) blob bytes.
    pub stored_bytes: u64,
    /// Bytes of pack files on disk.
    pub pack_bytes: u64,
    pub packs: usize,
    pub dedup_ratio: f64,
    pub capacity: Option<u64>,
}

impl App {
    pub fn open(data: &Path) -> Result<App> {
        Ok(App {
            data: data.to_path_buf(),
            catalog: Catalog::open(data)?,
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Create a vault named `name` at `path` (default `<data>/vaults/<name>`).
    pub fn create_vault(
        &self,
        name: &str,
        path: Option<&Path>,
        chunk_size: ChunkSize,
        zstd_level: i32,
    ) -> Result<VaultEntry> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Error::config(format!(
                "vault name {name:?} must be letters, digits, '-', '_' or '.'"
            )));
        }
        if self.catalog.vault(name).is_ok() {
            return Err(Error::conflict(format!(
                "a vault named {name:?} already exists"
            )));
        }
        let path = path.map_or_else(|| self.data.join("vaults").join(name), Path::to_path_buf);
        let vault = Vault::create(&path, chunk_size, zstd_level)?;
        let entry = VaultEntry {
            name: name.into(),
            path: std::fs::canonicalize(&path).unwrap_or(path),
            vault_id: vault.config().id.clone(),
            chunk_size: chunk_size.bytes(),
            created: vault.config().created.clone(),
        };
        self.catalog.add_vault(&entry)?;
        Ok(entry)
    }

    /// Register an existing vault (e.g. on a new appliance, or a vault on a NAS) and
    /// rebuild the catalog's view of it. Returns the number of backups found.
    pub fn attach_vault(&mut self, name: &str, path: &Path) -> Result<usize> {
        let vault = Vault::open(path)?;
        let entry = VaultEntry {
            name: name.into(),
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            vault_id: vault.config().id.clone(),
            chunk_size: vault.chunk_size().bytes(),
            created: vault.config().created.clone(),
        };
        self.catalog.add_vault(&entry)?;
        self.rescan(name)
    }

    /// Set (or clear) a vault's capacity limit in stored bytes.
    pub fn set_capacity(&self, name: &str, capacity: Option<u64>) -> Result<()> {
        let mut vault = self.open_vault(name)?;
        vault.set_capacity(capacity)
    }

    /// Forget a vault: the catalog drops it and its backups; its files stay (it can be
    /// attached again).
    pub fn forget_vault(&self, name: &str) -> Result<()> {
        self.catalog.vault(name)?;
        self.catalog.remove_vault(name)
    }

    pub fn open_vault(&self, name: &str) -> Result<Vault> {
        Vault::open(&self.catalog.vault(name)?.path)
    }

    pub fn vault_info(&self, name: &str) -> Result<VaultInfo> {
        let entry = self.catalog.vault(name)?;
        let vault = Vault::open(&entry.path)?;
        let lookup = vault.lookup()?;
        let (pack_bytes, packs) = vault.stored_bytes(&lookup)?;
        let stored_bytes = lookup.stored_blob_bytes()?;
        let backups = self.catalog.backups(Some(name), None)?;
        let logical_bytes: u64 = backups.iter().map(|b| b.manifest.logical_size()).sum();
        Ok(VaultInfo {
            name: entry.name,
            path: entry.path.display().to_string(),
            id: vault.config().id.clone(),
            chunk_size: vault.chunk_size().bytes(),
            zstd_level: vault.config().zstd_level,
            backups: backups.len(),
            logical_bytes,
            stored_bytes,
            pack_bytes,
            packs,
            dedup_ratio: if stored_bytes == 0 {
                0.0
            } else {
                logical_bytes as f64 / stored_bytes as f64
            },
            capacity: vault.config().capacity,
        })
    }

    /// Rebuild the catalog's view of a vault (and the vault's lookup index) from the
    /// vault itself. Returns the number of backups found.
    pub fn rescan(&mut self, name: &str) -> Result<usize> {
        let vault = self.open_vault(name)?;
        vault.lookup()?.rebuild(vault.store().as_ref())?;
        let manifests = vault.manifests()?;
        self.catalog.replace_backups(name, &manifests)?;
        Ok(manifests.len())
    }

    /// Back up the disk at `source_spec` into vault `vault_name`.
    pub fn backup(
        &self,
        source_spec: &str,
        vault_name: &str,
        opts: &BackupOptions,
    ) -> Result<BackupManifest> {
        let vault = self.open_vault(vault_name)?;
        let bitmap = match &opts.change {
            crate::cbt::ChangeHint::Bitmap(b) => Some(b.as_str()),
            _ => None,
        };
        let source = open_source_with(source_spec, bitmap)?;
        let mut opts = opts.clone();
        let disk_id = opts
            .disk_id
            .get_or_insert_with(|| default_disk_id(source_spec))
            .clone();
        self.name_backup(vault_name, &disk_id, &mut opts)?;
        let m = backup_disk(&vault, source, &opts)?;
        self.catalog.put_backup(vault_name, &m)?;
        Ok(m)
    }

    /// Give `opts` a backup name unless it has one: `manualbk_<time>`, with `_2`, `_3`…
    /// when one-off backups of the resource fall within the same second.
    fn name_backup(&self, vault: &str, resource: &str, opts: &mut BackupOptions) -> Result<()> {
        if opts.name.is_none() {
            let base = crate::manifest::manual_name();
            let mut name = base.clone();
            let mut n = 1;
            while self.catalog.name_taken(vault, resource, &name)? {
                n += 1;
                name = format!("{base}_{n}");
            }
            opts.name = Some(name);
        }
        Ok(())
    }

    /// Back up server `server` made of image files (`(disk name, source spec)`), all disks
    /// as one backup. Freeze hooks, if any, run before the first disk is read and thaw
    /// after the last: image files have no instant of their own.
    pub fn backup_server_files(
        &self,
        server: &str,
        vault_name: &str,
        disks: &[(String, String)],
        hooks: &FreezeHooks,
        opts: &BackupOptions,
    ) -> Result<BackupManifest> {
        let vault = self.open_vault(vault_name)?;
        let mut opts = opts.clone();
        self.name_backup(vault_name, server, &mut opts)?;
        let mut jobs = Vec::new();
        for (name, spec) in disks {
            jobs.push(DiskJob {
                name: name.clone(),
                disk_id: disk_id(server, name),
                source: open_source_with(spec, None)?,
                change: match &opts.change {
                    ChangeHint::SinceBase => ChangeHint::SinceBase,
                    _ => ChangeHint::Auto,
                },
                next_checkpoint: None,
                note: None,
            });
        }
        let mut frozen = hooks.freeze(server, opts.cancel.as_deref());
        if let Err(e) = crate::backup::check_cancel(&opts) {
            frozen.thaw();
            return Err(e);
        }
        let mut capture = || {
            frozen.thaw();
            let (consistency, note, steps) = frozen.outcome();
            Some(Capture {
                method: "image-files".into(),
                consistency,
                note,
                snapshot_at: None,
                steps,
            })
        };
        let m = backup_resource(
            &vault,
            server,
            ResourceKind::Server,
            jobs,
            &mut capture,
            &opts,
        )?;
        self.catalog.put_backup(vault_name, &m)?;
        Ok(m)
    }

    /// Back up all disks (or `live.nodes`) of a running QEMU at one instant.
    pub fn backup_live(
        &self,
        server: &str,
        vault_name: &str,
        live: &LiveOptions,
        opts: &BackupOptions,
    ) -> Result<BackupManifest> {
        let vault = self.open_vault(vault_name)?;
        let mut opts = opts.clone();
        self.name_backup(vault_name, server, &mut opts)?;
        let m = backup_live(&vault, server, live, &opts)?;
        self.catalog.put_backup(vault_name, &m)?;
        Ok(m)
    }

    pub fn find_backup(&self, id_or_name: &str) -> Result<BackupEntry> {
        self.catalog.find_backup(id_or_name)
    }

    /// Stored bytes only this backup references: what deleting it (and GC) would free.
    /// Walks every backup of its vault (the index pages of each are read once).
    pub fn exclusive_bytes(&self, entry: &BackupEntry) -> Result<u64> {
        use crate::vault::walk::{WalkItem, walk_disk};
        use std::collections::HashSet;
        let vault = self.open_vault(&entry.vault)?;
        let lookup = vault.lookup()?;
        let collect =
            |m: &BackupManifest, set: &mut HashSet<crate::chunk::ChunkDigest>| -> Result<()> {
                let mut visited = HashSet::new();
                for d in &m.disks {
                    walk_disk(&vault, &lookup, d, &mut visited, &mut |item| {
                        match item {
                            WalkItem::Root(r) => {
                                set.insert(r);
                            }
                            WalkItem::Page { digest, .. } => {
                                set.insert(digest);
                            }
                            WalkItem::Chunks(c) => set.extend(c.iter().map(|(_, d)| *d)),
                            WalkItem::Damaged { .. } => {}
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            };
        let mut mine = HashSet::new();
        collect(&entry.manifest, &mut mine)?;
        let mut others = HashSet::new();
        for b in self.catalog.backups(Some(&entry.vault), None)? {
            if b.manifest.id != entry.manifest.id {
                collect(&b.manifest, &mut others)?;
            }
        }
        let mut bytes = 0;
        for d in mine.difference(&others) {
            if let Some(loc) = lookup.get(d)? {
                bytes += u64::from(loc.length);
            }
        }
        Ok(bytes)
    }

    /// Delete a backup: its manifest goes; GC frees what nothing else uses.
    pub fn delete_backup(&self, id_or_name: &str) -> Result<BackupManifest> {
        let entry = self.find_backup(id_or_name)?;
        if self.catalog.is_protected(&entry.manifest.id)? {
            return Err(Error::conflict(format!(
                "backup {} is protected; unprotect it first",
                entry.manifest.name
            )));
        }
        let vault = self.open_vault(&entry.vault)?;
        match vault.delete_manifest(&entry.manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.catalog.remove_backup(&entry.manifest.id)?;
        Ok(entry.manifest)
    }

    pub fn gc(&self, vault_name: &str, repack_below: u8) -> Result<GcStats> {
        let vault = self.open_vault(vault_name)?;
        gc(&vault, repack_below)
    }

    /// Verify a whole vault, or one backup.
    pub fn verify(
        &self,
        vault_name: &str,
        backup: Option<&str>,
        threads: usize,
    ) -> Result<VerifyReport> {
        let vault = self.open_vault(vault_name)?;
        match backup {
            None => verify(&vault, None, threads),
            Some(b) => {
                let entry = self.find_backup(b)?;
                if entry.vault != vault_name {
                    return Err(Error::config(format!(
                        "backup {b} is in vault {}, not {vault_name}",
                        entry.vault
                    )));
                }
                verify(&vault, Some(std::slice::from_ref(&entry.manifest)), threads)
            }
        }
    }
}

/// Disk `name` (by name or disk id) of a backup, or its first disk.
fn pick_disk<'m>(m: &'m BackupManifest, name: Option<&str>) -> Result<&'m DiskManifest> {
    match name {
        None => m.disks.first(),
        Some(n) => m.disks.iter().find(|d| d.name == n || d.disk_id == n),
    }
    .ok_or_else(|| Error::not_found(format!("backup {} has no disk {name:?}", m.name)))
}

/// The disk id used when none is given: the source path made absolute (so that the
/// same image backed up from two working directories is one disk).
pub fn default_disk_id(spec: &str) -> String {
    let (prefix, path) = match spec.split_once(':') {
        Some((p, rest)) if ["raw", "qcow2", "vmdk"].contains(&p) => (Some(p), rest),
        _ => (None, spec),
    };
    if crate::nbd::NbdUri::is_nbd(spec) {
        return spec.to_string();
    }
    let abs =
        std::fs::canonicalize(path).map_or_else(|_| path.to_string(), |p| p.display().to_string());
    match prefix {
        Some(p) => format!("{p}:{abs}"),
        None => abs,
    }
}

//! The appliance's operations on a data dir: the catalog plus its vaults.
//!
//! The CLI and the HTTP API call these; each one keeps the catalog and the vaults
//! in step (a backup is recorded in the catalog after its manifest is in the vault; a
//! delete removes the manifest first). The vault is the truth: a backup whose catalog
//! write still fails after retries is reported as done with a warning
//! ([`App::take_warnings`]) and reaches the catalog at the next `vault rescan`.
//! `views.rs` holds the JSON shapes the API and the CLI's `--json` share; `figures.rs`
//! computes the costly figures (usage, bytes only one backup holds) off the request path
//! and caches them in the catalog; `drills.rs` boots backups in throwaway VMs and records
//! the result; `replicate.rs` copies backups between vaults and makes replica vaults. The data dir holds `catalog.sqlite`, by default `vaults/<name>/`, and the
//! drills' logs and screenshots in `drills/<backup-id>/`.

use std::path::{Path, PathBuf};

use serde::Serialize;

mod drills;
mod figures;
mod files;
mod keys;
mod locks;
mod replicate;
mod restores;
mod views;
pub use figures::{FigureRefresher, Freshness};
pub use files::FilesSession;
pub use keys::{KeyView, new_keyfile, set_configured_key_files};
pub use locks::cli_actor;
pub use replicate::{ReplicaSelection, ReplicateReport, ReplicatedBackup};
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
use crate::source::{open_source_opts, split_spec};
use crate::vault::Vault;
use crate::vault::gc::{GcStats, gc};
use crate::vault::verify::{VerifyReport, verify};

/// An open data dir.
pub struct App {
    data: PathBuf,
    catalog: Catalog,
    /// Warnings of the last operations, for the caller to show (see [`App::take_warnings`]).
    warnings: std::sync::Mutex<Vec<String>>,
    /// The key given for encrypted vaults (see `keys`).
    key: Option<crate::vault::keys::KeySecret>,
}

/// Usage figures of a vault.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    /// Compliance mode: every backup locked at least this many days (see `vault::retention`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compliance_days: Option<u32>,
    /// Blobs and manifests are sealed (AES-256-GCM under the vault key).
    pub encrypted: bool,
    /// Encrypted: how many wrappings of the vault key vault.toml holds.
    pub key_wrappings: usize,
    /// Encrypted: the appliance's key store holds a key file of this vault (scheduled
    /// backups run unattended).
    pub key_stored: bool,
    /// When the pack and stored figures were computed (RFC 3339): the service serves
    /// them from the catalog and refreshes them after backups, deletes and GC.
    pub usage_computed_at: String,
}

impl App {
    pub fn open(data: &Path) -> Result<App> {
        private_data_dir(data)?;
        Ok(App {
            data: data.to_path_buf(),
            catalog: Catalog::open(data)?,
            warnings: std::sync::Mutex::new(Vec::new()),
            key: None,
        })
    }

    /// The warnings raised since the last call (e.g. a backup committed in its vault that
    /// the catalog could not record), oldest first.
    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }

    /// Record a committed backup in the catalog. The manifest is already durable in the
    /// vault, so the backup exists whatever happens here: the write is tried three times,
    /// and if it still fails the backup is reported as done with a warning (the catalog
    /// learns of it at the next `vault rescan`), never as failed.
    fn record_backup(&self, vault: &str, m: &BackupManifest) {
        let mut last = None;
        for wait_ms in [0u64, 200, 1000] {
            std::thread::sleep(std::time::Duration::from_millis(wait_ms));
            match self.catalog.put_backup(vault, m) {
                Ok(()) => {
                    self.refresh_usage_logged(vault);
                    return;
                }
                Err(e) => last = Some(e),
            }
        }
        let why = last.map(|e| e.to_string()).unwrap_or_default();
        let w = format!(
            "backup {} is committed in vault {vault}, but the catalog was not updated ({why}): \
             free space in the data dir, then run `blockvault vault rescan {vault}`",
            m.id
        );
        tracing::warn!("{w}");
        if let Ok(mut ws) = self.warnings.lock() {
            ws.push(w);
        }
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
        self.create_vault_with(name, path, chunk_size, zstd_level, None, None)
    }

    /// [`App::create_vault`], in compliance mode with `compliance_days` (every backup
    /// locked at least that long; fixed for the vault's life); with `encrypt`, an
    /// encrypted vault whose key that secret wraps.
    pub fn create_vault_with(
        &self,
        name: &str,
        path: Option<&Path>,
        chunk_size: ChunkSize,
        zstd_level: i32,
        compliance_days: Option<u32>,
        encrypt: Option<&crate::vault::keys::KeySecret>,
    ) -> Result<VaultEntry> {
        crate::name::Name::parse(name, "vault")?;
        if path.is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(Error::config(format!(
                "vault {name}: the path is empty; give a directory, or none for \
                 <data>/vaults/{name}"
            )));
        }
        if self.catalog.vault(name).is_ok() {
            return Err(Error::conflict(format!(
                "a vault named {name:?} already exists"
            )));
        }
        let path = path.map_or_else(|| self.data.join("vaults").join(name), Path::to_path_buf);
        let vault = Vault::create_with(&path, chunk_size, zstd_level, compliance_days, encrypt)?;
        self.register_vault(name, path, &vault)
    }

    /// Name `vault` (just created or attached at `path`) in the catalog.
    pub(crate) fn register_vault(
        &self,
        name: &str,
        path: PathBuf,
        vault: &Vault,
    ) -> Result<VaultEntry> {
        let entry = VaultEntry {
            name: name.into(),
            path: std::fs::canonicalize(&path).unwrap_or(path),
            vault_id: vault.config().id.clone(),
            chunk_size: vault.chunk_size().bytes(),
            created: vault.config().created.clone(),
        };
        self.catalog.add_vault(&entry)?;
        Ok(entry)
    }

    /// Create a vault named `name` on S3-compatible object storage; its local state goes
    /// to `<data>/vaults/<name>` (see `vault::remote`).
    pub fn create_vault_s3(
        &self,
        name: &str,
        location: &crate::vault::store::S3Location,
        chunk_size: ChunkSize,
        zstd_level: i32,
    ) -> Result<VaultEntry> {
        self.create_vault_s3_with(name, location, chunk_size, zstd_level, None, None)
    }

    /// [`App::create_vault_s3`] in compliance mode with `compliance_days`, encrypted with
    /// the vault key `encrypt` gives (a new one: `VaultKey::generate()`), wrapped by its
    /// secret.
    pub fn create_vault_s3_with(
        &self,
        name: &str,
        location: &crate::vault::store::S3Location,
        chunk_size: ChunkSize,
        zstd_level: i32,
        compliance_days: Option<u32>,
        encrypt: Option<(&crate::vault::keys::KeySecret, crate::chunk::VaultKey)>,
    ) -> Result<VaultEntry> {
        self.create_vault_s3_named(
            name,
            location,
            None,
            chunk_size,
            zstd_level,
            compliance_days,
            encrypt,
        )
    }

    /// [`App::create_vault_s3_with`], the credentials taken from the config file's
    /// `[s3.NAME]` that `profile` names (remembered by the vault) when given.
    #[allow(clippy::too_many_arguments)]
    pub fn create_vault_s3_named(
        &self,
        name: &str,
        location: &crate::vault::store::S3Location,
        profile: Option<&crate::vault::remote::S3Profile>,
        chunk_size: ChunkSize,
        zstd_level: i32,
        compliance_days: Option<u32>,
        encrypt: Option<(&crate::vault::keys::KeySecret, crate::chunk::VaultKey)>,
    ) -> Result<VaultEntry> {
        crate::name::Name::parse(name, "vault")?;
        if self.catalog.vault(name).is_ok() {
            return Err(Error::conflict(format!(
                "a vault named {name:?} already exists"
            )));
        }
        let state = self.data.join("vaults").join(name);
        let vault = crate::vault::remote::create_with(
            &state,
            location,
            profile,
            chunk_size,
            zstd_level,
            compliance_days,
            encrypt,
        )?;
        self.register_vault(name, state, &vault)
    }

    /// Attach the vault at an S3 `location` (e.g. on a new appliance) under `name` and
    /// rebuild its catalog and lookup cache from the bucket alone. Returns the number of
    /// backups found.
    pub fn attach_vault_s3(
        &mut self,
        name: &str,
        location: &crate::vault::store::S3Location,
    ) -> Result<usize> {
        self.attach_vault_s3_named(name, location, None)
    }

    /// [`App::attach_vault_s3`] with the credentials of the config file's `[s3.NAME]`
    /// that `profile` names (remembered by the vault) when given.
    pub fn attach_vault_s3_named(
        &mut self,
        name: &str,
        location: &crate::vault::store::S3Location,
        profile: Option<&crate::vault::remote::S3Profile>,
    ) -> Result<usize> {
        crate::name::Name::parse(name, "vault")?;
        if self.catalog.vault(name).is_ok() {
            return Err(Error::conflict(format!(
                "a vault named {name:?} already exists"
            )));
        }
        let state = self.data.join("vaults").join(name);
        let mut vault = crate::vault::remote::attach_with(&state, location, profile)?;
        // An encrypted vault is attached only with a key that opens it.
        if let Err(e) = self.unlock(name, &mut vault) {
            crate::vault::remote::detach(&state);
            return Err(e);
        }
        self.register_vault(name, state, &vault)?;
        self.rescan(name)
    }

    /// Register an existing vault (e.g. on a new appliance, or a vault on a NAS) and
    /// rebuild the catalog's view of it. Returns the number of backups found.
    pub fn attach_vault(&mut self, name: &str, path: &Path) -> Result<usize> {
        let mut vault = Vault::open(path)?;
        // An encrypted vault is attached only with a key that opens it.
        self.unlock(name, &mut vault)?;
        self.register_vault(name, path.to_path_buf(), &vault)?;
        self.rescan(name)
    }

    /// Set (or clear) a vault's capacity limit in stored bytes.
    pub fn set_capacity(&self, name: &str, capacity: Option<u64>) -> Result<()> {
        // vault.toml only: no key needed.
        let mut vault = Vault::open(&self.catalog.vault(name)?.path)?;
        vault.set_capacity(capacity)?;
        self.refresh_usage_logged(name);
        Ok(())
    }

    /// Forget a vault: the catalog drops it and its backups; its files stay (it can be
    /// attached again).
    pub fn forget_vault(&self, name: &str) -> Result<()> {
        self.catalog.vault(name)?;
        self.catalog.remove_vault(name)
    }

    /// Open vault `name`, unlocked when it is encrypted (`KeyRequired` / `WrongKey`
    /// at once when no key that opens it is at hand: see `keys`).
    pub fn open_vault(&self, name: &str) -> Result<Vault> {
        let mut v = Vault::open(&self.catalog.vault(name)?.path)?;
        self.unlock(name, &mut v)?;
        Ok(v)
    }

    /// A vault's usage, computed now from its files (and cached for the service; see
    /// [`App::vault_info_cached`]).
    pub fn vault_info(&self, name: &str) -> Result<VaultInfo> {
        let f = self.refresh_usage(name)?;
        self.vault_info_from(name, f)
    }

    /// Rebuild the catalog's view of a vault (and the vault's lookup index) from the
    /// vault itself. Returns the number of backups found.
    pub fn rescan(&mut self, name: &str) -> Result<usize> {
        let vault = self.open_vault(name)?;
        vault.lookup()?.rebuild(vault.store().as_ref())?;
        let manifests = vault.manifests()?;
        self.catalog.replace_backups(name, &manifests)?;
        if let Err(e) = self.sync_protection(name) {
            // The backups are known; deletes stay refused while the journal is damaged.
            let w = format!("vault {name}: protections not read from its lock journal: {e}");
            tracing::warn!("{w}");
            if let Ok(mut ws) = self.warnings.lock() {
                ws.push(w);
            }
        }
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
        self.sweep_dead_live_runs();
        let bitmap = match &opts.change {
            crate::cbt::ChangeHint::Bitmap(b) => Some(b.as_str()),
            _ => None,
        };
        let source = open_source_opts(source_spec, &opts.open_options(bitmap))?;
        let mut opts = opts.clone();
        let disk_id = opts
            .disk_id
            .get_or_insert_with(|| default_disk_id(source_spec))
            .clone();
        self.name_backup(vault_name, &disk_id, &mut opts)?;
        let m = backup_disk(&vault, source, &opts)?;
        self.record_backup(vault_name, &m);
        Ok(m)
    }

    /// Files of live backups that died with their VM (see `live::sweep_dead_runs`): every
    /// backup removes them, so they do not wait for the next live backup.
    fn sweep_dead_live_runs(&self) {
        for what in crate::live::sweep_dead_runs(&self.data.join("locks").join("live")) {
            tracing::warn!("removed a leftover of a live backup that died with its QEMU: {what}");
        }
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
        opts.started.get_or_insert_with(std::time::Instant::now);
        self.sweep_dead_live_runs();
        self.name_backup(vault_name, server, &mut opts)?;
        let mut jobs = Vec::new();
        for (name, spec) in disks {
            jobs.push(DiskJob {
                name: name.clone(),
                disk_id: disk_id(server, name),
                source: open_source_opts(spec, &opts.open_options(None))?,
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
            frozen.check_thawed()?;
            return Err(e);
        }
        frozen.check()?;
        let mut capture = || {
            frozen.thaw();
            let (consistency, note, steps) = frozen.outcome();
            Some(Capture {
                method: "image-files".into(),
                consistency,
                note,
                snapshot_at: None,
                steps,
                hardware: None,
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
        self.record_backup(vault_name, &m);
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
        let mut live = live.clone();
        live.lock_dir
            .get_or_insert_with(|| self.data.join("locks").join("live"));
        let m = backup_live(&vault, server, &live, &opts)?;
        self.record_backup(vault_name, &m);
        Ok(m)
    }

    /// Back up every disk of a running libvirt domain at one instant (libvirt's backup
    /// API, pull mode).
    pub fn backup_libvirt(
        &self,
        server: &str,
        vault_name: &str,
        lv: &crate::libvirt::LibvirtOptions,
        opts: &BackupOptions,
    ) -> Result<BackupManifest> {
        let vault = self.open_vault(vault_name)?;
        let mut opts = opts.clone();
        self.name_backup(vault_name, server, &mut opts)?;
        let m = crate::libvirt::backup_libvirt(&vault, server, lv, &opts)?;
        self.record_backup(vault_name, &m);
        Ok(m)
    }

    /// A backup by id, unique id prefix or name.
    pub fn find_backup(&self, id_or_name: &str) -> Result<BackupEntry> {
        if id_or_name == "latest" {
            return self.resolve_backup(id_or_name, None);
        }
        self.catalog.find_backup(id_or_name)
    }

    /// A backup by id, unique id prefix or name, or `latest` of `disk` (a disk id or
    /// server name, or the disk id of one disk of a server backup).
    pub fn resolve_backup(&self, spec: &str, disk: Option<&str>) -> Result<BackupEntry> {
        if spec != "latest" {
            return self.catalog.find_backup(spec);
        }
        let Some(d) = disk else {
            return Err(Error::config(
                "`latest` needs a disk: add --disk DISK_ID (a disk id or server name, as \
                 `backups list` shows them)",
            ));
        };
        if let Some(b) = self.catalog.backups(None, Some(d))?.pop() {
            return Ok(b);
        }
        self.catalog
            .backups(None, None)?
            .into_iter()
            .rfind(|b| b.manifest.disks.iter().any(|x| x.disk_id == d))
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no backup of disk {d:?}: `backups list` shows the disk ids"
                ))
            })
    }

    /// Delete a backup: its manifest goes; GC frees what nothing else uses.
    pub fn delete_backup(&self, id_or_name: &str) -> Result<BackupManifest> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let catalog_protected = self.catalog.is_protected(&entry.manifest.id)?;
        crate::vault::retention::delete_unless_held(&vault, &entry.manifest, catalog_protected)?;
        self.catalog.remove_backup(&entry.manifest.id)?;
        self.refresh_usage_logged(&entry.vault);
        Ok(entry.manifest)
    }

    pub fn gc(&self, vault_name: &str, repack_below: u8) -> Result<GcStats> {
        let vault = self.open_vault(vault_name)?;
        let stats = gc(&vault, repack_below)?;
        self.refresh_usage_logged(vault_name);
        Ok(stats)
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
/// same image backed up from two working directories is one disk). A `FORMAT:` prefix is
/// not part of it: `raw:/x` and `/x` are the same disk, whose format is remembered by its
/// backups (a change is refused).
pub fn default_disk_id(spec: &str) -> String {
    if crate::nbd::NbdUri::is_nbd(spec) {
        return spec.to_string();
    }
    let (_, path) = split_spec(spec);
    std::fs::canonicalize(path).map_or_else(|_| path.to_string(), |p| p.display().to_string())
}

/// Create the data dir `0700`, or make an existing one `0700`: it holds the catalog,
/// API tokens and (by default) the vaults, none of which is anyone else's business.
fn private_data_dir(data: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::restore::partial::create_private_dir(data)?;
    let meta = std::fs::metadata(data)
        .map_err(|e| Error::io(format!("reading data dir {}", data.display()), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %data.display(), "data dir was open to others; made it 0700");
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("making data dir {} private", data.display()), e))?;
    }
    Ok(())
}

//! Replication between the appliance's vaults: which backups, the replica vault, and the
//! catalog of the target learning each replica as soon as its manifest landed (so
//! `backups list --vault TARGET` and `restore` work at once). The copying is
//! `replicate`'s.

use std::path::Path;

use serde::Serialize;

use super::App;
use crate::catalog::VaultEntry;
use crate::error::{Error, Result};
use crate::replicate::{
    ReplicaStats, ReplicaTarget, ReplicateOptions, VaultTarget, replicate_backup,
};
use crate::vault::Vault;
use crate::vault::keys::{self, KeySecret};

/// Which backups of the source vault to replicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaSelection {
    /// One backup (id, unique id prefix or name).
    Backup(String),
    /// Every backup of one resource (disk id or server name).
    Resource(String),
    /// Every backup of the vault.
    All,
}

/// One backup replicated.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicatedBackup {
    /// The source backup's id.
    pub source_id: String,
    /// Its id in the target vault.
    pub replica_id: String,
    pub name: String,
    pub resource: String,
    #[serde(flatten)]
    pub stats: ReplicaStats,
}

/// What a replication did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicateReport {
    pub from: String,
    pub to: String,
    pub backups: Vec<ReplicatedBackup>,
    /// Sums over `backups`.
    pub blobs_sent: u64,
    pub bytes_sent: u64,
    pub blobs_skipped: u64,
    /// Backups whose manifest was sent (the others were there already).
    pub backups_sent: u64,
    pub seconds: f64,
}

impl ReplicateReport {
    fn new(from: &str, to: &str) -> ReplicateReport {
        ReplicateReport {
            from: from.into(),
            to: to.into(),
            backups: Vec::new(),
            blobs_sent: 0,
            bytes_sent: 0,
            blobs_skipped: 0,
            backups_sent: 0,
            seconds: 0.0,
        }
    }

    /// Count backup `m`, copied as `replica_id`.
    fn add(
        &mut self,
        m: &crate::manifest::BackupManifest,
        replica_id: String,
        stats: crate::replicate::engine::ReplicaStats,
    ) {
        self.blobs_sent += stats.blobs_sent;
        self.bytes_sent += stats.bytes_sent;
        self.blobs_skipped += stats.blobs_skipped;
        self.backups_sent += u64::from(stats.manifest_sent);
        self.backups.push(ReplicatedBackup {
            source_id: m.id.clone(),
            replica_id,
            name: m.name.clone(),
            resource: m.resource.clone(),
            stats,
        });
    }
}

impl App {
    /// Copy the selected backups of vault `from` into vault `to` (oldest first: an
    /// incremental then finds its parent's blobs there already).
    pub fn replicate(
        &self,
        selection: &ReplicaSelection,
        from: &str,
        to: &str,
        opts: &ReplicateOptions,
    ) -> Result<ReplicateReport> {
        if from == to {
            return Err(Error::config(format!(
                "--from and --to both name vault {from}: replicate into another vault"
            )));
        }
        let (source, manifests) = self.selected(selection, from)?;
        self.replicate_manifests(&source, &manifests, from, to, opts)
    }

    /// The source vault `from` and its backups `selection` names, oldest first.
    fn selected(
        &self,
        selection: &ReplicaSelection,
        from: &str,
    ) -> Result<(Vault, Vec<crate::manifest::BackupManifest>)> {
        let source = self.open_vault(from)?;
        let manifests = match selection {
            ReplicaSelection::Backup(spec) => {
                let b = self.find_backup(spec)?;
                if b.vault != from {
                    return Err(Error::not_found(format!(
                        "backup {spec} is in vault {}, not in {from}",
                        b.vault
                    )));
                }
                vec![b.manifest]
            }
            ReplicaSelection::Resource(r) => {
                let ms = source.manifests_of(r)?;
                if ms.is_empty() {
                    return Err(Error::not_found(format!(
                        "vault {from} holds no backup of {r:?}: `backups list --vault {from}` shows its resources"
                    )));
                }
                ms
            }
            ReplicaSelection::All => source.manifests()?,
        };
        Ok((source, manifests))
    }

    /// Copy the selected backups of vault `from` to a mirror vault on another appliance
    /// (`target`, named `to` in the report); its catalog learns each replica as its
    /// manifest lands there.
    pub fn replicate_to(
        &self,
        selection: &ReplicaSelection,
        from: &str,
        target: &dyn ReplicaTarget,
        to: &str,
        opts: &ReplicateOptions,
    ) -> Result<ReplicateReport> {
        let (source, manifests) = self.selected(selection, from)?;
        self.replicate_manifests_to(&source, &manifests, from, target, to, opts)
    }

    /// Copy `manifests` (backups of the opened vault `from`) to a mirror vault on
    /// another appliance (`target`, named `to` in the report), in order.
    pub fn replicate_manifests_to(
        &self,
        source: &Vault,
        manifests: &[crate::manifest::BackupManifest],
        from: &str,
        target: &dyn ReplicaTarget,
        to: &str,
        opts: &ReplicateOptions,
    ) -> Result<ReplicateReport> {
        let started = std::time::Instant::now();
        let target_id = target.info()?.vault_id;
        let mut report = ReplicateReport::new(from, to);
        for m in manifests {
            let stats = replicate_backup(source, m, target, opts).map_err(|e| {
                e.context_prefix(format!("replicating backup {} ({}) to {to}", m.name, m.id))
            })?;
            let replica_id = crate::replicate::engine::replica_id(&m.id, &target_id);
            report.add(m, replica_id, stats);
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Copy `manifests` (backups of the opened vault `from`) into vault `to`, in order.
    pub fn replicate_manifests(
        &self,
        source: &Vault,
        manifests: &[crate::manifest::BackupManifest],
        from: &str,
        to: &str,
        opts: &ReplicateOptions,
    ) -> Result<ReplicateReport> {
        let started = std::time::Instant::now();
        let target = VaultTarget::new(self.open_target(source, to)?)?;
        let mut report = ReplicateReport::new(from, to);
        let target_id = target.vault().config().id.clone();
        for m in manifests {
            let stats = replicate_backup(source, m, &target, opts).map_err(|e| {
                e.context_prefix(format!("replicating backup {} ({})", m.name, m.id))
            })?;
            let replica_id = crate::replicate::engine::replica_id(&m.id, &target_id);
            let mut key = m.clone();
            key.id = replica_id.clone();
            let replica = target.vault().read_manifest(&key.key())?;
            self.record_backup(to, &replica);
            report.add(m, replica_id, stats);
        }
        drop(target);
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Open vault `to` as a target of `source`. An encrypted target with the source's
    /// vault key (same `key_check`) is unlocked with that key itself, so no second secret
    /// is needed; any other encrypted target stays locked and the engine refuses it
    /// before writing anything (`replicate::engine::check_compatible`).
    fn open_target(&self, source: &Vault, to: &str) -> Result<Vault> {
        let mut target = Vault::open(&self.catalog.vault(to)?.path)?;
        let (Some(s), Some(t)) = (&source.config().encryption, &target.config().encryption) else {
            return Ok(target);
        };
        if s.key_check == t.key_check {
            let key = source.unlocked_key()?.clone();
            target
                .unlock(&KeySecret::Recovery(key))
                .map_err(|e| e.context_prefix(format!("vault {to}")))?;
        }
        Ok(target)
    }

    /// Create vault `name` as a replica of vault `source`: same chunk size and zstd level
    /// and, when the source is encrypted, the same vault key (so its sealed blobs and keyed
    /// digests mean the same there), wrapped anew under the replica's own id by the key
    /// given (`--keyfile`/`--passphrase-env`) or, when the source's key is in the
    /// appliance's key store, by that key file, which is then stored for the replica too.
    /// Compliance mode is not copied: the replica's retention is its own.
    pub fn create_replica_vault(
        &self,
        name: &str,
        path: Option<&Path>,
        s3: Option<&crate::vault::store::S3Location>,
        source: &str,
    ) -> Result<VaultEntry> {
        let src = self.open_vault(source)?;
        let chunk_size = src.chunk_size();
        let zstd = src.config().zstd_level;
        if !src.is_encrypted() {
            return match s3 {
                Some(loc) => self.create_vault_s3(name, loc, chunk_size, zstd),
                None => self.create_vault(name, path, chunk_size, zstd),
            };
        }
        let stored_src = keys::stored_key_path(&self.data, &src.config().id);
        let loaded;
        let (secret, store_copy): (&KeySecret, bool) = match &self.key {
            Some(KeySecret::Recovery(_)) => {
                return Err(Error::config(
                    "a paper recovery key cannot wrap the replica's key: pass --keyfile PATH or --passphrase-env VAR",
                ));
            }
            Some(s) => (s, false),
            None if stored_src.exists() => {
                loaded = KeySecret::from_keyfile(&stored_src)?;
                (&loaded, true)
            }
            None => {
                return Err(Error::new(
                    crate::ErrorKind::KeyRequired,
                    format!(
                        "vault {source} is encrypted: pass the key that opens it (--keyfile PATH or --passphrase-env VAR); it wraps the replica's key too"
                    ),
                ));
            }
        };
        crate::name::Name::parse(name, "vault")?;
        if self.catalog.vault(name).is_ok() {
            return Err(Error::conflict(format!(
                "a vault named {name:?} already exists"
            )));
        }
        let key = src.unlocked_key()?.clone();
        if let Some(loc) = s3 {
            let entry =
                self.create_vault_s3_with(name, loc, chunk_size, zstd, None, Some((secret, key)))?;
            if store_copy {
                self.store_replica_key(&stored_src, &entry.vault_id)?;
            }
            return Ok(entry);
        }
        let path = path.map_or_else(|| self.data.join("vaults").join(name), Path::to_path_buf);
        if path.join("vault.toml").exists() {
            return Err(Error::conflict(format!(
                "{} already holds a vault",
                path.display()
            )));
        }
        for dir in ["packs", "backups", "cache", "locks"] {
            std::fs::create_dir_all(path.join(dir))
                .map_err(|e| Error::io(format!("creating {}", path.join(dir).display()), e))?;
        }
        let vault = Vault::create_keyed(
            std::sync::Arc::new(crate::vault::store::LocalStore::new(&path)),
            &path,
            false,
            chunk_size,
            zstd,
            None,
            Some((secret, key)),
        )?;
        if store_copy {
            self.store_replica_key(&stored_src, &vault.config().id)?;
        }
        self.register_vault(name, path, &vault)
    }

    /// Keep the key file `stored_src` (the source's, from the key store) for the replica
    /// `vault_id` too.
    fn store_replica_key(&self, stored_src: &Path, vault_id: &str) -> Result<()> {
        let to = keys::stored_key_path(&self.data, vault_id);
        std::fs::copy(stored_src, &to)
            .map_err(|e| Error::io(format!("storing the replica's key as {}", to.display()), e))?;
        Ok(())
    }
}

impl App {
    /// Publish `manifest`, pushed by another appliance, in the mirror vault `vault_name`
    /// held by `target`: refused unless it names that vault and every blob it reaches
    /// (roots, pages, data chunks) has landed; then the catalog learns the backup. An
    /// already present manifest is left as it is.
    pub fn land_replica_manifest(
        &self,
        vault_name: &str,
        target: &VaultTarget,
        manifest: &crate::manifest::BackupManifest,
    ) -> Result<()> {
        use crate::vault::walk::{WalkItem, walk_disk};
        let vault = target.vault();
        if manifest.vault_id != vault.config().id {
            return Err(Error::invalid(format!(
                "manifest {} is for vault id {}, but vault {vault_name} is {}: it was derived for another target",
                manifest.id,
                manifest.vault_id,
                vault.config().id
            )));
        }
        if target.has_manifest(manifest)? {
            return Ok(());
        }
        let lookup = vault.lookup_reconciled()?;
        let mut visited = std::collections::HashSet::new();
        let mut lacking: Vec<String> = Vec::new();
        for disk in &manifest.disks {
            walk_disk(vault, &lookup, disk, &mut visited, &mut |item| {
                match item {
                    WalkItem::Root(_) | WalkItem::Page { .. } => {}
                    WalkItem::Chunks(cs) => {
                        for (off, d) in cs {
                            if lacking.len() < 5 && !lookup.contains(d)? {
                                lacking.push(format!(
                                    "chunk {d} at offset {off} of disk {}",
                                    disk.name
                                ));
                            }
                        }
                    }
                    WalkItem::Damaged { what, error } => {
                        if lacking.len() < 5 {
                            lacking.push(format!("{what}: {error}"));
                        }
                    }
                }
                Ok(())
            })?;
        }
        if !lacking.is_empty() {
            return Err(Error::new(
                crate::ErrorKind::Conflict,
                format!(
                    "manifest {} ({}) refused: vault {vault_name} lacks blobs it needs ({}); send the missing blobs first",
                    manifest.id,
                    manifest.name,
                    lacking.join("; ")
                ),
            ));
        }
        target.put_manifest(manifest)?;
        self.record_backup(vault_name, manifest);
        Ok(())
    }
}

impl App {
    /// Publish `manifest`, pushed by an encrypted vault on another appliance, in its
    /// encrypted mirror vault `vault_name` (held by `target`, locked: this appliance has
    /// no key) as `sealed`, its stored form sealed by the source. Refused unless the
    /// vault is encrypted, `sealed` is a sealed file, the manifest names this vault and
    /// the index root of each disk has landed (the pages and chunks below a root cannot
    /// be read without the key: they are checked by a restore or a verify with it).
    pub fn land_sealed_replica_manifest(
        &self,
        vault_name: &str,
        target: &VaultTarget,
        manifest: &crate::manifest::BackupManifest,
        sealed: &[u8],
    ) -> Result<()> {
        let vault = target.vault();
        if !vault.is_encrypted() {
            return Err(Error::config(format!(
                "vault {vault_name} is plaintext: it takes the plaintext manifests of a plaintext vault, not sealed ones (an encrypted source makes an empty mirror vault encrypted first)"
            )));
        }
        if !crate::chunk::BlobCodec::is_sealed_file(sealed) {
            return Err(Error::invalid(format!(
                "manifest {} was sent unsealed to the encrypted vault {vault_name}",
                manifest.id
            )));
        }
        if manifest.vault_id != vault.config().id {
            return Err(Error::invalid(format!(
                "manifest {} is for vault id {}, but vault {vault_name} is {}: it was derived for another target",
                manifest.id,
                manifest.vault_id,
                vault.config().id
            )));
        }
        if target.has_manifest(manifest)? {
            return Ok(());
        }
        let lookup = vault.lookup_reconciled()?;
        for disk in &manifest.disks {
            if !disk.index_root.is_zero() && !lookup.contains(&disk.index_root)? {
                return Err(Error::new(
                    crate::ErrorKind::Conflict,
                    format!(
                        "manifest {} ({}) refused: vault {vault_name} lacks the index root {} of disk {}; send the missing blobs first",
                        manifest.id, manifest.name, disk.index_root, disk.name
                    ),
                ));
            }
        }
        target.put_sealed_manifest(manifest, sealed)?;
        self.record_backup(vault_name, manifest);
        Ok(())
    }
}

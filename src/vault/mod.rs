//! A vault: where backups live (packs of blobs, manifests, the lookup-index cache).
//!
//! Layout of a local vault (DESIGN §5):
//!
//! ```text
//! <vault>/vault.toml                      id, chunk size, zstd level, pack target, capacity,
//!                                         [encryption]: wrapped vault key (see `keys`)
//! <vault>/packs/<aa>/<pack-id>.pack       immutable packs (see `pack`)
//! <vault>/packs/tmp/                      packs being written (garbage after a crash)
//! <vault>/backups/<resource>/<id>.json    manifests (see `manifest`)
//! <vault>/cache/lookup.sqlite             chunk lookup index (a cache of the pack trailers)
//! <vault>/bad-blobs                       copies verify found rotten (see `badblobs`)
//! <vault>/locks/vault.lock                shared by backups and verify, exclusive for GC
//! <vault>/locks/retention.journal         protection and retention locks (see `retention`)
//! ```
//!
//! A vault created in compliance mode (`compliance_days` in `vault.toml`, set at creation
//! and never changed: no command writes it afterwards, and the journal records it too)
//! locks every backup for at least that many days after its creation.
//!
//! Locks and pins (`locks/vault.lock` is an flock; pins are files, see `pin`):
//!
//! | operation                  | takes                 | why |
//! |----------------------------|-----------------------|-----|
//! | backup                     | lock shared           | GC must not delete a blob the backup deduplicated against before its manifest references it |
//! | verify                     | lock shared           | a GC repack beside it would delete packs it is reading and they would be reported as damage |
//! | restore, export, serve-nbd | pin (no lock)         | readers run for days; GC treats pinned backups as live, and reads fall back to the trailers when GC moved a blob |
//! | GC                         | lock exclusive (fails fast with `Conflict`) | no backup or verify runs beside it; it honours pins |
//! | rescan                     | none                  | rebuilds the lookup cache from the trailers |
//!
//! An encrypted vault ([`Vault::create_with`] with a key) seals every blob and every
//! manifest under its vault key (`chunk::seal`); [`Vault::open`] opens it *locked*: its
//! config and pack sizes are readable, but [`Vault::codec`] — and so every blob or
//! manifest read and every write — fails with `KeyRequired` until [`Vault::unlock`].
//!
//! Packs are immutable and GC publishes and indexes replacements before deleting, so a
//! reader never sees a hole: at worst its cached location is gone and
//! [`Vault::read_blob`] finds the new copy through the trailers.

mod access;
pub mod badblobs;
pub mod digestset;
pub mod gc;
pub mod keys;
pub mod lease;
pub mod lookup;
#[cfg(test)]
mod memory_tests;
pub mod pack;
pub mod pin;
pub mod remote;
pub mod retention;
pub mod store;
pub mod verify;
pub mod walk;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chunk::{BlobCodec, BlobKind, ChunkDigest, ChunkSize, VaultKey, decode_blob};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::manifest::BackupManifest;

use self::badblobs::BadBlobs;
use self::keys::{EncryptionConfig, KeySecret};
use self::lookup::{BlobLocation, LookupIndex};
use self::pack::{DEFAULT_PACK_TARGET, PackWriter, Staging, read_pack_entries};
use self::store::{ChunkStore, LocalStore};

/// Current vault format version.
const VAULT_FORMAT: u32 = 1;

/// `vault.toml`: what a vault is, chosen at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaultConfig {
    pub format: u32,
    pub id: String,
    pub chunk_size: ChunkSize,
    pub zstd_level: i32,
    pub pack_target: u64,
    pub created: String,
    /// Optional capacity limit in bytes of stored data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// Compliance mode: every backup is locked for at least this many days after its
    /// creation. Chosen at creation, never changed (see `retention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance_days: Option<u32>,
    /// Present in an encrypted vault: the wrapped vault key (see `keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

/// A copy found in the pack trailers: where, and its decoded kind and bytes.
type FoundBlob = (BlobLocation, (BlobKind, Vec<u8>));

/// An open vault.
pub struct Vault {
    /// Local directory of the vault's local-only state (lookup cache, flock, pins,
    /// spool): the vault directory itself for a local vault, `<data>/vaults/<name>` for
    /// a vault on object storage (see `remote`).
    root: PathBuf,
    config: VaultConfig,
    store: Arc<dyn ChunkStore>,
    /// None while an encrypted vault is locked.
    codec: Option<BlobCodec>,
    /// The vault key of an unlocked encrypted vault.
    key: Option<VaultKey>,
    /// Whether other appliances may share the store: locks then also take a lease object
    /// (see `lease`), since an flock is only seen on this machine.
    shared_store: bool,
}

/// A held vault lock; released on drop.
pub struct VaultLock {
    _file: File,
    _lease: Option<lease::Lease>,
}

impl Vault {
    /// Create a new plaintext vault in `root` (which must not hold one yet).
    pub fn create(root: &Path, chunk_size: ChunkSize, zstd_level: i32) -> Result<Vault> {
        Vault::create_with(root, chunk_size, zstd_level, None, None)
    }

    /// Create a new vault in `root` ([`Vault::create`]), in compliance mode when `compliance_days` is given: every
    /// backup is then locked for at least that many days (recorded in `vault.toml` and
    /// in the lock journal); with `encrypt`, an encrypted one whose new random key is
    /// wrapped by that secret. Returned unlocked.
    pub fn create_with(
        root: &Path,
        chunk_size: ChunkSize,
        zstd_level: i32,
        compliance_days: Option<u32>,
        encrypt: Option<&KeySecret>,
    ) -> Result<Vault> {
        if compliance_days == Some(0) || compliance_days.is_some_and(|d| d > 36_500) {
            return Err(Error::config(
                "compliance days must be between 1 and 36500 (100 years)",
            ));
        }
        if !(1..=19).contains(&zstd_level) {
            return Err(Error::config(format!(
                "zstd level {zstd_level} must be between 1 and 19"
            )));
        }
        if root.join("vault.toml").exists() || root.join(remote::LOCATION_FILE).exists() {
            return Err(Error::conflict(format!(
                "{} already holds a vault",
                root.display()
            )));
        }
        for dir in ["packs", "backups", "cache", "locks"] {
            fs::create_dir_all(root.join(dir))
                .ctx(|| format!("creating {}", root.join(dir).display()))?;
        }
        Vault::create_in(
            Arc::new(LocalStore::new(root)),
            root,
            false,
            chunk_size,
            zstd_level,
            compliance_days,
            encrypt,
        )
    }

    /// Create a new vault in `store` (which must not hold one yet), keeping local state in
    /// `state`. `shared_store`: other appliances may reach the store (object storage).
    /// `compliance_days` and `encrypt` as in [`Vault::create_with`].
    pub fn create_in(
        store: Arc<dyn ChunkStore>,
        state: &Path,
        shared_store: bool,
        chunk_size: ChunkSize,
        zstd_level: i32,
        compliance_days: Option<u32>,
        encrypt: Option<&KeySecret>,
    ) -> Result<Vault> {
        Vault::create_keyed(
            store,
            state,
            shared_store,
            chunk_size,
            zstd_level,
            compliance_days,
            encrypt.map(|s| (s, VaultKey::generate())),
        )
    }

    /// [`Vault::create_in`] with a given vault key (a replica of an encrypted vault has
    /// its source's key, wrapped anew under its own id) wrapped by the secret.
    pub fn create_keyed(
        store: Arc<dyn ChunkStore>,
        state: &Path,
        shared_store: bool,
        chunk_size: ChunkSize,
        zstd_level: i32,
        compliance_days: Option<u32>,
        encrypt: Option<(&KeySecret, VaultKey)>,
    ) -> Result<Vault> {
        if compliance_days == Some(0) || compliance_days.is_some_and(|d| d > 36_500) {
            return Err(Error::config(
                "compliance days must be between 1 and 36500 (100 years)",
            ));
        }
        if !(1..=19).contains(&zstd_level) {
            return Err(Error::config(format!(
                "zstd level {zstd_level} must be between 1 and 19"
            )));
        }
        match store.len("vault.toml") {
            Ok(_) => {
                return Err(Error::conflict(format!(
                    "{} already holds a vault (attach it instead)",
                    store.describe()
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let (secret, key) = match encrypt {
            Some((s, k)) => (Some(s), Some(k)),
            None => (None, None),
        };
        let encryption = match (secret, &key) {
            (Some(secret), Some(key)) => Some(keys::new_encryption(&id, key, secret, None)?),
            _ => None,
        };
        let config = VaultConfig {
            format: VAULT_FORMAT,
            id,
            chunk_size,
            zstd_level,
            pack_target: DEFAULT_PACK_TARGET,
            created: crate::manifest::now_rfc3339(),
            capacity: None,
            compliance_days,
            encryption,
        };
        let text = toml::to_string(&config)
            .map_err(|e| Error::invalid("encoding vault.toml").with_source(e))?;
        store.put("vault.toml", text.as_bytes())?;
        let mut vault = Vault::open_in(store, state, shared_store)?;
        if let Some(key) = key {
            vault.codec = Some(BlobCodec::sealed(&key)?);
            vault.key = Some(key);
        }
        if let Some(days) = compliance_days {
            retention::record_compliance(&vault, days, "vault create")?;
        }
        Ok(vault)
    }

    /// Open the vault in `root` and, when it is encrypted and `secret` is given, unlock it.
    pub fn open_with(root: &Path, secret: Option<&KeySecret>) -> Result<Vault> {
        let mut v = Vault::open(root)?;
        if let (true, Some(secret)) = (v.is_encrypted(), secret) {
            v.unlock(secret)?;
        }
        Ok(v)
    }

    /// Open the vault at `root`: a local vault directory, or the local state directory of
    /// a vault on object storage (holding `s3.toml`). An encrypted vault opens locked (see
    /// the module doc).
    pub fn open(root: &Path) -> Result<Vault> {
        if root.join(remote::LOCATION_FILE).exists() {
            let store = remote::connect(root)?;
            return Vault::open_in(Arc::new(store), root, true);
        }
        if !root.join("vault.toml").exists() {
            return Err(Error::not_found(format!(
                "no vault at {} (no vault.toml)",
                root.display()
            )));
        }
        Vault::open_in(Arc::new(LocalStore::new(root)), root, false)
    }

    /// Open the vault held by `store`, keeping local state in `state`.
    pub fn open_in(store: Arc<dyn ChunkStore>, state: &Path, shared_store: bool) -> Result<Vault> {
        let bytes = store.get("vault.toml").map_err(|e| {
            e.context_prefix(format!(
                "no vault in {} (reading vault.toml)",
                store.describe()
            ))
        })?;
        let config: VaultConfig = std::str::from_utf8(&bytes)
            .map_err(|e| Error::invalid("vault.toml is not UTF-8").with_source(e))
            .and_then(|text| {
                toml::from_str(text).map_err(|e| Error::invalid("bad vault.toml").with_source(e))
            })
            .map_err(|e| e.context_prefix(store.describe()))?;
        if config.format != VAULT_FORMAT {
            return Err(Error::unsupported(format!(
                "vault format {} (this build reads format {VAULT_FORMAT})",
                config.format
            )));
        }
        for dir in ["cache", "locks"] {
            fs::create_dir_all(state.join(dir))
                .ctx(|| format!("creating {}", state.join(dir).display()))?;
        }
        if let Some(enc) = &config.encryption
            && (enc.cipher != "aes-256-gcm" || enc.digest != "blake3-keyed")
        {
            return Err(Error::unsupported(format!(
                "vault {} is encrypted with {} / {} (this build knows aes-256-gcm / blake3-keyed)",
                store.describe(),
                enc.cipher,
                enc.digest
            )));
        }
        let codec = config.encryption.is_none().then(BlobCodec::plain);
        Ok(Vault {
            root: state.to_path_buf(),
            config,
            store,
            shared_store,
            codec,
            key: None,
        })
    }

    fn write_config(&mut self, config: VaultConfig) -> Result<()> {
        let text = toml::to_string(&config)
            .map_err(|e| Error::invalid("encoding vault.toml").with_source(e))?;
        self.store.put("vault.toml", text.as_bytes())?;
        self.config = config;
        Ok(())
    }

    /// Local directory where packs are spooled before the store publishes them: inside
    /// a local vault (`packs/tmp`, so publishing is a rename), in the state directory
    /// otherwise.
    pub fn spool_dir(&self) -> PathBuf {
        if self.shared_store {
            self.root.join("spool")
        } else {
            self.root.join("packs").join("tmp")
        }
    }

    /// A pack writer of `target` bytes a pack, staging packs in
    /// [`spool_dir`](Self::spool_dir) for a local vault and in memory for a shared
    /// (object) store, where the PUT is what makes a pack durable.
    pub fn pack_writer_with_target(&self, target: u64) -> PackWriter {
        let staging = if self.shared_store {
            Staging::Memory
        } else {
            Staging::Spool(self.spool_dir())
        };
        PackWriter::staged(Arc::clone(&self.store), staging, target)
    }

    /// A pack writer with the vault's pack target.
    pub fn pack_writer(&self) -> PackWriter {
        self.pack_writer_with_target(self.config.pack_target)
    }

    /// Remove spooled packs left behind by crashed writers of this machine (only under
    /// the exclusive vault lock, when no writer can be running). Returns how many.
    pub fn clean_spool(&self) -> Result<usize> {
        let dir = self.spool_dir();
        let mut n = 0;
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                fs::remove_file(e.path()).ctx(|| format!("removing {}", e.path().display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Is the store shared with other appliances (object storage)?
    pub fn is_shared_store(&self) -> bool {
        self.shared_store
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    pub fn chunk_size(&self) -> ChunkSize {
        self.config.chunk_size
    }

    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// Update the capacity limit (None: unlimited).
    pub fn set_capacity(&mut self, capacity: Option<u64>) -> Result<()> {
        let mut config = self.config.clone();
        config.capacity = capacity;
        self.write_config(config)
    }

    /// A new connection to the lookup index (one per thread).
    pub fn lookup(&self) -> Result<LookupIndex> {
        LookupIndex::open(&self.root.join("cache").join("lookup.sqlite"))
    }

    /// A lookup connection after indexing packs the index has not seen (a crashed
    /// writer's, or copied in). Never forgets a pack: that is GC's job under the exclusive
    /// lock. Read-only paths need not call this: [`read_blob`](Self::read_blob) falls
    /// back to the pack trailers by itself.
    pub fn lookup_reconciled(&self) -> Result<LookupIndex> {
        let mut l = self.lookup()?;
        let (added, _) = l.reconcile(self.store.as_ref(), false)?;
        if added > 0 {
            tracing::info!(added, "lookup index: indexed packs it had not seen");
        }
        Ok(l)
    }

    fn lock_file(&self) -> Result<File> {
        let path = self.root.join("locks").join("vault.lock");
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))
    }

    /// Shared lock for a backup or verify (waits while GC of this machine runs; on a
    /// shared store, fails with `Conflict` while another appliance's GC holds its lease).
    pub fn lock_shared(&self) -> Result<VaultLock> {
        let f = self.lock_file()?;
        f.lock_shared().ctx(|| "taking the vault lock (shared)")?;
        self.held(f, lease::LeaseKind::Use)
    }

    /// The lock held with `f`; on a shared store also a lease of `kind`.
    fn held(&self, f: File, kind: lease::LeaseKind) -> Result<VaultLock> {
        let lease = if self.shared_store {
            Some(lease::Lease::take(Arc::clone(&self.store), kind)?)
        } else {
            None
        };
        Ok(VaultLock {
            _file: f,
            _lease: lease,
        })
    }

    /// Pin `backups` for a long read (restore, export, serve-nbd): GC keeps them live
    /// while the returned guard lives, even if they are deleted meanwhile. Fails with
    /// `NotFound` when a backup was deleted before the pin was taken.
    ///
    /// Pins are files of this appliance's state directory: on a shared store (S3) a GC on
    /// another appliance cannot see them, so the guard also holds a **use** lease there
    /// (see `lease`): such a GC is refused (`Conflict`) while the reader runs, and a
    /// reader is refused while a GC elsewhere holds its lease.
    pub fn pin(&self, backups: &[&BackupManifest]) -> Result<pin::PinGuard> {
        let lease = if self.shared_store {
            Some(lease::Lease::take(
                Arc::clone(&self.store),
                lease::LeaseKind::Use,
            )?)
        } else {
            None
        };
        let mut guard = pin::pin(&self.root, backups)?;
        if let Some(l) = lease {
            guard = guard.with_lease(l);
        }
        // GC reads manifests before pins: with the pin durable, a manifest still here now
        // was either seen by any GC that missed the pin, or that GC has not run yet.
        for m in backups {
            match self.store.len(&m.key()) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(Error::not_found(format!(
                        "backup {} ({}) was deleted",
                        m.name, m.id
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(guard)
    }

    /// Exclusive lock for GC; `Conflict` when backups are running.
    pub fn try_lock_exclusive(&self) -> Result<VaultLock> {
        let f = self.lock_file()?;
        match f.try_lock() {
            Ok(()) => self.held(f, lease::LeaseKind::Gc),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::conflict(format!(
                "vault {} is in use by a running backup or verify; try again when it has finished",
                self.root.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io("taking the vault lock", e)),
        }
    }

    /// Read, verify and decode one blob.
    ///
    /// The lookup index is only a cache: when it has no row for `digest`, or the copy it
    /// points at cannot be read or fails its digest (wrong pack, wrong offset, rot), the
    /// pack trailers are searched for another copy, and the row is repaired to point at
    /// the first copy that decodes and verifies.
    pub fn read_blob(
        &self,
        lookup: &LookupIndex,
        digest: &ChunkDigest,
    ) -> Result<(BlobKind, Vec<u8>)> {
        let cached = match lookup.get(digest)? {
            Some(loc) => match self.read_blob_at(&loc, digest) {
                Ok(blob) => return Ok(blob),
                Err(e) => Some((loc, e)),
            },
            None => None,
        };
        let failed = cached.as_ref().map(|(loc, _)| *loc);
        let (found, other_error) = self.find_in_trailers(digest, failed)?;
        if let Some((loc, blob)) = found {
            match lookup.set_location(digest, &loc) {
                Ok(()) => tracing::warn!(
                    "lookup index had a wrong or no location for blob {digest}; repaired it to pack {} offset {}",
                    loc.pack,
                    loc.offset
                ),
                Err(e) => tracing::warn!("could not repair the lookup row of blob {digest}: {e}"),
            }
            return Ok(blob);
        }
        Err(match (cached, other_error) {
            (Some((_, e)), _) | (None, Some(e)) => e,
            (None, None) => Error::new(
                ErrorKind::Corrupt,
                format!(
                    "blob {digest} is missing from the vault (no pack trailer lists it: the backups that reference it are damaged; run `verify` to name them)"
                ),
            ),
        })
    }

    /// Read and decode the copy of `digest` at `loc`.
    pub fn read_blob_at(
        &self,
        loc: &BlobLocation,
        digest: &ChunkDigest,
    ) -> Result<(BlobKind, Vec<u8>)> {
        let stored = self
            .store
            .read_pack_range(loc.pack, loc.offset, loc.length as usize)
            .map_err(|e| e.context_prefix(format!("blob {digest}")))?;
        decode_blob(&stored, digest, self.codec()?)
            .map_err(|e| e.context_prefix(format!("pack {} offset {}", loc.pack, loc.offset)))
    }

    /// Search every pack trailer for a good copy of `digest` other than `skip` (slow: the
    /// fallback when the lookup index is wrong). Known-bad copies are tried last. Returns
    /// the good copy, or else the error of the last copy tried.
    fn find_in_trailers(
        &self,
        digest: &ChunkDigest,
        skip: Option<BlobLocation>,
    ) -> Result<(Option<FoundBlob>, Option<Error>)> {
        let bad = BadBlobs::load(self.store.as_ref()).unwrap_or_default();
        let mut candidates = Vec::new();
        for id in self.store.list_packs()? {
            let entries = match read_pack_entries(self.store.as_ref(), id) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("skipping pack {id} while searching for blob {digest}: {e}");
                    continue;
                }
            };
            for e in entries.iter().filter(|e| e.digest == *digest) {
                let loc = BlobLocation {
                    pack: id,
                    offset: e.offset,
                    length: e.length,
                    kind: e.kind,
                };
                if Some(loc) != skip {
                    candidates.push((bad.contains(digest, id, e.offset), loc));
                }
            }
        }
        candidates.sort_by_key(|(is_bad, _)| *is_bad);
        let mut last_error = None;
        for (_, loc) in candidates {
            match self.read_blob_at(&loc, digest) {
                Ok(blob) => return Ok((Some((loc, blob)), None)),
                Err(e) => last_error = Some(e),
            }
        }
        Ok((None, last_error))
    }

    /// Bytes stored in packs (from the lookup index).
    pub fn stored_bytes(&self, lookup: &LookupIndex) -> Result<(u64, usize)> {
        let packs = lookup.packs()?;
        Ok((packs.iter().map(|(_, s)| s).sum(), packs.len()))
    }

    // ---- manifests ----

    /// Write a manifest atomically. This is the commit point of a backup.
    pub fn put_manifest(&self, m: &BackupManifest) -> Result<()> {
        let sealed = self.seal_manifest(m)?;
        self.store.put_file(&m.key(), &sealed)
    }

    /// `m` as it is stored (sealed in an encrypted vault): what [`Vault::put_manifest`]
    /// writes. A vault with the same key may store these bytes as they are.
    pub fn seal_manifest(&self, m: &BackupManifest) -> Result<Vec<u8>> {
        let bytes = serde_json::to_vec_pretty(m)
            .map_err(|e| Error::invalid("encoding manifest").with_source(e))?;
        self.codec()?.seal_file(&m.key(), &bytes)
    }

    /// Read and parse (opening it in an encrypted vault) the manifest stored at `key`.
    pub fn read_manifest(&self, key: &str) -> Result<BackupManifest> {
        let stored = self.store.get_file(key)?;
        let bytes = self.codec()?.open_file(key, &stored)?;
        BackupManifest::from_json(&bytes).map_err(|e| e.context_prefix(format!("manifest {key}")))
    }

    /// Every manifest in the vault, oldest first. An unreadable manifest is an error:
    /// GC must never run on a partial view of what is live.
    pub fn manifests(&self) -> Result<Vec<BackupManifest>> {
        let mut out = Vec::new();
        for key in self.store.list_files("backups")? {
            if !key.ends_with(".json") {
                continue;
            }
            out.push(self.read_manifest(&key)?);
        }
        out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        Ok(out)
    }

    /// The manifests of one resource (disk id or server), oldest first.
    pub fn manifests_of(&self, resource: &str) -> Result<Vec<BackupManifest>> {
        let dir = format!("backups/{}", crate::manifest::resource_dir(resource));
        let mut out = Vec::new();
        for key in self.store.list_files(&dir)? {
            if !key.ends_with(".json") {
                continue;
            }
            let m = self.read_manifest(&key)?;
            if m.resource == resource {
                out.push(m);
            }
        }
        out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        Ok(out)
    }

    /// Remove a backup's manifest (its blobs are freed by the next GC).
    pub fn delete_manifest(&self, m: &BackupManifest) -> Result<()> {
        self.store.remove_file(&m.key())
    }
}

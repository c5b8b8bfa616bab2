//! The costly figures of a vault, computed off the request path and cached in the
//! catalog (`catalog::figures`): usage (pack directory listing, lookup totals) and, for
//! every backup, the stored bytes only it references (what deleting it would free).
//!
//! [`App::refresh_figures`] computes both for one vault in one pass (the index of every
//! backup is walked once); the service calls it from one background thread
//! ([`FigureRefresher`]) after a backup, a delete, a prune or a GC, and the API serves
//! the cached figures with the time they were computed. The CLI computes them when the
//! cache is stale, since it has no background thread.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{App, VaultInfo};
use crate::catalog::{BackupEntry, VaultFigures};
use crate::chunk::ChunkDigest;
use crate::error::Result;
use crate::manifest::{BackupManifest, now_rfc3339};
use crate::vault::Vault;
use crate::vault::lookup::LookupIndex;
use crate::vault::walk::{WalkItem, walk_disk};

/// Owner of a digest while counting: one backup (by index), or several.
const SHARED: u32 = u32::MAX;

/// How fresh a backup's `bytes_freed_if_deleted` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// Computed for the vault's current set of backups.
    Fresh,
    /// Computed before a backup was added or deleted (or never): a refresh is due.
    Stale,
}

impl App {
    /// Compute and store the usage of `vault` (from its files).
    pub fn refresh_usage(&self, vault: &str) -> Result<VaultFigures> {
        let entry = self.catalog.vault(vault)?;
        let v = Vault::open(&entry.path)?;
        let lookup = v.lookup()?;
        let (pack_bytes, packs) = v.stored_bytes(&lookup)?;
        let f = VaultFigures {
            id: v.config().id.clone(),
            chunk_size: v.chunk_size().bytes(),
            zstd_level: v.config().zstd_level,
            stored_bytes: lookup.stored_blob_bytes()?,
            pack_bytes,
            packs,
            capacity: v.config().capacity,
            computed_at: now_rfc3339(),
        };
        self.catalog.put_vault_figures(vault, &f, &f.computed_at)?;
        Ok(f)
    }

    /// [`App::refresh_usage`] after a change this `App` made (a backup, a delete, a GC,
    /// a new limit): the change stands whatever happens here, so a failure is logged.
    pub(super) fn refresh_usage_logged(&self, vault: &str) {
        if let Err(e) = self.refresh_usage(vault) {
            tracing::warn!(vault, "refreshing the vault's usage figures failed: {e}");
        }
    }

    /// Compute and store the usage of `vault` and the exclusive bytes of each of its
    /// backups (every backup's index is walked once).
    pub fn refresh_figures(&self, vault: &str) -> Result<()> {
        // The key first: a backup added during the walk makes these figures stale.
        let key = self.catalog.backups_key(vault)?;
        self.refresh_usage(vault)?;
        let v = self.open_vault(vault)?;
        let lookup = v.lookup()?;
        let backups = self.catalog.backups(Some(vault), None)?;
        let mut owner: HashMap<ChunkDigest, u32> = HashMap::new();
        for (i, b) in backups.iter().enumerate() {
            for d in digests_of(&v, &lookup, &b.manifest)? {
                owner
                    .entry(d)
                    .and_modify(|o| {
                        if *o != i as u32 {
                            *o = SHARED
                        }
                    })
                    .or_insert(i as u32);
            }
        }
        let mut bytes = vec![0u64; backups.len()];
        for (d, o) in &owner {
            if *o != SHARED
                && let Some(loc) = lookup.get(d)?
            {
                bytes[*o as usize] += u64::from(loc.length);
            }
        }
        let figures: Vec<(String, u64)> = backups
            .iter()
            .zip(bytes)
            .map(|(b, n)| (b.manifest.id.clone(), n))
            .collect();
        self.catalog
            .put_backup_figures(vault, &key, &now_rfc3339(), &figures)
    }

    /// Stored bytes only this backup references: what deleting it (and GC) would free.
    /// From the cache when it matches the vault's current backups, else computed now
    /// (for the whole vault) and cached.
    pub fn exclusive_bytes(&self, entry: &BackupEntry) -> Result<u64> {
        let (bytes, _, fresh) = self.exclusive_bytes_cached(entry)?;
        match (bytes, fresh) {
            (Some(b), Freshness::Fresh) => Ok(b),
            _ => {
                self.refresh_figures(&entry.vault)?;
                Ok(self
                    .catalog
                    .backup_figure(&entry.manifest.id)?
                    .map_or(0, |f| f.exclusive_bytes))
            }
        }
    }

    /// The cached exclusive bytes of a backup, when they were computed, and whether
    /// they are still true. Never walks the vault.
    pub fn exclusive_bytes_cached(
        &self,
        entry: &BackupEntry,
    ) -> Result<(Option<u64>, Option<String>, Freshness)> {
        let Some(f) = self.catalog.backup_figure(&entry.manifest.id)? else {
            return Ok((None, None, Freshness::Stale));
        };
        let fresh = if f.backups_key == self.catalog.backups_key(&entry.vault)? {
            Freshness::Fresh
        } else {
            Freshness::Stale
        };
        Ok((Some(f.exclusive_bytes), Some(f.computed_at), fresh))
    }

    /// A vault's usage from the cache (computed now if it never was), with the catalog's
    /// own totals (backups, logical bytes) read fresh.
    pub fn vault_info_cached(&self, name: &str) -> Result<VaultInfo> {
        let f = match self.catalog.vault_figures(name)? {
            Some(f) => f,
            None => self.refresh_usage(name)?,
        };
        self.vault_info_from(name, f)
    }

    pub(super) fn vault_info_from(&self, name: &str, f: VaultFigures) -> Result<VaultInfo> {
        let entry = self.catalog.vault(name)?;
        let (backups, logical_bytes) = self.catalog.vault_backup_totals(name)?;
        // vault.toml is small and read without the key; a vault gone missing shows as
        // plaintext and not in compliance mode rather than failing the whole listing.
        let config = Vault::open(&entry.path).ok().map(|v| v.config().clone());
        let compliance_days = config.as_ref().and_then(|c| c.compliance_days);
        let enc = config.and_then(|c| c.encryption);
        let key_stored = enc.is_some() && self.key_stored(&f.id);
        Ok(VaultInfo {
            name: entry.name,
            path: entry.path.display().to_string(),
            id: f.id,
            chunk_size: f.chunk_size,
            zstd_level: f.zstd_level,
            backups,
            logical_bytes,
            stored_bytes: f.stored_bytes,
            pack_bytes: f.pack_bytes,
            packs: f.packs,
            dedup_ratio: if f.stored_bytes == 0 {
                0.0
            } else {
                logical_bytes as f64 / f.stored_bytes as f64
            },
            capacity: f.capacity,
            compliance_days,
            encrypted: enc.is_some(),
            key_wrappings: enc.as_ref().map_or(0, |e| e.keys.len()),
            key_stored,
            usage_computed_at: f.computed_at,
        })
    }
}

/// Every blob digest a backup references (roots, pages, chunks).
fn digests_of(v: &Vault, lookup: &LookupIndex, m: &BackupManifest) -> Result<HashSet<ChunkDigest>> {
    let mut set = HashSet::new();
    let mut visited = HashSet::new();
    for d in &m.disks {
        walk_disk(v, lookup, d, &mut visited, &mut |item| {
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
    Ok(set)
}

/// One background thread that refreshes vault figures on request; requests for a vault
/// already waiting are merged.
#[derive(Clone)]
pub struct FigureRefresher {
    tx: crossbeam_channel::Sender<Option<String>>,
    waiting: Arc<Mutex<HashSet<Option<String>>>>,
}

impl FigureRefresher {
    /// Start the thread on the data dir `data`.
    pub fn start(data: PathBuf) -> FigureRefresher {
        let (tx, rx) = crossbeam_channel::unbounded::<Option<String>>();
        let waiting: Arc<Mutex<HashSet<Option<String>>>> = Arc::default();
        let w = Arc::clone(&waiting);
        let spawned = std::thread::Builder::new()
            .name("figures".into())
            .spawn(move || {
                let app = match App::open(&data) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!("vault figures will not be refreshed: {e}");
                        return;
                    }
                };
                for req in rx {
                    w.lock().unwrap_or_else(|e| e.into_inner()).remove(&req);
                    let vaults = match &req {
                        Some(v) => vec![v.clone()],
                        None => app
                            .catalog()
                            .vaults()
                            .map(|vs| vs.into_iter().map(|v| v.name).collect())
                            .unwrap_or_default(),
                    };
                    for v in vaults {
                        if let Err(e) = app.refresh_figures(&v) {
                            tracing::warn!(vault = v, "refreshing vault figures failed: {e}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("starting the figures thread failed: {e}");
        }
        FigureRefresher { tx, waiting }
    }

    /// Refresh `vault` (or every vault with `None`) soon.
    pub fn request(&self, vault: Option<&str>) {
        let req = vault.map(str::to_owned);
        if self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.clone())
        {
            let _ = self.tx.send(req);
        }
    }
}

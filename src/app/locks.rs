//! Protection and retention locks of backups, as the appliance applies them: the vault's
//! lock journal (`vault::retention`) is the truth, the catalog's protected flag a cache
//! of it. Every deletion path (`App::delete_backup`, retention, GC) asks here or in the
//! journal before removing anything.

use time::{Duration, OffsetDateTime};

use super::App;
use crate::catalog::BackupEntry;
use crate::error::Result;
use crate::vault::retention::{self, LockStatus};

impl App {
    /// The protection and lock of a backup, from its vault's journal (a protection made
    /// before the journal existed comes from the catalog).
    pub fn lock_status(&self, entry: &BackupEntry) -> Result<LockStatus> {
        let vault = self.open_vault(&entry.vault)?;
        let journal = retention::Journal::load(vault.store().as_ref())?;
        let mut st = journal.status(&entry.manifest, vault.config().compliance_days);
        if journal.protected(&entry.manifest.id).is_none() {
            st.protected = self.catalog.is_protected(&entry.manifest.id)?;
        }
        Ok(st)
    }

    /// Lock backup `id_or_name` until `until` (extend only; see `retention::lock`).
    pub fn lock_backup(
        &self,
        id_or_name: &str,
        until: OffsetDateTime,
        actor: &str,
    ) -> Result<(BackupEntry, LockStatus)> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        let st = retention::lock(&vault, &entry.manifest, until, actor)?;
        Ok((entry, st))
    }

    /// Lock backup `id` for `days` days from now (a policy's `lock_days`).
    pub fn lock_backup_days(&self, id: &str, days: u32, actor: &str) -> Result<LockStatus> {
        let until = retention::now() + Duration::days(days as i64);
        self.lock_backup(id, until, actor).map(|(_, st)| st)
    }

    /// Protect (or unprotect) a backup: recorded in its vault's journal, cached in the
    /// catalog.
    pub fn set_protected(
        &self,
        id_or_name: &str,
        protect: bool,
        actor: &str,
    ) -> Result<BackupEntry> {
        let entry = self.find_backup(id_or_name)?;
        let vault = self.open_vault(&entry.vault)?;
        retention::set_protected(&vault, &entry.manifest, protect, actor)?;
        self.catalog.set_protected(&entry.manifest.id, protect)?;
        Ok(entry)
    }

    /// Bring the catalog's protected flags of vault `name` in line with its journal
    /// (after a rescan or attach: a second appliance sees the first one's protections).
    pub(super) fn sync_protection(&self, name: &str) -> Result<()> {
        let vault = self.open_vault(name)?;
        let journal = retention::Journal::load(vault.store().as_ref())?;
        for b in self.catalog.backups(Some(name), None)? {
            if let Some(p) = journal.protected(&b.manifest.id) {
                self.catalog.set_protected(&b.manifest.id, p)?;
            }
        }
        Ok(())
    }
}

/// Who the command line acts as, for the lock journal: `cli:<user>`.
pub fn cli_actor() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid {}", nix::unistd::getuid()));
    format!("cli:{user}")
}

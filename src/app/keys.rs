//! The appliance's side of encrypted vaults: which key opens a vault, and the key
//! commands (`vault key add|list|remove|export|store`).
//!
//! A vault is unlocked, first that applies, with: the key given to this `App` (the
//! CLI's `--keyfile` / `--passphrase-env`), the key file the service's config names for
//! it (`[keys]`, see [`set_configured_key_files`]), or the key file kept in the
//! appliance's key store `<data>/keys/<vault id>.key` (`vault key store`). Keys are read
//! from files and the environment only, never from argv, and never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

use super::App;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::Vault;
use crate::vault::keys::{self, KeySecret, Wrapping};

static CONFIGURED: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();

/// The key files the service's config names per vault (`[keys] NAME = "PATH"`); set
/// once at service start, read by every `App` of the process.
pub fn set_configured_key_files(files: BTreeMap<String, PathBuf>) {
    let _ = CONFIGURED.set(files);
}

/// One key wrapping, as `vault key list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    pub id: String,
    pub kind: &'static str,
    pub created: String,
    pub label: Option<String>,
    pub fingerprint: Option<String>,
}

impl From<&Wrapping> for KeyView {
    fn from(w: &Wrapping) -> KeyView {
        KeyView {
            id: w.id.clone(),
            kind: w.kind.as_str(),
            created: w.created.clone(),
            label: w.label.clone(),
            fingerprint: w.fingerprint.clone(),
        }
    }
}

impl App {
    /// Use `secret` to unlock the encrypted vaults this `App` opens.
    pub fn set_key(&mut self, secret: KeySecret) {
        self.key = Some(secret);
    }

    /// The key given to this `App`, if any.
    pub fn key(&self) -> Option<&KeySecret> {
        self.key.as_ref()
    }

    /// Unlock `v` (vault `name`) with the first key that applies (see the module doc).
    pub(super) fn unlock(&self, name: &str, v: &mut Vault) -> Result<()> {
        if !v.is_encrypted() {
            return Ok(());
        }
        let prefix = |e: Error| e.context_prefix(format!("vault {name}"));
        if let Some(s) = &self.key {
            return v.unlock(s).map_err(prefix);
        }
        if let Some(p) = CONFIGURED.get().and_then(|m| m.get(name)) {
            return v.unlock(&KeySecret::from_keyfile(p)?).map_err(prefix);
        }
        let stored = keys::stored_key_path(&self.data, &v.config().id);
        if stored.exists() {
            return v.unlock(&KeySecret::from_keyfile(&stored)?).map_err(prefix);
        }
        Err(Error::new(
            ErrorKind::KeyRequired,
            format!(
                "vault {name} is encrypted and no key was given: pass --keyfile PATH or --passphrase-env VAR, or keep its key on this appliance with `blockvault vault key store {name}`"
            ),
        ))
    }

    /// Whether the appliance's key store holds a key file for vault `vault_id`.
    pub fn key_stored(&self, vault_id: &str) -> bool {
        keys::stored_key_path(&self.data, vault_id).exists()
    }

    /// The key wrappings of vault `name` (no key needed).
    pub fn vault_keys(&self, name: &str) -> Result<Vec<KeyView>> {
        let v = Vault::open(&self.catalog.vault(name)?.path)?;
        if !v.is_encrypted() {
            return Err(Error::config(format!("vault {name} is not encrypted")));
        }
        Ok(v.key_wrappings().iter().map(KeyView::from).collect())
    }

    /// Wrap vault `name`'s key with one more secret (the vault is unlocked with this
    /// `App`'s key first).
    pub fn add_vault_key(
        &self,
        name: &str,
        secret: &KeySecret,
        label: Option<&str>,
    ) -> Result<KeyView> {
        let mut v = self.open_vault(name)?;
        Ok(KeyView::from(&v.add_key(secret, label)?))
    }

    /// Remove wrapping `id` of vault `name` (never the last one).
    pub fn remove_vault_key(&self, name: &str, id: &str) -> Result<KeyView> {
        let mut v = self.open_vault(name)?;
        Ok(KeyView::from(&v.remove_key(id)?))
    }

    /// The paper recovery key of vault `name`.
    pub fn paper_key(&self, name: &str) -> Result<zeroize::Zeroizing<String>> {
        self.open_vault(name)?.paper_key()
    }

    /// Keep a key of vault `name` in the appliance's key store so that scheduled
    /// backups run unattended: a new key file (root-only, 0600) wrapping the vault key
    /// as "appliance key store" (revocable with `vault key remove`). Returns its path.
    pub fn store_vault_key(&self, name: &str) -> Result<PathBuf> {
        let mut v = self.open_vault(name)?;
        if !v.is_encrypted() {
            return Err(Error::config(format!("vault {name} is not encrypted")));
        }
        keys::ensure_key_store(&self.data)?;
        let path = keys::stored_key_path(&self.data, &v.config().id);
        if path.exists() {
            return Err(Error::conflict(format!(
                "the key store already holds a key of vault {name} ({})",
                path.display()
            )));
        }
        let text = keys::new_keyfile_text();
        let tmp = path.with_extension("key.new");
        let _ = std::fs::remove_file(&tmp);
        keys::write_private(&tmp, text.as_bytes())?;
        let secret = KeySecret::from_keyfile(&tmp)?;
        let added = v.add_key(&secret, Some("appliance key store"));
        if let Err(e) = added {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("storing the key as {}", path.display()), e))?;
        Ok(path)
    }
}

/// Write a new random key file at `path` (0600; refuses to replace a file).
pub fn new_keyfile(path: &Path) -> Result<()> {
    keys::write_private(path, keys::new_keyfile_text().as_bytes())
}

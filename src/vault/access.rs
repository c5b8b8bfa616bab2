//! The unlocking side of an encrypted [`Vault`]: whether it is sealed, opening it with a
//! secret, the codec every blob and manifest goes through, and the wrappings of its key
//! (add, remove, paper key). How a key is wrapped at rest is `keys`'.

use super::Vault;
use super::keys::{self, KeySecret, Wrapping};
use crate::chunk::{BlobCodec, VaultKey};
use crate::error::{Error, ErrorKind, Result};

impl Vault {
    /// Whether the vault's blobs and manifests are sealed.
    pub fn is_encrypted(&self) -> bool {
        self.config.encryption.is_some()
    }

    /// Whether blobs can be read and written: a plaintext vault, or an unlocked one.
    pub fn is_unlocked(&self) -> bool {
        self.codec.is_some()
    }

    /// Unlock an encrypted vault with `secret` (`WrongKey` when it opens no wrapping).
    pub fn unlock(&mut self, secret: &KeySecret) -> Result<()> {
        let Some(enc) = &self.config.encryption else {
            return Ok(());
        };
        let key = keys::unlock(
            &self.display_name(),
            enc.wrap_id(&self.config.id),
            enc,
            secret,
        )?;
        self.codec = Some(BlobCodec::sealed(&key)?);
        self.key = Some(key);
        Ok(())
    }

    /// The codec every blob and manifest of this vault goes through; `KeyRequired`
    /// while an encrypted vault is locked.
    pub fn codec(&self) -> Result<&BlobCodec> {
        self.codec.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::KeyRequired,
                format!(
                    "vault {} is encrypted and no key was given: pass --keyfile PATH or --passphrase-env VAR (or keep its key on the appliance with `vault key store`)",
                    self.display_name()
                ),
            )
        })
    }

    fn display_name(&self) -> String {
        self.root.display().to_string()
    }

    /// The vault key of an unlocked encrypted vault (a replica is created with it).
    pub fn unlocked_key(&self) -> Result<&VaultKey> {
        self.codec()?;
        self.key
            .as_ref()
            .ok_or_else(|| Error::config(format!("vault {} is not encrypted", self.display_name())))
    }

    /// The wrappings of the vault key (none in a plaintext vault).
    pub fn key_wrappings(&self) -> &[Wrapping] {
        self.config
            .encryption
            .as_ref()
            .map_or(&[], |e| e.keys.as_slice())
    }

    /// Wrap the (unlocked) vault key with one more secret; returns the new wrapping.
    pub fn add_key(&mut self, secret: &KeySecret, label: Option<&str>) -> Result<Wrapping> {
        let wrap_id = self
            .config
            .encryption
            .as_ref()
            .map_or(self.config.id.as_str(), |e| e.wrap_id(&self.config.id))
            .to_string();
        let w = keys::wrap(&wrap_id, self.unlocked_key()?, secret, label)?;
        let mut config = self.config.clone();
        if let Some(enc) = config.encryption.as_mut() {
            enc.keys.push(w.clone());
        }
        self.write_config(config)?;
        Ok(w)
    }

    /// Remove wrapping `id` (the vault must be unlocked). Removing the last one is
    /// refused: nothing could open the vault any more.
    pub fn remove_key(&mut self, id: &str) -> Result<Wrapping> {
        self.unlocked_key()?;
        let mut config = self.config.clone();
        let Some(enc) = config.encryption.as_mut() else {
            return Err(Error::config("the vault is not encrypted"));
        };
        let Some(pos) = enc.keys.iter().position(|w| w.id == id) else {
            return Err(Error::not_found(format!(
                "vault {} has no key wrapping {id:?} (`vault key list` shows them)",
                self.display_name()
            )));
        };
        if enc.keys.len() == 1 {
            return Err(Error::conflict(format!(
                "key wrapping {id} is the last one of vault {}: removing it would leave nothing that opens the vault; add another key first",
                self.display_name()
            )));
        }
        let w = enc.keys.remove(pos);
        self.write_config(config)?;
        Ok(w)
    }

    /// The paper recovery key of the (unlocked) vault.
    pub fn paper_key(&self) -> Result<zeroize::Zeroizing<String>> {
        Ok(keys::paper(&self.config.id, self.unlocked_key()?))
    }
}

impl Vault {
    /// Become an encrypted vault with the key material `enc` of another vault (its
    /// wrappings and key check; never the key itself), as a mirror vault does when an
    /// encrypted vault first pushes to it: the sealed blobs and manifests that follow
    /// then mean the same here, and the same key files or passphrases open it. Only an
    /// empty plaintext vault (no manifest, no pack) takes it; one that has the same key
    /// already is left as it is (returns false). `enc.wrapped_for` must name the vault
    /// id its wrappings are bound to.
    pub fn adopt_encryption(&mut self, enc: &keys::EncryptionConfig) -> Result<bool> {
        if let Some(mine) = &self.config.encryption {
            if mine.key_check == enc.key_check {
                return Ok(false);
            }
            return Err(Error::conflict(format!(
                "vault {} is encrypted with another vault key: it cannot take the pushing vault's",
                self.display_name()
            )));
        }
        if enc.wrapped_for.is_none() || enc.keys.is_empty() {
            return Err(Error::invalid(
                "key material without wrappings or the vault id they are bound to",
            ));
        }
        let holds = !self.store().list_files("backups")?.is_empty()
            || !self.store().list_files("packs")?.is_empty();
        if holds {
            return Err(Error::conflict(format!(
                "vault {} holds plaintext backups or packs: only an empty vault can become the encrypted mirror of an encrypted vault; create a new mirror vault for it",
                self.display_name()
            )));
        }
        let mut config = self.config.clone();
        config.encryption = Some(enc.clone());
        self.write_config(config)?;
        self.codec = None;
        Ok(true)
    }
}

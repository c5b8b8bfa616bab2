//! Vaults on S3-compatible object storage: their local state directory.
//!
//! The vault itself (vault.toml, packs, manifests) lives in the bucket, laid out as a
//! local vault is (see `store`). What is local to one appliance lives in a state
//! directory, by default `<data>/vaults/<name>/`:
//!
//! ```text
//! <state>/s3.toml                 bucket, prefix, endpoint, region (no secrets)
//! <state>/s3-credentials.toml     access_key_id, secret_access_key; mode 0600; optional
//! <state>/s3-config.toml          name = "NAME", config = "/etc/…/blockvault.toml"; optional
//! <state>/cache/lookup.sqlite     lookup cache, rebuilt from the pack trailers when lost
//! <state>/locks/vault.lock        flock of this appliance (beside the lease objects)
//! <state>/locks/pins/             pins of this appliance's readers
//! <state>/spool/                  packs being written, before their PUT
//! ```
//!
//! Credentials come, first that applies, from the `[s3.NAME]` table of a config file when
//! the vault was created (or attached) with `--s3-config NAME` (`<state>/s3-config.toml`
//! remembers the name and the config file, no secret; the credential files it names are
//! read at every connect, so a rotated key is picked up), from
//! `<state>/s3-credentials.toml`, else from the standard `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY` environment variables. `vault create --s3` and `vault attach
//! --s3` without `--s3-config` save the environment's key there so that the service can
//! open the vault later; they are never taken from arguments.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::chunk::ChunkSize;
use crate::error::{Error, IoContext, Result};

use super::Vault;
use super::keys::KeySecret;
use super::store::{S3Credentials, S3Location, S3Store, write_atomic};
use crate::chunk::VaultKey;

/// Marks a state directory of an object-store vault.
pub const LOCATION_FILE: &str = "s3.toml";
const CREDENTIALS_FILE: &str = "s3-credentials.toml";
const PROFILE_FILE: &str = "s3-config.toml";

/// A vault's credentials by name: `[s3.NAME]` of the config file `config` (absolute).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Profile {
    pub name: String,
    pub config: std::path::PathBuf,
}

impl S3Profile {
    /// The `[s3.NAME]` table, loaded from the config file now.
    pub fn table(&self) -> Result<crate::config::S3Config> {
        let c = crate::config::Config::load(&self.config).map_err(Error::config)?;
        c.s3.get(&self.name).cloned().ok_or_else(|| {
            Error::config(format!(
                "{} has no [s3.{}] (it names {}): add it, or give the vault credentials another way",
                self.config.display(),
                self.name,
                if c.s3.is_empty() {
                    "none".to_string()
                } else {
                    c.s3.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ))
        })
    }

    /// The credentials its `[s3.NAME]` names, read from their files now.
    pub fn credentials(&self) -> Result<S3Credentials> {
        let (id, secret) = self.table()?.read_credentials()?;
        Ok(S3Credentials {
            access_key_id: id,
            secret_access_key: secret,
        })
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).ctx(|| format!("reading {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| Error::config(format!("{} is not valid", path.display())).with_source(e))
}

/// The credentials of the vault whose state is in `state`.
pub fn credentials(state: &Path) -> Result<S3Credentials> {
    let profile = state.join(PROFILE_FILE);
    if profile.exists() {
        let p: S3Profile = read_toml(&profile)?;
        return p.credentials();
    }
    let file = state.join(CREDENTIALS_FILE);
    if file.exists() {
        return read_toml(&file);
    }
    S3Credentials::from_env().ok_or_else(|| {
        Error::config(format!(
            "no S3 credentials for the vault in {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (or put access_key_id and secret_access_key in {}, mode 0600)",
            state.display(),
            file.display()
        ))
    })
}

/// Connect to the store of the vault whose state is in `state`.
pub fn connect(state: &Path) -> Result<S3Store> {
    let location: S3Location = read_toml(&state.join(LOCATION_FILE))?;
    S3Store::new(location, &credentials(state)?)
}

/// The location of the vault whose state is in `state`, if it is on object storage.
pub fn location(state: &Path) -> Option<S3Location> {
    read_toml(&state.join(LOCATION_FILE)).ok()
}

/// Write the state directory's description of `location` (and the environment's
/// credentials, 0600, when set).
fn write_state(state: &Path, location: &S3Location, profile: Option<&S3Profile>) -> Result<()> {
    if state.join(LOCATION_FILE).exists() || state.join("vault.toml").exists() {
        return Err(Error::conflict(format!(
            "{} already describes a vault",
            state.display()
        )));
    }
    fs::create_dir_all(state).ctx(|| format!("creating {}", state.display()))?;
    let text =
        toml::to_string(location).map_err(|e| Error::invalid("encoding s3.toml").with_source(e))?;
    if let Some(p) = profile {
        let text = toml::to_string(p)
            .map_err(|e| Error::invalid("encoding s3-config.toml").with_source(e))?;
        write_atomic(&state.join(PROFILE_FILE), text.as_bytes())?;
    } else if let Some(creds) = S3Credentials::from_env() {
        let text = toml::to_string(&creds)
            .map_err(|e| Error::invalid("encoding the S3 credentials").with_source(e))?;
        let path = state.join(CREDENTIALS_FILE);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .ctx(|| format!("writing {}", path.display()))?;
    }
    write_atomic(&state.join(LOCATION_FILE), text.as_bytes())
}

/// Forget the state directory's description of its vault (an attach that did not go
/// through, e.g. without the key of an encrypted vault).
pub fn detach(state: &Path) {
    undo_state(state);
}

fn undo_state(state: &Path) {
    let _ = fs::remove_file(state.join(LOCATION_FILE));
    let _ = fs::remove_file(state.join(CREDENTIALS_FILE));
    let _ = fs::remove_file(state.join(PROFILE_FILE));
}

/// Create a vault at `location`, with local state in `state`: in compliance mode with
/// `compliance_days`, encrypted with the vault key `encrypt` gives, wrapped by its secret
/// (see [`Vault::create_keyed`]; the wrappings live in the bucket's `vault.toml`, so
/// whoever attaches the bucket needs the key too).
pub fn create(
    state: &Path,
    location: &S3Location,
    chunk_size: ChunkSize,
    zstd_level: i32,
    compliance_days: Option<u32>,
    encrypt: Option<(&KeySecret, VaultKey)>,
) -> Result<Vault> {
    create_with(
        state,
        location,
        None,
        chunk_size,
        zstd_level,
        compliance_days,
        encrypt,
    )
}

/// [`create`] with the credentials of `profile` (remembered in the state) instead of
/// the environment's.
pub fn create_with(
    state: &Path,
    location: &S3Location,
    profile: Option<&S3Profile>,
    chunk_size: ChunkSize,
    zstd_level: i32,
    compliance_days: Option<u32>,
    encrypt: Option<(&KeySecret, VaultKey)>,
) -> Result<Vault> {
    write_state(state, location, profile)?;
    let made = connect(state).and_then(|store| {
        Vault::create_keyed(
            Arc::new(store),
            state,
            true,
            chunk_size,
            zstd_level,
            compliance_days,
            encrypt,
        )
    });
    if made.is_err() {
        undo_state(state);
    }
    made
}

/// Attach the existing vault at `location`, with local state in `state`.
pub fn attach(state: &Path, location: &S3Location) -> Result<Vault> {
    attach_with(state, location, None)
}

/// [`attach`] with the credentials of `profile` (remembered in the state).
pub fn attach_with(
    state: &Path,
    location: &S3Location,
    profile: Option<&S3Profile>,
) -> Result<Vault> {
    write_state(state, location, profile)?;
    let opened = connect(state).and_then(|store| Vault::open_in(Arc::new(store), state, true));
    if opened.is_err() {
        undo_state(state);
    }
    opened
}

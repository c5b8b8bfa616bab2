//! The vault key at rest: how an encrypted vault's key is wrapped in `vault.toml`, how a
//! key file, a passphrase or a paper recovery key opens it, and the appliance's key
//! store. The key itself and what it protects are `chunk::seal`'s.
//!
//! The vault key (32 random bytes) is never stored in clear. `vault.toml` holds:
//!
//! ```toml
//! [encryption]
//! cipher = "aes-256-gcm"          # blobs and manifests
//! digest = "blake3-keyed"         # chunk digests
//! key_check = "<32 hex>"          # blake3 derive_key("… vault key check", key)[..16]
//!
//! [[encryption.keys]]             # one per wrapping; at least one
//! id = "<8 hex>"                  # random, names the wrapping (`vault key remove ID`)
//! kind = "passphrase"             # or "keyfile"
//! created = "<RFC 3339>"
//! label = "…"                     # optional
//! salt = "<32 hex>"               # passphrase: Argon2id salt (16 random bytes)
//! argon2 = [19456, 2, 1]          # passphrase: memory KiB, iterations, lanes
//! fingerprint = "<16 hex>"        # keyfile: blake3 derive_key("… key file fingerprint", file key)[..8]
//! nonce = "<24 hex>"              # random
//! wrapped = "<96 hex>"            # AES-256-GCM(KEK, nonce, vault key) ‖ tag,
//!                                 # associated data "blockvault key wrapping v1" ‖ vault id ‖ id
//! ```
//!
//! A mirror vault that took its key material from the vault that pushes to it (see
//! `Vault::adopt_encryption`) also has `wrapped_for = "<vault id>"` in `[encryption]`:
//! the vault id its wrappings are bound to (the source's), used in place of its own.
//!
//! The KEK (key-encryption key) is Argon2id(passphrase, salt) or blake3
//! `derive_key("… key file wrapping", file key)` (a key file holds 32 random bytes, so it
//! needs no stretching). The wrapping's own GCM tag tells a wrong key apart from damage:
//! a passphrase that opens no wrapping, or a key file whose fingerprint matches none, is
//! [`ErrorKind::WrongKey`]; a wrapping whose fingerprint matches but whose tag fails, or
//! an unwrapped key that does not match `key_check`, is `Corrupt` (vault.toml was
//! altered).
//!
//! Key files: 32 raw bytes, or 64 hex digits (whitespace ignored), or a paper recovery
//! key ([`paper`]), which is the vault key itself, recognised by `key_check`.
//!
//! The appliance's key store is `<data>/keys/<vault id>.key` (directory 0700, files 0600):
//! a key file kept there opens the vault for scheduled backups.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::chunk::VaultKey;
use crate::chunk::seal::{aes_key, open_detached, seal_detached};
use crate::error::{Error, ErrorKind, IoContext, Result};

const KEYFILE_WRAP_CONTEXT: &str = "blockvault 2026-11 key file wrapping";
const KEYFILE_FP_CONTEXT: &str = "blockvault 2026-11 key file fingerprint";
const WRAP_AAD: &[u8] = b"blockvault key wrapping v1";
const PAPER_TITLE: &str = "BLOCKVAULT RECOVERY KEY";

/// `[encryption]` of vault.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    pub cipher: String,
    pub digest: String,
    pub key_check: String,
    pub keys: Vec<Wrapping>,
    /// The vault id the wrappings are bound to when it is not this vault's own: a mirror
    /// vault that took another vault's key material as it is (`Vault::adopt_encryption`;
    /// `wrapped_for = "<vault id>"` in vault.toml), so the same key files and
    /// passphrases open both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_for: Option<String>,
}

impl EncryptionConfig {
    /// The vault id that wrappings of vault `vault_id` are bound to.
    pub fn wrap_id<'a>(&'a self, vault_id: &'a str) -> &'a str {
        self.wrapped_for.as_deref().unwrap_or(vault_id)
    }
}

/// What opens a wrapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WrappingKind {
    Passphrase,
    Keyfile,
}

impl WrappingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WrappingKind::Passphrase => "passphrase",
            WrappingKind::Keyfile => "keyfile",
        }
    }
}

/// One wrapping of the vault key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wrapping {
    pub id: String,
    pub kind: WrappingKind,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argon2: Option<[u32; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub nonce: String,
    pub wrapped: String,
}

/// A secret that may open a vault. Its `Debug` hides it; it is never logged or printed.
pub enum KeySecret {
    /// A passphrase (read from an environment variable).
    Passphrase(Zeroizing<String>),
    /// The 32 bytes of a key file.
    KeyFile(Zeroizing<[u8; 32]>),
    /// The vault key itself (a paper recovery key).
    Recovery(VaultKey),
}

impl std::fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self {
            KeySecret::Passphrase(_) => "passphrase",
            KeySecret::KeyFile(_) => "key file",
            KeySecret::Recovery(_) => "recovery key",
        };
        write!(f, "KeySecret({what}, <hidden>)")
    }
}

impl KeySecret {
    /// The passphrase in environment variable `var` (the passphrase never passes argv).
    pub fn from_env(var: &str) -> Result<KeySecret> {
        let value = std::env::var(var).map_err(|_| {
            Error::config(format!(
                "--passphrase-env {var}: the environment variable {var} is not set (or not UTF-8)"
            ))
        })?;
        if value.is_empty() {
            return Err(Error::config(format!(
                "--passphrase-env {var}: the passphrase in {var} is empty"
            )));
        }
        Ok(KeySecret::Passphrase(Zeroizing::new(value)))
    }

    /// The key in file `path`: 32 raw bytes, 64 hex digits, or a paper recovery key.
    pub fn from_keyfile(path: &Path) -> Result<KeySecret> {
        let bytes =
            Zeroizing::new(fs::read(path).ctx(|| format!("reading key file {}", path.display()))?);
        parse_keyfile(&bytes).map_err(|e| e.context_prefix(format!("key file {}", path.display())))
    }
}

fn parse_keyfile(bytes: &[u8]) -> Result<KeySecret> {
    if bytes.len() == 32 {
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(bytes);
        return Ok(KeySecret::KeyFile(k));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Error::config("holds neither 32 raw bytes nor 64 hex digits"))?;
    if text.contains(PAPER_TITLE) {
        return Ok(KeySecret::Recovery(parse_paper(text)?));
    }
    let digits: Zeroizing<String> =
        Zeroizing::new(text.chars().filter(|c| !c.is_whitespace()).collect());
    let mut k = Zeroizing::new([0u8; 32]);
    if digits.len() != 64 || hex::decode_to_slice(digits.as_bytes(), k.as_mut()).is_err() {
        return Err(Error::config(
            "holds neither 32 raw bytes nor 64 hex digits nor a paper recovery key",
        ));
    }
    Ok(KeySecret::KeyFile(k))
}

/// A new key file's contents: 32 random bytes as 64 hex digits and a newline.
pub fn new_keyfile_text() -> Zeroizing<String> {
    let mut s = Zeroizing::new(hex::encode(rand::random::<[u8; 32]>()));
    s.push('\n');
    s
}

/// Write `text` to `path` readable by its owner only (0600), refusing to replace a file.
pub fn write_private(path: &Path, text: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::AlreadyExists {
                ErrorKind::Conflict
            } else {
                ErrorKind::Io
            };
            Error::new(kind, format!("writing key file {}", path.display())).with_source(e)
        })?;
    f.write_all(text)
        .and_then(|()| f.sync_all())
        .ctx(|| format!("writing key file {}", path.display()))
}

/// A new encryption section for a new vault: its key wrapped by `secret`.
pub fn new_encryption(
    vault_id: &str,
    key: &VaultKey,
    secret: &KeySecret,
    label: Option<&str>,
) -> Result<EncryptionConfig> {
    Ok(EncryptionConfig {
        cipher: "aes-256-gcm".into(),
        digest: "blake3-keyed".into(),
        key_check: key.check_value(),
        keys: vec![wrap(vault_id, key, secret, label)?],
        wrapped_for: None,
    })
}

/// Wrap `key` with `secret` (a recovery key cannot wrap: it is the key).
pub fn wrap(
    vault_id: &str,
    key: &VaultKey,
    secret: &KeySecret,
    label: Option<&str>,
) -> Result<Wrapping> {
    let id = hex::encode(rand::random::<[u8; 4]>());
    let (kind, salt, argon2, fingerprint, kek) = match secret {
        KeySecret::Passphrase(p) => {
            let salt: [u8; 16] = rand::random();
            let params = argon2::Params::DEFAULT_M_COST;
            let cost = [
                params,
                argon2::Params::DEFAULT_T_COST,
                argon2::Params::DEFAULT_P_COST,
            ];
            let kek = argon2_kek(p, &salt, cost)?;
            (
                WrappingKind::Passphrase,
                Some(hex::encode(salt)),
                Some(cost),
                None,
                kek,
            )
        }
        KeySecret::KeyFile(k) => (
            WrappingKind::Keyfile,
            None,
            None,
            Some(keyfile_fingerprint(k)),
            Zeroizing::new(blake3::derive_key(KEYFILE_WRAP_CONTEXT, k.as_ref())),
        ),
        KeySecret::Recovery(_) => {
            return Err(Error::config(
                "a paper recovery key is the vault key itself: it opens the vault but cannot be added as a wrapping; add a key file or a passphrase",
            ));
        }
    };
    let nonce: [u8; 12] = rand::random();
    let mut buf = key.as_bytes().to_vec();
    let tag = seal_detached(&aes_key(&kek)?, nonce, &wrap_aad(vault_id, &id), &mut buf)
        .map_err(|e| e.context_prefix("wrapping the vault key"))?;
    buf.extend_from_slice(&tag);
    Ok(Wrapping {
        id,
        kind,
        created: crate::manifest::now_rfc3339(),
        label: label.map(str::to_owned),
        salt,
        argon2,
        fingerprint,
        nonce: hex::encode(nonce),
        wrapped: hex::encode(buf),
    })
}

/// Open the vault key of vault `vault_id` (named `name` in messages) with `secret`.
pub fn unlock(
    name: &str,
    vault_id: &str,
    enc: &EncryptionConfig,
    secret: &KeySecret,
) -> Result<VaultKey> {
    let key = match secret {
        KeySecret::Recovery(k) => {
            if k.check_value() != enc.key_check {
                return Err(Error::new(
                    ErrorKind::WrongKey,
                    format!("the recovery key is not the key of vault {name}"),
                ));
            }
            return Ok(k.clone());
        }
        KeySecret::KeyFile(k) => {
            let fp = keyfile_fingerprint(k);
            let w = enc
                .keys
                .iter()
                .find(|w| w.kind == WrappingKind::Keyfile && w.fingerprint.as_deref() == Some(&fp))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::WrongKey,
                        format!(
                            "wrong key: the key file is not one of vault {name}'s keys (`vault key list {name}` shows them)"
                        ),
                    )
                })?;
            let kek = Zeroizing::new(blake3::derive_key(KEYFILE_WRAP_CONTEXT, k.as_ref()));
            unwrap_with(vault_id, w, &kek)?.ok_or_else(|| {
                Error::corrupt(format!(
                    "key wrapping {} of vault {name} matches the key file but fails authentication: vault.toml was altered",
                    w.id
                ))
            })?
        }
        KeySecret::Passphrase(p) => {
            let mut found = None;
            let wrappings: Vec<&Wrapping> = enc
                .keys
                .iter()
                .filter(|w| w.kind == WrappingKind::Passphrase)
                .collect();
            for w in &wrappings {
                let salt = hex::decode(w.salt.as_deref().unwrap_or_default()).map_err(|_| {
                    Error::corrupt(format!("key wrapping {} of vault {name}: bad salt", w.id))
                })?;
                let cost = w.argon2.ok_or_else(|| {
                    Error::corrupt(format!(
                        "key wrapping {} of vault {name}: no argon2 parameters",
                        w.id
                    ))
                })?;
                let kek = argon2_kek(p, &salt, cost)?;
                if let Some(k) = unwrap_with(vault_id, w, &kek)? {
                    found = Some(k);
                    break;
                }
            }
            found.ok_or_else(|| {
                Error::new(
                    ErrorKind::WrongKey,
                    format!(
                        "wrong passphrase: it opens none of vault {name}'s {} passphrase wrapping(s)",
                        wrappings.len()
                    ),
                )
            })?
        }
    };
    if key.check_value() != enc.key_check {
        return Err(Error::corrupt(format!(
            "vault {name}: the unwrapped key does not match key_check: vault.toml was altered"
        )));
    }
    Ok(key)
}

/// `Ok(None)` when the tag fails (wrong KEK, or an altered wrapping).
fn unwrap_with(vault_id: &str, w: &Wrapping, kek: &[u8; 32]) -> Result<Option<VaultKey>> {
    let bad = || Error::corrupt(format!("key wrapping {} is malformed", w.id));
    let nonce = hex::decode(&w.nonce).map_err(|_| bad())?;
    let wrapped = hex::decode(&w.wrapped).map_err(|_| bad())?;
    if nonce.len() != 12 || wrapped.len() != 48 {
        return Err(bad());
    }
    let mut buf = Zeroizing::new(wrapped[..32].to_vec());
    let ok = open_detached(
        &aes_key(kek)?,
        &nonce,
        &wrap_aad(vault_id, &w.id),
        &mut buf,
        &wrapped[32..],
    );
    if !ok {
        return Ok(None);
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&buf);
    let key = VaultKey::from_bytes(k);
    zeroize::Zeroize::zeroize(&mut k);
    Ok(Some(key))
}

fn wrap_aad(vault_id: &str, wrapping_id: &str) -> Vec<u8> {
    [WRAP_AAD, vault_id.as_bytes(), wrapping_id.as_bytes()].concat()
}

fn keyfile_fingerprint(k: &[u8; 32]) -> String {
    hex::encode(&blake3::derive_key(KEYFILE_FP_CONTEXT, k)[..8])
}

fn argon2_kek(pass: &str, salt: &[u8], cost: [u32; 3]) -> Result<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(cost[0], cost[1], cost[2], Some(32))
        .map_err(|e| Error::corrupt(format!("bad argon2 parameters {cost:?}: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(pass.as_bytes(), salt, out.as_mut())
        .map_err(|e| Error::config(format!("deriving a key from the passphrase: {e}")))?;
    Ok(out)
}

/// The paper recovery key of a vault: its key in four numbered lines of four groups of
/// four hex digits, each line ending with a 4-digit check of that line (so a typo is
/// found and placed):
///
/// ```text
/// BLOCKVAULT RECOVERY KEY
/// vault <id>
/// 1  a1b2-c3d4-e5f6-0718  9c3e
/// 2  …
/// ```
pub fn paper(vault_id: &str, key: &VaultKey) -> Zeroizing<String> {
    let mut s = Zeroizing::new(format!("{PAPER_TITLE}\nvault {vault_id}\n"));
    for (i, part) in key.as_bytes().chunks(8).enumerate() {
        let line = i as u8 + 1;
        let groups: Vec<String> = part.chunks(2).map(hex::encode).collect();
        s.push_str(&format!(
            "{line}  {}  {}\n",
            groups.join("-"),
            paper_check(line, part)
        ));
    }
    s
}

fn paper_check(line: u8, part: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&[line]);
    h.update(part);
    hex::encode(&h.finalize().as_bytes()[..2])
}

fn parse_paper(text: &str) -> Result<VaultKey> {
    let mut key = Zeroizing::new([0u8; 32]);
    let mut seen = [false; 4];
    for raw in text.lines() {
        let mut words = raw.split_whitespace();
        let Some(n) = words.next().and_then(|w| w.parse::<u8>().ok()) else {
            continue;
        };
        if !(1..=4).contains(&n) {
            continue;
        }
        let (Some(groups), Some(check), None) = (words.next(), words.next(), words.next()) else {
            return Err(Error::config(format!(
                "paper recovery key line {n}: expected `{n}  xxxx-xxxx-xxxx-xxxx  cccc`"
            )));
        };
        let digits: String = groups.chars().filter(|c| *c != '-').collect();
        let part = &mut key[(n as usize - 1) * 8..n as usize * 8];
        if digits.len() != 16 || hex::decode_to_slice(&digits, part).is_err() {
            return Err(Error::config(format!(
                "paper recovery key line {n}: 16 hex digits expected"
            )));
        }
        if paper_check(n, part) != check.to_ascii_lowercase() {
            return Err(Error::config(format!(
                "paper recovery key line {n} fails its check: a digit of that line was mistyped"
            )));
        }
        seen[n as usize - 1] = true;
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(Error::config(format!(
            "paper recovery key: line {} is missing",
            missing + 1
        )));
    }
    Ok(VaultKey::from_bytes(*key))
}

/// `<data>/keys/<vault id>.key`: the appliance's stored key file of a vault.
pub fn stored_key_path(data: &Path, vault_id: &str) -> PathBuf {
    data.join("keys").join(format!("{vault_id}.key"))
}

/// Make `<data>/keys/` (0700) if needed.
pub fn ensure_key_store(data: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = data.join("keys");
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .ctx(|| format!("making {} root-only", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(p: &str) -> KeySecret {
        KeySecret::Passphrase(Zeroizing::new(p.into()))
    }

    #[test]
    fn wrappings_open_with_their_secret_only() {
        let key = VaultKey::generate();
        let file = match parse_keyfile(new_keyfile_text().as_bytes()).unwrap() {
            KeySecret::KeyFile(k) => k,
            _ => unreachable!(),
        };
        let mut enc = new_encryption("v1", &key, &pass("right horse"), None).unwrap();
        enc.keys
            .push(wrap("v1", &key, &KeySecret::KeyFile(file.clone()), Some("ops")).unwrap());
        assert_eq!(
            unlock("v", "v1", &enc, &pass("right horse"))
                .unwrap()
                .as_bytes(),
            key.as_bytes()
        );
        assert_eq!(
            unlock("v", "v1", &enc, &KeySecret::KeyFile(file.clone()))
                .unwrap()
                .as_bytes(),
            key.as_bytes()
        );
        let wrong = unlock("v", "v1", &enc, &pass("wrong horse")).unwrap_err();
        assert_eq!(wrong.kind(), ErrorKind::WrongKey);
        let other = KeySecret::KeyFile(Zeroizing::new([7; 32]));
        assert_eq!(
            unlock("v", "v1", &enc, &other).unwrap_err().kind(),
            ErrorKind::WrongKey
        );
        // A wrapping moved to another vault does not open.
        assert_eq!(
            unlock("v", "v2", &enc, &pass("right horse"))
                .unwrap_err()
                .kind(),
            ErrorKind::WrongKey
        );
        // An altered key-file wrapping is damage, not a wrong key.
        let mut bad = enc.clone();
        let w = &mut bad.keys[1].wrapped;
        let flipped = if w.starts_with('0') { "1" } else { "0" };
        w.replace_range(0..1, flipped);
        let err = unlock("v", "v1", &bad, &KeySecret::KeyFile(file)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let s = format!("{:?} {err}", pass("right horse"));
        assert!(!s.contains("right horse"));
    }

    #[test]
    fn paper_key_round_trips_and_finds_typos() {
        let key = VaultKey::generate();
        let enc = new_encryption("v1", &key, &pass("p"), None).unwrap();
        let text = paper("v1", &key);
        match parse_keyfile(text.as_bytes()).unwrap() {
            KeySecret::Recovery(k) => assert_eq!(
                unlock("v", "v1", &enc, &KeySecret::Recovery(k))
                    .unwrap()
                    .as_bytes(),
                key.as_bytes()
            ),
            other => panic!("{other:?}"),
        }
        // A mistyped digit on line 3 is named.
        let lines: Vec<&str> = text.lines().collect();
        let line3 = lines[4];
        let pos = 3;
        let c = line3.as_bytes()[pos] as char;
        let typo = if c == 'a' { 'b' } else { 'a' };
        let mut l = line3.to_string();
        l.replace_range(pos..pos + 1, &typo.to_string());
        let mistyped = text.replace(line3, &l);
        let err = parse_keyfile(mistyped.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        // Another vault's paper key is a wrong key.
        let other = paper("v1", &VaultKey::generate());
        let KeySecret::Recovery(k) = parse_keyfile(other.as_bytes()).unwrap() else {
            unreachable!()
        };
        assert_eq!(
            unlock("v", "v1", &enc, &KeySecret::Recovery(k))
                .unwrap_err()
                .kind(),
            ErrorKind::WrongKey
        );
    }

    #[test]
    fn keyfile_formats() {
        assert!(matches!(
            parse_keyfile(&[1u8; 32]).unwrap(),
            KeySecret::KeyFile(_)
        ));
        let hex_text = format!("{}\n", hex::encode([2u8; 32]));
        assert!(matches!(
            parse_keyfile(hex_text.as_bytes()).unwrap(),
            KeySecret::KeyFile(_)
        ));
        assert_eq!(
            parse_keyfile(b"short").unwrap_err().kind(),
            ErrorKind::Config
        );
    }
}

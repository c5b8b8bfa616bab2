//! Named off-site places in the config file: `[remote.NAME]` (a mirror vault on another
//! appliance, the target of `replicate --to-remote NAME` and of replications with
//! `"to_remote": "NAME"`) and `[s3.NAME]` (an S3-compatible endpoint and the files that
//! hold its credentials, for `vault create … --s3 … --s3-config NAME`).
//!
//! API callers only ever name one of these; a URL, token or key never comes from a
//! request body. Secrets are read from their files when used (never at load, so a
//! rotated token is picked up without a restart), never logged, and a secret file that
//! every user may read is refused.
//!
//! ```toml
//! [remote.site-b]
//! url = "https://10.0.0.2:8420/mirror"     # the mirror vault, as `replicate --to` takes it
//! token_file = "/etc/blockvault/site-b.token"   # a `replication` token of site B; 0600
//! fingerprint = "AB:CD:…"                  # SHA-256 of site B's certificate, or:
//! # ca_file = "/etc/blockvault/site-b-ca.pem"
//! bwlimit = "50M"                          # bytes per second (optional)
//!
//! [s3.garage]
//! endpoint = "http://127.0.0.1:3900"
//! region = "garage"
//! access_key_id_file = "/etc/blockvault/s3/garage.id"
//! secret_access_key_file = "/etc/blockvault/s3/garage.secret"
//! # or: credentials_file = "/etc/blockvault/s3/garage.toml"  (access_key_id, secret_access_key)
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};

/// `[remote.NAME]`: a mirror vault on another appliance.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    pub name: String,
    /// `https://HOST:PORT/VAULT` (`http://` only to a loopback address).
    pub url: String,
    /// The file holding the `replication` token (read at use, see [`RemoteConfig::token`]).
    pub token_file: PathBuf,
    /// SHA-256 fingerprint of the mirror appliance's certificate (`AB:CD:…` or hex).
    pub fingerprint: Option<String>,
    /// PEM file of the CA that signed the mirror appliance's certificate.
    pub ca_file: Option<PathBuf>,
    /// Bytes per second at most.
    pub bwlimit: Option<u64>,
}

impl RemoteConfig {
    /// The replication token, read from `token_file` now.
    pub fn token(&self) -> Result<String> {
        let t = read_secret(
            &self.token_file,
            &format!("[remote.{}] token_file", self.name),
        )?;
        if t.is_empty() {
            return Err(Error::config(format!(
                "[remote.{}] token_file {} is empty: put a `replication` token of the mirror appliance in it (`token create NAME --role replication` there)",
                self.name,
                self.token_file.display()
            )));
        }
        Ok(t)
    }
}

/// `[s3.NAME]`: an S3-compatible endpoint and where its credentials are.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Config {
    pub name: String,
    pub endpoint: String,
    pub region: Option<String>,
    pub credentials: S3CredentialFiles,
}

/// Where the access key of an `[s3.NAME]` is.
#[derive(Debug, Clone, PartialEq)]
pub enum S3CredentialFiles {
    /// One file each for the key id and the secret (their whole content, trimmed).
    Split { id: PathBuf, secret: PathBuf },
    /// A TOML file with `access_key_id` and `secret_access_key`.
    Toml(PathBuf),
}

impl S3Config {
    /// The access key id and secret, read from their files now.
    pub fn read_credentials(&self) -> Result<(String, String)> {
        let what = |k: &str| format!("[s3.{}] {k}", self.name);
        let (id, secret) = match &self.credentials {
            S3CredentialFiles::Split { id, secret } => (
                read_secret(id, &what("access_key_id_file"))?,
                read_secret(secret, &what("secret_access_key_file"))?,
            ),
            S3CredentialFiles::Toml(p) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Creds {
                    access_key_id: String,
                    secret_access_key: String,
                }
                let text = read_secret(p, &what("credentials_file"))?;
                // The parse error would quote the file: name the file only.
                let c: Creds = toml::from_str(&text).map_err(|_| {
                    Error::config(format!(
                        "{} {}: not a TOML file with access_key_id and secret_access_key",
                        what("credentials_file"),
                        p.display()
                    ))
                })?;
                (c.access_key_id, c.secret_access_key)
            }
        };
        if id.is_empty() || secret.is_empty() {
            return Err(Error::config(format!(
                "[s3.{}]: the access key id or secret is empty",
                self.name
            )));
        }
        Ok((id, secret))
    }
}

/// The content of secret file `path` (trimmed); refused when every user may read it.
fn read_secret(path: &Path, what: &str) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::new(
            if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::Io
            },
            format!("{what} {}: cannot be read", path.display()),
        )
        .with_source(e)
    })?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(Error::config(format!(
            "{what} {} may be read by every user (mode {:o}): `chmod 600` it (the service refuses world-readable secrets)",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("{what} {}: cannot be read", path.display()), e))?;
    Ok(text.trim().to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemote {
    url: String,
    token_file: PathBuf,
    fingerprint: Option<String>,
    ca_file: Option<PathBuf>,
    bwlimit: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
    endpoint: String,
    region: Option<String>,
    access_key_id_file: Option<PathBuf>,
    secret_access_key_file: Option<PathBuf>,
    credentials_file: Option<PathBuf>,
}

fn check_name(table: &str, name: &str, origin: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "{origin}: [{table}.{name}]: a name is letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

fn absolute(p: &Path, key: &str, origin: &str) -> std::result::Result<(), String> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{origin}: {key} must be an absolute path, got {}",
            p.display()
        ))
    }
}

/// A rate: bytes per second, with an optional K/M/G suffix (powers of 1024) and `/s`.
pub fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown unit in rate {s:?} (K, M or G)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    match num
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
    {
        Some(0) => Err(format!("rate {s:?} would send nothing")),
        Some(n) => Ok(n),
        None => Err(format!("bad rate {s:?} (e.g. \"50M\": 50 MiB per second)")),
    }
}

/// Validate the `[remote.*]` tables.
pub(super) fn remotes(
    raw: BTreeMap<String, RawRemote>,
    origin: &str,
) -> std::result::Result<BTreeMap<String, RemoteConfig>, String> {
    let mut out = BTreeMap::new();
    for (name, r) in raw {
        check_name("remote", &name, origin)?;
        let at = format!("[remote.{name}]");
        if !(r.url.starts_with("https://") || r.url.starts_with("http://")) {
            return Err(format!(
                "{origin}: {at} url must be https://HOST:PORT/VAULT, got {:?}",
                r.url
            ));
        }
        if r.url.contains('@') || r.url.contains('?') {
            return Err(format!(
                "{origin}: {at} url carries credentials or a query: the token goes in token_file"
            ));
        }
        absolute(&r.token_file, &format!("{at} token_file"), origin)?;
        if r.fingerprint.is_some() && r.ca_file.is_some() {
            return Err(format!(
                "{origin}: {at}: give fingerprint or ca_file, not both"
            ));
        }
        if let Some(f) = &r.fingerprint {
            let hex: String = f.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!(
                    "{origin}: {at} fingerprint is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
                ));
            }
        }
        if let Some(ca) = &r.ca_file {
            absolute(ca, &format!("{at} ca_file"), origin)?;
        }
        let bwlimit = r
            .bwlimit
            .as_deref()
            .map(parse_rate)
            .transpose()
            .map_err(|e| format!("{origin}: {at} bwlimit: {e}"))?;
        out.insert(
            name.clone(),
            RemoteConfig {
                name,
                url: r.url,
                token_file: r.token_file,
                fingerprint: r.fingerprint,
                ca_file: r.ca_file,
                bwlimit,
            },
        );
    }
    Ok(out)
}

/// Validate the `[s3.*]` tables.
pub(super) fn s3s(
    raw: BTreeMap<String, RawS3>,
    origin: &str,
) -> std::result::Result<BTreeMap<String, S3Config>, String> {
    let mut out = BTreeMap::new();
    for (name, s) in raw {
        check_name("s3", &name, origin)?;
        let at = format!("[s3.{name}]");
        if !(s.endpoint.starts_with("https://") || s.endpoint.starts_with("http://"))
            || s.endpoint.contains('@')
        {
            return Err(format!(
                "{origin}: {at} endpoint must be http(s)://HOST:PORT without credentials, got {:?}",
                s.endpoint
            ));
        }
        let credentials = match (
            s.access_key_id_file,
            s.secret_access_key_file,
            s.credentials_file,
        ) {
            (Some(id), Some(secret), None) => {
                absolute(&id, &format!("{at} access_key_id_file"), origin)?;
                absolute(&secret, &format!("{at} secret_access_key_file"), origin)?;
                S3CredentialFiles::Split { id, secret }
            }
            (None, None, Some(f)) => {
                absolute(&f, &format!("{at} credentials_file"), origin)?;
                S3CredentialFiles::Toml(f)
            }
            _ => {
                return Err(format!(
                    "{origin}: {at}: give access_key_id_file and secret_access_key_file, or credentials_file"
                ));
            }
        };
        out.insert(
            name.clone(),
            S3Config {
                name,
                endpoint: s.endpoint,
                region: s.region,
                credentials,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::os::unix::fs::PermissionsExt;

    const FP: &str = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF";

    fn remote(extra: &str) -> String {
        format!("[remote.b]\nurl = \"https://10.0.0.2:8420/m\"\ntoken_file = \"/etc/t\"\n{extra}")
    }

    #[test]
    fn a_remote_names_url_token_file_pin_and_rate() {
        let c = Config::from_toml(
            &remote(&format!("fingerprint = \"{FP}\"\nbwlimit = \"50M\"\n")),
            "t.toml",
        )
        .unwrap();
        let r = &c.remotes["b"];
        assert_eq!(r.url, "https://10.0.0.2:8420/m");
        assert_eq!(r.bwlimit, Some(50 << 20));
        assert_eq!(r.fingerprint.as_deref(), Some(FP));
    }

    #[test]
    fn the_example_config_names_a_remote_and_an_s3_location() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/blockvault.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.remotes["site-b"].bwlimit, Some(50 << 20));
        assert!(c.remotes["site-b"].fingerprint.is_some());
        assert_eq!(c.s3["garage"].region.as_deref(), Some("garage"));
    }

    #[test]
    fn bad_remotes_and_s3_tables_are_refused_naming_the_key() {
        for (text, needle) in [
            (remote("token = \"x\"\n"), "unknown field"),
            (
                remote(&format!("fingerprint = \"{FP}\"\nca_file = \"/ca.pem\"\n")),
                "not both",
            ),
            (remote("fingerprint = \"abc\"\n"), "fingerprint"),
            (remote("bwlimit = \"0\"\n"), "bwlimit"),
            (
                "[remote.b]\nurl = \"https://h:1/m\"\ntoken_file = \"rel.token\"\n".into(),
                "token_file must be an absolute path",
            ),
            (
                "[remote.b]\nurl = \"https://x:tok@h:1/m\"\ntoken_file = \"/t\"\n".into(),
                "credentials",
            ),
            (
                "[s3.g]\nendpoint = \"http://h:3900\"\naccess_key_id_file = \"/i\"\n".into(),
                "secret_access_key_file",
            ),
            (
                "[s3.g]\nendpoint = \"http://h:3900\"\ncredentials_file = \"/c\"\nsecret_access_key = \"x\"\n".into(),
                "unknown field",
            ),
        ] {
            let e = Config::from_toml(&text, "t.toml").unwrap_err();
            assert!(e.contains(needle) && e.starts_with("t.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn a_world_readable_token_file_is_refused_and_the_token_is_read_at_use() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("b.token");
        std::fs::write(&tok, "secret-token-1\n").unwrap();
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[remote.b]\nurl = \"https://h:1/m\"\ntoken_file = \"{}\"\n",
            tok.display()
        );
        let c = Config::from_toml(&text, "t.toml").unwrap();
        let e = c.remotes["b"].token().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(!e.to_string().contains("secret-token-1"), "{e}");
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(c.remotes["b"].token().unwrap(), "secret-token-1");
        // Rotated without reloading the config.
        std::fs::write(&tok, "secret-token-2").unwrap();
        assert_eq!(c.remotes["b"].token().unwrap(), "secret-token-2");
    }
}

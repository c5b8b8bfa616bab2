//! A mirror vault on another appliance as a replication target: [`RemoteTarget`]
//! implements [`ReplicaTarget`] over that appliance's HTTPS admin API (the routes of
//! `api::replica`, under `/api/v1/vaults/{name}/replica/`), with a `replication` (or
//! admin) token.
//!
//! - **Trust**: the same client stack as the CLI's remote mode (`tls::client::agent`):
//!   a pinned certificate fingerprint (or a CA file); a certificate that does not match
//!   is refused during the handshake, before the token or any data is sent, and never
//!   retried.
//! - **Token**: given by the caller from a file or the environment (`BLOCKVAULT_REPLICA_TOKEN`,
//!   `--token-file`), sent only in the `Authorization` header; never in the URL, argv or logs.
//! - **Blobs**: each batch of the engine is one `PUT blobs` body (framing in `wire`); the
//!   receiver verifies and lands it durably before answering 200.
//! - **Resume**: a failed request (connection refused or reset, timeout, 502/503/504) is
//!   retried with exponential backoff (0.5 s doubling to 10 s) for up to
//!   [`RemoteOptions::retry_for`]. Before a batch is sent again the target is asked which
//!   of its digests it still lacks, so blobs that landed before the connection dropped
//!   (or the receiving appliance was killed) are not sent twice. A refusal (4xx: token,
//!   role, vault not a mirror, a blob that does not verify) is not retried.
//! - **Encrypted source**: its key material (vault.toml's wrappings and key check, never
//!   the key) goes first (`PUT encryption`) so an empty mirror vault becomes encrypted
//!   with the same vault key; blobs go sealed as stored and manifests sealed by the
//!   source (`PUT manifest/sealed`).
//! - **Bandwidth**: an optional limit in bytes per second ([`RemoteOptions::bwlimit`]), a
//!   token bucket of one second's worth taken before each body is sent.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::chunk::{ChunkDigest, ChunkSize};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::BackupManifest;
use crate::tls::client::Trust;

use super::{RawBlob, ReplicaTarget, TargetInfo, wire};

/// Where and how to reach a mirror vault.
pub struct RemoteOptions {
    /// `https://HOST:PORT/VAULT` (`http://` only to a loopback address).
    pub url: String,
    pub token: String,
    pub trust: Trust,
    /// Bytes per second at most (request bodies); None: unlimited.
    pub bwlimit: Option<u64>,
    /// How long a failing request is retried before the replication fails.
    pub retry_for: Duration,
}

impl RemoteOptions {
    /// The options of a configured `[remote.NAME]`: its token is read from its file now
    /// (never logged); retries for 300 s.
    pub fn from_config(r: &crate::config::RemoteConfig) -> Result<RemoteOptions> {
        let trust = match (&r.fingerprint, &r.ca_file) {
            (Some(f), _) => Trust::Fingerprint(crate::tls::parse_fingerprint(f)?),
            (None, Some(ca)) => Trust::Ca(ca.clone()),
            (None, None) => Trust::PublicRoots,
        };
        Ok(RemoteOptions {
            url: r.url.clone(),
            token: r.token()?,
            trust,
            bwlimit: r.bwlimit,
            retry_for: Duration::from_secs(300),
        })
    }
}

/// Counters of what went over the wire.
#[derive(Debug, Default)]
pub struct WireStats {
    /// Bytes of `PUT blobs` bodies the receiver answered (a body cut by a dropped
    /// connection is not counted: how much of it went is unknown).
    pub body_bytes: AtomicU64,
    /// Requests retried after a transport failure.
    pub retries: AtomicU64,
}

/// A mirror vault on another appliance.
pub struct RemoteTarget {
    base: String,
    auth: String,
    agent: ureq::Agent,
    bucket: Option<Mutex<Bucket>>,
    retry_for: Duration,
    pub stats: WireStats,
}

/// Token bucket: `rate` bytes per second, at most one second's worth saved up.
struct Bucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Wait until `n` bytes may go (a body larger than a second's worth waits for its
    /// share and goes).
    fn take(&mut self, n: u64) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate as f64)
            .min(self.rate as f64);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            // Rate limiting, not synchronisation: the body waits its turn.
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / self.rate as f64));
        }
    }
}

/// `https://HOST:PORT/VAULT` → (`https://HOST:PORT`, `VAULT`).
pub fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            Error::config(format!(
                "mirror target {url:?} is not an https://HOST:PORT/VAULT URL"
            ))
        })?;
    let (host, vault) = rest.split_once('/').ok_or_else(|| {
        Error::config(format!(
            "mirror target {url:?} names no vault: https://HOST:PORT/VAULT"
        ))
    })?;
    let vault = vault.trim_end_matches('/');
    if host.is_empty()
        || vault.is_empty()
        || vault.contains(['/', '?', '#', '@'])
        || host.contains('@')
    {
        return Err(Error::config(format!(
            "mirror target {url:?} is not https://HOST:PORT/VAULT (no credentials or query in the URL; the token comes from a file or BLOCKVAULT_REPLICA_TOKEN)"
        )));
    }
    crate::name::Name::parse(vault, "vault")?;
    Ok((
        format!("{}://{host}", &url[..url.find("://").unwrap_or(0)]),
        vault.to_string(),
    ))
}

fn is_loopback_host(base: &str) -> bool {
    let host = base.split("://").nth(1).unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What a failed request means for the retry loop.
enum Failure {
    /// Worth retrying (connection dropped, appliance restarting).
    Transient(String),
    Final(Error),
}

impl RemoteTarget {
    pub fn new(o: RemoteOptions) -> Result<RemoteTarget> {
        let (base, vault) = split_url(&o.url)?;
        if base.starts_with("http://") && !is_loopback_host(&base) {
            return Err(Error::config(format!(
                "refusing to send the replication token in clear to {base}: use https:// with a pinned fingerprint"
            )));
        }
        if o.token.trim().is_empty() {
            return Err(Error::config(
                "no replication token: put it in a file (--token-file) or BLOCKVAULT_REPLICA_TOKEN; create one on the mirror appliance with `token create NAME --role replication`",
            ));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(300)))
            .build();
        Ok(RemoteTarget {
            base: format!("{base}/api/v1/vaults/{vault}/replica"),
            auth: format!("Bearer {}", o.token.trim()),
            agent: crate::tls::client::agent(config, &o.trust)?,
            bucket: o.bwlimit.filter(|r| *r > 0).map(|rate| {
                Mutex::new(Bucket {
                    rate,
                    tokens: rate as f64,
                    at: Instant::now(),
                })
            }),
            retry_for: o.retry_for,
            stats: WireStats::default(),
        })
    }

    /// One request: `body` is JSON or the binary blob batch.
    fn once(
        &self,
        method: &str,
        path: &str,
        body: &Body<'_>,
    ) -> std::result::Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let r = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            ("POST", Body::Json(v)) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .send_json(v),
            ("PUT", Body::Json(v)) => self
                .agent
                .put(&url)
                .header("Authorization", &self.auth)
                .send_json(v),
            (_, Body::Blobs(b)) => {
                if let Some(bucket) = &self.bucket {
                    bucket
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take(b.len() as u64);
                }
                let r = self
                    .agent
                    .put(&url)
                    .header("Authorization", &self.auth)
                    .header("Content-Type", "application/octet-stream")
                    .send(&b[..]);
                if r.is_ok() {
                    self.stats
                        .body_bytes
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                r
            }
            (m, _) => {
                return Err(Failure::Final(Error::invalid(format!(
                    "{m} {path} is not a mirror request"
                ))));
            }
        };
        let mut resp = match r {
            Ok(r) => r,
            Err(e) => {
                if let Some(msg) = crate::tls::client::refusal(&e) {
                    return Err(Failure::Final(Error::config(format!(
                        "the mirror appliance at {url} was refused before anything was sent: {msg}"
                    ))));
                }
                if crate::tls::client::not_tls(&e) {
                    return Err(Failure::Final(Error::config(format!(
                        "the server at {url} does not speak TLS ({e})"
                    ))));
                }
                return Err(Failure::Transient(format!("{method} {url}: {e}")));
            }
        };
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let msg = format!(
            "the mirror appliance answered {status} to {method} {path}: {}",
            v["error"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_string)
        );
        let kind = match status {
            502..=504 => return Err(Failure::Transient(msg)),
            401 | 403 => ErrorKind::Config,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            413 | 400 => ErrorKind::InvalidFormat,
            422 => ErrorKind::Corrupt,
            507 => ErrorKind::Full,
            _ => ErrorKind::Io,
        };
        Err(Failure::Final(Error::new(kind, msg)))
    }

    /// A request retried with backoff while it fails transiently; `before_retry` runs
    /// before each new attempt (to shrink a blob batch to what is still missing).
    fn call(
        &self,
        method: &str,
        path: &str,
        body: &mut Body<'_>,
        mut before_retry: impl FnMut(&mut Body<'_>) -> Result<bool>,
    ) -> Result<Value> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(500);
        loop {
            match self.once(method, path, body) {
                Ok(v) => return Ok(v),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Transient(msg)) => {
                    if start.elapsed() + wait > self.retry_for {
                        return Err(Error::new(
                            ErrorKind::Unreachable,
                            format!(
                                "{msg}; gave up after {} s of retries (what landed stays: run the replication again)",
                                start.elapsed().as_secs()
                            ),
                        ));
                    }
                    tracing::warn!("mirror request failed, retrying in {wait:?}: {msg}");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(10));
                    if !before_retry(body)? {
                        return Ok(Value::Null);
                    }
                }
            }
        }
    }

    fn ask_missing(&self, digests: &[ChunkDigest]) -> Result<Vec<ChunkDigest>> {
        let mut out = Vec::new();
        for part in digests.chunks(4096) {
            let mut body = Body::Json(json!({"digests": part}));
            let v = self.call("POST", "/missing", &mut body, |_| Ok(true))?;
            let m: Vec<ChunkDigest> = serde_json::from_value(v["missing"].clone())
                .map_err(|e| Error::invalid(format!("the mirror's missing list: {e}")))?;
            out.extend(m);
        }
        Ok(out)
    }
}

/// A request body.
enum Body<'a> {
    Json(Value),
    Blobs(std::borrow::Cow<'a, [u8]>),
}

impl ReplicaTarget for RemoteTarget {
    fn info(&self) -> Result<TargetInfo> {
        let v = self.call("GET", "/info", &mut Body::Json(Value::Null), |_| Ok(true))?;
        let chunk = v["chunk_size"]
            .as_u64()
            .ok_or_else(|| Error::invalid(format!("the mirror's info has no chunk_size: {v}")))?;
        Ok(TargetInfo {
            vault_id: v["vault_id"]
                .as_str()
                .ok_or_else(|| Error::invalid(format!("the mirror's info has no vault_id: {v}")))?
                .to_string(),
            chunk_size: ChunkSize::new(u32::try_from(chunk).map_err(|_| {
                Error::invalid(format!("the mirror's chunk size {chunk} is out of range"))
            })?)?,
            key_check: v["key_check"].as_str().map(str::to_string),
        })
    }

    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<ChunkDigest>> {
        self.ask_missing(digests)
    }

    fn put_blobs(&self, blobs: Vec<RawBlob>) -> Result<u64> {
        if blobs.is_empty() {
            return Ok(0);
        }
        let mut pending = blobs;
        let mut body = Body::Blobs(wire::encode(&pending).into());
        let v = self.call("PUT", "/blobs", &mut body, |b| {
            // The connection dropped: some of the batch may have landed. Send the rest.
            let lack = self.ask_missing(&pending.iter().map(|b| b.digest).collect::<Vec<_>>())?;
            let lack: std::collections::HashSet<_> = lack.into_iter().collect();
            pending.retain(|b| lack.contains(&b.digest));
            if pending.is_empty() {
                return Ok(false);
            }
            *b = Body::Blobs(wire::encode(&pending).into());
            Ok(true)
        })?;
        Ok(v["bytes_written"].as_u64().unwrap_or(0))
    }

    fn has_manifest(&self, manifest: &BackupManifest) -> Result<bool> {
        let body = serde_json::to_value(manifest)
            .map_err(|e| Error::invalid(format!("manifest {}: {e}", manifest.id)))?;
        let v = self.call("POST", "/manifest/present", &mut Body::Json(body), |_| {
            Ok(true)
        })?;
        Ok(v["present"].as_bool().unwrap_or(false))
    }

    fn put_manifest(&self, manifest: &BackupManifest) -> Result<()> {
        let body = serde_json::to_value(manifest)
            .map_err(|e| Error::invalid(format!("manifest {}: {e}", manifest.id)))?;
        self.call("PUT", "/manifest", &mut Body::Json(body), |_| Ok(true))?;
        Ok(())
    }

    fn put_manifest_sealed(&self, manifest: &BackupManifest, sealed: Option<&[u8]>) -> Result<()> {
        let Some(sealed) = sealed else {
            return self.put_manifest(manifest);
        };
        let body = json!({"manifest": manifest, "sealed": hex::encode(sealed)});
        self.call("PUT", "/manifest/sealed", &mut Body::Json(body), |_| {
            Ok(true)
        })?;
        Ok(())
    }

    fn adopt_encryption(&self, enc: &crate::vault::keys::EncryptionConfig) -> Result<bool> {
        let body = serde_json::to_value(enc)
            .map_err(|e| Error::invalid(format!("encoding the key material: {e}")))?;
        let v = self.call("PUT", "/encryption", &mut Body::Json(body), |_| Ok(true))?;
        Ok(v["adopted"].as_bool().unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_url_names_host_and_vault_and_nothing_else() {
        assert_eq!(
            split_url("https://10.0.0.2:8420/mirror").unwrap(),
            ("https://10.0.0.2:8420".to_string(), "mirror".to_string())
        );
        for bad in [
            "https://h:1",
            "https://h:1/",
            "https://h:1/a/b",
            "https://tok@h:1/v",
            "https://h:1/v?token=x",
            "ftp://h/v",
            "mirror",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_bucket_lets_a_second_s_worth_through_at_once_then_paces() {
        let mut b = Bucket {
            rate: 1 << 20,
            tokens: (1 << 20) as f64,
            at: Instant::now(),
        };
        let t = Instant::now();
        b.take(1 << 20);
        assert!(t.elapsed() < Duration::from_millis(200));
        b.take(256 << 10);
        assert!(t.elapsed() >= Duration::from_millis(200));
    }
}

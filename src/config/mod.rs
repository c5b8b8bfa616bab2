//! The appliance's configuration: raw TOML → validated [`Config`] in one step.
//! Every key is optional (defaults below); unknown keys are errors, so a typo is named.
//! `appliance/blockvault.toml` documents every option (a test loads it).
//!
//! Layout: this file holds the validated [`Config`] and its defaults; `parse` turns the
//! raw TOML into it (one `Raw*` struct per table, `deny_unknown_fields`); `alerts` holds
//! the alert kinds and webhook settings with their host allow-list; `remote` the named
//! mirror appliances (`[remote.NAME]`) and S3 endpoints (`[s3.NAME]`); `instant` the
//! `[instant]` table (instant-access exports: address, port range, TLS).

mod alerts;
mod instant;
mod parse;
mod remote;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use alerts::{AlertKind, AlertSettings, Webhook, WebhookSecret, host_allowed, url_host};
pub use instant::InstantConfig;
pub use remote::{RemoteConfig, S3Config, S3CredentialFiles, parse_rate};

/// A named set of freeze/thaw commands (`[hooks.NAME]`), run with `sh -c` around the
/// instant of a server backup. Commands come from this file only: a resource in the API
/// names a set, it never carries a command.
#[derive(Debug, Clone, PartialEq)]
pub struct HookSet {
    pub freeze: Option<String>,
    pub thaw: Option<String>,
    /// Limit for each step.
    pub timeout_seconds: u64,
}

/// `[paths]`: what API callers may name on this host (see `api::confine`). The CLI in
/// local mode is not confined. `None` roots: the defaults under the data dir
/// (`<data>/images`, `<data>/restored`), created when the service starts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PathsConfig {
    /// Directories that hold the image files resources may read (and `nbd+unix://`
    /// sockets they may connect to).
    pub sources: Option<Vec<PathBuf>>,
    /// Directories that restores and exports may write new files into.
    pub restore_to: Option<Vec<PathBuf>>,
    /// NBD servers sources and restore targets may reach: `HOST`, `HOST:PORT` or `*`.
    /// Default: none.
    pub nbd_hosts: Vec<String>,
    /// Directories (or socket paths) of QMP and guest-agent sockets. Default: none.
    pub qmp_sockets: Vec<PathBuf>,
    /// `libvirt:` sources allowed, as written after `libvirt:` (`DOMAIN[?uri=URI]`), or
    /// `*`. Default: none.
    pub libvirt_domains: Vec<String>,
    /// Directories of the CA, certificate and key files a restore onto `nbds://` may
    /// name in its `nbd_tls`. Default: `<data>/nbd-tls`.
    pub nbd_tls: Option<Vec<PathBuf>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[paths]`: confinement of API callers.
    pub paths: PathsConfig,
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub log_level: String,
    /// "text" (default) or "json": JSON lines on stderr.
    pub log_format: String,
    pub max_parallel_tasks: usize,
    pub scheduler_enabled: bool,
    pub gc_after_prune: bool,
    pub shutdown_grace_seconds: u64,
    pub capacity_warn_percent: u8,
    pub webhooks: Vec<Webhook>,
    /// Freeze/thaw hook sets by name.
    pub hooks: BTreeMap<String, HookSet>,
    /// `[live] scratch_dir`: where live backups run by the service put fleecing images,
    /// NBD sockets and libvirt run dirs (default: the temp dir, which is private to the
    /// service under the shipped unit's `PrivateTmp=yes`, so QEMU cannot see it).
    pub scratch_dir: Option<PathBuf>,
    /// `[keys]`: per encrypted vault (by name), the key file that opens it (absolute
    /// path; the file should be root-only). Vaults not named here are opened with the
    /// key file in `<data>/keys/` (`vault key store`), if any.
    pub key_files: BTreeMap<String, PathBuf>,
    /// API connections held at once; over the cap a new connection evicts the oldest
    /// one that has not sent a request yet, or is closed at once (see `api::listen`).
    pub max_connections: usize,
    /// A connection that has not sent a complete request header this long after it was
    /// accepted, or after its previous response (idle keep-alive), is closed.
    pub header_timeout_seconds: u64,
    /// Webhook deliveries waiting to be sent; more are dropped and counted.
    pub alert_queue: usize,
    /// Threads that deliver webhooks.
    pub alert_workers: usize,
    /// `[alerts] retry_seconds`: waits before each retry of a failed delivery.
    pub alert_retry_seconds: Vec<u64>,
    /// `[alerts]` staleness grace, outbox cap and address rule.
    pub alerting: AlertSettings,
    /// `[tasks] keep_days` / `keep_max`: ended tasks older than this, or beyond the
    /// newest `keep_max`, are trimmed from the history by the service.
    pub task_keep_days: u32,
    pub task_keep_max: usize,
    /// `[audit] keep_days` / `keep_max`: audit records older than this, or beyond the
    /// newest `keep_max`, are trimmed by the audit writer.
    pub audit_keep_days: u32,
    pub audit_keep_max: usize,
    /// `[server] tls_cert` / `tls_key`: the administrator's own certificate (PEM, leaf
    /// first) and key; both or neither. Neither: `<data>/tls/`, self-signed at first start.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `[server] plain_http`: serve plain HTTP instead of HTTPS; only on a loopback
    /// listen address (see [`Config::check_tls`]).
    pub plain_http: bool,
    /// `[server] mirror_vaults`: vaults of this appliance that accept backups pushed by
    /// another appliance (`replication` tokens; see `api::replica`). Empty: none.
    pub mirror_vaults: Vec<String>,
    /// `[remote.NAME]`: mirror vaults on other appliances, by name (see `remote`).
    pub remotes: BTreeMap<String, RemoteConfig>,
    /// `[s3.NAME]`: S3 endpoints and their credential files, by name (see `remote`).
    pub s3: BTreeMap<String, S3Config>,
    /// `[instant]`: where instant-access exports listen, with TLS or not.
    pub instant: InstantConfig,
}

/// The data dir when none is given: `/var/lib/blockvault` for root, else
/// `$XDG_DATA_HOME/blockvault` (`~/.local/share/blockvault` when unset). Always absolute,
/// so that it does not depend on the working directory.
pub fn default_data_dir() -> PathBuf {
    let system = PathBuf::from("/var/lib/blockvault");
    if nix::unistd::Uid::effective().is_root() {
        return system;
    }
    let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(x) = abs(std::env::var_os("XDG_DATA_HOME")) {
        return x.join("blockvault");
    }
    match abs(std::env::var_os("HOME")) {
        Some(h) => h.join(".local/share/blockvault"),
        None => system,
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8420)),
            data: default_data_dir(),
            log_level: "info".into(),
            log_format: "text".into(),
            max_parallel_tasks: 2,
            scheduler_enabled: true,
            gc_after_prune: true,
            shutdown_grace_seconds: 10,
            capacity_warn_percent: 80,
            webhooks: Vec::new(),
            hooks: BTreeMap::new(),
            scratch_dir: None,
            key_files: BTreeMap::new(),
            max_connections: 1024,
            header_timeout_seconds: 10,
            alert_queue: 1000,
            alert_workers: 2,
            alert_retry_seconds: vec![5, 30, 120, 600, 3600],
            alerting: AlertSettings::default(),
            task_keep_days: 30,
            task_keep_max: 10_000,
            audit_keep_days: 365,
            audit_keep_max: 1_000_000,
            tls_cert: None,
            tls_key: None,
            plain_http: false,
            mirror_vaults: Vec::new(),
            remotes: BTreeMap::new(),
            s3: BTreeMap::new(),
            instant: InstantConfig::default(),
            paths: PathsConfig::default(),
        }
    }
}

impl Config {
    /// The TLS settings fit together: cert and key both or neither; plain HTTP only on
    /// a loopback listen address (a token must never cross a network in clear) and not
    /// together with a certificate. Checked again by `serve` after `--listen` etc.
    pub fn check_tls(&self) -> Result<(), String> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(
                "[server] tls_cert and tls_key (--tls-cert/--tls-key) go together: give both"
                    .into(),
            );
        }
        for (key, p) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if let Some(p) = p.as_ref().filter(|p| p.is_relative()) {
                return Err(format!(
                    "[server] {key} = {:?} is relative: give an absolute path (the service's \
                     working directory is not the config file's)",
                    p.display().to_string()
                ));
            }
        }
        if self.plain_http {
            if !self.listen.ip().is_loopback() {
                return Err(format!(
                    "plain HTTP (--plain-http, [server] plain_http) is only allowed on a loopback \
                     listen address (127.0.0.1, ::1), not {}: API tokens would cross the \
                     network in clear. Drop it to serve HTTPS",
                    self.listen
                ));
            }
            if self.tls_cert.is_some() {
                return Err(
                    "plain HTTP and a TLS certificate (tls_cert/tls_key) exclude each other: \
                     drop one"
                        .into(),
                );
            }
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Config::from_toml(&text, &path.display().to_string())
    }
}

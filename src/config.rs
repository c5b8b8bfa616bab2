//! The appliance's configuration: raw TOML → validated [`Config`] in one step.
//! Every key is optional (defaults below); unknown keys are errors, so a typo is named.
//! `appliance/blockvault.toml` documents every option (a test loads it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Kinds of alerts (webhooks subscribe to some or all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    TaskFailed,
    VaultCapacity,
    VaultFull,
    SourceUnreachable,
    /// Verify found corrupt or missing data in a vault.
    VaultDamaged,
    /// A recovery drill's guest did not pass its check.
    DrillFailed,
    /// A backup finished. Sent only to webhooks that list it in `events` (never by
    /// default: it is the one kind that fires on every good run).
    BackupSucceeded,
}

impl AlertKind {
    /// Whether a webhook listing `events` gets this kind: the kinds listed, or with an
    /// empty list every kind but `backup_succeeded`.
    pub fn delivered_to(self, events: &[AlertKind]) -> bool {
        if events.is_empty() {
            self != AlertKind::BackupSucceeded
        } else {
            events.contains(&self)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: String,
    /// Empty: every kind but `backup_succeeded` ([`AlertKind::delivered_to`]).
    pub events: Vec<AlertKind>,
    pub timeout_seconds: u64,
    /// Shared secret that signs each delivery (HMAC-SHA256, see `alerts`): from
    /// `secret_file` (preferred) or `secret`.
    pub secret: Option<WebhookSecret>,
}

/// A webhook's signing secret; never printed.
#[derive(Clone, PartialEq)]
pub struct WebhookSecret(pub String);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// The host of an `http(s)://` URL, lower-cased, without port or brackets; None when
/// the URL is not http(s), has no host, or carries credentials (`user@`).
pub fn url_host(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.contains('@') {
        return None;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Whether `host` is allowed by `list` (exact names or addresses, or `*.domain` for
/// any name under that domain).
pub fn host_allowed(host: &str, list: &[String]) -> bool {
    list.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => a == host,
        }
    })
}

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
            task_keep_days: 30,
            task_keep_max: 10_000,
            audit_keep_days: 365,
            audit_keep_max: 1_000_000,
            tls_cert: None,
            tls_key: None,
            plain_http: false,
            mirror_vaults: Vec::new(),
            paths: PathsConfig::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    tasks: RawTasks,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    scheduler: RawScheduler,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    hooks: BTreeMap<String, RawHookSet>,
    #[serde(default)]
    live: RawLive,
    #[serde(default)]
    keys: BTreeMap<String, PathBuf>,
    #[serde(default)]
    paths: RawPaths,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    sources: Option<Vec<PathBuf>>,
    restore_to: Option<Vec<PathBuf>>,
    #[serde(default)]
    nbd_hosts: Vec<String>,
    #[serde(default)]
    qmp_sockets: Vec<PathBuf>,
    #[serde(default)]
    libvirt_domains: Vec<String>,
    nbd_tls: Option<Vec<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLive {
    scratch_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHookSet {
    freeze: Option<String>,
    thaw: Option<String>,
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    data: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<String>,
    shutdown_grace_seconds: Option<u64>,
    max_connections: Option<usize>,
    header_timeout_seconds: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    plain_http: Option<bool>,
    mirror_vaults: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTasks {
    max_parallel: Option<usize>,
    keep_days: Option<u32>,
    keep_max: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    keep_days: Option<u32>,
    keep_max: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    enabled: Option<bool>,
    gc_after_prune: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    capacity_warn_percent: Option<u8>,
    queue: Option<usize>,
    workers: Option<usize>,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    retry_seconds: Option<Vec<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default)]
    events: Vec<AlertKind>,
    timeout_seconds: Option<u64>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
}

impl Config {
    /// Parse and validate TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        let d = Config::default();
        let listen = match raw.server.listen {
            Some(l) => l
                .parse()
                .map_err(|_| format!("{origin}: [server] listen must be HOST:PORT, got {l:?}"))?,
            None => d.listen,
        };
        let log_level = raw.server.log_level.unwrap_or(d.log_level);
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(format!(
                "{origin}: [server] log_level must be error|warn|info|debug|trace, got {log_level:?}"
            ));
        }
        let log_format = raw.server.log_format.unwrap_or(d.log_format);
        if !["text", "json"].contains(&log_format.as_str()) {
            return Err(format!(
                "{origin}: [server] log_format must be text|json, got {log_format:?}"
            ));
        }
        let max = raw.tasks.max_parallel.unwrap_or(d.max_parallel_tasks);
        if !(1..=64).contains(&max) {
            return Err(format!(
                "{origin}: [tasks] max_parallel must be 1..=64, got {max}"
            ));
        }
        let keep_days = raw.tasks.keep_days.unwrap_or(d.task_keep_days);
        if !(1..=36_500).contains(&keep_days) {
            return Err(format!(
                "{origin}: [tasks] keep_days must be 1..=36500, got {keep_days}"
            ));
        }
        let keep_max = raw.tasks.keep_max.unwrap_or(d.task_keep_max);
        if !(100..=10_000_000).contains(&keep_max) {
            return Err(format!(
                "{origin}: [tasks] keep_max must be 100..=10000000, got {keep_max}"
            ));
        }
        let audit_keep_days = raw.audit.keep_days.unwrap_or(d.audit_keep_days);
        if !(1..=36_500).contains(&audit_keep_days) {
            return Err(format!(
                "{origin}: [audit] keep_days must be 1..=36500, got {audit_keep_days}"
            ));
        }
        let audit_keep_max = raw.audit.keep_max.unwrap_or(d.audit_keep_max);
        if !(1_000..=100_000_000).contains(&audit_keep_max) {
            return Err(format!(
                "{origin}: [audit] keep_max must be 1000..=100000000, got {audit_keep_max}"
            ));
        }
        let warn = raw
            .alerts
            .capacity_warn_percent
            .unwrap_or(d.capacity_warn_percent);
        if !(1..=100).contains(&warn) {
            return Err(format!(
                "{origin}: [alerts] capacity_warn_percent must be 1..=100, got {warn}"
            ));
        }
        let max_connections = raw.server.max_connections.unwrap_or(d.max_connections);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(format!(
                "{origin}: [server] max_connections must be 1..=1000000, got {max_connections}"
            ));
        }
        let header_timeout = raw
            .server
            .header_timeout_seconds
            .unwrap_or(d.header_timeout_seconds);
        if !(1..=300).contains(&header_timeout) {
            return Err(format!(
                "{origin}: [server] header_timeout_seconds must be 1..=300, got {header_timeout}"
            ));
        }
        let alert_queue = raw.alerts.queue.unwrap_or(d.alert_queue);
        if !(1..=100_000).contains(&alert_queue) {
            return Err(format!(
                "{origin}: [alerts] queue must be 1..=100000, got {alert_queue}"
            ));
        }
        let alert_workers = raw.alerts.workers.unwrap_or(d.alert_workers);
        if !(1..=16).contains(&alert_workers) {
            return Err(format!(
                "{origin}: [alerts] workers must be 1..=16, got {alert_workers}"
            ));
        }
        let alert_retry_seconds = raw
            .alerts
            .retry_seconds
            .unwrap_or_else(|| d.alert_retry_seconds.clone());
        if alert_retry_seconds.len() > 10
            || alert_retry_seconds
                .iter()
                .any(|s| !(1..=86_400).contains(s))
        {
            return Err(format!(
                "{origin}: [alerts] retry_seconds must list at most 10 waits of 1..=86400 seconds, got {alert_retry_seconds:?}"
            ));
        }
        let mut webhooks = Vec::new();
        for w in raw.alerts.webhook {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(format!(
                    "{origin}: [[alerts.webhook]] url must start with http:// or https://, got {:?}",
                    w.url
                ));
            }
            let t = w.timeout_seconds.unwrap_or(5);
            if !(1..=60).contains(&t) {
                return Err(format!(
                    "{origin}: [[alerts.webhook]] timeout_seconds must be 1..=60, got {t}"
                ));
            }
            match url_host(&w.url) {
                Some(h) if host_allowed(&h, &raw.alerts.allowed_hosts) => {}
                Some(h) => {
                    return Err(format!(
                        "{origin}: [[alerts.webhook]] {:?}: host {h:?} is not in [alerts] allowed_hosts (list it there to send alerts to it)",
                        w.url
                    ));
                }
                None => {
                    return Err(format!(
                        "{origin}: [[alerts.webhook]] url {:?} has no host, or carries credentials (use secret_file for signing)",
                        w.url
                    ));
                }
            }
            let secret = match (w.secret, w.secret_file) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{origin}: [[alerts.webhook]] {:?}: give secret or secret_file, not both",
                        w.url
                    ));
                }
                (Some(s), None) => Some(s),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(&f)
                        .map_err(|e| {
                            format!(
                                "{origin}: [[alerts.webhook]] secret_file {}: {e}",
                                f.display()
                            )
                        })?
                        .trim()
                        .to_owned(),
                ),
                (None, None) => None,
            };
            if secret.as_ref().is_some_and(|s| s.len() < 16) {
                return Err(format!(
                    "{origin}: [[alerts.webhook]] {:?}: the secret must be at least 16 characters",
                    w.url
                ));
            }
            webhooks.push(Webhook {
                url: w.url,
                events: w.events,
                timeout_seconds: t,
                secret: secret.map(WebhookSecret),
            });
        }
        let mut hooks = BTreeMap::new();
        for (name, h) in raw.hooks {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "{origin}: [hooks.{name}]: a hook set name is letters, digits, '-', '_' or '.'"
                ));
            }
            if h.freeze.is_none() && h.thaw.is_none() {
                return Err(format!(
                    "{origin}: [hooks.{name}] needs a freeze or a thaw command"
                ));
            }
            let t = h.timeout_seconds.unwrap_or(60);
            if !(1..=3600).contains(&t) {
                return Err(format!(
                    "{origin}: [hooks.{name}] timeout_seconds must be 1..=3600, got {t}"
                ));
            }
            let set = HookSet {
                freeze: h.freeze,
                thaw: h.thaw,
                timeout_seconds: t,
            };
            hooks.insert(name, set);
        }
        if let Some(d) = &raw.live.scratch_dir
            && !d.is_absolute()
        {
            return Err(format!(
                "{origin}: [live] scratch_dir must be an absolute path, got {}",
                d.display()
            ));
        }
        if let Some((name, p)) = raw.keys.iter().find(|(_, p)| !p.is_absolute()) {
            return Err(format!(
                "{origin}: [keys] {name}: the key file must be an absolute path, got {}",
                p.display()
            ));
        }
        for (key, dirs) in [
            (
                "sources",
                raw.paths.sources.iter().flatten().collect::<Vec<_>>(),
            ),
            (
                "restore_to",
                raw.paths.restore_to.iter().flatten().collect(),
            ),
            ("qmp_sockets", raw.paths.qmp_sockets.iter().collect()),
            ("nbd_tls", raw.paths.nbd_tls.iter().flatten().collect()),
        ] {
            if let Some(d) = dirs.iter().find(|d| !d.is_absolute()) {
                return Err(format!(
                    "{origin}: [paths] {key} takes absolute paths, got {}",
                    d.display()
                ));
            }
        }
        let c = Config {
            key_files: raw.keys,
            paths: PathsConfig {
                sources: raw.paths.sources,
                restore_to: raw.paths.restore_to,
                nbd_hosts: raw.paths.nbd_hosts,
                qmp_sockets: raw.paths.qmp_sockets,
                libvirt_domains: raw.paths.libvirt_domains,
                nbd_tls: raw.paths.nbd_tls,
            },
            tls_cert: raw.server.tls_cert,
            tls_key: raw.server.tls_key,
            plain_http: raw.server.plain_http.unwrap_or(d.plain_http),
            mirror_vaults: raw.server.mirror_vaults.unwrap_or_default(),
            scratch_dir: raw.live.scratch_dir,
            listen,
            data: raw.server.data.unwrap_or(d.data),
            log_level,
            log_format,
            max_parallel_tasks: max,
            task_keep_days: keep_days,
            task_keep_max: keep_max,
            audit_keep_days,
            audit_keep_max,
            scheduler_enabled: raw.scheduler.enabled.unwrap_or(d.scheduler_enabled),
            gc_after_prune: raw.scheduler.gc_after_prune.unwrap_or(d.gc_after_prune),
            shutdown_grace_seconds: raw
                .server
                .shutdown_grace_seconds
                .unwrap_or(d.shutdown_grace_seconds),
            capacity_warn_percent: warn,
            webhooks,
            hooks,
            max_connections,
            header_timeout_seconds: header_timeout,
            alert_queue,
            alert_workers,
            alert_retry_seconds,
        };
        c.check_tls().map_err(|e| format!("{origin}: {e}"))?;
        Ok(c)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_hosts_are_matched_exactly_or_by_domain() {
        let list = vec![
            "hooks.example.com".to_owned(),
            "*.corp".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        for (url, ok) in [
            ("https://hooks.example.com/x", true),
            ("https://HOOKS.example.com:8443/x", true),
            ("https://evil.hooks.example.com/x", false),
            ("https://hooks.example.com.evil/x", false),
            ("http://a.corp/x", true),
            ("http://corp/x", false),
            ("http://x.evilcorp/x", false),
            ("http://127.0.0.1:9000/x", true),
            ("http://[::1]:9000/x", true),
            ("http://127.0.0.2/x", false),
        ] {
            let host = url_host(url).unwrap();
            assert_eq!(host_allowed(&host, &list), ok, "{url}");
        }
        assert_eq!(url_host("http://u:p@x/"), None);
        assert_eq!(url_host("ftp://x/"), None);
        assert_eq!(url_host("http:///x"), None);
    }

    #[test]
    fn empty_text_gives_the_defaults() {
        assert_eq!(Config::from_toml("", "t").unwrap(), Config::default());
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        for (text, needle) in [
            ("[tasks]\nmax_parallel = 0", "max_parallel"),
            ("[audit]\nkeep_days = 0", "[audit] keep_days"),
            ("[audit]\nkeep_max = 10", "[audit] keep_max"),
            ("[audit]\nkeep = 10", "keep"),
            ("[server]\nlisten = \"nowhere\"", "listen"),
            ("[server]\nlog_level = \"loud\"", "log_level"),
            ("[server]\nlog_format = \"xml\"", "log_format"),
            (
                "[alerts]\ncapacity_warn_percent = 0",
                "capacity_warn_percent",
            ),
            ("[[alerts.webhook]]\nurl = \"ftp://x\"", "url"),
            (
                "[[alerts.webhook]]\nurl = \"http://evil.example/x\"",
                "not in [alerts] allowed_hosts",
            ),
            (
                "[alerts]\nallowed_hosts = [\"*.example\"]\n[[alerts.webhook]]\nurl = \"http://a:b@x.example/\"",
                "credentials",
            ),
            (
                "[alerts]\nallowed_hosts = [\"x\"]\n[[alerts.webhook]]\nurl = \"http://x/\"\nsecret = \"short\"",
                "at least 16",
            ),
            ("[alerts]\nretry_seconds = [0]", "retry_seconds"),
            (
                "[alerts]\nallowed_hosts = [\"x\"]\n[[alerts.webhook]]\nurl = \"http://x\"\ntimeout_seconds = 0",
                "timeout_seconds",
            ),
            ("[server]\nlisen = \"1.2.3.4:5\"", "lisen"),
            ("[hooks.db]\ntimeout_seconds = 5", "freeze or a thaw"),
            ("[hooks.db]\nfreeze = \"x\"\nrun = \"y\"", "run"),
            ("[hooks.\"a b\"]\nfreeze = \"x\"", "hook set name"),
            ("[server]\nmax_connections = 0", "max_connections"),
            ("[live]\nscratch_dir = \"rel/dir\"", "scratch_dir"),
            (
                "[server]\nheader_timeout_seconds = 0",
                "header_timeout_seconds",
            ),
            ("[alerts]\nqueue = 0", "queue"),
            (
                "[server]\nlisten = \"0.0.0.0:8420\"\nplain_http = true",
                "loopback",
            ),
            ("[server]\ntls_cert = \"/c.pem\"", "tls_key"),
            (
                "[server]\ntls_cert = \"c.pem\"\ntls_key = \"/k.pem\"",
                "relative",
            ),
            ("[alerts]\nworkers = 17", "workers"),
            ("[keys]\nmain = \"rel.key\"", "absolute"),
            (
                "[alerts]\nallowed_hosts = [\"x\"]\n[[alerts.webhook]]\nurl = \"http://x\"\nevents = [\"nope\"]",
                "nope",
            ),
        ] {
            let e = Config::from_toml(text, "t.toml").unwrap_err();
            assert!(e.contains(needle) && e.starts_with("t.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn the_example_config_loads_and_sets_every_option() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/blockvault.toml");
        let c = Config::load(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for key in [
            "listen",
            "data",
            "log_level",
            "log_format",
            "shutdown_grace_seconds",
            "max_connections",
            "header_timeout_seconds",
            "plain_http",
            "max_parallel",
            "enabled",
            "gc_after_prune",
            "capacity_warn_percent",
            "queue",
            "workers",
            "url",
            "events",
            "timeout_seconds",
            "allowed_hosts",
            "retry_seconds",
            "freeze",
            "thaw",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{key} ="))),
                "the example does not set {key}"
            );
        }
        assert_eq!((c.audit_keep_days, c.audit_keep_max), (365, 1_000_000));
        assert_eq!(c.webhooks.len(), 1);
        assert_eq!(c.alert_retry_seconds, vec![5, 30, 120, 600, 3600]);
        assert!(c.hooks["postgres"].freeze.is_some() && c.hooks["postgres"].thaw.is_some());
        assert_eq!(c.data, PathBuf::from("/var/lib/blockvault"));
        // The shipped file serves HTTPS with the self-signed certificate.
        assert!(!c.plain_http && c.tls_cert.is_none());
        for key in ["tls_cert", "tls_key"] {
            assert!(text.contains(&format!("#{key} = ")), "{key} is not shown");
        }
    }
}

//! `Config::from_toml`: the raw TOML tables (`Raw*`, unknown keys refused) and their
//! validation into [`Config`], every error naming the file and the key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{
    AlertKind, AlertSettings, Config, HookSet, PathsConfig, Webhook, WebhookSecret, host_allowed,
    url_host,
};

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
    #[serde(default)]
    remote: BTreeMap<String, super::remote::RawRemote>,
    #[serde(default)]
    s3: BTreeMap<String, super::remote::RawS3>,
    #[serde(default)]
    instant: super::instant::RawInstant,
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
    stale_grace_minutes: Option<f64>,
    allow_private: Option<bool>,
    outbox_max: Option<usize>,
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
        let alerting = AlertSettings::from_raw(
            origin,
            raw.alerts.stale_grace_minutes,
            raw.alerts.allow_private,
            raw.alerts.outbox_max,
        )?;
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
        let remotes = super::remote::remotes(raw.remote, origin)?;
        let s3 = super::remote::s3s(raw.s3, origin)?;
        let c = Config {
            remotes,
            s3,
            instant: super::instant::validate(raw.instant, origin)?,
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
            alerting,
        };
        c.check_tls().map_err(|e| format!("{origin}: {e}"))?;
        Ok(c)
    }
}

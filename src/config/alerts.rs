//! Alert kinds and webhook settings (`[alerts]`), with the host allow-list that a
//! webhook URL must pass.

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

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
    /// A resource with a backup policy has had no good backup for longer than the
    /// policy's period plus the grace (`[alerts] stale_grace_minutes`); raised once per
    /// episode.
    BackupStale,
    /// The episode of a `backup_stale` ended: a good backup arrived (the cleared event;
    /// a webhook that lists `backup_stale` gets it too).
    BackupFresh,
}

impl AlertKind {
    /// Whether a webhook listing `events` gets this kind: the kinds listed (and
    /// `backup_fresh` with `backup_stale`, so a receiver sees its episodes end), or with
    /// an empty list every kind but `backup_succeeded`.
    pub fn delivered_to(self, events: &[AlertKind]) -> bool {
        if events.is_empty() {
            self != AlertKind::BackupSucceeded
        } else {
            events.contains(&self)
                || (self == AlertKind::BackupFresh && events.contains(&AlertKind::BackupStale))
        }
    }
}

/// `[alerts]` settings of staleness, the delivery outbox and the address check.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    /// `stale_grace_minutes`: how long past a backup policy's period a resource may go
    /// without a good backup before `backup_stale`. None: half the period, at least 10
    /// minutes.
    pub stale_grace_minutes: Option<f64>,
    /// `allow_private`: webhook names may resolve to loopback, private, link-local,
    /// unique-local, unspecified or multicast addresses (default false: only a literal
    /// address in the URL may be such an address).
    pub allow_private: bool,
    /// `outbox_max`: deliveries kept in the catalog's outbox (pending and finished);
    /// beyond it the oldest finished ones go first, then the oldest pending ones
    /// (dropped and counted).
    pub outbox_max: usize,
}

impl Default for AlertSettings {
    fn default() -> AlertSettings {
        AlertSettings {
            stale_grace_minutes: None,
            allow_private: false,
            outbox_max: 10_000,
        }
    }
}

impl AlertSettings {
    /// Validate the raw `[alerts]` values (None: the default); errors name the key.
    pub fn from_raw(
        origin: &str,
        stale_grace_minutes: Option<f64>,
        allow_private: Option<bool>,
        outbox_max: Option<usize>,
    ) -> Result<AlertSettings, String> {
        let d = AlertSettings::default();
        if let Some(g) = stale_grace_minutes
            && !(0.0..=10_080.0).contains(&g)
        {
            return Err(format!(
                "{origin}: [alerts] stale_grace_minutes must be 0..=10080 (a week), got {g}"
            ));
        }
        let outbox_max = outbox_max.unwrap_or(d.outbox_max);
        if !(10..=1_000_000).contains(&outbox_max) {
            return Err(format!(
                "{origin}: [alerts] outbox_max must be 10..=1000000, got {outbox_max}"
            ));
        }
        Ok(AlertSettings {
            stale_grace_minutes,
            allow_private: allow_private.unwrap_or(d.allow_private),
            outbox_max,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_settings_take_their_defaults_and_refuse_out_of_range_values_naming_the_key() {
        let d = AlertSettings::from_raw("f", None, None, None).unwrap();
        assert_eq!(d, AlertSettings::default());
        let s = AlertSettings::from_raw("f", Some(0.5), Some(true), Some(100)).unwrap();
        assert_eq!(
            (s.stale_grace_minutes, s.allow_private, s.outbox_max),
            (Some(0.5), true, 100)
        );
        let e = AlertSettings::from_raw("f", Some(-1.0), None, None).unwrap_err();
        assert!(e.contains("stale_grace_minutes"), "{e}");
        let e = AlertSettings::from_raw("f", None, None, Some(5)).unwrap_err();
        assert!(e.contains("outbox_max"), "{e}");
    }

    #[test]
    fn a_webhook_listing_backup_stale_also_gets_backup_fresh() {
        assert!(AlertKind::BackupFresh.delivered_to(&[AlertKind::BackupStale]));
        assert!(!AlertKind::BackupFresh.delivered_to(&[AlertKind::TaskFailed]));
        assert!(AlertKind::BackupStale.delivered_to(&[]));
        assert!(!AlertKind::BackupSucceeded.delivered_to(&[]));
    }
}

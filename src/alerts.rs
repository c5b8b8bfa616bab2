//! Alerts: task failed, vault over its warning level or full, source unreachable, vault
//! damaged (verify found corrupt data).
//!
//! Every alert is logged, recorded in the catalog (`GET /alerts`) and POSTed as JSON to
//! every configured webhook that subscribed to its kind, on a short-lived thread with the
//! webhook's timeout (a slow receiver never holds up a backup):
//! `{"kind": "task_failed", "subject": "...", "message": "...", "at": "..."}`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::catalog::{AlertRecord, Catalog};
use crate::config::{AlertKind, Webhook};
use crate::error::Result;

pub fn kind_str(k: AlertKind) -> &'static str {
    match k {
        AlertKind::TaskFailed => "task_failed",
        AlertKind::VaultCapacity => "vault_capacity",
        AlertKind::VaultFull => "vault_full",
        AlertKind::SourceUnreachable => "source_unreachable",
        AlertKind::VaultDamaged => "vault_damaged",
    }
}

/// Raises alerts.
#[derive(Clone)]
pub struct Alerter {
    data: PathBuf,
    webhooks: Vec<Webhook>,
}

impl Alerter {
    pub fn new(data: &Path, webhooks: Vec<Webhook>) -> Alerter {
        Alerter {
            data: data.to_path_buf(),
            webhooks,
        }
    }

    /// Record, log and send an alert.
    pub fn raise(&self, kind: AlertKind, subject: &str, message: &str) -> Result<AlertRecord> {
        tracing::warn!(alert = kind_str(kind), subject, "{message}");
        let rec = Catalog::open(&self.data)?.add_alert(kind_str(kind), subject, message)?;
        let body = serde_json::json!({
            "kind": rec.kind, "subject": rec.subject, "message": rec.message, "at": rec.at,
        });
        for w in self
            .webhooks
            .iter()
            .filter(|w| w.events.is_empty() || w.events.contains(&kind))
        {
            let (url, timeout, body) = (w.url.clone(), w.timeout_seconds, body.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(timeout)))
                    .build()
                    .into();
                if let Err(e) = agent.post(&url).send_json(&body) {
                    tracing::error!(url, "webhook failed: {e}");
                }
            });
        }
        Ok(rec)
    }
}

//! Alerts: task failed, vault over its warning level or full, source unreachable, vault
//! damaged (verify found corrupt data), drill failed, backup succeeded, backup stale (and
//! fresh again).
//!
//! Every alert is logged, recorded in the catalog (`GET /alerts`) and POSTed as JSON to
//! every configured webhook that subscribed to its kind (a webhook with no `events`
//! gets every kind but `backup_succeeded`, which must be listed):
//! ```text
//! {"kind": "backup_succeeded", "subject": "web1", "message": "...",
//!  "time": "2026-11-28T23:50:00Z", "at": "<same as time>",
//!  "details": {"resource": "web1", "vault": "v", "backup": "<id>",
//!              "backup_name": "autobk_…", "task": "<task id>"}}
//! ```
//! `details` holds what applies of resource, vault, backup, backup_name, task and, for
//! `vault_damaged`, `damaged` (what verify found), for `backup_stale`/`backup_fresh`
//! `policy`, `backup_time` (of the last good backup) and `period_seconds`; see
//! [`AlertDetails`].
//!
//! Each delivery carries `X-Blockvault-Delivery` (random id, the same on every retry)
//! and `X-Blockvault-Timestamp` (Unix seconds of this attempt); a webhook with a secret
//! also gets `X-Blockvault-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//! A receiver recomputes it over the raw body, compares in constant time, and refuses a
//! timestamp more than 5 minutes old (replay). Webhooks go only to hosts listed in
//! `[alerts] allowed_hosts` (checked at config load) and never follow redirects.
//!
//! Deliveries live in the catalog's outbox (`catalog::outbox`): one row per (alert,
//! webhook) with its delivery id, attempts, next try, state and last error, so a
//! delivery waiting for its retry survives a restart (or a `kill -9`) and resumes with
//! the same `X-Blockvault-Delivery` id — a receiver may see a delivery twice (the
//! process died between the POST and recording it) and dedupes by that id.
//! `GET /alerts/deliveries` shows them (no body, no secret, no URL path).
//!
//! A delivery that fails (connection error, timeout, failed lookup, 5xx, 429) is retried
//! after each wait of `[alerts] retry_seconds` (default 5 s, 30 s, 2 min, 10 min, 1 h;
//! ±10 % jitter), then marked `failed`; other 4xx answers are not retried (`failed`).
//! Before each attempt the host is resolved and checked, and the POST connects to the
//! checked address only (`dns`: a name that resolves to a loopback, private, link-local
//! … address is `refused` unless `[alerts] allow_private`).
//!
//! Bounded work whatever the load: a slow or dead receiver must not grow the process
//! nor the catalog.
//! - The outbox holds at most `[alerts] outbox_max` rows ([`AlertLimits::outbox`]): past
//!   it the oldest finished deliveries are removed first ([`AlertStats::trimmed`]), then
//!   the oldest pending ones, which are dropped and counted ([`AlertStats::dropped`]).
//! - One dispatcher thread hands due deliveries to a fixed number of worker threads
//!   ([`AlertLimits::workers`]) through a queue of [`AlertLimits::queue`]; the rest wait
//!   in the outbox. Each attempt (lookup + connect + whole request) gives up after its
//!   webhook's `timeout_seconds`.
//! - Work that decides which alerts a finished task raises ([`Alerter::check`]: it reads
//!   the catalog) runs on one thread from a bounded queue of [`CHECK_QUEUE`]; overflow is
//!   counted as [`AlertStats::unchecked`] (the task's own record still says it failed).
//!
//! `backup_stale` / `backup_fresh` are raised by the scheduler's periodic check
//! ([`stale`]).
//!
//! The counters are shown by `GET /health` (with a token) and in the
//! `blockvault-alerts-dropped` header of `GET /alerts`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Sender, bounded};
use serde::Serialize;

mod deliver;
mod dns;
pub mod stale;
pub use deliver::signature;
use deliver::{Outbox, dispatch, now_ms, work};

use crate::catalog::{AlertRecord, Catalog, NewDelivery};
use crate::config::{AlertKind, Webhook};
use crate::error::{Error, Result};

/// Task ends waiting to be checked for alerts.
pub const CHECK_QUEUE: usize = 10_000;

pub fn kind_str(k: AlertKind) -> &'static str {
    match k {
        AlertKind::TaskFailed => "task_failed",
        AlertKind::VaultCapacity => "vault_capacity",
        AlertKind::VaultFull => "vault_full",
        AlertKind::SourceUnreachable => "source_unreachable",
        AlertKind::VaultDamaged => "vault_damaged",
        AlertKind::DrillFailed => "drill_failed",
        AlertKind::BackupSucceeded => "backup_succeeded",
        AlertKind::BackupStale => "backup_stale",
        AlertKind::BackupFresh => "backup_fresh",
    }
}

/// What an alert is about, as far as it applies: the `details` object of its payload
/// and of its catalog record. Absent fields are left out.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AlertDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault: Option<String>,
    /// Backup id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Backup name (`autobk_…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_name: Option<String>,
    /// The task that raised it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// What verify found damaged: `[{"backup", "disk", "offset", "length", "problem"}]`
    /// or as much of it as the verify report names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<serde_json::Value>,
    /// `backup_stale`/`backup_fresh`: the backup policy whose period was missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `backup_stale`/`backup_fresh`: when the last good backup (`backup`) was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_time: Option<String>,
    /// `backup_stale`/`backup_fresh`: the policy's period (seconds between two runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<u64>,
}

/// Bounds of alert delivery.
#[derive(Debug, Clone)]
pub struct AlertLimits {
    /// Deliveries handed to the workers at once (the rest wait in the outbox).
    pub queue: usize,
    /// Delivery threads.
    pub workers: usize,
    /// Waits before each retry of a failed delivery.
    pub retry: Vec<Duration>,
    /// Rows the outbox keeps (pending and finished).
    pub outbox: usize,
    /// Webhook names may resolve to private addresses (see `dns`).
    pub allow_private: bool,
}

impl Default for AlertLimits {
    fn default() -> AlertLimits {
        AlertLimits {
            queue: 1000,
            workers: 2,
            retry: [5, 30, 120, 600, 3600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            outbox: 10_000,
            allow_private: false,
        }
    }
}

/// What happened to alert checks and webhook deliveries since the start.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct AlertStats {
    /// Pending in the outbox now (waiting for their first try or a retry).
    pub queued: u64,
    pub delivered: u64,
    /// Attempts refused, timed out or unreachable (each retry counts).
    pub failed: u64,
    /// Deliveries given up after their last retry, refused with a 4xx, or refused by
    /// the address rule.
    pub given_up: u64,
    /// Deliveries not sent because the address rule refused their host's address.
    pub refused: u64,
    /// Pending deliveries removed from a full outbox before they were delivered.
    pub dropped: u64,
    /// Finished deliveries removed from a full outbox (history, not loss).
    pub trimmed: u64,
    /// Finished tasks checked for alerts.
    pub checked: u64,
    /// Finished tasks not checked for alerts: the check queue was full.
    pub unchecked: u64,
    /// Stale-backup checks run (`stale`).
    pub stale_checks: u64,
}

type Check = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    given_up: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    trimmed: AtomicU64,
    checked: AtomicU64,
    unchecked: AtomicU64,
    stale_checks: AtomicU64,
}

/// Raises alerts. Cheap to clone; the threads end when the last clone is dropped.
#[derive(Clone)]
pub struct Alerter {
    data: PathBuf,
    hooks: Arc<Vec<Webhook>>,
    outbox_cap: usize,
    wake: Sender<()>,
    checks: Sender<Check>,
    counters: Arc<Counters>,
    /// The dispatcher runs while this lives.
    _alive: Arc<()>,
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| Error::io(format!("starting the {name} thread"), e))
}

impl Alerter {
    /// An alerter with its dispatcher, delivery workers and check thread started;
    /// deliveries left pending in the outbox by an earlier run resume.
    pub fn start(data: &Path, webhooks: Vec<Webhook>, limits: AlertLimits) -> Result<Alerter> {
        // Created and migrated here, before the threads open it side by side.
        drop(Catalog::open(data)?);
        let counters = Arc::new(Counters::default());
        let queue = limits.queue.max(1);
        let (tx, rx) = bounded(queue);
        let (wake, wake_rx) = bounded::<()>(1);
        let ob = Arc::new(Outbox {
            data: data.to_path_buf(),
            hooks: webhooks.clone(),
            counters: Arc::clone(&counters),
            waits: limits.retry.clone(),
            allow_private: limits.allow_private,
            in_flight: Mutex::new(HashSet::new()),
            wake: wake.clone(),
        });
        for i in 0..limits.workers.max(1) {
            let (rx, ob) = (rx.clone(), Arc::clone(&ob));
            spawn(format!("webhook-{i}"), move || work(&ob, &rx))?;
        }
        let alive = Arc::new(());
        let weak = Arc::downgrade(&alive);
        let o = Arc::clone(&ob);
        spawn("webhook-outbox".into(), move || {
            dispatch(&o, &weak, &wake_rx, &tx, queue)
        })?;
        let (ctx, crx) = bounded::<Check>(CHECK_QUEUE);
        let c = Arc::clone(&counters);
        spawn("alert-check".into(), move || {
            for job in crx {
                job();
                c.checked.fetch_add(1, Ordering::Relaxed);
            }
        })?;
        Ok(Alerter {
            data: data.to_path_buf(),
            hooks: Arc::new(webhooks),
            outbox_cap: limits.outbox.max(1),
            wake,
            checks: ctx,
            counters,
            _alive: alive,
        })
    }

    /// Record, log and queue an alert for its webhooks (no details).
    pub fn raise(&self, kind: AlertKind, subject: &str, message: &str) -> Result<AlertRecord> {
        self.raise_with(kind, subject, message, &AlertDetails::default())
    }

    /// Record, log and queue an alert with its typed details: one outbox row per
    /// webhook that subscribed to its kind.
    pub fn raise_with(
        &self,
        kind: AlertKind,
        subject: &str,
        message: &str,
        details: &AlertDetails,
    ) -> Result<AlertRecord> {
        if matches!(kind, AlertKind::BackupSucceeded | AlertKind::BackupFresh) {
            tracing::info!(alert = kind_str(kind), subject, "{message}");
        } else {
            tracing::warn!(alert = kind_str(kind), subject, "{message}");
        }
        let details = serde_json::to_value(details).unwrap_or_default();
        let mut cat = Catalog::open(&self.data)?;
        let rec = cat.add_alert(kind_str(kind), subject, message, &details)?;
        let body = payload(&rec).to_string();
        let rows: Vec<NewDelivery> = self
            .hooks
            .iter()
            .filter(|h| kind.delivered_to(&h.events))
            .map(|h| NewDelivery {
                id: hex::encode(rand::random::<[u8; 16]>()),
                url: h.url.clone(),
                kind: rec.kind.clone(),
                body: body.clone(),
            })
            .collect();
        if rows.is_empty() {
            return Ok(rec);
        }
        let t = cat.outbox_add(&rows, now_ms(), self.outbox_cap)?;
        let c = &self.counters;
        c.trimmed.fetch_add(t.finished, Ordering::Relaxed);
        if t.pending > 0 {
            let n = c.dropped.fetch_add(t.pending, Ordering::Relaxed) + t.pending;
            tracing::error!(
                dropped = n,
                cap = self.outbox_cap,
                "webhook outbox full of pending deliveries (a dead receiver?): the oldest were dropped"
            );
        }
        let _ = self.wake.try_send(());
        Ok(rec)
    }

    /// Run `job` (which decides what alerts to raise) on the check thread, in order.
    /// Returns false, and counts it, if the check queue is full.
    pub fn check(&self, job: impl FnOnce() + Send + 'static) -> bool {
        if self.checks.try_send(Box::new(job)).is_ok() {
            return true;
        }
        let n = self.counters.unchecked.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(
            unchecked = n,
            "alert check queue full: a finished task was not checked for alerts"
        );
        false
    }

    /// The data dir whose catalog this alerter records into.
    pub fn data(&self) -> &Path {
        &self.data
    }

    pub fn stats(&self) -> AlertStats {
        let c = &self.counters;
        AlertStats {
            queued: c.queued.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            given_up: c.given_up.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            trimmed: c.trimmed.load(Ordering::Relaxed),
            checked: c.checked.load(Ordering::Relaxed),
            unchecked: c.unchecked.load(Ordering::Relaxed),
            stale_checks: c.stale_checks.load(Ordering::Relaxed),
        }
    }
}

/// The JSON body POSTed for an alert: kind, subject, message, time (`at` is the same
/// time under its older name) and the typed details.
pub fn payload(rec: &AlertRecord) -> serde_json::Value {
    serde_json::json!({
        "kind": rec.kind, "subject": rec.subject, "message": rec.message,
        "time": rec.at, "at": rec.at, "details": rec.details,
    })
}

#[cfg(test)]
mod tests;

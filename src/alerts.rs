//! Alerts: task failed, vault over its warning level or full, source unreachable, vault
//! damaged (verify found corrupt data).
//!
//! Every alert is logged, recorded in the catalog (`GET /alerts`) and POSTed as JSON to
//! every configured webhook that subscribed to its kind:
//! `{"kind": "task_failed", "subject": "...", "message": "...", "at": "..."}`.
//!
//! Bounded work whatever the load: a slow or dead receiver must not grow the process.
//! - Deliveries go through one bounded queue ([`AlertLimits::queue`]) served by a fixed
//!   number of worker threads ([`AlertLimits::workers`]); each delivery (connect + whole
//!   request) gives up after its webhook's `timeout_seconds`. A delivery that finds the
//!   queue full is dropped, logged and counted ([`AlertStats::dropped`]).
//! - Work that decides which alerts a finished task raises ([`Alerter::check`]: it reads
//!   the catalog) runs on one thread from a bounded queue of [`CHECK_QUEUE`]; overflow is
//!   counted as [`AlertStats::unchecked`] (the task's own record still says it failed).
//!
//! The counters are shown by `GET /health` (with a token) and in the
//! `blockvault-alerts-dropped` header of `GET /alerts`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde::Serialize;

use crate::catalog::{AlertRecord, Catalog};
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
    }
}

/// Bounds of alert delivery.
#[derive(Debug, Clone, Copy)]
pub struct AlertLimits {
    /// Deliveries waiting for a worker.
    pub queue: usize,
    /// Delivery threads.
    pub workers: usize,
}

impl Default for AlertLimits {
    fn default() -> AlertLimits {
        AlertLimits {
            queue: 1000,
            workers: 2,
        }
    }
}

/// What happened to alert checks and webhook deliveries since the start.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct AlertStats {
    /// Waiting in the queue now.
    pub queued: u64,
    pub delivered: u64,
    /// Sent but refused, timed out or unreachable.
    pub failed: u64,
    /// Not sent: the queue was full.
    pub dropped: u64,
    /// Finished tasks checked for alerts.
    pub checked: u64,
    /// Finished tasks not checked for alerts: the check queue was full.
    pub unchecked: u64,
}

struct Delivery {
    url: String,
    agent: ureq::Agent,
    body: serde_json::Value,
}

type Check = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    checked: AtomicU64,
    unchecked: AtomicU64,
}

/// One webhook with its client (connections are reused between deliveries).
#[derive(Clone)]
struct Hook {
    cfg: Webhook,
    agent: ureq::Agent,
}

/// Raises alerts. Cheap to clone; the worker threads end when the last clone is dropped.
#[derive(Clone)]
pub struct Alerter {
    data: PathBuf,
    hooks: Vec<Hook>,
    deliveries: Sender<Delivery>,
    checks: Sender<Check>,
    counters: Arc<Counters>,
}

impl Alerter {
    /// An alerter with its delivery workers and its check thread started.
    pub fn start(data: &Path, webhooks: Vec<Webhook>, limits: AlertLimits) -> Result<Alerter> {
        let counters = Arc::new(Counters::default());
        let (tx, rx) = bounded::<Delivery>(limits.queue.max(1));
        for i in 0..limits.workers.max(1) {
            let (rx, c) = (rx.clone(), Arc::clone(&counters));
            std::thread::Builder::new()
                .name(format!("webhook-{i}"))
                .spawn(move || deliver(&rx, &c))
                .map_err(|e| Error::io("starting a webhook delivery thread", e))?;
        }
        let (ctx, crx) = bounded::<Check>(CHECK_QUEUE);
        let c = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("alert-check".into())
            .spawn(move || {
                for job in crx {
                    job();
                    c.checked.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| Error::io("starting the alert check thread", e))?;
        let hooks = webhooks
            .into_iter()
            .map(|cfg| {
                let t = Duration::from_secs(cfg.timeout_seconds);
                let agent = ureq::Agent::config_builder()
                    .timeout_global(Some(t))
                    .timeout_connect(Some(t))
                    .build()
                    .into();
                Hook { cfg, agent }
            })
            .collect();
        Ok(Alerter {
            data: data.to_path_buf(),
            hooks,
            deliveries: tx,
            checks: ctx,
            counters,
        })
    }

    /// Record, log and queue an alert for its webhooks.
    pub fn raise(&self, kind: AlertKind, subject: &str, message: &str) -> Result<AlertRecord> {
        tracing::warn!(alert = kind_str(kind), subject, "{message}");
        let rec = Catalog::open(&self.data)?.add_alert(kind_str(kind), subject, message)?;
        let body = serde_json::json!({
            "kind": rec.kind, "subject": rec.subject, "message": rec.message, "at": rec.at,
        });
        for h in self
            .hooks
            .iter()
            .filter(|h| h.cfg.events.is_empty() || h.cfg.events.contains(&kind))
        {
            let d = Delivery {
                url: h.cfg.url.clone(),
                agent: h.agent.clone(),
                body: body.clone(),
            };
            if let Err(TrySendError::Full(d) | TrySendError::Disconnected(d)) =
                self.deliveries.try_send(d)
            {
                let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    url = d.url,
                    dropped = n,
                    "webhook queue full (a slow receiver?): alert not sent"
                );
            }
        }
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

    pub fn stats(&self) -> AlertStats {
        let c = &self.counters;
        AlertStats {
            queued: self.deliveries.len() as u64,
            delivered: c.delivered.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            checked: c.checked.load(Ordering::Relaxed),
            unchecked: c.unchecked.load(Ordering::Relaxed),
        }
    }
}

/// A delivery worker: one POST at a time until every sender is gone.
fn deliver(rx: &Receiver<Delivery>, c: &Counters) {
    for d in rx {
        match d.agent.post(&d.url).send_json(&d.body) {
            Ok(_) => {
                c.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(url = d.url, "webhook failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A receiver that accepts and never answers: the queue fills, the rest is dropped
    /// and counted, and no thread is started per alert.
    #[test]
    fn a_silent_receiver_fills_the_queue_and_the_overflow_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", silent.local_addr().unwrap());
        let hook = Webhook {
            url,
            events: Vec::new(),
            timeout_seconds: 60,
        };
        let a = Alerter::start(
            dir.path(),
            vec![hook],
            AlertLimits {
                queue: 5,
                workers: 1,
            },
        )
        .unwrap();
        for i in 0..50 {
            a.raise(AlertKind::TaskFailed, &format!("t{i}"), "boom")
                .unwrap();
        }
        let s = a.stats();
        // One delivery may be in the worker's hands, five wait, the rest are dropped.
        assert!(s.queued <= 5, "{s:?}");
        assert!(s.dropped >= 44, "{s:?}");
        assert_eq!(s.delivered, 0, "{s:?}");
        // Every alert is still recorded in the catalog.
        let recorded = Catalog::open(dir.path()).unwrap().alerts(1000).unwrap();
        assert_eq!(recorded.len(), 50);
    }
}

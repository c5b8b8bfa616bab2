//! Alerts: task failed, vault over its warning level or full, source unreachable, vault
//! damaged (verify found corrupt data), drill failed, backup succeeded.
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
//! `vault_damaged`, `damaged` (what verify found); see [`AlertDetails`].
//!
//! Each delivery carries `X-Blockvault-Delivery` (random id, the same on every retry)
//! and `X-Blockvault-Timestamp` (Unix seconds of this attempt); a webhook with a secret
//! also gets `X-Blockvault-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//! A receiver recomputes it over the raw body, compares in constant time, and refuses a
//! timestamp more than 5 minutes old (replay). Webhooks go only to hosts listed in
//! `[alerts] allowed_hosts` (checked at config load) and never follow redirects.
//!
//! A delivery that fails (connection error, timeout, 5xx, 429) is retried after each
//! wait of `[alerts] retry_seconds` (default 5 s, 30 s, 2 min, 10 min, 1 h; ±10 %
//! jitter), then given up and logged; other 4xx answers are not retried. Retries wait in
//! memory in a heap bounded like the queue (overflow dropped and counted); a restart
//! forgets them.
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

use crossbeam_channel::{Sender, TrySendError, bounded};
use serde::Serialize;

mod deliver;
pub use deliver::signature;
use deliver::{Delivery, deliver, retry_loop};

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
        AlertKind::BackupSucceeded => "backup_succeeded",
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
}

/// Bounds of alert delivery.
#[derive(Debug, Clone)]
pub struct AlertLimits {
    /// Deliveries waiting for a worker (and, as many again, waiting to be retried).
    pub queue: usize,
    /// Delivery threads.
    pub workers: usize,
    /// Waits before each retry of a failed delivery.
    pub retry: Vec<Duration>,
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
        }
    }
}

/// What happened to alert checks and webhook deliveries since the start.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct AlertStats {
    /// Waiting in the queue now.
    pub queued: u64,
    pub delivered: u64,
    /// Attempts refused, timed out or unreachable (each retry counts).
    pub failed: u64,
    /// Deliveries given up after their last retry (or refused with a 4xx).
    pub given_up: u64,
    /// Not sent: the queue was full.
    pub dropped: u64,
    /// Finished tasks checked for alerts.
    pub checked: u64,
    /// Finished tasks not checked for alerts: the check queue was full.
    pub unchecked: u64,
}

type Check = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    given_up: AtomicU64,
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
        let queue = limits.queue.max(1);
        let (tx, rx) = bounded::<Delivery>(queue);
        let (retry_tx, retry_rx) = bounded::<Delivery>(queue);
        let retry = Arc::new(limits.retry.clone());
        for i in 0..limits.workers.max(1) {
            let (rx, c, rt, waits) = (
                rx.clone(),
                Arc::clone(&counters),
                retry_tx.clone(),
                Arc::clone(&retry),
            );
            std::thread::Builder::new()
                .name(format!("webhook-{i}"))
                .spawn(move || deliver(&rx, &c, &rt, &waits))
                .map_err(|e| Error::io("starting a webhook delivery thread", e))?;
        }
        drop(retry_tx);
        let (again, c, waits) = (tx.clone(), Arc::clone(&counters), Arc::clone(&retry));
        std::thread::Builder::new()
            .name("webhook-retry".into())
            .spawn(move || retry_loop(&retry_rx, &again, &c, &waits, queue))
            .map_err(|e| Error::io("starting the webhook retry thread", e))?;
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
                    .max_redirects(0)
                    .http_status_as_error(false)
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

    /// Record, log and queue an alert for its webhooks (no details).
    pub fn raise(&self, kind: AlertKind, subject: &str, message: &str) -> Result<AlertRecord> {
        self.raise_with(kind, subject, message, &AlertDetails::default())
    }

    /// Record, log and queue an alert with its typed details.
    pub fn raise_with(
        &self,
        kind: AlertKind,
        subject: &str,
        message: &str,
        details: &AlertDetails,
    ) -> Result<AlertRecord> {
        if kind == AlertKind::BackupSucceeded {
            tracing::info!(alert = kind_str(kind), subject, "{message}");
        } else {
            tracing::warn!(alert = kind_str(kind), subject, "{message}");
        }
        let details = serde_json::to_value(details).unwrap_or_default();
        let rec =
            Catalog::open(&self.data)?.add_alert(kind_str(kind), subject, message, &details)?;
        let body: Arc<str> = payload(&rec).to_string().into();
        for h in self
            .hooks
            .iter()
            .filter(|h| kind.delivered_to(&h.cfg.events))
        {
            let d = Delivery {
                url: h.cfg.url.clone(),
                agent: h.agent.clone(),
                body: Arc::clone(&body),
                secret: h.cfg.secret.clone(),
                id: hex::encode(rand::random::<[u8; 16]>()),
                attempt: 0,
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
            given_up: c.given_up.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            checked: c.checked.load(Ordering::Relaxed),
            unchecked: c.unchecked.load(Ordering::Relaxed),
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
mod tests {
    use super::*;
    use crate::config::WebhookSecret;
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
            secret: None,
        };
        let a = Alerter::start(
            dir.path(),
            vec![hook],
            AlertLimits {
                queue: 5,
                workers: 1,
                ..Default::default()
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

    /// A receiver that answers the given statuses in turn (then 200) and records the
    /// headers and body of every request.
    type Received = Arc<std::sync::Mutex<Vec<(std::collections::HashMap<String, String>, String)>>>;

    fn scripted_receiver(statuses: Vec<u16>) -> (String, Received) {
        use std::io::{BufRead, BufReader, Read, Write};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut statuses = statuses.into_iter();
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut headers = std::collections::HashMap::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                    }
                }
                let len = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                g.lock()
                    .unwrap()
                    .push((headers, String::from_utf8_lossy(&body).into_owned()));
                let status = statuses.next().unwrap_or(200);
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
            }
        });
        (url, got)
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !done() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn deliveries_are_signed_and_retried_with_growing_waits_until_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (url, got) = scripted_receiver(vec![500, 503]);
        let secret = "0123456789abcdef-secret";
        let hook = Webhook {
            url,
            events: Vec::new(),
            timeout_seconds: 5,
            secret: Some(WebhookSecret(secret.into())),
        };
        let retry = vec![Duration::from_millis(200), Duration::from_millis(800)];
        let a = Alerter::start(
            dir.path(),
            vec![hook],
            AlertLimits {
                queue: 10,
                workers: 1,
                retry,
            },
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        a.raise(AlertKind::TaskFailed, "r1", "it broke").unwrap();
        wait_for("three attempts", || got.lock().unwrap().len() >= 3);
        wait_for("the delivery", || a.stats().delivered == 1);
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 3, "no attempt after the 200");
        let ids: Vec<_> = got
            .iter()
            .map(|(h, _)| h["x-blockvault-delivery"].clone())
            .collect();
        assert!(ids.iter().all(|i| *i == ids[0] && i.len() == 32), "{ids:?}");
        for (h, body) in got.iter() {
            let ts: u64 = h["x-blockvault-timestamp"].parse().unwrap();
            assert_eq!(h["x-blockvault-signature"], signature(secret, ts, body));
            assert_ne!(
                h["x-blockvault-signature"],
                signature("another secret!!", ts, body)
            );
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["kind"], "task_failed");
        }
        // Waits of about 0.2 s then 0.8 s (±10 %) before the retries.
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        let s = a.stats();
        assert_eq!((s.failed, s.given_up, s.dropped), (2, 0, 0), "{s:?}");
    }

    #[test]
    fn a_4xx_is_not_retried_and_retries_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let (url404, got404) = scripted_receiver(vec![404]);
        let (url500, got500) = scripted_receiver(vec![500, 500, 500, 500]);
        let hooks = [url404, url500].map(|url| Webhook {
            url,
            events: Vec::new(),
            timeout_seconds: 5,
            secret: None,
        });
        let retry = vec![Duration::from_millis(50), Duration::from_millis(50)];
        let a = Alerter::start(
            dir.path(),
            hooks.to_vec(),
            AlertLimits {
                queue: 10,
                workers: 2,
                retry,
            },
        )
        .unwrap();
        a.raise(AlertKind::VaultFull, "v", "full").unwrap();
        wait_for("both given up", || a.stats().given_up == 2);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(got404.lock().unwrap().len(), 1, "a 404 is not retried");
        assert_eq!(got500.lock().unwrap().len(), 3, "one try and two retries");
        assert!(
            !got500.lock().unwrap()[0]
                .0
                .contains_key("x-blockvault-signature")
        );
        assert_eq!(a.stats().delivered, 0);
    }

    #[test]
    fn backup_succeeded_goes_only_to_a_webhook_that_lists_it_with_its_details() {
        let dir = tempfile::tempdir().unwrap();
        let (every, got_every) = scripted_receiver(vec![]);
        let (listed, got_listed) = scripted_receiver(vec![]);
        let hooks = vec![
            Webhook {
                url: every,
                events: Vec::new(),
                timeout_seconds: 5,
                secret: None,
            },
            Webhook {
                url: listed,
                events: vec![AlertKind::BackupSucceeded],
                timeout_seconds: 5,
                secret: None,
            },
        ];
        let a = Alerter::start(dir.path(), hooks, AlertLimits::default()).unwrap();
        let details = AlertDetails {
            resource: Some("web1".into()),
            vault: Some("v".into()),
            backup: Some("b-id".into()),
            backup_name: Some("autobk_1".into()),
            task: Some("t-1".into()),
            damaged: None,
        };
        a.raise_with(AlertKind::BackupSucceeded, "web1", "ok", &details)
            .unwrap();
        // A failure after it: the "every kind" webhook gets this one only.
        a.raise(AlertKind::TaskFailed, "backup web1", "boom")
            .unwrap();
        wait_for("the success delivery", || {
            got_listed.lock().unwrap().len() == 1
        });
        wait_for("the failure delivery", || {
            got_every.lock().unwrap().len() == 1
        });
        wait_for("both delivered", || a.stats().delivered == 2);
        let v: serde_json::Value = serde_json::from_str(&got_listed.lock().unwrap()[0].1).unwrap();
        assert_eq!(v["kind"], "backup_succeeded");
        assert_eq!(v["subject"], "web1");
        assert_eq!(v["details"]["backup"], "b-id");
        assert_eq!(v["details"]["vault"], "v");
        assert_eq!(v["details"]["task"], "t-1");
        assert!(v["time"].is_string() && v["time"] == v["at"], "{v}");
        let v: serde_json::Value = serde_json::from_str(&got_every.lock().unwrap()[0].1).unwrap();
        assert_eq!(v["kind"], "task_failed", "{v}");
        // Both are in the catalog with their details.
        let rec = Catalog::open(dir.path()).unwrap().alerts(10).unwrap();
        assert_eq!(rec.len(), 2);
        assert_eq!(rec[1].details["resource"], "web1");
    }
}

//! Alerts: task failed, vault over its warning level or full, source unreachable, vault
//! damaged (verify found corrupt data).
//!
//! Every alert is logged, recorded in the catalog (`GET /alerts`) and POSTed as JSON to
//! every configured webhook that subscribed to its kind:
//! `{"kind": "task_failed", "subject": "...", "message": "...", "at": "..."}`.
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

use std::collections::BinaryHeap;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use hmac::{Hmac, Mac};
use serde::Serialize;

use crate::catalog::{AlertRecord, Catalog};
use crate::config::{AlertKind, Webhook, WebhookSecret};
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

struct Delivery {
    url: String,
    agent: ureq::Agent,
    body: Arc<str>,
    secret: Option<WebhookSecret>,
    id: String,
    /// Attempts made so far.
    attempt: usize,
}

/// A delivery waiting for its retry, earliest first in the heap.
struct Retry(Instant, Delivery);

impl PartialEq for Retry {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for Retry {}
impl PartialOrd for Retry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Retry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.cmp(&self.0)
    }
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

    /// Record, log and queue an alert for its webhooks.
    pub fn raise(&self, kind: AlertKind, subject: &str, message: &str) -> Result<AlertRecord> {
        tracing::warn!(alert = kind_str(kind), subject, "{message}");
        let rec = Catalog::open(&self.data)?.add_alert(kind_str(kind), subject, message)?;
        let body: Arc<str> = serde_json::json!({
            "kind": rec.kind, "subject": rec.subject, "message": rec.message, "at": rec.at,
        })
        .to_string()
        .into();
        for h in self
            .hooks
            .iter()
            .filter(|h| h.cfg.events.is_empty() || h.cfg.events.contains(&kind))
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

/// The signature header value of `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: u64, body: &str) -> String {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What one attempt came to.
enum Outcome {
    Delivered,
    /// Worth another try (connection error, timeout, 5xx, 429).
    Retry(String),
    /// Refused for good (another 4xx).
    Refused(String),
}

fn attempt(d: &Delivery) -> Outcome {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    let mut req = d
        .agent
        .post(&d.url)
        .header("Content-Type", "application/json")
        .header("X-Blockvault-Delivery", &d.id)
        .header("X-Blockvault-Timestamp", ts.to_string());
    if let Some(s) = &d.secret {
        req = req.header("X-Blockvault-Signature", signature(&s.0, ts, &d.body));
    }
    match req.send(d.body.as_bytes()) {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
            Outcome::Retry(format!("answered {}", r.status()))
        }
        Ok(r) => Outcome::Refused(format!("answered {}", r.status())),
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

/// A delivery worker: one POST at a time until every sender is gone; a failed attempt
/// goes to the retry thread while retries are left.
fn deliver(rx: &Receiver<Delivery>, c: &Counters, retry: &Sender<Delivery>, waits: &[Duration]) {
    for mut d in rx {
        d.attempt += 1;
        match attempt(&d) {
            Outcome::Delivered => {
                c.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Refused(why) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                c.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    url = d.url,
                    delivery = d.id,
                    "webhook refused the alert, not retried: {why}"
                );
            }
            Outcome::Retry(why) if d.attempt > waits.len() => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                c.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    url = d.url,
                    delivery = d.id,
                    attempts = d.attempt,
                    "webhook failed, given up: {why}"
                );
            }
            Outcome::Retry(why) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    url = d.url,
                    delivery = d.id,
                    attempt = d.attempt,
                    "webhook failed, will retry: {why}"
                );
                if let Err(TrySendError::Full(d) | TrySendError::Disconnected(d)) =
                    retry.try_send(d)
                {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        url = d.url,
                        delivery = d.id,
                        "webhook retry queue full: alert not retried"
                    );
                }
            }
        }
    }
}

/// Hold failed deliveries until their next try (the wait after attempt n is
/// `waits[n - 1]`, ±10 % jitter), then queue them again. At most `cap` wait at once.
fn retry_loop(
    rx: &Receiver<Delivery>,
    again: &Sender<Delivery>,
    c: &Counters,
    waits: &[Duration],
    cap: usize,
) {
    let mut heap: BinaryHeap<Retry> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|r| r.0 <= now) {
            let Some(Retry(_, d)) = heap.pop() else { break };
            if let Err(TrySendError::Full(d) | TrySendError::Disconnected(d)) = again.try_send(d) {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    url = d.url,
                    delivery = d.id,
                    "webhook queue full: a retry was dropped"
                );
            }
        }
        let wait = heap.peek().map_or(Duration::from_secs(3600), |r| {
            r.0.saturating_duration_since(now)
        });
        match rx.recv_timeout(wait) {
            Ok(d) => {
                if heap.len() >= cap {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        url = d.url,
                        delivery = d.id,
                        "too many webhook retries waiting: alert not retried"
                    );
                    continue;
                }
                let base = waits
                    .get(d.attempt - 1)
                    .copied()
                    .unwrap_or(Duration::from_secs(60));
                let wait = base.mul_f64(0.9 + rand::random::<f64>() * 0.2);
                heap.push(Retry(Instant::now() + wait, d));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if heap.is_empty() {
                    return;
                }
                std::thread::sleep(wait.min(Duration::from_secs(1)));
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
}

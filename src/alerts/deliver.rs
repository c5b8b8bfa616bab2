//! Webhook delivery: one attempt (signed POST, no redirects), the worker loop, and the
//! retry heap that holds failed deliveries until their next try.

use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use hmac::{Hmac, Mac};

use super::Counters;
use crate::config::WebhookSecret;

pub(super) struct Delivery {
    pub(super) url: String,
    pub(super) agent: ureq::Agent,
    pub(super) body: Arc<str>,
    pub(super) secret: Option<WebhookSecret>,
    pub(super) id: String,
    /// Attempts made so far.
    pub(super) attempt: usize,
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
pub(super) fn deliver(
    rx: &Receiver<Delivery>,
    c: &Counters,
    retry: &Sender<Delivery>,
    waits: &[Duration],
) {
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
pub(super) fn retry_loop(
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

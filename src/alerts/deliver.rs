//! Webhook delivery from the catalog's outbox: one attempt (address check, signed POST
//! to the checked address, no redirects), the worker loop that records each attempt's
//! outcome, and the dispatcher that hands due deliveries to the workers.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hmac::{Hmac, Mac};

use super::Counters;
use super::dns::{NoAddress, addresses, pinned_agent};
use crate::catalog::{Catalog, DeliveryState, OutboxRow};
use crate::config::Webhook;

/// What the dispatcher and the workers share.
pub(super) struct Outbox {
    pub(super) data: PathBuf,
    pub(super) hooks: Vec<Webhook>,
    pub(super) counters: Arc<Counters>,
    /// Waits before each retry.
    pub(super) waits: Vec<Duration>,
    pub(super) allow_private: bool,
    /// Deliveries handed to a worker and not yet recorded.
    pub(super) in_flight: Mutex<HashSet<String>>,
    /// Wakes the dispatcher (a new delivery, or a worker finished one).
    pub(super) wake: Sender<()>,
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

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_millis() as i64)
}

/// What one attempt came to.
enum Outcome {
    Delivered,
    /// Worth another try (connection error, timeout, failed lookup, 5xx, 429).
    Retry(String),
    /// Refused for good by the receiver (another 4xx) or gone from the configuration.
    Failed(String),
    /// The address rule refused the host.
    Refused(String),
}

fn attempt(hook: &Webhook, d: &OutboxRow, allow_private: bool) -> Outcome {
    let timeout = Duration::from_secs(hook.timeout_seconds);
    let addrs = match addresses(&hook.url, allow_private, timeout) {
        Ok(a) => a,
        Err(NoAddress::Refused(why)) => return Outcome::Refused(why),
        Err(NoAddress::Unresolved(why)) => return Outcome::Retry(why),
    };
    let ts = (now_ms() / 1000).max(0) as u64;
    let mut req = pinned_agent(addrs, timeout)
        .post(&hook.url)
        .header("Content-Type", "application/json")
        .header("X-Blockvault-Delivery", &d.id)
        .header("X-Blockvault-Timestamp", ts.to_string());
    if let Some(s) = &hook.secret {
        req = req.header("X-Blockvault-Signature", signature(&s.0, ts, &d.body));
    }
    match req.send(d.body.as_bytes()) {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
            Outcome::Retry(format!("answered {}", r.status()))
        }
        Ok(r) => Outcome::Failed(format!("answered {}", r.status())),
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

fn open(data: &std::path::Path) -> Option<Catalog> {
    Catalog::open(data)
        .map_err(|e| tracing::error!("webhook outbox: opening the catalog: {e}"))
        .ok()
}

/// A delivery worker: one POST at a time until the dispatcher is gone; each outcome is
/// written to the outbox before the delivery leaves the in-flight set.
pub(super) fn work(ob: &Outbox, rx: &Receiver<OutboxRow>) {
    let mut cat = open(&ob.data);
    for d in rx {
        let c = &ob.counters;
        let outcome = match ob.hooks.iter().find(|h| h.url == d.url) {
            Some(h) => attempt(h, &d, ob.allow_private),
            None => Outcome::Failed("the webhook is no longer configured".into()),
        };
        let attempts = d.attempts + 1;
        let now = now_ms();
        let (state, next, err) = match outcome {
            Outcome::Delivered => {
                c.delivered.fetch_add(1, Ordering::Relaxed);
                (DeliveryState::Delivered, now, None)
            }
            Outcome::Refused(why) => {
                c.refused.fetch_add(1, Ordering::Relaxed);
                c.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(delivery = d.id, "webhook not sent: {why}");
                (DeliveryState::Refused, now, Some(why))
            }
            Outcome::Failed(why) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                c.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    delivery = d.id,
                    "webhook refused the alert, not retried: {why}"
                );
                (DeliveryState::Failed, now, Some(why))
            }
            Outcome::Retry(why) if attempts as usize > ob.waits.len() => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                c.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(delivery = d.id, attempts, "webhook failed, given up: {why}");
                (DeliveryState::Failed, now, Some(why))
            }
            Outcome::Retry(why) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                let base = ob.waits[attempts as usize - 1];
                let wait = base.mul_f64(0.9 + rand::random::<f64>() * 0.2);
                tracing::warn!(
                    delivery = d.id,
                    attempts,
                    ?wait,
                    "webhook failed, will retry: {why}"
                );
                (
                    DeliveryState::Pending,
                    now + wait.as_millis() as i64,
                    Some(why),
                )
            }
        };
        if cat.is_none() {
            cat = open(&ob.data);
        }
        if let Some(k) = &cat
            && let Err(e) = k.outbox_update(&d.id, state, attempts, next, err.as_deref())
        {
            tracing::error!(delivery = d.id, "webhook outbox: recording an attempt: {e}");
        }
        if let Ok(mut f) = ob.in_flight.lock() {
            f.remove(&d.id);
        }
        let _ = ob.wake.try_send(());
    }
}

/// The dispatcher: hands the due deliveries of the outbox to the workers (at most as
/// many as their queue holds; the rest wait in the outbox), then sleeps until the next
/// one is due, a wake-up, or a second. Ends within a second of the last `Alerter` clone.
pub(super) fn dispatch(
    ob: &Outbox,
    alive: &Weak<()>,
    wake: &Receiver<()>,
    work: &Sender<OutboxRow>,
    queue: usize,
) {
    let mut cat = None;
    while alive.upgrade().is_some() {
        if cat.is_none() {
            cat = open(&ob.data);
        }
        let mut wait = Duration::from_secs(1);
        if let Some(k) = &cat {
            let now = now_ms();
            let busy = ob.in_flight.lock().map_or(0, |f| f.len());
            match k.outbox_due(now, queue + busy) {
                Ok(rows) => {
                    for d in rows {
                        let Ok(mut f) = ob.in_flight.lock() else {
                            break;
                        };
                        if f.contains(&d.id) {
                            continue;
                        }
                        if work.is_full() {
                            break;
                        }
                        f.insert(d.id.clone());
                        drop(f);
                        if let Err(e) = work.try_send(d) {
                            if let Ok(mut f) = ob.in_flight.lock() {
                                f.remove(&e.into_inner().id);
                            }
                            break;
                        }
                    }
                }
                Err(e) => tracing::error!("webhook outbox: reading due deliveries: {e}"),
            }
            match k.outbox_pending() {
                Ok((next, pending)) => {
                    ob.counters.queued.store(pending, Ordering::Relaxed);
                    if let Some(n) = next
                        && n > now
                    {
                        wait = wait.min(Duration::from_millis((n - now) as u64));
                    }
                }
                Err(e) => tracing::error!("webhook outbox: {e}"),
            }
        }
        match wake.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

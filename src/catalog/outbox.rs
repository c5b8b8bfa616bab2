//! The webhook outbox and the stale-backup watch (see `alerts`).
//!
//! `alert_outbox`: one row per (alert, webhook) delivery, so that a delivery waiting for
//! its retry survives a restart and resumes with the same delivery id:
//! ```text
//! seq  id (X-Blockvault-Delivery)  url  kind  body (the JSON sent)  created
//! attempts  next_try (Unix ms)  state (pending|delivered|failed|refused)  last_error  updated
//! ```
//! The table is capped ([`Catalog::outbox_add`]): past the cap the oldest finished rows
//! go first, then the oldest pending ones (dropped, and counted by the caller).
//!
//! `stale_watch`: one row per (resource, backup policy) the stale check watches, with
//! when it started watching (a resource that never had a backup is late from then, not
//! from the epoch) and, while a `backup_stale` episode is open, when it was raised — so
//! a restart does not raise the same episode again.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::Catalog;
use crate::error::Result;
use crate::manifest::now_rfc3339;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its first try or a retry (`next_try`).
    Pending,
    Delivered,
    /// Given up: retries ran out, the receiver refused it (4xx), or the webhook is no
    /// longer configured.
    Failed,
    /// Not sent: the webhook's host resolved to an address the rule refuses.
    Refused,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Refused => "refused",
        }
    }

    fn parse(s: &str) -> DeliveryState {
        match s {
            "delivered" => DeliveryState::Delivered,
            "failed" => DeliveryState::Failed,
            "refused" => DeliveryState::Refused,
            _ => DeliveryState::Pending,
        }
    }
}

/// A delivery to queue.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub url: String,
    pub kind: String,
    pub body: String,
}

/// A pending delivery as the sender needs it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: String,
    pub url: String,
    pub body: String,
    pub attempts: u32,
}

/// A delivery as `GET /alerts/deliveries` shows it: no body, no secret, and of the URL
/// only scheme and host (a path often carries a token).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryRecord {
    /// The `X-Blockvault-Delivery` id, the same on every attempt.
    pub id: String,
    /// `scheme://host[:port]` of the webhook.
    pub target: String,
    pub kind: String,
    pub state: DeliveryState,
    pub attempts: u32,
    /// When it was queued (RFC 3339).
    pub created: String,
    /// Next attempt (RFC 3339) while pending.
    pub next_try: Option<String>,
    pub last_error: Option<String>,
    /// Last change (RFC 3339).
    pub updated: String,
}

/// A resource's newest backup in a vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastBackup {
    pub id: String,
    pub name: String,
    pub created: String,
}

/// A watched (resource, policy) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleWatch {
    pub resource: String,
    pub policy: String,
    pub watched_since: String,
    /// When the open `backup_stale` episode was raised; None when fresh.
    pub stale_since: Option<String>,
}

/// `scheme://authority` of a URL, without credentials, path or query.
fn target_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or("");
    format!("{scheme}://{authority}")
}

fn rfc3339_ms(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// What capping the outbox removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Finished deliveries (delivered, failed, refused) removed from the history.
    pub finished: u64,
    /// Pending deliveries removed before they were delivered.
    pub pending: u64,
}

impl Catalog {
    /// Queue deliveries (due at `now_ms`) and cap the outbox at `cap` rows: the oldest
    /// finished rows go first, then the oldest pending ones.
    pub fn outbox_add(&mut self, rows: &[NewDelivery], now_ms: i64, cap: usize) -> Result<Trimmed> {
        let now = now_rfc3339();
        let tx = self.conn.transaction()?;
        for d in rows {
            tx.execute(
                "INSERT INTO alert_outbox (id, url, kind, body, created, next_try, state, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?5)",
                params![d.id, d.url, d.kind, d.body, now, now_ms],
            )?;
        }
        let total: i64 = tx.query_row("SELECT COUNT(*) FROM alert_outbox", [], |r| r.get(0))?;
        let mut over = (total - cap as i64).max(0);
        let mut trimmed = Trimmed::default();
        if over > 0 {
            let n = tx.execute(
                "DELETE FROM alert_outbox WHERE seq IN (SELECT seq FROM alert_outbox
                 WHERE state != 'pending' ORDER BY seq LIMIT ?1)",
                params![over],
            )?;
            trimmed.finished = n as u64;
            over -= n as i64;
        }
        if over > 0 {
            let n = tx.execute(
                "DELETE FROM alert_outbox WHERE seq IN (SELECT seq FROM alert_outbox
                 WHERE state = 'pending' ORDER BY seq LIMIT ?1)",
                params![over],
            )?;
            trimmed.pending = n as u64;
        }
        tx.commit()?;
        Ok(trimmed)
    }

    /// Pending deliveries due at `now_ms`, earliest first.
    pub fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, url, body, attempts FROM alert_outbox
             WHERE state = 'pending' AND next_try <= ?1 ORDER BY next_try, seq LIMIT ?2",
        )?;
        let rows = st.query_map(params![now_ms, limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                url: r.get(1)?,
                body: r.get(2)?,
                attempts: r.get::<_, i64>(3)? as u32,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The earliest next try of a pending delivery (Unix ms), and how many are pending.
    pub fn outbox_pending(&self) -> Result<(Option<i64>, u64)> {
        Ok(self.conn.query_row(
            "SELECT MIN(next_try), COUNT(*) FROM alert_outbox WHERE state = 'pending'",
            [],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Record an attempt's outcome: the new state, attempts made, next try (pending).
    pub fn outbox_update(
        &self,
        id: &str,
        state: DeliveryState,
        attempts: u32,
        next_try_ms: i64,
        last_error: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE alert_outbox SET state = ?2, attempts = ?3, next_try = ?4,
             last_error = COALESCE(?5, last_error), updated = ?6 WHERE id = ?1",
            params![
                id,
                state.as_str(),
                attempts as i64,
                next_try_ms,
                last_error,
                now_rfc3339()
            ],
        )?;
        Ok(())
    }

    /// The newest `limit` deliveries, newest first.
    pub fn deliveries(&self, limit: usize) -> Result<Vec<DeliveryRecord>> {
        let mut st = self.conn.prepare(
            "SELECT id, url, kind, state, attempts, created, next_try, last_error, updated
             FROM alert_outbox ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            let state = DeliveryState::parse(&r.get::<_, String>(3)?);
            Ok(DeliveryRecord {
                id: r.get(0)?,
                target: target_of(&r.get::<_, String>(1)?),
                kind: r.get(2)?,
                state,
                attempts: r.get::<_, i64>(4)? as u32,
                created: r.get(5)?,
                next_try: (state == DeliveryState::Pending)
                    .then(|| rfc3339_ms(r.get(6).unwrap_or(0)))
                    .flatten(),
                last_error: r.get(7)?,
                updated: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest backup of `resource` in `vault`.
    pub fn last_backup(&self, vault: &str, resource: &str) -> Result<Option<LastBackup>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, created FROM backups WHERE vault = ?1 AND resource = ?2
                 ORDER BY created DESC LIMIT 1",
                params![vault, resource],
                |r| {
                    Ok(LastBackup {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every watched pair.
    pub fn stale_watches(&self) -> Result<Vec<StaleWatch>> {
        let mut st = self.conn.prepare(
            "SELECT resource, policy, watched_since, stale_since FROM stale_watch
             ORDER BY resource, policy",
        )?;
        let rows = st.query_map([], |r| {
            Ok(StaleWatch {
                resource: r.get(0)?,
                policy: r.get(1)?,
                watched_since: r.get(2)?,
                stale_since: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Start watching a pair (no-op when watched).
    pub fn watch_stale(&self, resource: &str, policy: &str, since: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO stale_watch (resource, policy, watched_since) VALUES (?1, ?2, ?3)",
            params![resource, policy, since],
        )?;
        Ok(())
    }

    /// Open (`Some(time)`) or close (`None`) a pair's stale episode.
    pub fn set_stale(&self, resource: &str, policy: &str, since: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE stale_watch SET stale_since = ?3 WHERE resource = ?1 AND policy = ?2",
            params![resource, policy, since],
        )?;
        Ok(())
    }

    /// Stop watching a pair (its policy or resource is gone, or the binding changed).
    pub fn unwatch_stale(&self, resource: &str, policy: &str) -> Result<()> {
        self.conn.execute(
            "DELETE FROM stale_watch WHERE resource = ?1 AND policy = ?2",
            params![resource, policy],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: usize) -> NewDelivery {
        NewDelivery {
            id: format!("d{i}"),
            url: "https://hooks.example/secret-token/x".into(),
            kind: "task_failed".into(),
            body: "{}".into(),
        }
    }

    #[test]
    fn the_outbox_is_capped_finished_rows_first_then_the_oldest_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(dir.path()).unwrap();
        let t = c
            .outbox_add(&(0..8).map(d).collect::<Vec<_>>(), 0, 10)
            .unwrap();
        assert_eq!(t, Trimmed::default());
        for i in 0..3 {
            c.outbox_update(&format!("d{i}"), DeliveryState::Delivered, 1, 0, None)
                .unwrap();
        }
        // 8 + 4 = 12 rows: the two oldest delivered go.
        let t = c
            .outbox_add(&(8..12).map(d).collect::<Vec<_>>(), 0, 10)
            .unwrap();
        assert_eq!((t.finished, t.pending), (2, 0));
        // 10 + 3: the last delivered one, then the two oldest pending.
        let t = c
            .outbox_add(&(12..15).map(d).collect::<Vec<_>>(), 0, 10)
            .unwrap();
        assert_eq!((t.finished, t.pending), (1, 2));
        let all = c.deliveries(100).unwrap();
        assert_eq!(all.len(), 10);
        let ids: Vec<_> = all.iter().map(|r| r.id.as_str()).collect();
        assert!(!ids.contains(&"d3") && !ids.contains(&"d4") && ids.contains(&"d5"));
        // Shown without the URL's path.
        assert_eq!(all[0].target, "https://hooks.example");
        assert_eq!(c.outbox_pending().unwrap().1, 10);
    }

    #[test]
    fn due_rows_come_earliest_first_and_a_retry_waits_for_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(dir.path()).unwrap();
        c.outbox_add(&[d(0), d(1)], 1000, 10).unwrap();
        c.outbox_update("d0", DeliveryState::Pending, 1, 5000, Some("answered 500"))
            .unwrap();
        let due = c.outbox_due(2000, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].id, "d1");
        let due = c.outbox_due(5000, 10).unwrap();
        assert_eq!(due[1].id, "d0");
        assert_eq!(due[1].attempts, 1);
        assert_eq!(c.outbox_pending().unwrap(), (Some(1000), 2));
        let r = c.deliveries(10).unwrap();
        assert_eq!(r[1].last_error.as_deref(), Some("answered 500"));
        assert!(r[1].next_try.is_some());
    }
}

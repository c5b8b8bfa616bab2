//! The API's audit trail, written off the request path: a request hands its record to
//! one writer thread (a bounded channel; when it is full the request waits on a
//! blocking thread, never on the async runtime, so nothing is dropped) and the writer
//! appends records in batches, one transaction each. `GET /audit` flushes first, so it
//! shows every call answered before it.
//!
//! Retention: the writer trims the log ([`AuditRetention`]: `[audit] keep_days`, default
//! 365, and `keep_max`, default 1,000,000 records) when it starts and then every hour,
//! so the audit table cannot grow without bound. Failed authentications are already
//! bounded per peer before they get here (see `guard`: at most 60 records and one
//! refusal per peer per minute).

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::catalog::Catalog;
use crate::manifest::now_rfc3339;

/// Records waiting for the writer before requests wait.
const QUEUE: usize = 16_384;
/// Most records per transaction.
const BATCH: usize = 1_024;

type Row = (String, String, String, String, String, u16);

enum Msg {
    Row(Row),
    Flush(Sender<()>),
    Retention(AuditRetention),
}

/// How long audit records are kept.
#[derive(Debug, Clone, Copy)]
pub struct AuditRetention {
    pub keep_days: u32,
    pub keep_max: usize,
    /// How often the writer trims.
    pub every: Duration,
}

impl Default for AuditRetention {
    fn default() -> AuditRetention {
        AuditRetention {
            keep_days: 365,
            keep_max: 1_000_000,
            every: Duration::from_secs(3600),
        }
    }
}

/// The requests' end of the audit writer.
pub struct AuditLog {
    tx: Sender<Msg>,
}

impl AuditLog {
    /// Start the writer on `catalog`.
    pub fn start(catalog: Catalog) -> crate::Result<AuditLog> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || run(catalog, rx))
            .map_err(|e| crate::Error::io("starting the audit writer", e))?;
        Ok(AuditLog { tx })
    }

    /// Record a call: queued at once, or (queue full) sent from a blocking thread.
    pub async fn record(&self, who: &str, role: &str, method: &str, path: &str, status: u16) {
        let row = (
            now_rfc3339(),
            who.to_owned(),
            role.to_owned(),
            method.to_owned(),
            path.to_owned(),
            status,
        );
        match self.tx.try_send(Msg::Row(row)) {
            Ok(()) => {}
            Err(TrySendError::Full(m)) => {
                let tx = self.tx.clone();
                let sent = tokio::task::spawn_blocking(move || tx.send(m).is_ok()).await;
                if !matches!(sent, Ok(true)) {
                    tracing::error!("audit log: the writer has stopped; a record was lost");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("audit log: the writer has stopped; a record was lost");
            }
        }
    }

    /// Change the retention (from the config file); the writer trims by it at once.
    pub fn set_retention(&self, r: AuditRetention) {
        if self.tx.send(Msg::Retention(r)).is_err() {
            tracing::error!("audit log: the writer has stopped; its retention was not set");
        }
    }

    /// Wait (blocking) until every record queued before this call is written.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx.send(Msg::Flush(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }
}

fn run(catalog: Catalog, rx: Receiver<Msg>) {
    let mut retention = AuditRetention::default();
    let mut next_trim = Instant::now();
    loop {
        if Instant::now() >= next_trim {
            trim(&catalog, &retention);
            next_trim = Instant::now() + retention.every;
        }
        let first = match rx.recv_timeout(next_trim.saturating_duration_since(Instant::now())) {
            Ok(m) => m,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let mut rows = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Row(r) => rows.push(r),
                Msg::Flush(f) => flushes.push(f),
                Msg::Retention(r) => {
                    retention = r;
                    next_trim = Instant::now();
                }
            }
            if rows.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !rows.is_empty() {
            let mut r = catalog.audit_many(&rows);
            if r.is_err() {
                r = catalog.audit_many(&rows);
            }
            if let Err(e) = r {
                tracing::error!("audit log: {} record(s) not written: {e}", rows.len());
            }
        }
        if Instant::now() >= next_trim {
            trim(&catalog, &retention);
            next_trim = Instant::now() + retention.every;
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Trim the log by `r` now (errors are logged: the log keeps growing until the next try).
fn trim(catalog: &Catalog, r: &AuditRetention) {
    let cutoff = time::OffsetDateTime::now_utc() - time::Duration::days(i64::from(r.keep_days));
    let cutoff = cutoff
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into());
    match catalog.trim_audit(&cutoff, r.keep_max) {
        Ok(0) => {}
        Ok(n) => tracing::info!("trimmed {n} record(s) from the audit log"),
        Err(e) => tracing::error!("trimming the audit log failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(catalog: &Catalog) -> Vec<crate::catalog::AuditRecord> {
        catalog.audit_log(1_000_000).expect("audit log")
    }

    #[test]
    fn the_writer_trims_old_records_and_keeps_the_newest_by_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = Catalog::open(dir.path()).expect("catalog");
        let old = (
            "2001-01-01T00:00:00Z".to_owned(),
            "t".to_owned(),
            "admin".to_owned(),
            "GET".to_owned(),
            "/api/v1/old".to_owned(),
            200,
        );
        catalog.audit_many(&[old]).expect("old row");
        let log = AuditLog::start(Catalog::open(dir.path()).expect("catalog")).expect("start");
        log.set_retention(AuditRetention {
            keep_days: 30,
            keep_max: 5,
            every: Duration::ZERO,
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for i in 0..12 {
            rt.block_on(log.record("t", "admin", "GET", &format!("/api/v1/n{i}"), 200));
        }
        assert!(log.flush(Duration::from_secs(10)));
        let left = rows(&catalog);
        assert_eq!(left.len(), 5, "{left:?}");
        assert!(left.iter().all(|r| r.path != "/api/v1/old"));
        assert_eq!(left[0].path, "/api/v1/n11", "the newest are kept");
        assert_eq!(left[4].path, "/api/v1/n7");
    }
}

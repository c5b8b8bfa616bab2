//! The API's audit trail, written off the request path: a request hands its record to
//! one writer thread (a bounded channel; when it is full the request waits on a
//! blocking thread, never on the async runtime, so nothing is dropped) and the writer
//! appends records in batches, one transaction each. `GET /audit` flushes first, so it
//! shows every call answered before it.

use std::time::Duration;

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

    /// Wait (blocking) until every record queued before this call is written.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx.send(Msg::Flush(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }
}

fn run(catalog: Catalog, rx: Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut rows = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Row(r) => rows.push(r),
                Msg::Flush(f) => flushes.push(f),
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
        for f in flushes {
            let _ = f.send(());
        }
    }
}

//! The task registry's writer: one thread that records task states in the catalog, in
//! the order the registry handed them over, batched (one transaction per batch, only
//! the last record of a task in a batch is written), and that trims the history of
//! ended tasks by [`TaskRetention`] at start and then every `every`.
//!
//! The registry sends under its state mutex (a channel send, no I/O); this thread
//! writes with no lock of the registry held, then tells the registry which records
//! are written so that it can forget ended tasks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::TaskInfo;
use crate::catalog::Catalog;

/// Most records written in one transaction.
const BATCH: usize = 512;

/// How much ended-task history the catalog keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRetention {
    /// Ended tasks older than this many days are trimmed.
    pub max_age_days: u32,
    /// At most this many ended tasks are kept (the newest).
    pub keep: usize,
    /// How often the history is trimmed (also once at start).
    pub every: Duration,
}

impl Default for TaskRetention {
    fn default() -> TaskRetention {
        TaskRetention {
            max_age_days: 30,
            keep: 10_000,
            every: Duration::from_secs(600),
        }
    }
}

pub(super) enum Msg {
    Put(Box<TaskInfo>, u64),
    Flush(Sender<()>),
}

/// The registry's end of the channel.
pub(super) struct Writer {
    tx: Sender<Msg>,
}

impl Writer {
    pub(super) fn new() -> (Writer, Receiver<Msg>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Writer { tx }, rx)
    }

    pub(super) fn put(&self, info: TaskInfo, seq: u64) {
        if self.tx.send(Msg::Put(Box::new(info), seq)).is_err() {
            tracing::error!("the task writer has stopped; a task state was not recorded");
        }
    }

    /// Wait until everything sent before this call is written.
    pub(super) fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx.send(Msg::Flush(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }
}

/// Told which `(task id, sequence number)` records are in the catalog.
pub(super) type Written<'a> = dyn Fn(&[(String, u64)]) + 'a;

/// Trim ended tasks by `r` now.
pub fn trim(catalog: &Catalog, r: &TaskRetention) -> crate::Result<usize> {
    let cutoff = OffsetDateTime::now_utc() - time::Duration::days(i64::from(r.max_age_days));
    let cutoff = cutoff
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into());
    catalog.trim_tasks(&cutoff, r.keep)
}

/// The writer's loop; ends when the registry is gone.
pub(super) fn run(
    mut catalog: Catalog,
    rx: Receiver<Msg>,
    retention: TaskRetention,
    written: &Written<'_>,
) {
    let mut next_trim = Instant::now();
    loop {
        if Instant::now() >= next_trim {
            match trim(&catalog, &retention) {
                Ok(0) => {}
                Ok(n) => tracing::info!("trimmed {n} ended task(s) from the history"),
                Err(e) => tracing::error!("trimming the task history failed: {e}"),
            }
            next_trim = Instant::now() + retention.every;
        }
        let first = match rx.recv_timeout(next_trim.saturating_duration_since(Instant::now())) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: HashMap<String, (Box<TaskInfo>, u64)> = HashMap::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Put(info, seq) => {
                    batch.insert(info.id.clone(), (info, seq));
                }
                Msg::Flush(tx) => flushes.push(tx),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let rows: Vec<(String, String, String, String)> = batch
                .values()
                .filter_map(|(t, _)| match serde_json::to_string(t) {
                    Ok(body) => Some((
                        t.id.clone(),
                        t.state.as_str().into(),
                        t.created.clone(),
                        body,
                    )),
                    Err(e) => {
                        tracing::error!(task = t.id, "encoding the task record failed: {e}");
                        None
                    }
                })
                .collect();
            let mut result = catalog.put_tasks(&rows);
            if result.is_err() {
                // One retry (a checkpoint or another writer may hold the database).
                result = catalog.put_tasks(&rows);
            }
            if let Err(e) = result {
                tracing::error!("recording {} task state(s) failed: {e}", rows.len());
            }
            let done: Vec<(String, u64)> = batch.into_iter().map(|(id, (_, s))| (id, s)).collect();
            written(&done);
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

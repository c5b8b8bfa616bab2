//! The task registry: every long job of the service (backup, restore, prune, gc,
//! verify) as a task with state, progress, log, result and cancel. Jobs that ran outside
//! the service (local CLI backups) are recorded after the fact ([`record_ended`]).
//!
//! Tasks are queued and run on a fixed pool of worker threads (the storage core is
//! synchronous). A task may name a lock key (the resource it backs up): two tasks with
//! the same key never run at once; the second waits in the queue. Every state change is
//! written to the catalog, so `GET /tasks` survives restarts; tasks a previous process
//! left queued or running are recorded as cancelled ("appliance restarted") at start.
//!
//! Cancel sets the task's flag; the storage core checks it per chunk and stops with
//! `Cancelled` (backups record nothing, restores remove their partial image).
//!
//! Locks and I/O: the registry's state mutex is held only for in-memory changes. Every
//! state change is handed, in order and under that mutex, to one writer thread
//! (`store.rs`) that writes the catalog in batches outside any lock; a task that ended
//! stays in memory until its last record is written, so a reader never sees an older
//! state than the registry's. The same thread trims the history of ended tasks by the
//! retention setting (age and count), off the request path. Queued and running tasks
//! are counted from memory (`/health` costs the same with 10 or 100,000 tasks in
//! history); listings by state are filtered in SQL (index on `state, created`).
//!
//! A failure keeps its [`ErrorKind`] across the task boundary (`error_kind`), so alerts
//! and clients tell failures apart by kind, never by message text.

mod store;

pub use store::TaskRetention;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backup::Progress;
use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::now_rfc3339;

/// Most log lines kept per task.
const MAX_LOG: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(&self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
    pub fn done(&self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskInfo {
    pub id: String,
    /// backup, restore, prune, gc, …
    pub kind: String,
    /// What it works on (resource, backup id).
    pub target: String,
    pub state: TaskState,
    /// Token name or "scheduler".
    pub by: String,
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub progress_percent: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub log: Vec<String>,
    pub error: Option<String>,
    /// The failure's [`ErrorKind`] (serialized as its name: `not_found`, `conflict`, …),
    /// so that a client and the alerts tell failures apart without reading the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
}

/// Handed to a running job.
pub struct TaskCtx {
    pub id: String,
    pub progress: Arc<Progress>,
    pub cancel: Arc<AtomicBool>,
    registry: Arc<Inner>,
}

impl TaskCtx {
    /// Append a line to the task's log (and the service log).
    pub fn log(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(task = self.id, "{line}");
        let mut st = self.registry.lock();
        if let Some(t) = st.tasks.get_mut(&self.id) {
            if t.info.log.len() >= MAX_LOG {
                t.info.log.remove(0);
            }
            t.info.log.push(format!("{} {line}", now_rfc3339()));
        }
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// A job: runs on a worker thread, returns its result as JSON.
pub type Job = Box<dyn FnOnce(&TaskCtx) -> Result<Value> + Send>;
/// Called when a task ends (alerts, follow-up work).
pub type Hook = Arc<dyn Fn(&TaskInfo) + Send + Sync>;

struct Live {
    info: TaskInfo,
    /// Ended, kept until the writer has recorded `seq` (see the module doc).
    ended: bool,
    /// Sequence number of the last record handed to the writer.
    seq: u64,
    lock: Option<String>,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    started: Option<Instant>,
    job: Option<Job>,
}

#[derive(Default)]
struct State {
    tasks: HashMap<String, Live>,
    queue: VecDeque<String>,
    locked: HashSet<String>,
    running: usize,
    stopping: bool,
    /// Last sequence number handed to the writer.
    seq: u64,
}

impl State {
    /// Hand `info` to the writer; called with the state mutex held, so records reach
    /// the writer in the order the states changed. Only a channel send: no I/O.
    fn persist(&mut self, writer: &store::Writer, info: &TaskInfo) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(l) = self.tasks.get_mut(&info.id) {
            l.seq = seq;
        }
        writer.put(info.clone(), seq);
    }
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    writer: store::Writer,
    /// Connections for reading task history (no lock shared with the state).
    reads: crate::catalog::Pool,
    on_end: Mutex<Vec<Hook>>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Most tasks a listing returns.
const LIST_LIMIT: usize = 1000;

/// The registry and its worker pool.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
    workers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

fn snapshot(l: &Live) -> TaskInfo {
    let mut i = l.info.clone();
    let done = l.progress.bytes_done.load(Ordering::Relaxed);
    let total = l.progress.bytes_total.load(Ordering::Relaxed);
    i.bytes_done = done;
    i.bytes_total = total;
    if i.state == TaskState::Succeeded {
        i.progress_percent = 100.0;
    } else if total > 0 {
        i.progress_percent = (done as f64 * 100.0 / total as f64).min(100.0);
    }
    if let Some(s) = l.started
        && i.state == TaskState::Running
    {
        let secs = s.elapsed().as_secs_f64().max(1e-3);
        i.bytes_per_second = done as f64 / secs;
        i.eta_seconds = (i.bytes_per_second > 0.0 && total >= done)
            .then(|| (total - done) as f64 / i.bytes_per_second);
    }
    i
}

impl Tasks {
    /// Open the registry on the catalog of `data`, start `workers` threads and the
    /// writer (which also trims history by `retention`).
    pub fn start(data: &Path, workers: usize, retention: TaskRetention) -> Result<Tasks> {
        let catalog = Catalog::open(data)?;
        // Tasks of a previous process that never ended.
        for state in ["queued", "running"] {
            for mut t in catalog.tasks::<TaskInfo>(Some(state))? {
                t.state = TaskState::Cancelled;
                t.finished = Some(now_rfc3339());
                t.error = Some("the appliance stopped before the task ended".into());
                t.error_kind = Some(ErrorKind::Cancelled);
                catalog.put_task(&t.id, t.state.as_str(), &t.created, &t)?;
            }
        }
        let (writer, rx) = store::Writer::new();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            writer,
            reads: crate::catalog::Pool::new(data, 4),
            on_end: Mutex::new(Vec::new()),
        });
        let tasks = Tasks {
            inner,
            workers: Arc::new(Mutex::new(Vec::new())),
        };
        let w = {
            let inner = Arc::clone(&tasks.inner);
            std::thread::Builder::new()
                .name("task-writer".into())
                .spawn(move || {
                    store::run(catalog, rx, retention, &|written| {
                        forget_written(&inner, written)
                    })
                })
                .map_err(|e| Error::io("starting the task writer", e))?
        };
        let mut hs = vec![w];
        for _ in 0..workers.max(1) {
            let inner = Arc::clone(&tasks.inner);
            hs.push(std::thread::spawn(move || worker(inner)));
        }
        tasks
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(hs);
        Ok(tasks)
    }

    /// Called with every task that ends.
    pub fn on_end(&self, hook: Hook) {
        self.inner
            .on_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// Queue a job; returns the task id.
    pub fn submit(
        &self,
        kind: &str,
        target: &str,
        lock: Option<String>,
        by: &str,
        job: Job,
    ) -> Result<String> {
        let id = new_task_id();
        let info = TaskInfo {
            id: id.clone(),
            kind: kind.into(),
            target: target.into(),
            state: TaskState::Queued,
            by: by.into(),
            created: crate::manifest::now_rfc3339_precise(),
            started: None,
            finished: None,
            progress_percent: 0.0,
            bytes_done: 0,
            bytes_total: 0,
            bytes_per_second: 0.0,
            eta_seconds: None,
            log: Vec::new(),
            error: None,
            error_kind: None,
            result: None,
        };
        {
            let mut st = self.inner.lock();
            if st.stopping {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    "the appliance is shutting down",
                ));
            }
            st.tasks.insert(
                id.clone(),
                Live {
                    info: info.clone(),
                    ended: false,
                    seq: 0,
                    lock,
                    progress: Arc::new(Progress::default()),
                    cancel: Arc::new(AtomicBool::new(false)),
                    started: None,
                    job: Some(job),
                },
            );
            st.persist(&self.inner.writer, &info);
            st.queue.push_back(id.clone());
        }
        self.inner.wake.notify_all();
        Ok(id)
    }

    /// A task (live, or from the catalog).
    pub fn get(&self, id: &str) -> Result<TaskInfo> {
        if let Some(l) = self.inner.lock().tasks.get(id) {
            return Ok(snapshot(l));
        }
        self.inner.reads.get()?.task(id)
    }

    /// Tasks, newest first (at most 1,000), optionally in one state. The catalog is
    /// asked for that state (SQL), and what this registry holds in memory is newer than
    /// any record of it.
    pub fn list(&self, state: Option<TaskState>) -> Result<Vec<TaskInfo>> {
        let mut out: Vec<TaskInfo> = self
            .inner
            .reads
            .get()?
            .tasks_limit(state.map(|s| s.as_str()), LIST_LIMIT)?;
        let live: HashMap<String, TaskInfo> = {
            let st = self.inner.lock();
            st.tasks
                .iter()
                .map(|(id, l)| (id.clone(), snapshot(l)))
                .collect()
        };
        out.retain(|t| !live.contains_key(&t.id));
        out.extend(
            live.into_values()
                .filter(|t| state.is_none_or(|s| t.state == s)),
        );
        out.sort_by(|a, b| (&b.created, &b.id).cmp(&(&a.created, &a.id)));
        out.truncate(LIST_LIMIT);
        Ok(out)
    }

    /// How many tasks of this appliance are queued and running, from memory: the cost
    /// does not grow with the task history.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        let running = st
            .tasks
            .values()
            .filter(|l| l.info.state == TaskState::Running)
            .count();
        let queued = st
            .tasks
            .values()
            .filter(|l| l.info.state == TaskState::Queued)
            .count();
        (queued, running)
    }

    /// Every task held in memory with its state: queued and running ones, and ended ones
    /// whose last record the writer has not written yet (newer than the catalog's).
    pub fn live_states(&self) -> Vec<(String, TaskState)> {
        let st = self.inner.lock();
        st.tasks
            .iter()
            .map(|(id, l)| (id.clone(), l.info.state))
            .collect()
    }

    /// Wait until every record handed to the writer so far is in the catalog (or
    /// `timeout` passed).
    pub fn flush(&self, timeout: Duration) -> bool {
        self.inner.writer.flush(timeout)
    }

    /// Cancel a task: a queued one ends at once, a running one stops at its next check,
    /// one that already ended is returned as it is (cancel is idempotent).
    pub fn cancel(&self, id: &str) -> Result<TaskInfo> {
        let mut st = self.inner.lock();
        let Some(l) = st.tasks.get_mut(id) else {
            drop(st);
            return self.get(id);
        };
        l.cancel.store(true, Ordering::Relaxed);
        if l.info.state == TaskState::Queued {
            l.info.state = TaskState::Cancelled;
            l.info.finished = Some(now_rfc3339());
            l.info.error = Some("cancelled before it started".into());
            l.info.error_kind = Some(ErrorKind::Cancelled);
            l.job = None;
            l.ended = true;
            let info = l.info.clone();
            st.queue.retain(|q| q != id);
            st.persist(&self.inner.writer, &info);
            drop(st);
            self.run_hooks(&info);
            return Ok(info);
        }
        Ok(snapshot(l))
    }

    fn run_hooks(&self, info: &TaskInfo) {
        run_hooks(&self.inner, info);
    }

    /// Wait until task `id` has ended (or `timeout` passed); returns its last state.
    pub fn wait(&self, id: &str, timeout: Duration) -> Result<TaskInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.get(id)?;
            if t.state.done() || Instant::now() >= deadline {
                return Ok(t);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop: cancel everything queued or running, wait up to `grace` for running tasks
    /// to record their end.
    pub fn shutdown(&self, grace: Duration) {
        let ids: Vec<String> = {
            let mut st = self.inner.lock();
            st.stopping = true;
            st.tasks
                .iter()
                .filter(|(_, l)| !l.ended)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            let _ = self.cancel(&id);
        }
        self.inner.wake.notify_all();
        let deadline = Instant::now() + grace;
        while self.inner.lock().running > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // What ended is recorded before the process goes.
        if !self.flush(Duration::from_secs(10)) {
            tracing::error!("the task writer did not record every task within 10 s");
        }
    }
}

/// `<yyyymmddThhmmss>-<8 hex>`.
fn new_task_id() -> String {
    format!(
        "{}-{}",
        crate::manifest::new_backup_id()
            .split('-')
            .next()
            .unwrap_or("task"),
        hex::encode(rand::random::<[u8; 4]>())
    )
}

/// A job that ran outside the service, as [`record_ended`] records it.
pub struct Ended<'a> {
    pub kind: &'a str,
    pub target: &'a str,
    /// Who ran it (`cli`).
    pub by: &'a str,
    /// When it started (RFC 3339).
    pub started: &'a str,
    /// Bytes (done, total) it read.
    pub bytes: (u64, u64),
    pub log: Vec<String>,
}

/// Record a job that ran outside the service (a local CLI backup on the data dir) as an
/// ended task, after the fact, with its result or error.
pub fn record_ended(
    catalog: &Catalog,
    job: Ended<'_>,
    outcome: std::result::Result<Value, &Error>,
) -> Result<TaskInfo> {
    let (state, result, error, error_kind) = match outcome {
        Ok(v) => (TaskState::Succeeded, Some(v), None, None),
        Err(e) => (
            if e.kind() == ErrorKind::Cancelled {
                TaskState::Cancelled
            } else {
                TaskState::Failed
            },
            None,
            Some(e.to_string()),
            Some(e.kind()),
        ),
    };
    let info = TaskInfo {
        id: new_task_id(),
        kind: job.kind.into(),
        target: job.target.into(),
        state,
        by: job.by.into(),
        created: job.started.into(),
        started: Some(job.started.into()),
        finished: Some(now_rfc3339()),
        progress_percent: if state == TaskState::Succeeded {
            100.0
        } else {
            0.0
        },
        bytes_done: job.bytes.0,
        bytes_total: job.bytes.1,
        bytes_per_second: 0.0,
        eta_seconds: None,
        log: job.log,
        error,
        error_kind,
        result,
    };
    catalog.put_task(&info.id, info.state.as_str(), &info.created, &info)?;
    Ok(info)
}

fn run_hooks(inner: &Inner, info: &TaskInfo) {
    let hooks = inner
        .on_end
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for h in hooks {
        h(info);
    }
}

/// The writer recorded these `(id, seq)`: ended tasks whose last record that was leave
/// memory.
fn forget_written(inner: &Inner, written: &[(String, u64)]) {
    let mut st = inner.lock();
    for (id, seq) in written {
        if st.tasks.get(id).is_some_and(|l| l.ended && l.seq == *seq) {
            st.tasks.remove(id);
        }
    }
}

fn worker(inner: Arc<Inner>) {
    loop {
        let (id, job, ctx) = {
            let mut st = inner.lock();
            loop {
                if st.stopping {
                    return;
                }
                let pick = st.queue.iter().position(|id| {
                    st.tasks
                        .get(id)
                        .and_then(|l| l.lock.as_ref())
                        .is_none_or(|k| !st.locked.contains(k))
                });
                if let Some(i) = pick {
                    let id = st.queue.remove(i).unwrap_or_default();
                    st.running += 1;
                    let Some(l) = st.tasks.get_mut(&id) else {
                        st.running -= 1;
                        continue;
                    };
                    l.info.state = TaskState::Running;
                    l.info.started = Some(now_rfc3339());
                    l.started = Some(Instant::now());
                    let job = l.job.take();
                    let ctx = TaskCtx {
                        id: id.clone(),
                        progress: Arc::clone(&l.progress),
                        cancel: Arc::clone(&l.cancel),
                        registry: Arc::clone(&inner),
                    };
                    let info = l.info.clone();
                    if let Some(k) = l.lock.clone() {
                        st.locked.insert(k);
                    }
                    st.persist(&inner.writer, &info);
                    break (id, job, ctx);
                }
                st = inner.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = match job {
            Some(job) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&ctx)))
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "the task panicked"))),
            None => Err(Error::cancelled("cancelled")),
        };
        let info = {
            let mut st = inner.lock();
            st.running -= 1;
            let Some(l) = st.tasks.get_mut(&id) else {
                continue;
            };
            let lock = l.lock.clone();
            match result {
                Ok(v) => {
                    l.info.state = TaskState::Succeeded;
                    l.info.result = Some(v);
                }
                Err(e) if e.kind() == ErrorKind::Cancelled || ctx.cancelled() => {
                    l.info.state = TaskState::Cancelled;
                    l.info.error = Some(e.to_string());
                    l.info.error_kind = Some(ErrorKind::Cancelled);
                }
                Err(e) => {
                    l.info.state = TaskState::Failed;
                    l.info.error = Some(e.to_string());
                    l.info.error_kind = Some(e.kind());
                }
            }
            l.info.finished = Some(now_rfc3339());
            l.ended = true;
            let info = snapshot(l);
            // The final figures stay with the record (progress is not live any more).
            l.info = info.clone();
            if let Some(k) = &lock {
                st.locked.remove(k);
            }
            st.persist(&inner.writer, &info);
            info
        };
        inner.wake.notify_all();
        run_hooks(&inner, &info);
    }
}

#[cfg(test)]
mod tests;

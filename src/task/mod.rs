//! The task registry: every long job of the service (backup, restore, prune, gc) as a
//! task with state, progress, log, result and cancel.
//!
//! Tasks are queued and run on a fixed pool of worker threads (the storage core is
//! synchronous). A task may name a lock key (the resource it backs up): two tasks with
//! the same key never run at once; the second waits in the queue. Every state change is
//! written to the catalog, so `GET /tasks` survives restarts; tasks a previous process
//! left queued or running are recorded as cancelled ("appliance restarted") at start.
//!
//! Cancel sets the task's flag; the storage core checks it per chunk and stops with
//! `Cancelled` (backups record nothing, restores remove their partial image).

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    fn done(&self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The failure's [`ErrorKind`] name (`not_found`, `conflict`, …), so that a client
    /// can tell failures apart without reading the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
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
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    catalog: Mutex<Catalog>,
    on_end: Mutex<Vec<Hook>>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn persist(&self, info: &TaskInfo) {
        let cat = self.catalog.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = cat.put_task(&info.id, info.state.as_str(), &info.created, info) {
            tracing::error!(task = info.id, "recording the task failed: {e}");
        }
    }
}

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
    /// Open the registry on the catalog of `data` and start `workers` threads.
    pub fn start(data: &Path, workers: usize) -> Result<Tasks> {
        let catalog = Catalog::open(data)?;
        // Tasks of a previous process that never ended.
        for state in ["queued", "running"] {
            for mut t in catalog.tasks::<TaskInfo>(Some(state))? {
                t.state = TaskState::Cancelled;
                t.finished = Some(now_rfc3339());
                t.error = Some("the appliance stopped before the task ended".into());
                catalog.put_task(&t.id, t.state.as_str(), &t.created, &t)?;
            }
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            catalog: Mutex::new(catalog),
            on_end: Mutex::new(Vec::new()),
        });
        let tasks = Tasks {
            inner,
            workers: Arc::new(Mutex::new(Vec::new())),
        };
        for _ in 0..workers.max(1) {
            let inner = Arc::clone(&tasks.inner);
            let h = std::thread::spawn(move || worker(inner));
            tasks
                .workers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(h);
        }
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
        let id = format!(
            "{}-{}",
            crate::manifest::new_backup_id()
                .split('-')
                .next()
                .unwrap_or("task"),
            hex::encode(rand::random::<[u8; 4]>())
        );
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
            self.inner.persist(&info);
            st.tasks.insert(
                id.clone(),
                Live {
                    info,
                    lock,
                    progress: Arc::new(Progress::default()),
                    cancel: Arc::new(AtomicBool::new(false)),
                    started: None,
                    job: Some(job),
                },
            );
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
        self.inner
            .catalog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .task(id)
    }

    /// Tasks, newest first, optionally in one state.
    pub fn list(&self, state: Option<TaskState>) -> Result<Vec<TaskInfo>> {
        let mut out: Vec<TaskInfo> = self
            .inner
            .catalog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tasks(None)?;
        let st = self.inner.lock();
        for t in &mut out {
            if let Some(l) = st.tasks.get(&t.id) {
                *t = snapshot(l);
            }
        }
        drop(st);
        out.retain(|t| state.is_none_or(|s| t.state == s));
        Ok(out)
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
            l.job = None;
            let info = l.info.clone();
            st.queue.retain(|q| q != id);
            st.tasks.remove(id);
            drop(st);
            self.inner.persist(&info);
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
            st.tasks.keys().cloned().collect()
        };
        for id in ids {
            let _ = self.cancel(&id);
        }
        self.inner.wake.notify_all();
        let deadline = Instant::now() + grace;
        while self.inner.lock().running > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
                    inner.persist(&info);
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
            let Some(mut l) = st.tasks.remove(&id) else {
                continue;
            };
            if let Some(k) = &l.lock {
                st.locked.remove(k);
            }
            match result {
                Ok(v) => {
                    l.info.state = TaskState::Succeeded;
                    l.info.result = Some(v);
                }
                Err(e) if e.kind() == ErrorKind::Cancelled || ctx.cancelled() => {
                    l.info.state = TaskState::Cancelled;
                    l.info.error = Some(e.to_string());
                    l.info.error_kind = Some(ErrorKind::Cancelled.as_str().into());
                }
                Err(e) => {
                    l.info.state = TaskState::Failed;
                    l.info.error = Some(e.to_string());
                    l.info.error_kind = Some(e.kind().as_str().into());
                }
            }
            l.info.finished = Some(now_rfc3339());
            snapshot(&l)
        };
        inner.wake.notify_all();
        inner.persist(&info);
        run_hooks(&inner, &info);
    }
}

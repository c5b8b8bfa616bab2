//! Application consistency: freeze before the point in time is taken, thaw right after.
//!
//! Two kinds of hooks, both optional, both with a timeout:
//! - user scripts (`sh -c COMMAND`, like a MySQL `FLUSH TABLES WITH READ LOCK` helper),
//!   run with `BLOCKVAULT_PHASE=freeze|thaw` and `BLOCKVAULT_RESOURCE` in the
//!   environment, in their own process group so that a timeout kills all of them;
//! - the QEMU guest agent (`guest-fsfreeze-freeze` / `guest-fsfreeze-thaw`).
//!
//! Order: freeze script, then guest fsfreeze; thaw in reverse. Freezing never fails a
//! backup: a step that fails or times out is recorded, what was frozen is thawed at once,
//! and the backup goes on crash-consistent, saying why. Thaw always runs for every step
//! that was attempted, whatever happened in between (a [`Frozen`] thaws when dropped).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::manifest::Consistency;
use crate::qmp::Qga;

/// What to run around the point in time.
#[derive(Debug, Clone, Default)]
pub struct FreezeHooks {
    pub freeze_script: Option<String>,
    pub thaw_script: Option<String>,
    /// Unix socket of the guest agent.
    pub qga: Option<PathBuf>,
    /// Limit for each step (default 60 s).
    pub timeout: Option<Duration>,
}

impl FreezeHooks {
    pub fn is_empty(&self) -> bool {
        self.freeze_script.is_none() && self.thaw_script.is_none() && self.qga.is_none()
    }

    fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(60))
    }

    /// Run the freeze steps for `resource`. Returns the frozen state, to be thawed.
    /// A raised `cancel` stops a freeze script that is still running (recorded as a
    /// failed step); thaw steps are never interrupted.
    pub fn freeze(&self, resource: &str, cancel: Option<&AtomicBool>) -> Frozen<'_> {
        let mut f = Frozen {
            hooks: self,
            resource: resource.to_string(),
            steps: Vec::new(),
            failure: None,
            qga_attempted: false,
            thawed: self.is_empty(),
        };
        if self.is_empty() {
            return f;
        }
        if let Some(cmd) = &self.freeze_script {
            match run_script(cmd, "freeze", resource, self.timeout(), cancel) {
                Ok(()) => f.steps.push("freeze-script: ok".into()),
                Err(why) => f.fail(format!("freeze script {why}")),
            }
        }
        if f.failure.is_none()
            && let Some(sock) = &self.qga
        {
            f.qga_attempted = true;
            match Qga::connect(sock, self.timeout())
                .and_then(|mut q| q.execute("guest-fsfreeze-freeze", self.timeout()))
            {
                Ok(n) => f
                    .steps
                    .push(format!("guest-fsfreeze-freeze: {n} file systems")),
                Err(e) => f.fail(format!("guest agent freeze failed: {e}")),
            }
        }
        if f.failure.is_some() {
            // Do not keep anything frozen while the point in time is taken anyway.
            f.thaw();
        }
        f
    }
}

/// Hooks that ran (or were attempted); thaw with [`Frozen::thaw`] or by dropping.
pub struct Frozen<'a> {
    hooks: &'a FreezeHooks,
    resource: String,
    steps: Vec<String>,
    failure: Option<String>,
    qga_attempted: bool,
    thawed: bool,
}

impl Frozen<'_> {
    fn fail(&mut self, why: String) {
        tracing::warn!(
            resource = self.resource,
            "{why}; the backup will be crash-consistent"
        );
        self.steps.push(why.clone());
        self.failure.get_or_insert(why);
    }

    /// Thaw everything that was attempted, in reverse order. Runs once.
    pub fn thaw(&mut self) {
        if self.thawed {
            return;
        }
        self.thawed = true;
        let t = self.hooks.timeout();
        if self.qga_attempted
            && let Some(sock) = &self.hooks.qga
        {
            match Qga::connect(sock, t).and_then(|mut q| q.execute("guest-fsfreeze-thaw", t)) {
                Ok(n) => self
                    .steps
                    .push(format!("guest-fsfreeze-thaw: {n} file systems")),
                Err(e) => {
                    let why = format!("guest agent thaw failed: {e}");
                    tracing::error!(resource = self.resource, "{why}");
                    self.steps.push(why);
                }
            }
        }
        if let Some(cmd) = &self.hooks.thaw_script {
            match run_script(cmd, "thaw", &self.resource, t, None) {
                Ok(()) => self.steps.push("thaw-script: ok".into()),
                Err(why) => {
                    let why = format!("thaw script {why}");
                    tracing::error!(resource = self.resource, "{why}");
                    self.steps.push(why);
                }
            }
        }
    }

    /// The level achieved (call after [`Frozen::thaw`]) and why it fell back, if it did.
    pub fn outcome(&self) -> (Consistency, Option<String>, Vec<String>) {
        if self.hooks.is_empty() {
            return (Consistency::CrashConsistent, None, Vec::new());
        }
        let level = if self.failure.is_none() {
            Consistency::ApplicationConsistent
        } else {
            Consistency::CrashConsistent
        };
        (level, self.failure.clone(), self.steps.clone())
    }

    /// Record that the point in time could not be taken while frozen.
    pub fn capture_failed(&mut self, why: &str) {
        self.fail(format!("capture failed: {why}"));
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Run `sh -c cmd`; Err says why it did not succeed ("timed out after 5s", "exited 1: …").
fn run_script(
    cmd: &str,
    phase: &str,
    resource: &str,
    timeout: Duration,
    cancel: Option<&AtomicBool>,
) -> std::result::Result<(), String> {
    use std::os::unix::process::CommandExt;
    let log = std::env::temp_dir().join(format!(
        "blockvault-{phase}-{}.log",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let out = std::fs::File::create(&log).map_err(|e| format!("could not start: {e}"))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("could not start: {e}"))?;
    let started = Instant::now();
    let result = (|| {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("BLOCKVAULT_PHASE", phase)
            .env("BLOCKVAULT_RESOURCE", resource)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("could not start: {e}"))?;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("failed ({status})")),
                Ok(None)
                    if started.elapsed() >= timeout
                        || cancel.is_some_and(|c| c.load(Ordering::Relaxed)) =>
                {
                    let pgid = Pid::from_raw(child.id() as i32);
                    let _ = killpg(pgid, Signal::SIGKILL);
                    let _ = child.wait();
                    if started.elapsed() < timeout {
                        return Err("stopped: the backup was cancelled".into());
                    }
                    return Err(format!("timed out after {:.1}s", timeout.as_secs_f64()));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("could not be waited for: {e}")),
            }
        }
    })();
    let output = std::fs::read(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let tail = String::from_utf8_lossy(&output[output.len().saturating_sub(2048)..]);
    let tail = tail.trim();
    if !tail.is_empty() {
        tracing::info!(resource, phase, "script output: {tail}");
    }
    match result {
        Err(why) if !tail.is_empty() => {
            Err(format!("{why}: {}", tail.lines().last().unwrap_or("")))
        }
        r => r,
    }
}

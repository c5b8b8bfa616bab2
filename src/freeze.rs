//! Application consistency: freeze before the point in time is taken, thaw right after.
//!
//! Two kinds of hooks, both optional, both with a timeout:
//! - user scripts (`sh -c COMMAND`, like a MySQL `FLUSH TABLES WITH READ LOCK` helper),
//!   run with `BLOCKVAULT_PHASE=freeze|thaw` and `BLOCKVAULT_RESOURCE` in the
//!   environment, in their own process group so that a timeout kills all of them;
//! - the QEMU guest agent (`guest-fsfreeze-freeze` / `guest-fsfreeze-thaw`).
//!
//! Order: freeze script, then guest fsfreeze; thaw in reverse. A step that fails or
//! times out is recorded, what was frozen is thawed at once, and the backup goes on
//! crash-consistent, saying why — or fails, when application consistency is required
//! ([`FreezeHooks::require_app_consistent`]). Thaw always runs for every step that was
//! attempted, whatever happened in between (a [`Frozen`] thaws when dropped).
//!
//! The guest agent runs one command at a time, and a freeze that outlives our timeout
//! still completes in the guest later: the guest would then stay frozen for good. So the
//! guest thaw is confirmed, not just sent: on the one agent connection, rounds of
//! `guest-sync-delimited`, `guest-fsfreeze-thaw`, `guest-fsfreeze-status` until the
//! status says `thawed` or the thaw deadline (default 60 s) passes; a thaw that cannot
//! be confirmed fails the backup ([`Frozen::check`]: "the guest may still be frozen").
//! A cancel stops the wait for a guest freeze at once; the thaw still runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::{Error, ErrorKind, Result};
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
    /// How long to keep trying to confirm a guest thaw (default 60 s).
    pub thaw_deadline: Option<Duration>,
    /// Fail instead of falling back to crash-consistent.
    pub require_app_consistent: bool,
}

impl FreezeHooks {
    pub fn is_empty(&self) -> bool {
        self.freeze_script.is_none() && self.thaw_script.is_none() && self.qga.is_none()
    }

    fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(60))
    }

    fn thaw_deadline(&self) -> Duration {
        self.thaw_deadline.unwrap_or(Duration::from_secs(60))
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
            agent: None,
            thaw_failure: None,
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
            let t = self.timeout();
            let deadline = Instant::now() + t;
            match Qga::connect(sock, t) {
                Ok(q) => {
                    let q = f.agent.insert(q);
                    match q
                        .sync(deadline, cancel)
                        .and_then(|()| q.command("guest-fsfreeze-freeze", deadline, cancel))
                    {
                        Ok(n) => f
                            .steps
                            .push(format!("guest-fsfreeze-freeze: {n} file systems")),
                        Err(e) if Qga::is_timeout(&e) => f.fail(format!(
                            "guest agent freeze did not answer within {:.1}s",
                            t.as_secs_f64()
                        )),
                        Err(e) if e.kind() == ErrorKind::Cancelled => {
                            f.fail("guest agent freeze stopped: the backup was cancelled".into())
                        }
                        Err(e) => f.fail(format!("guest agent freeze failed: {e}")),
                    }
                }
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
    /// The agent connection the freeze used (kept for the thaw: the agent answers in
    /// order, and a chardev socket serves one client).
    agent: Option<Qga>,
    /// Why the guest thaw could not be confirmed.
    thaw_failure: Option<String>,
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
            let sock = sock.clone();
            match self.thaw_guest(&sock) {
                Ok(step) => self.steps.push(step),
                Err(why) => {
                    let why = format!(
                        "guest agent at {} did not confirm the thaw within {:.0}s ({why}): \
                         the guest may still be frozen; check it with guest-fsfreeze-status \
                         and thaw it with guest-fsfreeze-thaw",
                        sock.display(),
                        self.hooks.thaw_deadline().as_secs_f64()
                    );
                    tracing::error!(resource = self.resource, "{why}");
                    self.steps.push(why.clone());
                    self.thaw_failure = Some(why);
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

    /// Thaw the guest and confirm it: rounds of sync, thaw, status on one connection
    /// (reconnecting when it breaks) until the status is `thawed` or the thaw deadline
    /// passes. Returns the step to record, or why the thaw is not confirmed.
    fn thaw_guest(&mut self, sock: &Path) -> std::result::Result<String, String> {
        let started = Instant::now();
        let deadline = started + self.hooks.thaw_deadline();
        // One round may wait this long for the busy agent before asking again.
        let step = self
            .hooks
            .timeout()
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let mut why = String::from("no answer");
        let mut rounds = 0u32;
        while Instant::now() < deadline {
            rounds += 1;
            let round = deadline.min(Instant::now() + step);
            let q = match &mut self.agent {
                Some(q) => q,
                None => match Qga::connect(sock, round.saturating_duration_since(Instant::now())) {
                    Ok(q) => self.agent.insert(q),
                    Err(e) => {
                        why = e.to_string();
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                },
            };
            let r = q.sync(round, None).and_then(|()| {
                // The agent answers now: the thaw gets a step of its own.
                let round = deadline.min(Instant::now() + step);
                let n = q.command("guest-fsfreeze-thaw", round, None)?;
                let status = q.command("guest-fsfreeze-status", round, None)?;
                Ok((n, status))
            });
            match r {
                Ok((n, status)) if status == "thawed" => {
                    let late = if rounds > 1 {
                        format!(
                            " (confirmed after {:.1}s, {rounds} rounds)",
                            started.elapsed().as_secs_f64()
                        )
                    } else {
                        String::new()
                    };
                    return Ok(format!("guest-fsfreeze-thaw: {n} file systems{late}"));
                }
                Ok((_, status)) => why = format!("status still {status}"),
                Err(e) if Qga::is_timeout(&e) => why = "the agent is busy".into(),
                Err(e) => {
                    why = e.to_string();
                    if e.kind() == ErrorKind::Io {
                        self.agent = None; // broken: connect again
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Err(why)
    }

    /// After a thaw: an error when the guest thaw is not confirmed.
    pub fn check_thawed(&self) -> Result<()> {
        match &self.thaw_failure {
            Some(why) => Err(Error::new(ErrorKind::Io, why.clone())),
            None => Ok(()),
        }
    }

    /// Whether a freeze step failed (the capture would be crash-consistent).
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    /// After a thaw: an error when the guest thaw is not confirmed (the guest may still
    /// be frozen), or when application consistency is required and was not reached.
    pub fn check(&self) -> Result<()> {
        self.check_thawed()?;
        if self.hooks.require_app_consistent {
            let why = match &self.failure {
                Some(f) => f.clone(),
                None if self.hooks.is_empty() => {
                    "no freeze step is configured (--qga, --freeze)".into()
                }
                None => return Ok(()),
            };
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{}: an application-consistent backup is required \
                     (require_app_consistent) but {why}; nothing was stored",
                    self.resource
                ),
            ));
        }
        Ok(())
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

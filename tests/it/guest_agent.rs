//! A SCRIPTED (mock) QEMU guest agent — no VM with a real qemu-ga runs on the test
//! machine — and the server backup test that freezes and thaws through it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::qsd::Qsd;
use crate::server::*;

/// How the SCRIPTED (mock) guest agent behaves: no VM with a real qemu-ga can run on
/// the test machine. Like qemu-ga it runs one command at a time.
#[derive(Clone, Copy, Default)]
pub(crate) struct AgentScript {
    /// guest-fsfreeze-freeze answers with an error.
    pub fail_freeze: bool,
    /// guest-fsfreeze-freeze takes this long (a slow fsfreeze hook in the guest).
    pub freeze_takes: Duration,
    /// guest-fsfreeze-thaw fails and the guest stays frozen.
    pub never_thaws: bool,
}

/// What the scripted agent saw, from its side.
#[derive(Default)]
pub(crate) struct AgentLog {
    pub commands: Vec<String>,
    /// Frozen since (None: thawed).
    pub frozen_since: Option<Instant>,
    /// How long each freeze lasted, once thawed.
    pub frozen_for: Vec<Duration>,
}

/// A SCRIPTED guest agent on `sock`: guest-sync(-delimited) echoes the id (the delimited
/// one after an 0xFF byte; an 0xFF in the input is dropped, as qemu-ga's parser does),
/// guest-fsfreeze-freeze/-thaw/-status as in [`AgentScript`], 2 file systems.
/// Its thread ends when the returned guard is dropped (otherwise it would sit in accept()
/// for the rest of the test run under this test's thread name).
pub(crate) fn scripted_guest_agent(
    sock: &Path,
    script: AgentScript,
) -> (Arc<std::sync::Mutex<AgentLog>>, StopOnDrop) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(AgentLog::default()));
    let log = Arc::clone(&seen);
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(_) => return,
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut w = conn.try_clone().unwrap();
            let mut r = BufReader::new(conn);
            loop {
                let mut raw = Vec::new();
                if r.read_until(b'\n', &mut raw).unwrap_or(0) == 0 {
                    break;
                }
                raw.retain(|&b| b != 0xFF);
                if raw.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: Value = serde_json::from_slice(&raw).unwrap();
                let cmd = v["execute"].as_str().unwrap_or("").to_string();
                log.lock().unwrap().commands.push(cmd.clone());
                let mut out = Vec::new();
                let reply = match cmd.as_str() {
                    "guest-sync" => json!({"return": v["arguments"]["id"]}),
                    "guest-sync-delimited" => {
                        out.push(0xFF);
                        json!({"return": v["arguments"]["id"]})
                    }
                    "guest-fsfreeze-freeze" if script.fail_freeze => {
                        json!({"error": {"class": "GenericError", "desc": "fsfreeze is not supported"}})
                    }
                    "guest-fsfreeze-freeze" => {
                        let t = Instant::now();
                        while t.elapsed() < script.freeze_takes {
                            if stopped.load(Ordering::Relaxed) {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        log.lock()
                            .unwrap()
                            .frozen_since
                            .get_or_insert_with(Instant::now);
                        json!({"return": 2})
                    }
                    "guest-fsfreeze-thaw" if script.never_thaws => {
                        json!({"error": {"class": "GenericError", "desc": "thaw failed: device busy"}})
                    }
                    "guest-fsfreeze-thaw" => {
                        let mut l = log.lock().unwrap();
                        match l.frozen_since.take() {
                            Some(t) => {
                                l.frozen_for.push(t.elapsed());
                                json!({"return": 2})
                            }
                            None => json!({"return": 0}),
                        }
                    }
                    "guest-fsfreeze-status" => {
                        let frozen = log.lock().unwrap().frozen_since.is_some();
                        json!({"return": if frozen { "frozen" } else { "thawed" }})
                    }
                    _ => json!({"error": {"class": "CommandNotFound", "desc": "unknown"}}),
                };
                out.extend(reply.to_string().into_bytes());
                out.push(b'\n');
                if w.write_all(&out).is_err() {
                    break;
                }
            }
        }
    });
    (seen, StopOnDrop(stop, Some(thread)))
}

/// The freeze and thaw commands the agent saw, in order.
fn freeze_commands(log: &std::sync::Mutex<AgentLog>) -> Vec<String> {
    log.lock()
        .unwrap()
        .commands
        .iter()
        .filter(|c| *c == "guest-fsfreeze-freeze" || *c == "guest-fsfreeze-thaw")
        .cloned()
        .collect()
}

pub(crate) struct StopOnDrop(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn the_guest_agent_freezes_and_thaws_around_the_instant() {
    let env = Env::new();
    let a = random_image(&env, "a", 4, 8);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let qga = env.path("qga.sock");
    let (seen, _agent) = scripted_guest_agent(&qga, AgentScript::default());
    let m = live_backup_ok(&env, &qsd, &["--qga", qga.to_str().unwrap()]);
    assert_eq!(m["capture"]["consistency"], "application-consistent");
    assert_eq!(
        freeze_commands(&seen),
        ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    let log = seen.lock().unwrap();
    assert!(log.frozen_since.is_none(), "the guest ends thawed");
    assert!(
        !log.commands.iter().any(|c| c == "guest-sync"),
        "resynchronised with guest-sync-delimited: {:?}",
        log.commands
    );
    assert_eq!(log.commands.last().unwrap(), "guest-fsfreeze-status");
    drop(log);

    // A guest whose freeze fails is thawed anyway and the backup says why.
    let qga2 = env.path("qga2.sock");
    let script = AgentScript {
        fail_freeze: true,
        ..AgentScript::default()
    };
    let (seen, _agent2) = scripted_guest_agent(&qga2, script);
    let m = live_backup_ok(&env, &qsd, &["--qga", qga2.to_str().unwrap()]);
    assert_eq!(m["capture"]["consistency"], "crash-consistent");
    assert!(s(&m["capture"], "note").contains("not supported"), "{m}");
    assert!(freeze_commands(&seen).contains(&"guest-fsfreeze-thaw".to_string()));
}

//! Live capture at the edges a production VM reaches: a QEMU that already runs an NBD
//! server, a run SIGKILLed mid-read, a VM gone mid-backup, runs with private temp dirs.
//! All against a real qemu-storage-daemon (tests/it/qsd.rs).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Env, images_equal, random_bytes, s, u};
use crate::guest_agent::{AgentScript, scripted_guest_agent};
use crate::qsd::Qsd;
use crate::server::{disk, live_backup, live_backup_ok, random_image};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

/// Files named `blockvault-…` in `dir`.
fn ours_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("blockvault-"))
        .collect()
}

#[test]
fn a_daemon_with_its_own_nbd_server_is_backed_up_twice_and_without_the_flag_the_error_says_what_to_pass()
 {
    let env = Env::new();
    let a = random_image(&env, "a", 16, 11);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let qmp = format!("qmp:{}", qsd.qmp.display());

    let out = env.run(&["--json", "backup", &qmp, "--vault", "v", "--id", "srv"]);
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = s(&v["error"], "message");
    let running = format!("--nbd-server unix:{}", qsd.nbd.display());
    for says in [
        "already runs an NBD server",
        "--nbd-server unix:PATH",
        "--nbd-server HOST:PORT",
        "\"nbd_server\"",
        running.as_str(),
    ] {
        assert!(msg.contains(says), "{says:?} missing in: {msg}");
    }
    assert!(env.backups().is_empty(), "nothing was written");
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert!(qsd.bitmaps("a").is_empty(), "{:?}", qsd.bitmaps("a"));

    // Told the address (as the message says), a full and then a bitmap incremental.
    let nbd = format!("unix:{}", qsd.nbd.display());
    let args = [
        "backup",
        &qmp,
        "--vault",
        "v",
        "--id",
        "srv",
        "--nbd-server",
        &nbd,
    ];
    let m1 = env.json(&args);
    assert_eq!(u(&m1, "bytes_read"), 16 * (MIB - CHUNK));
    let mut c = qsd.client("a");
    c.write(3 * MIB, &random_bytes(CHUNK as usize, 1)).unwrap();
    c.write(9 * MIB + 4096, &[0x5A; 512]).unwrap();
    drop(c);
    let m2 = env.json(&args);
    let d = disk(&m2, "a");
    assert_eq!(d["kind"], "incremental", "{d}");
    assert_eq!(d["strategy"], "bitmap");
    assert_eq!(
        u(d, "bytes_read"),
        2 * CHUNK,
        "only the dirty chunks are read"
    );
    let dir = env.path("r2");
    env.json(&["restore", s(&m2, "id"), "--to", dir.to_str().unwrap()]);
    assert!(images_equal(&dir.join("a.raw"), Path::new(&qsd.uri("a"))));
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert_eq!(
        qsd.bitmaps("a"),
        [disk(&m2, "a")["checkpoint"]["bitmap"].as_str().unwrap()]
    );
}

/// A 64 MiB text disk (slow to store into a zstd-19 vault, so a backup can be caught
/// mid-read) and a copy of it as it is.
fn text_disk(env: &Env, name: &str) -> (PathBuf, PathBuf) {
    let a = crate::server::text_image(env, name);
    let copy = env.path(&format!("{name}.orig.qcow2"));
    std::fs::copy(&a, &copy).unwrap();
    (a, copy)
}

/// A live backup of `qsd` into `vault` with TMPDIR=`tmp` (where blockvault puts its
/// fleecing images and NBD socket), no `--nbd-server` (a daemon without exports has
/// its disks named with `--nodes`).
fn live_cmd(env: &Env, qsd: &Qsd, vault: &str, tmp: &Path) -> std::process::Command {
    let mut c = env.cmd();
    c.args(["--json", "backup", &format!("qmp:{}", qsd.qmp.display())])
        .args([
            "--vault",
            vault,
            "--id",
            "srv",
            "--nodes",
            &qsd.nodes.join(","),
        ])
        .env("TMPDIR", tmp);
    c
}

/// Start a live backup in the background and return once its export exists.
fn in_flight(env: &Env, qsd: &Qsd, vault: &str, tmp: &Path) -> Child {
    let mut child = live_cmd(env, qsd, vault, tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !qsd
        .exec("query-block-exports", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["id"].as_str().unwrap().starts_with("blockvault-"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backup never exported"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended too soon"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn tmpdir(env: &Env, name: &str) -> PathBuf {
    let p = env.path(name);
    std::fs::create_dir(&p).unwrap();
    p
}

fn lock_files(env: &Env) -> Vec<String> {
    let dir = env.data().join("locks").join("live");
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn after_a_sigkilled_run_that_started_its_own_nbd_server_the_next_backup_succeeds() {
    let env = Env::bare();
    env.ok(&["vault", "create", "slow", "--zstd-level", "19"]);
    env.ok(&["vault", "create", "fast"]);
    let (a, orig) = text_disk(&env, "a");
    let qsd = Qsd::start_without_nbd(env.dir.path(), &[("a", &a)]);
    let tmp1 = tmpdir(&env, "tmp1");
    let mut child = in_flight(&env, &qsd, "slow", &tmp1);
    child.kill().unwrap(); // SIGKILL mid-read
    child.wait().unwrap();
    let left = ours_in(&tmp1);
    assert!(
        left.iter().any(|f| f.starts_with("blockvault-nbd-"))
            && left.iter().any(|f| f.starts_with("blockvault-fleece-")),
        "{left:?}"
    );
    assert!(!qsd.leftovers().is_empty());

    // The next run, with another temp dir, sweeps the dead run (its NBD server too).
    let tmp2 = tmpdir(&env, "tmp2");
    let out = live_cmd(&env, &qsd, "fast", &tmp2).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&m, "bytes_read"), 64 * (MIB - CHUNK));
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert!(ours_in(&tmp1).is_empty(), "{:?}", ours_in(&tmp1));
    assert!(ours_in(&tmp2).is_empty(), "{:?}", ours_in(&tmp2));
    // No NBD server is left running: QEMU starts a new one.
    let probe = env.path("probe.sock");
    qsd.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": probe}}}),
    );
    qsd.exec("nbd-server-stop", json!({}));
    let dir = env.path("r");
    env.json(&["restore", s(&m, "id"), "--to", dir.to_str().unwrap()]);
    assert!(images_equal(&dir.join("a.raw"), &orig));
    assert_eq!(
        env.backups().len(),
        1,
        "only the finished backup is recorded"
    );
}

#[test]
fn files_and_locks_of_a_run_whose_vm_went_away_are_removed_by_the_next_backup_of_anything() {
    let env = Env::bare();
    env.ok(&["vault", "create", "slow", "--zstd-level", "19"]);
    env.ok(&["vault", "create", "fast"]);
    let (a, _) = text_disk(&env, "a");
    let vm1 = tmpdir(&env, "vm1");
    let qsd1 = Qsd::start_without_nbd(&vm1, &[("a", &a)]);
    let tmp = tmpdir(&env, "tmp");
    let mut child = in_flight(&env, &qsd1, "slow", &tmp);
    // The appliance is killed mid-backup and the VM goes away before any cleanup.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(qsd1);
    assert_eq!(ours_in(&tmp).len(), 2, "{:?}", ours_in(&tmp));
    assert_eq!(lock_files(&env).len(), 1);

    // A lock file an earlier version kept in the temp dir.
    std::fs::write(tmp.join("blockvault-live-0011223344556677.lock"), b"").unwrap();
    // The next backup of anything (here an image file) removes what the dead run left.
    let b = random_image(&env, "b", 4, 12);
    let out = env
        .cmd()
        .args(["backup", b.to_str().unwrap(), "--vault", "fast"])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ours_in(&tmp).is_empty(), "{:?}", ours_in(&tmp));
    assert!(lock_files(&env).is_empty(), "{:?}", lock_files(&env));
}

#[test]
fn two_runs_with_private_temp_dirs_take_turns_on_one_qemu() {
    let env = Env::bare();
    env.ok(&["vault", "create", "slow", "--zstd-level", "19"]);
    env.ok(&["vault", "create", "fast"]);
    let (a, orig) = text_disk(&env, "a");
    let qsd = Qsd::start_without_nbd(env.dir.path(), &[("a", &a)]);
    let (t1, t2) = (tmpdir(&env, "t1"), tmpdir(&env, "t2"));
    let first = in_flight(&env, &qsd, "slow", &t1);
    // Its temp dir is private: only the lock under the data dir tells the second run.
    assert_eq!(lock_files(&env).len(), 1);
    let second = live_cmd(&env, &qsd, "fast", &t2).output().unwrap();
    let first = first.wait_with_output().unwrap();
    for (n, out) in [("first", &first), ("second", &second)] {
        assert!(
            out.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: Value = serde_json::from_slice(&out.stdout).unwrap();
        let dir = env.path(&format!("r-{n}"));
        env.json(&["restore", s(&m, "id"), "--to", dir.to_str().unwrap()]);
        assert!(images_equal(&dir.join("a.raw"), &orig), "{n}");
    }
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert!(ours_in(&t1).is_empty() && ours_in(&t2).is_empty());
}

/// The freeze-timeout recovery: a guest agent (SCRIPTED: no real qemu-ga can run here)
/// whose fsfreeze takes 3 s, a 1 s freeze timeout.
fn slow_agent(env: &Env, name: &str) -> (PathBuf, AgentScript) {
    let script = AgentScript {
        freeze_takes: Duration::from_secs(3),
        ..AgentScript::default()
    };
    (env.path(name), script)
}

#[test]
fn a_freeze_slower_than_its_timeout_never_leaves_the_guest_frozen() {
    let env = Env::new();
    let a = random_image(&env, "a", 8, 13);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let (sock, script) = slow_agent(&env, "qga.sock");
    let (agent, _guard) = scripted_guest_agent(&sock, script);
    let t = Instant::now();
    let m = live_backup_ok(
        &env,
        &qsd,
        &["--qga", sock.to_str().unwrap(), "--freeze-timeout", "1"],
    );
    let took = t.elapsed();
    assert_eq!(m["capture"]["consistency"], "crash-consistent");
    assert!(
        s(&m["capture"], "note").contains("did not answer within 1.0s"),
        "{m}"
    );
    let log = agent.lock().unwrap();
    assert!(log.frozen_since.is_none(), "the guest ends thawed");
    assert_eq!(
        log.frozen_for.len(),
        1,
        "it froze once, late, and was thawed"
    );
    let frozen = log.frozen_for[0];
    eprintln!("freeze-timeout recovery: backup {took:?}, guest frozen for {frozen:?}");
    assert!(frozen < Duration::from_secs(2), "frozen for {frozen:?}");
    drop(log);
    let steps = m["capture"]["steps"].to_string();
    // (The count is 0 when a thaw whose reply came too late already thawed it.)
    assert!(
        steps.contains("guest-fsfreeze-thaw: ") && steps.contains("confirmed after"),
        "{steps}"
    );
    let dir = env.path("r");
    env.json(&["restore", s(&m, "id"), "--to", dir.to_str().unwrap()]);
    assert!(images_equal(&dir.join("a.raw"), Path::new(&qsd.uri("a"))));

    // Required to be application-consistent: it fails, and the guest ends thawed.
    let (sock2, script) = slow_agent(&env, "qga2.sock");
    let (agent, _guard2) = scripted_guest_agent(&sock2, script);
    let out = live_backup(
        &env,
        &qsd,
        &[
            "--qga",
            sock2.to_str().unwrap(),
            "--freeze-timeout",
            "1",
            "--require-app-consistent",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("application-consistent backup is required") && err.contains("1.0s"),
        "{err}"
    );
    let log = agent.lock().unwrap();
    assert!(log.frozen_since.is_none(), "the guest ends thawed");
    assert_eq!(log.frozen_for.len(), 1);
    assert!(log.frozen_for[0] < Duration::from_secs(2));
    assert_eq!(env.backups().len(), 1, "nothing was stored");
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert_eq!(
        qsd.bitmaps("a"),
        [disk(&m, "a")["checkpoint"]["bitmap"].as_str().unwrap()],
        "the chain's bitmap is as before"
    );
}

#[test]
fn a_thaw_that_cannot_be_confirmed_fails_the_backup_loudly() {
    let env = Env::new();
    let a = random_image(&env, "a", 4, 14);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let sock = env.path("qga.sock");
    let script = AgentScript {
        never_thaws: true,
        ..AgentScript::default()
    };
    let (agent, _guard) = scripted_guest_agent(&sock, script);
    let out = live_backup(
        &env,
        &qsd,
        &["--qga", sock.to_str().unwrap(), "--thaw-deadline", "2"],
    );
    assert_eq!(out.status.code(), Some(7), "an I/O failure");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = s(&v["error"], "message");
    assert!(
        msg.contains("guest may still be frozen") && msg.contains("thaw failed: device busy"),
        "{msg}"
    );
    assert!(agent.lock().unwrap().frozen_since.is_some());
    assert!(env.backups().is_empty(), "nothing was stored");
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert!(qsd.bitmaps("a").is_empty(), "{:?}", qsd.bitmaps("a"));
}

#[test]
fn a_cancel_during_a_guest_agent_freeze_stops_waiting_at_once() {
    let env = Env::new();
    let a = random_image(&env, "a", 4, 15);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let sock = env.path("qga.sock");
    // The guest's fsfreeze hangs (longer than the test): nothing can confirm a thaw.
    let script = AgentScript {
        freeze_takes: Duration::from_secs(120),
        ..AgentScript::default()
    };
    let (agent, guard) = scripted_guest_agent(&sock, script);
    let child = env
        .cmd()
        .args(["backup", &format!("qmp:{}", qsd.qmp.display())])
        .args(["--vault", "v", "--id", "srv"])
        .args(["--nbd-server", qsd.nbd.to_str().unwrap()])
        .args(["--qga", sock.to_str().unwrap(), "--thaw-deadline", "2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !agent
        .lock()
        .unwrap()
        .commands
        .iter()
        .any(|c| c == "guest-fsfreeze-freeze")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the freeze never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    // Stopped waiting for the freeze (60 s timeout) at once, tried to thaw for 2 s.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cancelled") && err.contains("guest may still be frozen"),
        "{err}"
    );
    assert!(env.backups().is_empty());
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    drop(guard);
}

#[test]
fn a_monitor_held_by_another_client_is_named_as_such_with_json_on_stdout() {
    let env = Env::new();
    let a = random_image(&env, "a", 4, 16);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    // Another client (as libvirt would) holds blockvault's monitor.
    let holder = blockvault::qmp::Qmp::connect(&qsd.qmp, Duration::from_secs(20)).unwrap();
    let t = Instant::now();
    let out = live_backup(&env, &qsd, &[]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(4), "a conflict");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = s(&v["error"], "message");
    assert!(msg.contains("another client holds the monitor"), "{msg}");
    assert!(!msg.contains("did not answer in time"), "{msg}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(env.backups().is_empty());
    drop(holder);
    // Released, the monitor serves the next backup.
    let m = live_backup_ok(&env, &qsd, &[]);
    assert_eq!(m["vault"], "v");
}

#[test]
fn seconds_is_the_wall_time_of_the_whole_backup_freeze_included() {
    let env = Env::new();
    let a = random_image(&env, "a", 4, 17);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let t = Instant::now();
    let m = live_backup_ok(&env, &qsd, &["--freeze", "sleep 2", "--thaw", "true"]);
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(m["capture"]["consistency"], "application-consistent");
    let secs = m["seconds"].as_f64().unwrap();
    assert!(
        (2.0..=wall).contains(&secs),
        "seconds {secs} must include the 2 s freeze (wall {wall})"
    );
    assert_eq!(m["vault"], "v", "{m}");
}

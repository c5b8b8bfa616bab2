//! Server backups: all disks of a server as one backup, at one instant. Live capture is
//! tested against a real qemu-storage-daemon with a writer running during the backup.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Env, fixtures, images_equal, random_bytes, s, sh, u, write_raw};
use crate::qsd::Qsd;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

/// A qcow2 image of `mib` MiB made from `fill(slot)` placed at every MiB (+64 KiB), so
/// the first 64 KiB of every MiB stays free for the writer's sequence numbers.
pub(crate) fn image(
    env: &Env,
    name: &str,
    mib: u64,
    fill: impl Fn(u64) -> Vec<u8>,
) -> std::path::PathBuf {
    let raw = env.path(&format!("{name}.src.raw"));
    for slot in 0..mib {
        write_raw(&raw, mib * MIB, slot * MIB + CHUNK, &fill(slot));
    }
    let q = env.path(&format!("{name}.qcow2"));
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    q
}

pub(crate) fn random_image(env: &Env, name: &str, mib: u64, seed: u64) -> std::path::PathBuf {
    image(env, name, mib, |slot| {
        random_bytes((MIB - CHUNK) as usize, seed * 1000 + slot)
    })
}

pub(crate) fn live_backup(env: &Env, qsd: &Qsd, extra: &[&str]) -> std::process::Output {
    let qmp = format!("qmp:{}", qsd.qmp.display());
    let nbd = qsd.nbd.display().to_string();
    let mut args = vec![
        "--json",
        "backup",
        &qmp,
        "--vault",
        "v",
        "--id",
        "srv",
        "--nbd-server",
        &nbd,
    ];
    args.extend_from_slice(extra);
    env.run(&args)
}

pub(crate) fn live_backup_ok(env: &Env, qsd: &Qsd, extra: &[&str]) -> Value {
    let out = live_backup(env, qsd, extra);
    assert!(
        out.status.success(),
        "live backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) fn disk<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {m}"))
}

fn read_u64(path: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn a_server_of_image_files_is_one_backup_and_restores_into_a_directory() {
    let env = Env::new();
    let f = fixtures();
    let a = f.join("disk.qcow2");
    let b = f.join("chain-top.qcow2");
    let m = env.json(&[
        "backup",
        &format!("system={}", a.display()),
        &format!("data={}", b.display()),
        "--vault",
        "v",
        "--id",
        "db-server",
    ]);
    assert_eq!(m["resource_kind"], "server");
    assert_eq!(m["disks"].as_array().unwrap().len(), 2);
    assert_eq!(m["capture"]["method"], "image-files");
    assert_eq!(disk(&m, "data")["disk_id"], "db-server/data");

    let dir = env.path("restored");
    env.json(&["restore", s(&m, "id"), "--to", dir.to_str().unwrap()]);
    assert!(images_equal(&dir.join("system.raw"), &a));
    assert!(images_equal(&dir.join("data.raw"), &b));
    let one = env.path("data.qcow2");
    env.json(&[
        "restore",
        s(&m, "id"),
        "--disk",
        "data",
        "--to",
        one.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert!(images_equal(&one, &b));

    // Again: every disk is found by its id within the server, nothing new is stored.
    let m2 = env.json(&[
        "backup",
        &format!("system={}", a.display()),
        &format!("data={}", b.display()),
        "--vault",
        "v",
        "--id",
        "db-server",
    ]);
    assert_eq!(u(&m2, "chunks_new"), 0);
    assert_eq!(s(disk(&m2, "system"), "parent"), s(&m, "id"));
    // Several disks without a server name are refused.
    let out = env.run(&[
        "backup",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--vault",
        "v",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id"));
}

#[test]
fn a_live_backup_holds_both_disks_at_one_instant_while_a_writer_runs() {
    let env = Env::new();
    let a = random_image(&env, "a", 64, 1);
    let b = random_image(&env, "b", 64, 2);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a), ("b", &b)]);

    // The writer writes sequence number n to slot n % 64 of disk a, then of disk b.
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let writer = {
        let (mut ca, mut cb) = (qsd.client("a"), qsd.client("b"));
        let (stop, seq) = (Arc::clone(&stop), Arc::clone(&seq));
        std::thread::spawn(move || {
            let mut max_gap = Duration::ZERO;
            let mut last = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let block: Vec<u8> = n.to_le_bytes().repeat(512);
                let off = (n % 64) * MIB;
                ca.write(off, &block).unwrap();
                cb.write(off, &block).unwrap();
                seq.store(n, Ordering::Relaxed);
                max_gap = max_gap.max(last.elapsed());
                last = Instant::now();
            }
            max_gap
        })
    };
    while seq.load(Ordering::Relaxed) < 200 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = seq.load(Ordering::Relaxed);
    let m = live_backup_ok(&env, &qsd, &[]);
    let after = seq.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let max_gap = writer.join().unwrap();
    assert!(
        after - before > 100,
        "the writer must have kept writing during the backup ({before} → {after})"
    );
    assert!(
        max_gap < Duration::from_millis(1000),
        "the writer was stopped for {max_gap:?}"
    );
    assert_eq!(m["resource_kind"], "server");
    assert_eq!(m["capture"]["method"], "qmp-fleecing");
    assert_eq!(m["capture"]["consistency"], "crash-consistent");

    let dir = env.path("restored");
    env.json(&["restore", s(&m, "id"), "--to", dir.to_str().unwrap()]);
    let (ra, rb) = (dir.join("a.raw"), dir.join("b.raw"));
    let va: Vec<u64> = (0..64).map(|k| read_u64(&ra, k * MIB)).collect();
    let vb: Vec<u64> = (0..64).map(|k| read_u64(&rb, k * MIB)).collect();
    let (ma, mb) = (*va.iter().max().unwrap(), *vb.iter().max().unwrap());
    assert!(
        ma >= before && ma <= after,
        "the point in time lies within the backup"
    );
    assert!(
        ma == mb || ma == mb + 1,
        "disk a at {ma}, disk b at {mb}: not one instant"
    );
    let differing = va.iter().zip(&vb).filter(|(x, y)| x != y).count();
    assert!(differing <= 1, "{differing} slots differ between the disks");
    // The data around the sequence numbers is the original.
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (MIB - CHUNK) as usize];
    std::fs::File::open(&ra)
        .unwrap()
        .read_exact_at(&mut buf, 5 * MIB + CHUNK)
        .unwrap();
    assert!(buf == random_bytes(buf.len(), 1000 + 5));
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
}

#[test]
fn the_next_live_backup_reads_only_what_the_bitmap_marks_and_a_lost_bitmap_means_compare() {
    let env = Env::new();
    let a = random_image(&env, "a", 32, 3);
    let b = random_image(&env, "b", 32, 4);
    let a_orig = env.path("a.orig.qcow2");
    std::fs::copy(&a, &a_orig).unwrap();
    let qsd = Qsd::start(env.dir.path(), &[("a", &a), ("b", &b)]);
    let m1 = live_backup_ok(&env, &qsd, &[]);
    assert_eq!(disk(&m1, "a")["kind"], "full");
    assert_eq!(u(&m1, "bytes_read"), 2 * 32 * (MIB - CHUNK));

    // Three whole chunks of a, 4 KiB inside one chunk of b.
    let mut ca = qsd.client("a");
    for off in [5 * MIB, 20 * MIB + CHUNK, 31 * MIB] {
        ca.write(off, &random_bytes(CHUNK as usize, off)).unwrap();
    }
    qsd.client("b")
        .write(7 * MIB + 4096, &[0xAB; 4096])
        .unwrap();
    let m2 = live_backup_ok(&env, &qsd, &[]);
    for (name, chunks) in [("a", 3), ("b", 1)] {
        let d = disk(&m2, name);
        assert_eq!(d["kind"], "incremental", "{d}");
        assert_eq!(d["strategy"], "bitmap");
        assert_eq!(u(d, "bytes_read"), chunks * CHUNK, "disk {name}");
        assert_eq!(u(d, "chunks_read"), chunks);
    }
    let dir = env.path("r2");
    env.json(&["restore", s(&m2, "id"), "--to", dir.to_str().unwrap()]);
    for name in ["a", "b"] {
        assert!(images_equal(
            &dir.join(format!("{name}.raw")),
            Path::new(&qsd.uri(name))
        ));
    }
    // The first backup still restores its own point in time.
    let dir1 = env.path("r1");
    env.json(&["restore", s(&m1, "id"), "--to", dir1.to_str().unwrap()]);
    assert!(images_equal(&dir1.join("a.raw"), &a_orig));
    assert!(!images_equal(&dir1.join("a.raw"), &dir.join("a.raw")));

    // The checkpoint bitmap of b disappears (as after a VM restart without it).
    let cp = disk(&m2, "b")["checkpoint"]["bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(qsd.bitmaps("b"), vec![cp.clone()]);
    qsd.exec(
        "block-dirty-bitmap-remove",
        json!({"node": "b", "name": cp}),
    );
    let m3 = live_backup_ok(&env, &qsd, &[]);
    let d = disk(&m3, "b");
    assert_eq!(d["kind"], "full");
    assert_eq!(d["strategy"], "compare");
    assert!(s(d, "note").contains("not found on node b"), "{d}");
    assert_eq!(u(d, "chunks_new"), 0);
    assert_eq!(disk(&m3, "a")["strategy"], "bitmap");
    assert_eq!(u(disk(&m3, "a"), "bytes_read"), 0);
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
}

fn stamps(log: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (what, t) = l.split_once(' ').unwrap();
            (what.to_string(), t.parse().unwrap())
        })
        .collect()
}

fn epoch(rfc3339: &str) -> f64 {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap();
    t.unix_timestamp_nanos() as f64 / 1e9
}

#[test]
fn freeze_runs_before_the_instant_thaw_right_after_and_also_when_the_capture_fails() {
    let env = Env::new();
    let a = random_image(&env, "a", 8, 5);
    let b = random_image(&env, "b", 8, 6);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a), ("b", &b)]);
    let log = env.path("hooks.log");
    let freeze = format!("echo freeze $(date +%s.%N) >> {}", log.display());
    let thaw = format!("echo thaw $(date +%s.%N) >> {}", log.display());
    let m = live_backup_ok(&env, &qsd, &["--freeze", &freeze, "--thaw", &thaw]);
    assert_eq!(m["capture"]["consistency"], "application-consistent");
    let st = stamps(&log);
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].0.as_str(), st[1].0.as_str()), ("freeze", "thaw"));
    let at = epoch(s(&m["capture"], "snapshot_at"));
    assert!(
        st[0].1 <= at && at <= st[1].1,
        "freeze {} ≤ instant {at} ≤ thaw {}",
        st[0].1,
        st[1].1
    );
    assert!(st[1].1 - at < 2.0, "thaw runs right after the instant");

    // Another tool's backup job holds a node: the transaction fails as a whole.
    let busy = env.path("busy.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", busy.to_str().unwrap(), "8M"],
    );
    qsd.exec(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "busy", "backing": "b",
               "file": {"driver": "file", "filename": busy}}),
    );
    qsd.exec(
        "blockdev-backup",
        json!({"job-id": "otherjob", "device": "b", "target": "busy", "sync": "none"}),
    );
    let foreign = qsd.leftovers();
    let bitmaps_a = qsd.bitmaps("a");
    let out = live_backup(
        &env,
        &qsd,
        &["--nodes", "a,busy", "--freeze", &freeze, "--thaw", &thaw],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("point in time") && err.contains("busy"),
        "{err}"
    );
    let st = stamps(&log);
    assert_eq!(st.len(), 4, "{st:?}");
    assert_eq!((st[2].0.as_str(), st[3].0.as_str()), ("freeze", "thaw"));
    assert_eq!(qsd.leftovers(), foreign, "nothing of ours is left behind");
    assert_eq!(qsd.bitmaps("a"), bitmaps_a, "bitmaps are as before");
    assert_eq!(env.backups().len(), 1);
}

#[test]
fn a_hanging_freeze_script_times_out_and_the_backup_is_crash_consistent() {
    let env = Env::new();
    let a = random_image(&env, "a", 4, 7);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let log = env.path("hooks.log");
    let thaw = format!("echo thaw $(date +%s.%N) >> {}", log.display());
    let t = Instant::now();
    let m = live_backup_ok(
        &env,
        &qsd,
        &[
            "--freeze",
            "sleep 60",
            "--freeze-timeout",
            "1",
            "--thaw",
            &thaw,
        ],
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(m["capture"]["consistency"], "crash-consistent");
    assert!(s(&m["capture"], "note").contains("timed out"), "{m}");
    assert_eq!(stamps(&log).len(), 1, "thaw ran");
    let dir = env.path("r");
    env.json(&["restore", s(&m, "id"), "--to", dir.to_str().unwrap()]);
    assert!(images_equal(&dir.join("a.raw"), Path::new(&qsd.uri("a"))));
}

#[test]
fn cancelling_during_a_long_freeze_stops_at_once_thaws_and_records_nothing() {
    let env = Env::new();
    let a = random_image(&env, "a", 4, 8);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let log = env.path("hooks.log");
    let freeze = format!("echo freeze $(date +%s.%N) >> {}; sleep 60", log.display());
    let thaw = format!("echo thaw $(date +%s.%N) >> {}", log.display());
    let child = env
        .cmd()
        .args(["backup", &format!("qmp:{}", qsd.qmp.display())])
        .args([
            "--vault", "v", "--id", "srv", "--freeze", &freeze, "--thaw", &thaw,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while stamps(&log).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the freeze never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = cancel_with_sigterm(child);
    assert!(took < Duration::from_secs(5), "{took:?}");
    let st = stamps(&log);
    assert_eq!(st.len(), 2, "freeze, then thaw: {st:?}");
    assert_eq!(st[1].0, "thaw");
    assert!(env.backups().is_empty());
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
}

/// SIGTERM a running backup; it must fail saying it was cancelled. Returns how long it
/// took to stop.
fn cancel_with_sigterm(child: std::process::Child) -> Duration {
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    took
}

/// A 64 MiB qcow2 of words (slow to store into a zstd-19 vault, so a live backup can be
/// caught mid-read).
pub(crate) fn text_image(env: &Env, name: &str) -> std::path::PathBuf {
    let words = [
        "block", "vault", "qemu", "fleece", "bitmap", "chunk", "pack", "index",
    ];
    let text = |slot: u64| -> Vec<u8> {
        let r = random_bytes(((MIB - CHUNK) / 6) as usize, slot + 77);
        let mut v: Vec<u8> = r
            .iter()
            .flat_map(|x| format!("{} ", words[(*x % 8) as usize]).into_bytes())
            .collect();
        v.truncate((MIB - CHUNK) as usize);
        v
    };
    image(env, name, 64, text)
}

/// A live backup of one 64 MiB text disk into a zstd-19 vault (slow enough to interrupt),
/// started in the background and returned once its temporary export exists.
fn live_backup_in_flight(env: &Env) -> (Qsd, std::process::Child, std::path::PathBuf) {
    env.ok(&["vault", "create", "v", "--zstd-level", "19"]);
    let a = text_image(env, "a");
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let fleece = env.path("fleece");
    std::fs::create_dir(&fleece).unwrap();
    let mut child = env
        .cmd()
        .args([
            "backup",
            &format!("qmp:{}", qsd.qmp.display()),
            "--vault",
            "v",
            "--id",
            "srv",
        ])
        .args(["--nbd-server", qsd.nbd.to_str().unwrap()])
        .args(["--fleece-dir", fleece.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let exports = qsd.exec("query-block-exports", json!({}));
        if exports
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"].as_str().unwrap().starts_with("blockvault-"))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the backup never exported"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended too soon"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (qsd, child, fleece)
}

#[test]
fn a_killed_live_backup_leaves_leftovers_that_the_next_backup_removes() {
    let env = Env::bare();
    let (qsd, mut child, fleece) = live_backup_in_flight(&env);
    child.kill().unwrap();
    child.wait().unwrap();
    let left = qsd.leftovers();
    assert!(
        left.iter().any(|l| l.contains("job")) && left.iter().any(|l| l.contains("export")),
        "{left:?}"
    );
    // The next run (into a fast vault) finds the dead run's objects and removes them.
    env.ok(&["vault", "create", "fast"]);
    let out = env.run(&[
        "--json",
        "backup",
        &format!("qmp:{}", qsd.qmp.display()),
        "--vault",
        "fast",
        "--id",
        "srv",
        "--nbd-server",
        qsd.nbd.to_str().unwrap(),
        "--fleece-dir",
        fleece.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert_eq!(std::fs::read_dir(&fleece).unwrap().count(), 0);
    assert_eq!(
        env.backups().len(),
        1,
        "only the finished backup is recorded"
    );
}

#[test]
fn a_cancelled_live_backup_records_nothing_and_leaves_nothing_behind() {
    let env = Env::bare();
    let (qsd, child, fleece) = live_backup_in_flight(&env);
    std::thread::sleep(Duration::from_millis(200));
    let took = cancel_with_sigterm(child);
    // Promptly, not at the end of the backup (zstd level 19 on a text image); the bound
    // leaves room for a loaded machine.
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    assert!(env.backups().is_empty());
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    assert!(qsd.bitmaps("a").is_empty(), "{:?}", qsd.bitmaps("a"));
    assert_eq!(
        std::fs::read_dir(&fleece).unwrap().count(),
        0,
        "fleecing images are removed"
    );
}

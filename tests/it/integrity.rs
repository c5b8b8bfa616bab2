//! Integrity: crashes, corrupt chunks and hostile images lose nothing and fool no one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

/// Start `blockvault --threads 1 backup IMG --vault v --id d` in the background.
fn spawn_backup(env: &Env, img: &Path) -> std::process::Child {
    env.cmd()
        .args([
            "--threads",
            "1",
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "d",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Start a single-threaded backup of `mib` MiB of random data and return once it has
/// published its first pack (so it is mid-way and holds the vault lock).
fn backup_in_flight(env: &Env, mib: u64, seed: u64) -> (std::process::Child, PathBuf) {
    let img = env.path("big.raw");
    for i in 0..mib / 64 {
        write_raw(&img, mib << 20, i << 26, &random_bytes(64 << 20, seed + i));
    }
    let mut child = spawn_backup(env, &img);
    let start = Instant::now();
    while pack_files(&env.vault_dir()).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no pack appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished too early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, img)
}

#[test]
fn sigkill_in_the_middle_of_a_backup_leaves_no_backup_and_a_clean_vault() {
    let env = Env::new();
    // 384 MiB of random data: several packs, and long enough to be killed midway.
    let (mut child, _img) = backup_in_flight(&env, 384, 100);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!pack_files(&env.vault_dir()).is_empty());
    assert!(
        env.backups().is_empty(),
        "a killed backup must not be listed"
    );
    let v = env.run(&["verify", "--vault", "v"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // GC frees the orphaned packs; a new backup then works and restores.
    let gc = env.json(&["gc", "--vault", "v"]);
    assert!(u(&gc, "packs_deleted") >= 1, "{gc}");
    assert!(pack_files(&env.vault_dir()).is_empty());
    let small = env.path("small.raw");
    write_raw(&small, 8 << 20, 0, &random_bytes(1 << 20, 5));
    let b = env.backup(&small, "s");
    let out = env.path("r.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&small, &out));
}

#[test]
fn a_flipped_byte_in_a_stored_chunk_is_found_by_verify_and_fails_restore() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(2 << 20, 9));
    // One worker thread, so that chunk 0 is the first blob of the pack.
    let b = env.json(&[
        "--threads",
        "1",
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
    ]);
    let id = s(&b, "id").to_string();
    assert!(env.run(&["verify", "--vault", "v"]).status.success());
    // Data chunks are written first: flip a byte inside the first blob of the pack.
    let packs = pack_files(&env.vault_dir());
    assert_eq!(packs.len(), 1);
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    bytes[8 + 12 + 1000] ^= 0x01;
    std::fs::write(&packs[0], &bytes).unwrap();

    let v = env
        .cmd()
        .args(["--json", "verify", "--vault", "v"])
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(5), "exit 5: corrupt data");
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(
        report["corrupt_blobs"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    let damage = report["damage"].as_array().unwrap();
    assert_eq!(damage.len(), 1, "{report}");
    assert_eq!(damage[0]["backup_id"], id.as_str());
    assert_eq!(damage[0]["offset"], 0);
    // The single-backup form finds it too.
    assert_eq!(
        env.run(&["verify", "--vault", "v", &id]).status.code(),
        Some(5)
    );

    let out = env.path("r.raw");
    let r = env.run(&["restore", &id, "--to", out.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(5), "exit 5: corrupt data");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("offset 0") && err.contains("digest"), "{err}");
    assert!(!out.exists(), "a failed restore must not leave its output");
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial output left: {leftovers:?}");
}

#[test]
fn hostile_images_give_a_clear_error_and_record_nothing() {
    let fx = fixtures();
    let env = Env::new();
    let bad = fx.join("bad");
    let mut n = 0;
    for e in std::fs::read_dir(&bad).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("loop-b") || name.ends_with("-flat.vmdk") || name.starts_with('.') {
            continue;
        }
        n += 1;
        let out = env.run(&["backup", p.to_str().unwrap(), "--vault", "v", "--id", &name]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(5 | 6)),
            "{name}: expected a clean error (5 corrupt, 6 invalid input), got {:?}: {err}",
            out.status
        );
        assert!(
            err.contains("error:") && !err.contains("panicked"),
            "{name}: {err}"
        );
        assert!(
            err.contains(&name),
            "{name}: the error should name the file: {err}"
        );
    }
    assert!(n >= 6, "only {n} hostile fixtures");
    assert!(env.backups().is_empty());
    assert!(env.run(&["verify", "--vault", "v"]).status.success());
}

#[test]
fn a_missing_source_or_vault_is_a_clear_error() {
    let env = Env::new();
    let out = env.run(&["backup", "/nonexistent/disk.qcow2", "--vault", "v"]);
    assert_eq!(out.status.code(), Some(3), "exit 3: not found");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/disk.qcow2"));
    let out = env.run(&["backup", "/nonexistent/disk.qcow2", "--vault", "nope"]);
    assert_eq!(out.status.code(), Some(3), "exit 3: not found");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn gc_refuses_to_run_while_a_backup_holds_the_vault() {
    let env = Env::bare();
    // zstd level 19 on text: a backup that runs for many seconds.
    env.ok(&["vault", "create", "v", "--zstd-level", "19"]);
    let img = env.path("text.raw");
    let text: Vec<u8> = (0..(64u32 << 20) / 16)
        .flat_map(|i| format!("line {i:010}\n").into_bytes())
        .collect();
    write_raw(&img, 64 << 20, 0, &text);
    let mut child = spawn_backup(&env, &img);
    // Wait until the backup holds the vault lock (shared).
    let lock = env.vault_dir().join("locks").join("vault.lock");
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the backup never took the lock"
        );
        assert!(child.try_wait().unwrap().is_none(), "backup ended early");
        if let Ok(f) = std::fs::File::open(&lock)
            && matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let gc = env.run(&["gc", "--vault", "v"]);
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    let err = String::from_utf8_lossy(&gc.stderr).to_string();
    assert!(
        still_running,
        "the backup ended before gc ran; the test proves nothing"
    );
    assert_eq!(
        gc.status.code(),
        Some(4),
        "exit 4 (conflict): gc ran beside a backup: {err}"
    );
    assert!(err.contains("in use by a running backup"), "{err}");
    // Once the backup is gone, gc runs and frees what it left.
    env.json(&["gc", "--vault", "v"]);
    assert!(env.backups().is_empty());
}

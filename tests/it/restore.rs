//! Restores and failed backups leave nothing behind, restored images are private, and
//! `restore --keep-going` saves what can be read.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Files and directories under `dir` (recursive), with their modes.
fn tree(dir: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let is_dir = e.file_type().unwrap().is_dir();
        out.push((p.clone(), mode(&p), is_dir));
        if is_dir {
            out.extend(tree(&p));
        }
    }
    out
}

fn partials(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .map(|e| e.path())
        .collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn restored_images_exports_and_the_data_dir_are_private_unless_a_mode_is_asked_for() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 1 << 20, &random_bytes(1 << 20, 3));
    let b = env.backup(&img, "d");
    let id = s(&b, "id");
    for format in ["raw", "qcow2", "vmdk", "vmdk-stream"] {
        let out = env.path(&format!("r-{format}.img"));
        env.restore(id, &out, format);
        assert_eq!(mode(&out), 0o600, "{format}");
        assert!(images_equal(&img, &out), "{format}");
    }
    let out = env.path("shared.raw");
    env.ok(&[
        "restore",
        id,
        "--to",
        out.to_str().unwrap(),
        "--mode",
        "0640",
    ]);
    assert_eq!(mode(&out), 0o640);
    let bad = env.run(&[
        "restore",
        id,
        "--to",
        env.path("x.raw").to_str().unwrap(),
        "--mode",
        "999",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("octal"));
    assert!(!env.path("x.raw").exists());

    // A server: its directory of disks, an OVA and a qcow2 set.
    let m = env.json(&[
        "backup",
        &format!("a={}", img.display()),
        &format!("b={}", img.display()),
        "--vault",
        "v",
        "--id",
        "srv",
    ]);
    let sid = s(&m, "id");
    let dir = env.path("srv-disks");
    env.ok(&["restore", sid, "--to", dir.to_str().unwrap()]);
    let ova_dir = env.path("ova");
    env.ok(&[
        "restore",
        sid,
        "--to",
        ova_dir.to_str().unwrap(),
        "--image",
        "ova",
    ]);
    let set = env.path("set");
    env.ok(&[
        "restore",
        sid,
        "--to",
        set.to_str().unwrap(),
        "--image",
        "qcow2-set",
    ]);
    for d in [&dir, &ova_dir, &set] {
        assert_eq!(mode(d), 0o700, "{}", d.display());
        let files = tree(d);
        assert!(!files.is_empty());
        for (p, m, is_dir) in files {
            assert_eq!(m, if is_dir { 0o700 } else { 0o600 }, "{}", p.display());
        }
    }
    assert!(images_equal(&img, &dir.join("b.raw")));
    assert!(images_equal(&img, &set.join("a.qcow2")));

    // The data dir: catalog, vault (packs, manifests, lookup index), restore records.
    env.ok(&["token", "create", "--role", "admin"]);
    assert_eq!(mode(&env.data()), 0o700);
    for (p, m, is_dir) in tree(&env.data()) {
        assert_eq!(m & 0o077, 0, "{} is open to others ({m:o})", p.display());
        if is_dir {
            assert_eq!(m, 0o700, "{}", p.display());
        }
    }
}

#[test]
fn overwrite_replaces_a_regular_file_only_when_asked_and_never_a_link() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 1 << 20, &random_bytes(1 << 20, 5));
    let b = env.backup(&img, "d");
    let id = s(&b, "id");
    let out = env.path("old.qcow2");
    std::fs::write(&out, b"an older image").unwrap();
    let r = env.run(&["restore", id, "--to", out.to_str().unwrap()]);
    assert_eq!(
        r.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("--overwrite"));
    assert_eq!(std::fs::read(&out).unwrap(), b"an older image");
    env.ok(&["restore", id, "--to", out.to_str().unwrap(), "--overwrite"]);
    assert!(images_equal(&img, &out));
    assert_eq!(mode(&out), 0o600);
    assert!(partials(&env.path("")).is_empty());
    // A symlink at the target is never replaced, nor written through.
    let victim = env.path("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let link = env.path("link.raw");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let r = env.run(&["restore", id, "--to", link.to_str().unwrap(), "--overwrite"]);
    assert_eq!(
        r.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    // Not for a VMDK (several files) nor onto NBD.
    let vm = env.path("old.vmdk");
    std::fs::write(&vm, b"x").unwrap();
    let r = env.run(&["restore", id, "--to", vm.to_str().unwrap(), "--overwrite"]);
    assert!(!r.status.success());
    assert_eq!(std::fs::read(&vm).unwrap(), b"x");
}

#[test]
fn keep_going_writes_everything_readable_and_lists_the_corrupt_range_as_zeros() {
    let env = Env::new();
    let img = env.path("d.raw");
    // 2 MiB of random data at 1 MiB; one worker, so the chunk at 1 MiB is the pack's
    // first blob.
    write_raw(&img, 8 << 20, 1 << 20, &random_bytes(2 << 20, 9));
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
    let packs = pack_files(&env.vault_dir());
    assert_eq!(packs.len(), 1);
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    bytes[8 + 12 + 1000] ^= 0x01;
    std::fs::write(&packs[0], &bytes).unwrap();

    // Without --keep-going: refused, nothing left behind.
    let out = env.path("r.raw");
    let r = env.run(&["restore", &id, "--to", out.to_str().unwrap()]);
    assert!(!r.status.success());
    assert!(!out.exists());
    assert!(partials(env.dir.path()).is_empty());

    let mut expected = std::fs::read(&img).unwrap();
    expected[1 << 20..(1 << 20) + 65536].fill(0);
    for format in ["raw", "qcow2"] {
        let out = env.path(&format!("kept.{format}"));
        let r = env
            .cmd()
            .args(["--json", "restore", &id, "--to", out.to_str().unwrap()])
            .args(["--format", format, "--keep-going"])
            .output()
            .unwrap();
        assert_eq!(
            r.status.code(),
            Some(5),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        let ranges = v["bad_ranges"].as_array().unwrap();
        assert_eq!(ranges.len(), 1, "{v}");
        assert_eq!(ranges[0]["offset"], 1 << 20);
        assert_eq!(ranges[0]["length"], 65536);
        assert!(
            ranges[0]["error"].as_str().unwrap().contains("digest"),
            "{v}"
        );
        assert_eq!(u(&v, "chunks_unreadable"), 1);
        assert_eq!(u(&v, "bytes_written"), (2 << 20) - 65536);
        // The image is the source except the listed range, which reads as zeros.
        let raw = env.path(&format!("kept-{format}.raw"));
        sh(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                out.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(std::fs::read(&raw).unwrap() == expected, "{format}");
    }
    // Humans get the range on stderr.
    let out = env.path("human.raw");
    let r = env.run(&[
        "restore",
        &id,
        "--to",
        out.to_str().unwrap(),
        "--keep-going",
    ]);
    assert_eq!(r.status.code(), Some(5));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("offset 1048576 length 65536"), "{err}");
}

/// Start a restore of `id` to `out` in the background and wait for its partial image.
fn restore_in_flight(env: &Env, id: &str, out: &Path) -> std::process::Child {
    let mut child = env
        .cmd()
        .args([
            "--threads",
            "1",
            "restore",
            id,
            "--to",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = out.parent().unwrap();
    wait_for("no partial image appeared", || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "restore finished too early"
        );
        !partials(dir).is_empty()
    });
    child
}

#[test]
fn a_killed_restores_partial_image_is_swept_by_the_next_restore_and_by_serve() {
    let env = Env::new();
    let img = env.path("big.raw");
    for i in 0..6 {
        write_raw(&img, 384 << 20, i << 26, &random_bytes(64 << 20, 40 + i));
    }
    let b = env.backup(&img, "big");
    let id = s(&b, "id").to_string();
    let target = env.path("out");
    std::fs::create_dir(&target).unwrap();

    // SIGKILL: nothing can clean up, the partial stays...
    let mut child = restore_in_flight(&env, &id, &target.join("a.raw"));
    child.kill().unwrap();
    child.wait().unwrap();
    let left = partials(&target);
    assert_eq!(left.len(), 1);
    assert_eq!(
        mode(&left[0]),
        0o600,
        "a partial image is as private as a whole one"
    );
    // ...until the next restore into that directory.
    let small = env.path("small.raw");
    write_raw(&small, 4 << 20, 0, &random_bytes(1 << 20, 1));
    let sb = env.backup(&small, "small");
    env.restore(s(&sb, "id"), &target.join("b.raw"), "raw");
    assert!(partials(&target).is_empty(), "{:?}", partials(&target));
    assert!(images_equal(&small, &target.join("b.raw")));

    // At serve start.
    let mut child = restore_in_flight(&env, &id, &target.join("c.raw"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(partials(&target).len(), 1);
    let mut srv = env
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(srv.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("listening"), "{line}");
    let swept = partials(&target).is_empty();
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(swept, "serve did not sweep {:?}", partials(&target));
    assert!(!target.join("c.raw").exists());
    assert!(
        std::fs::read_dir(env.data().join("restores"))
            .unwrap()
            .next()
            .is_none(),
        "restore records are removed once swept"
    );
}

/// A tmpfs of `mib` MiB mounted at `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn bytes_under(dir: &Path) -> u64 {
    tree(dir)
        .iter()
        .filter(|(_, _, d)| !d)
        .map(|(p, _, _)| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_backup_that_fills_the_vault_disk_removes_the_packs_it_published() {
    let env = Env::new();
    let mnt = env.path("small-disk");
    let _fs = Tmpfs::mount(&mnt, 40);
    let vault = mnt.join("vault");
    env.ok(&[
        "vault",
        "create",
        "small",
        "--path",
        vault.to_str().unwrap(),
    ]);
    let img = env.path("big.raw");
    write_raw(&img, 64 << 20, 0, &random_bytes(64 << 20, 7));
    let r = env.run(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "small",
        "--id",
        "big",
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("No space left"), "{err}");
    assert!(pack_files(&vault).is_empty(), "{:?}", pack_files(&vault));
    assert!(
        bytes_under(&vault) < 1 << 20,
        "{} bytes left",
        bytes_under(&vault)
    );
    assert!(
        env.json(&["backups", "list", "--vault", "small"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The space is back: a backup that fits works and restores.
    let small = env.path("small.raw");
    write_raw(&small, 16 << 20, 0, &random_bytes(8 << 20, 8));
    let b = env.json(&[
        "backup",
        small.to_str().unwrap(),
        "--vault",
        "small",
        "--id",
        "s",
    ]);
    let out = env.path("s.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&small, &out));
}

#[test]
fn a_cancelled_backup_removes_its_packs_but_keeps_one_a_committed_backup_deduplicated_against() {
    let env = Env::new();
    let img = env.path("big.raw");
    let data = random_bytes(128 << 20, 200);
    write_raw(&img, 128 << 20, 0, &data);
    // Read through nbdkit's delay filter (a real server, slowed down) so that the
    // backup is still running while the other one commits.
    let sock = env.path("slow.sock");
    let slow = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=delay",
            "file",
            img.to_str().unwrap(),
            "rdelay=40ms",
        ],
        &sock,
    );
    let mut child = env
        .cmd()
        .args([
            "--threads",
            "1",
            "backup",
            &slow.uri(),
            "--vault",
            "v",
            "--id",
            "big",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = |child: &mut std::process::Child| {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished too early"
        );
    };
    wait_for("no pack appeared", || {
        running(&mut child);
        !pack_files(&env.vault_dir()).is_empty()
    });
    let first = pack_files(&env.vault_dir());
    // A second backup, of the big image's first MiB, finds those chunks in the first
    // pack (dedup) and commits while the big one runs.
    let head = env.path("head.raw");
    write_raw(&head, 1 << 20, 0, &data[..1 << 20]);
    let hb = env.backup(&head, "head");
    assert_eq!(u(&hb["disks"][0], "chunks_new"), 0, "{hb}");
    // The big backup publishes another pack of its own, then is cancelled.
    wait_for("no second pack of the big backup", || {
        running(&mut child);
        pack_files(&env.vault_dir()).len() >= 3
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(!child.wait().unwrap().success());
    drop(slow);
    let left = pack_files(&env.vault_dir());
    // The big backup's first pack stays (the head backup needs it), its others are
    // gone; the head backup's own pack (its index) stays.
    assert!(left.contains(&first[0]), "{left:?}");
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(env.backups().len(), 1);
    let v = env.run(&["verify", "--vault", "v"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let out = env.path("head-restored.raw");
    env.restore(s(&hb, "id"), &out, "raw");
    assert!(images_equal(&head, &out));
}

#[test]
fn a_cancelled_backup_leaves_its_packs_to_gc_while_another_job_holds_the_vault() {
    use std::io::BufRead;
    let env = Env::new();
    let small = env.path("small.raw");
    write_raw(&small, 4 << 20, 0, &random_bytes(1 << 20, 2));
    let sb = env.backup(&small, "small");
    let before = pack_files(&env.vault_dir());
    // serve-nbd reads a backup and pins it while it runs.
    let sock = env.path("serve.sock");
    let mut served = env
        .cmd()
        .args(["serve-nbd", s(&sb, "id"), "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(served.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("nbd+unix://"), "{line}");

    let img = env.path("big.raw");
    write_raw(&img, 96 << 20, 0, &random_bytes(96 << 20, 300));
    let slow_sock = env.path("slow.sock");
    let slow = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            slow_sock.to_str().unwrap(),
            "--filter=delay",
            "file",
            img.to_str().unwrap(),
            "rdelay=40ms",
        ],
        &slow_sock,
    );
    let mut child = env
        .cmd()
        .args([
            "--threads",
            "1",
            "backup",
            &slow.uri(),
            "--vault",
            "v",
            "--id",
            "big",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("no pack appeared", || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished too early"
        );
        pack_files(&env.vault_dir()).len() > before.len()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(!child.wait().unwrap().success());
    drop(slow);
    // A reader has pinned backups of the vault: the packs stay, for GC.
    assert!(pack_files(&env.vault_dir()).len() > before.len());
    assert_eq!(env.backups().len(), 1);
    let _ = served.kill();
    let _ = served.wait();
    let gc = env.json(&["gc", "--vault", "v"]);
    assert!(u(&gc, "packs_deleted") >= 1, "{gc}");
    assert_eq!(pack_files(&env.vault_dir()), before);
}

#[test]
fn a_failed_overwrite_leaves_the_old_file_and_its_mode() {
    let env = Env::new();
    let disk = env.path("d.raw");
    write_raw(&disk, 4 << 20, 0, &random_bytes(2 << 20, 19));
    let b = env.backup(&disk, "d");
    let id = s(&b, "id");
    // Damage every pack in its middle: the restore fails partway through.
    for p in pack_files(&env.vault_dir()) {
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        for x in &mut bytes[mid..mid + 64] {
            *x ^= 0xff;
        }
        std::fs::write(&p, bytes).unwrap();
    }
    let target = env.path("out.raw");
    let old = b"somebody's old file".repeat(100);
    std::fs::write(&target, &old).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = env.run(&[
        "restore",
        id,
        "--to",
        target.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(!r.status.success(), "{r:?}");
    assert_eq!(std::fs::read(&target).unwrap(), old);
    assert_eq!(mode(&target), 0o644);
    assert!(partials(&env.path("")).is_empty());
}

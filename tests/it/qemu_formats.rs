//! Every image format QEMU reads: detected by magic, never taken for raw; formats and
//! features without a native reader go through a private qemu-storage-daemon that the
//! backup starts and stops itself; encrypted images need a secret; a raw disk is never
//! sniffed when given as `raw:`, and a disk id keeps its format; QEMU's image locks are
//! honoured.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Env, pack_files, random_bytes, s, sh, u, write_raw};

/// A raw disk of 16 MiB with three data extents (one not aligned to a chunk).
fn raw_disk(env: &Env, name: &str) -> PathBuf {
    let p = env.path(name);
    write_raw(&p, 16 << 20, 0, &random_bytes(1 << 20, 1));
    write_raw(&p, 16 << 20, (5 << 20) + 4096, &random_bytes(300_000, 2));
    write_raw(&p, 16 << 20, (15 << 20) + 512, &random_bytes(65_536, 3));
    p
}

/// The private temp dir the backups of `env` use (TMPDIR), so that leftovers are seen.
fn tmp(env: &Env) -> PathBuf {
    let t = env.path("tmp");
    std::fs::create_dir_all(&t).unwrap();
    t
}

/// `blockvault ARGS` with TMPDIR set to the test's own directory.
fn run(env: &Env, args: &[&str]) -> std::process::Output {
    env.cmd()
        .env("TMPDIR", tmp(env))
        .args(args)
        .output()
        .expect("running blockvault")
}

/// Back up with --json; require success; return the result.
fn backup(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json", "backup"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--vault", "v"]);
    let out = run(env, &a);
    assert!(
        out.status.success(),
        "backup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_no_daemon_left(env);
    v
}

/// Back up and require a refusal; returns stderr. Nothing may have been stored.
fn refused(env: &Env, args: &[&str]) -> String {
    let before = (env.backups().len(), pack_files(&env.vault_dir()));
    let mut a = vec!["backup"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--vault", "v"]);
    let out = run(env, &a);
    assert!(!out.status.success(), "backup {args:?} should be refused");
    assert_eq!(
        (env.backups().len(), pack_files(&env.vault_dir())),
        before,
        "nothing is stored by a refused backup"
    );
    assert_no_daemon_left(env);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Processes whose command line names `dir` (a daemon started for this test).
fn processes_under(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_str().unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.starts_with("qemu-storage-daemon") && cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// The daemon is gone and its private directory removed.
fn assert_no_daemon_left(env: &Env) {
    let t = tmp(env);
    assert!(processes_under(&t).is_empty(), "a daemon was left running");
    let left: Vec<_> = std::fs::read_dir(&t).unwrap().flatten().collect();
    assert!(left.is_empty(), "leftovers in the temp dir: {left:?}");
}

fn restore_raw(env: &Env, b: &serde_json::Value, name: &str) -> PathBuf {
    let out = env.path(name);
    env.restore(s(b, "id"), &out, "raw");
    out
}

/// `qemu-img compare -f FMT src -F raw out`.
fn same_disk(fmt: &str, src: &Path, raw: &Path) -> bool {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", fmt, "-F", "raw"])
        .arg(src)
        .arg(raw)
        .output()
        .unwrap();
    if !o.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    }
    o.status.success()
}

fn convert(src: &Path, fmt: &str, opts: &[&str], to: &Path) {
    let mut a = vec!["convert", "-f", "raw", "-O", fmt];
    a.extend_from_slice(opts);
    let (s, t) = (src.to_str().unwrap(), to.to_str().unwrap());
    a.extend_from_slice(&[s, t]);
    sh("qemu-img", &a);
}

#[test]
fn a_zstd_compressed_qcow2_is_backed_up_and_restored_byte_exact() {
    let env = Env::new();
    let raw = raw_disk(&env, "d.raw");
    let img = env.path("z.qcow2");
    convert(&raw, "qcow2", &["-c", "-o", "compression_type=zstd"], &img);
    let b = backup(&env, &[img.to_str().unwrap()]);
    assert_eq!(s(&b, "reader"), "qemu-storage-daemon:qcow2");
    assert_eq!(s(&b, "format"), "qcow2");
    assert_eq!(b["disks"][0]["reader"], "qemu-storage-daemon:qcow2");
    // Allocation came from base:allocation: far less than the 16 MiB disk was read.
    assert!(u(&b, "bytes_read") < 4 << 20, "{b}");
    let out = restore_raw(&env, &b, "out.raw");
    assert!(same_disk("qcow2", &img, &out));
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn vhd_fixed_vhd_vdi_vhdx_qed_and_qcow1_go_through_the_daemon_byte_exact() {
    let env = Env::new();
    let raw = raw_disk(&env, "d.raw");
    for (fmt, opts, file) in [
        ("vpc", &[][..], "d.vhd"),
        ("vpc", &["-o", "subformat=fixed"][..], "fixed.vhd"),
        ("vdi", &[][..], "d.vdi"),
        ("vhdx", &[][..], "d.vhdx"),
        ("qed", &[][..], "d.qed"),
        ("qcow", &[][..], "d.qcow"),
    ] {
        let img = env.path(file);
        convert(&raw, fmt, opts, &img);
        let b = backup(&env, &[img.to_str().unwrap()]);
        assert_eq!(
            s(&b, "reader"),
            format!("qemu-storage-daemon:{fmt}"),
            "{file}"
        );
        assert_eq!(s(&b, "format"), fmt, "{file}");
        let out = restore_raw(&env, &b, &format!("{file}.out"));
        assert!(same_disk(fmt, &img, &out), "{file} restored differs");
        // The container file is not what was stored: the disk inside it was.
        let size = u(&b, "logical_size");
        assert_ne!(size, std::fs::metadata(&img).unwrap().len(), "{file}");
    }
}

#[test]
fn plain_data_is_raw_and_a_known_but_unreadable_magic_is_refused_not_taken_as_raw() {
    let env = Env::new();
    let data = env.path("data.img");
    std::fs::write(&data, random_bytes(1 << 20, 9)).unwrap();
    let b = backup(&env, &[data.to_str().unwrap()]);
    assert_eq!(s(&b, "reader"), "raw");
    assert_eq!(s(&b, "format"), "raw");

    // A Bochs magic over garbage: a container we know, that QEMU cannot open.
    let bochs = env.path("bochs.img");
    let mut bytes = random_bytes(1 << 20, 10);
    bytes[..23].copy_from_slice(b"Bochs Virtual HD Image\0");
    std::fs::write(&bochs, &bytes).unwrap();
    let err = refused(&env, &[bochs.to_str().unwrap()]);
    assert!(
        err.contains("bochs") && err.contains("qemu-storage-daemon"),
        "{err}"
    );
}

/// A passphrase file (no trailing newline: its exact bytes are the passphrase).
fn secret(env: &Env) -> PathBuf {
    let p = env.path("pass");
    std::fs::write(&p, b"correct horse").unwrap();
    p
}

#[test]
fn a_luks_qcow2_is_refused_without_a_secret_and_restored_byte_exact_with_one() {
    let env = Env::new();
    let raw = raw_disk(&env, "d.raw");
    let pass = secret(&env);
    let img = env.path("enc.qcow2");
    let obj = format!("secret,id=s0,file={}", pass.display());
    sh(
        "qemu-img",
        &[
            "convert",
            "--object",
            &obj,
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let err = refused(&env, &[img.to_str().unwrap()]);
    assert!(
        err.contains("encrypted") && err.contains("--secret-file"),
        "{err}"
    );

    let wrong = env.path("wrong");
    std::fs::write(&wrong, b"wrong horse").unwrap();
    let err = refused(
        &env,
        &[
            img.to_str().unwrap(),
            "--secret-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert!(err.contains("qemu-storage-daemon"), "{err}");

    let b = backup(
        &env,
        &[
            img.to_str().unwrap(),
            "--secret-file",
            pass.to_str().unwrap(),
        ],
    );
    assert_eq!(s(&b, "reader"), "qemu-storage-daemon:qcow2");
    assert_eq!(
        s(&b, "encryption"),
        "encrypted source, decrypted with a user secret"
    );
    let out = restore_raw(&env, &b, "out.raw");
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn a_raw_luks_volume_is_read_decrypted_with_a_secret() {
    let env = Env::new();
    let raw = raw_disk(&env, "d.raw");
    let pass = secret(&env);
    let img = env.path("vol.luks");
    let obj = format!("secret,id=s0,file={}", pass.display());
    sh(
        "qemu-img",
        &[
            "convert",
            "--object",
            &obj,
            "-f",
            "raw",
            "-O",
            "luks",
            "-o",
            "key-secret=s0",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let err = refused(&env, &[img.to_str().unwrap()]);
    assert!(err.contains("--secret-file"), "{err}");
    let b = backup(
        &env,
        &[
            img.to_str().unwrap(),
            "--secret-file",
            pass.to_str().unwrap(),
        ],
    );
    assert_eq!(s(&b, "reader"), "qemu-storage-daemon:luks");
    let out = restore_raw(&env, &b, "out.raw");
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn a_raw_disk_with_a_qcow2_header_in_sector_0_stays_raw_and_its_disk_id_keeps_that_format() {
    let env = Env::new();
    // The guest wrote a qcow2 image into its own raw disk. (A backing file outside the
    // image's tree is refused on its own: tests/it/hostile.rs. This one names a file
    // beside the disk, so that only the format check stands in the way.)
    let hdr = env.path("evil.qcow2");
    std::fs::write(env.path("beside.raw"), b"host data").unwrap();
    sh(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            env.path("beside.raw").to_str().unwrap(),
            "-F",
            "raw",
            hdr.to_str().unwrap(),
        ],
    );
    let disk = env.path("guest.raw");
    write_raw(&disk, 8 << 20, 0, &std::fs::read(&hdr).unwrap());
    write_raw(&disk, 8 << 20, 3 << 20, &random_bytes(200_000, 4));
    let spec = format!("raw:{}", disk.display());
    let b = backup(&env, &[&spec]);
    assert_eq!(s(&b, "format"), "raw");
    assert_eq!(s(&b, "reader"), "raw");
    assert_eq!(u(&b, "logical_size"), 8 << 20);
    let out = restore_raw(&env, &b, "out.raw");
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&out).unwrap());

    // The same disk (same default id) without the prefix: a format change, refused.
    let err = refused(&env, &[disk.to_str().unwrap()]);
    assert!(
        err.contains("backed up as raw") && err.contains("--format-change"),
        "{err}"
    );
    // Given as raw: again, the next backup goes on as before.
    let b2 = backup(&env, &[&spec]);
    assert_eq!(s(&b2, "disk_id"), s(&b, "disk_id"));
    assert_eq!(u(&b2, "chunks_new"), 0, "the same data, nothing new stored");
}

/// True when some process holds QEMU's "write" permission byte (101) of `img`
/// (an OFD lock listed in /proc/locks for its inode).
fn write_locked(img: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{} ", std::fs::metadata(img).unwrap().ino());
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| l.contains("OFDLCK") && l.contains(&ino))
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (Some(a), Some(b)) = (f.get(f.len() - 2), f.last()) else {
                return false;
            };
            let end = if *b == "EOF" {
                u64::MAX
            } else {
                b.parse().unwrap_or(0)
            };
            a.parse::<u64>().is_ok_and(|a| a <= 101) && end >= 101
        })
}

/// `qemu-io` holding `img` (of format `fmt`) open for writing (interactive, commands on
/// a pipe), once its write lock is seen.
struct Writer(Child);

impl Writer {
    fn start(img: &Path, fmt: &str) -> Writer {
        let child = Command::new("qemu-io")
            .args(["-f", fmt])
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let w = Writer(child);
        let start = Instant::now();
        while !write_locked(img) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "qemu-io never locked"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        w
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(i) = self.0.stdin.as_mut() {
            let _ = i.write_all(b"quit\n");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_image_open_for_writing_is_refused_or_labelled_inconsistent_when_forced() {
    let env = Env::new();
    let disk = raw_disk(&env, "busy.raw");
    let w = Writer::start(&disk, "raw");
    let err = refused(&env, &[disk.to_str().unwrap()]);
    assert!(
        err.contains("'write' lock") && err.contains("qmp:"),
        "{err}"
    );
    assert!(err.contains("--force-inconsistent"), "{err}");

    let b = backup(&env, &[disk.to_str().unwrap(), "--force-inconsistent"]);
    assert_eq!(b["capture"]["consistency"], "inconsistent", "{b}");
    assert!(b["capture"]["note"].as_str().unwrap().contains("writing"));
    drop(w);

    // The same through the daemon: a VHD held by a writer.
    let vhd = env.path("busy.vhd");
    convert(&disk, "vpc", &[], &vhd);
    let w = Writer::start(&vhd, "vpc");
    refused(&env, &[vhd.to_str().unwrap()]);
    let b = backup(&env, &[vhd.to_str().unwrap(), "--force-inconsistent"]);
    assert_eq!(b["capture"]["consistency"], "inconsistent");
    assert_eq!(s(&b, "reader"), "qemu-storage-daemon:vpc");
    drop(w);
}

#[test]
fn a_read_only_holder_does_not_block_the_backup() {
    let env = Env::new();
    let disk = raw_disk(&env, "shared.raw");
    let srv = crate::common::Server::qemu_nbd(&disk, &env.path("nbd.sock"), &["-f", "raw"]);
    let b = backup(&env, &[disk.to_str().unwrap()]);
    assert_eq!(b["capture"]["consistency"], "crash-consistent");
    drop(srv);
    let out = restore_raw(&env, &b, "out.raw");
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&out).unwrap());
}

/// A VHD big enough that a backup of it is still reading when the test acts.
fn big_vhd(env: &Env) -> PathBuf {
    let raw = env.path("big.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    let block = random_bytes(1 << 20, 5);
    for i in 0..256u64 {
        write_raw(&raw, 256 << 20, i << 20, &block);
    }
    let vhd = env.path("big.vhd");
    convert(&raw, "vpc", &[], &vhd);
    std::fs::remove_file(&raw).unwrap();
    vhd
}

/// Start a backup of `img` in the background and wait until its daemon runs. The
/// caller waits for the returned child.
#[allow(clippy::zombie_processes)]
fn backup_with_daemon(env: &Env, img: &Path) -> (Child, i32) {
    let mut child = env
        .cmd()
        .env("TMPDIR", tmp(env))
        .args(["backup", img.to_str().unwrap(), "--vault", "v"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some((pid, _)) = processes_under(&tmp(env)).first() {
            return (child, *pid);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no daemon started");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_daemon_that_dies_is_a_clear_error_and_nothing_is_stored() {
    let env = Env::new();
    let vhd = big_vhd(&env);
    let (child, pid) = backup_with_daemon(&env, &vhd);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("qemu-storage-daemon") && err.contains("exited"),
        "{err}"
    );
    assert!(env.backups().is_empty());
    assert_no_daemon_left(&env);
}

#[test]
fn a_cancelled_backup_stops_its_daemon_and_removes_its_directory() {
    let env = Env::new();
    let vhd = big_vhd(&env);
    let (child, _) = backup_with_daemon(&env, &vhd);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cancel"), "{err}");
    assert!(env.backups().is_empty());
    assert_no_daemon_left(&env);
}

#[test]
fn the_daemon_of_a_killed_backup_is_swept_by_the_next_one() {
    let env = Env::new();
    let vhd = big_vhd(&env);
    let (mut child, pid) = backup_with_daemon(&env, &vhd);
    child.kill().unwrap(); // SIGKILL: blockvault cannot clean up
    child.wait().unwrap();
    assert!(
        processes_under(&tmp(&env)).iter().any(|(p, _)| *p == pid),
        "the orphan daemon outlives a SIGKILLed backup"
    );
    let raw = raw_disk(&env, "small.raw");
    let small = env.path("small.vhd");
    convert(&raw, "vpc", &[], &small);
    backup(&env, &[small.to_str().unwrap()]); // asserts nothing is left afterwards
}

//! Recovery drills against real qemu-system-x86_64: a guest built here (a boot sector
//! that prints a marker on COM1, then reads the second BIOS disk's first sector and
//! prints that too) is backed up and booted from the vault through serve-nbd and a
//! throwaway overlay; a copy with a wiped boot sector must fail with its logs; nothing
//! (QEMU, overlay, socket, temp dir) is left behind and neither the source images nor
//! the vault change.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// A boot sector (SeaBIOS loads it at 0x7c00): print `msg` on COM1 (0x3f8), read one
/// sector of BIOS disk 0x81 to 0:8000 and print it (NUL-terminated) if that worked, halt.
pub(crate) fn boot_sector(msg: &str) -> Vec<u8> {
    let mut c: Vec<u8> = vec![0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0]; // cli; ds=es=0
    c.extend([0xbe, 0, 0]); // mov si, msg
    let p_msg = c.len() - 2;
    c.extend([0xe8, 0, 0]); // call print
    let p_call1 = c.len() - 2;
    // mov ax,0x0201; mov cx,1; mov dx,0x81; mov bx,0x8000; int 0x13
    c.extend([
        0xb8, 0x01, 0x02, 0xb9, 0x01, 0x00, 0xba, 0x81, 0x00, 0xbb, 0x00, 0x80, 0xcd, 0x13,
    ]);
    c.extend([0x72, 0]); // jc done
    let p_jc = c.len() - 1;
    c.extend([0xbe, 0x00, 0x80]); // mov si,0x8000
    c.extend([0xe8, 0, 0]); // call print
    let p_call2 = c.len() - 2;
    let done = c.len();
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp done
    let print = c.len();
    // mov dx,0x3f8; l: lodsb; test al,al; jz r; out dx,al; jmp l; r: ret
    c.extend([
        0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xc3,
    ]);
    let m = c.len();
    c.extend(msg.as_bytes());
    c.push(0);
    c[p_msg..p_msg + 2].copy_from_slice(&(0x7c00 + m as u16).to_le_bytes());
    for p in [p_call1, p_call2] {
        let rel = (print as i32 - (p as i32 + 2)) as i16;
        c[p..p + 2].copy_from_slice(&rel.to_le_bytes());
    }
    c[p_jc] = (done - (p_jc + 1)) as u8;
    assert!(c.len() <= 510);
    c.resize(510, 0);
    c.extend([0x55, 0xaa]);
    c
}

/// A raw disk of `size` bytes whose first bytes are `head`.
pub(crate) fn disk(path: &Path, head: &[u8], size: u64) {
    write_raw(path, size, 0, head);
}

pub(crate) fn hash(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

/// The vault's packs, manifests and vault.toml with their contents' hash: what a drill
/// must not change (cache/ and locks/ are the vault's scratch: lookup cache, pins).
fn tree(dir: &Path) -> Vec<(PathBuf, Option<blake3::Hash>)> {
    let mut out = vec![(dir.join("vault.toml"), Some(hash(&dir.join("vault.toml"))))];
    let mut todo = vec![dir.join("packs"), dir.join("backups")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
                out.push((p, None));
            } else {
                out.push((p.clone(), Some(hash(&p))));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Processes whose command line mentions `needle` (our test dir: QEMU's sockets and
/// logs live under it).
pub(crate) fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                found.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

pub(crate) struct Drill {
    pub(crate) env: Env,
    pub(crate) tmp: PathBuf,
}

impl Drill {
    pub(crate) fn new() -> Drill {
        let env = Env::new();
        let tmp = env.path("tmp");
        std::fs::create_dir(&tmp).unwrap();
        Drill { env, tmp }
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.env.cmd();
        c.env("TMPDIR", &self.tmp)
            .arg("--json")
            .arg("drill")
            .args(args);
        c
    }

    /// Run a drill; returns its exit code and JSON record.
    pub(crate) fn drill(&self, args: &[&str]) -> (i32, Value) {
        let out = self.cmd(args).output().unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "drill {args:?}: bad JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }

    pub(crate) fn backup_named(&self, sources: &[&str], id: &str, name: &str) -> Value {
        let mut a = vec!["backup"];
        a.extend_from_slice(sources);
        a.extend(["--vault", "v", "--id", id, "--name", name]);
        self.env.json(&a)
    }

    /// Nothing of a drill is left: no QEMU or NBD server, no run dir, overlay or socket.
    pub(crate) fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.tmp).unwrap().flatten().collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
        let procs = processes_mentioning(&self.env.dir.path().display().to_string());
        assert!(procs.is_empty(), "still running: {procs:?}");
    }
}

pub(crate) fn png_size(p: &Path) -> (u32, u32) {
    let b = std::fs::read(p).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        p.display()
    );
    assert_eq!(&b[12..16], b"IHDR");
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn a_bootable_backup_passes_its_drill_and_a_damaged_copy_fails_with_its_console_log() {
    let t = Drill::new();
    let good = t.env.path("guest.img");
    disk(
        &good,
        &boot_sector("blockvault drill guest: DRILL-OK\r\n"),
        8 << 20,
    );
    let bad = t.env.path("damaged.img");
    std::fs::copy(&good, &bad).unwrap();
    write_raw(&bad, 8 << 20, 0, &[0u8; 512]); // the boot sector wiped
    let (h_good, h_bad) = (hash(&good), hash(&bad));
    let b_good = t.backup_named(&[good.to_str().unwrap()], "guest", "good");
    let b_bad = t.backup_named(&[bad.to_str().unwrap()], "damaged", "bad");
    let vault_before = tree(&t.env.vault_dir());

    // Accelerator left on auto: KVM when it runs the guest, TCG otherwise.
    let (code, v) = t.drill(&["good", "--check", "console:DRILL-OK", "--timeout", "120"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["backup"], b_good["id"]);
    assert_eq!(v["check"], "console:DRILL-OK");
    assert!(["kvm", "tcg"].contains(&v["accel"].as_str().unwrap()));
    assert!(v["console_tail"].as_str().unwrap().contains("DRILL-OK"));
    let shot = PathBuf::from(v["screenshot"].as_str().expect("a screenshot"));
    assert!(shot.starts_with(t.env.data().join("drills").join(s(&b_good, "id"))));
    let (w, h) = png_size(&shot);
    assert!(w >= 320 && h >= 200, "screenshot {w}x{h}");
    t.assert_clean();
    // Recorded on the backup.
    let shown = t.env.json(&["backups", "show", "good"]);
    assert_eq!(shown["verified_boot"]["ok"], true, "{shown:#}");
    assert_eq!(shown["verified_boot"]["screenshot"], v["screenshot"]);

    let (code, v) = t.drill(&[
        "bad",
        "--check",
        "console:DRILL-OK",
        "--timeout",
        "120",
        "--accel",
        "tcg",
    ]);
    assert_eq!(code, 1, "a guest that does not boot fails the drill: {v:#}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["backup"], b_bad["id"]);
    assert!(
        v["reason"].as_str().unwrap().contains("no bootable disk"),
        "{v:#}"
    );
    assert!(
        v["firmware_tail"]
            .as_str()
            .unwrap()
            .contains("not a bootable disk"),
        "{v:#}"
    );
    let dir = PathBuf::from(s(&v, "dir"));
    assert!(dir.join("console.log").is_file());
    assert!(dir.join("firmware.log").is_file());
    png_size(&PathBuf::from(
        v["screenshot"].as_str().expect("a screenshot"),
    ));
    t.assert_clean();
    let shown = t.env.json(&["backups", "show", "bad"]);
    assert_eq!(shown["verified_boot"]["ok"], false);
    // The good backup keeps its own last drill.
    assert_eq!(
        t.env.json(&["backups", "show", "good"])["verified_boot"]["ok"],
        true
    );

    assert_eq!(hash(&good), h_good, "the source image changed");
    assert_eq!(hash(&bad), h_bad, "the source image changed");
    assert_eq!(tree(&t.env.vault_dir()), vault_before, "the vault changed");
}

#[test]
fn a_server_backup_boots_with_every_disk_in_order() {
    let t = Drill::new();
    let boot = t.env.path("boot.img");
    disk(&boot, &boot_sector("server boot disk up\r\n"), 4 << 20);
    let data = t.env.path("data.img");
    disk(&data, b"SECOND-DISK-OK\r\n\0", 2 << 20);
    let (h0, h1) = (hash(&boot), hash(&data));
    let m = t.backup_named(
        &[
            &format!("boot={}", boot.display()),
            &format!("data={}", data.display()),
        ],
        "srv",
        "srv-1",
    );
    // The guest prints the second disk's first sector: both disks are there, in order.
    let (code, v) = t.drill(&[
        "latest",
        "--disk",
        "srv",
        "--check",
        "console:server boot disk up\\r\\nSECOND-DISK-OK",
        "--accel",
        "tcg",
        "--timeout",
        "120",
    ]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["backup"], m["id"]);
    assert_eq!(v["disks"], serde_json::json!(["boot", "data"]));
    assert_eq!(v["accel"], "tcg");
    t.assert_clean();
    assert_eq!((hash(&boot), hash(&data)), (h0, h1));
}

#[test]
fn a_drill_that_times_out_or_is_cancelled_leaves_nothing_behind() {
    let t = Drill::new();
    let img = t.env.path("quiet.img");
    disk(&img, &boot_sector("no marker here\r\n"), 4 << 20);
    t.backup_named(&[img.to_str().unwrap()], "quiet", "quiet");

    let (code, v) = t.drill(&[
        "quiet",
        "--check",
        "console:NEVER",
        "--timeout",
        "3",
        "--accel",
        "tcg",
    ]);
    assert_eq!(code, 1);
    assert_eq!(v["ok"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("within 3 s"),
        "{v:#}"
    );
    assert!(
        v["console_tail"]
            .as_str()
            .unwrap()
            .contains("no marker here")
    );
    png_size(&PathBuf::from(s(&v, "screenshot")));
    t.assert_clean();

    // Cancel (SIGTERM) while the VM runs: QEMU goes, nothing is recorded.
    let mut child = t
        .cmd(&[
            "quiet",
            "--check",
            "console:NEVER",
            "--timeout",
            "600",
            "--accel",
            "tcg",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let needle = t.env.dir.path().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !processes_mentioning(&needle)
        .iter()
        .any(|p| p.contains("qemu-system"))
    {
        assert!(Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "cancelled: {st:?} {:?}", st.signal());
    t.assert_clean();
    let shown = t.env.json(&["backups", "show", "quiet"]);
    assert_eq!(
        shown["verified_boot"]["reason"], v["reason"],
        "the cancelled drill recorded nothing: the timed-out one stays the last"
    );
}

#[test]
fn bad_drill_arguments_are_refused_before_anything_runs() {
    let t = Drill::new();
    let img = t.env.path("g.img");
    disk(&img, &boot_sector("x\r\n"), 1 << 20);
    t.backup_named(&[img.to_str().unwrap()], "g", "g");
    for args in [
        &["g", "--check", "console:("][..],
        &["g", "--check", "ping"],
        &["g", "--check", "port:0"],
        &["g", "--accel", "xen"],
        &["g", "--timeout", "0"],
        &["g", "--check", "agent", "--bus", "floppy"],
    ] {
        let out = t.cmd(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    assert!(!t.env.data().join("drills").join("x").exists());
    let out = t.cmd(&["nosuchbackup"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(t.env.json(&["backups", "show", "g"])["verified_boot"].is_null());
    t.assert_clean();
}

#[test]
fn a_killed_drill_takes_its_vm_along_and_the_next_drill_sweeps_its_leftovers() {
    let t = Drill::new();
    let img = t.env.path("g.img");
    disk(&img, &boot_sector("guest up\r\n"), 4 << 20);
    t.backup_named(&[img.to_str().unwrap()], "g", "g");
    let mut child = t
        .cmd(&[
            "g",
            "--check",
            "console:NEVER",
            "--timeout",
            "600",
            "--accel",
            "tcg",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let needle = t.env.dir.path().display().to_string();
    let qemu = || {
        processes_mentioning(&needle)
            .into_iter()
            .filter(|p| p.contains("qemu-system"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while qemu().is_empty() {
        assert!(Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL: no unwinding, no cleanup of ours runs
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qemu().is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU outlived its drill: {:?}",
            qemu()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its run dir is still there; the next drill removes it and cleans up after itself.
    assert_eq!(std::fs::read_dir(&t.tmp).unwrap().count(), 1);
    let (code, v) = t.drill(&["g", "--check", "console:guest up", "--accel", "tcg"]);
    assert_eq!(code, 0, "{v:#}");
    t.assert_clean();
}

/// The Linux guest of `fixtures/drill-guest.sh` (built once per checkout, cached).
fn linux_guest() -> PathBuf {
    static IMG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMG.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg(root.join("fixtures/drill-guest.sh"))
            .arg(root.join("target/fixtures/drill-guest"))
            .output()
            .expect("running fixtures/drill-guest.sh");
        assert!(
            out.status.success(),
            "fixtures/drill-guest.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

#[test]
fn a_linux_guest_passes_the_agent_and_port_checks_and_a_closed_port_fails() {
    let t = Drill::new();
    let img = linux_guest();
    let h = hash(&img);
    t.backup_named(&[img.to_str().unwrap()], "linux", "linux");
    let vm = ["--accel", "tcg", "--memory", "256"];
    for check in ["agent", "port:8080"] {
        let mut a = vec!["linux", "--check", check, "--timeout", "300"];
        a.extend(vm);
        let (code, v) = t.drill(&a);
        assert_eq!(code, 0, "{check}: {v:#}");
        assert_eq!(v["ok"], true);
        png_size(Path::new(s(&v, "screenshot")));
        t.assert_clean();
    }
    // Nothing listens on 8081: slirp accepting the forwarded connection is not enough.
    let mut a = vec!["linux", "--check", "port:8081", "--timeout", "30"];
    a.extend(vm);
    let (code, v) = t.drill(&a);
    assert_eq!(code, 1, "{v:#}");
    assert!(
        s(&v, "reason").contains("no port:8081 within 30 s"),
        "{v:#}"
    );
    t.assert_clean();
    assert_eq!(hash(&img), h, "the guest image changed");
}

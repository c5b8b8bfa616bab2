//! `libvirt:DOMAIN` backups against a real, private `libvirtd` running a small domain
//! under QEMU TCG (`<domain type='qemu'>`: no KVM, so a host whose /dev/kvm hangs guests
//! does not matter). The guest boots nothing; its disks (two qcow2, one raw) change through QEMU's
//! own block layer (HMP `qemu-io` on the virtio devices' block backends).
//!
//! The test starts `libvirtd` with its own config (sockets and pid file in a temp dir),
//! plus `virtlogd` when none runs, and stops what it started. It is skipped, saying so,
//! when libvirtd, virsh or qemu-system-x86_64 are missing, unless
//! `BLOCKVAULT_REQUIRE_LIBVIRT=1` (set by .ci/run, which installs them) makes that a
//! failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, images_equal, pack_files, s, sh, u};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

/// A private libvirtd (and virtlogd if none ran) with one persistent domain.
struct Libvirt {
    dir: tempfile::TempDir,
    uri: String,
    domain: String,
    daemons: Vec<PathBuf>,
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
        || Path::new("/usr/sbin").join(tool).exists()
}

impl Libvirt {
    /// None (after saying why) when libvirt is not installed here.
    fn start() -> Option<Libvirt> {
        let missing: Vec<&str> = ["libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"]
            .into_iter()
            .filter(|t| !have(t))
            .collect();
        if !missing.is_empty() {
            let msg = format!(
                "libvirt test needs {missing:?} (Debian: qemu-system-x86 libvirt-daemon-system \
                 libvirt-clients libvirt-daemon-driver-qemu)"
            );
            if std::env::var("BLOCKVAULT_REQUIRE_LIBVIRT").is_ok_and(|v| v == "1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("bv-libvirt-")
            .tempdir()
            .unwrap();
        // QEMU runs as libvirt's qemu user: it must reach the disk images in here.
        sh("chmod", &["0755", dir.path().to_str().unwrap()]);
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("libvirtd.conf"),
            format!("unix_sock_dir = \"{d}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n"),
        )
        .unwrap();
        let mut lv = Libvirt {
            uri: format!("qemu:///system?socket={d}/libvirt-sock"),
            domain: format!("bv-it-{}", std::process::id()),
            daemons: Vec::new(),
            dir,
        };
        // libvirtd's QEMU driver logs through virtlogd's fixed socket.
        if std::os::unix::net::UnixStream::connect("/run/libvirt/virtlogd-sock").is_err() {
            let pid = lv.dir.path().join("virtlogd.pid");
            sh("virtlogd", &["-d", "-p", pid.to_str().unwrap()]);
            lv.daemons.push(pid);
            wait_for(
                || std::os::unix::net::UnixStream::connect("/run/libvirt/virtlogd-sock").is_ok(),
                "virtlogd's socket",
            );
        }
        let pid = lv.dir.path().join("libvirtd.pid");
        sh(
            "libvirtd",
            &[
                "-d",
                "-f",
                &format!("{d}/libvirtd.conf"),
                "-p",
                pid.to_str().unwrap(),
            ],
        );
        lv.daemons.push(pid);
        wait_for(|| lv.try_virsh(&["version"]).is_ok(), "libvirtd to answer");
        Some(lv)
    }

    fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .output()
            .expect("virsh");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn virsh(&self, args: &[&str]) -> String {
        self.try_virsh(args)
            .unwrap_or_else(|e| panic!("virsh {args:?}: {e}"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Define and start a domain with qcow2 disks vda and vdb, a raw disk vdc (user
    /// aliases ua-vda…) and a guest-agent channel that no agent answers (no OS runs).
    fn start_domain(&self, a: &Path, b: &Path, c: &Path) {
        let disk = |img: &Path, dev: &str, format: &str| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{format}'/>\
                 <source file='{}'/><target dev='{dev}' bus='virtio'/>\
                 <alias name='ua-{dev}'/></disk>",
                img.display()
            )
        };
        let xml = format!(
            "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>{}{}{}\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <video><model type='none'/></video><memballoon model='none'/>\
             </devices></domain>",
            self.domain,
            disk(a, "vda", "qcow2"),
            disk(b, "vdb", "qcow2"),
            disk(c, "vdc", "raw")
        );
        let f = self.path("domain.xml");
        std::fs::write(&f, xml).unwrap();
        self.virsh(&["define", f.to_str().unwrap()]);
        self.virsh(&["start", &self.domain]);
    }

    /// Write `len` bytes of `pattern` at `offset` of disk `dev`, through the guest's own
    /// block backend in QEMU.
    fn write(&self, dev: &str, pattern: u8, offset: u64, len: u64) {
        let cmd = format!(
            "qemu-io -d /machine/peripheral/ua-{dev}/virtio-backend \"write -P {pattern} {offset} {len}\""
        );
        let out = self.virsh(&["qemu-monitor-command", &self.domain, "--hmp", &cmd]);
        assert!(!out.to_lowercase().contains("error"), "{cmd}: {out}");
    }

    /// Raw copies of both disks as they are now, taken while the domain is paused.
    fn paused_copy(&self, disks: &[(&str, &Path)], tag: &str) -> Vec<PathBuf> {
        self.virsh(&["suspend", &self.domain]);
        let copies = disks
            .iter()
            .map(|(dev, img)| {
                let to = self.path(&format!("{tag}-{dev}.raw"));
                sh(
                    "qemu-img",
                    &[
                        "convert",
                        "-U",
                        "-O",
                        "raw",
                        img.to_str().unwrap(),
                        to.to_str().unwrap(),
                    ],
                );
                to
            })
            .collect();
        self.virsh(&["resume", &self.domain]);
        copies
    }

    fn checkpoints(&self) -> Vec<String> {
        self.virsh(&["checkpoint-list", &self.domain, "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn no_job(&self) {
        let info = self.virsh(&["domjobinfo", &self.domain]);
        assert!(
            info.lines()
                .any(|l| l.starts_with("Job type:") && l.trim_end().ends_with("None")),
            "a job is left: {info}"
        );
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = self.try_virsh(&["destroy", &self.domain]);
        let _ = self.try_virsh(&["undefine", &self.domain, "--checkpoints-metadata"]);
        // libvirtd first, then virtlogd (if this test started it).
        for pid in self.daemons.iter().rev() {
            let Some(pid) = std::fs::read_to_string(pid)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while proc.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disk<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {m}"))
}

fn restores_to(env: &Env, m: &Value, copies: &[PathBuf], tag: &str) {
    let dir = env.path(&format!("restored-{tag}"));
    env.json(&["restore", s(m, "id"), "--to", dir.to_str().unwrap()]);
    for (dev, copy) in ["vda", "vdb", "vdc"].iter().zip(copies) {
        assert!(
            images_equal(&dir.join(format!("{dev}.raw")), copy),
            "{tag}: restored {dev} differs from the paused copy"
        );
    }
}

#[test]
fn a_libvirt_domain_is_backed_up_full_then_incrementally_through_its_checkpoints() {
    let Some(lv) = Libvirt::start() else {
        return;
    };
    let env = Env::new();
    let a = lv.path("a.qcow2");
    let b = lv.path("b.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "64M"],
    );
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "32M"],
    );
    let c = lv.path("c.raw");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "raw", c.to_str().unwrap(), "16M"],
    );
    for (img, pat, format) in [
        (&a, "0x11", "qcow2"),
        (&b, "0x22", "qcow2"),
        (&c, "0x23", "raw"),
    ] {
        sh(
            "qemu-io",
            &[
                "-f",
                format,
                "-c",
                &format!("write -P {pat} 1M 2M"),
                img.to_str().unwrap(),
            ],
        );
    }
    lv.start_domain(&a, &b, &c);
    let disks = [
        ("vda", a.as_path()),
        ("vdb", b.as_path()),
        ("vdc", c.as_path()),
    ];
    let source = format!("libvirt:{}?uri={}", lv.domain, lv.uri);
    // The run directories (NBD socket, scratch files) go here; QEMU must reach it.
    let scratch = lv.path("scratch");
    std::fs::create_dir(&scratch).unwrap();
    sh("chmod", &["0755", scratch.to_str().unwrap()]);
    let fleece = scratch.to_str().unwrap();
    let backup = |name: &str| {
        env.json(&[
            "backup",
            &source,
            "--vault",
            "v",
            "--name",
            name,
            "--fleece-dir",
            fleece,
        ])
    };

    // Full: both disks at one instant, named by target, one checkpoint.
    lv.write("vda", 0x33, 10 * MIB, CHUNK);
    let c1 = lv.paused_copy(&disks, "b1");
    let m1 = backup("b1");
    assert_eq!(s(&m1, "resource"), format!("libvirt:{}", lv.domain));
    assert_eq!(m1["capture"]["method"], "libvirt-backup");
    assert_eq!(m1["capture"]["consistency"], "crash-consistent");
    assert!(
        s(&m1["capture"], "note").contains("guest agent does not answer"),
        "{}",
        m1["capture"]
    );
    for (name, bytes) in [("vda", 2 * MIB + CHUNK), ("vdb", 2 * MIB)] {
        let d = disk(&m1, name);
        assert_eq!(d["kind"], "full", "{d}");
        assert_eq!(u(d, "bytes_read"), bytes, "{name}");
    }
    let cp1 = s(&disk(&m1, "vda")["checkpoint"], "bitmap").to_string();
    assert_eq!(disk(&m1, "vdb")["checkpoint"]["bitmap"], cp1.as_str());
    // A raw disk has no bitmap: no checkpoint to continue from.
    assert_eq!(disk(&m1, "vdc")["kind"], "full");
    assert!(
        disk(&m1, "vdc")
            .get("checkpoint")
            .is_none_or(Value::is_null)
    );
    assert_eq!(lv.checkpoints(), vec![cp1.clone()]);
    lv.no_job();

    // Incremental: three chunks of vda and 4 KiB of vdb changed.
    for off in [0, 20 * MIB + CHUNK, 63 * MIB] {
        lv.write("vda", 0x44, off, CHUNK);
    }
    lv.write("vdb", 0x55, 7 * MIB + 4096, 4096);
    lv.write("vdc", 0x56, 5 * MIB, CHUNK);
    let c2 = lv.paused_copy(&disks, "b2");
    let m2 = backup("b2");
    for (name, chunks) in [("vda", 3), ("vdb", 1)] {
        let d = disk(&m2, name);
        assert_eq!(d["kind"], "incremental", "{d}");
        assert_eq!(d["strategy"], "bitmap", "{d}");
        assert_eq!(u(d, "bytes_read"), chunks * CHUNK, "{name}");
        assert_eq!(s(d, "parent"), s(&m1, "id"));
    }
    // The raw disk is read in full and compared: only its changed chunk is new.
    let d = disk(&m2, "vdc");
    assert_eq!(d["strategy"], "compare", "{d}");
    assert_eq!(u(d, "chunks_new"), 1, "{d}");
    assert!(s(d, "note").contains("vdc is a raw image"), "{d}");
    let cp2 = s(&disk(&m2, "vda")["checkpoint"], "bitmap").to_string();
    assert_ne!(cp2, cp1);
    assert_eq!(
        lv.checkpoints(),
        vec![cp2.clone()],
        "the old checkpoint is retired"
    );
    lv.no_job();

    // Second incremental: only vdb changed.
    lv.write("vdb", 0x66, 0, 2 * CHUNK);
    let c3 = lv.paused_copy(&disks, "b3");
    let m3 = backup("b3");
    assert_eq!(u(disk(&m3, "vda"), "bytes_read"), 0);
    assert_eq!(disk(&m3, "vda")["kind"], "incremental");
    assert_eq!(u(disk(&m3, "vdb"), "bytes_read"), 2 * CHUNK);
    let cp3 = s(&disk(&m3, "vda")["checkpoint"], "bitmap").to_string();
    assert_eq!(lv.checkpoints(), vec![cp3.clone()]);
    lv.no_job();

    // Every backup restores what the disks held at its instant.
    restores_to(&env, &m1, &c1, "b1");
    restores_to(&env, &m2, &c2, "b2");
    restores_to(&env, &m3, &c3, "b3");
    assert!(!images_equal(&c1[0], &c2[0]));

    // A backup that fails after libvirt took its instant (the vault is full): nothing is
    // recorded, its checkpoint is deleted, the job ended, and the next backup still reads
    // every change since b3 (libvirt kept recording in b3's checkpoint).
    let toml = env.vault_dir().join("vault.toml");
    let cfg = std::fs::read_to_string(&toml).unwrap();
    let used: u64 = pack_files(&env.vault_dir())
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    std::fs::write(&toml, format!("{cfg}capacity = {}\n", used + 1)).unwrap();
    lv.write("vda", 0x5a, 12 * MIB, CHUNK);
    let before = env.backups().len();
    let out = env.run(&["backup", &source, "--vault", "v", "--fleece-dir", fleece]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.backups().len(), before, "nothing was recorded");
    assert_eq!(lv.checkpoints(), vec![cp3.clone()]);
    lv.no_job();
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    std::fs::write(&toml, &cfg).unwrap();
    lv.write("vdb", 0x5b, 9 * MIB, CHUNK);
    let c3b = lv.paused_copy(&disks, "b3b");
    let m3b = backup("b3b");
    for name in ["vda", "vdb"] {
        let d = disk(&m3b, name);
        assert_eq!(d["strategy"], "bitmap", "{d}");
        assert_eq!(u(d, "bytes_read"), CHUNK, "{name}");
        assert_eq!(s(d, "parent"), s(&m3, "id"));
    }
    let cp3 = s(&disk(&m3b, "vda")["checkpoint"], "bitmap").to_string();
    assert_eq!(lv.checkpoints(), vec![cp3.clone()]);
    restores_to(&env, &m3b, &c3b, "b3b");

    // A checkpoint deleted by hand: the next backup reads in full and says why.
    lv.virsh(&["checkpoint-delete", &lv.domain, &cp3]);
    lv.write("vda", 0x77, 30 * MIB, CHUNK);
    let c4 = lv.paused_copy(&disks, "b4");
    let m4 = backup("b4");
    for name in ["vda", "vdb"] {
        let d = disk(&m4, name);
        assert_eq!(d["kind"], "full", "{d}");
        assert_eq!(d["strategy"], "compare", "{d}");
        assert!(s(d, "note").contains(&format!("checkpoint {cp3}")), "{d}");
        assert!(s(d, "note").contains("gone"), "{d}");
    }
    assert_eq!(
        u(disk(&m4, "vda"), "chunks_new"),
        1,
        "only the changed chunk is new"
    );
    let cp4 = s(&disk(&m4, "vda")["checkpoint"], "bitmap").to_string();
    assert_eq!(lv.checkpoints(), vec![cp4.clone()]);
    lv.no_job();
    restores_to(&env, &m4, &c4, "b4");

    // A service resource names the domain: a server, backed up as its own chain, which
    // leaves the CLI chain's checkpoint alone.
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let res = |kind: &str| json!({"name": "web", "kind": kind, "sources": [source], "vault": "v"});
    let refused = srv.ok("POST", "/resources", &admin, Some(res("disk")), 400);
    assert!(
        refused.to_string().contains("libvirt: sources are servers"),
        "{refused}"
    );
    srv.ok("POST", "/resources", &admin, Some(res("server")), 201);
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "web"})),
        202,
    );
    let done = srv.wait_task(&admin, s(&t, "task"), Duration::from_secs(120));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(srv.stop());
    let web = env.json(&["backups", "show", s(&done["result"], "backup")]);
    assert_eq!(s(&web, "resource"), "web");
    let web_cp = s(&disk(&web, "vda")["checkpoint"], "bitmap").to_string();
    let mut both = vec![cp4.clone(), web_cp.clone()];
    both.sort();
    let mut now = lv.checkpoints();
    now.sort();
    assert_eq!(now, both);
    lv.no_job();

    // Leftovers of killed runs, made by hand exactly as such a run leaves them: libvirt's
    // backup job (socket in a blockvault-libvirt-<pid>-… dir) and its new checkpoint.
    let prefix = format!("blockvault-{}-", cp4.split('-').nth(1).unwrap());
    let hand_job = |pid: u32, tag: &str| {
        let run = scratch.join(format!("blockvault-libvirt-{pid}-{tag}"));
        std::fs::create_dir(&run).unwrap();
        sh("chmod", &["0777", run.to_str().unwrap()]);
        let r = run.display();
        let bk = lv.path(&format!("{tag}-backup.xml"));
        let cp = lv.path(&format!("{tag}-checkpoint.xml"));
        let d = |dev: &str| {
            format!(
                "<disk name='{dev}' backup='yes' type='file' backupmode='incremental' \
                 incremental='{cp4}'><scratch file='{r}/s-{dev}.qcow2'/></disk>"
            )
        };
        std::fs::write(
            &bk,
            format!(
                "<domainbackup mode='pull'><server transport='unix' socket='{r}/nbd.sock'/>\
                 <disks>{}{}<disk name='vdc' backup='no'/></disks></domainbackup>",
                d("vda"),
                d("vdb")
            ),
        )
        .unwrap();
        std::fs::write(
            &cp,
            format!(
                "<domaincheckpoint><name>{prefix}{tag}</name><disks>\
                 <disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='bitmap'/>\
                 <disk name='vdc' checkpoint='no'/>\
                 </disks></domaincheckpoint>"
            ),
        )
        .unwrap();
        lv.virsh(&[
            "backup-begin",
            &lv.domain,
            bk.to_str().unwrap(),
            cp.to_str().unwrap(),
        ]);
    };
    // A job of a run that is still alive (this test's pid) is not touched.
    hand_job(std::process::id(), "alive");
    let before = env.backups().len();
    let out = env.run(&["backup", &source, "--vault", "v", "--fleece-dir", fleece]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "another blockvault backup (pid {})",
            std::process::id()
        )),
        "{err}"
    );
    assert_eq!(env.backups().len(), before, "nothing was written");
    lv.virsh(&["domjobabort", &lv.domain]);
    std::fs::remove_dir_all(
        scratch.join(format!("blockvault-libvirt-{}-alive", std::process::id())),
    )
    .unwrap();
    // A job of a run that died is ended; its checkpoint and the alive one's are deleted.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    hand_job(gone.id(), "dead");
    lv.write("vda", 0x88, 40 * MIB, CHUNK);
    let c5 = lv.paused_copy(&disks, "b5");
    let m5 = backup("b5");
    let d = disk(&m5, "vda");
    assert_eq!(d["strategy"], "bitmap", "{d}");
    assert_eq!(
        u(d, "bytes_read"),
        CHUNK,
        "only the change since b4's checkpoint"
    );
    let ended = format!("ended the backup job left by blockvault pid {}", gone.id());
    assert!(
        m5["capture"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str().unwrap().starts_with(&ended)),
        "{}",
        m5["capture"]
    );
    let cp5 = s(&d["checkpoint"], "bitmap").to_string();
    let mut both = vec![cp5.clone(), web_cp.clone()];
    both.sort();
    let mut now = lv.checkpoints();
    now.sort();
    assert_eq!(
        now, both,
        "stale checkpoints deleted, the other chain's kept"
    );
    lv.no_job();
    restores_to(&env, &m5, &c5, "b5");

    // The chain's bitmap vanishes from one image behind libvirt's back (its checkpoint
    // metadata stays): libvirt refuses the incremental, so the backup reads in full and
    // says why instead of failing for ever; the broken checkpoint is dropped.
    let nodes: Value = serde_json::from_str(&lv.virsh(&[
        "qemu-monitor-command",
        &lv.domain,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]))
    .unwrap();
    let node = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == "qcow2" && n["file"] == b.to_str().unwrap())
        .unwrap_or_else(|| panic!("no qcow2 node for {}: {nodes}", b.display()))["node-name"]
        .as_str()
        .unwrap()
        .to_string();
    lv.virsh(&[
        "qemu-monitor-command",
        &lv.domain,
        &json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": cp5}})
            .to_string(),
    ]);
    lv.write("vda", 0x99, 50 * MIB, CHUNK);
    let c6 = lv.paused_copy(&disks, "b6");
    let m6 = backup("b6");
    for name in ["vda", "vdb"] {
        let d = disk(&m6, name);
        assert_eq!(d["kind"], "full", "{d}");
        assert_eq!(d["strategy"], "compare", "{d}");
        assert!(
            s(d, "note").contains("libvirt refused the incremental"),
            "{d}"
        );
    }
    assert_eq!(u(disk(&m6, "vda"), "chunks_new"), 1);
    let cp6 = s(&disk(&m6, "vda")["checkpoint"], "bitmap").to_string();
    let mut both = vec![cp6, web_cp.clone()];
    both.sort();
    let mut now = lv.checkpoints();
    now.sort();
    assert_eq!(now, both);
    lv.no_job();
    restores_to(&env, &m6, &c6, "b6");

    // A domain that is not running is refused, naming its disk files; nothing is written.
    lv.virsh(&["destroy", &lv.domain]);
    let before = env.backups().len();
    let out = env.run(&["backup", &source, "--vault", "v"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shut off"), "{err}");
    assert!(err.contains(&format!("vda={}", a.display())), "{err}");
    assert_eq!(env.backups().len(), before);
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "a run directory is left"
    );
}

//! Restore and export: every output format of every fixture, and restore onto an
//! existing disk over NBD writing only what differs.

use std::path::Path;
use std::process::Command;

use crate::common::{Env, Server, fixtures, images_equal, random_bytes, s, sh, u, write_raw};

const CHUNK: u64 = 64 << 10;

fn check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_fixture_restores_to_every_format_identical_and_clean() {
    let env = Env::new();
    let f = fixtures();
    let sources = [
        "disk.raw",
        "disk.qcow2",
        "compressed.qcow2",
        "chain-top.qcow2",
        "sparse.vmdk",
        "stream.vmdk",
        "flat.vmdk",
        "split.vmdk",
        "vmdk-delta.vmdk",
    ];
    for (i, name) in sources.iter().enumerate() {
        let src = f.join(name);
        let b = env.backup(&src, &format!("fx{i}"));
        for format in ["raw", "qcow2", "vmdk", "vmdk-stream"] {
            let out = env.path(&format!("{i}-{format}.img"));
            env.restore(s(&b, "id"), &out, format);
            assert!(images_equal(&out, &src), "{name} as {format}");
            if format != "raw" {
                check_clean(&out);
            }
        }
    }
}

#[test]
fn restored_images_stay_thin_and_may_grow_but_never_shrink() {
    let env = Env::new();
    let src = fixtures().join("disk.qcow2");
    let b = env.backup(&src, "d");
    let id = s(&b, "id");
    let size = u(&b, "logical_size");
    for format in ["raw", "qcow2", "vmdk", "vmdk-stream"] {
        let out = env.path(&format!("thin.{format}"));
        env.restore(id, &out, format);
        let used = std::fs::metadata(&out).unwrap();
        use std::os::unix::fs::MetadataExt;
        let allocated = used.blocks() * 512;
        assert!(
            allocated < u(&b, "bytes_allocated") + (2 << 20),
            "{format}: {allocated} bytes allocated for {} of data",
            u(&b, "bytes_allocated")
        );
    }
    let grown = env.path("grown.qcow2");
    let bigger = (size + (16 << 20)).to_string();
    env.json(&[
        "restore",
        id,
        "--to",
        grown.to_str().unwrap(),
        "--format",
        "qcow2",
        "--size",
        &bigger,
    ]);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&grown)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(u(&info, "virtual-size"), size + (16 << 20));
    let shrunk = env.path("shrunk.raw");
    let out = env.run(&[
        "restore",
        id,
        "--to",
        shrunk.to_str().unwrap(),
        "--size",
        "1M",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never shrink"));
    assert!(!shrunk.exists());
}

/// A 64 MiB disk: random data in the first 48 MiB, zeros after.
fn source_disk(env: &Env) -> std::path::PathBuf {
    let src = env.path("src.raw");
    write_raw(&src, 64 << 20, 0, &random_bytes(48 << 20, 9));
    src
}

/// Drift `target` (qcow2) with qemu-io: 20 chunks rewritten (one of them only 4 KiB),
/// 6 data chunks zeroed, 5 chunks of the zero area written. 31 of 1,024 chunks (3%).
fn drift(target: &Path) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for k in 0..19u64 {
        args.push("-c".into());
        args.push(format!("write -P 0x5a {} 64k", (k * 37 % 700) * CHUNK));
    }
    args.push("-c".into());
    args.push(format!("write -P 0x33 {} 4k", 710 * CHUNK + 8192));
    for k in 0..6u64 {
        args.push("-c".into());
        args.push(format!("write -z {} 64k", (720 + k * 3) * CHUNK));
    }
    for k in 0..5u64 {
        args.push("-c".into());
        args.push(format!("write -P 0x77 {} 64k", (800 + k * 10) * CHUNK));
    }
    args.push(target.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    sh("qemu-io", &a);
}

#[test]
fn restoring_onto_a_drifted_disk_over_nbd_writes_only_the_drifted_chunks() {
    let env = Env::new();
    let src = source_disk(&env);
    let b = env.backup(&src, "vm-disk");
    let target = env.path("target.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            target.to_str().unwrap(),
        ],
    );
    drift(&target);
    assert!(!images_equal(&target, &src));
    let sock = env.path("nbd.sock");
    let t = target.to_str().unwrap();
    let server = Server::start(
        "qemu-nbd",
        &["-t", "-k", sock.to_str().unwrap(), "-f", "qcow2", t],
        &sock,
    );
    let r = env.json(&["restore", s(&b, "id"), "--to", &server.uri()]);
    assert_eq!(u(&r, "chunks_total"), 1024);
    assert_eq!(u(&r, "chunks_written"), 26, "{r}");
    assert_eq!(u(&r, "bytes_written"), 26 * CHUNK);
    assert_eq!(u(&r, "chunks_zeroed"), 5, "{r}");
    assert_eq!(u(&r, "chunks_same"), 1024 - 31);
    // Again: nothing differs any more.
    let r2 = env.json(&["restore", s(&b, "id"), "--to", &server.uri()]);
    assert_eq!(
        u(&r2, "chunks_written") + u(&r2, "chunks_zeroed"),
        0,
        "{r2}"
    );
    drop(server);
    assert!(images_equal(&target, &src));
}

#[test]
fn with_the_targets_dirty_bitmap_only_marked_chunks_are_rewritten_and_nothing_is_read() {
    let env = Env::new();
    let src = source_disk(&env);
    let b = env.backup(&src, "vm-disk");
    let target = env.path("target.qcow2");
    let t = target.to_str().unwrap();
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            t,
        ],
    );
    sh("qemu-img", &["bitmap", "--add", t, "since-backup"]);
    drift(&target);
    let sock = env.path("nbd.sock");
    let server = Server::start(
        "qemu-nbd",
        &[
            "-t",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "qcow2",
            "-B",
            "since-backup",
            t,
        ],
        &sock,
    );
    let r = env.json(&[
        "restore",
        s(&b, "id"),
        "--to",
        &server.uri(),
        "--target-bitmap",
        "since-backup",
    ]);
    assert_eq!(u(&r, "bytes_compared"), 0);
    assert_eq!(u(&r, "chunks_written"), 26, "{r}");
    assert_eq!(u(&r, "chunks_zeroed"), 5, "{r}");
    drop(server);
    assert!(images_equal(&target, &src));
}

/// `blockvault serve-nbd` in the background; stopped with SIGTERM when dropped.
struct Served {
    child: std::process::Child,
    uri: String,
}

impl Served {
    fn start(env: &Env, backup: &str) -> Served {
        use std::io::BufRead;
        let sock = env.path("serve.sock");
        let mut child = env
            .cmd()
            .args(["serve-nbd", backup, "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("nbd+unix://"), "{line}");
        Served {
            child,
            uri: line.trim().to_string(),
        }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io(args: &[&str]) -> std::process::Output {
    Command::new("qemu-io").args(args).output().unwrap()
}

#[test]
fn serve_nbd_gives_instant_access_to_several_clients_and_skips_holes() {
    let env = Env::new();
    let src = source_disk(&env);
    let b = env.backup(&src, "vm-disk");
    let served = Served::start(&env, s(&b, "id"));
    let uri = served.uri.clone();
    let compares: Vec<_> = (0..3)
        .map(|_| {
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw", &uri])
                .arg(&src)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in compares {
        assert!(c.wait().unwrap().success(), "a concurrent compare failed");
    }
    // The zero tail is reported as a hole: clients do not read it.
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw", &uri])
        .output()
        .unwrap();
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let last = map.as_array().unwrap().last().unwrap().clone();
    assert_eq!(u(&last, "start"), 48 << 20);
    assert_eq!(last["data"], false);
    assert_eq!(last["zero"], true);
    // Read-only: writes are refused.
    let w = qemu_io(&["-f", "raw", "-c", "write 0 4k", &uri]);
    assert!(!w.status.success() || String::from_utf8_lossy(&w.stdout).contains("failed"));
    assert!(served.stop().success());
}

#[test]
fn a_qcow2_overlay_on_a_served_backup_reads_it_and_takes_writes_without_touching_it() {
    let env = Env::new();
    let src = source_disk(&env);
    let b = env.backup(&src, "vm-disk");
    let served = Served::start(&env, s(&b, "id"));
    let overlay = env.path("boot.qcow2");
    let o = overlay.to_str().unwrap();
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &served.uri,
            "-F",
            "raw",
            o,
        ],
    );
    // Reads come from the backup.
    let expect = random_bytes(48 << 20, 9);
    let pattern_at = |off: usize| expect[off];
    let r = qemu_io(&["-c", &format!("read -P {} 4096 1", pattern_at(4096)), o]);
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("read 1/1"),
        "{r:?}"
    );
    // Writes go to the overlay.
    let w = qemu_io(&["-c", "write -P 0x42 1M 1M", "-c", "read -P 0x42 1M 1M", o]);
    assert!(w.status.success());
    assert!(!String::from_utf8_lossy(&w.stdout).contains("Pattern verification failed"));
    // The backup is untouched: the export still equals the source, verify is clean.
    assert!(images_equal(std::path::Path::new(&served.uri), &src));
    drop(served);
    assert!(env.run(&["verify", "--vault", "v"]).status.success());
}

#[test]
fn a_corrupt_chunk_is_an_nbd_error_for_its_range_never_wrong_data() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(2 << 20, 9));
    // One worker: chunk 0 is the first blob of the only pack.
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
    let packs = crate::common::pack_files(&env.vault_dir());
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    bytes[8 + 12 + 1000] ^= 0x01;
    std::fs::write(&packs[0], &bytes).unwrap();
    let served = Served::start(&env, s(&b, "id"));
    let bad = qemu_io(&["-r", "-f", "raw", "-c", "read 0 64k", &served.uri]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(out.contains("Input/output error"), "{out}");
    let good = qemu_io(&["-r", "-f", "raw", "-c", "read 1M 64k", &served.uri]);
    assert!(String::from_utf8_lossy(&good.stdout).contains("read 65536/65536"));
    assert!(!images_equal(std::path::Path::new(&served.uri), &img));
    drop(served);
    assert_eq!(
        std::fs::read(&packs[0]).unwrap(),
        bytes,
        "the vault is untouched"
    );
}

#[test]
fn a_server_backup_exports_as_an_ova_and_as_a_qcow2_set_without_changing_the_backup() {
    let env = Env::new();
    let f = fixtures();
    let (sys, data) = (f.join("disk.qcow2"), f.join("sparse.vmdk"));
    let b = env.json(&[
        "backup",
        &format!("sys={}", sys.display()),
        &format!("data={}", data.display()),
        "--vault",
        "v",
        "--id",
        "web01",
    ]);
    let id = s(&b, "id");
    let before = env.backups();

    let out = env.path("out");
    let r = env.json(&[
        "restore",
        id,
        "--to",
        out.to_str().unwrap(),
        "--image",
        "ova",
    ]);
    let ova = out.join("web01.ova");
    assert_eq!(s(&r, "path"), ova.to_str().unwrap());
    let list = Command::new("tar").arg("-tf").arg(&ova).output().unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        names,
        ["web01.ovf", "web01.mf", "sys.vmdk", "data.vmdk"],
        "OVF first"
    );
    let x = env.path("unpacked");
    std::fs::create_dir(&x).unwrap();
    sh(
        "tar",
        &["-xf", ova.to_str().unwrap(), "-C", x.to_str().unwrap()],
    );
    let ovf = std::fs::read_to_string(x.join("web01.ovf")).unwrap();
    for (i, (disk, src)) in [("sys.vmdk", &sys), ("data.vmdk", &data)]
        .iter()
        .enumerate()
    {
        assert!(
            ovf.contains(&format!("ovf:href=\"{disk}\" ovf:id=\"file{i}\"")),
            "{ovf}"
        );
        assert!(ovf.contains(&format!(
            "ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\"",
            64 << 20
        )));
        assert!(ovf.contains(&format!(
            "<rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>"
        )));
        assert!(images_equal(&x.join(disk), src));
        check_clean(&x.join(disk));
    }
    let mf = Command::new("sha256sum")
        .arg("-c")
        .arg("web01.mf")
        .current_dir(&x)
        .output()
        .unwrap();
    assert!(
        mf.status.success(),
        "{}",
        String::from_utf8_lossy(&mf.stdout)
    );

    let set = env.path("set");
    env.json(&[
        "restore",
        id,
        "--to",
        set.to_str().unwrap(),
        "--image",
        "qcow2-set",
    ]);
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(set.join("server.json")).unwrap()).unwrap();
    assert_eq!(desc["server"], "web01");
    assert_eq!(desc["backup"]["id"], id);
    for (disk, src) in [("sys", &sys), ("data", &data)] {
        let file = set.join(format!("{disk}.qcow2"));
        assert!(images_equal(&file, src));
        check_clean(&file);
        assert!(
            desc["disks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["file"] == format!("{disk}.qcow2"))
        );
    }
    // Exports never overwrite, and the backup is as it was.
    let again = env.run(&[
        "restore",
        id,
        "--to",
        set.to_str().unwrap(),
        "--image",
        "qcow2-set",
    ]);
    assert!(!again.status.success());
    assert_eq!(env.backups(), before);
    assert!(env.run(&["verify", "--vault", "v"]).status.success());
}

#[test]
fn a_disk_whose_size_is_not_whole_sectors_restores_whole_into_every_format_and_an_ova() {
    let env = Env::new();
    // 10 MiB + 100 bytes, data up to the very last byte.
    let odd = env.path("odd.raw");
    let size = (10 << 20) + 100;
    write_raw(&odd, size, size - 4096, &random_bytes(4096, 9));
    write_raw(&odd, size, 0, &random_bytes(CHUNK as usize, 10));
    let b = env.json(&[
        "backup",
        odd.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "odd",
    ]);
    let id = s(&b, "id");
    for format in ["raw", "qcow2", "vmdk", "vmdk-stream"] {
        let to = env.path(&format!("odd-{format}.img"));
        env.restore(id, &to, format);
        if format != "raw" {
            check_clean(&to);
        }
        // Whole sectors: the image may be rounded up to 512, never down.
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&to)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let vsize = v["virtual-size"].as_u64().unwrap();
        assert!(vsize >= size && vsize - size < 512, "{format}: {vsize}");
        assert!(images_equal(&odd, &to), "{format} differs from the source");
    }
    // The same disk in a server's OVA.
    let srv = env.json(&[
        "backup",
        &format!("odd={}", odd.display()),
        &format!("sys={}", fixtures().join("disk.qcow2").display()),
        "--vault",
        "v",
        "--id",
        "srv",
    ]);
    let out = env.path("ova");
    env.json(&[
        "restore",
        s(&srv, "id"),
        "--to",
        out.to_str().unwrap(),
        "--image",
        "ova",
    ]);
    let x = env.path("unpacked");
    std::fs::create_dir(&x).unwrap();
    let ova = out.join("srv.ova");
    sh(
        "tar",
        &["-xf", ova.to_str().unwrap(), "-C", x.to_str().unwrap()],
    );
    assert!(images_equal(&odd, &x.join("odd.vmdk")));
    let ovf = std::fs::read_to_string(x.join("srv.ovf")).unwrap();
    assert!(ovf.contains(&format!("ovf:capacity=\"{}\"", size.next_multiple_of(512))));
}

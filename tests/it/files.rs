//! File-level restore: ext4 file systems made with `mke2fs -d` from a real tree, placed
//! in GPT and MBR partitions (written with `sfdisk`), backed up, then listed and copied
//! back with `files` — read from the backup's chunks, nothing mounted.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::*;
use crate::files_hostile::corrupt_chunk_at;

/// A tree with what file-level restore must keep: modes, owners, nanosecond mtimes,
/// a sparse file, hard links, relative and absolute symlinks, 40 levels of directories,
/// non-ASCII names, a FIFO (skipped) and a 1 MiB random file.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("data")).unwrap();
    fs::create_dir_all(root.join("grüße")).unwrap();
    fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    fs::write(root.join("data/random.bin"), random_bytes(1 << 20, 7)).unwrap();
    fs::write(
        root.join("grüße/日本語 ファイル.txt"),
        "日本\n".repeat(1000),
    )
    .unwrap();
    fs::write(root.join("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("data"), fs::Permissions::from_mode(0o751)).unwrap();
    // Sparse: 20 MiB with 12 KiB of data at 5 MiB and the last byte set.
    write_raw(
        &root.join("sparse.img"),
        20 << 20,
        5 << 20,
        &random_bytes(12288, 3),
    );
    write_raw(&root.join("sparse.img"), 20 << 20, (20 << 20) - 1, b"z");
    fs::hard_link(root.join("hello.txt"), root.join("hardlink.txt")).unwrap();
    std::os::unix::fs::symlink("hello.txt", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/data/random.bin", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom.txt"), b"the bottom\n").unwrap();
    // A third name for the random file, 40 levels down.
    fs::hard_link(root.join("data/random.bin"), deep.join("random-again.bin")).unwrap();
    sh("mkfifo", &[root.join("fifo").to_str().unwrap()]);
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(root.join("hello.txt"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(root.join("rel-link"), Some(42), Some(43)).unwrap();
        std::os::unix::fs::chown(root.join("grüße"), Some(1000), Some(1000)).unwrap();
    }
    // Nanosecond mtimes (last: directories, after their contents).
    for (p, t) in [
        ("data/random.bin", "2020-02-03 04:05:06.123456789"),
        ("hello.txt", "2019-01-01 00:00:01.5"),
        ("data", "2018-07-08 09:10:11.987654321"),
        ("grüße", "2021-12-31 23:59:59.000000001"),
    ] {
        sh("touch", &["-m", "-d", t, root.join(p).to_str().unwrap()]);
    }
    sh(
        "touch",
        &[
            "-h",
            "-m",
            "-d",
            "2017-05-05 05:05:05.5",
            root.join("rel-link").to_str().unwrap(),
        ],
    );
}

/// `mke2fs -t ext4 -d tree` into a new image of `mib` MiB (4 KiB blocks, 256-byte
/// inodes: nanosecond times).
pub(crate) fn mkfs(tree: &Path, img: &Path, mib: u64, extra: &[&str]) {
    let size = format!("{mib}M");
    let mut args = vec!["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-d", tree.to_str().unwrap(), img.to_str().unwrap(), &size]);
    sh("mke2fs", &args);
}

/// A disk of `mib` MiB with the partition table `script` (sfdisk) and `fs` copied at
/// byte offset `at`.
pub(crate) fn disk_with(disk: &Path, mib: u64, script: &str, fs_img: &Path, at: u64) {
    write_raw(disk, mib << 20, 0, &[0]);
    let mut c = Command::new("sfdisk")
        .args(["-q", disk.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk");
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk failed");
    let bytes = fs::read(fs_img).unwrap();
    write_raw(disk, mib << 20, at, &bytes);
}

pub(crate) fn hash(p: &Path) -> blake3::Hash {
    blake3::hash(&fs::read(p).unwrap())
}

/// Every entry of `src` (but FIFOs) is in `out` with the same kind, content hash, mode,
/// mtime, symlink target and, as root, owner; `out` holds nothing else but
/// `lost+found`. Returns how many entries were compared.
fn assert_same_tree(src: &Path, out: &Path) -> usize {
    let root = nix::unistd::geteuid().is_root();
    let mut n = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let s = src.join(&rel);
        let o = out.join(&rel);
        let sm = fs::symlink_metadata(&s).unwrap();
        if sm.file_type().is_fifo_like() {
            assert!(fs::symlink_metadata(&o).is_err(), "{rel:?}: FIFO restored");
            continue;
        }
        let om = fs::symlink_metadata(&o).unwrap_or_else(|e| panic!("{rel:?} missing: {e}"));
        assert_eq!(sm.file_type(), om.file_type(), "{rel:?}: kind differs");
        if !sm.file_type().is_symlink() {
            assert_eq!(sm.mode() & 0o7777, om.mode() & 0o7777, "{rel:?}: mode");
        }
        if rel != Path::new("") {
            // mke2fs -d keeps seconds only (nanoseconds: see the GPT test).
            assert_eq!(sm.mtime(), om.mtime(), "{rel:?}: mtime");
        }
        if root {
            assert_eq!((sm.uid(), sm.gid()), (om.uid(), om.gid()), "{rel:?}: owner");
        }
        if sm.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&s).unwrap(),
                fs::read_link(&o).unwrap(),
                "{rel:?}: target"
            );
        } else if sm.is_file() {
            assert_eq!(sm.len(), om.len(), "{rel:?}: size");
            assert_eq!(hash(&s), hash(&o), "{rel:?}: content");
        } else {
            let mut names: Vec<_> = fs::read_dir(&o)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| rel != Path::new("") || n != "lost+found")
                .collect();
            names.sort();
            let mut want: Vec<_> = fs::read_dir(&s)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| !e.file_type().unwrap().is_fifo_like())
                .map(|e| e.file_name())
                .collect();
            want.sort();
            assert_eq!(names, want, "{rel:?}: entries");
            for e in fs::read_dir(&s).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        n += 1;
    }
    n
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

pub(crate) fn files(env: &Env, disk: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["files", "latest", "--disk", disk];
    a.extend_from_slice(args);
    env.run(&a)
}

pub(crate) fn files_json(env: &Env, disk: &str, args: &[&str]) -> Value {
    let mut a = vec!["files", "latest", "--disk", disk];
    a.extend_from_slice(args);
    env.json(&a)
}

#[test]
fn every_file_of_an_ext4_tree_in_a_gpt_partition_comes_back_equal() {
    let env = Env::new();
    let tree = env.path("tree");
    make_tree(&tree);
    let fs_img = env.path("fs.img");
    mkfs(&tree, &fs_img, 64, &[]);
    // mke2fs -d drops nanoseconds: give one inode an mtime of …06.123456789 (the extra
    // field holds nanoseconds << 2).
    sh(
        "debugfs",
        &[
            "-w",
            "-R",
            "sif /data/random.bin mtime_extra 493827156",
            fs_img.to_str().unwrap(),
        ],
    );
    let disk = env.path("disk.raw");
    disk_with(
        &disk,
        100,
        "label: gpt\nstart=2048, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n",
        &fs_img,
        2048 * 512,
    );
    let disk_hash = hash(&disk);
    env.backup(&disk, "gpt");

    let p = files_json(&env, "gpt", &["partitions"]);
    assert_eq!(p["scheme"], "gpt");
    let parts = p["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{p}");
    assert_eq!(parts[0]["number"], 1);
    assert_eq!(parts[0]["start"], 1 << 20);
    assert_eq!(parts[0]["size"], 64 << 20);
    assert_eq!(parts[0]["fs"], "ext4");
    assert_eq!(parts[0]["name"], "root");
    assert_eq!(parts[0]["supported"], true);

    // ls: the names of the tree (plus lost+found), symlink targets, sizes, modes.
    let ls = files_json(&env, "gpt", &["ls", "/"]);
    let entries: BTreeMap<String, Value> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    let mut want: Vec<String> = fs::read_dir(&tree)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    want.push("lost+found".into());
    want.sort();
    assert_eq!(entries.keys().cloned().collect::<Vec<_>>(), want);
    assert_eq!(entries["rel-link"]["kind"], "symlink");
    assert_eq!(entries["rel-link"]["target"], "hello.txt");
    assert_eq!(entries["abs-link"]["target"], "/data/random.bin");
    assert_eq!(entries["sparse.img"]["size"], 20 << 20);
    assert_eq!(entries["script.sh"]["mode"], 0o4755);
    assert_eq!(entries["data"]["kind"], "dir");
    assert_eq!(entries["fifo"]["kind"], "special");
    let long = files(&env, "gpt", &["ls", "/grüße", "--long"]);
    assert!(long.status.success());
    let text = String::from_utf8_lossy(&long.stdout);
    assert!(
        text.contains("日本語 ファイル.txt") && text.starts_with("-rw-"),
        "{text}"
    );
    let link = files(&env, "gpt", &["ls", "/rel-link", "-l"]);
    assert!(String::from_utf8_lossy(&link.stdout).contains("rel-link -> hello.txt"));

    // get /: every file equals the original.
    let out = env.path("out");
    let r = files_json(&env, "gpt", &["get", "/", "--to", out.to_str().unwrap()]);
    assert!(r["failed"].as_array().unwrap().is_empty(), "{r}");
    let skipped = r["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{r}");
    assert_eq!(skipped[0]["path"], "/fifo");
    // atime as the backup holds it (checked before anything reads the copy).
    let hello = &entries["hello.txt"];
    let m = fs::metadata(out.join("hello.txt")).unwrap();
    assert_eq!(
        (m.atime(), m.atime_nsec()),
        (
            hello["atime"].as_i64().unwrap(),
            hello["atime_nsec"].as_i64().unwrap()
        )
    );
    let n = assert_same_tree(&tree, &out);
    assert!(n >= 50, "compared {n} entries");
    assert_eq!(u(&r, "symlinks"), 3);
    let m = fs::metadata(out.join("data/random.bin")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1580702706, 123456789));
    // Sparse stays sparse; hard links come back as links: one inode, its link count.
    let sp = fs::metadata(out.join("sparse.img")).unwrap();
    assert_eq!(sp.len(), 20 << 20);
    assert!(
        sp.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        sp.blocks() * 512
    );
    assert_eq!(
        hash(&out.join("hardlink.txt")),
        hash(&out.join("hello.txt"))
    );
    let ino = |p: &str| {
        let m = fs::metadata(out.join(p)).unwrap();
        (m.ino(), m.nlink())
    };
    let deep_copy = (0..40).fold(String::from("deep"), |p, i| format!("{p}/level{i}"));
    let (hello, hello_links) = ino("hello.txt");
    assert_eq!(
        ino("hardlink.txt"),
        (hello, 2),
        "hello.txt and hardlink.txt"
    );
    assert_eq!(hello_links, 2);
    let (random, random_links) = ino("data/random.bin");
    assert_eq!(
        ino(&format!("{deep_copy}/random-again.bin")),
        (random, 2),
        "data/random.bin and its name 40 levels down are one inode"
    );
    assert_eq!(random_links, 2);
    assert_eq!(u(&r, "links"), 2, "{r}");
    assert_eq!(ino("script.sh").1, 1);
    // ls shows the inode number and link count.
    assert_eq!(entries["hello.txt"]["nlink"], 2);
    assert_eq!(entries["hello.txt"]["ino"], entries["hardlink.txt"]["ino"]);
    assert_ne!(entries["hello.txt"]["ino"], entries["script.sh"]["ino"]);
    // One file into an existing directory; the source disk was never written.
    let one = env.path("one");
    fs::create_dir(&one).unwrap();
    env.ok(&[
        "files",
        "latest",
        "--disk",
        "gpt",
        "get",
        "/data/random.bin",
        "--to",
        one.to_str().unwrap(),
    ]);
    assert_eq!(
        hash(&one.join("random.bin")),
        hash(&tree.join("data/random.bin"))
    );
    assert_eq!(hash(&disk), disk_hash);
}

#[test]
fn an_ext4_in_a_logical_mbr_partition_and_on_a_whole_disk_are_read_too() {
    let env = Env::new();
    let tree = env.path("tree");
    make_tree(&tree);
    let fs_img = env.path("fs.img");
    mkfs(&tree, &fs_img, 48, &[]);
    // Primary 1 (empty), extended 2, logical 5 holding the file system.
    let disk = env.path("mbr.raw");
    disk_with(
        &disk,
        80,
        "label: dos\nstart=2048, size=8192, type=83\nstart=12288, size=149504, type=5\nstart=14336, size=98304, type=83\n",
        &fs_img,
        14336 * 512,
    );
    env.backup(&disk, "mbr");
    let p = files_json(&env, "mbr", &["partitions"]);
    assert_eq!(p["scheme"], "mbr");
    let nums: Vec<(u64, String)> = p["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (u(x, "number"), s(x, "fs").to_string()))
        .collect();
    assert_eq!(
        nums,
        vec![(1, "unknown".to_string()), (5, "ext4".to_string())],
        "{p}"
    );
    // The only readable partition is picked; --partition 5 names it, 1 is refused.
    let into = env.path("into");
    fs::create_dir(&into).unwrap();
    let r = files_json(
        &env,
        "mbr",
        &[
            "--partition",
            "5",
            "get",
            "/grüße",
            "--to",
            into.to_str().unwrap(),
        ],
    );
    assert_eq!(u(&r, "files"), 1);
    assert_same_tree(&tree.join("grüße"), &into.join("grüße"));
    let ls = files(&env, "mbr", &["ls", "/deep"]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout), "level0/\n");
    let bad = files(&env, "mbr", &["--partition", "1", "ls", "/"]);
    assert_eq!(bad.status.code(), Some(6), "unsupported: exit 6");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no known file system"));

    // A file system on the whole disk (no table).
    env.backup(&fs_img, "whole");
    let p = files_json(&env, "whole", &["partitions"]);
    assert_eq!(p["scheme"], "none");
    assert_eq!(p["partitions"][0]["number"], 0);
    assert_eq!(p["partitions"][0]["fs"], "ext4");
    let out = env.path("whole-out");
    files_json(&env, "whole", &["get", "/", "--to", out.to_str().unwrap()]);
    assert_same_tree(&tree, &out);
}

#[test]
fn get_never_overwrites_and_lvm_is_refused_clearly() {
    let env = Env::new();
    let tree = env.path("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("a.txt"), b"from the backup").unwrap();
    let fs_img = env.path("fs.img");
    mkfs(&tree, &fs_img, 8, &[]);
    env.backup(&fs_img, "small");
    let dest = env.path("a.txt");
    fs::write(&dest, b"mine").unwrap();
    for to in [&dest, &env.dir.path().to_path_buf()] {
        let r = files(
            &env,
            "small",
            &["get", "/a.txt", "--to", to.to_str().unwrap()],
        );
        assert_eq!(r.status.code(), Some(4), "conflict: exit 4");
        assert!(String::from_utf8_lossy(&r.stderr).contains("already exists"));
    }
    assert_eq!(fs::read(&dest).unwrap(), b"mine", "nothing was written");
    let r = files(&env, "small", &["ls", "/nope"]);
    assert_eq!(r.status.code(), Some(3));
    let r = files(&env, "small", &["ls", "relative"]);
    assert_eq!(r.status.code(), Some(2));

    // An LVM2 physical volume in partition 1.
    let disk = env.path("lvm.raw");
    let mut label = vec![0u8; 512];
    label[..8].copy_from_slice(b"LABELONE");
    label[24..32].copy_from_slice(b"LVM2 001");
    let label_file = env.path("label");
    fs::write(&label_file, &label).unwrap();
    disk_with(
        &disk,
        16,
        "label: gpt\nstart=2048, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n",
        &label_file,
        2048 * 512 + 512,
    );
    env.backup(&disk, "lvm");
    let p = files_json(&env, "lvm", &["partitions"]);
    assert_eq!(p["partitions"][0]["fs"], "lvm2", "{p}");
    let r = files(&env, "lvm", &["ls", "/"]);
    assert_eq!(r.status.code(), Some(6));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("LVM is not supported"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// The pack bytes of the chunk at `disk_offset` of `disk` (raw, stored uncompressed:
/// random data) flipped in the vault.
#[test]
fn the_api_lists_a_directory_and_streams_a_file_to_operators_only() {
    use crate::appliance::{Appliance, token};
    let env = Env::new();
    let tree = env.path("tree");
    make_tree(&tree);
    let fs_img = env.path("fs.img");
    mkfs(&tree, &fs_img, 64, &[]);
    let disk = env.path("disk.raw");
    disk_with(
        &disk,
        80,
        "label: gpt\nstart=2048, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        &fs_img,
        2048 * 512,
    );
    let b = env.backup(&disk, "api");
    let id = s(&b, "id").to_string();
    let op = token(&env, "operator", "ops");
    let aud = token(&env, "auditor", "watcher");
    let srv = Appliance::start(&env, &[]);

    let list = format!("/backups/{id}/files?path=/data");
    let v = srv.ok("GET", &list, &op, None, 200);
    assert_eq!(v["scheme"], "gpt");
    assert_eq!(v["partitions"][0]["fs"], "ext4");
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["random.bin"]);
    assert_eq!(v["entries"][0]["size"], 1 << 20);
    let (s403, _) = srv.call("GET", &list, Some(&aud), None);
    assert_eq!(s403, 403, "auditors do not read data");
    let (s404, _) = srv.call(
        "GET",
        &format!("/backups/{id}/files?path=/nope"),
        Some(&op),
        None,
    );
    assert_eq!(s404, 404);

    // The content, byte for byte; a non-ASCII path percent-encoded.
    let try_get = |path: &str, tok: &str| {
        let url = format!(
            "{}/api/v1/backups/{id}/files/content?path={}",
            srv.url,
            percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC)
        );
        crate::appliance::agent_for(srv.fingerprint.as_deref())
            .get(&url)
            .header("Authorization", format!("Bearer {tok}"))
            .call()
    };
    let get = |path: &str, tok: &str| try_get(path, tok).unwrap();
    let mut r = get("/data/random.bin", &op);
    assert_eq!(r.status().as_u16(), 200);
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    assert_eq!(blake3::hash(&body), hash(&tree.join("data/random.bin")));
    let mut r = get("/grüße/日本語 ファイル.txt", &op);
    let body = r.body_mut().read_to_vec().unwrap();
    assert_eq!(
        body,
        fs::read(tree.join("grüße/日本語 ファイル.txt")).unwrap()
    );
    let mut r = get("/sparse.img", &op);
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    assert_eq!(blake3::hash(&body), hash(&tree.join("sparse.img")));
    assert_eq!(get("/data/random.bin", &aud).status().as_u16(), 403);
    assert_eq!(
        get("/data", &op).status().as_u16(),
        400,
        "a directory has no content"
    );

    // The CLI with --server: partitions and ls through the API.
    let remote = |args: &[&str]| {
        let out = env
            .cmd()
            .envs(crate::appliance::trust_env(&srv.url))
            .args(["--server", &srv.url, "--token", &op, "--json", "files", &id])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    assert_eq!(remote(&["partitions"])["partitions"][0]["fs"], "ext4");
    assert_eq!(
        remote(&["ls", "/grüße"])["entries"][0]["name"],
        "日本語 ファイル.txt"
    );

    // A chunk of random.bin damaged in the vault: the stream breaks off, it never
    // delivers a whole body of wrong bytes.
    let out = Command::new("debugfs")
        .args(["-R", "bmap /data/random.bin 128", fs_img.to_str().unwrap()])
        .output()
        .unwrap();
    let block: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    corrupt_chunk_at(&env.vault_dir(), &disk, (1 << 20) + block * 4096);
    // In the first MiB: an error answer naming the chunk (later: a short body).
    let (status, v) = srv.call(
        "GET",
        &format!("/backups/{id}/files/content?path=/data/random.bin"),
        Some(&op),
        None,
    );
    assert_eq!(status, 500, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("/data/random.bin") && msg.contains("digest"),
        "{msg}"
    );
    assert!(srv.stop());
}

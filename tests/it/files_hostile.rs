//! File-level restore from damaged or hostile ext4 images: a corrupt chunk fails only the
//! files in it; fuzzed superblocks, inodes and directory loops give errors, never a panic
//! or a hang.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

use crate::files::{files, hash, mkfs};

pub(crate) fn corrupt_chunk_at(vault: &Path, disk: &Path, disk_offset: u64) {
    let bytes = fs::read(disk).unwrap();
    let slot = (disk_offset / 65536) as usize;
    let chunk = &bytes[slot * 65536..(slot + 1) * 65536];
    let probe = &chunk[30000..30064];
    for p in pack_files(vault) {
        let mut pack = fs::read(&p).unwrap();
        if let Some(at) = pack.windows(64).position(|w| w == probe) {
            pack[at + 32] ^= 0xff;
            fs::write(&p, &pack).unwrap();
            return;
        }
    }
    panic!("the chunk at disk offset {disk_offset} is not stored raw in any pack");
}

#[test]
fn a_corrupt_chunk_fails_only_the_files_in_it_with_a_clear_error() {
    let env = Env::new();
    let tree = env.path("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("a-before.txt"), b"before\n".repeat(100)).unwrap();
    fs::write(tree.join("big.bin"), random_bytes(2 << 20, 11)).unwrap();
    fs::write(tree.join("sub/z-after.txt"), b"after\n".repeat(100)).unwrap();
    fs::write(tree.join("sub/other.bin"), random_bytes(300_000, 12)).unwrap();
    let fs_img = env.path("fs.img");
    mkfs(&tree, &fs_img, 32, &[]);
    // Where big.bin's block 256 (1 MiB into it) lies in the file system.
    let out = Command::new("debugfs")
        .args(["-R", "bmap /big.bin 256", fs_img.to_str().unwrap()])
        .output()
        .unwrap();
    let block: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("debugfs bmap");
    env.backup(&fs_img, "c");
    corrupt_chunk_at(&env.vault_dir(), &fs_img, block * 4096);

    // The file alone: a clear error naming it and the chunk; nothing left at DEST.
    let dest = env.path("big.bin");
    let r = files(
        &env,
        "c",
        &["get", "/big.bin", "--to", dest.to_str().unwrap()],
    );
    assert_eq!(r.status.code(), Some(5), "corrupt: exit 5");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("/big.bin") && err.contains("chunk"), "{err}");
    assert!(!dest.exists(), "no partial file left");

    // The whole tree: big.bin fails, every other file comes back equal.
    let all = env.path("all");
    let r = env.run(&[
        "--json",
        "files",
        "latest",
        "--disk",
        "c",
        "get",
        "/",
        "--to",
        all.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(5));
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    let failed = v["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{v}");
    assert_eq!(failed[0]["path"], "/big.bin");
    assert_eq!(failed[0]["kind"], "corrupt");
    assert!(!all.join("big.bin").exists());
    for f in ["a-before.txt", "sub/z-after.txt", "sub/other.bin"] {
        assert_eq!(hash(&all.join(f)), hash(&tree.join(f)), "{f}");
    }
}

/// Run `files` with a deadline; returns (exit code, stderr). A hang fails the test.
pub(crate) fn bounded(env: &Env, args: &[&str], deadline: Duration) -> (Option<i32>, String) {
    let mut child = env
        .cmd()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code(), err);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("blockvault {args:?} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fuzzed_superblocks_inodes_and_directory_loops_give_errors_not_panics_or_hangs() {
    let env = Env::new();
    let tree = env.path("tree");
    fs::create_dir_all(tree.join("d1/d2")).unwrap();
    for i in 0..20 {
        fs::write(
            tree.join(format!("d1/f{i}")),
            random_bytes(5000 * i, i as u64),
        )
        .unwrap();
    }
    fs::write(tree.join("d1/d2/x"), b"x").unwrap();
    std::os::unix::fs::symlink("d1/d2/x", tree.join("l")).unwrap();
    let base = env.path("base.img");
    // Without metadata checksums, so that flipped bytes reach the parsers.
    mkfs(&tree, &base, 8, &["-O", "^metadata_csum"]);
    let dump = Command::new("dumpe2fs").arg(&base).output().unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    let itable: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Inode table at "))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .expect("inode table block");
    let clean = fs::read(&base).unwrap();
    // Regions: superblock, group descriptors, the first inodes (root, files, dirs).
    let regions = [(1024u64, 1024u64), (4096, 64), (itable * 4096, 256 * 24)];
    let mut failures = 0;
    for seed in 0..24u64 {
        let mut img = clean.clone();
        let (start, len) = regions[(seed % 3) as usize];
        let r = random_bytes(64, seed + 100);
        for k in 0..8 {
            let at = start + u64::from_le_bytes(r[k * 8..k * 8 + 8].try_into().unwrap()) % len;
            img[at as usize] ^= r[k].max(1);
        }
        let p = env.path(&format!("fuzz{seed}.img"));
        fs::write(&p, &img).unwrap();
        let id = format!("fz{seed}");
        env.backup(&p, &id);
        let out = env.path(&format!("out{seed}"));
        for args in [
            vec!["ls", "/d1"],
            vec!["get", "/", "--to", out.to_str().unwrap()],
        ] {
            let mut a = vec!["files", "latest", "--disk", &id];
            a.extend(args.iter().copied());
            let (code, err) = bounded(&env, &a, Duration::from_secs(60));
            assert!(!err.contains("panicked"), "seed {seed} {a:?}: {err}");
            assert!(
                matches!(code, Some(0 | 1 | 2 | 3 | 5 | 6 | 7 | 8)),
                "seed {seed} {a:?}: exit {code:?}: {err}"
            );
            if code != Some(0) {
                failures += 1;
                assert!(err.contains("error"), "seed {seed}: {err}");
            }
        }
    }
    assert!(failures > 0, "no flip was noticed at all");

    // Directory loops: /a/b/up and /a/b/up2 are hard links to /a.
    let ltree = env.path("ltree");
    fs::create_dir_all(ltree.join("a/b")).unwrap();
    fs::write(ltree.join("a/b/f"), b"f").unwrap();
    let limg = env.path("loop.img");
    mkfs(&ltree, &limg, 8, &[]);
    for l in ["up", "up2"] {
        sh(
            "debugfs",
            &[
                "-w",
                "-R",
                &format!("ln /a /a/b/{l}"),
                limg.to_str().unwrap(),
            ],
        );
    }
    env.backup(&limg, "loop");
    let out = env.path("loop-out");
    let (code, err) = bounded(
        &env,
        &[
            "files",
            "latest",
            "--disk",
            "loop",
            "get",
            "/",
            "--to",
            out.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("loop") || err.contains("same directory"),
        "{err}"
    );
    assert_eq!(fs::read(out.join("a/b/f")).unwrap(), b"f");
}

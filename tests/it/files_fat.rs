//! File-level restore from FAT file systems (made with mkfs.vfat and mtools, never
//! mounted) in GPT and MBR partitions: long and non-ASCII names, subdirectories, sizes,
//! times and the read-only attribute come back; hostile boot sectors and FAT chains end
//! in errors, not panics or hangs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::files::{disk_with, files_json};
use crate::files_hostile::bounded;

/// mtools and mkfs.vfat with the clock in UTC (FAT stores local time).
fn mtool(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files the FAT gets: name → (bytes, mtime).
fn tree() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("readme.txt", b"hello from a FAT volume\n".to_vec()),
        (
            "A Long File Name With Spaces.document",
            random_bytes(70_000, 3),
        ),
        (
            "grüße-Ünïcödé.txt",
            "non-ASCII name, UTF-8 content: ☃\n".into(),
        ),
        ("sub/deeper/big.bin", random_bytes(3 << 20, 4)),
        ("sub/empty.dat", Vec::new()),
        ("sub/ro.txt", b"read-only\n".to_vec()),
    ]
}

/// A FAT image of `mib` MiB (`fat_bits` 12/16/32) holding [`tree`], mtimes set to
/// 2024-05-06 07:08:(10 + 2i) UTC and `sub/ro.txt` read-only.
pub(crate) fn make_fat(env: &Env, img: &Path, mib: u64, fat_bits: &str) {
    let _ = fs::remove_file(img);
    mtool(
        "mkfs.vfat",
        &[
            "-C",
            "-F",
            fat_bits,
            "-n",
            "BVTEST",
            img.to_str().unwrap(),
            &(mib * 1024).to_string(),
        ],
    );
    let i = img.to_str().unwrap();
    mtool("mmd", &["-i", i, "::/sub", "::/sub/deeper"]);
    let src = env.path("fat-src");
    let _ = fs::remove_dir_all(&src);
    for (n, (name, bytes)) in tree().into_iter().enumerate() {
        let p = src.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &bytes).unwrap();
        let t = filetime(n);
        sh("touch", &["-d", &format!("@{t}"), p.to_str().unwrap()]);
        mtool(
            "mcopy",
            &["-m", "-i", i, p.to_str().unwrap(), &format!("::/{name}")],
        );
    }
    mtool("mattrib", &["-i", i, "+r", "::/sub/ro.txt"]);
}

/// The mtime given to the `n`th file of [`tree`] (even seconds: FAT keeps 2 s).
fn filetime(n: usize) -> i64 {
    1_714_979_290 + 2 * n as i64
}

pub(crate) fn check_tree(out: &Path) {
    for (n, (name, bytes)) in tree().into_iter().enumerate() {
        let p = out.join(name);
        assert_eq!(fs::read(&p).unwrap(), bytes, "{name}");
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.mtime(), filetime(n), "mtime of {name}");
        let mode = m.permissions().mode() & 0o777;
        assert_eq!(
            mode,
            if name.ends_with("ro.txt") {
                0o444
            } else {
                0o644
            },
            "{name}"
        );
    }
}

#[test]
fn every_file_of_a_fat32_in_gpt_and_a_fat16_in_mbr_comes_back_equal() {
    let env = Env::new();
    for (label, bits, mib, script, start) in [
        (
            "gpt",
            "32",
            40,
            "label: gpt\nstart=2048, size=81920, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
            2048u64,
        ),
        (
            "mbr",
            "16",
            24,
            "label: dos\nstart=4096, size=49152, type=6\n",
            4096,
        ),
    ] {
        let img = env.path(&format!("{label}.fat"));
        make_fat(&env, &img, mib, bits);
        let disk = env.path(&format!("{label}.raw"));
        disk_with(&disk, mib + 8, script, &img, start * 512);
        env.backup(&disk, label);
        let p = files_json(&env, label, &["partitions"]);
        assert_eq!(p["scheme"], label, "{p}");
        assert_eq!(p["partitions"][0]["fs"], "fat", "{p}");
        assert_eq!(p["partitions"][0]["supported"], true, "{p}");

        let ls = files_json(&env, label, &["ls", "/"]);
        let names: BTreeMap<String, String> = ls["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (s(e, "name").to_string(), s(e, "kind").to_string()))
            .collect();
        let want: Vec<&str> = vec![
            "A Long File Name With Spaces.document",
            "grüße-Ünïcödé.txt",
            "readme.txt",
            "sub",
        ];
        assert_eq!(
            names.keys().map(String::as_str).collect::<Vec<_>>(),
            want,
            "{ls}"
        );
        assert_eq!(names["sub"], "dir");
        let deeper = files_json(&env, label, &["ls", "/sub/deeper"]);
        assert_eq!(deeper["entries"][0]["name"], "big.bin", "{deeper}");
        assert_eq!(deeper["entries"][0]["size"], 3 << 20, "{deeper}");

        // One file, then the whole tree.
        let one = env.path(&format!("{label}-one"));
        files_json(
            &env,
            label,
            &["get", "/sub/deeper/big.bin", "--to", one.to_str().unwrap()],
        );
        assert_eq!(fs::read(&one).unwrap(), random_bytes(3 << 20, 4));
        let out = env.path(&format!("{label}-out"));
        files_json(&env, label, &["get", "/", "--to", out.to_str().unwrap()]);
        check_tree(&out);
    }
}

#[test]
fn hostile_fat_boot_sectors_and_looping_chains_give_errors_not_panics_or_hangs() {
    let env = Env::new();
    let img = env.path("good.fat");
    make_fat(&env, &img, 16, "16");
    let good = fs::read(&img).unwrap();
    // FAT16, 512-byte sectors: reserved sectors at 14, FAT count at 16, sectors per FAT
    // at 22; the first FAT follows the reserved sectors.
    let reserved = u16::from_le_bytes([good[14], good[15]]) as usize;
    let fat = reserved * 512;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for (what, off, val) in [
        ("zero bytes per sector", 11usize, 0u8),
        ("zero sectors per cluster", 13, 0),
        ("zero FATs", 16, 0),
        ("huge root entry count", 17, 0xff),
    ] {
        let mut b = good.clone();
        b[off] = val;
        if off == 17 {
            b[18] = 0xff;
        }
        cases.push((what, b));
    }
    // Every cluster of the FAT points at cluster 2: the root's subdirectory and every
    // file chain loop.
    let mut looping = good.clone();
    for c in 2..4096usize {
        let at = fat + 2 * c;
        looping[at..at + 2].copy_from_slice(&2u16.to_le_bytes());
    }
    cases.push(("looping FAT chains", looping));
    for i in 0..6u64 {
        let mut b = good.clone();
        let noise = random_bytes(512, i + 1);
        let at = if i % 2 == 0 { 0 } else { fat };
        for (j, x) in noise.iter().enumerate().step_by(3) {
            b[at + j] ^= x;
        }
        cases.push(("fuzzed", b));
    }
    for (n, (what, bytes)) in cases.into_iter().enumerate() {
        let fat_img = env.path(&format!("bad{n}.fat"));
        fs::write(&fat_img, &bytes).unwrap();
        let id = format!("bad{n}");
        env.backup(&fat_img, &id);
        for args in [vec!["ls", "/sub"], vec!["get", "/", "--to"]] {
            let out = env.path(&format!("out{n}-{}", args[0]));
            let mut a = vec!["files", "latest", "--disk", id.as_str()];
            a.extend(args.iter().copied());
            let o = out.to_str().unwrap().to_string();
            if args[0] == "get" {
                a.push(&o);
            }
            let (code, err) = bounded(&env, &a, Duration::from_secs(60));
            assert!(!err.contains("panicked"), "{what}: {err}");
            assert_ne!(code, Some(101), "{what}: {err}");
            assert!(code.is_some(), "{what}: killed by a signal: {err}");
        }
    }
}

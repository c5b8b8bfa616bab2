//! File-level restore from NTFS (made with mkntfs and ntfscp, never mounted) in a GPT
//! partition: long and non-ASCII names, sizes, bytes and modification times come back;
//! hostile boot sectors and MFT records end in errors, not panics or hangs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::files::{disk_with, files_json};
use crate::files_hostile::bounded;

fn tool(t: &str, args: &[&str]) {
    let out = Command::new(t)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{t}: {e}"));
    assert!(
        out.status.success(),
        "{t} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files the NTFS gets, with their mtimes.
fn tree() -> Vec<(&'static str, Vec<u8>, i64)> {
    vec![
        ("readme.txt", b"hello from NTFS\n".to_vec(), 1_714_979_290),
        (
            "A Long File Name With Spaces.document",
            random_bytes(3 << 20, 8),
            1_700_000_001,
        ),
        ("grüße-Ünïcödé.txt", "☃ non-ASCII\n".into(), 1_600_000_000),
        ("empty.dat", Vec::new(), 1_650_000_000),
    ]
}

fn make_ntfs(env: &Env, img: &Path, mib: u64) {
    write_raw(img, mib << 20, 0, &[0]);
    tool(
        "mkntfs",
        &["-q", "-F", "-f", "-L", "BVTEST", img.to_str().unwrap()],
    );
    let src = env.path("ntfs-src");
    fs::create_dir_all(&src).unwrap();
    for (name, bytes, t) in tree() {
        let p = src.join(name);
        fs::write(&p, &bytes).unwrap();
        sh("touch", &["-d", &format!("@{t}"), p.to_str().unwrap()]);
        tool(
            "ntfscp",
            &["-q", "-t", img.to_str().unwrap(), p.to_str().unwrap(), name],
        );
    }
}

#[test]
fn every_file_of_an_ntfs_in_a_gpt_partition_comes_back_equal() {
    let env = Env::new();
    let img = env.path("vol.ntfs");
    make_ntfs(&env, &img, 24);
    let disk = env.path("disk.raw");
    disk_with(
        &disk,
        32,
        "label: gpt\nstart=2048, size=49152, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
        &img,
        2048 * 512,
    );
    env.backup(&disk, "win");
    let p = files_json(&env, "win", &["partitions"]);
    assert_eq!(p["partitions"][0]["fs"], "ntfs", "{p}");
    assert_eq!(p["partitions"][0]["supported"], true, "{p}");
    let ls = files_json(&env, "win", &["ls", "/"]);
    let mut names: Vec<String> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| s(e, "name").to_string())
        .collect();
    names.sort();
    let mut want: Vec<String> = tree().iter().map(|(n, _, _)| n.to_string()).collect();
    want.sort();
    // No $MFT and friends, no DOS 8.3 twins.
    assert_eq!(names, want, "{ls}");
    let out = env.path("out");
    files_json(&env, "win", &["get", "/", "--to", out.to_str().unwrap()]);
    for (name, bytes, t) in tree() {
        let p = out.join(name);
        assert_eq!(fs::read(&p).unwrap(), bytes, "{name}");
        assert_eq!(fs::metadata(&p).unwrap().mtime(), t, "mtime of {name}");
    }
    // A path is case-insensitive on NTFS, as Windows sees it.
    let one = env.path("one");
    files_json(
        &env,
        "win",
        &["get", "/README.TXT", "--to", one.to_str().unwrap()],
    );
    assert_eq!(fs::read(&one).unwrap(), b"hello from NTFS\n");
}

#[test]
fn hostile_ntfs_boot_sectors_and_mft_records_give_errors_not_panics_or_hangs() {
    let env = Env::new();
    let img = env.path("good.ntfs");
    make_ntfs(&env, &img, 16);
    let good = fs::read(&img).unwrap();
    // The MFT's first cluster: boot sector bytes 0x30.. (cluster number) × cluster size.
    let spc = u64::from(good[0x0d]);
    let bps = u64::from(u16::from_le_bytes([good[0x0b], good[0x0c]]));
    let mft = u64::from_le_bytes(good[0x30..0x38].try_into().unwrap()) * spc * bps;
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (off, val) in [
        (0x0busize, 0u8),
        (0x0d, 0),
        (0x0d, 0xff),
        (0x40, 0x7f),
        (0x30, 0xff),
    ] {
        let mut b = good.clone();
        b[off] = val;
        cases.push((format!("boot byte {off:#x} = {val:#x}"), b));
    }
    for i in 0..8u64 {
        let mut b = good.clone();
        // Fuzz one of the first 16 MFT records (1 KiB each), keeping its signature.
        let rec = (mft + (i * 2 + 4) * 1024) as usize;
        let noise = random_bytes(1024, i + 40);
        for (j, x) in noise.iter().enumerate().skip(8).step_by(5) {
            b[rec + j] ^= x;
        }
        cases.push((format!("MFT record {}", i * 2 + 4), b));
    }
    for (n, (what, bytes)) in cases.into_iter().enumerate() {
        let p = env.path(&format!("bad{n}.ntfs"));
        fs::write(&p, &bytes).unwrap();
        let id = format!("bad{n}");
        env.backup(&p, &id);
        let out = env.path(&format!("out{n}"));
        let o = out.to_str().unwrap().to_string();
        for args in [vec!["ls", "/"], vec!["get", "/", "--to", o.as_str()]] {
            let mut a = vec!["files", "latest", "--disk", id.as_str()];
            a.extend(args.iter().copied());
            let (code, err) = bounded(&env, &a, Duration::from_secs(60));
            assert!(!err.contains("panicked"), "{what}: {err}");
            assert_ne!(code, Some(101), "{what}: {err}");
            assert!(code.is_some(), "{what}: killed by a signal: {err}");
        }
    }
}

//! A backup whose catalog write fails after the vault committed it: the command reports
//! what was committed (exit 0 with a warning naming `vault rescan`), never a failure
//! that hides a real backup. The catalog lives on a small real tmpfs that is filled up;
//! the vault is on another file system.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{Env, fixtures, images_equal, s};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system of `dir` but `spare` bytes (a reserve written first, then
/// everything else, then the reserve removed).
fn fill_leaving(dir: &Path, spare: usize) -> PathBuf {
    let reserve = dir.join("reserve");
    std::fs::write(&reserve, vec![1u8; spare]).unwrap();
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![1u8; 4096];
    while f.write_all(&block).is_ok() {}
    drop(f);
    std::fs::remove_file(&reserve).unwrap();
    filler
}

fn manifests(vault: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(vault.join("backups"))
        .into_iter()
        .flatten()
    {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let n = f.unwrap().file_name().to_string_lossy().to_string();
            if let Some(id) = n.strip_suffix(".json") {
                out.push(id.to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_backup_the_catalog_cannot_record_is_reported_as_committed_with_a_warning() {
    let env = Env::bare();
    let mnt = env.path("mnt");
    let _fs = Tmpfs::mount(&mnt, "2m");
    let data = mnt.join("data");
    let vault = env.path("vault");
    let bv = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_blockvault"))
            .arg("--data")
            .arg(&data)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("BLOCKVAULT_LOG")
            .output()
            .unwrap()
    };
    let out = bv(&["vault", "create", "v", "--path", vault.to_str().unwrap()]);
    assert!(out.status.success());
    let disk = fixtures().join("disk.qcow2");
    let mut warned = None;
    let mut recorded = 0;
    // From no space at all to plenty: whatever the catalog manages, the outcome told
    // must be the one committed in the vault.
    for spare_kib in (0..=128).step_by(8) {
        let before = manifests(&vault);
        let filler = fill_leaving(&mnt, spare_kib << 10);
        let name = format!("n{spare_kib}");
        let out = bv(&[
            "--json",
            "backup",
            disk.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "d",
            "--name",
            &name,
        ]);
        std::fs::remove_file(&filler).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        let after = manifests(&vault);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{spare_kib} KiB: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        if !out.status.success() {
            assert_eq!(
                before, after,
                "{spare_kib} KiB: failed, yet committed: {err}"
            );
            assert!(v["error"]["message"].is_string(), "{v}");
            continue;
        }
        let id = s(&v, "id").to_string();
        assert!(
            after.contains(&id),
            "{spare_kib} KiB: reported but not in the vault"
        );
        let shown = bv(&["backups", "show", &id]);
        match v["warning"].as_str() {
            None => {
                assert!(
                    shown.status.success(),
                    "{spare_kib} KiB: not in the catalog"
                );
                recorded += 1;
            }
            Some(w) => {
                assert!(w.contains("vault rescan v"), "{w}");
                assert!(
                    err.contains("vault rescan"),
                    "the warning is on stderr too: {err}"
                );
                assert_eq!(shown.status.code(), Some(3), "not in the catalog yet");
                warned.get_or_insert(id);
            }
        }
    }
    let id = warned.expect("no amount of free space gave a committed-but-unrecorded backup");
    assert!(recorded > 0, "no backup was recorded normally");
    // As the warning says: a rescan brings it into the catalog, and it restores.
    assert!(bv(&["vault", "rescan", "v"]).status.success());
    assert!(bv(&["backups", "show", &id]).status.success());
    let to = env.path("back.qcow2");
    let out = bv(&["restore", &id, "--to", to.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(images_equal(&disk, &to));
}

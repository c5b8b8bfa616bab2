//! VMware change lists as vSphere gives them: QueryChangedDiskAreas' `DiskChangeInfo`
//! (one, or a JSON list of its pages) is taken as-is by `--changed-extents`, and refused
//! when it does not speak for the whole disk.

use std::path::Path;

use crate::common::*;

const CHUNK: u64 = 64 << 10;
const MIB: u64 = 1 << 20;

fn qio(img: &Path, cmd: &str) {
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", cmd, img.to_str().unwrap()],
    );
}

/// Manifests and pack files in the vault.
fn stored(env: &Env) -> (usize, usize) {
    let manifests = walk(&env.vault_dir().join("backups"));
    (manifests, pack_files(&env.vault_dir()).len())
}

fn walk(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// A 32 MiB qcow2 with 4 MiB of data, backed up in full as disk `vm`.
fn image_with_full_backup(env: &Env) -> std::path::PathBuf {
    let img = env.path("d.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"],
    );
    qio(&img, "write -P 0x11 0 4M");
    qio(&img, "write -P 0x22 28M 4M");
    let full = env.backup(&img, "vm");
    assert_eq!(s(&full, "kind"), "full", "{full}");
    img
}

#[test]
fn a_disk_change_info_in_two_pages_naming_3_areas_reads_exactly_those_chunks() {
    let env = Env::new();
    let img = image_with_full_backup(&env);
    // Three changed areas: 4 KiB inside one chunk, 128 KiB over two aligned chunks, and
    // 8 KiB straddling a chunk boundary (two chunks): 5 chunks in all.
    let areas = [
        (MIB + 4096, 4096u64),
        (8 * MIB, 128 << 10),
        (30 * MIB - 4096, 8192),
    ];
    for (i, (off, len)) in areas.iter().enumerate() {
        qio(&img, &format!("write -P 0x{:x} {off} {len}", 0x41 + i));
    }
    // As pyVmomi / govc print it: vSphere paged its answer in two.
    let list = env.path("changes.json");
    std::fs::write(
        &list,
        format!(
            r#"[{{"_vimtype":"vim.vm.DiskChangeInfo","startOffset":0,"length":{half},
                  "changedArea":[{{"start":{a0},"length":{l0}}},{{"start":{a1},"length":{l1}}}]}},
                {{"_vimtype":"vim.vm.DiskChangeInfo","startOffset":{half},"length":{half},
                  "changedArea":[{{"start":{a2},"length":{l2}}}]}}]"#,
            half = 16 * MIB,
            a0 = areas[0].0,
            l0 = areas[0].1,
            a1 = areas[1].0,
            l1 = areas[1].1,
            a2 = areas[2].0,
            l2 = areas[2].1,
        ),
    )
    .unwrap();
    let inc = env.json(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "vm",
        "--changed-extents",
        list.to_str().unwrap(),
    ]);
    assert_eq!(s(&inc, "kind"), "incremental", "{inc}");
    assert_eq!(s(&inc, "strategy"), "changelist", "{inc}");
    assert_eq!(u(&inc, "chunks_read"), 5, "{inc}");
    assert_eq!(u(&inc, "bytes_read"), 5 * CHUNK, "{inc}");
    let out = env.path("r.qcow2");
    env.restore(s(&inc, "id"), &out, "qcow2");
    assert!(images_equal(&img, &out));
}

#[test]
fn a_disk_change_info_that_does_not_cover_the_disk_is_refused_and_nothing_is_stored() {
    let env = Env::new();
    let img = image_with_full_backup(&env);
    qio(&img, "write -P 0x55 20M 64k");
    let list = env.path("changes.json");
    let before = stored(&env);
    for (info, expect) in [
        // Only the first half was asked about: the write at 20 MiB would be missed.
        (
            format!(
                r#"{{"startOffset":0,"length":{},"changedArea":[{{"start":0,"length":4096}}]}}"#,
                16 * MIB
            ),
            "covers only bytes [0, 16777216)",
        ),
        // Made for a bigger disk.
        (
            format!(
                r#"{{"startOffset":0,"length":{},"changedArea":[]}}"#,
                64 * MIB
            ),
            "another disk",
        ),
    ] {
        std::fs::write(&list, info).unwrap();
        let out = env.run(&[
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "vm",
            "--changed-extents",
            list.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(expect), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(stored(&env), before, "nothing may be written");
    }
    assert_eq!(env.backups().len(), 1);
}

//! Backups and restores through the CLI: round trips, dedup, incremental storage, GC.

use crate::common::*;

const FORMATS: &[&str] = &[
    "disk.raw",
    "disk.qcow2",
    "compressed.qcow2",
    "chain-top.qcow2",
    "sparse.vmdk",
    "stream.vmdk",
    "flat.vmdk",
    "split.vmdk",
];

#[test]
fn every_source_format_round_trips_into_raw_and_qcow2() {
    let fx = fixtures();
    let env = Env::new();
    for (i, f) in FORMATS.iter().enumerate() {
        let src = fx.join(f);
        let b = env.backup(&src, &format!("disk-{i}"));
        let id = s(&b, "id").to_string();
        assert!(u(&b, "bytes_read") <= u(&b, "logical_size"));
        for format in ["raw", "qcow2"] {
            let out = env.path(&format!("{f}.{format}"));
            env.restore(&id, &out, format);
            assert!(
                images_equal(&src, &out),
                "{f} restored as {format} differs from its source"
            );
        }
    }
    assert_eq!(env.backups().len(), FORMATS.len());
}

#[test]
fn unallocated_space_is_not_read_and_raw_restore_stays_sparse() {
    let fx = fixtures();
    let env = Env::new();
    let b = env.backup(&fx.join("disk.qcow2"), "d");
    // The fixture is a 64 MiB disk with a few MiB of data.
    assert_eq!(u(&b, "logical_size"), 64 << 20);
    assert!(
        u(&b, "bytes_read") < 16 << 20,
        "read {} bytes",
        u(&b, "bytes_read")
    );
    let out = env.path("r.raw");
    env.restore(s(&b, "id"), &out, "raw");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 16 << 20,
        "restored raw image allocates {allocated} bytes"
    );
}

#[test]
fn second_backup_of_unchanged_image_stores_nothing() {
    let fx = fixtures();
    let env = Env::new();
    let first = env.backup(&fx.join("disk.qcow2"), "d");
    assert!(u(&first, "chunks_new") > 0);
    let second = env.backup(&fx.join("disk.qcow2"), "d");
    assert_eq!(u(&second, "chunks_new"), 0);
    assert_eq!(u(&second, "bytes_stored"), 0);
    assert_eq!(u(&second, "chunks_total"), u(&first, "chunks_total"));
    // Both restore on their own.
    for b in [&first, &second] {
        let out = env.path(&format!("{}.raw", s(b, "id")));
        env.restore(s(b, "id"), &out, "raw");
        assert!(images_equal(&fx.join("disk.qcow2"), &out));
    }
}

#[test]
fn changed_image_stores_only_the_changed_chunks() {
    let fx = fixtures();
    let env = Env::new();
    let img = env.path("work.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &img).unwrap();
    env.backup(&img, "d");
    // Three scattered 64 KiB writes, each inside one chunk, each with a fresh pattern;
    // plus a 4 KiB write inside a fourth chunk.
    let img_s = img.to_str().unwrap();
    for (pattern, off, len) in [
        (0x11, "1M", "64k"),
        (0x12, "17M", "64k"),
        (0x13, "40M", "64k"),
        (0x14, "50M", "4k"),
    ] {
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {pattern} {off} {len}"),
                img_s,
            ],
        );
    }
    let b = env.backup(&img, "d");
    assert_eq!(u(&b, "chunks_new"), 4, "{b}");
    let out = env.path("r.qcow2");
    env.restore(s(&b, "id"), &out, "qcow2");
    assert!(images_equal(&img, &out));
}

#[test]
fn gc_after_deleting_the_first_of_three_backups_frees_exactly_its_blobs() {
    let env = Env::new();
    let a = env.path("a.raw");
    let b = env.path("b.raw");
    let size = 32 << 20;
    // Two disks with nothing in common (random data, different seeds).
    write_raw(&a, size, 0, &random_bytes(3 << 20, 1));
    write_raw(&b, size, 4 << 20, &random_bytes(2 << 20, 2));
    let b1 = env.backup(&a, "d");
    let b2 = env.backup(&b, "d");
    let b3 = env.backup(&b, "d");
    assert_eq!(u(&b3, "chunks_new"), 0);
    let before = env.info();
    env.ok(&["backups", "delete", s(&b1, "id")]);
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    let after = env.info();
    let freed = u(&before, "stored_bytes") - u(&after, "stored_bytes");
    assert_eq!(freed, u(&b1, "bytes_stored"), "gc: {gc}");
    assert!(u(&gc, "bytes_freed") >= freed);
    assert_eq!(env.backups().len(), 2);
    for bk in [&b2, &b3] {
        let out = env.path(&format!("{}.raw", s(bk, "id")));
        env.restore(s(bk, "id"), &out, "raw");
        assert!(images_equal(&b, &out));
    }
    // Nothing left to free.
    let again = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(
        u(&again, "packs_deleted") + u(&again, "packs_rewritten"),
        0,
        "{again}"
    );
    let v = env.run(&["verify", "--vault", "v"]);
    assert!(v.status.success());
}

#[test]
fn gc_keeps_shared_chunks_when_an_older_backup_goes() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 16 << 20, 0, &random_bytes(4 << 20, 7));
    let b1 = env.backup(&img, "d");
    write_raw(&img, 16 << 20, 1 << 20, &random_bytes(64 << 10, 8));
    let b2 = env.backup(&img, "d");
    assert_eq!(u(&b2, "chunks_new"), 1);
    env.ok(&["backups", "delete", s(&b1, "name")]);
    env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    let out = env.path("r.raw");
    env.restore(s(&b2, "id"), &out, "raw");
    assert!(images_equal(&img, &out));
}

#[test]
fn vault_rescan_rebuilds_the_catalog_from_the_vault() {
    let fx = fixtures();
    let env = Env::new();
    let b = env.backup(&fx.join("disk.raw"), "d");
    std::fs::remove_file(env.data().join("catalog.sqlite")).unwrap();
    let _ = std::fs::remove_file(env.data().join("catalog.sqlite-wal"));
    let _ = std::fs::remove_file(env.data().join("catalog.sqlite-shm"));
    // The catalog is gone: re-register the vault by path, then rescan.
    let vault_dir = env.vault_dir();
    let data = env.data();
    std::fs::remove_dir_all(vault_dir.join("cache")).unwrap();
    let out = env
        .cmd()
        .args(["vault", "attach", "v", vault_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.ok(&["vault", "rescan", "v"]);
    let list = env.backups();
    assert_eq!(list.len(), 1);
    assert_eq!(s(&list[0], "id"), s(&b, "id"));
    let r = env.path("r.raw");
    env.restore(s(&b, "id"), &r, "raw");
    assert!(images_equal(&fx.join("disk.raw"), &r));
    let _ = data;
}

#[test]
fn chunk_size_is_chosen_per_vault() {
    let fx = fixtures();
    let env = Env::bare();
    env.ok(&["vault", "create", "v", "--chunk-size", "16K"]);
    let bad = env.run(&["vault", "create", "w", "--chunk-size", "48K"]);
    assert!(!bad.status.success());
    let b = env.backup(&fx.join("disk.qcow2"), "d");
    assert_eq!(u(&b, "chunks_total"), (64 << 20) / (16 << 10));
    let out = env.path("r.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&fx.join("disk.qcow2"), &out));
}

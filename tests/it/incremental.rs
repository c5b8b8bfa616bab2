//! Incremental-forever backups: each strategy reads only what changed, yet every backup
//! restores on its own; untrusted change information falls back to compare.

use crate::common::*;

const CHUNK: u64 = 64 << 10;

fn qio(fmt: &str, img: &std::path::Path, cmd: &str) {
    sh("qemu-io", &["-f", fmt, "-c", cmd, img.to_str().unwrap()]);
}

#[test]
fn a_dirty_bitmap_over_nbd_reads_only_the_dirty_chunks() {
    let fx = fixtures();
    let env = Env::new();
    let img = env.path("work.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &img).unwrap();
    sh(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b0"],
    );
    let sock = env.path("nbd.sock");
    let full = {
        let srv = Server::qemu_nbd(&img, &sock, &["-f", "qcow2", "-B", "b0"]);
        env.json(&[
            "backup",
            &srv.uri(),
            "--vault",
            "v",
            "--id",
            "vm1",
            "--bitmap",
            "b0",
        ])
    };
    assert_eq!(s(&full, "kind"), "full");
    assert_eq!(s(&full, "strategy"), "allocation");
    // The owner of the NBD server rotates the bitmap at the backup's point in time.
    sh(
        "qemu-img",
        &["bitmap", "--clear", img.to_str().unwrap(), "b0"],
    );
    qio("qcow2", &img, "write -P 0x21 1M 64k");
    qio("qcow2", &img, "write -P 0x22 33M 4k");
    qio("qcow2", &img, "write -P 0x23 47M 128k");
    let inc = {
        let srv = Server::qemu_nbd(&img, &sock, &["-f", "qcow2", "-B", "b0"]);
        env.json(&[
            "backup",
            &srv.uri(),
            "--vault",
            "v",
            "--id",
            "vm1",
            "--bitmap",
            "b0",
        ])
    };
    assert_eq!(s(&inc, "kind"), "incremental", "{inc}");
    assert_eq!(s(&inc, "strategy"), "bitmap");
    assert_eq!(s(&inc, "parent"), s(&full, "id"));
    // 64k + 4k + 128k of writes = 4 chunks.
    assert_eq!(u(&inc, "bytes_read"), 4 * CHUNK, "{inc}");
    // The two chunks at 47M hold the same pattern: one new blob for both.
    assert_eq!(u(&inc, "chunks_new"), 3);
    let out = env.path("r.qcow2");
    env.restore(s(&inc, "id"), &out, "qcow2");
    assert!(images_equal(&img, &out));
    // The full backup still restores to the original.
    let out0 = env.path("r0.raw");
    env.restore(s(&full, "id"), &out0, "raw");
    assert!(images_equal(&fx.join("disk.qcow2"), &out0));
}

#[test]
fn a_bitmap_without_a_matching_parent_falls_back_to_compare() {
    let fx = fixtures();
    let env = Env::new();
    let img = env.path("work.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &img).unwrap();
    sh(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b1"],
    );
    // The previous backup of vm2 was taken without the bitmap.
    env.backup(&img, "vm2");
    let sock = env.path("nbd.sock");
    let srv = Server::qemu_nbd(&img, &sock, &["-f", "qcow2", "-B", "b1"]);
    let b = env.json(&[
        "backup",
        &srv.uri(),
        "--vault",
        "v",
        "--id",
        "vm2",
        "--bitmap",
        "b1",
    ]);
    assert_eq!(s(&b, "strategy"), "compare", "{b}");
    assert_eq!(s(&b, "kind"), "full");
    assert!(s(&b, "note").contains("b1"), "{b}");
    assert_eq!(u(&b, "chunks_new"), 0);
}

#[test]
fn an_overlay_backup_reads_only_the_overlays_clusters() {
    let fx = fixtures();
    let env = Env::new();
    let base = env.path("base.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &base).unwrap();
    let b0 = env.backup(&base, "vm3");
    let top = env.path("top.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    qio("qcow2", &top, "write -P 0x31 5M 192k");
    qio("qcow2", &top, "write -P 0x32 60M 4k");
    let b1 = env.backup(&top, "vm3");
    assert_eq!(s(&b1, "strategy"), "overlay", "{b1}");
    assert_eq!(s(&b1, "parent"), s(&b0, "id"));
    assert_eq!(u(&b1, "bytes_read"), 4 * CHUNK);
    let out = env.path("r.raw");
    env.restore(s(&b1, "id"), &out, "raw");
    let expected = env.path("top.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    assert!(images_equal(&expected, &out));
}

#[test]
fn a_vmdk_delta_backup_reads_only_the_deltas_grains() {
    let fx = fixtures();
    let env = Env::new();
    let base = env.path("base.vmdk");
    std::fs::copy(fx.join("sparse.vmdk"), &base).unwrap();
    env.backup(&base, "vm4");
    let delta = env.path("delta.vmdk");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            delta.to_str().unwrap(),
        ],
    );
    qio("vmdk", &delta, "write -P 0x41 9M 64k");
    let b1 = env.backup(&delta, "vm4");
    assert_eq!(s(&b1, "strategy"), "overlay", "{b1}");
    // One 64 KiB grain written.
    assert_eq!(u(&b1, "bytes_read"), CHUNK);
    let out = env.path("r.qcow2");
    env.restore(s(&b1, "id"), &out, "qcow2");
    assert!(images_equal(&delta, &out));
}

#[test]
fn a_change_list_is_used_only_for_the_parent_it_names() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 16 << 20, 0, &random_bytes(4 << 20, 11));
    let b0 = env.backup(&img, "vm5");
    write_raw(&img, 16 << 20, 2 << 20, &random_bytes(8192, 12));
    let list = env.path("changes.json");
    std::fs::write(&list, format!(r#"[{{"start":{},"length":8192}}]"#, 2 << 20)).unwrap();
    let img_s = img.to_str().unwrap();
    let list_s = list.to_str().unwrap();
    // Relative to a backup that is not the latest: refused, compare instead.
    let wrong = env.json(&[
        "backup",
        img_s,
        "--vault",
        "v",
        "--id",
        "vm5",
        "--changed-extents",
        list_s,
        "--since",
        "someone-else",
    ]);
    assert_eq!(s(&wrong, "strategy"), "compare", "{wrong}");
    // Compare reads every allocated byte (the 4 MiB of data).
    assert!(u(&wrong, "bytes_read") >= 4 << 20, "{wrong}");
    assert!(s(&wrong, "note").contains("someone-else"));
    // Relative to the latest backup: only the listed chunk is read.
    let right = env.json(&[
        "backup",
        img_s,
        "--vault",
        "v",
        "--id",
        "vm5",
        "--changed-extents",
        list_s,
        "--since",
        s(&wrong, "id"),
    ]);
    assert_eq!(s(&right, "strategy"), "changelist", "{right}");
    assert_eq!(u(&right, "bytes_read"), CHUNK);
    let out = env.path("r.raw");
    env.restore(s(&right, "id"), &out, "raw");
    assert!(images_equal(&img, &out));
    let _ = b0;
}

#[test]
fn a_chain_of_ten_incrementals_restores_every_link_even_after_deletes() {
    let env = Env::new();
    let img = env.path("d.raw");
    let size = 8u64 << 20;
    write_raw(&img, size, 0, &random_bytes(2 << 20, 1));
    let mut backups = vec![(env.backup(&img, "vm6"), std::fs::read(&img).unwrap())];
    for i in 0..9u64 {
        // A few scattered writes, told to blockvault as a change list.
        let mut areas = Vec::new();
        for j in 0..3u64 {
            let off = ((i * 7 + j * 13) % 120) * CHUNK + (j * 512);
            write_raw(&img, size, off, &random_bytes(4096, 100 + i * 10 + j));
            areas.push(format!(r#"{{"start":{off},"length":4096}}"#));
        }
        let list = env.path("c.json");
        std::fs::write(&list, format!("[{}]", areas.join(","))).unwrap();
        let b = env.json(&[
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "vm6",
            "--changed-extents",
            list.to_str().unwrap(),
        ]);
        assert_eq!(s(&b, "strategy"), "changelist");
        assert!(u(&b, "bytes_read") <= 3 * CHUNK);
        backups.push((b, std::fs::read(&img).unwrap()));
    }
    let check = |env: &Env, list: &[(serde_json::Value, Vec<u8>)]| {
        for (b, content) in list {
            let out = env.path(&format!("r-{}.raw", s(b, "id")));
            let _ = std::fs::remove_file(&out);
            env.restore(s(b, "id"), &out, "raw");
            assert!(
                std::fs::read(&out).unwrap() == *content,
                "backup {} restores wrong",
                s(b, "id")
            );
        }
    };
    check(&env, &backups);
    // Delete the full one and one in the middle, collect, and check the rest again.
    for idx in [5usize, 0] {
        env.ok(&["backups", "delete", s(&backups[idx].0, "id")]);
        backups.remove(idx);
    }
    env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    check(&env, &backups);
    assert!(env.run(&["verify", "--vault", "v"]).status.success());
}

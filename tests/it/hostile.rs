//! Hostile and broken images: each is refused with a clear message and a non-zero exit,
//! nothing is stored in the vault, and (where QEMU has an opinion) qemu-img refuses the
//! same image, so that our strictness matches QEMU's. Images start from real qemu-img
//! images with a few header bytes patched.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockvault::ErrorKind;
use blockvault::source::{BlockSource, Qcow2Source, VmdkSource};
use proptest::prelude::*;

use crate::common::*;

fn qio(fmt: &str, img: &Path, cmd: &str) {
    sh("qemu-io", &["-f", fmt, "-c", cmd, img.to_str().unwrap()]);
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn be64_at(path: &Path, offset: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// Files under the vault's backups/ (manifests) and packs/.
fn stored(env: &Env) -> (usize, usize) {
    fn count(dir: &Path) -> usize {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                if e.path().is_dir() {
                    count(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }
    (
        count(&env.vault_dir().join("backups")),
        pack_files(&env.vault_dir()).len(),
    )
}

/// `blockvault backup IMG` fails with a message containing `expect`, and stores nothing.
fn refused(env: &Env, img: &Path, expect: &str) {
    let before = stored(env);
    let out = env.run(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "hostile",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{}: backup succeeded: {}",
        img.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains(expect),
        "{}: expected {expect:?} in: {err}",
        img.display()
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        stored(env),
        before,
        "{}: something was stored",
        img.display()
    );
}

/// qemu-img info (or, with `read`, a full read by qemu-img convert) refuses `img` too.
fn qemu_refuses(img: &Path, read: bool) {
    let tmp = img.with_extension("qemu-out");
    let mut c = Command::new("qemu-img");
    if read {
        c.args(["convert", "-O", "raw"]).arg(img).arg(&tmp);
    } else {
        c.arg("info").arg(img);
    }
    let out = c.output().unwrap();
    let _ = std::fs::remove_file(&tmp);
    assert!(
        !out.status.success(),
        "qemu-img accepts {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A 64 MiB qcow2 with data (compat 1.1 = v3, or 0.10 = v2).
fn qcow2_with_data(env: &Env, name: &str, compat: &str) -> PathBuf {
    let p = env.path(name);
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            p.to_str().unwrap(),
            "64M",
        ],
    );
    qio("qcow2", &p, "write -P 0x11 0 192k");
    qio("qcow2", &p, "write -P 0x22 40M 64k");
    p
}

#[test]
fn qcow2_headers_qemu_refuses_are_refused_and_nothing_is_stored() {
    let env = Env::new();
    let good = qcow2_with_data(&env, "good.qcow2", "1.1");
    // (what, offset, bytes, expected words in our message)
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("version-4", 4, &[0, 0, 0, 4], "version 4"),
        ("cluster-bits-22", 20, &[0, 0, 0, 22], "cluster_bits 22"),
        ("cluster-bits-8", 20, &[0, 0, 0, 8], "cluster_bits 8"),
        ("crypt-3", 32, &[0, 0, 0, 3], "unknown encryption method 3"),
        ("l1-64mib", 36, &[0, 0x80, 0, 0], "32 MiB"),
        ("l1-too-small", 36, &[0, 0, 0, 0], "too small"),
        (
            "incompat-bit-5",
            79,
            &[0x20],
            "unknown incompatible feature bits 0x20",
        ),
        ("refcount-order-7", 96, &[0, 0, 0, 7], "refcount_order 7"),
        (
            "header-length-100",
            100,
            &[0, 0, 0, 100],
            "header_length 100",
        ),
        (
            "compression-type-2",
            104,
            &[2],
            "unknown compression type 2",
        ),
        (
            "zlib-with-compression-bit",
            79,
            &[0x08],
            "compression type bit",
        ),
        ("reftable-too-large", 56, &[0, 0, 0x10, 0], "refcount table"),
        ("too-many-snapshots", 60, &[0, 2, 0, 0], "snapshots"),
    ];
    for (what, off, bytes, expect) in cases {
        let p = env.path(&format!("{what}.qcow2"));
        std::fs::copy(&good, &p).unwrap();
        patch(&p, *off, bytes);
        qemu_refuses(&p, false);
        refused(&env, &p, expect);
        refused(&env, &p, "qemu-img refuses such an image too");
    }
    // The unpatched image backs up and restores byte for byte.
    let b = env.backup(&good, "good");
    let out = env.path("good.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&good, &out));
}

#[test]
fn an_l1_table_sized_by_a_sparse_hostile_header_is_refused_without_allocating_it() {
    // 512-byte clusters and a 64 TiB disk need 2^31 L1 entries (16 GiB): QEMU's cap is 32 MiB.
    let env = Env::new();
    let p = env.path("sparse-hostile.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            p.to_str().unwrap(),
            "1M",
        ],
    );
    patch(&p, 24, &(64u64 << 40).to_be_bytes());
    patch(&p, 36, &(1u32 << 31).to_be_bytes());
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(20 << 30)
        .unwrap();
    qemu_refuses(&p, false);
    refused(&env, &p, "larger than QEMU's limit of 32 MiB");
}

#[test]
fn a_v2_image_with_the_zero_flag_is_refused_as_qemu_refuses_to_read_it() {
    let env = Env::new();
    let p = qcow2_with_data(&env, "v2.qcow2", "0.10");
    let l1 = be64_at(&p, 40);
    let l2 = be64_at(&p, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64_at(&p, l2);
    assert!(entry & 0x00ff_ffff_ffff_fe00 != 0, "cluster 0 is allocated");
    patch(&p, l2, &(entry | 1).to_be_bytes());
    // qemu-img info opens it; reading the cluster fails.
    sh("qemu-img", &["info", p.to_str().unwrap()]);
    qemu_refuses(&p, true);
    refused(
        &env,
        &p,
        "has the zero flag, which exists only in version 3",
    );
    // The same flag in a v3 image is a zero cluster: it backs up as zeros, like qemu-img reads.
    let v3 = qcow2_with_data(&env, "v3.qcow2", "1.1");
    let l1 = be64_at(&v3, 40);
    let l2 = be64_at(&v3, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64_at(&v3, l2);
    patch(&v3, l2, &(entry | 1).to_be_bytes());
    let b = env.backup(&v3, "v3");
    let out = env.path("v3.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&v3, &out));
}

#[test]
fn luks_and_zstd_qcow2_are_unsupported_naming_the_feature_never_read_as_plaintext() {
    let env = Env::new();
    let luks = env.path("luks.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            luks.to_str().unwrap(),
            "16M",
        ],
    );
    let zstd = env.path("zstd.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            zstd.to_str().unwrap(),
            "16M",
        ],
    );
    let aes = env.path("aes.qcow2");
    std::fs::copy(qcow2_with_data(&env, "plain.qcow2", "1.1"), &aes).unwrap();
    patch(&aes, 32, &[0, 0, 0, 1]);
    for (p, name) in [
        (&luks, "LUKS encryption"),
        (&zstd, "compression_type=zstd"),
        (&aes, "legacy AES encryption"),
    ] {
        let e = Qcow2Source::open(p).err().expect("refused");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }
    // Without a secret, an encrypted image is never backed up (as ciphertext or otherwise).
    refused(&env, &luks, "LUKS");
}

#[test]
fn a_backing_file_outside_the_image_tree_is_refused_and_nothing_is_stored() {
    let env = Env::new();
    let top = env.path("passwd-top.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            top.to_str().unwrap(),
            "1M",
        ],
    );
    refused(&env, &top, "lies outside the image's directory tree");
    refused(&env, &top, "/etc/passwd");
    // A symlink inside the tree that points outside is resolved first.
    std::os::unix::fs::symlink("/etc/passwd", env.path("innocent.raw")).unwrap();
    let via_link = env.path("link-top.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "innocent.raw",
            "-F",
            "raw",
            via_link.to_str().unwrap(),
            "1M",
        ],
    );
    refused(&env, &via_link, "resolved to /etc/passwd");
    // The same for a qcow2 backing file in another directory, and for an external data file.
    let elsewhere = tempfile::tempdir().unwrap();
    let base = elsewhere.path().join("base.qcow2");
    std::fs::copy(qcow2_with_data(&env, "b.qcow2", "1.1"), &base).unwrap();
    let over = env.path("over.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            over.to_str().unwrap(),
        ],
    );
    refused(&env, &over, "backing file");
    let data_file = elsewhere.path().join("data.raw");
    let ext = env.path("ext.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", data_file.display()),
            ext.to_str().unwrap(),
            "1M",
        ],
    );
    refused(&env, &ext, "external data file");
    // A chain inside the tree (base in a subdirectory) backs up.
    std::fs::create_dir(env.path("base")).unwrap();
    let inner = env.path("base/inner.qcow2");
    std::fs::copy(&base, &inner).unwrap();
    let ok_top = env.path("ok-top.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base/inner.qcow2",
            "-F",
            "qcow2",
            ok_top.to_str().unwrap(),
        ],
    );
    let b = env.backup(&ok_top, "ok-top");
    let out = env.path("ok-top.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&ok_top, &out));
}

fn descriptor(env: &Env, name: &str, extent_line: &str, create_type: &str) -> PathBuf {
    let p = env.path(name);
    std::fs::write(
        &p,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=d52855f8\nparentCID=ffffffff\n\
             createType=\"{create_type}\"\n# Extent description\n{extent_line}\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn broken_vmdk_descriptors_are_refused_like_qemu_img_and_nothing_is_stored() {
    let env = Env::new();
    std::fs::copy(
        fixtures().join("flat-flat.vmdk"),
        env.path("flat-flat.vmdk"),
    )
    .unwrap();
    let good = descriptor(
        &env,
        "good.vmdk",
        r#"RW 131072 FLAT "flat-flat.vmdk" 0"#,
        "monolithicFlat",
    );
    let cases: &[(&str, &str, &str)] = &[
        (
            "overflowing",
            r#"RW 99999999999999999999999 FLAT "flat-flat.vmdk" 0"#,
            "extent size is not a sector count",
        ),
        (
            "int64-max",
            r#"RW 9223372036854775807 FLAT "flat-flat.vmdk" 0"#,
            "more than 2^63 bytes",
        ),
        (
            "negative",
            r#"RW -5 FLAT "flat-flat.vmdk" 0"#,
            "extent size is not a sector count",
        ),
        (
            "zero",
            r#"RW 0 FLAT "flat-flat.vmdk" 0"#,
            "extent of 0 sectors",
        ),
        (
            "missing",
            r#"RW FLAT "flat-flat.vmdk" 0"#,
            "extent size is not a sector count",
        ),
        (
            "bad-quote",
            r#"RW 131072 FLAT "flat-flat.vmdk 0"#,
            "lacks its closing quote",
        ),
        (
            "no-offset",
            r#"RW 131072 FLAT "flat-flat.vmdk""#,
            "needs a non-negative offset",
        ),
        (
            "unknown-type",
            r#"RW 131072 FOO "flat-flat.vmdk" 0"#,
            "unknown extent type",
        ),
        ("no-extent", "", "without extents"),
    ];
    for (what, line, expect) in cases {
        let p = descriptor(&env, &format!("{what}.vmdk"), line, "monolithicFlat");
        qemu_refuses(&p, false);
        refused(&env, &p, expect);
    }
    // An extent file outside the descriptor's tree.
    let outside = descriptor(
        &env,
        "outside.vmdk",
        r#"RW 8 FLAT "/etc/passwd" 0"#,
        "monolithicFlat",
    );
    refused(&env, &outside, "lies outside the image's directory tree");
    let b = env.backup(&good, "good");
    let out = env.path("good.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&good, &out));
}

#[test]
fn a_stream_optimized_vmdk_of_capacity_0_is_refused() {
    let env = Env::new();
    for f in ["stream.vmdk", "sparse.vmdk"] {
        let p = env.path(&format!("zero-{f}"));
        std::fs::copy(fixtures().join(f), &p).unwrap();
        patch(&p, 12, &0u64.to_le_bytes());
        qemu_refuses(&p, false);
        refused(&env, &p, "capacity 0");
        let e = VmdkSource::open(&p).err().expect("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e}");
    }
}

#[test]
fn change_lists_past_the_disk_end_or_overflowing_are_refused_and_nothing_is_stored() {
    let env = Env::new();
    let img = env.path("d.raw");
    let size = 4u64 << 20;
    write_raw(&img, size, 0, &random_bytes(1 << 20, 3));
    env.backup(&img, "cl");
    let list = env.path("c.json");
    for (areas, expect) in [
        (
            format!(r#"[{{"start":{},"length":8192}}]"#, size - 4096),
            "past the disk end",
        ),
        (
            r#"[{"start":18446744073709551615,"length":4096}]"#.to_string(),
            "2^64",
        ),
    ] {
        std::fs::write(&list, areas).unwrap();
        let before = stored(&env);
        let out = env.run(&[
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "cl",
            "--changed-extents",
            list.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(expect), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(stored(&env), before);
    }
    assert_eq!(env.backups().len(), 1);
}

/// One small real image (4 KiB clusters, data and compressed clusters) per version.
fn mutation_bases() -> &'static [(Vec<u8>, u64)] {
    static BASES: std::sync::OnceLock<Vec<(Vec<u8>, u64)>> = std::sync::OnceLock::new();
    BASES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        ["0.10", "1.1"]
            .iter()
            .map(|compat| {
                let raw = dir.path().join("src.raw");
                write_raw(&raw, 1 << 20, 0, &random_bytes(64 << 10, 5));
                write_raw(&raw, 1 << 20, 512 << 10, &[7u8; 8192]);
                let p = dir.path().join(format!("m-{compat}.qcow2"));
                sh(
                    "qemu-img",
                    &[
                        "convert",
                        "-c",
                        "-O",
                        "qcow2",
                        "-o",
                        &format!("compat={compat},cluster_size=4096"),
                        raw.to_str().unwrap(),
                        p.to_str().unwrap(),
                    ],
                );
                let bytes = std::fs::read(&p).unwrap();
                let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
                (bytes, l1)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]
    /// Random mutations of a real image's header and tables never panic: the image opens
    /// and reads, or is refused with an error.
    #[test]
    fn random_qcow2_header_mutations_never_panic(
        v3 in any::<bool>(),
        header in proptest::collection::vec((0u64..112, any::<u8>()), 0..6),
        tables in proptest::collection::vec((0u64..20480, any::<u8>()), 0..6),
        l1 in proptest::collection::vec((0u64..16, any::<u8>()), 0..3),
    ) {
        let (base, l1_offset) = &mutation_bases()[v3 as usize];
        let mut img = base.clone();
        for (o, b) in header.iter().chain(tables.iter()) {
            if let Some(x) = img.get_mut(*o as usize) { *x = *b; }
        }
        for (o, b) in l1 {
            if let Some(x) = img.get_mut((l1_offset + o) as usize) { *x = b; }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.qcow2");
        std::fs::write(&p, &img).unwrap();
        if let Ok(mut src) = Qcow2Source::open(&p)
            && let Ok(extents) = src.allocated_extents()
        {
            let mut buf = vec![0u8; 64 << 10];
            for e in extents.iter().take(16) {
                let n = e.length.min(buf.len() as u64) as usize;
                let _ = src.read_at(&mut buf[..n], e.offset);
            }
        }
    }
}

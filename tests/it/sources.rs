//! Block sources against real images: sizes, contents and allocation maps agree with
//! qemu-img's view of the same files.

use std::path::Path;
use std::process::Command;

use blockvault::source::{BlockSource, Qcow2Source, VmdkSource, open_source};

use crate::common::*;

const GOOD: &[&str] = &[
    "disk.raw",
    "disk.qcow2",
    "compressed.qcow2",
    "chain-top.qcow2",
    "chain-mid.qcow2",
    "sparse.vmdk",
    "stream.vmdk",
    "flat.vmdk",
    "split.vmdk",
    "vmdk-delta.vmdk",
];

fn qemu_virtual_size(p: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn qemu_raw(p: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{}.raw", p.file_name().unwrap().to_string_lossy()));
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

fn read_all(src: &mut dyn BlockSource) -> Vec<u8> {
    let mut buf = vec![0u8; src.size() as usize];
    for (i, c) in buf.chunks_mut(1 << 20).enumerate() {
        src.read_at(c, (i as u64) << 20).unwrap();
    }
    buf
}

#[test]
fn every_format_reads_like_qemu_img_and_maps_all_its_data() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    for f in GOOD {
        let p = fx.join(f);
        let mut src = open_source(p.to_str().unwrap()).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(src.size(), qemu_virtual_size(&p), "{f}: size");
        let expected = qemu_raw(&p, tmp.path());
        let got = read_all(src.as_mut());
        assert!(
            got == expected,
            "{f}: contents differ from qemu-img convert"
        );
        let extents = src.allocated_extents().unwrap();
        // Every non-zero byte lies inside an allocated extent: the gaps are all zero.
        let mut pos = 0u64;
        let mut total = 0;
        for e in &extents {
            assert!(
                e.offset >= pos && e.end() <= src.size(),
                "{f}: extents unsorted or past the end"
            );
            let gap = &got[pos as usize..e.offset as usize];
            assert!(
                gap.iter().all(|&b| b == 0),
                "{f}: data in the unallocated gap {pos}..{}",
                e.offset
            );
            pos = e.end();
            total += e.length;
        }
        assert!(
            got[pos as usize..].iter().all(|&b| b == 0),
            "{f}: data after the last extent"
        );
        // Flat extents are all data; vmdk-core reports split sparse extents whole.
        if !["flat.vmdk", "split.vmdk"].contains(f) {
            assert!(
                total < src.size() / 4,
                "{f}: {total} bytes allocated of {}",
                src.size()
            );
        }
    }
}

#[test]
fn a_forced_raw_prefix_reads_the_container_itself() {
    let fx = fixtures();
    let p = fx.join("disk.qcow2");
    let mut src = open_source(&format!("raw:{}", p.display())).unwrap();
    assert_eq!(src.size(), std::fs::metadata(&p).unwrap().len());
    let mut head = [0u8; 4];
    src.read_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"QFI\xfb");
}

#[test]
fn overlays_report_their_own_clusters_as_the_change_since_their_base() {
    let fx = fixtures();
    let mut top = Qcow2Source::open(&fx.join("chain-top.qcow2")).unwrap();
    assert!(top.backing_path().unwrap().ends_with("chain-mid.qcow2"));
    let own: u64 = top
        .top_layer_extents()
        .unwrap()
        .iter()
        .map(|e| e.length)
        .sum();
    // chain-top wrote 1 MiB + 4 KiB of data (and one zero cluster): 17 clusters of 64 KiB.
    assert_eq!(own, 17 * 65536);
    let mut delta = VmdkSource::open(&fx.join("vmdk-delta.vmdk")).unwrap();
    let own: u64 = delta
        .top_layer_extents()
        .unwrap()
        .iter()
        .map(|e| e.length)
        .sum();
    assert_eq!(own, 128 << 10);
}

#[test]
fn reads_past_the_end_are_refused() {
    let fx = fixtures();
    for f in ["disk.raw", "disk.qcow2", "sparse.vmdk"] {
        let mut src = open_source(fx.join(f).to_str().unwrap()).unwrap();
        let mut buf = vec![0u8; 4096];
        let end = src.size() - 1024;
        assert!(src.read_at(&mut buf, end).is_err(), "{f}");
    }
}

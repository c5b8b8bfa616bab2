//! GC at scale: build a synthetic vault of N data blobs and time GC on it, with its peak
//! RSS. Not a test (minutes, gigabytes); run it in release mode:
//!
//! ```text
//! cargo run --release --example gc_scale (appliance/bench-gc-scale.rs) -- DIR BLOBS [REPACK_BELOW]
//! ```
//!
//! Backup A references every blob (one disk of BLOBS chunk slots), backup B three in four
//! of them. A is deleted and GC runs: every pack then holds 75 % live blobs, so with
//! REPACK_BELOW (default 50) ≤ 75 GC only marks and sweeps, above it rewrites them all.
//! Blobs are 8-byte payloads in packs of ~512 blobs (as 64 KiB chunks in 32 MiB packs),
//! so that the vault's size on disk stays small while its blob and pack counts are real.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use blockvault::chunk::{BlobKind, ChunkDigest, ChunkSize, Encoder};
use blockvault::index::{IndexRoot, PAGE_ENTRIES, encode_page};
use blockvault::manifest::BackupManifest;
use blockvault::vault::Vault;

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn digest(i: u64) -> ChunkDigest {
    ChunkDigest::of(&i.to_le_bytes())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: gc_scale DIR BLOBS [REPACK_BELOW]");
    }
    let dir = PathBuf::from(&args[1]);
    let n: u64 = args[2].parse().context("BLOBS")?;
    let repack: u8 = args
        .get(3)
        .map_or(Ok(50), |a| a.parse())
        .context("REPACK_BELOW")?;
    let cs = ChunkSize::new(64 << 10)?;
    let vault = Vault::create(&dir, cs, 1)?;
    let mut lookup = vault.lookup()?;
    // Packs of ~512 blobs, as a vault of 64 KiB chunks and 32 MiB packs has.
    let mut writer = vault.pack_writer_with_target(512 * 20);
    let mut enc = Encoder::new(1, &blockvault::chunk::BlobCodec::plain())?;
    let t = Instant::now();
    let publish = |sealed: Option<blockvault::vault::pack::SealedPack>,
                   lookup: &mut blockvault::vault::lookup::LookupIndex|
     -> anyhow::Result<()> {
        if let Some(s) = sealed {
            lookup.insert_pack(&s.publish()?)?;
        }
        Ok(())
    };
    // Data blobs, then for each backup its pages and root.
    for i in 0..n {
        let blob = enc.encode(BlobKind::Data, digest(i), i.to_le_bytes().to_vec())?;
        publish(writer.add(&blob)?, &mut lookup)?;
    }
    let mut manifests = Vec::new();
    for (name, keep) in [("A", 1u64), ("B", 4)] {
        let mut pages = Vec::new();
        let mut page = Vec::with_capacity(PAGE_ENTRIES);
        for i in 0..n {
            let live = keep == 1 || i % keep != 0;
            page.push(if live { digest(i) } else { ChunkDigest::ZERO });
            if page.len() == PAGE_ENTRIES || i + 1 == n {
                match encode_page(&page) {
                    Some(bytes) => {
                        let d = ChunkDigest::of(&bytes);
                        publish(
                            writer.add(&enc.encode(BlobKind::IndexPage, d, bytes)?)?,
                            &mut lookup,
                        )?;
                        pages.push(d);
                    }
                    None => pages.push(ChunkDigest::ZERO),
                }
                page.clear();
            }
        }
        let root = IndexRoot {
            disk_size: n * cs.as_u64(),
            chunk_size: cs,
            pages,
        };
        let bytes = root.encode();
        let rd = ChunkDigest::of(&bytes);
        publish(
            writer.add(&enc.encode(BlobKind::IndexRoot, rd, bytes)?)?,
            &mut lookup,
        )?;
        let m = serde_json::json!({
            "version": 1, "id": format!("20260101T000000-{name}"), "name": name,
            "resource": "scale", "resource_kind": "disk", "created": format!("2026-01-01T00:00:0{}Z", manifests.len()),
            "vault_id": vault.config().id, "chunk_size": cs.bytes(), "seconds": 0.0,
            "disks": [{
                "name": "disk0", "disk_id": "scale", "source": "synthetic", "format": "raw",
                "size": n * cs.as_u64(), "index_root": rd, "kind": "full", "strategy": "allocation",
                "parent": null, "bytes_allocated": 0, "bytes_read": 0, "bytes_stored": 0,
                "chunks_total": n, "chunks_read": 0, "chunks_new": 0
            }]
        });
        let m = BackupManifest::from_json(&serde_json::to_vec(&m)?)?;
        vault.put_manifest(&m)?;
        manifests.push(m);
    }
    if let Some(info) = writer.finish_current()? {
        lookup.insert_pack(&info)?;
    }
    drop(lookup);
    println!(
        "built {n} data blobs in {:.1} s (peak RSS so far {} MiB)",
        t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    vault.delete_manifest(&manifests[0])?;
    let t = Instant::now();
    let rss_before = peak_rss_mib();
    let stats = blockvault::vault::gc::gc(&vault, repack)?;
    println!(
        "gc --repack-below {repack}: {:.1} s, peak RSS {} MiB (before gc {} MiB); {} live blobs, {} packs, deleted {}, rewrote {}, freed {} bytes",
        t.elapsed().as_secs_f64(),
        peak_rss_mib(),
        rss_before,
        stats.live_blobs,
        stats.packs_before,
        stats.packs_deleted,
        stats.packs_rewritten,
        stats.bytes_freed
    );
    Ok(())
}

//! `blockvault benchmark`: what this machine does per second on the per-chunk path.
//!
//! Like `proxmox-backup-client benchmark`: blake3, zstd compress and decompress at the
//! vault's level, AES-256-GCM seal and open (encrypted vaults), lookups per second in the SQLite chunk index, pack write and read —
//! single thread and all threads — on 64 KiB chunks of mixed data (half text-like, half
//! random). With `image_gib`, it also times a full backup and a restore of a sparse raw
//! image holding mixed data, the end-to-end figure the speed target is stated in, and
//! the same full backup into an encrypted vault (the cost of encryption end to end).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backup::{BackupOptions, backup_disk};
use crate::chunk::{BlobCodec, BlobKind, ChunkDigest, ChunkSize, Encoder, VaultKey, decode_blob};
use crate::error::{IoContext, Result};
use crate::restore::{ImageFormat, restore_disk};
use crate::source::RawSource;
use crate::vault::Vault;
use crate::vault::pack::PackInfo;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub single: f64,
    pub all: f64,
    pub unit: String,
}

/// End-to-end backup/restore figures.
#[derive(Debug, Clone, Serialize)]
pub struct ImageFigures {
    pub disk_bytes: u64,
    pub data_bytes: u64,
    pub backup_seconds: f64,
    pub backup_logical_mb_s: f64,
    pub backup_allocated_mb_s: f64,
    pub bytes_stored: u64,
    /// The same full backup into an encrypted vault.
    pub encrypted_backup_seconds: f64,
    /// How much slower the encrypted backup was, in percent.
    pub encrypted_overhead_percent: f64,
    pub restore_seconds: f64,
    pub peak_rss_mib: f64,
}

/// All figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub threads: usize,
    pub zstd_level: i32,
    pub figures: Vec<Figure>,
    pub image: Option<ImageFigures>,
}

/// Deterministic mixed data: text-like and random 64 KiB chunks alternating.
pub fn mixed_chunks(n: usize, chunk: usize, seed: u64) -> Vec<Vec<u8>> {
    let words = [
        "backup ",
        "vault ",
        "chunk ",
        "disk ",
        "restore ",
        "the ",
        "of ",
        "index ",
        "qemu ",
        "2026-11-22 ",
        "INFO ",
        "error ",
        "\n",
    ];
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let mut v = Vec::with_capacity(chunk);
            if i % 2 == 0 {
                while v.len() < chunk {
                    let r = next();
                    v.extend_from_slice(words[(r % words.len() as u64) as usize].as_bytes());
                    if r % 7 == 0 {
                        v.extend_from_slice(format!("{} ", r % 100000).as_bytes());
                    }
                }
                v.truncate(chunk);
            } else {
                while v.len() < chunk {
                    v.extend_from_slice(&next().to_le_bytes());
                }
                v.truncate(chunk);
            }
            v
        })
        .collect()
}

/// Run `f` over `items` on `threads` threads for about `dur`; returns items per second.
fn rate<T: Sync>(items: &[T], threads: usize, dur: Duration, f: impl Fn(&T) + Sync) -> f64 {
    let start = Instant::now();
    let counts: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    // Every thread walks all items (offset by its number), so each
                    // sees the same mix of data.
                    let mut n = 0u64;
                    let mut i = t * items.len() / threads;
                    while start.elapsed() < dur {
                        f(&items[i % items.len()]);
                        i += 1;
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    counts.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64()
}

/// Run the benchmark.
pub fn run(level: i32, secs: f64, image_gib: Option<u64>) -> Result<Report> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cs = 64 << 10;
    let chunks = mixed_chunks(256, cs, 42);
    let dur = Duration::from_secs_f64(secs);
    let mb = |per_sec: f64| per_sec * cs as f64 / 1e6;
    let mut figures = Vec::new();
    let mut fig = |name: &str, single: f64, all: f64, unit: &str| {
        figures.push(Figure {
            name: name.into(),
            single,
            all,
            unit: unit.into(),
        })
    };

    let hash = |c: &Vec<u8>| {
        std::hint::black_box(ChunkDigest::of(c));
    };
    fig(
        "blake3",
        mb(rate(&chunks, 1, dur, hash)),
        mb(rate(&chunks, threads, dur, hash)),
        "MB/s",
    );

    let compress = |c: &Vec<u8>| {
        thread_local! {
            static ENC: std::cell::RefCell<Option<Encoder>> = const { std::cell::RefCell::new(None) };
        }
        ENC.with(|e| {
            let mut e = e.borrow_mut();
            if e.is_none() {
                *e = Encoder::new(level, &BlobCodec::plain()).ok();
            }
            if let Some(e) = e.as_mut() {
                std::hint::black_box(e.encode(BlobKind::Data, ChunkDigest::ZERO, c.clone()).ok());
            }
        });
    };
    fig(
        &format!("zstd-{level} compress"),
        mb(rate(&chunks, 1, dur, compress)),
        mb(rate(&chunks, threads, dur, compress)),
        "MB/s",
    );

    let plain = BlobCodec::plain();
    let mut enc = Encoder::new(level, &plain)?;
    let encoded: Vec<(ChunkDigest, Vec<u8>)> = chunks
        .iter()
        .map(|c| {
            let d = ChunkDigest::of(c);
            let b = enc.encode(BlobKind::Data, d, c.clone())?;
            Ok((d, [&b.header[..], &b.payload].concat()))
        })
        .collect::<Result<_>>()?;
    let decompress = |(d, stored): &(ChunkDigest, Vec<u8>)| {
        std::hint::black_box(decode_blob(stored, d, &plain).ok());
    };
    fig(
        &format!("zstd-{level} decompress+verify"),
        mb(rate(&encoded, 1, dur, decompress)),
        mb(rate(&encoded, threads, dur, decompress)),
        "MB/s",
    );

    // Encrypted vaults: AES-256-GCM over whole chunks (the header as associated data).
    let sealed = BlobCodec::sealed(&VaultKey::generate())?;
    let header = [0u8; crate::chunk::BLOB_HEADER_LEN];
    let seal = |c: &Vec<u8>| {
        std::hint::black_box(sealed.seal_payload(&header, c).ok());
    };
    fig(
        "aes-256-gcm seal",
        mb(rate(&chunks, 1, dur, seal)),
        mb(rate(&chunks, threads, dur, seal)),
        "MB/s",
    );
    let sealed_chunks: Vec<Vec<u8>> = chunks
        .iter()
        .map(|c| sealed.seal_payload(&header, c))
        .collect::<Result<_>>()?;
    let open = |c: &Vec<u8>| {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with(|b| {
            let r = sealed.open_payload(&header, c, &mut b.borrow_mut(), &ChunkDigest::ZERO);
            std::hint::black_box(r.ok());
        });
    };
    fig(
        "aes-256-gcm open",
        mb(rate(&sealed_chunks, 1, dur, open)),
        mb(rate(&sealed_chunks, threads, dur, open)),
        "MB/s",
    );

    // Lookups and packs in a scratch vault.
    let dir = tempfile_dir()?;
    let vault = Vault::create(&dir.join("v"), ChunkSize::new(cs as u32)?, level)?;
    let mut writer = vault.pack_writer();
    let mut infos: Vec<PackInfo> = Vec::new();
    let t = Instant::now();
    let mut written = 0u64;
    let mut enc = Encoder::new(level, &plain)?;
    for round in 0..(256u64 * 4) {
        let c = &chunks[(round % 256) as usize];
        let mut plain = c.clone();
        plain[..8].copy_from_slice(&round.to_le_bytes());
        let d = ChunkDigest::of(&plain);
        let blob = enc.encode(BlobKind::Data, d, plain)?;
        written += blob.stored_len() as u64;
        if let Some(sealed) = writer.add(&blob)? {
            infos.push(sealed.publish()?);
        }
    }
    infos.extend(writer.finish_current()?);
    let write_mb = written as f64 / 1e6 / t.elapsed().as_secs_f64();
    let mut lookup = vault.lookup()?;
    for i in &infos {
        lookup.insert_pack(i)?;
    }
    let entries: Vec<_> = infos
        .iter()
        .flat_map(|i| i.entries.iter().map(move |e| (i.id, *e)))
        .collect();
    let read_one = |(id, e): &(crate::vault::pack::PackId, crate::vault::pack::PackEntry)| {
        std::hint::black_box(
            vault
                .store()
                .read_pack_range(*id, e.offset, e.length as usize)
                .ok(),
        );
    };
    let read_single = rate(&entries, 1, dur, read_one) * cs as f64 / 1e6;
    let read_all = rate(&entries, threads, dur, read_one) * cs as f64 / 1e6;
    fig("pack write (fsync)", write_mb, write_mb, "MB/s");
    fig("pack read", read_single, read_all, "MB/s (plaintext)");

    let digests: Vec<ChunkDigest> = entries.iter().map(|(_, e)| e.digest).collect();
    let lk = |d: &ChunkDigest| {
        thread_local! {
            static CONN: std::cell::RefCell<Option<crate::vault::lookup::LookupIndex>> = const { std::cell::RefCell::new(None) };
        }
        CONN.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = vault.lookup().ok();
            }
            if let Some(l) = c.as_ref() {
                std::hint::black_box(l.contains(d).ok());
            }
        });
    };
    fig(
        "chunk lookups",
        rate(&digests, 1, dur, lk),
        rate(&digests, threads, dur, lk),
        "lookups/s",
    );

    let image = match image_gib {
        Some(gib) => Some(image_figures(&dir, gib, level)?),
        None => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Report {
        threads,
        zstd_level: level,
        figures,
        image,
    })
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "blockvault-bench-{}",
        hex::encode(rand::random::<[u8; 4]>())
    ));
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A `4 × data` GiB sparse raw image with `data` GiB of mixed data in it, spread over
/// the disk (text, random, a duplicated region), backed up and restored.
fn image_figures(dir: &std::path::Path, data_gib: u64, level: i32) -> Result<ImageFigures> {
    use std::os::unix::fs::FileExt;
    let disk = (data_gib * 4) << 30;
    let path = dir.join("bench.raw");
    let f = std::fs::File::create(&path).ctx(|| "creating benchmark image")?;
    f.set_len(disk).ctx(|| "sizing benchmark image")?;
    let cs = 64usize << 10;
    let pattern = mixed_chunks(1024, cs, 7);
    let data = data_gib << 30;
    let per_region = 64u64 << 20;
    let regions = data / per_region;
    for r in 0..regions {
        // Regions every 256 MiB; every 8th region repeats region 0 (duplicate data).
        let base = r * (disk / regions);
        for i in 0..(per_region / cs as u64) {
            let src = if r % 8 == 7 {
                i as usize
            } else {
                (i as usize + r as usize * 31) % 1024
            };
            let mut c = pattern[src].clone();
            if r % 8 != 7 {
                c[..8].copy_from_slice(&(r * 1_000_000 + i).to_le_bytes());
            }
            f.write_all_at(&c, base + i * cs as u64)
                .ctx(|| "writing benchmark image")?;
        }
    }
    f.sync_all().ctx(|| "syncing benchmark image")?;
    drop(f);
    let vault = Vault::create(&dir.join("img-vault"), ChunkSize::new(cs as u32)?, level)?;
    let src = RawSource::open(&path)?;
    let t = Instant::now();
    let m = backup_disk(&vault, Box::new(src), &BackupOptions::default())?;
    let backup_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = dir.join("restored.raw");
    restore_disk(
        &vault,
        &m.disks[0],
        &out,
        ImageFormat::Raw,
        None,
        &BackupOptions::default(),
    )?;
    let restore_seconds = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_dir_all(dir.join("img-vault"));
    let secret = crate::vault::keys::KeySecret::KeyFile(zeroize::Zeroizing::new(rand::random()));
    let enc_vault = Vault::create_with(
        &dir.join("img-vault-enc"),
        ChunkSize::new(cs as u32)?,
        level,
        None,
        Some(&secret),
    )?;
    let t = Instant::now();
    backup_disk(
        &enc_vault,
        Box::new(RawSource::open(&path)?),
        &BackupOptions::default(),
    )?;
    let encrypted_backup_seconds = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(ImageFigures {
        disk_bytes: disk,
        data_bytes: data,
        backup_seconds,
        backup_logical_mb_s: disk as f64 / 1e6 / backup_seconds,
        backup_allocated_mb_s: data as f64 / 1e6 / backup_seconds,
        bytes_stored: m.bytes_stored(),
        encrypted_backup_seconds,
        encrypted_overhead_percent: (encrypted_backup_seconds / backup_seconds - 1.0) * 100.0,
        restore_seconds,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

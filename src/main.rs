//! The `blockvault` command line: parses arguments, calls `blockvault::app`, prints.
//! `anyhow` lives only here.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;

use blockvault::app::App;
use blockvault::backup::{BackupOptions, Progress};
use blockvault::cbt::{ChangeHint, parse_change_list};
use blockvault::chunk::ChunkSize;
use blockvault::manifest::{BackupManifest, ResourceKind};
use blockvault::restore::ImageFormat;

#[derive(Parser)]
#[command(
    name = "blockvault",
    version,
    about = "Block-level backup appliance for virtual machine disks"
)]
struct Cli {
    /// Data directory (catalog and default vault location).
    #[arg(
        long,
        global = true,
        env = "BLOCKVAULT_DATA",
        default_value = "./blockvault-data"
    )]
    data: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars or chatter.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Worker threads (default: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage vaults.
    #[command(subcommand)]
    Vault(VaultCmd),
    /// Back up a disk image (raw, qcow2, vmdk; `raw:`/`qcow2:`/`vmdk:` force a format).
    ///
    /// One source backs up a disk. Several sources (`NAME=SPEC` or just `SPEC`, named
    /// disk0, disk1, …) back up a server made of image files as one backup (`--id` names
    /// the server). `qmp:SOCKET` captures every disk of a running QEMU VM or
    /// qemu-storage-daemon at one instant (copy-before-write fleecing; incremental
    /// through dirty bitmaps it manages itself).
    Backup {
        #[arg(required = true)]
        sources: Vec<String>,
        #[arg(long)]
        vault: String,
        /// Stable id of the disk (default: the absolute source path) or the server name.
        #[arg(long)]
        id: Option<String>,
        /// Backup name (default manualbk_<yyyymmdd-hhmmss>).
        #[arg(long)]
        name: Option<String>,
        /// NBD source: the dirty bitmap NAME records every change since the previous
        /// backup of this disk taken with --bitmap NAME (the first one is full).
        #[arg(long, conflicts_with_all = ["since_base", "changed_extents"])]
        bitmap: Option<String>,
        /// The source is an overlay (qcow2 with backing file, VMDK delta) on the image the
        /// previous backup of this disk read: read only the overlay's own clusters.
        #[arg(long, conflicts_with = "changed_extents")]
        since_base: bool,
        /// JSON list of changed extents [{"start":…,"length":…}] (VMware CBT shape).
        #[arg(long)]
        changed_extents: Option<PathBuf>,
        /// The backup (id or name) the change list is relative to (default: the latest).
        #[arg(long, requires = "changed_extents")]
        since: Option<String>,
        #[command(flatten)]
        server: Box<ServerArgs>,
    },
    /// List or delete backups.
    #[command(subcommand)]
    Backups(BackupsCmd),
    /// Restore a backup (id or name) into a new disk image; a server backup's disks go
    /// into directory --to as <disk>.<format> unless --disk picks one.
    Restore {
        backup: String,
        #[arg(long)]
        to: PathBuf,
        #[arg(long, default_value = "raw")]
        format: String,
        /// Disk of a multi-disk backup (default: the first).
        #[arg(long)]
        disk: Option<String>,
        /// Size of the new disk (bytes, or with K/M/G/T): may grow it, never shrink it.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Full-server image instead of disk images: ova (OVF + streamOptimized VMDKs in
        /// DIR/<server>.ova, or --to X.ova) or qcow2-set (DIR with <disk>.qcow2 + server.json).
        #[arg(long, conflicts_with_all = ["disk", "format", "size"])]
        image: Option<String>,
        /// With --to nbd://…: a dirty bitmap of the target that recorded every write since
        /// the backup; only the chunks it marks are rewritten (nothing is read back).
        #[arg(long)]
        target_bitmap: Option<String>,
    },
    /// Serve one disk of a backup read-only over NBD (instant access) until interrupted.
    /// Prints the NBD URI clients connect to.
    ServeNbd {
        backup: String,
        /// Disk of a server backup (default: the first).
        #[arg(long)]
        disk: Option<String>,
        /// unix:PATH (or an absolute path) or HOST:PORT.
        #[arg(long)]
        listen: String,
    },
    /// Free the blobs no backup needs.
    Gc {
        #[arg(long)]
        vault: String,
        /// Rewrite packs whose live share fell below this percentage.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
        repack_below: u8,
    },
    /// Re-read and re-hash stored data; exit status 1 when anything is corrupt.
    Verify {
        #[arg(long)]
        vault: String,
        backup: Option<String>,
    },
    /// Measure this machine's hashing, compression, lookup and pack speeds.
    Benchmark {
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Seconds per figure.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Also back up and restore an image of 4×N GiB holding N GiB of mixed data.
        #[arg(long)]
        image_gib: Option<u64>,
    },
}

/// Options of server backups (live over QMP, or image files).
#[derive(clap::Args)]
struct ServerArgs {
    /// qmp: disks to capture, by node or device name (default: all disks of the VM, or
    /// every exported node of a qemu-storage-daemon).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// qmp: NBD server the QEMU process already runs (unix socket path or HOST:PORT);
    /// by default blockvault starts one on a private socket and stops it afterwards.
    #[arg(long)]
    nbd_server: Option<String>,
    /// qmp: directory for the temporary fleecing images (QEMU must be able to write it).
    #[arg(long)]
    fleece_dir: Option<PathBuf>,
    /// Command run (sh -c) to quiesce applications before the point in time.
    #[arg(long)]
    freeze: Option<String>,
    /// Command run (sh -c) right after the point in time; runs whenever --freeze was tried.
    #[arg(long)]
    thaw: Option<String>,
    /// Guest agent socket: guest-fsfreeze-freeze/thaw around the point in time.
    #[arg(long)]
    qga: Option<PathBuf>,
    /// Limit for each freeze or thaw step, in seconds.
    #[arg(long, default_value_t = 60.0)]
    freeze_timeout: f64,
}

impl ServerArgs {
    fn hooks(&self) -> blockvault::freeze::FreezeHooks {
        blockvault::freeze::FreezeHooks {
            freeze_script: self.freeze.clone(),
            thaw_script: self.thaw.clone(),
            qga: self.qga.clone(),
            timeout: Some(Duration::from_secs_f64(self.freeze_timeout.max(0.001))),
        }
    }
}

/// A size in bytes, or with a K/M/G/T suffix (powers of 1024).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("bad size {s:?}"))
}

/// `NAME=SPEC` or `SPEC` (named `disk<i>`).
fn named_disk(i: usize, arg: &str) -> (String, String) {
    match arg.split_once('=') {
        Some((name, spec))
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !std::path::Path::new(arg).exists() =>
        {
            (name.to_string(), spec.to_string())
        }
        _ => (format!("disk{i}"), arg.to_string()),
    }
}

/// Cancel flag raised by SIGINT or SIGTERM: the running job stops cleanly.
fn cancel_on_signals() -> Result<Arc<std::sync::atomic::AtomicBool>> {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .context("installing a signal handler")?;
    }
    Ok(flag)
}

#[derive(Subcommand)]
enum VaultCmd {
    /// Create a vault.
    Create {
        name: String,
        /// Where (default <data>/vaults/NAME).
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long, default_value = "64K")]
        chunk_size: String,
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
    },
    /// List vaults.
    List,
    /// Usage of a vault.
    Info { name: String },
    /// Rebuild the catalog and the lookup index from the vault's own files.
    Rescan { name: String },
    /// Register an existing vault directory under NAME and read its backups.
    Attach { name: String, path: PathBuf },
}

#[derive(Subcommand)]
enum BackupsCmd {
    /// List backups, oldest first.
    List {
        #[arg(long)]
        vault: Option<String>,
        #[arg(long)]
        disk: Option<String>,
    },
    /// Delete a backup (GC frees its blobs).
    Delete { backup: String },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOCKVAULT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let opts = |name: Option<String>, id: Option<String>| BackupOptions {
        disk_id: id,
        name,
        threads: cli.threads,
        cancel: None,
        progress: None,
        change: ChangeHint::Auto,
    };
    match cli.cmd {
        Cmd::Vault(VaultCmd::Create {
            ref name,
            ref path,
            ref chunk_size,
            zstd_level,
        }) => {
            let app = App::open(&cli.data)?;
            let v = app.create_vault(
                name,
                path.as_deref(),
                ChunkSize::parse(chunk_size)?,
                zstd_level,
            )?;
            if cli.json {
                println!(
                    "{}",
                    json!({"name": v.name, "path": v.path, "id": v.vault_id, "chunk_size": v.chunk_size})
                );
            } else if !cli.quiet {
                println!(
                    "created vault {} at {} (chunk size {} KiB)",
                    v.name,
                    v.path.display(),
                    v.chunk_size / 1024
                );
            }
        }
        Cmd::Vault(VaultCmd::List) => {
            let app = App::open(&cli.data)?;
            let vaults = app.catalog().vaults()?;
            if cli.json {
                let v: Vec<_> = vaults
                    .iter()
                    .map(|v| json!({"name": v.name, "path": v.path, "id": v.vault_id, "chunk_size": v.chunk_size, "created": v.created}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for v in vaults {
                    println!(
                        "{:<20} {:>6} KiB  {}",
                        v.name,
                        v.chunk_size / 1024,
                        v.path.display()
                    );
                }
            }
        }
        Cmd::Vault(VaultCmd::Info { ref name }) => {
            let info = App::open(&cli.data)?.vault_info(name)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("vault       {} ({})", info.name, info.path);
                println!(
                    "chunk size  {} KiB, zstd level {}",
                    info.chunk_size / 1024,
                    info.zstd_level
                );
                println!("backups     {}", info.backups);
                println!("logical     {}", human(info.logical_bytes));
                println!(
                    "stored      {} in {} packs ({} on disk)",
                    human(info.stored_bytes),
                    info.packs,
                    human(info.pack_bytes)
                );
                println!("dedup ratio {:.2}", info.dedup_ratio);
            }
        }
        Cmd::Vault(VaultCmd::Rescan { ref name }) => {
            let n = App::open(&cli.data)?.rescan(name)?;
            if cli.json {
                println!("{}", json!({"vault": name, "backups": n}));
            } else if !cli.quiet {
                println!("vault {name}: {n} backups in the catalog");
            }
        }
        Cmd::Vault(VaultCmd::Attach { ref name, ref path }) => {
            let n = App::open(&cli.data)?.attach_vault(name, path)?;
            if cli.json {
                println!("{}", json!({"vault": name, "backups": n}));
            } else if !cli.quiet {
                println!("attached vault {name} at {}: {n} backups", path.display());
            }
        }
        Cmd::Backup {
            ref sources,
            ref vault,
            ref id,
            ref name,
            ref bitmap,
            since_base,
            ref changed_extents,
            ref since,
            ref server,
        } => {
            let app = App::open(&cli.data)?;
            let mut o = opts(name.clone(), id.clone());
            o.cancel = Some(cancel_on_signals()?);
            o.change = if let Some(b) = bitmap {
                ChangeHint::Bitmap(b.clone())
            } else if since_base {
                ChangeHint::SinceBase
            } else if let Some(f) = changed_extents {
                let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let (extents, in_file) = parse_change_list(&bytes, None)
                    .with_context(|| format!("change list {}", f.display()))?;
                ChangeHint::ChangeList {
                    extents,
                    since: since.clone().or(in_file),
                }
            } else {
                ChangeHint::Auto
            };
            let bar = progress_bar(&cli, &mut o, "backup");
            let live = sources.len() == 1 && sources[0].starts_with("qmp:");
            let m = if live {
                let sock = &sources[0]["qmp:".len()..];
                let server_id = match id {
                    Some(i) => i.clone(),
                    None => format!("qmp:{}", blockvault::app::default_disk_id(sock)),
                };
                let l = blockvault::live::LiveOptions {
                    qmp: PathBuf::from(sock),
                    nodes: server.nodes.clone(),
                    nbd_server: server.nbd_server.clone(),
                    fleece_dir: server.fleece_dir.clone(),
                    hooks: server.hooks(),
                    timeout: None,
                };
                app.backup_live(&server_id, vault, &l, &o)
            } else if sources.len() > 1 {
                let Some(server_id) = id else {
                    bail!("a backup of several disks is a server backup: name it with --id");
                };
                let disks: Vec<(String, String)> = sources
                    .iter()
                    .enumerate()
                    .map(|(i, a)| named_disk(i, a))
                    .collect();
                app.backup_server_files(server_id, vault, &disks, &server.hooks(), &o)
            } else {
                if !server.hooks().is_empty() {
                    bail!(
                        "--freeze, --thaw and --qga apply to server backups (qmp: or several disks)"
                    );
                }
                app.backup(&sources[0], vault, &o)
            };
            finish_bar(bar);
            let m = m?;
            print_backup(&cli, &m)?;
        }
        Cmd::Backups(BackupsCmd::List {
            ref vault,
            ref disk,
        }) => {
            let app = App::open(&cli.data)?;
            let list = app.catalog().backups(vault.as_deref(), disk.as_deref())?;
            if cli.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|b| backup_json(&b.manifest, Some(&b.vault)))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for b in list {
                    let m = &b.manifest;
                    println!(
                        "{:<26} {:<26} {:<10} {:>10} {:>10}  {}",
                        m.id,
                        m.name,
                        b.vault,
                        human(m.logical_size()),
                        human(m.bytes_stored()),
                        m.resource
                    );
                }
            }
        }
        Cmd::Backups(BackupsCmd::Delete { ref backup }) => {
            let m = App::open(&cli.data)?.delete_backup(backup)?;
            if cli.json {
                println!("{}", json!({"deleted": m.id, "name": m.name}));
            } else if !cli.quiet {
                println!(
                    "deleted backup {} ({}); run `gc` to free its space",
                    m.name, m.id
                );
            }
        }
        Cmd::Restore {
            ref backup,
            ref to,
            ref format,
            ref disk,
            size,
            ref target_bitmap,
            ref image,
        } => {
            let app = App::open(&cli.data)?;
            let format: ImageFormat = format.parse()?;
            let mut o = opts(None, None);
            o.cancel = Some(cancel_on_signals()?);
            if let Some(kind) = image {
                let kind: blockvault::restore::server_image::ServerImage = kind.parse()?;
                let bar = progress_bar(&cli, &mut o, "export");
                let t = std::time::Instant::now();
                let r = app.export_server(backup, to, kind, &o);
                finish_bar(bar);
                let r = r?;
                if cli.json {
                    let mut v = serde_json::to_value(&r)?;
                    v["seconds"] = json!(t.elapsed().as_secs_f64());
                    println!("{v}");
                } else if !cli.quiet {
                    println!(
                        "exported {backup} to {} ({} disks)",
                        r.path.display(),
                        r.disks.len()
                    );
                }
                return Ok(0);
            }
            let to_str = to.to_string_lossy();
            if blockvault::nbd::NbdUri::is_nbd(&to_str) {
                let bar = progress_bar(&cli, &mut o, "restore");
                let t = std::time::Instant::now();
                let st = app.restore_onto(
                    backup,
                    disk.as_deref(),
                    &to_str,
                    target_bitmap.as_deref(),
                    &o,
                );
                finish_bar(bar);
                let st = st?;
                let secs = t.elapsed().as_secs_f64();
                if cli.json {
                    let mut v = serde_json::to_value(&st)?;
                    v["backup"] = json!(backup);
                    v["to"] = json!(to_str);
                    v["seconds"] = json!(secs);
                    println!("{v}");
                } else if !cli.quiet {
                    println!(
                        "restored {backup} onto {to_str}: {} of {} chunks differed, {} written, {} zeroed ({:.1}s)",
                        st.chunks_written + st.chunks_zeroed,
                        st.chunks_total,
                        human(st.bytes_written),
                        st.chunks_zeroed,
                        secs
                    );
                }
                return Ok(0);
            }
            if target_bitmap.is_some() {
                bail!("--target-bitmap applies to a restore onto an NBD export");
            }
            let m = app.find_backup(backup)?.manifest;
            if disk.is_none() && (m.resource_kind == ResourceKind::Server || m.disks.len() > 1) {
                let bar = progress_bar(&cli, &mut o, "restore");
                let t = std::time::Instant::now();
                let done = app.restore_all(backup, to, format, &o);
                finish_bar(bar);
                let done = done?;
                let secs = t.elapsed().as_secs_f64();
                if cli.json {
                    let disks: Vec<_> = done
                        .iter()
                        .map(|(n, p, s)| {
                            json!({"disk": n, "to": p, "bytes_written": s.bytes_written,
                            "chunks_written": s.chunks_written, "chunks_zero": s.chunks_zero})
                        })
                        .collect();
                    println!(
                        "{}",
                        json!({"backup": backup, "to": to, "disks": disks, "seconds": secs})
                    );
                } else if !cli.quiet {
                    for (n, p, s) in &done {
                        println!(
                            "restored disk {n} to {} ({} written)",
                            p.display(),
                            human(s.bytes_written)
                        );
                    }
                }
                return Ok(0);
            }
            let bar = progress_bar(&cli, &mut o, "restore");
            let t = std::time::Instant::now();
            let stats = app.restore(backup, disk.as_deref(), to, format, size, &o);
            finish_bar(bar);
            let stats = stats?;
            let secs = t.elapsed().as_secs_f64();
            if cli.json {
                println!(
                    "{}",
                    json!({"backup": backup, "to": to, "bytes_written": stats.bytes_written,
                           "chunks_written": stats.chunks_written, "chunks_zero": stats.chunks_zero, "seconds": secs})
                );
            } else if !cli.quiet {
                println!(
                    "restored {} to {} ({} written, {:.1}s)",
                    backup,
                    to.display(),
                    human(stats.bytes_written),
                    secs
                );
            }
        }
        Cmd::ServeNbd {
            ref backup,
            ref disk,
            ref listen,
        } => {
            let app = App::open(&cli.data)?;
            let stop = cancel_on_signals()?;
            let listener = blockvault::nbd::server::Listener::bind(listen)?;
            println!("{}", listener.uri());
            use std::io::Write;
            std::io::stdout().flush()?;
            app.serve_nbd(backup, disk.as_deref(), &listener, &stop)?;
        }
        Cmd::Gc {
            ref vault,
            repack_below,
        } => {
            let spin = spinner(&cli, "gc: marking live blobs and sweeping packs");
            let stats = App::open(&cli.data)?.gc(vault, repack_below);
            spin.finish_and_clear();
            let stats = stats?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else if !cli.quiet {
                println!(
                    "gc {vault}: {} backups, {} live blobs; deleted {} packs, rewrote {}; removed {} blobs; freed {}",
                    stats.backups,
                    stats.live_blobs,
                    stats.packs_deleted,
                    stats.packs_rewritten,
                    stats.blobs_removed,
                    human(stats.bytes_freed)
                );
            }
        }
        Cmd::Verify {
            ref vault,
            ref backup,
        } => {
            let threads = if cli.threads == 0 {
                num_cpus()
            } else {
                cli.threads
            };
            let spin = spinner(&cli, "verify: re-reading and re-hashing packs");
            let report = App::open(&cli.data)?.verify(vault, backup.as_deref(), threads);
            spin.finish_and_clear();
            let report = report?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "verified {} packs, {} blobs, {}: {}",
                    report.packs_checked,
                    report.blobs_checked,
                    human(report.bytes_checked),
                    if report.is_clean() {
                        "all good"
                    } else {
                        "DAMAGE FOUND"
                    }
                );
                for b in &report.corrupt_blobs {
                    println!("corrupt blob {} in pack {}: {}", b.digest, b.pack, b.error);
                }
                for d in &report.damage {
                    match d.offset {
                        Some(o) => println!(
                            "  hurts backup {} ({}) {} at offset {o}: {}",
                            d.backup_name, d.backup_id, d.disk, d.what
                        ),
                        None => println!(
                            "  hurts backup {} ({}) {}: {}",
                            d.backup_name, d.backup_id, d.disk, d.what
                        ),
                    }
                }
            }
            return Ok(if report.is_clean() { 0 } else { 1 });
        }
        Cmd::Benchmark {
            zstd_level,
            seconds,
            image_gib,
        } => {
            if !(0.05..=60.0).contains(&seconds) {
                bail!("--seconds must be between 0.05 and 60");
            }
            let r = blockvault::benchmark::run(zstd_level, seconds, image_gib)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{:<28} {:>14} {:>14}  ({} threads)",
                    "", "1 thread", "all threads", r.threads
                );
                for f in &r.figures {
                    println!(
                        "{:<28} {:>14.0} {:>14.0}  {}",
                        f.name, f.single, f.all, f.unit
                    );
                }
                if let Some(i) = &r.image {
                    println!(
                        "full backup of {} disk with {} data: {:.2}s ({:.0} MB/s logical, {:.0} MB/s allocated), stored {}",
                        human(i.disk_bytes),
                        human(i.data_bytes),
                        i.backup_seconds,
                        i.backup_logical_mb_s,
                        i.backup_allocated_mb_s,
                        human(i.bytes_stored)
                    );
                    println!(
                        "restore: {:.2}s; peak RSS {:.0} MiB",
                        i.restore_seconds, i.peak_rss_mib
                    );
                }
            }
        }
    }
    Ok(0)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn backup_json(m: &BackupManifest, vault: Option<&str>) -> serde_json::Value {
    let d = m.disks.first();
    json!({
        "id": m.id,
        "name": m.name,
        "vault": vault,
        "disk_id": m.resource,
        "resource": m.resource,
        "resource_kind": m.resource_kind,
        "created": m.created,
        "logical_size": m.logical_size(),
        "bytes_allocated": m.disks.iter().map(|d| d.bytes_allocated).sum::<u64>(),
        "bytes_read": m.disks.iter().map(|d| d.bytes_read).sum::<u64>(),
        "bytes_stored": m.bytes_stored(),
        "chunks_total": m.disks.iter().map(|d| d.chunks_total).sum::<u64>(),
        "chunks_read": m.disks.iter().map(|d| d.chunks_read).sum::<u64>(),
        "chunks_new": m.disks.iter().map(|d| d.chunks_new).sum::<u64>(),
        "kind": d.map(|d| d.kind),
        "strategy": d.map(|d| d.strategy.clone()),
        "parent": d.and_then(|d| d.parent.clone()),
        "note": d.and_then(|d| d.note.clone()),
        "seconds": m.seconds,
        "capture": m.capture,
        "disks": m.disks,
    })
}

fn print_backup(cli: &Cli, m: &BackupManifest) -> Result<()> {
    if cli.json {
        println!("{}", backup_json(m, None));
    } else if !cli.quiet {
        let read: u64 = m.disks.iter().map(|d| d.bytes_read).sum();
        println!(
            "backup {} ({}) of {}: {} logical, {} read, {} new stored, {:.1}s",
            m.name,
            m.id,
            m.resource,
            human(m.logical_size()),
            human(read),
            human(m.bytes_stored()),
            m.seconds
        );
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal (and not --quiet/--json).
fn progress_bar(
    cli: &Cli,
    opts: &mut BackupOptions,
    what: &str,
) -> Option<(
    indicatif::ProgressBar,
    std::thread::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
)> {
    if cli.quiet || cli.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let progress = Arc::new(Progress::default());
    opts.progress = Some(Arc::clone(&progress));
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b, s) = (bar.clone(), Arc::clone(&stop));
    let h = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            b.set_length(progress.bytes_total.load(Ordering::Relaxed));
            b.set_position(progress.bytes_done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Some((bar, h, stop))
}

/// A spinner for jobs without a byte count (hidden unless stderr is a terminal).
fn spinner(cli: &Cli, msg: &str) -> indicatif::ProgressBar {
    if cli.quiet || cli.json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.set_message(msg.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

fn finish_bar(
    bar: Option<(
        indicatif::ProgressBar,
        std::thread::JoinHandle<()>,
        Arc<std::sync::atomic::AtomicBool>,
    )>,
) {
    if let Some((bar, h, stop)) = bar {
        stop.store(true, Ordering::Relaxed);
        let _ = h.join();
        bar.finish_and_clear();
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

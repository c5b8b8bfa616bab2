//! The `blockvault` command line: parses arguments, calls `blockvault::app`, prints.
//! `anyhow` lives only here; the larger commands and the argument types are in `cli/`.

use anyhow::{Result, bail};
use clap::Parser;
use serde_json::json;

use blockvault::app::App;
use blockvault::chunk::ChunkSize;

mod cli;

use cli::args::*;
use cli::output::*;

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
            eprintln!("error: {}", report(&e));
            std::process::exit(2);
        }
    }
}

/// The error and its causes, each once: the library's errors already print their
/// source after their own context, so a cause the text already ends with is skipped.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

fn run(cli: Cli) -> Result<i32> {
    if let Some(url) = &cli.server {
        return cli::remote::run(&cli, url);
    }
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
        Cmd::Backup(ref a) => return cli::backup::run(&cli, a),
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
        Cmd::Restore(ref a) => return cli::restore::run(&cli, a),
        Cmd::ServeNbd {
            ref backup,
            ref disk,
            ref listen,
        } => {
            let app = App::open(&cli.data)?;
            let stop = cli::cancel_on_signals()?;
            let listener = blockvault::nbd::server::Listener::bind(listen)?;
            println!("{}", listener.uri());
            use std::io::Write;
            std::io::stdout().flush()?;
            app.serve_nbd(backup, disk.as_deref(), &listener, &stop)?;
        }
        Cmd::Serve {
            ref listen,
            ref config,
        } => {
            let mut c = match config {
                Some(p) => blockvault::config::Config::load(p).map_err(anyhow::Error::msg)?,
                None => blockvault::config::Config::default(),
            };
            if let Some(l) = listen {
                c.listen = l
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--listen must be HOST:PORT"))?;
            }
            // --data (or BLOCKVAULT_DATA) wins over the config file when given.
            if config.is_none()
                || std::env::args().any(|a| a == "--data" || a.starts_with("--data="))
                || std::env::var_os("BLOCKVAULT_DATA").is_some()
            {
                c.data = cli.data.clone();
            }
            blockvault::api::run_appliance(c, |addr| {
                println!("blockvault appliance listening on http://{addr}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
        }
        Cmd::Token(TokenCmd::Create { ref role, ref name }) => {
            let role: blockvault::catalog::Role = role.parse()?;
            let name = name.clone().unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    role.as_str(),
                    &blockvault::manifest::new_backup_id()[16..]
                )
            });
            let app = App::open(&cli.data)?;
            let (info, secret) = app.catalog().create_token(&name, role)?;
            if !cli.quiet {
                println!(
                    "token {} ({}) created; the secret is shown only now:",
                    info.name,
                    info.role.as_str()
                );
            }
            println!("{secret}");
        }
        Cmd::Token(TokenCmd::List) => {
            let app = App::open(&cli.data)?;
            let list = app.catalog().tokens()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for t in list {
                    println!("{:<24} {:<9} {}", t.name, t.role.as_str(), t.created);
                }
            }
        }
        Cmd::Token(TokenCmd::Delete { ref name }) => {
            if !App::open(&cli.data)?.catalog().delete_token(name)? {
                bail!("no token named {name:?}");
            }
        }
        Cmd::Tasks(ref t) => return cli::tasks::run(&cli, None, t),
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
                for r in &stats.rotten {
                    println!(
                        "rotten blob {} (pack {} offset {}) not carried forward: {}; reached by: {}",
                        r.digest,
                        r.pack,
                        r.offset,
                        r.error,
                        r.backups.join(", ")
                    );
                }
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
                for b in &report.healed_copies {
                    println!(
                        "rotten copy of blob {} in pack {} (a good copy exists; GC drops it)",
                        b.digest, b.pack
                    );
                }
                let fixed = report.index_repaired;
                if !fixed.is_empty() {
                    println!(
                        "lookup index disagreed with the pack trailers ({} stale rows, {} missing rows): repaired",
                        fixed.stale_rows, fixed.missing_rows
                    );
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

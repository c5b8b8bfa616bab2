//! `gc` and `verify` in local mode.

use anyhow::Result;

use super::args::*;
use super::output::*;

pub fn run(cli: &Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Gc {
            ref vault,
            repack_below,
        } => {
            let spin = spinner(cli, "gc: marking live blobs and sweeping packs");
            let stats = super::open_app(cli)?.gc(vault, repack_below);
            spin.finish_and_clear();
            let stats = stats?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&stats)?);
            } else if !cli.quiet {
                outln!(
                    "gc {vault}: {} backups, {} live blobs; deleted {} packs, rewrote {}; removed {} blobs; freed {}",
                    stats.backups,
                    stats.live_blobs,
                    stats.packs_deleted,
                    stats.packs_rewritten,
                    stats.blobs_removed,
                    human(stats.bytes_freed)
                );
                for r in &stats.rotten {
                    outln!(
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
            sample,
            rate_mb_s,
        } => {
            let threads = if cli.threads == 0 {
                num_cpus()
            } else {
                cli.threads
            };
            let spin = spinner(cli, "verify: re-reading and re-hashing packs");
            let req = blockvault::service::VerifyRequest {
                sample,
                backups: backup.iter().cloned().collect(),
                rate_mb_s,
            };
            let pace = blockvault::vault::verify::Pace {
                bytes_per_second: req.bytes_per_second(),
                ..Default::default()
            };
            let report = blockvault::service::verify_report(
                &super::open_app(cli)?,
                vault,
                &req,
                threads,
                pace,
            )
            .map(|(r, _)| r);
            spin.finish_and_clear();
            let report = report?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                outln!(
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
                    outln!("corrupt blob {} in pack {}: {}", b.digest, b.pack, b.error);
                }
                for b in &report.healed_copies {
                    outln!(
                        "rotten copy of blob {} in pack {} (a good copy exists; GC drops it)",
                        b.digest,
                        b.pack
                    );
                }
                let fixed = report.index_repaired;
                if !fixed.is_empty() {
                    outln!(
                        "lookup index disagreed with the pack trailers ({} stale rows, {} missing rows): repaired",
                        fixed.stale_rows,
                        fixed.missing_rows
                    );
                }
                for p in &report.lock_journal {
                    outln!("lock journal damaged: {p}");
                }
                for d in &report.damage {
                    match d.offset {
                        Some(o) => outln!(
                            "  hurts backup {} ({}) {} at offset {o}: {}",
                            d.backup_name,
                            d.backup_id,
                            d.disk,
                            d.what
                        ),
                        None => outln!(
                            "  hurts backup {} ({}) {}: {}",
                            d.backup_name,
                            d.backup_id,
                            d.disk,
                            d.what
                        ),
                    }
                }
            }
            return Ok(if report.is_clean() {
                0
            } else {
                super::exit::CORRUPT.code
            });
        }
        _ => {}
    }
    Ok(0)
}

//! Output of the command line: JSON shapes, human sizes, progress bars and spinners.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::args::Cli;
use blockvault::backup::{BackupOptions, Progress};
use blockvault::manifest::BackupManifest;

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

pub fn backup_json(m: &BackupManifest, vault: Option<&str>) -> serde_json::Value {
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
        "format": d.map(|d| d.format.clone()),
        "reader": d.and_then(|d| d.reader.clone()),
        "encryption": d.and_then(|d| d.encryption.clone()),
        "parent": d.and_then(|d| d.parent.clone()),
        "note": d.and_then(|d| d.note.clone()),
        "seconds": m.seconds,
        "capture": m.capture,
        "disks": m.disks,
    })
}

pub fn print_backup(cli: &Cli, m: &BackupManifest) -> Result<()> {
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
pub fn progress_bar(
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
pub fn spinner(cli: &Cli, msg: &str) -> indicatif::ProgressBar {
    if cli.quiet || cli.json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.set_message(msg.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

pub fn finish_bar(
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

pub fn human(n: u64) -> String {
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

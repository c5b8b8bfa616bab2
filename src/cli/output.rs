//! Output of the command line: JSON shapes, human tables, sizes, progress bars and
//! spinners. Everything printed goes through [`write_out`] (the `outln!` macro) so that
//! a closed pipe (`blockvault backups list | head -1`) ends the process quietly with
//! status 0 instead of a panic.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use super::args::Cli;
use blockvault::backup::{BackupOptions, Progress};

/// Write one line on stdout. A reader that went away (EPIPE) ends the process
/// quietly with status 0: the output was wanted no further. Any other write error
/// is an I/O failure (exit 7).
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        write_err(format_args!("error: writing to stdout: {e}"));
        std::process::exit(super::exit::IO.code);
    }
}

/// Write one line on stderr; a closed stderr is ignored (nothing better to do).
pub fn write_err(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

/// A human table: a header row, then one row per item, columns padded to their widest
/// cell; a column whose header starts with '>' is right-aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut width: Vec<usize> = headers
        .iter()
        .map(|h| h.trim_start_matches('>').chars().count())
        .collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let right = headers[i].starts_with('>');
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if right {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < n {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s
    };
    let mut out = vec![line(
        headers.iter().map(|h| h.trim_start_matches('>')).collect(),
    )];
    for r in rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The human table of a vault listing (`GET /vaults` / `vault list --json` shape).
pub fn vault_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            vec![
                x["name"].as_str().unwrap_or("").to_string(),
                format!("{} KiB", x["chunk_size"].as_u64().unwrap_or(0) / 1024),
                x["backups"].as_u64().unwrap_or(0).to_string(),
                human(x["stored_bytes"].as_u64().unwrap_or(0)),
                x["path"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table(&["NAME", ">CHUNK", ">BACKUPS", ">STORED", "PATH"], &rows)
}

/// Columns of a human backup listing (local and remote alike).
pub const BACKUP_HEADERS: [&str; 6] = ["ID", "NAME", "VAULT", ">LOGICAL", ">NEW", "RESOURCE"];

pub fn backup_row(
    id: &str,
    name: &str,
    vault: &str,
    logical: u64,
    new: u64,
    resource: &str,
) -> Vec<String> {
    vec![
        id.to_string(),
        name.to_string(),
        vault.to_string(),
        human(logical),
        human(new),
        resource.to_string(),
    ]
}

/// A backup's outcome: the shared JSON view (see `App::backup_view`), or one line.
/// A `warning` in the view (committed, but not recorded in the catalog) has already
/// gone to stderr as a WARN log line when it was raised.
pub fn print_backup(cli: &Cli, v: &Value) -> Result<()> {
    if cli.json {
        outln!("{v}");
    } else if !cli.quiet {
        outln!(
            "backup {} ({}) of {}: {} logical, {} read, {} new stored, {:.1}s",
            v["name"].as_str().unwrap_or(""),
            v["id"].as_str().unwrap_or(""),
            v["resource"].as_str().unwrap_or(""),
            human(v["logical_size"].as_u64().unwrap_or(0)),
            human(v["bytes_read"].as_u64().unwrap_or(0)),
            human(v["bytes_new"].as_u64().unwrap_or(0)),
            v["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// `backups show`: the JSON of `GET /backups/{id}`, or a page for people.
pub fn print_backup_detail(cli: &Cli, v: &Value) -> Result<()> {
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let u = |k: &str| human(v[k].as_u64().unwrap_or(0));
    outln!("backup      {} ({})", s("name"), s("id"));
    outln!("of          {} ({})", s("resource"), s("resource_kind"));
    outln!("vault       {}", s("vault"));
    outln!("created     {}", s("created"));
    outln!("kind        {} via {}", s("kind"), s("strategy"));
    outln!(
        "sizes       {} logical, {} allocated, {} read, {} new stored",
        u("logical_size"),
        u("bytes_allocated"),
        u("bytes_read"),
        u("bytes_new")
    );
    outln!(
        "frees       {} if deleted (after gc)",
        u("bytes_freed_if_deleted")
    );
    outln!("protected   {}", s("protected"));
    if let Some(u) = v["locked_until"].as_str() {
        outln!(
            "locked      until {u} ({})",
            v["lock_reason"].as_str().unwrap_or("")
        );
    }
    let rows: Vec<Vec<String>> = v["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            vec![
                d["name"].as_str().unwrap_or("").to_string(),
                d["disk_id"].as_str().unwrap_or("").to_string(),
                human(d["size"].as_u64().unwrap_or(0)),
                human(d["bytes_read"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    outln!("{}", table(&["DISK", "DISK ID", ">SIZE", ">READ"], &rows));
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

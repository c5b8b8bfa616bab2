//! `blockvault restore`: new images, a server's disks into a directory, full-server
//! images (OVA, qcow2 set), or onto an existing disk over NBD — one
//! [`RestoreRequest`], carried out in-process or by a running appliance.

use anyhow::Result;
use serde_json::json;

use super::args::{Cli, RestoreArgs};
use super::output::{finish_bar, human, progress_bar};
use super::{cancel_on_signals, options};
use blockvault::app::RestoreRequest;

pub fn request(a: &RestoreArgs) -> RestoreRequest {
    RestoreRequest {
        backup: a.backup.clone(),
        disk: a.disk.clone(),
        to: a.to.to_string_lossy().into_owned(),
        format: a.format.clone(),
        force_format: a.force_format,
        size: a.size,
        image: a.image.clone(),
        target_bitmap: a.target_bitmap.clone(),
        mode: a.mode.clone(),
        keep_going: a.keep_going,
        nbd_tls: a.nbd_tls.settings(),
        overwrite: a.overwrite,
    }
}

pub fn run(cli: &Cli, a: &RestoreArgs) -> Result<i32> {
    let app = super::open_app(cli)?;
    let mut o = options(cli, None, None);
    o.cancel = Some(cancel_on_signals()?);
    let bar = progress_bar(cli, &mut o, "restore");
    let t = std::time::Instant::now();
    // `latest` and id prefixes resolved, the format taken from the extension: the
    // outcome names the backup by its id, as the appliance's restore task does.
    let req = app.resolve_restore(&request(a));
    let r = req.and_then(|req| Ok((app.run_restore(&req, &o)?, req.backup)));
    finish_bar(bar);
    let (r, backup) = r?;
    let mut v = serde_json::to_value(r)?;
    v["backup"] = json!(backup);
    v["seconds"] = json!(t.elapsed().as_secs_f64());
    print_outcome(cli, &v)
}

/// Print a restore's outcome (the JSON of a [`RestoreOutcome`] plus `backup` and
/// `seconds`), as it came from this process or from an appliance. Exit code 5 (corrupt) when a
/// `--keep-going` restore left unreadable ranges as zeros (they are listed on stderr).
pub fn print_outcome(cli: &Cli, v: &serde_json::Value) -> Result<i32> {
    // (image file, bad ranges) of every disk written.
    let mut bad = Vec::new();
    for d in std::iter::once(v).chain(v["disks"].as_array().into_iter().flatten()) {
        if let Some(r) = d["bad_ranges"].as_array().filter(|r| !r.is_empty()) {
            bad.push((d["to"].as_str().unwrap_or("").to_string(), r.clone()));
        }
    }
    let code = if bad.is_empty() {
        0
    } else {
        super::exit::CORRUPT.code
    };
    if !cli.json {
        for (to, ranges) in &bad {
            eprintln!("{to}: {} unreadable range(s) left as zeros:", ranges.len());
            for r in ranges {
                let off = r["offset"].as_u64().unwrap_or(0);
                let len = r["length"].as_u64().unwrap_or(0);
                eprintln!(
                    "  offset {off} length {len} (bytes {off}..{}): {}",
                    off + len,
                    r["error"].as_str().unwrap_or("")
                );
            }
        }
    }
    if cli.json {
        outln!("{v}");
        return Ok(code);
    }
    if cli.quiet {
        return Ok(code);
    }
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let secs = v["seconds"].as_f64().unwrap_or(0.0);
    let backup = s("backup");
    match s("mode").as_str() {
        "server_image" => outln!(
            "exported {backup} to {} ({} disks, {:.1}s)",
            s("path"),
            v["disks"].as_array().map_or(0, Vec::len),
            secs
        ),
        "onto" => outln!(
            "restored {backup} onto {}: {} of {} chunks differed, {} written, {} zeroed ({secs:.1}s)",
            s("to"),
            u("chunks_written") + u("chunks_zeroed"),
            u("chunks_total"),
            human(u("bytes_written")),
            u("chunks_zeroed"),
        ),
        "directory" => {
            for d in v["disks"].as_array().into_iter().flatten() {
                outln!(
                    "restored disk {} to {} ({} written)",
                    d["disk"].as_str().unwrap_or(""),
                    d["to"].as_str().unwrap_or(""),
                    human(d["bytes_written"].as_u64().unwrap_or(0))
                );
            }
        }
        _ => outln!(
            "restored {backup} to {} ({} written, {secs:.1}s)",
            s("to"),
            human(u("bytes_written")),
        ),
    }
    Ok(code)
}

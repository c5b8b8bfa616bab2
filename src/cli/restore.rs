//! `blockvault restore`: new images, a server's disks into a directory, full-server
//! images (OVA, qcow2 set), or onto an existing disk over NBD.

use anyhow::{Result, bail};
use serde_json::json;

use super::args::{Cli, RestoreArgs};
use super::output::{finish_bar, human, progress_bar};
use super::{cancel_on_signals, options};
use blockvault::app::App;
use blockvault::manifest::ResourceKind;
use blockvault::restore::ImageFormat;

pub fn run(cli: &Cli, a: &RestoreArgs) -> Result<i32> {
    let RestoreArgs {
        ref backup,
        ref to,
        ref format,
        ref disk,
        size,
        ref target_bitmap,
        ref image,
    } = *a;
    let app = App::open(&cli.data)?;
    let format: ImageFormat = format.parse()?;
    let mut o = options(cli, None, None);
    o.cancel = Some(cancel_on_signals()?);
    if let Some(kind) = image {
        let kind: blockvault::restore::server_image::ServerImage = kind.parse()?;
        let bar = progress_bar(cli, &mut o, "export");
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
        let bar = progress_bar(cli, &mut o, "restore");
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
        let bar = progress_bar(cli, &mut o, "restore");
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
    let bar = progress_bar(cli, &mut o, "restore");
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
    Ok(0)
}

//! `blockvault files`: partitions, `ls` and `get` on a backup's disk, read from its chunks.

use anyhow::Result;
use serde_json::json;

use super::args::{Cli, FilesArgs, FilesCmd};
use super::output::{human, table, write_err};
use blockvault::app::App;
use blockvault::files::{Entry, EntryKind, extract, normalize};

pub fn run(cli: &Cli, a: &FilesArgs) -> Result<i32> {
    let app = App::open(&cli.data)?;
    let s = app.open_files(&a.backup, a.disk.as_deref())?;
    match &a.cmd {
        FilesCmd::Partitions => {
            if cli.json {
                let v = json!({
                    "backup": s.backup_id,
                    "disk": s.disk_name,
                    "scheme": s.disk.scheme,
                    "partitions": s.disk.partitions,
                });
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!("disk {}: {:?} partition table", s.disk_name, s.disk.scheme);
                let rows: Vec<Vec<String>> = s
                    .disk
                    .partitions
                    .iter()
                    .map(|p| {
                        vec![
                            p.number.to_string(),
                            p.start.to_string(),
                            human(p.size),
                            p.type_id.clone(),
                            p.fs.as_str().to_string(),
                            match (&p.problem, p.supported) {
                                (Some(pr), _) => pr.clone(),
                                (None, true) => "yes".into(),
                                (None, false) => "no".into(),
                            },
                            p.name.clone(),
                        ]
                    })
                    .collect();
                outln!(
                    "{}",
                    table(
                        &["#", ">START", ">SIZE", "TYPE", "FS", "READABLE", "NAME"],
                        &rows
                    )
                    .trim_end()
                );
            }
        }
        FilesCmd::Ls { path, long } => {
            let vol = s.disk.volume(a.partition)?;
            let p = normalize(path)?;
            let top = vol.stat(&p)?;
            let entries = if top.kind == EntryKind::Dir {
                vol.list(&p)?
            } else {
                vec![top]
            };
            if cli.json {
                let v = json!({"backup": s.backup_id, "disk": s.disk_name, "path": path, "entries": entries});
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else if *long {
                for e in &entries {
                    outln!("{}", long_line(e));
                }
            } else {
                for e in &entries {
                    let slash = if e.kind == EntryKind::Dir { "/" } else { "" };
                    outln!("{}{slash}", e.name);
                }
            }
        }
        FilesCmd::Get { path, to } => {
            let vol = s.disk.volume(a.partition)?;
            let p = normalize(path)?;
            let t = std::time::Instant::now();
            let r = extract::get(vol.as_ref(), &p, to)?;
            let seconds = t.elapsed().as_secs_f64();
            let code = if r.failed.is_empty() {
                0
            } else if r
                .failed
                .iter()
                .any(|f| f.kind == blockvault::ErrorKind::Corrupt)
            {
                super::exit::CORRUPT.code
            } else {
                super::exit::FAILED.code
            };
            if cli.json {
                let mut v = serde_json::to_value(&r)?;
                v["backup"] = json!(s.backup_id);
                v["disk"] = json!(s.disk_name);
                v["seconds"] = json!(seconds);
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for f in &r.failed {
                    write_err(format_args!("error: {}", f.error));
                }
                for f in &r.skipped {
                    write_err(format_args!("skipped: {}: {}", f.path, f.error));
                }
                if !cli.quiet {
                    outln!(
                        "restored {} files, {} directories, {} symlinks ({}) to {} in {:.2}s{}",
                        r.files,
                        r.dirs,
                        r.symlinks,
                        human(r.bytes),
                        r.to.display(),
                        seconds,
                        if r.failed.is_empty() {
                            String::new()
                        } else {
                            format!("; {} failed (listed above)", r.failed.len())
                        }
                    );
                }
            }
            return Ok(code);
        }
    }
    Ok(0)
}

fn long_line(e: &Entry) -> String {
    let t = match e.kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::File => '-',
        EntryKind::Special => '?',
    };
    let mut perm = String::new();
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        perm.push(if e.mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    let when = time::OffsetDateTime::from_unix_timestamp(e.mtime)
        .ok()
        .and_then(|d| {
            d.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| e.mtime.to_string());
    let target = e
        .target
        .as_ref()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    format!(
        "{t}{perm} {:>6} {:>6} {:>12} {when} {}{target}",
        e.uid, e.gid, e.size, e.name
    )
}

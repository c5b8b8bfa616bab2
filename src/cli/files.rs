//! `blockvault files`: partitions, `ls` and `get` on a backup's disk, read from its chunks.

use anyhow::Result;
use serde_json::{Value, json};

use super::args::{Cli, FilesArgs, FilesCmd};
use super::output::{human, table, write_err};
use blockvault::files::{EntryKind, extract, normalize};

pub fn run(cli: &Cli, a: &FilesArgs) -> Result<i32> {
    let app = super::open_app(cli)?;
    let s = app.open_files(&a.backup, a.disk.as_deref())?;
    match &a.cmd {
        FilesCmd::Partitions => {
            let v = json!({
                "backup": s.backup_id,
                "disk": s.disk_name,
                "scheme": s.disk.scheme,
                "partitions": s.disk.partitions,
            });
            print_partitions(cli, &v)?;
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
            let v = json!({"backup": s.backup_id, "disk": s.disk_name, "path": path, "entries": entries});
            print_listing(cli, &v, *long)?;
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
                        "restored {} files, {} directories, {} symlinks, {} hard links ({}) to {} in {:.2}s{}",
                        r.files,
                        r.dirs,
                        r.symlinks,
                        r.links,
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

/// `files partitions` from its JSON (local or the API's `GET /backups/{id}/files`).
pub fn print_partitions(cli: &Cli, v: &Value) -> Result<()> {
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let str_of = |x: &Value| x.as_str().unwrap_or("").to_string();
    outln!(
        "disk {}: {} partition table",
        str_of(&v["disk"]),
        str_of(&v["scheme"])
    );
    let rows: Vec<Vec<String>> = v["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                p["number"].to_string(),
                p["start"].to_string(),
                human(p["size"].as_u64().unwrap_or(0)),
                str_of(&p["type_id"]),
                str_of(&p["fs"]),
                match (p["problem"].as_str(), p["supported"].as_bool()) {
                    (Some(pr), _) => pr.to_string(),
                    (None, Some(true)) => "yes".into(),
                    _ => "no".into(),
                },
                str_of(&p["name"]),
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
    Ok(())
}

/// `files ls` from its JSON (local or the API's).
pub fn print_listing(cli: &Cli, v: &Value, long: bool) -> Result<()> {
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    for e in v["entries"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or("");
        if long {
            outln!("{}", long_line(e));
        } else if e["kind"] == "dir" {
            outln!("{name}/");
        } else {
            outln!("{name}");
        }
    }
    Ok(())
}

fn long_line(e: &Value) -> String {
    let num = |k: &str| e[k].as_u64().unwrap_or(0);
    let t = match e["kind"].as_str() {
        Some("dir") => 'd',
        Some("symlink") => 'l',
        Some("file") => '-',
        _ => '?',
    };
    let mode = num("mode");
    let mut perm = String::new();
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        perm.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    let mtime = e["mtime"].as_i64().unwrap_or(0);
    let when = time::OffsetDateTime::from_unix_timestamp(mtime)
        .ok()
        .and_then(|d| {
            d.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| mtime.to_string());
    let target = e["target"]
        .as_str()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    format!(
        "{t}{perm} {:>6} {:>6} {:>12} {when} {}{target}",
        num("uid"),
        num("gid"),
        num("size"),
        e["name"].as_str().unwrap_or("")
    )
}

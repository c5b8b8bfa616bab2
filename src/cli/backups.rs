//! `backups list|show|delete|lock|protect` in local mode.

use anyhow::Result;
use serde_json::json;

use super::args::*;
use super::output::*;

pub fn run(cli: &Cli, cmd: &BackupsCmd) -> Result<i32> {
    match *cmd {
        BackupsCmd::List {
            ref vault,
            ref disk,
        } => {
            let app = super::open_app(cli)?;
            let list = app.catalog().backups(vault.as_deref(), disk.as_deref())?;
            if cli.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|b| app.backup_view(&b.vault, &b.manifest))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|b| {
                        let m = &b.manifest;
                        backup_row(
                            &m.id,
                            &m.name,
                            &b.vault,
                            m.logical_size(),
                            m.bytes_stored(),
                            &m.resource,
                        )
                    })
                    .collect();
                outln!("{}", table(&BACKUP_HEADERS, &rows));
            }
        }
        BackupsCmd::Show {
            ref backup,
            ref disk,
        } => {
            let app = super::open_app(cli)?;
            let entry = app.resolve_backup(backup, disk.as_deref())?;
            let v = app.backup_detail(&entry)?;
            print_backup_detail(cli, &v)?;
        }
        BackupsCmd::Delete {
            ref backup,
            ref disk,
        } => {
            let app = super::open_app(cli)?;
            let id = app.resolve_backup(backup, disk.as_deref())?.manifest.id;
            let m = app.delete_backup(&id)?;
            if cli.json {
                outln!("{}", json!({"deleted": m.id, "name": m.name}));
            } else if !cli.quiet {
                outln!(
                    "deleted backup {} ({}); run `gc` to free its space",
                    m.name,
                    m.id
                );
            }
        }
        BackupsCmd::Lock {
            ref backup,
            ref disk,
            ref until,
        } => {
            let app = super::open_app(cli)?;
            let id = app.resolve_backup(backup, disk.as_deref())?.manifest.id;
            let until = blockvault::vault::retention::parse_until(until)?;
            let (entry, st) = app.lock_backup(&id, until, &blockvault::app::cli_actor())?;
            let until = st.until.map(blockvault::vault::retention::format_time);
            if cli.json {
                outln!(
                    "{}",
                    json!({"id": entry.manifest.id, "name": entry.manifest.name,
                           "locked_until": until, "lock_reason": st.reason})
                );
            } else if !cli.quiet {
                outln!(
                    "backup {} ({}) is locked until {}",
                    entry.manifest.name,
                    entry.manifest.id,
                    until.unwrap_or_default()
                );
            }
        }
        BackupsCmd::Protect {
            ref backup,
            ref disk,
            off,
        } => {
            let app = super::open_app(cli)?;
            let id = app.resolve_backup(backup, disk.as_deref())?.manifest.id;
            let entry = app.set_protected(&id, !off, &blockvault::app::cli_actor())?;
            if cli.json {
                outln!("{}", json!({"id": entry.manifest.id, "protected": !off}));
            } else if !cli.quiet {
                outln!(
                    "backup {} ({}) is {}",
                    entry.manifest.name,
                    entry.manifest.id,
                    if off {
                        "no longer protected"
                    } else {
                        "protected"
                    }
                );
            }
        }
    }
    Ok(0)
}

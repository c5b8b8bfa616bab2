//! `blockvault bitmaps list|retire qmp:SOCK`: the `blockvault-…` dirty bitmaps that live
//! captures leave in a QEMU's (or qemu-storage-daemon's) disks, and which of them a
//! backup chain in the catalog still needs.
//!
//! A live backup records the bitmap it started as its disk's checkpoint (manifest
//! `disks[].checkpoint.bitmap`); the next backup of that disk reads only what the bitmap
//! marks. So a bitmap is *in use* when a backup in the catalog records it, and *the
//! checkpoint* of a disk when the latest backup of that disk id records it: removing that
//! one makes the next backup of the disk a full read. `retire` removes only bitmaps named
//! `blockvault-…`, never a checkpoint unless it is named and `--force` is given.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::args::{BitmapsCmd, Cli};
use super::output::table;
use blockvault::app::App;
use blockvault::qmp::Qmp;

const PREFIX: &str = "blockvault-";

#[derive(Debug, Deserialize)]
struct Node {
    #[serde(rename = "node-name")]
    node_name: String,
    #[serde(default, rename = "dirty-bitmaps")]
    dirty_bitmaps: Vec<Bitmap>,
}

#[derive(Debug, Deserialize)]
struct Bitmap {
    #[serde(default)]
    name: String,
    #[serde(default)]
    granularity: u64,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    persistent: bool,
}

/// What the catalog says about one bitmap name.
#[derive(Default)]
struct Use {
    /// Backups (vault/name) that record it as their checkpoint.
    backups: Vec<String>,
    /// Disk ids whose latest backup records it.
    checkpoint_of: Vec<String>,
}

fn uses(app: &App) -> Result<BTreeMap<String, Use>> {
    let mut out: BTreeMap<String, Use> = BTreeMap::new();
    // Latest backup per (vault, resource, disk id): entries come oldest first.
    let mut latest: BTreeMap<(String, String, String), Option<String>> = BTreeMap::new();
    for e in app.catalog().backups(None, None)? {
        for d in &e.manifest.disks {
            let b = d.checkpoint.as_ref().and_then(|c| c.bitmap.clone());
            if let Some(b) = &b {
                out.entry(b.clone())
                    .or_default()
                    .backups
                    .push(format!("{}/{}", e.vault, e.manifest.name));
            }
            latest.insert(
                (
                    e.vault.clone(),
                    e.manifest.resource.clone(),
                    d.disk_id.clone(),
                ),
                b,
            );
        }
    }
    for ((_, _, disk), b) in latest {
        if let Some(b) = b {
            out.entry(b).or_default().checkpoint_of.push(disk);
        }
    }
    Ok(out)
}

/// Named bitmaps per node (deduplicated: a node shows once however it is listed).
fn bitmaps(qmp: &mut Qmp) -> Result<Vec<(String, Bitmap)>> {
    let nodes: Vec<Node> = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let mut out: Vec<(String, Bitmap)> = Vec::new();
    for n in nodes {
        for b in n.dirty_bitmaps {
            if !b.name.is_empty()
                && !out
                    .iter()
                    .any(|(m, x)| *m == n.node_name && x.name == b.name)
            {
                out.push((n.node_name.clone(), b));
            }
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1.name).cmp(&(&b.0, &b.1.name)));
    Ok(out)
}

fn connect(target: &str) -> Result<Qmp> {
    let Some(sock) = target.strip_prefix("qmp:") else {
        bail!("{target}: give the QEMU monitor as qmp:SOCKET");
    };
    Qmp::connect(Path::new(sock), Duration::from_secs(30))
        .with_context(|| format!("connecting to QMP at {sock}"))
}

pub fn run(cli: &Cli, cmd: &BitmapsCmd) -> Result<i32> {
    let app = App::open(&cli.data)?;
    let used = uses(&app)?;
    match cmd {
        BitmapsCmd::List { target } => {
            let mut qmp = connect(target)?;
            let list = bitmaps(&mut qmp)?;
            let rows: Vec<Value> = list
                .iter()
                .map(|(node, b)| {
                    let u = used.get(&b.name);
                    json!({
                        "node": node,
                        "name": b.name,
                        "granularity": b.granularity,
                        "dirty_bytes": b.count,
                        "persistent": b.persistent,
                        "ours": b.name.starts_with(PREFIX),
                        "in_use": u.is_some(),
                        "used_by": u.map(|u| u.backups.clone()).unwrap_or_default(),
                        "checkpoint_of": u.map(|u| u.checkpoint_of.clone()).unwrap_or_default(),
                    })
                })
                .collect();
            if cli.json {
                super::output::write_out(format_args!(
                    "{}\n",
                    serde_json::to_string_pretty(&rows)?
                ));
            } else {
                let t: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r["node"].as_str().unwrap_or("").to_string(),
                            r["name"].as_str().unwrap_or("").to_string(),
                            r["granularity"].to_string(),
                            r["dirty_bytes"].to_string(),
                            r["persistent"].to_string(),
                            if r["in_use"] == json!(true) {
                                "yes"
                            } else {
                                "no"
                            }
                            .to_string(),
                        ]
                    })
                    .collect();
                super::output::write_out(format_args!(
                    "{}\n",
                    table(
                        &[
                            "NODE",
                            "BITMAP",
                            "GRANULARITY",
                            "DIRTY BYTES",
                            "PERSISTENT",
                            "IN USE"
                        ],
                        &t
                    )
                ));
            }
            Ok(0)
        }
        BitmapsCmd::Retire {
            target,
            keep_used,
            force,
            names,
        } => {
            let mut qmp = connect(target)?;
            let list = bitmaps(&mut qmp)?;
            for n in names {
                if !list.iter().any(|(_, b)| b.name == *n) {
                    return Err(blockvault::Error::not_found(format!(
                        "{target} has no bitmap named {n} (see `blockvault bitmaps list {target}`)"
                    ))
                    .into());
                }
                if !n.starts_with(PREFIX) {
                    bail!(
                        "{n} was not made by blockvault (its name does not start with {PREFIX}); remove it with QMP block-dirty-bitmap-remove"
                    );
                }
                if let Some(u) = used.get(n)
                    && !u.checkpoint_of.is_empty()
                    && !force
                {
                    return Err(blockvault::Error::conflict(format!(
                        "{n} is the checkpoint of the latest backup of {}: removing it makes the next backup of that disk a full read; add --force to remove it anyway",
                        u.checkpoint_of.join(", ")
                    ))
                    .into());
                }
            }
            let mut removed = Vec::new();
            for (node, b) in &list {
                let u = used.get(&b.name);
                let go = if names.is_empty() {
                    b.name.starts_with(PREFIX) && u.is_none()
                } else {
                    // A named checkpoint got here only with --force (refused above).
                    names.contains(&b.name) && !(*keep_used && u.is_some() && !*force)
                };
                if go {
                    qmp.execute_value(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": b.name}),
                    )
                    .with_context(|| format!("removing bitmap {} from node {node}", b.name))?;
                    removed.push(json!({"node": node, "name": b.name}));
                }
            }
            if cli.json {
                super::output::write_out(format_args!(
                    "{}\n",
                    serde_json::to_string_pretty(&json!({"removed": removed}))?
                ));
            } else {
                for r in &removed {
                    super::output::write_out(format_args!(
                        "removed {} from {}\n",
                        r["name"].as_str().unwrap_or(""),
                        r["node"].as_str().unwrap_or("")
                    ));
                }
            }
            Ok(0)
        }
    }
}

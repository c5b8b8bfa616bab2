//! `blockvault bitmaps list|retire qmp:SOCK`: the `blockvault-…` dirty bitmaps that live
//! captures leave in a QEMU's (or qemu-storage-daemon's) disks, and which chain of the
//! catalog each belongs to.
//!
//! A live backup records the bitmap it started as its disk's checkpoint (manifest
//! `disks[].checkpoint.bitmap`); the next backup of that disk reads only what the bitmap
//! marks. A bitmap's name carries its chain's tag (`blockvault-<tag>-<time>`, one tag
//! per vault and server), so every bitmap whose tag a backup in the catalog records is
//! attributed to that chain (`vault/server`). States:
//! - `in-use`: the checkpoint of the latest backup of a disk; removing it makes the
//!   next backup of that disk a full read;
//! - `orphan`: named `blockvault-…` but no chain starts from it (superseded, left by a
//!   run that died, or of a chain this catalog does not know);
//! - `not-ours`: any other name; never removed by `retire` unless named.
//!
//! `retire --orphans` removes orphans only; `retire NAME…` removes those named, never an
//! in-use one unless `--force` is given.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::args::{BitmapsCmd, Cli};
use super::output::table;
use blockvault::app::App;
use blockvault::live::tag_of;
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
    /// `vault/server` of the chain whose latest backup of a disk records it.
    chains: Vec<String>,
    /// Backups (vault/name) that record it as their checkpoint.
    backups: Vec<String>,
    /// Disk ids whose latest backup records it, with the node it was on (if recorded).
    checkpoint_of: Vec<(String, Option<String>)>,
}

fn uses(app: &App) -> Result<BTreeMap<String, Use>> {
    let mut out: BTreeMap<String, Use> = BTreeMap::new();
    // Latest backup per (vault, resource, disk id): entries come oldest first.
    // (vault, resource, disk id) → (bitmap, node) of its latest backup.
    type Latest = BTreeMap<(String, String, String), Option<(String, Option<String>)>>;
    let mut latest: Latest = BTreeMap::new();
    for e in app.catalog().backups(None, None)? {
        for d in &e.manifest.disks {
            let b = d
                .checkpoint
                .as_ref()
                .and_then(|c| Some((c.bitmap.clone()?, c.node.clone())));
            if let Some((b, _)) = &b {
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
    for ((vault, server, disk), b) in latest {
        if let Some((b, node)) = b {
            let u = out.entry(b).or_default();
            u.checkpoint_of.push((disk, node));
            let chain = format!("{vault}/{server}");
            if !u.chains.contains(&chain) {
                u.chains.push(chain);
            }
        }
    }
    Ok(out)
}

/// `vault/server` of every chain tag the catalog's backups record.
fn chains(app: &App) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in app.catalog().backups(None, None)? {
        for d in &e.manifest.disks {
            if let Some(tag) = d
                .checkpoint
                .as_ref()
                .and_then(|c| c.bitmap.as_deref())
                .and_then(tag_of)
            {
                out.entry(tag.to_string())
                    .or_insert_with(|| format!("{}/{}", e.vault, e.manifest.resource));
            }
        }
    }
    Ok(out)
}

/// The disks `u` is the checkpoint of, on `node` (or on any node).
fn checkpoint_of(u: &Use, node: Option<&str>) -> Vec<String> {
    u.checkpoint_of
        .iter()
        .filter(|(_, n)| node.is_none() || n.is_none() || n.as_deref() == node)
        .map(|(d, _)| d.clone())
        .collect()
}

fn is_current(used: &BTreeMap<String, Use>, name: &str) -> bool {
    used.get(name).is_some_and(|u| !u.checkpoint_of.is_empty())
}

fn state(used: &BTreeMap<String, Use>, name: &str) -> &'static str {
    if !name.starts_with(PREFIX) {
        "not-ours"
    } else if is_current(used, name) {
        "in-use"
    } else {
        "orphan"
    }
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
    let app = super::open_app(cli)?;
    let used = uses(&app)?;
    let known = chains(&app)?;
    match cmd {
        BitmapsCmd::List { target } => {
            let mut qmp = connect(target)?;
            let list = bitmaps(&mut qmp)?;
            let rows: Vec<Value> = list
                .iter()
                .map(|(node, b)| {
                    let u = used.get(&b.name);
                    let chain = u
                        .and_then(|u| u.chains.first().cloned())
                        .or_else(|| tag_of(&b.name).and_then(|t| known.get(t).cloned()));
                    json!({
                        "node": node,
                        "name": b.name,
                        "granularity": b.granularity,
                        "dirty_bytes": b.count,
                        "persistent": b.persistent,
                        "ours": b.name.starts_with(PREFIX),
                        "state": state(&used, &b.name),
                        "chain": chain,
                        "in_use": is_current(&used, &b.name),
                        "used_by": u.map(|u| u.backups.clone()).unwrap_or_default(),
                        "checkpoint_of": u.map(|u| checkpoint_of(u, Some(node))).unwrap_or_default(),
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
                            r["state"].as_str().unwrap_or("").to_string(),
                            r["chain"].as_str().unwrap_or("-").to_string(),
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
                            "STATE",
                            "CHAIN"
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
            orphans,
            names,
        } => {
            if names.is_empty() != *orphans {
                bail!(
                    "say what to retire: --orphans (every blockvault bitmap no chain starts from; \
                     see `blockvault bitmaps list {target}`) or the bitmap NAMEs, not both"
                );
            }
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
                        checkpoint_of(u, None).join(", ")
                    ))
                    .into());
                }
            }
            let mut removed = Vec::new();
            for (node, b) in &list {
                let u = used.get(&b.name);
                let go = if *orphans {
                    state(&used, &b.name) == "orphan"
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

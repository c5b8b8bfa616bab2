//! Dirty-bitmap lifecycle of live captures: which bitmap a backup starts from, which it
//! may retire, and why a previous one cannot be used.
//!
//! ```text
//!  name   blockvault-<tag>-<yyyymmdd-hhmmss>      tag = 8 hex of blake3("<vault id>/<server>")
//!         one chain = one (vault, server); per disk node a chain keeps ONE bitmap: the
//!         checkpoint of its latest backup of that disk
//!  run    choose:  OLD = the previous backup's checkpoint, if it is on the node and recording
//!         instant: NEW added, OLD disabled (one transaction, in mod.rs)
//!         success: OLD removed (superseded by NEW);  failure: NEW merged into OLD, removed
//! ```
//! Before a run, on each node it captures, a chain retires only bitmaps with its own tag
//! that no latest backup of its server records (what a run that died after its instant
//! left); bitmaps of other tags (other vaults, other servers) are never touched, and
//! neither is the checkpoint of any disk of this server, whatever name the disk had.
//! A run that died after its instant leaves OLD disabled and its NEW recording: NEW (and
//! any other such leftover of the chain) is merged back into OLD and OLD re-enabled, so
//! the chain stays incremental.

use serde::Deserialize;

/// One node as `query-named-block-nodes` lists it.
#[derive(Debug, Deserialize)]
pub(super) struct NodeInfo {
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub drv: String,
    pub image: ImageInfo,
    #[serde(default, rename = "dirty-bitmaps")]
    pub dirty_bitmaps: Vec<BitmapInfo>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ImageInfo {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

#[derive(Debug, Deserialize)]
pub(super) struct BitmapInfo {
    /// Empty for anonymous bitmaps (e.g. a running backup job's own).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub recording: bool,
}

/// Tag of the chain of `server` in the vault with id `vault_id`.
pub fn chain_tag(vault_id: &str, server: &str) -> String {
    hex::encode(&blake3::hash(format!("{vault_id}/{server}").as_bytes()).as_bytes()[..4])
}

/// Prefix of every bitmap of the chain with `tag`.
pub fn chain_prefix(tag: &str) -> String {
    format!("blockvault-{tag}-")
}

/// The tag in a bitmap name `blockvault-<tag>-<stamp>`, if it is one of ours.
pub fn tag_of(bitmap: &str) -> Option<&str> {
    let rest = bitmap.strip_prefix("blockvault-")?;
    let (tag, stamp) = rest.split_once('-')?;
    (tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()) && !stamp.is_empty())
        .then_some(tag)
}

/// What to do with the bitmaps of one node before a run.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Choice {
    /// The bitmap to read changes from (the previous backup's checkpoint).
    pub old: Option<String>,
    /// Why the previous checkpoint cannot be used.
    pub note: Option<String>,
    /// Leftovers of a dead run to merge into `old` (which is then re-enabled) first.
    pub merge: Vec<String>,
    /// Bitmaps of this chain to remove (after any merge).
    pub retire: Vec<String>,
}

/// Decide for node `node`: `want` is the checkpoint of the previous backup of this
/// disk and `was_on` the node it was on (recorded since checkpoints name their node);
/// `kept` the checkpoints of the latest backups of every disk of this chain's server
/// (they are never retired).
pub(super) fn choose(
    nodes: &[NodeInfo],
    node: &NodeInfo,
    prefix: &str,
    (want, was_on): (Option<&str>, Option<&str>),
    kept: &[String],
) -> Choice {
    let ours = |b: &&BitmapInfo| b.name.starts_with(prefix) && !kept.contains(&b.name);
    let leftovers: Vec<String> = node
        .dirty_bitmaps
        .iter()
        .filter(ours)
        .map(|b| b.name.clone())
        .collect();
    let Some(want) = want else {
        return Choice {
            retire: leftovers,
            ..Choice::default()
        };
    };
    let here = node.dirty_bitmaps.iter().find(|b| b.name == want);
    let n = &node.node_name;
    match here {
        Some(b) if b.recording => Choice {
            old: Some(want.to_string()),
            retire: leftovers,
            ..Choice::default()
        },
        Some(_) => {
            // Disabled at the instant of a run that then died: that run's NEW (still
            // recording) holds every change since, so NEW merged into OLD is exact.
            let recording: Vec<String> = node
                .dirty_bitmaps
                .iter()
                .filter(ours)
                .filter(|b| b.recording)
                .map(|b| b.name.clone())
                .collect();
            if recording.is_empty() {
                Choice {
                    note: Some(format!(
                        "bitmap {want} of the previous backup is on node {n} but disabled and \
                         nothing of this chain recorded the changes since (a backup run died \
                         after its point in time and its bitmap was removed)"
                    )),
                    retire: leftovers,
                    ..Choice::default()
                }
            } else {
                Choice {
                    old: Some(want.to_string()),
                    merge: recording,
                    retire: leftovers,
                    ..Choice::default()
                }
            }
        }
        None => {
            // One run gives the same bitmap name to all its disks: only the node the
            // checkpoint names tells a renamed node apart.
            let moved = was_on.filter(|p| p != n);
            let still = moved.and_then(|p| nodes.iter().find(|m| m.node_name == p));
            let why = match (moved, still) {
                (Some(p), Some(m)) if m.dirty_bitmaps.iter().any(|b| b.name == want) => format!(
                    "bitmap {want} of the previous backup is not on node {n}: the previous \
                     backup read node {p}, which still has it (the disk's node was renamed or \
                     the disks were attached differently; name the disk with --nodes)"
                ),
                (Some(p), _) => format!(
                    "bitmap {want} of the previous backup is not on node {n}: the previous \
                     backup read node {p}, and the disk now is node {n} (QEMU restarted with \
                     other node names, or the bitmap was removed)"
                ),
                _ if node.drv != "qcow2" => format!(
                    "bitmap {want} of the previous backup is not found on node {n}; it was \
                     removed or QEMU restarted (a {} node keeps no bitmap across a restart)",
                    node.drv
                ),
                _ => format!(
                    "bitmap {want} of the previous backup is not found on node {n}; it was \
                     removed or QEMU restarted from an image without it"
                ),
            };
            Choice {
                note: Some(why),
                retire: leftovers,
                ..Choice::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, drv: &str, bitmaps: &[(&str, bool)]) -> NodeInfo {
        NodeInfo {
            node_name: name.into(),
            drv: drv.into(),
            image: ImageInfo { virtual_size: 1 },
            dirty_bitmaps: bitmaps
                .iter()
                .map(|(n, r)| BitmapInfo {
                    name: n.to_string(),
                    recording: *r,
                })
                .collect(),
        }
    }

    const P: &str = "blockvault-0a0b0c0d-";

    #[test]
    fn the_tag_is_read_back_from_our_names_only() {
        assert_eq!(
            tag_of("blockvault-0a0b0c0d-20260101-000000"),
            Some("0a0b0c0d")
        );
        assert_eq!(tag_of("blockvault-fleece-1"), None);
        assert_eq!(tag_of("user-0a0b0c0d-1"), None);
        assert_eq!(chain_prefix(&chain_tag("v", "s")).len(), P.len());
    }

    #[test]
    fn another_chains_bitmaps_and_this_servers_other_checkpoints_are_never_retired() {
        let old = format!("{P}1");
        let other_disk = format!("{P}2");
        let dead = format!("{P}3");
        let n = node(
            "d0",
            "qcow2",
            &[
                (&old, true),
                (&other_disk, true),
                (&dead, false),
                ("blockvault-ffffffff-1", true),
                ("user", true),
            ],
        );
        let kept = vec![old.clone(), other_disk.clone()];
        let c = choose(&[], &n, P, (Some(&old), Some("d0")), &kept);
        assert_eq!(c.old, Some(old));
        assert_eq!(c.retire, vec![dead]);
        assert!(c.merge.is_empty() && c.note.is_none());
    }

    #[test]
    fn a_disabled_checkpoint_takes_back_the_changes_of_the_dead_runs_bitmap() {
        let old = format!("{P}1");
        let dead = format!("{P}2");
        let n = node("d0", "qcow2", &[(&old, false), (&dead, true)]);
        let c = choose(&[], &n, P, (Some(&old), None), std::slice::from_ref(&old));
        assert_eq!(c.old, Some(old));
        assert_eq!(c.merge, vec![dead.clone()]);
        assert_eq!(c.retire, vec![dead]);
    }

    #[test]
    fn a_missing_bitmap_says_where_it_went() {
        let old = format!("{P}1");
        let a = node("a", "qcow2", &[]);
        let b = node("b", "qcow2", &[(&old, true)]);
        let nodes = [a, b];
        let c = choose(&nodes, &nodes[0], P, (Some(&old), Some("b")), &[]);
        assert!(c.note.unwrap().contains("read node b, which still has it"));
        // Another disk of the same run holds the same name: not a rename.
        let c = choose(&nodes, &nodes[0], P, (Some(&old), Some("a")), &[]);
        assert!(c.note.unwrap().contains("not found on node a"));
        let c = choose(&[], &node("r", "raw", &[]), P, (Some(&old), None), &[]);
        assert!(
            c.note
                .unwrap()
                .contains("not found on node r; it was removed or QEMU restarted")
        );
    }
}

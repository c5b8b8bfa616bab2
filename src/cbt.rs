//! Change-block tracking: decide, for one disk, whether this backup is full or
//! incremental and which extents to read (DESIGN §3).
//!
//! Strategies, best first:
//! 1. `bitmap`: the source's dirty bitmap (NBD `qemu:dirty-bitmap:NAME`) lists what changed
//!    since the previous backup of this disk that was taken with the same bitmap;
//! 2. `overlay`: the source is an overlay (qcow2 with a backing file, VMDK delta) whose
//!    base is what the previous backup of this disk read; the overlay's own clusters are
//!    the change;
//! 3. `changelist`: the caller's list of changed extents (e.g. VMware
//!    QueryChangedDiskAreas) relative to a named previous backup;
//! 4. `allocation` (first backup) or `compare` (fallback): read every allocated extent
//!    and store only chunks the vault lacks.
//!
//! Change information is trusted only when the backup it is relative to is the latest
//! backup of this disk id and that backup's index root is intact (its digest is its
//! checksum) and describes a disk of the same size. Otherwise the backup falls back to
//! `compare`, and the reason is recorded in the manifest's `note` and logged.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::index::IndexRoot;
use crate::manifest::{BackupKind, BackupManifest, Checkpoint, DiskManifest};
use crate::source::{BlockSource, Extent, push_extent};
use crate::vault::Vault;
use crate::vault::lookup::LookupIndex;
use crate::vault::walk::load_root;

/// What the caller knows about changes.
#[derive(Debug, Clone, Default)]
pub enum ChangeHint {
    /// Use what the source offers (an overlay's base), else compare.
    #[default]
    Auto,
    /// A dirty bitmap of this name tracks the changes (NBD sources).
    Bitmap(String),
    /// The source is an overlay on the image the previous backup read.
    SinceBase,
    /// A list of changed extents relative to backup `since` (id or name; default: the
    /// latest backup of the disk).
    ChangeList {
        extents: Vec<Extent>,
        since: Option<String>,
    },
}

/// A decided plan plus the checkpoint and note to record.
pub struct Decision {
    pub plan: ReadPlan,
    pub checkpoint: Option<Checkpoint>,
    pub note: Option<String>,
}

/// Parse a change list: `[{"start": N, "length": N}, ...]` (VMware
/// QueryChangedDiskAreas' shape), or `{"since": "...", "extents": [...]}`.
pub fn parse_change_list(
    bytes: &[u8],
    disk_size: Option<u64>,
) -> Result<(Vec<Extent>, Option<String>)> {
    #[derive(Deserialize)]
    struct Area {
        start: u64,
        length: u64,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Plain(Vec<Area>),
        Wrapped {
            since: Option<String>,
            extents: Vec<Area>,
        },
    }
    let list: List = serde_json::from_slice(bytes).map_err(|e| {
        Error::invalid("change list is not a JSON list of {start, length}").with_source(e)
    })?;
    let (areas, since) = match list {
        List::Plain(a) => (a, None),
        List::Wrapped { since, extents } => (extents, since),
    };
    let mut sorted: Vec<Extent> = Vec::with_capacity(areas.len());
    for a in areas.into_iter().filter(|a| a.length > 0) {
        let e = Extent::new(a.start, a.length).map_err(|e| e.context_prefix("change list"))?;
        if let Some(size) = disk_size {
            check_change(&e, size)?;
        }
        sorted.push(e);
    }
    sorted.sort();
    let mut out = Vec::new();
    for e in sorted {
        push_extent(&mut out, e.offset, e.length);
    }
    Ok((out, since))
}

/// Refuse a changed extent that overflows or lies past the end of a disk of `size` bytes:
/// such a list was made for another disk (or is hostile), and reading by it would make a
/// wrong backup.
fn check_change(e: &Extent, size: u64) -> Result<()> {
    e.check_within(size).map_err(|err| {
        err.context_prefix(
            "change list (--changed-extents): refusing the list, it does not describe this disk",
        )
    })
}

fn same_file(a: &str, b: &Path) -> bool {
    let ca = std::fs::canonicalize(a).unwrap_or_else(|_| PathBuf::from(a));
    let cb = std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf());
    ca == cb
}

/// The latest backup of `disk_id` (a disk of `resource`) in `vault` and its disk entry.
pub fn previous(
    vault: &Vault,
    resource: &str,
    disk_id: &str,
) -> Result<Option<(BackupManifest, DiskManifest)>> {
    let mut found = None;
    for m in vault.manifests_of(resource)? {
        if let Some(d) = m.disks.iter().find(|d| d.disk_id == disk_id).cloned() {
            found = Some((m, d));
        }
    }
    Ok(found)
}

/// Decide how to back up `source`.
pub fn decide(
    vault: &Vault,
    lookup: &LookupIndex,
    source: &mut dyn BlockSource,
    resource: &str,
    disk_id: &str,
    hint: &ChangeHint,
) -> Result<Decision> {
    let size = source.size();
    if let ChangeHint::ChangeList { extents, .. } = hint {
        for e in extents {
            check_change(e, size)?;
        }
    }
    let prev = previous(vault, resource, disk_id)?;
    // The parent is usable only if its index is intact and of the same geometry.
    let parent: std::result::Result<(BackupManifest, DiskManifest, IndexRoot), String> = match &prev
    {
        None => Err("this is the first backup of the disk".into()),
        Some((m, d)) => match load_root(vault, lookup, d) {
            Err(e) => Err(format!(
                "the index of previous backup {} is damaged: {e}",
                m.name
            )),
            Ok(root) if root.disk_size != size => Err(format!(
                "the disk changed size since backup {} ({} → {size} bytes)",
                m.name, root.disk_size
            )),
            Ok(root) if root.chunk_size != vault.chunk_size() => {
                Err(format!("backup {} has another chunk size", m.name))
            }
            Ok(root) => Ok((m.clone(), d.clone(), root)),
        },
    };
    let bitmap_checkpoint = match hint {
        ChangeHint::Bitmap(b) => Some(Checkpoint {
            bitmap: Some(b.clone()),
        }),
        _ => None,
    };
    let incremental =
        |strategy: &str, extents: Vec<Extent>, m: BackupManifest, root: IndexRoot| ReadPlan {
            extents,
            base: Some(root),
            kind: BackupKind::Incremental,
            strategy: strategy.into(),
            parent: Some(m.id),
        };
    let trusted: std::result::Result<ReadPlan, String> = match (hint, parent) {
        (_, Err(why)) if prev.is_none() => Err(why),
        (ChangeHint::Bitmap(b), Ok((m, d, root))) => {
            let tracked =
                d.checkpoint.as_ref().and_then(|c| c.bitmap.as_deref()) == Some(b.as_str());
            if !tracked {
                Err(format!(
                    "previous backup {} was not taken with bitmap {b}, so the bitmap cannot be trusted to hold every change since it",
                    m.name
                ))
            } else {
                match source.dirty_extents() {
                    Some(r) => Ok(incremental("bitmap", r?, m, root)),
                    None => Err(format!("the source offers no dirty bitmap {b}")),
                }
            }
        }
        (ChangeHint::ChangeList { extents, since }, Ok((m, _, root))) => match since {
            Some(s) if *s != m.id && *s != m.name => Err(format!(
                "the change list is relative to {s}, but the latest backup of this disk is {} ({})",
                m.name, m.id
            )),
            _ => Ok(incremental("changelist", extents.clone(), m, root)),
        },
        (ChangeHint::SinceBase | ChangeHint::Auto, Ok((m, d, root))) => match source.backing() {
            Some(base) if same_file(&d.source, &base) => {
                Ok(incremental("overlay", source.top_layer_extents()?, m, root))
            }
            Some(base) => Err(format!(
                "the overlay's base {} is not what backup {} read ({})",
                base.display(),
                m.name,
                d.source
            )),
            None if matches!(hint, ChangeHint::SinceBase) => {
                Err("--since-base was given, but the source is not an overlay".into())
            }
            None => Err("no change information: compare against the vault".into()),
        },
        (_, Err(why)) => Err(why),
    };
    if let Ok(plan) = &trusted {
        for e in &plan.extents {
            e.check_within(size).map_err(|err| {
                err.context_prefix(format!(
                    "{}: {} extents of the disk",
                    source.describe(),
                    plan.strategy
                ))
            })?;
        }
    }
    let decision = match trusted {
        Ok(plan) => Decision {
            plan,
            checkpoint: bitmap_checkpoint,
            note: None,
        },
        Err(why) => {
            let strategy = if prev.is_none() {
                "allocation"
            } else {
                "compare"
            };
            let note = (prev.is_some() && !matches!(hint, ChangeHint::Auto)
                || source.backing().is_some() && prev.is_some())
            .then(|| format!("full read ({strategy}): {why}"));
            if let Some(n) = &note {
                tracing::warn!(disk = disk_id, "{n}");
            }
            Decision {
                plan: ReadPlan {
                    extents: source.allocated_extents()?,
                    base: None,
                    kind: BackupKind::Full,
                    strategy: strategy.into(),
                    parent: prev.map(|(m, _)| m.id),
                },
                checkpoint: bitmap_checkpoint,
                note,
            }
        }
    };
    Ok(decision)
}

/// What to read and what to start from.
pub struct ReadPlan {
    /// Extents to read (sorted, non-overlapping).
    pub extents: Vec<Extent>,
    /// Previous index whose unread slots are kept (incremental), or None (full).
    pub base: Option<IndexRoot>,
    pub kind: BackupKind,
    pub strategy: String,
    pub parent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_lists_parse_in_both_shapes_and_merge() {
        let (e, s) = parse_change_list(
            br#"[{"start":0,"length":10},{"start":5,"length":10},{"start":100,"length":1}]"#,
            Some(200),
        )
        .unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    length: 15
                },
                Extent {
                    offset: 100,
                    length: 1
                }
            ]
        );
        assert!(s.is_none());
        let (e, s) = parse_change_list(
            br#"{"since":"b1","extents":[{"start":4096,"length":4096}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(s.as_deref(), Some("b1"));
        assert!(parse_change_list(br#"[{"start":190,"length":20}]"#, Some(200)).is_err());
        assert!(parse_change_list(b"nope", None).is_err());
    }

    #[test]
    fn change_lists_past_the_end_or_overflowing_are_refused() {
        // Overflow is refused even before the disk size is known.
        let e =
            parse_change_list(br#"[{"start":18446744073709551615,"length":2}]"#, None).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidFormat);
        assert!(e.to_string().contains("2^64"), "{e}");
        let e = parse_change_list(br#"[{"start":200,"length":1}]"#, Some(200)).unwrap_err();
        assert!(e.to_string().contains("past the disk end"), "{e}");
        // An extent ending exactly at the end is fine.
        parse_change_list(br#"[{"start":100,"length":100}]"#, Some(200)).unwrap();
    }
}

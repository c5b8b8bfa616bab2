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
        /// For a vSphere `DiskChangeInfo`: the ranges its answer covers; must be the
        /// whole disk.
        covers: Option<Vec<Extent>>,
    },
}

/// A decided plan plus the checkpoint and note to record.
pub struct Decision {
    pub plan: ReadPlan,
    pub checkpoint: Option<Checkpoint>,
    pub note: Option<String>,
}

/// A parsed change list: the changed extents (sorted, merged), the backup it is relative
/// to if the file names one, and, for vSphere's `DiskChangeInfo` form, the byte ranges
/// the answer speaks for (merged), which must cover the whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeList {
    pub extents: Vec<Extent>,
    pub since: Option<String>,
    pub covers: Option<Vec<Extent>>,
}

/// Parse a change list. Accepted shapes:
/// ```text
/// [{"start": N, "length": N}, ...]                          plain list of changed areas
/// {"since": "ID|NAME", "extents": [{"start", "length"}...]}  the same, naming its parent
/// {"startOffset": N, "length": N, "changedArea": [...]}      vSphere QueryChangedDiskAreas
///                                                            (DiskChangeInfo) as printed
///                                                            by govc / pyVmomi
/// [DiskChangeInfo, ...]                                      several pages of that answer
/// ```
/// In a `DiskChangeInfo`, every changed area must lie inside `[startOffset,
/// startOffset + length)`; the pages' ranges together must cover the whole disk (checked
/// here when `disk_size` is given, and always by [`decide`]), since an area outside what
/// vSphere was asked about may have changed without being listed.
pub fn parse_change_list(bytes: &[u8], disk_size: Option<u64>) -> Result<ChangeList> {
    #[derive(Deserialize)]
    struct Area {
        #[serde(alias = "Start")]
        start: u64,
        #[serde(alias = "Length")]
        length: u64,
    }
    #[derive(Deserialize)]
    struct DiskChangeInfo {
        #[serde(rename = "startOffset", alias = "StartOffset")]
        start_offset: u64,
        #[serde(alias = "Length")]
        length: u64,
        #[serde(rename = "changedArea", alias = "ChangedArea", default)]
        changed_area: Vec<Area>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Plain(Vec<Area>),
        Wrapped {
            since: Option<String>,
            extents: Vec<Area>,
        },
        Info(DiskChangeInfo),
        Pages(Vec<DiskChangeInfo>),
    }
    let list: List = serde_json::from_slice(bytes).map_err(|e| {
        Error::invalid(
            "change list is none of the accepted shapes: [{start, length}…], \
             {since, extents: [{start, length}…]}, a vSphere DiskChangeInfo \
             {startOffset, length, changedArea: [{start, length}…]} or a list of them",
        )
        .with_source(e)
    })?;
    let (areas, since, pages) = match list {
        List::Plain(a) => (a, None, None),
        List::Wrapped { since, extents } => (extents, since, None),
        List::Info(i) => (Vec::new(), None, Some(vec![i])),
        List::Pages(p) => (Vec::new(), None, Some(p)),
    };
    let mut sorted: Vec<Extent> = Vec::with_capacity(areas.len());
    let add = |sorted: &mut Vec<Extent>, a: Area, inside: Option<&Extent>| -> Result<()> {
        if a.length == 0 {
            return Ok(());
        }
        let e = Extent::new(a.start, a.length).map_err(|e| e.context_prefix("change list"))?;
        if let Some(page) = inside
            && (e.offset < page.offset || e.offset + e.length > page.offset + page.length)
        {
            return Err(Error::invalid(format!(
                "change list: changed area at byte {} ({} bytes) lies outside its \
                 DiskChangeInfo's range [{}, {}); the answer is inconsistent, ask vSphere again",
                e.offset,
                e.length,
                page.offset,
                page.offset + page.length
            )));
        }
        if let Some(size) = disk_size {
            check_change(&e, size)?;
        }
        sorted.push(e);
        Ok(())
    };
    for a in areas {
        add(&mut sorted, a, None)?;
    }
    let covers = match pages {
        None => None,
        Some(pages) => {
            let mut ranges = Vec::with_capacity(pages.len());
            for p in pages {
                let page = Extent::new(p.start_offset, p.length).map_err(|e| {
                    e.context_prefix("change list: DiskChangeInfo startOffset + length")
                })?;
                for a in p.changed_area {
                    add(&mut sorted, a, Some(&page))?;
                }
                if page.length > 0 {
                    ranges.push(page);
                }
            }
            ranges.sort();
            let mut merged = Vec::new();
            for r in ranges {
                push_extent(&mut merged, r.offset, r.length);
            }
            if let Some(size) = disk_size {
                check_covers(&merged, size)?;
            }
            Some(merged)
        }
    };
    sorted.sort();
    let mut out = Vec::new();
    for e in sorted {
        push_extent(&mut out, e.offset, e.length);
    }
    Ok(ChangeList {
        extents: out,
        since,
        covers,
    })
}

/// Refuse a vSphere answer whose ranges (merged, sorted) do not cover exactly
/// `[0, size)`: a part it does not speak for may have changed unseen, and a range past the
/// end means the answer is for another disk.
fn check_covers(covers: &[Extent], size: u64) -> Result<()> {
    const WHAT: &str = "change list (--changed-extents): refusing the vSphere DiskChangeInfo";
    let mut next = 0u64;
    for r in covers {
        if r.offset > next {
            return Err(Error::invalid(format!(
                "{WHAT}: it does not cover bytes [{next}, {}) of the {size}-byte disk, so \
                 changes there would be missed; query QueryChangedDiskAreas from offset \
                 {next} and pass every page (a JSON list of them)",
                r.offset.min(size)
            )));
        }
        next = next.max(r.offset + r.length);
    }
    if next < size {
        return Err(Error::invalid(format!(
            "{WHAT}: it covers only bytes [0, {next}) of the {size}-byte disk, so changes \
             past {next} would be missed; query QueryChangedDiskAreas from offset {next} \
             and pass every page (a JSON list of them)"
        )));
    }
    if next > size {
        return Err(Error::invalid(format!(
            "{WHAT}: it speaks for bytes up to {next}, past the end of this {size}-byte disk; \
             it was made for another disk (or the disk was resized)"
        )));
    }
    Ok(())
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
    if let ChangeHint::ChangeList {
        extents, covers, ..
    } = hint
    {
        for e in extents {
            check_change(e, size)?;
        }
        if let Some(c) = covers {
            check_covers(c, size)?;
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
            node: None,
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
        (ChangeHint::ChangeList { extents, since, .. }, Ok((m, _, root))) => match since {
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
        let ChangeList {
            extents: e,
            since: s,
            covers,
        } = parse_change_list(
            br#"[{"start":0,"length":10},{"start":5,"length":10},{"start":100,"length":1}]"#,
            Some(200),
        )
        .unwrap();
        assert!(covers.is_none());
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
        let l = parse_change_list(
            br#"{"since":"b1","extents":[{"start":4096,"length":4096}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(l.extents.len(), 1);
        assert_eq!(l.since.as_deref(), Some("b1"));
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

    fn ext(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn a_vsphere_disk_change_info_is_accepted_as_printed() {
        // As govc / pyVmomi print QueryChangedDiskAreas' answer (extra fields ignored).
        let l = parse_change_list(
            br#"{"_vimtype":"vim.vm.DiskChangeInfo","startOffset":0,"length":1000,
                "changedArea":[{"_vimtype":"vim.vm.DiskChangeInfo.DiskChangeExtent","start":100,"length":50},
                               {"start":10,"length":5}]}"#,
            Some(1000),
        )
        .unwrap();
        assert_eq!(l.extents, vec![ext(10, 5), ext(100, 50)]);
        assert_eq!(l.covers, Some(vec![ext(0, 1000)]));
        assert!(l.since.is_none());
        // Go field names (older govc -json).
        let l = parse_change_list(
            br#"{"StartOffset":0,"Length":1000,"ChangedArea":[{"Start":0,"Length":1}]}"#,
            Some(1000),
        )
        .unwrap();
        assert_eq!(l.extents, vec![ext(0, 1)]);
        // No changes at all: an empty (or absent) changedArea.
        let l = parse_change_list(br#"{"startOffset":0,"length":1000}"#, Some(1000)).unwrap();
        assert!(l.extents.is_empty());
    }

    #[test]
    fn pages_of_disk_change_info_are_merged() {
        let l = parse_change_list(
            br#"[{"startOffset":500,"length":500,"changedArea":[{"start":990,"length":10}]},
                 {"startOffset":0,"length":500,"changedArea":[{"start":0,"length":10},{"start":490,"length":10}]}]"#,
            Some(1000),
        )
        .unwrap();
        assert_eq!(l.extents, vec![ext(0, 10), ext(490, 10), ext(990, 10)]);
        assert_eq!(l.covers, Some(vec![ext(0, 1000)]));
    }

    #[test]
    fn a_disk_change_info_that_does_not_cover_the_disk_is_refused() {
        // Stops short of the end.
        let e = parse_change_list(
            br#"{"startOffset":0,"length":600,"changedArea":[]}"#,
            Some(1000),
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidFormat);
        assert!(e.to_string().contains("covers only bytes [0, 600)"), "{e}");
        // A gap between pages.
        let e = parse_change_list(
            br#"[{"startOffset":0,"length":400},{"startOffset":500,"length":500}]"#,
            Some(1000),
        )
        .unwrap_err();
        assert!(e.to_string().contains("[400, 500)"), "{e}");
        // Past the end: made for another disk.
        let e = parse_change_list(br#"{"startOffset":0,"length":2000}"#, Some(1000)).unwrap_err();
        assert!(e.to_string().contains("another disk"), "{e}");
        // An area outside its own page.
        let e = parse_change_list(
            br#"{"startOffset":0,"length":1000,"changedArea":[{"start":990,"length":20}]}"#,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside its"), "{e}");
        // Without the disk size the coverage is kept for decide() to check.
        let l = parse_change_list(br#"{"startOffset":0,"length":600}"#, None).unwrap();
        assert_eq!(l.covers, Some(vec![ext(0, 600)]));
        assert!(check_covers(l.covers.as_deref().unwrap(), 1000).is_err());
        assert!(check_covers(l.covers.as_deref().unwrap(), 600).is_ok());
    }
}

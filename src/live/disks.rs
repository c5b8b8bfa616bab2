//! Which disks a live capture reads, under which stable names, from which bitmaps.
//!
//! A disk's name in a backup is its identity across backups (`<server>/<name>` is the
//! disk id a chain continues from), so it must not depend on how QEMU was started nor
//! on how `--nodes` names it:
//! ```text
//!  query-block entry                                   name
//!  device "drive0" (legacy -drive)                     drive0
//!  qdev "/machine/peripheral/vdisk0/virtio-backend"    vdisk0   (-blockdev + -device id=vdisk0,
//!  qdev "sd1"                                          sd1       as libvirt starts VMs)
//!  anything else (no device id; qemu-storage-daemon)   the node name
//!  qdev "/machine/system.flash0" (UEFI code/vars)      not a disk: left out by default
//! ```
//! `--nodes` may name a disk by any of: that name, its device or qdev path, or its node
//! name; the disk still gets the name above.
//!
//! Older builds named such a disk by its qdev path (or by its node name under
//! `--nodes`). When the stable name has no backup yet but one of those names has a
//! chain whose bitmap is still on the node, that chain hands over: the disk is read in
//! full once under the stable name (the note says so), and the older chain's bitmap is
//! retired with the run's success like any superseded checkpoint.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::bitmaps::{NodeInfo, chain_prefix, choose};
use super::{LiveOptions, disk_id};
use crate::cbt::previous;
use crate::error::{Error, Result};
use crate::manifest::Checkpoint;
use crate::qmp::Qmp;
use crate::vault::Vault;

/// One disk being captured.
pub(super) struct Disk {
    /// Name within the backup (see the module doc).
    pub name: String,
    pub node: String,
    /// The device's QOM path (VMs), for its bus (`hardware`).
    pub qdev: Option<String>,
    pub driver: String,
    pub size: u64,
    /// Bitmap of the previous backup, if it is still on the node.
    pub old: Option<String>,
    /// Why `old` could not be used.
    pub note: Option<String>,
    pub new: String,
    pub fleece_file: PathBuf,
    pub fleece_node: String,
    /// The copy-before-write filter the backup job inserts above the disk.
    pub cbw_node: String,
    /// The point-in-time view: snapshot-access on the filter.
    pub snap_node: String,
    pub job: String,
    pub export: String,
}

/// A disk QEMU attached to a device (`query-block` with a medium).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Attached {
    pub device: Option<String>,
    pub qdev: Option<String>,
    pub node: String,
}

impl Attached {
    /// The stable name (see the module doc).
    pub fn name(&self) -> String {
        if let Some(d) = &self.device {
            return d.clone();
        }
        if let Some(q) = &self.qdev {
            if let Some(rest) = q.strip_prefix("/machine/peripheral/")
                && let Some(id) = rest.split('/').next()
                && !id.is_empty()
            {
                return id.to_string();
            }
            if !q.contains('/') && !q.is_empty() {
                return q.clone();
            }
        }
        self.node.clone()
    }

    /// A firmware flash (UEFI code or variables, `/machine/system.flashN`): not a disk;
    /// `--nodes` may still name it.
    pub fn is_firmware(&self) -> bool {
        self.qdev
            .as_deref()
            .is_some_and(|q| q.starts_with("/machine/system.flash"))
    }

    /// The device's QOM path: a bare id means `/machine/peripheral/<id>`.
    fn qdev_path(&self) -> Option<String> {
        let q = self.qdev.as_deref()?;
        Some(if q.starts_with('/') {
            q.to_string()
        } else {
            format!("/machine/peripheral/{q}")
        })
    }

    /// Whether `--nodes` entry `n` means this disk.
    fn is(&self, n: &str) -> bool {
        self.node == n
            || self.device.as_deref() == Some(n)
            || self.qdev.as_deref() == Some(n)
            || self.name() == n
    }
}

/// The disks attached to devices, from `query-block`.
pub(super) fn attached(block: &[Value]) -> Vec<Attached> {
    let text = |b: &Value, k: &str| {
        b.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    block
        .iter()
        .filter_map(|b| {
            let node = b.get("inserted")?.get("node-name")?.as_str()?.to_string();
            Some(Attached {
                device: text(b, "device"),
                qdev: text(b, "qdev"),
                node,
            })
        })
        .collect()
}

/// `(name, node, qdev)` of every disk to capture.
type Wanted = (String, String, Option<String>);

fn wanted(qmp: &mut Qmp, live: &LiveOptions, devices: &[Attached]) -> Result<Vec<Wanted>> {
    let out: Vec<Wanted> = if !live.nodes.is_empty() {
        live.nodes
            .iter()
            .map(|n| match devices.iter().find(|a| a.is(n)) {
                Some(a) => (a.name(), a.node.clone(), a.qdev_path()),
                None => (n.clone(), n.clone(), None),
            })
            .collect()
    } else if !devices.is_empty() {
        devices
            .iter()
            .filter(|a| !a.is_firmware())
            .map(|a| (a.name(), a.node.clone(), a.qdev_path()))
            .collect()
    } else {
        let exports: Vec<Value> = qmp.execute("query-block-exports", json!({}))?;
        let mut v: Vec<Wanted> = Vec::new();
        for e in exports {
            let id = e.get("id").and_then(Value::as_str).unwrap_or("");
            if let Some(n) = e.get("node-name").and_then(Value::as_str)
                && !id.starts_with("blockvault-")
                && !v.iter().any(|(_, m, _)| m == n)
            {
                v.push((n.to_string(), n.to_string(), None));
            }
        }
        v.sort();
        v
    };
    for (i, (name, node, _)) in out.iter().enumerate() {
        if let Some((other, _, _)) = out[..i].iter().find(|(m, n, _)| m == name || n == node) {
            return Err(Error::config(format!(
                "--nodes names one disk twice ({other} and {name} are both node {node}); \
                 name each disk once"
            )));
        }
    }
    if out.is_empty() {
        return Err(Error::config(format!(
            "{}: QEMU has no disks to back up (name them with --nodes)",
            live.qmp.display()
        )));
    }
    Ok(out)
}

/// Find the disks and their bitmaps; retire this chain's leftovers (see `bitmaps`).
pub(super) fn discover(
    qmp: &mut Qmp,
    vault: &Vault,
    server: &str,
    live: &LiveOptions,
    tag: &str,
    run: &str,
) -> Result<Vec<Disk>> {
    let nodes: Vec<NodeInfo> = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let block: Vec<Value> = qmp.execute("query-block", json!({}))?;
    let devices = attached(&block);
    let wanted = wanted(qmp, live, &devices)?;
    // The checkpoints of the latest backup of every disk of this server, by whatever
    // name, with the node each was on (one run gives all its disks one bitmap name):
    // never retired here.
    let mut latest: Vec<(String, Option<Checkpoint>)> = Vec::new();
    for m in vault.manifests_of(server)? {
        for d in m.disks {
            match latest.iter_mut().find(|(id, _)| *id == d.disk_id) {
                Some(e) => e.1 = d.checkpoint,
                None => latest.push((d.disk_id, d.checkpoint)),
            }
        }
    }
    let kept_on = |node: &str| -> Vec<String> {
        latest
            .iter()
            .filter_map(|(_, c)| c.as_ref())
            .filter(|c| c.node.as_deref().is_none_or(|n| n == node))
            .filter_map(|c| c.bitmap.clone())
            .collect()
    };
    let dir = live.fleece_dir.clone().unwrap_or_else(std::env::temp_dir);
    let stamp = crate::manifest::new_backup_id();
    let prefix = chain_prefix(tag);
    let mut disks = Vec::new();
    for (i, (name, node, qdev)) in wanted.into_iter().enumerate() {
        let info = nodes.iter().find(|n| n.node_name == node).ok_or_else(|| {
            Error::not_found(format!(
                "QEMU at {} has no block node {node} (see `blockvault bitmaps list` or QMP \
                 query-named-block-nodes for the names it has)",
                live.qmp.display()
            ))
        })?;
        let prev = previous(vault, server, &disk_id(server, &name))?;
        let (cp, legacy) = match prev {
            Some((_, d)) => (d.checkpoint.unwrap_or_default(), None),
            None => legacy_chain(vault, server, &name, &node, qdev.as_deref(), info)?,
        };
        let mut choice = choose(
            &nodes,
            info,
            &prefix,
            (cp.bitmap.as_deref(), cp.node.as_deref()),
            &kept_on(&node),
        );
        if let (Some(alias), Some(old)) = (legacy, &choice.old) {
            // Read in full (the new name has no previous backup); OLD is disabled at the
            // instant and retired on success like any superseded checkpoint.
            choice.note = Some(format!(
                "first backup of this disk under its stable name {name} (earlier backups \
                 named it {alias}); their bitmap {old} is retired when this backup succeeds"
            ));
        }
        if let Some(old) = &choice.old
            && !choice.merge.is_empty()
        {
            tracing::warn!(
                node,
                bitmap = old,
                "a backup run died after its point in time: taking its changes back into the checkpoint"
            );
            qmp.execute_value(
                "block-dirty-bitmap-merge",
                json!({"node": node, "target": old, "bitmaps": choice.merge}),
            )?;
            qmp.execute_value(
                "block-dirty-bitmap-enable",
                json!({"node": node, "name": old}),
            )?;
        }
        for stale in &choice.retire {
            tracing::info!(
                node,
                bitmap = stale,
                "removing a bitmap of this chain left by a run that died"
            );
            qmp.execute_value(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": stale}),
            )?;
        }
        disks.push(Disk {
            name,
            driver: info.drv.clone(),
            size: info.image.virtual_size,
            old: choice.old,
            note: choice.note,
            new: format!("{prefix}{stamp}"),
            fleece_file: dir.join(format!("blockvault-fleece-{run}-{i}.qcow2")),
            fleece_node: format!("blockvault-fleece-{run}-{i}"),
            cbw_node: format!("blockvault-cbw-{run}-{i}"),
            snap_node: format!("blockvault-snap-{run}-{i}"),
            job: format!("blockvault-job-{run}-{i}"),
            export: format!("blockvault-{run}-{i}"),
            node,
            qdev,
        });
    }
    Ok(disks)
}

/// A chain of this disk under a name older builds gave it (its qdev path, or its node
/// name when `--nodes` named it so) whose bitmap is still on the node: its checkpoint,
/// and that name.
fn legacy_chain(
    vault: &Vault,
    server: &str,
    name: &str,
    node: &str,
    qdev: Option<&str>,
    info: &NodeInfo,
) -> Result<(Checkpoint, Option<String>)> {
    for alias in [qdev, Some(node)].into_iter().flatten() {
        if alias == name {
            continue;
        }
        if let Some((_, d)) = previous(vault, server, &disk_id(server, alias))?
            && let Some(c) = d.checkpoint
            && let Some(b) = &c.bitmap
            && info
                .dirty_bitmaps
                .iter()
                .any(|x| x.name == *b && x.recording)
        {
            return Ok((c, Some(alias.to_string())));
        }
    }
    Ok((Checkpoint::default(), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(device: Option<&str>, qdev: Option<&str>, node: &str) -> Attached {
        Attached {
            device: device.map(Into::into),
            qdev: qdev.map(Into::into),
            node: node.into(),
        }
    }

    #[test]
    fn disks_are_named_by_device_id_else_node() {
        let libvirt = a(
            None,
            Some("/machine/peripheral/vdisk0/virtio-backend"),
            "libvirt-1-format",
        );
        assert_eq!(libvirt.name(), "vdisk0");
        assert!(libvirt.is("libvirt-1-format") && libvirt.is("vdisk0"));
        assert_eq!(a(None, Some("sd1"), "n1").name(), "sd1");
        assert_eq!(
            a(
                Some("drive0"),
                Some("/machine/unattached/device[19]"),
                "#block171"
            )
            .name(),
            "drive0"
        );
        assert_eq!(
            a(
                None,
                Some("/machine/peripheral-anon/device[3]/virtio-backend"),
                "n2"
            )
            .name(),
            "n2"
        );
    }
}

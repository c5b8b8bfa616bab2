//! Backup manifests: the JSON record that makes a backup exist.
//!
//! A manifest is written last, atomically, after every pack it needs is durable
//! (`backups/<resource>/<backup-id>.json` in the vault). It lists, for each disk, the
//! digest of its index root (see `index`) plus sizes and how the backup was taken.
//! Manifests are versioned (`version`); a reader refuses versions it does not know.
//! The catalog caches them and can be rebuilt from them (`vault rescan`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::chunk::ChunkDigest;
use crate::error::{Error, Result};

/// Current manifest version.
pub const MANIFEST_VERSION: u32 = 1;

/// What a backup protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Disk,
    Server,
}

/// Full (everything allocated read) or incremental (only changes read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incremental,
}

/// What the source must remember so that the next backup reads only the changes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Dirty bitmap that records every change after this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// QEMU block node that holds `bitmap` (live captures; absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Consistency a backup really achieved (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// All disks at one instant, as after a power cut.
    CrashConsistent,
    /// Applications and file systems were quiesced (freeze hooks succeeded).
    ApplicationConsistent,
    /// Not a point in time: an image was read while another process wrote to it
    /// (`--force-inconsistent`). Restores may not mount or boot.
    Inconsistent,
}

/// How the point in time of a backup was captured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    /// "image-files" (read as they are), "qmp-fleecing" (live copy-before-write).
    pub method: String,
    pub consistency: Consistency,
    /// Why the backup is not application-consistent when that was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When the point in time was taken (RFC 3339, microseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_at: Option<String>,
    /// Freeze/thaw steps run, in order, with their outcome ("freeze-script: ok").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
    /// The virtual hardware of the live VM at the point in time (absent for image
    /// files, a qemu-storage-daemon, and in manifests of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<Hardware>,
}

/// Virtual hardware of a live VM, as QEMU reported it over QMP; what is not known is
/// absent. Exports (OVA) describe the VM with it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hardware {
    /// vCPUs (`query-cpus-fast`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// RAM in bytes, base + hot-plugged (`query-memory-size-summary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// QEMU machine type ("pc-q35-7.2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// "bios" or "uefi" when knowable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// How each disk (by name in the backup) was attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskHardware>,
}

/// The bus of one disk of a live VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskHardware {
    /// Disk name in the backup.
    pub name: String,
    /// "virtio", "scsi", "ide", "sata", "nvme", "usb", or the QEMU device type when
    /// none of those.
    pub bus: String,
    /// QEMU device type ("virtio-blk-pci", "scsi-hd") and, for SCSI, its controller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// Name of the disk within the backup ("disk0" for single-disk backups).
    pub name: String,
    /// Stable id of the disk across backups.
    pub disk_id: String,
    /// Where it was read from (path or URI) and as what format.
    pub source: String,
    /// Image format (QEMU's driver name: raw, qcow2, vmdk, vpc, vdi, ...; nbd for an
    /// export). Backups of one disk id keep one format (a change is refused unless asked).
    pub format: String,
    /// Which reader read it: `raw`, `native-qcow2`, `native-vmdk`, `nbd`,
    /// `qemu-storage-daemon:<driver>` (absent in manifests of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader: Option<String>,
    /// Set for an encrypted source: "encrypted source, decrypted with a user secret".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Digest of the disk index root blob.
    pub index_root: ChunkDigest,
    pub kind: BackupKind,
    /// How changes were found: "allocation", "compare", "bitmap", ...
    pub strategy: String,
    /// Backup this one was derived from (incrementals).
    #[serde(default)]
    pub parent: Option<String>,
    /// What the next backup of this disk may start from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// Why a change-tracking strategy was not used (fallbacks are never silent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Bytes the source reported allocated.
    pub bytes_allocated: u64,
    /// Bytes actually read from the source.
    pub bytes_read: u64,
    /// New bytes written to the vault (after compression).
    pub bytes_stored: u64,
    /// Chunk slots of the disk.
    pub chunks_total: u64,
    /// Chunks read from the source.
    pub chunks_read: u64,
    /// Chunks that were new to the vault (stored).
    pub chunks_new: u64,
}

/// A backup: one point in time of one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub version: u32,
    /// Unique id (`<yyyymmddThhmmss>-<random>`).
    pub id: String,
    /// Display name (`manualbk_…`, `autobk_…`, or given).
    pub name: String,
    /// Disk id or server name this backup belongs to.
    pub resource: String,
    pub resource_kind: ResourceKind,
    /// RFC 3339 creation time.
    pub created: String,
    pub vault_id: String,
    pub chunk_size: u32,
    pub seconds: f64,
    pub disks: Vec<DiskManifest>,
    /// How the point in time was captured (absent in manifests of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
    /// Set in a replica (see `replicate`): the backup it was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<ReplicaOf>,
}

/// Where a replicated backup was copied from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaOf {
    /// The source backup's id.
    pub backup: String,
    /// The source vault's id.
    pub vault_id: String,
    /// When the copy was made (RFC 3339).
    pub replicated: String,
}

impl BackupManifest {
    /// Key of this manifest in its vault.
    pub fn key(&self) -> String {
        format!("backups/{}/{}.json", resource_dir(&self.resource), self.id)
    }

    pub fn from_json(bytes: &[u8]) -> Result<BackupManifest> {
        let m: BackupManifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid("manifest is not valid JSON").with_source(e))?;
        if m.version != MANIFEST_VERSION {
            return Err(Error::unsupported(format!(
                "manifest version {} (this build reads version {MANIFEST_VERSION})",
                m.version
            )));
        }
        Ok(m)
    }

    /// Logical size: sum of the disks' virtual sizes.
    pub fn logical_size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    pub fn bytes_stored(&self) -> u64 {
        self.disks.iter().map(|d| d.bytes_stored).sum()
    }
}

/// Directory name for a resource id: readable, file-name safe, and unique (a short hash
/// of the exact id is appended whenever characters had to be replaced).
pub fn resource_dir(resource: &str) -> String {
    let clean: String = resource
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    let short: String = clean
        .chars()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if short == resource {
        short
    } else {
        format!(
            "{short}-{}",
            &blake3::hash(resource.as_bytes()).to_hex()[..8]
        )
    }
}

/// Now, as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Now, as RFC 3339 (UTC) with microseconds: for capture instants.
pub fn now_rfc3339_precise() -> String {
    let now = OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now);
    now.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A new backup id: sortable timestamp + random suffix.
pub fn new_backup_id() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}-{}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        hex::encode(rand::random::<[u8; 4]>())
    )
}

/// Default name of a one-off backup: `manualbk_<yyyymmdd-hhmmss>`.
pub fn manual_name() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "manualbk_{:04}{:02}{:02}-{:02}{:02}{:02}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_dirs_are_safe_and_distinct() {
        assert_eq!(resource_dir("db-disk1"), "db-disk1");
        let a = resource_dir("/tmp/a b.qcow2");
        let b = resource_dir("/tmp/a_b.qcow2");
        assert_ne!(a, b);
        assert!(!a.contains('/'));
        assert!(!resource_dir("..").starts_with('.'));
        assert!(resource_dir(&"x".repeat(500)).len() < 80);
    }

    #[test]
    fn ids_and_names_have_their_shape() {
        let id = new_backup_id();
        assert_eq!(id.len(), 15 + 1 + 8);
        assert!(manual_name().starts_with("manualbk_"));
    }
}

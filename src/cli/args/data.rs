//! Backup, restore, drill and file-restore arguments, and `backups` subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::*;

#[derive(Subcommand)]
pub enum BackupsCmd {
    /// List backups, oldest first.
    List {
        /// Only the backups in this vault.
        #[arg(long)]
        vault: Option<String>,
        /// Only the backups of this disk id (or server name).
        #[arg(long)]
        disk: Option<String>,
    },
    /// One backup in full, with the bytes deleting it would free.
    Show {
        /// Backup id, unique id prefix or name; `latest` with --disk.
        backup: String,
        /// Disk id or server name, for `latest`.
        #[arg(long)]
        disk: Option<String>,
    },
    /// Delete a backup (GC frees its blobs).
    Delete {
        /// Backup id, unique id prefix or name; `latest` with --disk.
        backup: String,
        /// Disk id or server name, for `latest`.
        #[arg(long)]
        disk: Option<String>,
    },
    /// Lock a backup until a date: nothing deletes it before then (recorded in the
    /// vault; a lock can be extended, never shortened).
    Lock {
        /// Backup id, unique id prefix or name; `latest` with --disk.
        backup: String,
        /// Disk id or server name, for `latest`.
        #[arg(long)]
        disk: Option<String>,
        /// YYYY-MM-DD (00:00 UTC) or an RFC 3339 time.
        #[arg(long)]
        until: String,
    },
    /// Protect a backup from deletion until it is unprotected (recorded in the vault).
    Protect {
        /// Backup id, unique id prefix or name; `latest` with --disk.
        backup: String,
        /// Disk id or server name, for `latest`.
        #[arg(long)]
        disk: Option<String>,
        /// Remove the protection instead.
        #[arg(long)]
        off: bool,
    },
}

#[derive(clap::Args)]
pub struct BackupArgs {
    /// Image path, `raw:`/`qcow2:`/`vmdk:PATH`, NBD URI, `qmp:SOCKET`,
    /// `libvirt:DOMAIN[?uri=qemu:///system]`, or several
    /// `NAME=SPEC` for a server made of image files.
    #[arg(required = true)]
    pub sources: Vec<String>,
    /// Vault to store the backup in.
    #[arg(long)]
    pub vault: String,
    /// Stable id of the disk (default: the absolute source path) or the server name.
    #[arg(long)]
    pub id: Option<String>,
    /// Backup name (default manualbk_<yyyymmdd-hhmmss>).
    #[arg(long)]
    pub name: Option<String>,
    /// NBD source: the dirty bitmap NAME records every change since the previous
    /// backup of this disk taken with --bitmap NAME (the first one is full).
    #[arg(long, conflicts_with_all = ["since_base", "changed_extents"])]
    pub bitmap: Option<String>,
    /// The source is an overlay (qcow2 with backing file, VMDK delta) on the image the
    /// previous backup of this disk read: read only the overlay's own clusters.
    #[arg(long, conflicts_with = "changed_extents")]
    pub since_base: bool,
    /// JSON file of changed extents: `[{"start":…,"length":…}]`, or
    /// `{"since":…,"extents":[…]}`, or vSphere's QueryChangedDiskAreas answer as govc or
    /// pyVmomi print it (a DiskChangeInfo `{"startOffset":…,"length":…,"changedArea":[…]}`,
    /// or a JSON list of its pages, merged). A DiskChangeInfo must cover the whole disk
    /// (startOffset + length over [0, disk size), every area inside its page), else the
    /// backup is refused.
    #[arg(long)]
    pub changed_extents: Option<PathBuf>,
    /// The backup (id or name) the change list is relative to (default: the latest).
    #[arg(long, requires = "changed_extents")]
    pub since: Option<String>,
    /// Passphrase file of an encrypted image (LUKS, encrypted qcow2): its exact bytes are
    /// the passphrase. The disk is read decrypted through qemu-storage-daemon, which is
    /// given the file's path, never its contents.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Back up an image that another process holds open for writing (QEMU's image lock)
    /// instead of refusing it; the backup is labelled `inconsistent`.
    #[arg(long)]
    pub force_inconsistent: bool,
    /// Accept a source whose format differs from the previous backup of its disk id
    /// (refused by default: a raw disk whose guest wrote an image header into it must
    /// not turn into that image).
    #[arg(long)]
    pub format_change: bool,
    #[command(flatten)]
    pub nbd_tls: NbdTlsArgs,
    #[command(flatten)]
    pub server: Box<ServerArgs>,
}

/// NBD over TLS for `nbds://` sources.
#[derive(clap::Args)]
pub struct NbdTlsArgs {
    /// nbds://: PEM file of the CA that signed the NBD server's certificate.
    #[arg(long)]
    pub nbd_tls_ca: Option<PathBuf>,
    /// nbds://: PEM client certificate, for a server that requires one.
    #[arg(long, requires = "nbd_tls_key")]
    pub nbd_tls_cert: Option<PathBuf>,
    /// nbds://: PEM private key of --nbd-tls-cert.
    #[arg(long, requires = "nbd_tls_cert")]
    pub nbd_tls_key: Option<PathBuf>,
    /// nbds://: the name the server's certificate must carry (default: the URI's host;
    /// `localhost` for nbds+unix://).
    #[arg(long)]
    pub nbd_tls_hostname: Option<String>,
}

impl NbdTlsArgs {
    /// The settings, or `None` when no flag was given.
    pub fn settings(&self) -> Option<blockvault::nbd::NbdTlsClient> {
        let t = blockvault::nbd::NbdTlsClient {
            ca: self.nbd_tls_ca.clone(),
            cert: self.nbd_tls_cert.clone(),
            key: self.nbd_tls_key.clone(),
            hostname: self.nbd_tls_hostname.clone(),
        };
        (t != Default::default()).then_some(t)
    }
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// Backup id, unique id prefix or name; `latest` with --disk.
    pub backup: String,
    /// New image file, directory (server backups, --image) or nbd:// URI. Nothing but an
    /// NBD target is ever overwritten.
    #[arg(long)]
    pub to: PathBuf,
    /// raw, qcow2, vmdk (monolithicSparse) or vmdk-stream (streamOptimized). Default: from
    /// the extension of --to (.qcow2, .vmdk, .ova, .raw/.img), else raw; a format the
    /// extension contradicts is refused (.img takes any).
    #[arg(long)]
    pub format: Option<String>,
    /// Write --format even when the extension of --to says another format.
    #[arg(long)]
    pub force_format: bool,
    /// Disk of a multi-disk backup (default: every disk, into directory --to); with
    /// `latest`, the disk id or server name whose latest backup to restore.
    #[arg(long)]
    pub disk: Option<String>,
    /// Size of the new disk (bytes, or with K/M/G/T): may grow it, never shrink it.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Full-server image instead of disk images: ova (OVF + streamOptimized VMDKs in
    /// DIR/<server>.ova, or --to X.ova) or qcow2-set (DIR with <disk>.qcow2 + server.json).
    #[arg(long, conflicts_with_all = ["disk", "format", "size"])]
    pub image: Option<String>,
    /// With --to nbd://…: a dirty bitmap of the target that recorded every write since
    /// the backup; only the chunks it marks are rewritten (nothing is read back).
    #[arg(long)]
    pub target_bitmap: Option<String>,
    /// Permission bits of the new image files, octal (default 0600: a disk image holds
    /// the guest's secrets; directories the restore creates are 0700).
    #[arg(long)]
    pub mode: Option<String>,
    /// Write everything readable, leave unreadable chunks as zeros, list the bad disk
    /// ranges and keep the image; exits 5 (corrupt) when anything was unreadable.
    #[arg(long)]
    pub keep_going: bool,
    /// Replace an existing regular file at --to (one raw or qcow2 image; staged beside
    /// it and renamed over it at the end). Never replaces a link or a directory.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub nbd_tls: NbdTlsArgs,
}

#[derive(clap::Args)]
pub struct DrillArgs {
    /// Backup id, unique id prefix or name; `latest` with --disk.
    pub backup: String,
    /// Disk id or server name, for `latest`.
    #[arg(long)]
    pub disk: Option<String>,
    /// Seconds from the VM's start to the success signal.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// agent (the QEMU guest agent answers guest-ping), console:REGEX (the serial
    /// console matches) or port:N (TCP port N inside the guest accepts connections,
    /// through a user-mode NIC with restrict=on; otherwise the VM has no network).
    #[arg(long, default_value = "agent")]
    pub check: String,
    /// auto (KVM when /dev/kvm works, TCG otherwise or when KVM fails the guest), kvm, tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Guest RAM in MiB (default: the backup's recorded hardware, else 1024).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Disk bus: sata, virtio, ide, scsi or nvme (default: as recorded, else sata).
    #[arg(long)]
    pub bus: Option<String>,
    /// QEMU CPU model (default: host under KVM, max under TCG).
    #[arg(long)]
    pub cpu: Option<String>,
}

impl DrillArgs {
    pub fn options(&self) -> blockvault::Result<blockvault::drill::DrillOptions> {
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            return Err(blockvault::Error::config(
                "--timeout must be a positive number of seconds",
            ));
        }
        Ok(blockvault::drill::DrillOptions {
            timeout: Duration::from_secs_f64(self.timeout),
            check: self.check.parse()?,
            accel: self.accel.parse()?,
            memory_mib: self.memory,
            bus: self.bus.clone(),
            cpu: self.cpu.clone(),
        })
    }
}

#[derive(clap::Args)]
pub struct FilesArgs {
    /// Backup id, unique id prefix or name (`latest` with --disk).
    pub backup: String,
    /// Disk of a server backup (default: the first).
    #[arg(long)]
    pub disk: Option<String>,
    /// Partition number as `files BACKUP partitions` lists it (default: the only one with
    /// a readable file system; 0 = a file system on the whole disk).
    #[arg(long)]
    pub partition: Option<u32>,
    #[command(subcommand)]
    pub cmd: FilesCmd,
}

#[derive(Subcommand)]
pub enum FilesCmd {
    /// The disk's partition table (GPT, MBR or none) and the file system of each partition.
    Partitions,
    /// List a directory (or show one entry) inside the backup.
    Ls {
        /// Absolute path inside the file system.
        #[arg(default_value = "/")]
        path: String,
        /// Mode, owner, size, mtime and symlink targets.
        #[arg(long, short)]
        long: bool,
    },
    /// Copy a file, symlink or directory tree out of the backup to DEST (mode, times,
    /// symlinks; owner when run as root). DEST must not exist, or be a directory to put
    /// it in; nothing is overwritten. Hard links come back as separate copies.
    Get {
        /// Absolute path inside the file system.
        path: String,
        /// Where the copy goes.
        #[arg(long)]
        to: PathBuf,
    },
}

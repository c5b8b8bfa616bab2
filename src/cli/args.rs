//! Command-line arguments (clap) and their parsing helpers.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Shown after `--help`: where the data lives and what the exit status means.
pub const AFTER_HELP: &str = "\
Data directory (catalog and default vault location), first that applies:
  --data DIR, then $BLOCKVAULT_DATA, then /var/lib/blockvault when run as root,
  else $XDG_DATA_HOME/blockvault (default ~/.local/share/blockvault).
  A relative path is made absolute; `vault info` and `vault list` say which is used.

Exit status:
  0    success
  1    failed for another reason (e.g. a task the appliance ran failed)
  2    usage: bad arguments, options or configuration
  3    not found: no such vault, backup, disk, file or task
  4    conflict: name taken, vault in use, ambiguous id prefix, would overwrite,
       backup locked or protected
  5    corrupt data: a stored blob failed its check (verify found damage)
  6    invalid or unsupported input: an image, manifest or file format
  7    I/O error (disk full, permission denied, connection lost)
  8    capacity exceeded: the vault's limit would be passed
  9    the appliance refused the token (401/403) or could not be reached
  10   the vault is encrypted and no key was given (--keyfile, --passphrase-env)
  11   the key given does not open the encrypted vault (wrong key or passphrase)
  130  cancelled (Ctrl-C, SIGTERM)
With --json, a failure prints {\"error\": {\"kind\", \"message\", \"exit_code\"}} on stdout.

Logs go to stderr: level from RUST_LOG (or BLOCKVAULT_LOG), else the config's log_level
for `serve`, else warn; colours only on a terminal; --log-json for JSON lines.";

#[derive(Parser)]
#[command(
    name = "blockvault",
    version,
    about = "Block-level backup appliance for virtual machine disks",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Data directory: catalog and default vault location [default: /var/lib/blockvault
    /// as root, else $XDG_DATA_HOME/blockvault or ~/.local/share/blockvault].
    #[arg(
        long = "data",
        global = true,
        env = "BLOCKVAULT_DATA",
        value_name = "DIR"
    )]
    pub data_arg: Option<PathBuf>,
    /// The data dir in use (absolute), resolved from --data, $BLOCKVAULT_DATA or the default.
    #[arg(skip)]
    pub data: PathBuf,
    /// Where `data` came from: "--data", "BLOCKVAULT_DATA" or "default".
    #[arg(skip)]
    pub data_origin: &'static str,
    /// Logs as JSON lines on stderr (also `log_format = "json"` in the config file).
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars or chatter.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Drive a running appliance at this URL (e.g. https://127.0.0.1:8420) instead of
    /// the data dir: vaults, backups, restores, tokens and tasks go through its API.
    /// http:// only for a loopback address (an appliance run with --plain-http).
    #[arg(long, global = true, env = "BLOCKVAULT_SERVER")]
    pub server: Option<String>,
    /// With --server: the appliance's TLS certificate SHA-256 fingerprint (AB:CD:…, as
    /// `blockvault tls fingerprint` prints it on the appliance); its certificate must match.
    #[arg(
        long,
        global = true,
        env = "BLOCKVAULT_FINGERPRINT",
        value_name = "SHA256"
    )]
    pub fingerprint: Option<String>,
    /// With --server: verify the appliance's certificate against the CA certificate(s)
    /// in this PEM file (default without --fingerprint: the public CAs).
    #[arg(long, global = true, env = "BLOCKVAULT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// API token for --server (see `token create`).
    #[arg(long, global = true, env = "BLOCKVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Key file of an encrypted vault (32 random bytes, raw or hex, or a paper recovery
    /// key). With `vault create --encrypt` a new one is written here if PATH does not exist.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        conflicts_with = "passphrase_env"
    )]
    pub keyfile: Option<PathBuf>,
    /// Name of the environment variable that holds the passphrase of an encrypted vault
    /// (the passphrase itself is never an argument).
    #[arg(long, global = true, value_name = "VAR")]
    pub passphrase_env: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Manage vaults.
    #[command(subcommand)]
    Vault(VaultCmd),
    /// Back up a disk image (raw, qcow2, vmdk natively; VHD, VHDX, VDI, QED, LUKS, ... through
    /// qemu-storage-daemon; `raw:`/`qcow2:`/`vpc:`… force a format, never sniffed).
    ///
    /// One source backs up a disk. Several sources (`NAME=SPEC` or just `SPEC`, named
    /// disk0, disk1, …) back up a server made of image files as one backup (`--id` names
    /// the server). `qmp:SOCKET` captures every disk of a running QEMU VM or
    /// qemu-storage-daemon at one instant (copy-before-write fleecing; incremental
    /// through dirty bitmaps it manages itself). `libvirt:DOMAIN[?uri=URI]` captures every
    /// disk of a running libvirt domain through libvirt's backup API (checkpoints are the
    /// incremental chain; quiesced through the guest agent when it answers).
    Backup(BackupArgs),
    /// List, show or delete backups.
    #[command(subcommand)]
    Backups(BackupsCmd),
    /// Restore a backup (id, id prefix, name, or `latest --disk ID`) into a new disk
    /// image; a server backup's disks go into directory --to as <disk>.<format> unless
    /// --disk picks one.
    Restore(RestoreArgs),
    /// Recovery drill: boot a backup (every disk of a server backup, in order) in a
    /// throwaway QEMU VM without restoring it (the disks are served from the vault with
    /// a temporary qcow2 overlay on top; nothing is written to the backup), wait for the
    /// check, and record the result on the backup (`verified_boot`, with the console log
    /// and a screenshot under <data>/drills/<backup-id>/). Exit status 1 when the guest
    /// did not pass (with --server: 6, the drill task's failure kind invalid_format).
    Drill(DrillArgs),
    /// File-level restore: list partitions, list directories and copy files or trees out
    /// of a backup, read directly from its chunks (ext2/3/4; nothing is mounted and no disk
    /// image is written).
    Files(FilesArgs),
    /// Serve one disk of a backup read-only over NBD (instant access) until interrupted.
    /// Prints the NBD URI clients connect to.
    ServeNbd {
        /// Backup id, unique id prefix or name (`latest` with --disk).
        backup: String,
        /// Disk of a server backup (default: the first).
        #[arg(long)]
        disk: Option<String>,
        /// unix:PATH (or an absolute path) or HOST:PORT.
        #[arg(long)]
        listen: String,
        /// Serve only over TLS (clients must STARTTLS first; `nbds://`): PEM certificate
        /// (chain) of this server.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// With --tls-cert: require client certificates signed by this CA (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_ca: Option<PathBuf>,
    },
    /// Run the appliance: HTTPS admin API, scheduler and task runner (until SIGTERM).
    /// The certificate is <data>/tls/cert.pem (self-signed, made at first start) unless
    /// --tls-cert/--tls-key give one; its SHA-256 fingerprint is logged at start.
    Serve {
        /// HOST:PORT of the API (default from --config, else 127.0.0.1:8420).
        #[arg(long)]
        listen: Option<String>,
        /// TOML configuration (see appliance/blockvault.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Your own certificate (PEM, leaf first; with --tls-key).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP instead of HTTPS: only on a loopback --listen address.
        #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
        plain_http: bool,
    },
    /// The admin port's TLS certificate.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// Manage API tokens (offline on the data dir's catalog, or with --server).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Tasks of the appliance (backups, restores, prunes, GC): list, show, cancel.
    #[command(subcommand)]
    Tasks(TasksCmd),
    /// Free the blobs no backup needs (with --server: a GC task on the appliance).
    Gc {
        /// Vault to collect.
        #[arg(long)]
        vault: String,
        /// Rewrite packs whose live share fell below this percentage.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
        repack_below: u8,
    },
    /// Re-read and re-hash stored data; exit status 5 when anything is corrupt (with
    /// --server: a verify task on the appliance, which also raises a vault_damaged alert).
    Verify {
        /// Vault to verify.
        #[arg(long)]
        vault: String,
        /// Verify only this backup (id, unique id prefix or name).
        backup: Option<String>,
        /// Verify a random PERCENT (1-100) of the vault's backups instead of every pack.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100), conflicts_with = "backup")]
        sample: Option<u8>,
        /// Read at most this many MB (10^6 bytes) per second.
        #[arg(long)]
        rate_mb_s: Option<f64>,
    },
    /// Copy backups from one vault into another (local or S3): only the blobs the target
    /// lacks, each verified, the manifest last (with --server: a replicate task).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["backup", "resource", "all"])))]
    Replicate {
        /// The backup to copy (id, unique id prefix or name).
        backup: Option<String>,
        /// Copy every backup of this resource (disk id or server name).
        #[arg(long)]
        resource: Option<String>,
        /// Copy every backup of the source vault.
        #[arg(long)]
        all: bool,
        /// Source vault.
        #[arg(long)]
        from: String,
        /// Target vault (same chunk size; for an encrypted source, created with
        /// `vault create NAME --replica-of SOURCE`), or a mirror vault on another
        /// appliance: `https://HOST:PORT/VAULT` (pinned with --fingerprint; token from
        /// --token-file or BLOCKVAULT_REPLICA_TOKEN).
        #[arg(long)]
        to: String,
        /// With an https:// target: a file holding the replication token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// With an https:// target: bytes per second at most (e.g. 20MiB).
        #[arg(long, value_parser = super::replicate::parse_rate)]
        bwlimit: Option<u64>,
    },
    /// The `blockvault-…` dirty bitmaps in a live QEMU's disks: list them, retire unused ones.
    #[command(subcommand)]
    Bitmaps(BitmapsCmd),
    /// Measure this machine's hashing, compression, lookup and pack speeds.
    Benchmark {
        /// zstd level to measure.
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Seconds per figure.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Also back up and restore an image of 4×N GiB holding N GiB of mixed data.
        #[arg(long)]
        image_gib: Option<u64>,
    },
    /// Print a shell completion script (e.g. `blockvault completions bash >
    /// /etc/bash_completion.d/blockvault`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (blockvault.1), or write one page per command into --dir.
    Man {
        /// Write blockvault.1, blockvault-backup.1, … into this directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Options of server backups (live over QMP, or image files).
#[derive(clap::Args)]
pub struct ServerArgs {
    /// qmp: disks to capture, by node or device name (default: all disks of the VM, or
    /// every exported node of a qemu-storage-daemon).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// qmp: NBD server the QEMU process already runs (unix socket path or HOST:PORT);
    /// by default blockvault starts one on a private socket and stops it afterwards.
    #[arg(long)]
    pub nbd_server: Option<String>,
    /// qmp: directory for the temporary fleecing images; libvirt: for the run's socket and
    /// scratch files (QEMU must be able to write it; default: the temp dir).
    #[arg(long)]
    pub fleece_dir: Option<PathBuf>,
    /// Command run (sh -c) to quiesce applications before the point in time.
    #[arg(long)]
    pub freeze: Option<String>,
    /// Command run (sh -c) right after the point in time; runs whenever --freeze was tried.
    #[arg(long)]
    pub thaw: Option<String>,
    /// Guest agent socket: guest-fsfreeze-freeze/thaw around the point in time.
    #[arg(long)]
    pub qga: Option<PathBuf>,
    /// Limit for each freeze or thaw step, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub freeze_timeout: f64,
    /// How long to keep trying to confirm that the guest agent thawed, in seconds (after
    /// a freeze timeout the guest may finish freezing later); if it cannot be confirmed,
    /// the backup fails: the guest may still be frozen.
    #[arg(long, default_value_t = 60.0)]
    pub thaw_deadline: f64,
    /// Fail instead of falling back to a crash-consistent backup when a freeze step
    /// fails or times out (the guest is thawed either way).
    #[arg(long)]
    pub require_app_consistent: bool,
}

impl ServerArgs {
    pub fn hooks(&self) -> blockvault::freeze::FreezeHooks {
        blockvault::freeze::FreezeHooks {
            freeze_script: self.freeze.clone(),
            thaw_script: self.thaw.clone(),
            qga: self.qga.clone(),
            timeout: Some(Duration::from_secs_f64(self.freeze_timeout.max(0.001))),
            thaw_deadline: Some(Duration::from_secs_f64(self.thaw_deadline.max(0.001))),
            require_app_consistent: self.require_app_consistent,
        }
    }
}

/// A size in bytes, or with a K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("bad size {s:?}"))
}

#[derive(Subcommand)]
pub enum VaultCmd {
    /// Create a vault.
    Create {
        /// Vault name (letters, digits, '-', '_', '.').
        name: String,
        /// Where (default <data>/vaults/NAME).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Chunk size, fixed for the vault's life: a power of two from 16K to 4M.
        #[arg(long, default_value = "64K")]
        chunk_size: String,
        /// zstd compression level of new chunks.
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Compliance mode: lock every backup for at least N days after its creation
        /// (fixed for the vault's life; nothing deletes a backup before then).
        #[arg(long, value_name = "N")]
        compliance_days: Option<u32>,
        /// Encrypt the vault (AES-256-GCM, keyed digests) under a new random key, wrapped
        /// by --keyfile PATH or --passphrase-env VAR.
        #[arg(long)]
        encrypt: bool,
        /// Create the vault as a replication target of vault SOURCE: its chunk size and
        /// zstd level and, when SOURCE is encrypted, its vault key (opened with --keyfile
        /// / --passphrase-env, which then also wrap the new vault's copy of the key).
        #[arg(long, value_name = "SOURCE", conflicts_with_all = ["encrypt", "chunk_size", "zstd_level", "compliance_days"])]
        replica_of: Option<String>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Keys of an encrypted vault: the wrappings of its key (a key file, a passphrase).
    #[command(subcommand)]
    Key(KeyCmd),
    /// List vaults.
    List,
    /// Usage of a vault.
    Info {
        /// Vault name.
        name: String,
    },
    /// Rebuild the catalog and the lookup index from the vault's own files.
    Rescan {
        /// Vault name.
        name: String,
    },
    /// Register an existing vault directory under NAME and read its backups.
    Attach {
        /// Name to register the vault under.
        name: String,
        /// The vault's directory (holds vault.toml); not with --s3.
        #[arg(required_unless_present = "s3")]
        path: Option<PathBuf>,
        #[command(flatten)]
        s3: S3Args,
    },
}

/// A vault on S3-compatible object storage. Credentials are never arguments: they come
/// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (kept, mode 0600, in the vault's
/// state directory <data>/vaults/NAME/s3-credentials.toml).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct S3Args {
    /// The vault in a bucket: s3://BUCKET/PREFIX (local state stays in <data>/vaults/NAME).
    #[arg(
        long = "s3",
        value_name = "s3://BUCKET/PREFIX",
        conflicts_with = "path",
        requires = "endpoint"
    )]
    pub s3: Option<String>,
    /// URL of the S3 API (e.g. http://127.0.0.1:3900).
    #[arg(long, value_name = "URL", requires = "s3")]
    pub endpoint: Option<String>,
    /// Region (default us-east-1; Garage's default is "garage").
    #[arg(long, requires = "s3")]
    pub region: Option<String>,
}

impl S3Args {
    /// The location given, if any.
    pub fn location(&self) -> blockvault::Result<Option<blockvault::vault::store::S3Location>> {
        match (&self.s3, &self.endpoint) {
            (Some(url), Some(endpoint)) => Ok(Some(blockvault::vault::store::S3Location::parse(
                url,
                endpoint,
                self.region.as_deref(),
            )?)),
            _ => Ok(None),
        }
    }
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Wrap the vault key with one more key file or passphrase (the vault is opened
    /// with --keyfile / --passphrase-env first).
    Add {
        /// Vault name.
        name: String,
        /// The new key file (written new, 0600, if PATH does not exist).
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "new_passphrase_env"
        )]
        new_keyfile: Option<PathBuf>,
        /// Environment variable holding the new passphrase.
        #[arg(long, value_name = "VAR", conflicts_with = "new_keyfile")]
        new_passphrase_env: Option<String>,
        /// A note shown by `vault key list`.
        #[arg(long)]
        label: Option<String>,
    },
    /// List the wrappings of the vault key (no key needed).
    List {
        /// Vault name.
        name: String,
    },
    /// Remove a wrapping (never the last one).
    Remove {
        /// Vault name.
        name: String,
        /// Wrapping id (`vault key list`).
        id: String,
    },
    /// Print the vault key as a paper recovery key (keep it offline; it opens the vault
    /// as --keyfile when saved to a file).
    Export {
        /// Vault name.
        name: String,
        /// Printable form: four numbered lines of hex groups, each with a check.
        #[arg(long, required = true)]
        paper: bool,
    },
    /// Keep a key file of the vault in this appliance's key store
    /// (<data>/keys/<vault id>.key, root-only) so scheduled backups run unattended.
    Store {
        /// Vault name.
        name: String,
    },
}

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

#[derive(Subcommand)]
pub enum BitmapsCmd {
    /// Every named dirty bitmap of every node: granularity, dirty bytes, persistent, its
    /// state (in-use: a chain's checkpoint; orphan: ours but no chain starts from it;
    /// not-ours) and its chain (vault/server, when the catalog knows it).
    List {
        /// `qmp:SOCKET` of the QEMU or qemu-storage-daemon.
        target: String,
    },
    /// Remove orphan `blockvault-…` bitmaps (--orphans) or the NAMEs given. The
    /// checkpoint of a disk's latest backup is never removed unless named with --force.
    Retire {
        /// `qmp:SOCKET` of the QEMU or qemu-storage-daemon.
        target: String,
        /// With NAMEs: still keep those a backup in the catalog records.
        #[arg(long)]
        keep_used: bool,
        /// Remove a named bitmap even if it is the checkpoint of a disk's latest backup
        /// (the next backup of that disk then reads everything).
        #[arg(long)]
        force: bool,
        /// Remove every orphan: a `blockvault-…` bitmap that is no chain's checkpoint.
        #[arg(long)]
        orphans: bool,
        /// Bitmaps to remove.
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum TlsCmd {
    /// Print the SHA-256 fingerprint of the appliance's certificate (of --data's
    /// tls/cert.pem, or of --cert FILE) as uppercase hex pairs separated by colons, the
    /// form of `openssl x509 -noout -fingerprint -sha256`; give it to clients as
    /// --fingerprint.
    Fingerprint {
        /// A PEM certificate file instead of the data dir's.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once, alone on the last line.
    Create {
        /// admin, operator or auditor.
        #[arg(long)]
        role: String,
        /// Token name (default ROLE-<random>).
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Delete a token: its secret stops working.
    Delete {
        /// Token name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TasksCmd {
    /// List tasks, newest first.
    List {
        /// queued, running, succeeded, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
    },
    /// One task with its progress and log.
    Show {
        /// Task id.
        id: String,
    },
    /// Cancel a queued or running task (needs --server).
    Cancel {
        /// Task id.
        id: String,
    },
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

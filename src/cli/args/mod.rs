//! Command-line arguments (clap) and their parsing helpers: the top-level command here,
//! the subcommands by area in `vault` (vaults, keys, S3), `data` (backups, restore,
//! drills, files) and `admin` (bitmaps, TLS, tokens, tasks).

mod admin;
mod data;
mod vault;

pub use admin::*;
pub use data::*;
pub use vault::*;

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
        /// --token-file or BLOCKVAULT_REPLICA_TOKEN; an encrypted source makes an empty
        /// mirror vault encrypted with its key material, never sending the key).
        #[arg(long, required_unless_present = "to_remote")]
        to: Option<String>,
        /// A mirror vault on another appliance named in the config file's
        /// `[remote.NAME]` (URL, token file, pin and bandwidth limit from there).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["to", "token_file"])]
        to_remote: Option<String>,
        /// The config file with the `[remote.NAME]` tables (with --to-remote).
        #[arg(
            long,
            env = "BLOCKVAULT_CONFIG",
            value_name = "PATH",
            default_value = "/etc/blockvault/blockvault.toml"
        )]
        config: PathBuf,
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

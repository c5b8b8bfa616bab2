//! `bitmaps`, `tls`, `token` and `tasks` subcommands.

use std::path::PathBuf;

use clap::Subcommand;

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

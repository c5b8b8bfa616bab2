//! The command line's parts: arguments, output, and the larger commands.

pub mod args;
pub mod backup;
pub mod bitmaps;
pub mod client;
pub mod exit;
pub mod files;
pub mod local;
pub mod output;
pub mod remote;
pub mod restore;
pub mod tasks;

use std::sync::Arc;

use anyhow::{Context, Result};

use args::Cli;
use blockvault::backup::BackupOptions;
use blockvault::cbt::ChangeHint;

/// Options of a backup or restore from the global flags.
pub fn options(cli: &Cli, name: Option<String>, id: Option<String>) -> BackupOptions {
    BackupOptions {
        disk_id: id,
        name,
        threads: cli.threads,
        cancel: None,
        progress: None,
        change: ChangeHint::Auto,
        ..BackupOptions::default()
    }
}

/// Cancel flag raised by SIGINT or SIGTERM: the running job stops cleanly.
pub fn cancel_on_signals() -> Result<Arc<std::sync::atomic::AtomicBool>> {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .context("installing a signal handler")?;
    }
    Ok(flag)
}

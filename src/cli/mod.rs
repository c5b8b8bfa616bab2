//! The command line's parts: arguments, output, and the larger commands.

pub mod args;
pub mod backup;
pub mod backups;
pub mod bitmaps;
pub mod client;
pub mod drill;
pub mod exit;
pub mod files;
pub mod local;
pub mod maint;
pub mod output;
pub mod remote;
pub mod replicate;
pub mod restore;
pub mod tasks;
pub mod tokens;

use std::sync::Arc;

use anyhow::{Context, Result};

use args::Cli;
use blockvault::backup::BackupOptions;
use blockvault::cbt::ChangeHint;

/// The key given with --keyfile / --passphrase-env, if any.
pub fn key_secret(cli: &Cli) -> Result<Option<blockvault::vault::keys::KeySecret>> {
    use blockvault::vault::keys::KeySecret;
    Ok(match (&cli.keyfile, &cli.passphrase_env) {
        (Some(path), _) => Some(KeySecret::from_keyfile(path)?),
        (None, Some(var)) => Some(KeySecret::from_env(var)?),
        (None, None) => None,
    })
}

/// The data dir's `App`, holding the key given on the command line (for encrypted vaults).
pub fn open_app(cli: &Cli) -> Result<blockvault::app::App> {
    let mut app = blockvault::app::App::open(&cli.data)?;
    if let Some(secret) = key_secret(cli)? {
        app.set_key(secret);
    }
    Ok(app)
}

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

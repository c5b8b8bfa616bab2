//! The drill's NBD servers: every disk of the backup served read-only (instant access)
//! on a unix socket in the run directory, each on its own thread, stopped and joined on
//! drop (their sockets go with their listeners).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::manifest::DiskManifest;
use crate::nbd::server::Listener;
use crate::vault::Vault;

/// One served disk: its name, NBD URI and size.
#[derive(Debug, Clone)]
pub(super) struct Served {
    pub name: String,
    pub uri: String,
    pub size: u64,
}

pub(super) struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    served: Vec<Served>,
    /// Errors the servers ended with (e.g. a vault that became unreadable).
    errors: Arc<Mutex<Vec<String>>>,
}

impl Servers {
    pub(super) fn start(vault: &Arc<Vault>, disks: &[DiskManifest], run: &Path) -> Result<Servers> {
        // A disk whose index cannot be read fails the drill here, before any VM starts.
        {
            let lookup = vault.lookup()?;
            for d in disks {
                crate::vault::walk::load_root(vault, &lookup, d)
                    .map_err(|e| e.context_prefix(format!("disk {} of the backup", d.name)))?;
            }
        }
        let mut s = Servers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            served: Vec::new(),
            errors: Arc::new(Mutex::new(Vec::new())),
        };
        for (i, d) in disks.iter().enumerate() {
            let sock = run.join(format!("nbd{i}.sock"));
            let listener = Listener::bind(&sock.display().to_string())?;
            s.served.push(Served {
                name: d.name.clone(),
                uri: listener.uri(),
                size: d.size,
            });
            let (vault, disk, stop, errors) = (
                Arc::clone(vault),
                d.clone(),
                Arc::clone(&s.stop),
                Arc::clone(&s.errors),
            );
            let t = std::thread::Builder::new()
                .name(format!("drill-nbd{i}"))
                .spawn(move || {
                    if let Err(e) =
                        crate::instant::serve_backup(vault, &disk, &listener, &stop, None)
                    {
                        tracing::warn!("drill: NBD server of disk {}: {e}", disk.name);
                        errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("NBD server of disk {}: {e}", disk.name));
                    }
                })
                .map_err(|e| Error::io("starting an NBD server thread", e))?;
            s.threads.push(t);
        }
        Ok(s)
    }

    pub(super) fn served(&self) -> &[Served] {
        &self.served
    }

    pub(super) fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

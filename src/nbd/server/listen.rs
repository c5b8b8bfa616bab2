//! Where `serve-nbd` listens: a unix socket (created, and removed on exit, only by us:
//! never a file or a live socket that was there before) or a TCP address.

use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The socket file a [`Listener::Unix`] created: its path and (device, inode), so that
/// only that file is removed on exit.
pub struct SocketFile {
    pub path: PathBuf,
    id: Option<(u64, u64)>,
}

/// Where to listen.
pub enum Listener {
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener),
}

/// (device, inode) of what is at `p` now, not following symlinks.
fn file_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Make way for a Unix socket at `p`: nothing there, or a stale socket (removed).
/// Anything else is an error, and left alone.
fn clear_stale_socket(p: &Path) -> Result<()> {
    let shown = p.display();
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("checking {shown}"), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::conflict(format!(
            "cannot listen on {shown}: it exists and is not a socket (not replacing it)"
        )));
    }
    match UnixStream::connect(p) {
        Ok(_) => Err(Error::conflict(format!(
            "cannot listen on {shown}: another server is listening on that socket"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!("removing the stale socket {shown}");
            std::fs::remove_file(p)
                .map_err(|e| Error::io(format!("removing the stale socket {shown}"), e))
        }
        Err(e) => Err(Error::io(
            format!("cannot listen on {shown}: checking whether the socket there is in use"),
            e,
        )),
    }
}

impl Listener {
    /// `unix:PATH` (or an absolute path) or `HOST:PORT`. An existing PATH is replaced
    /// only if it is a stale socket (see the module doc).
    pub fn bind(spec: &str) -> Result<Listener> {
        if let Some(p) = spec
            .strip_prefix("unix:")
            .or_else(|| spec.starts_with('/').then_some(spec))
        {
            let path = PathBuf::from(p);
            clear_stale_socket(&path)?;
            let l =
                UnixListener::bind(&path).map_err(|e| Error::io(format!("listening on {p}"), e))?;
            let id = file_id(&path);
            return Ok(Listener::Unix(l, SocketFile { path, id }));
        }
        let l =
            TcpListener::bind(spec).map_err(|e| Error::io(format!("listening on {spec}"), e))?;
        Ok(Listener::Tcp(l))
    }

    /// Where clients connect (an NBD URI).
    pub fn uri(&self) -> String {
        match self {
            Listener::Unix(_, f) => format!("nbd+unix:///?socket={}", f.path.display()),
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "nbd://?".into(), |a| format!("nbd://{a}/")),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only the socket we bound: PATH may have been replaced since.
        if let Listener::Unix(_, f) = self
            && f.id.is_some()
            && file_id(&f.path) == f.id
        {
            let _ = std::fs::remove_file(&f.path);
        }
    }
}

//! A read-only NBD server: one export, many clients (a thread each, at most
//! [`Limits::max_clients`] at once).
//!
//! Speaks fixed newstyle negotiation (NBD_OPT_EXPORT_NAME, LIST, INFO, GO, ABORT,
//! STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`) and, in transmission,
//! READ (structured or simple replies), BLOCK_STATUS (`base:allocation`), FLUSH and CACHE
//! (no-ops), DISC; writes are refused with EPERM. The export is advertised read-only
//! and safe for multiple connections.
//!
//! What the export holds comes from an [`ExportReader`], one per connection (readers
//! need not be `Sync`: the backup reader holds a SQLite connection). A read is fully
//! assembled before any byte of it is sent, so a failing read (a corrupt chunk) becomes
//! an NBD error for that request, never partial or wrong data.
//!
//! Client bytes are untrusted: option payloads are capped ([`MAX_OPTION`]), request
//! lengths are checked against the export and [`MAX_REQUEST`], and a write payload is
//! drained (within the cap) before the EPERM reply so the stream stays in sync. Requests
//! past the end of the export (READ, CACHE, BLOCK_STATUS) and command flags the command
//! does not take get EINVAL (FUA is accepted everywhere; DF on READ, REQ_ONE on
//! BLOCK_STATUS — honoured: one descriptor, within the request). A zero-length READ
//! succeeds with no data (a NONE chunk: an OFFSET_DATA chunk must carry a byte).
//!
//! Limits ([`Limits`], defaults [`DEFAULT_MAX_CLIENTS`] and
//! [`DEFAULT_HANDSHAKE_TIMEOUT`]): a connection past the cap is closed at once (a
//! warning is logged, at most every 10 s); negotiation (greeting to the end of option
//! haggling) must finish within the handshake timeout, a deadline for the whole phase,
//! so a silent or trickling client is dropped. In transmission an idle client is kept
//! (NBD clients legitimately sit idle) but holds one of the slots.
//!
//! TLS ([`Limits::tls`]): the server answers NBD_OPT_STARTTLS, runs the handshake on the
//! same socket and goes on negotiating inside TLS; until then EXPORT_NAME closes the
//! connection and INFO, GO, LIST and the meta-context options get
//! `NBD_REP_ERR_TLS_REQD`, so no export is given out in plain text. Without TLS,
//! STARTTLS is answered `NBD_REP_ERR_POLICY`.
//!
//! A secret export name ([`Limits::secret_name`]) is the only name served: the default
//! export `""` is unknown and LIST answers an empty list, so a port scan learns nothing
//! that opens the export.
//!
//! `unix:PATH` never removes what it did not create: an existing non-socket at PATH, or
//! a socket another server answers on, is an error; only a stale socket (connection
//! refused) is replaced. On exit the socket is removed only if PATH is still the one this
//! process bound (same device and inode).
//!
//! Why our own: the `nbd` crate's server speaks only oldstyle-like EXPORT_NAME with
//! simple replies — no structured replies, no meta contexts, so clients could not skip
//! holes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::BASE_ALLOCATION;
use super::proto::*;
use crate::error::{Error, Result};

/// Largest option payload accepted from a client.
pub const MAX_OPTION: u32 = 64 << 10;
/// Largest read (and drained write) request.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Clients served at once by default; further connections are closed.
pub const DEFAULT_MAX_CLIENTS: usize = 64;
/// Default time a client has to finish negotiation.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two "connection refused: too many clients" warnings.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_LIST_META_CONTEXT: u32 = 9;
const REP_SERVER: u32 = 2;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;
const INFO_NAME: u16 = 1;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_DF: u16 = 1 << 2;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
/// Meta context id of `base:allocation` on our connections.
const ALLOC_ID: u32 = 1;

/// One connection's view of the export.
pub trait ExportReader {
    /// Fill `buf` with the bytes at `offset` (within the export).
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Allocation from `offset` for up to `len` bytes: `(length, flags)` runs in order,
    /// flags being `base:allocation`'s NBD_STATE_HOLE | NBD_STATE_ZERO or 0 for data.
    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>>;
}

/// Opens a reader for a new connection.
pub type ReaderFactory = dyn Fn() -> Result<Box<dyn ExportReader>> + Send + Sync;

/// The export: its name, size and preferred block size.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub preferred_block: u32,
}

mod listen;
mod options;
mod session;

pub use listen::{Listener, SocketFile};
pub use options::{parse_go, parse_meta};
use session::Session;

/// Bounds on what clients can hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Clients served at once; a connection past it is closed at once.
    pub max_clients: usize,
    /// Time from accepting a connection to the end of its option negotiation.
    pub handshake_timeout: Duration,
    /// Serve only over TLS: a client must send NBD_OPT_STARTTLS before any option that
    /// names or gives out the export (those get `NBD_REP_ERR_TLS_REQD`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The export's name is a secret (instant access from the API): only that exact
    /// name is served (not the default `""`) and NBD_OPT_LIST lists nothing.
    pub secret_name: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: DEFAULT_MAX_CLIENTS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            tls: None,
            secret_name: false,
        }
    }
}

/// Releases a client slot when its session thread ends (or never starts).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serve `info` on `listener` until `stop` is set, with the default [`Limits`].
pub fn serve(
    listener: &Listener,
    info: &ExportInfo,
    open: Arc<ReaderFactory>,
    stop: &AtomicBool,
) -> Result<()> {
    serve_with(listener, info, open, stop, &Limits::default())
}

/// Serve `info` on `listener` until `stop` is set. Each client runs on its own thread,
/// at most `limits.max_clients` at once.
pub fn serve_with(
    listener: &Listener,
    info: &ExportInfo,
    open: Arc<ReaderFactory>,
    stop: &AtomicBool,
    limits: &Limits,
) -> Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    let mut refused = 0u64;
    let mut last_warning: Option<Instant> = None;
    let set_nb = |r: std::io::Result<()>| r.map_err(|e| Error::io("configuring the listener", e));
    match listener {
        Listener::Unix(l, _) => set_nb(l.set_nonblocking(true))?,
        Listener::Tcp(l) => set_nb(l.set_nonblocking(true))?,
    }
    while !stop.load(Ordering::Relaxed) {
        let accepted: std::io::Result<Box<dyn Conn>> = match listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Box::new(s) as Box<dyn Conn>
            }),
        };
        match accepted {
            Ok(conn) => {
                // Only this thread takes slots: the check and the increment cannot race.
                if active.load(Ordering::SeqCst) >= limits.max_clients {
                    drop(conn);
                    refused += 1;
                    if last_warning.is_none_or(|t| t.elapsed() >= REFUSAL_WARN_EVERY) {
                        tracing::warn!(
                            "NBD: refused a connection: already serving the maximum of {} \
                             clients ({refused} refused so far)",
                            limits.max_clients
                        );
                        last_warning = Some(Instant::now());
                    }
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let slot = Slot(Arc::clone(&active));
                let (info, open) = (info.clone(), Arc::clone(&open));
                let timeout = limits.handshake_timeout;
                let tls = limits.tls.clone();
                let secret = limits.secret_name;
                let spawned =
                    std::thread::Builder::new()
                        .name("nbd-client".into())
                        .spawn(move || {
                            let _slot = slot;
                            if let Err(e) =
                                Session::new(conn, info, open, timeout, tls, secret).run()
                            {
                                tracing::info!("NBD client: {e}");
                            }
                        });
                // On failure the closure (its slot and connection) is dropped.
                if let Err(e) = spawned {
                    tracing::warn!("NBD: cannot start a thread for a client: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::io("accepting an NBD client", e)),
        }
    }
    Ok(())
}

/// A client socket.
pub trait Conn: Read + Write + Send {
    fn blocking(&self) -> std::io::Result<()>;
    /// Read and write timeouts (`None`: block).
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()>;
}
impl Conn for UnixStream {
    fn blocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(false)
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}
/// A client socket after STARTTLS.
struct TlsConn(rustls::StreamOwned<rustls::ServerConnection, Box<dyn Conn>>);
impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
impl Conn for TlsConn {
    fn blocking(&self) -> std::io::Result<()> {
        self.0.sock.blocking()
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.0.sock.set_timeouts(read, write)
    }
}
impl Conn for std::net::TcpStream {
    fn blocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(false)
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

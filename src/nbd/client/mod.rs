//! A synchronous NBD client: fixed newstyle negotiation with NBD_OPT_GO, structured
//! replies, meta contexts and block status.
//!
//! Why our own: the `nbd` crate negotiates with NBD_OPT_EXPORT_NAME and therefore cannot
//! ask for structured replies, meta contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`), block-size limits or block status, which are exactly what
//! change tracking needs. Everything the server sends is checked: magic numbers,
//! cookies, chunk offsets and lengths against the request with checked arithmetic, every
//! byte of a read covered exactly once (`reassembly`), payload sizes against fixed caps,
//! block-size limits against the spec and a floor ([`MIN_MAX_BLOCK`]); every socket
//! operation has a timeout ([`TIMEOUT`]) and every request a deadline over its whole
//! reply ([`REQUEST_DEADLINE`]: reads, block status, and each write, write-zeroes or
//! flush with its reply); with a cancel flag ([`NbdClient::set_cancel`]) every wait on
//! the socket wakes at least every [`CANCEL_POLL`] to look at it, so a cancelled task
//! is let go within a fraction of a second even by a server that trickles. A broken or
//! hostile server gets a clear error, never a panic, a hang, silently wrong data or an
//! unbounded allocation; after a protocol error the connection refuses further use. Reads (`read`) are split at the server's maximum
//! block size and pipelined, and read ahead across announced ranges (`read_ahead`), so
//! scattered chunks do not cost one round trip each. Submodules: `handshake`
//! (negotiation, STARTTLS), `read`, `write`, `status` (block status), `wait` (socket
//! waits with deadline and cancel), `stream`, `reassembly`.

use std::io::Read;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use self::stream::{Sock, Stream};
use super::proto::*;
use super::tls::NbdTlsClient;
use super::uri::{NbdUri, Transport};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::MAX_DISK_SIZE;

mod handshake;
mod read;
mod reassembly;
mod status;
mod stream;
mod wait;
mod write;

use self::wait::{ReadFail, connect_tcp, read_exact_by, write_all_by};

pub use reassembly::Coverage;

/// Largest option reply or non-data chunk payload we accept.
const MAX_SMALL_PAYLOAD: u32 = 1 << 20;
/// Largest block-status payload we accept (128 Ki descriptors).
const MAX_STATUS_PAYLOAD: u32 = 1 << 20;
/// Largest single read request.
const MAX_REQUEST: u32 = 32 << 20;
/// Socket timeout: the longest wait for any single read or write on the socket.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline of one request, from sending it to the end of its reply.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(120);
/// With a cancel flag: the longest a socket wait goes without looking at it.
pub const CANCEL_POLL: Duration = Duration::from_millis(200);
/// The smallest maximum block size we accept from a server. Smaller would make reads
/// crawl (a 1-byte maximum turns a 4 MiB read into 4 Mi requests); QEMU never
/// advertises less than 32 MiB and the NBD spec lets a server ask for at most 64 KiB as
/// its minimum, so 64 KiB is a floor every sane server meets.
pub const MIN_MAX_BLOCK: u32 = 64 << 10;
/// The largest minimum block size the NBD spec allows.
pub const MAX_MIN_BLOCK: u32 = 64 << 10;

/// One block-status extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// A connected NBD client in transmission phase.
pub struct NbdClient {
    stream: Stream,
    name: String,
    size: u64,
    tflags: u16,
    min_block: u32,
    max_block: u32,
    structured: bool,
    contexts: Vec<(u32, String)>,
    cookie: u64,
    /// In transmission phase (negotiation finished).
    ready: bool,
    /// Read requests in flight.
    inflight: Vec<read::PendingRead>,
    ahead: read::ReadAhead,
    request_deadline: Duration,
    /// Deadline of the reply being waited for, if any.
    deadline: Option<Instant>,
    /// The socket's current read timeout.
    cur_timeout: Duration,
    /// Set after an error that leaves the stream out of step.
    broken: Option<String>,
    /// The task's cancel flag: socket waits look at it (see [`CANCEL_POLL`]).
    cancel: Option<Arc<AtomicBool>>,
    /// Last sign of progress: a request completed, or the caller came back to `read`.
    progress: Instant,
}

impl NbdClient {
    /// Connect and negotiate; `meta` lists the meta contexts wanted (may be empty). An
    /// `nbds://` URI needs [`NbdClient::connect_tls`].
    pub fn connect(uri: &NbdUri, meta: &[String]) -> Result<NbdClient> {
        Self::connect_tls(uri, meta, None)
    }

    /// Connect and negotiate; with an `nbds://` URI, STARTTLS first with `tls` (which
    /// must name the CA). TLS settings given with a plain `nbd://` URI are refused rather
    /// than ignored.
    pub fn connect_tls(
        uri: &NbdUri,
        meta: &[String],
        tls: Option<&NbdTlsClient>,
    ) -> Result<NbdClient> {
        let name = uri.to_string();
        let tls = match (uri.tls, tls) {
            (true, t) => {
                let t = t.cloned().unwrap_or_default();
                Some((t.config()?, t.server_name(uri.host())?))
            }
            (false, Some(t)) if *t != NbdTlsClient::default() => {
                return Err(Error::config(format!(
                    "NBD TLS settings were given for {name}, a plain nbd:// URI: write it as \
                     nbds://… to use TLS"
                )));
            }
            (false, _) => None,
        };
        let stream = match &uri.transport {
            Transport::Unix(path) => {
                let s = UnixStream::connect(path)
                    .map_err(|e| Error::io(format!("connecting to NBD server {name}"), e))?;
                s.set_read_timeout(Some(TIMEOUT)).ok();
                s.set_write_timeout(Some(TIMEOUT)).ok();
                Stream::Plain(Sock::Unix(s))
            }
            Transport::Tcp { host, port } => {
                let s = connect_tcp(host, *port)
                    .map_err(|e| Error::io(format!("connecting to NBD server {name}"), e))?;
                s.set_read_timeout(Some(TIMEOUT)).ok();
                s.set_write_timeout(Some(TIMEOUT)).ok();
                s.set_nodelay(true).ok();
                Stream::Plain(Sock::Tcp(s))
            }
        };
        let mut c = NbdClient {
            stream,
            name,
            size: 0,
            tflags: 0,
            min_block: 1,
            max_block: MAX_REQUEST,
            structured: false,
            contexts: Vec::new(),
            cookie: 1,
            ready: false,
            inflight: Vec::new(),
            ahead: read::ReadAhead::default(),
            request_deadline: REQUEST_DEADLINE,
            deadline: None,
            cur_timeout: TIMEOUT,
            broken: None,
            cancel: None,
            progress: Instant::now(),
        };
        if let Err(e) = c.negotiate(&uri.export, meta, tls) {
            return Err(c.explain_tls_failure(e));
        }
        c.ready = true;
        Ok(c)
    }

    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::invalid(format!("NBD server {}: {what}", self.name))
    }

    fn io_err(&self, e: std::io::Error) -> Error {
        let what = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "timed out".to_string()
            }
            std::io::ErrorKind::UnexpectedEof => "closed the connection".to_string(),
            _ => "I/O error".to_string(),
        };
        Error::new(ErrorKind::Io, format!("NBD server {}: {what}", self.name)).with_source(e)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let r = read_exact_by(
            &mut self.stream,
            &mut self.cur_timeout,
            self.deadline,
            self.cancel.as_deref(),
            buf,
        );
        r.map_err(|e| self.stream_failed(e))
    }

    fn stream_error(&self, e: ReadFail) -> Error {
        match e {
            ReadFail::Deadline => self.deadline_error(),
            ReadFail::Cancelled => Error::cancelled(format!(
                "cancelled while waiting for NBD server {}",
                self.name
            )),
            ReadFail::Io(e) => self.io_err(e),
        }
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        self.read_exact(&mut a)?;
        Ok(a)
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        let r = write_all_by(&mut self.stream, self.deadline, self.cancel.as_deref(), buf);
        r.map_err(|e| self.stream_failed(e))
    }

    /// The error for a failed socket wait; the stream is out of step from now on.
    fn stream_failed(&mut self, e: ReadFail) -> Error {
        let e = self.stream_error(e);
        self.broken.get_or_insert_with(|| e.to_string());
        e
    }

    /// Let every later wait on the socket end with a `Cancelled` error soon after `flag`
    /// is set (the connection is unusable afterwards).
    pub fn set_cancel(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.cancel = flag;
    }

    fn read_u(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    /// The header of the next reply (simple or structured), checked.
    fn read_reply_header(&mut self) -> Result<ReplyHeader> {
        let mut m = [0u8; 4];
        self.read_exact(&mut m)?;
        let magic = u32::from_be_bytes(m);
        let rest_len = reply_rest_len(magic).map_err(|e| self.err(e.context()))?;
        let rest = self.read_u(rest_len)?;
        parse_reply_header(magic, &rest).map_err(|e| self.err(e.context()))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn read_only(&self) -> bool {
        self.tflags & TFLAG_READ_ONLY != 0
    }

    /// Smallest I/O unit the server accepts.
    pub fn min_block(&self) -> u32 {
        self.min_block
    }

    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(_, n)| n == name)
    }

    fn next_cookie(&mut self) -> u64 {
        self.cookie += 1;
        self.cookie
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.saturating_add(len) > self.size {
            return Err(Error::invalid(format!(
                "NBD export {}: request {offset}+{len} past its end ({} bytes)",
                self.name, self.size
            )));
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    /// A clean NBD_CMD_DISC, so that the server does not log an abrupt disconnect.
    fn drop(&mut self) {
        if !self.ready {
            return;
        }
        let cookie = self.next_cookie();
        let _ = self.write_all(&encode_request(0, CMD_DISC, cookie, 0, 0));
    }
}

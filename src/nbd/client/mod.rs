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
//! is let go within a fraction of a second even by a server that trickles. A broken or hostile server gets a clear error, never a
//! panic, a hang, silently wrong data or an unbounded allocation; after a protocol error
//! the connection refuses further use. Reads (`read`) are split at the server's maximum
//! block size and pipelined, and read ahead across announced ranges (`read_ahead`), so
//! scattered chunks do not cost one round trip each.

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

mod read;
mod reassembly;
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

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.write_all(&m)
    }

    fn read_opt_reply(&mut self, opt: u32) -> Result<(OptReply, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.read_exact(&mut h)?;
        let r = parse_opt_reply(&h).map_err(|e| self.err(e.context()))?;
        if r.option != opt {
            return Err(self.err(format!(
                "answered option {} while option {opt} was asked",
                r.option
            )));
        }
        if r.length > MAX_SMALL_PAYLOAD {
            return Err(self.err(format!("option reply of {} bytes", r.length)));
        }
        let data = self.read_u(r.length as usize)?;
        Ok((r, data))
    }

    fn negotiate(
        &mut self,
        export: &str,
        meta: &[String],
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    ) -> Result<()> {
        let mut hello = [0u8; 18];
        self.read_exact(&mut hello)?;
        let magic = u64::from_be_bytes(hello[0..8].try_into().unwrap_or_default());
        let opt = u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default());
        if magic != NBDMAGIC {
            return Err(self.err("is not an NBD server (bad greeting magic)"));
        }
        if opt != IHAVEOPT {
            return Err(self.err("speaks only the old NBD protocol (no newstyle negotiation)"));
        }
        let hflags = u16::from_be_bytes([hello[16], hello[17]]);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.err("does not support fixed newstyle negotiation"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.write_all(&cflags.to_be_bytes())?;

        if let Some((config, server_name)) = tls {
            self.start_tls(config, server_name)?;
        }

        // Structured replies (needed for block status and sparse reads).
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (r, _) = self.read_opt_reply(OPT_STRUCTURED_REPLY)?;
        if r.kind == REP_ERR_TLS_REQD {
            return Err(self.tls_required());
        }
        self.structured = r.kind == REP_ACK;

        if !meta.is_empty() {
            if !self.structured {
                return Err(Error::unsupported(format!(
                    "NBD server {} has no structured replies, so no block status",
                    self.name
                )));
            }
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            for q in meta {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (r, data) = self.read_opt_reply(OPT_SET_META_CONTEXT)?;
                match r.kind {
                    REP_ACK => break,
                    REP_ERR_TLS_REQD => return Err(self.tls_required()),
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                        let name = String::from_utf8_lossy(&data[4..]).into_owned();
                        self.contexts.push((id, name));
                    }
                    k if k & REP_ERR_BIT != 0 => {
                        return Err(self.err(format!(
                            "refused meta contexts {meta:?}: {}",
                            rep_error_name(k)
                        )));
                    }
                    k => return Err(self.err(format!("unexpected reply {k} to SET_META_CONTEXT"))),
                }
            }
            for q in meta {
                if !self.contexts.iter().any(|(_, n)| n == q) {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("NBD server {} does not offer meta context {q}", self.name),
                    ));
                }
            }
        }

        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        let mut have_export = false;
        loop {
            let (r, data) = self.read_opt_reply(OPT_GO)?;
            match r.kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                    INFO_EXPORT if data.len() == 12 => {
                        self.size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                        self.tflags = u16::from_be_bytes([data[10], data[11]]);
                        have_export = true;
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        let g = |o: usize| {
                            u32::from_be_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]])
                        };
                        let (min, pref, max) = (g(2), g(6), g(10));
                        self.check_block_sizes(min, pref, max)?;
                        self.min_block = min;
                        self.max_block = max.min(MAX_REQUEST);
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => return Err(self.err("malformed export info")),
                    _ => {}
                },
                REP_ERR_TLS_REQD => return Err(self.tls_required()),
                k if k & REP_ERR_BIT != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "NBD server {} refused export {export:?}: {} {msg}",
                            self.name,
                            rep_error_name(k)
                        ),
                    ));
                }
                k => return Err(self.err(format!("unexpected reply {k} to GO"))),
            }
        }
        if !have_export {
            return Err(self.err("sent no export size"));
        }
        if self.size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "NBD server {}: export size {} exceeds the limit of {MAX_DISK_SIZE} bytes",
                self.name, self.size
            )));
        }
        Ok(())
    }

    /// The server wants TLS and we did not ask for it: say how to.
    fn tls_required(&self) -> Error {
        Error::config(format!(
            "NBD server {} requires TLS: use an nbds:// URI (nbds://HOST:PORT/EXPORT or \
             nbds+unix:///EXPORT?socket=PATH) with --nbd-tls-ca FILE",
            self.name
        ))
    }

    /// NBD_OPT_STARTTLS, then the TLS handshake on the same socket; everything after is
    /// encrypted. A server that does not acknowledge STARTTLS is refused: never a silent
    /// downgrade to plain text.
    fn start_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Result<()> {
        self.send_option(OPT_STARTTLS, &[])?;
        let (r, data) = self.read_opt_reply(OPT_STARTTLS)?;
        if r.kind != REP_ACK {
            let msg = String::from_utf8_lossy(&data).into_owned();
            let why = if r.kind & REP_ERR_BIT != 0 {
                rep_error_name(r.kind)
            } else {
                "no acknowledgement"
            };
            return Err(Error::unsupported(format!(
                "NBD server {} does not offer TLS (NBD_OPT_STARTTLS answered: {why} {msg}); \
                 refusing to go on in plain text as nbds:// was asked. Serve the export with \
                 TLS (qemu-nbd --tls-creds) or use nbd:// on a trusted network",
                self.name
            )));
        }
        let host = server_name.to_str().into_owned();
        let conn = rustls::ClientConnection::new(config, server_name)
            .map_err(|e| Error::config(format!("TLS setup for {}: {e}", self.name)))?;
        let Stream::Plain(mut sock) = std::mem::replace(&mut self.stream, Stream::Swapping) else {
            return Err(self.err("STARTTLS on a connection that already uses TLS"));
        };
        let mut conn = conn;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut sock) {
                return Err(self.handshake_error(e, &host));
            }
        }
        self.stream = Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock)));
        Ok(())
    }

    fn handshake_error(&self, e: std::io::Error, host: &str) -> Error {
        let tls = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .cloned();
        match tls {
            Some(t) => Error::config(format!(
                "TLS handshake with NBD server {} failed: {t}. Check that --nbd-tls-ca is \
                 the CA that signed the server's certificate and that the certificate names \
                 {host} (else set --nbd-tls-hostname)",
                self.name
            )),
            None => self.io_err(e).context_prefix("TLS handshake"),
        }
    }

    /// An I/O error after the handshake often is the server refusing us at the TLS
    /// level (TLS 1.3 checks the client certificate after the client thinks the
    /// handshake is done): read its alert, if one came, and say what it means.
    fn explain_tls_failure(&mut self, e: Error) -> Error {
        if e.kind() != ErrorKind::Io || !matches!(self.stream, Stream::Tls(_)) {
            return e;
        }
        let _ = self.stream.set_read_timeout(Duration::from_secs(2));
        let mut b = [0u8; 1];
        let alert = match self.stream.read(&mut b) {
            Err(io) => io
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map(|t| t.to_string()),
            Ok(_) => None,
        };
        let alert = alert.map_or_else(String::new, |a| format!(" ({a})"));
        Error::config(format!(
            "NBD server {} ended the TLS session during negotiation{alert}: most likely it \
             wants a client certificate it trusts (qemu's tls-creds-x509 has verify-peer=on \
             by default): give --nbd-tls-cert and --nbd-tls-key, signed by the CA in the \
             server's tls-creds dir",
            self.name
        ))
        .with_source(e)
    }

    /// Refuse block-size constraints that are malformed by the NBD spec (minimum a power
    /// of two ≤ 64 KiB, preferred a power of two ≥ the minimum, maximum a multiple of the
    /// minimum) or that would make reads crawl (maximum below [`MIN_MAX_BLOCK`]).
    fn check_block_sizes(&self, min: u32, pref: u32, max: u32) -> Result<()> {
        if !min.is_power_of_two()
            || min > MAX_MIN_BLOCK
            || !pref.is_power_of_two()
            || pref < min
            || max < min
            || (max != u32::MAX && !max.is_multiple_of(min))
        {
            return Err(self.err(format!(
                "sent nonsensical block sizes (minimum {min}, preferred {pref}, maximum {max});                  the NBD spec wants powers of two, minimum at most 65536"
            )));
        }
        if max < MIN_MAX_BLOCK {
            return Err(Error::unsupported(format!(
                "NBD server {} allows at most {max} bytes per request; blockvault needs at                  least {MIN_MAX_BLOCK} (reads would crawl). Raise the server's maximum block size",
                self.name
            )));
        }
        Ok(())
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

    /// Block status of `context` for `[offset, offset + len)`: extents in order,
    /// covering at least part of the range (call again from the end for the rest).
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>> {
        let Some(&(id, _)) = self.contexts.iter().find(|(_, n)| n == context) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "meta context {context} was not negotiated with {}",
                    self.name
                ),
            ));
        };
        self.check_range(offset, len)?;
        self.check_usable()?;
        self.drain()?;
        self.deadline = Some(Instant::now() + self.request_deadline);
        let r = self.block_status_inner(id, context, offset, len);
        self.deadline = None;
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn block_status_inner(
        &mut self,
        id: u32,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>> {
        let len = len.min(u32::MAX as u64 / 2 + 1 - self.min_block as u64) as u32;
        let cookie = self.next_cookie();
        self.write_all(&encode_request(0, CMD_BLOCK_STATUS, cookie, offset, len))?;
        let mut out: Vec<StatusExtent> = Vec::new();
        loop {
            let (flags, kind, length) = match self.read_reply_header()? {
                ReplyHeader::Structured {
                    flags,
                    kind,
                    cookie: c,
                    length,
                } if c == cookie => (flags, kind, length),
                ReplyHeader::Simple { error, cookie: c } if c == cookie && error != 0 => {
                    return Err(self.err(format!("block status failed: {}", errno_name(error))));
                }
                _ => return Err(self.err("sent an unexpected reply to block status")),
            };
            if length > MAX_STATUS_PAYLOAD {
                return Err(self.err(format!("block-status chunk of {length} bytes")));
            }
            let p = self.read_u(length as usize)?;
            match kind {
                REPLY_BLOCK_STATUS => {
                    let (cid, descs) = parse_block_status(&p).map_err(|e| self.err(e.context()))?;
                    if cid == id {
                        let mut pos = offset;
                        for (l, f) in descs {
                            if l == 0 {
                                return Err(self.err("sent a zero-length block-status extent"));
                            }
                            let end = (pos + l as u64).min(offset + len as u64);
                            if end > pos {
                                out.push(StatusExtent {
                                    offset: pos,
                                    length: end - pos,
                                    flags: f,
                                });
                            }
                            pos += l as u64;
                        }
                    }
                }
                REPLY_NONE => {}
                k if k & 0x8000 != 0 => {
                    let (errno, msg) =
                        parse_error_payload(&p).map_err(|e| self.err(e.context()))?;
                    return Err(
                        self.err(format!("block status failed: {} {msg}", errno_name(errno)))
                    );
                }
                k => return Err(self.err(format!("sent chunk type {k} to block status"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if out.is_empty() {
            return Err(self.err(format!("sent no block status for {context} at {offset}")));
        }
        Ok(out)
    }

    /// Extents of `[0, size)` whose `context` flags intersect `mask`, merged.
    pub fn extents_with(
        &mut self,
        context: &str,
        mask: u32,
        want_set: bool,
    ) -> Result<Vec<crate::extent::Extent>> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let st = self.block_status(context, pos, self.size - pos)?;
            for e in st {
                if ((e.flags & mask) != 0) == want_set {
                    crate::extent::push_extent(&mut out, e.offset, e.length);
                }
                pos = e.offset + e.length;
            }
        }
        Ok(out)
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

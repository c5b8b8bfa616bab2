//! One client connection: option negotiation, then transmission (reads, block status,
//! refusals), with the limits and replies the module doc of `server` describes.

use super::options::{parse_go, parse_meta};
use super::*;

pub(super) struct Session {
    conn: Box<dyn Conn>,
    info: ExportInfo,
    open: Arc<ReaderFactory>,
    structured: bool,
    alloc_ctx: bool,
    no_zeroes: bool,
    handshake_timeout: Duration,
    /// End of negotiation; `None` once in transmission.
    deadline: Option<Instant>,
    /// TLS is required and not yet started (the configuration to start it with).
    tls_pending: Option<Arc<rustls::ServerConfig>>,
    /// TLS runs on this connection.
    tls_on: bool,
    /// Only `info.name` itself is served (see `Limits::secret_name`).
    secret_name: bool,
}

/// The connection while it is being wrapped in TLS.
struct Closed;
impl Read for Closed {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::NotConnected.into())
    }
}
impl Write for Closed {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::NotConnected.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Conn for Closed {
    fn blocking(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_timeouts(&self, _: Option<Duration>, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the option phase ended with.
enum Next {
    Transmit,
    Close,
}

impl Session {
    pub(super) fn new(
        conn: Box<dyn Conn>,
        info: ExportInfo,
        open: Arc<ReaderFactory>,
        handshake_timeout: Duration,
        tls: Option<Arc<rustls::ServerConfig>>,
        secret_name: bool,
    ) -> Session {
        Session {
            conn,
            info,
            open,
            structured: false,
            alloc_ctx: false,
            no_zeroes: false,
            handshake_timeout,
            deadline: None,
            tls_pending: tls,
            tls_on: false,
            secret_name,
        }
    }

    fn io(e: std::io::Error) -> Error {
        Error::io("NBD connection", e)
    }

    fn negotiation_timed_out(&self) -> Error {
        Error::io(
            format!(
                "NBD client did not finish negotiation within {:?}; dropped",
                self.handshake_timeout
            ),
            std::io::ErrorKind::TimedOut.into(),
        )
    }

    /// Read exactly `buf` in negotiation: each read may wait only until the deadline,
    /// so a client trickling bytes cannot stretch it.
    fn read_nego(&mut self, mut buf: &mut [u8]) -> Result<()> {
        let Some(deadline) = self.deadline else {
            return self.conn.read_exact(buf).map_err(Self::io);
        };
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.negotiation_timed_out());
            }
            self.conn
                .set_timeouts(Some(left), Some(self.handshake_timeout))
                .map_err(Self::io)?;
            match self.conn.read(buf) {
                Ok(0) => return Err(Self::io(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.negotiation_timed_out());
                }
                Err(e) => return Err(Self::io(e)),
            }
        }
        Ok(())
    }

    /// Read and discard `len` bytes in negotiation.
    fn drain_nego(&mut self, len: u32) -> Result<()> {
        let mut left = len as usize;
        let mut buf = vec![0u8; left.min(64 << 10)];
        while left > 0 {
            let n = left.min(buf.len());
            self.read_nego(&mut buf[..n])?;
            left -= n;
        }
        Ok(())
    }

    pub(super) fn run(mut self) -> Result<()> {
        self.conn.blocking().map_err(Self::io)?;
        // The whole negotiation has one deadline; writes too cannot block forever.
        self.deadline = Some(Instant::now() + self.handshake_timeout);
        self.conn
            .set_timeouts(Some(self.handshake_timeout), Some(self.handshake_timeout))
            .map_err(Self::io)?;
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.conn.write_all(&hello).map_err(Self::io)?;
        let mut cf = [0u8; 4];
        self.read_nego(&mut cf)?;
        let cflags = u32::from_be_bytes(cf);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(Error::invalid("client sent unknown handshake flags"));
        }
        self.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        match self.options()? {
            Next::Close => Ok(()),
            Next::Transmit => {
                self.deadline = None;
                self.conn.set_timeouts(None, None).map_err(Self::io)?;
                self.transmit()
            }
        }
    }

    fn tflags(&self) -> u16 {
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
    }

    fn opt_reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
        let mut r = Vec::with_capacity(20 + data.len());
        r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&opt.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        self.conn.write_all(&r).map_err(Self::io)
    }

    /// The TLS handshake on the connection, right after STARTTLS was acknowledged;
    /// negotiation goes on inside TLS, within the same deadline.
    fn start_tls(&mut self) -> Result<()> {
        let Some(config) = self.tls_pending.take() else {
            return Ok(());
        };
        let mut conn = rustls::ServerConnection::new(config)
            .map_err(|e| Error::config(format!("TLS setup: {e}")))?;
        let mut sock = std::mem::replace(&mut self.conn, Box::new(Closed));
        while conn.is_handshaking() {
            if Instant::now() >= self.deadline.unwrap_or_else(Instant::now) {
                return Err(self.negotiation_timed_out());
            }
            conn.complete_io(&mut sock)
                .map_err(|e| Error::io("TLS handshake with an NBD client", e))?;
        }
        self.conn = Box::new(TlsConn(rustls::StreamOwned::new(conn, sock)));
        self.tls_on = true;
        Ok(())
    }

    fn name_ok(&self, name: &str) -> bool {
        (name.is_empty() && !self.secret_name) || name == self.info.name
    }

    fn options(&mut self) -> Result<Next> {
        loop {
            let mut h = [0u8; 16];
            self.read_nego(&mut h)?;
            if u64::from_be_bytes(h[0..8].try_into().unwrap_or_default()) != IHAVEOPT {
                return Err(Error::invalid("client sent a bad option magic"));
            }
            let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            if len > MAX_OPTION {
                // Drain what is reasonable, then refuse; a huge length ends the session.
                if len > MAX_REQUEST {
                    return Err(Error::invalid("client sent an oversized option"));
                }
                self.drain_nego(len)?;
                self.opt_reply(opt, REP_ERR_TOO_BIG, b"")?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            self.read_nego(&mut data)?;
            if self.tls_pending.is_some() {
                match opt {
                    OPT_STARTTLS if data.is_empty() => {
                        self.opt_reply(opt, REP_ACK, b"")?;
                        self.start_tls()?;
                    }
                    OPT_STARTTLS => self.opt_reply(opt, REP_ERR_INVALID, b"")?,
                    OPT_EXPORT_NAME => {
                        return Err(Error::config(
                            "client asked for the export without TLS (STARTTLS first); closed",
                        ));
                    }
                    OPT_ABORT => {
                        let _ = self.opt_reply(opt, REP_ACK, b"");
                        return Ok(Next::Close);
                    }
                    _ => self.opt_reply(opt, REP_ERR_TLS_REQD, b"TLS required: STARTTLS first")?,
                }
                continue;
            }
            match opt {
                OPT_STARTTLS if self.tls_on => self.opt_reply(opt, REP_ERR_INVALID, b"")?,
                OPT_STARTTLS => self.opt_reply(opt, REP_ERR_POLICY, b"this server has no TLS")?,
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    if !self.name_ok(&name) {
                        return Err(Error::not_found(format!(
                            "client asked for export {name:?}"
                        )));
                    }
                    let mut r = Vec::with_capacity(134);
                    r.extend_from_slice(&self.info.size.to_be_bytes());
                    r.extend_from_slice(&self.tflags().to_be_bytes());
                    if !self.no_zeroes {
                        r.extend_from_slice(&[0u8; 124]);
                    }
                    self.conn.write_all(&r).map_err(Self::io)?;
                    return Ok(Next::Transmit);
                }
                OPT_ABORT => {
                    let _ = self.opt_reply(opt, REP_ACK, b"");
                    return Ok(Next::Close);
                }
                OPT_LIST if self.secret_name => self.opt_reply(opt, REP_ACK, b"")?,
                OPT_LIST => {
                    let mut d = (self.info.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(self.info.name.as_bytes());
                    self.opt_reply(opt, REP_SERVER, &d)?;
                    self.opt_reply(opt, REP_ACK, b"")?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.opt_reply(opt, REP_ERR_INVALID, b"")?;
                    } else {
                        self.structured = true;
                        self.opt_reply(opt, REP_ACK, b"")?;
                    }
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, reqs)) = parse_go(&data) else {
                        self.opt_reply(opt, REP_ERR_INVALID, b"")?;
                        continue;
                    };
                    if !self.name_ok(&name) {
                        self.opt_reply(opt, REP_ERR_UNKNOWN, b"no such export")?;
                        continue;
                    }
                    let mut exp = INFO_EXPORT.to_be_bytes().to_vec();
                    exp.extend_from_slice(&self.info.size.to_be_bytes());
                    exp.extend_from_slice(&self.tflags().to_be_bytes());
                    self.opt_reply(opt, REP_INFO, &exp)?;
                    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&self.info.preferred_block.to_be_bytes());
                    bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    self.opt_reply(opt, REP_INFO, &bs)?;
                    if reqs.contains(&INFO_NAME) {
                        let mut n = INFO_NAME.to_be_bytes().to_vec();
                        n.extend_from_slice(self.info.name.as_bytes());
                        self.opt_reply(opt, REP_INFO, &n)?;
                    }
                    self.opt_reply(opt, REP_ACK, b"")?;
                    if opt == OPT_GO {
                        return Ok(Next::Transmit);
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = opt == OPT_SET_META_CONTEXT;
                    let parsed = parse_meta(&data);
                    match parsed {
                        Some((name, _)) if !self.name_ok(&name) => {
                            self.opt_reply(opt, REP_ERR_UNKNOWN, b"no such export")?;
                        }
                        Some(_) if set && !self.structured => {
                            self.opt_reply(opt, REP_ERR_INVALID, b"structured replies first")?;
                        }
                        Some((_, queries)) => {
                            let wanted = if set {
                                queries.iter().any(|q| q == BASE_ALLOCATION)
                            } else {
                                queries.is_empty()
                                    || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
                            };
                            if set {
                                self.alloc_ctx = wanted;
                            }
                            if wanted {
                                let mut d = ALLOC_ID.to_be_bytes().to_vec();
                                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                self.opt_reply(opt, REP_META_CONTEXT, &d)?;
                            }
                            self.opt_reply(opt, REP_ACK, b"")?;
                        }
                        None => self.opt_reply(opt, REP_ERR_INVALID, b"")?,
                    }
                }
                _ => self.opt_reply(opt, REP_ERR_UNSUP, b"")?,
            }
        }
    }

    fn simple(&mut self, cookie: u64, error: u32, data: &[u8]) -> Result<()> {
        let mut r = Vec::with_capacity(16 + data.len());
        r.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&error.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        self.conn.write_all(&r).map_err(Self::io)?;
        if !data.is_empty() {
            self.conn.write_all(data).map_err(Self::io)?;
        }
        Ok(())
    }

    fn chunk(
        &mut self,
        cookie: u64,
        flags: u16,
        kind: u16,
        head: &[u8],
        data: &[u8],
    ) -> Result<()> {
        let mut r = Vec::with_capacity(20 + head.len());
        r.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&((head.len() + data.len()) as u32).to_be_bytes());
        r.extend_from_slice(head);
        self.conn.write_all(&r).map_err(Self::io)?;
        if !data.is_empty() {
            self.conn.write_all(data).map_err(Self::io)?;
        }
        Ok(())
    }

    /// Reply with an error (structured error chunk or simple reply).
    fn error(&mut self, cookie: u64, errno: u32, msg: &str) -> Result<()> {
        if self.structured {
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            let mut p = errno.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            self.chunk(cookie, REPLY_FLAG_DONE, REPLY_ERROR, &p, b"")
        } else {
            self.simple(cookie, errno, b"")
        }
    }

    fn ok(&mut self, cookie: u64) -> Result<()> {
        if self.structured {
            self.chunk(cookie, REPLY_FLAG_DONE, REPLY_NONE, b"", b"")
        } else {
            self.simple(cookie, 0, b"")
        }
    }

    /// Command flags `kind` takes: FUA everywhere (nothing to persist on a read-only
    /// export), DF on READ with structured replies (a read is always one chunk),
    /// REQ_ONE on BLOCK_STATUS, NO_HOLE and FAST_ZERO on WRITE_ZEROES (refused anyway).
    fn valid_flags(&self, kind: u16) -> u16 {
        CMD_FLAG_FUA
            | match kind {
                CMD_READ if self.structured => CMD_FLAG_DF,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                _ => 0,
            }
    }

    /// Discard a write's payload so the stream stays in sync; a huge one ends the session.
    fn drain_write(&mut self, len: u32) -> Result<()> {
        if len > MAX_REQUEST {
            return Err(Error::invalid("client sent an oversized write"));
        }
        std::io::copy(
            &mut (&mut self.conn).take(u64::from(len)),
            &mut std::io::sink(),
        )
        .map_err(Self::io)?;
        Ok(())
    }

    fn transmit(&mut self) -> Result<()> {
        let mut reader = (self.open)()?;
        let mut buf = Vec::new();
        loop {
            let mut h = [0u8; 28];
            match self.conn.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(Self::io(e)),
            }
            if u32::from_be_bytes([h[0], h[1], h[2], h[3]]) != REQUEST_MAGIC {
                return Err(Error::invalid("client sent a bad request magic"));
            }
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let kind = u16::from_be_bytes([h[6], h[7]]);
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
            let offset = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default());
            let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
            let in_range = offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= self.info.size);
            if kind != CMD_DISC && flags & !self.valid_flags(kind) != 0 {
                if kind == CMD_WRITE {
                    self.drain_write(len)?;
                }
                self.error(
                    cookie,
                    EINVAL,
                    &format!("command flags {flags:#x} not supported for command {kind}"),
                )?;
                continue;
            }
            match kind {
                CMD_READ => {
                    if !in_range || len > MAX_REQUEST {
                        self.error(cookie, EINVAL, "read outside the export or too large")?;
                        continue;
                    }
                    if len == 0 {
                        // Unspecified by the protocol; an OFFSET_DATA chunk must carry at
                        // least one byte, so: success without data.
                        self.ok(cookie)?;
                        continue;
                    }
                    buf.resize(len as usize, 0);
                    match reader.read(offset, &mut buf) {
                        Ok(()) if self.structured => {
                            let head = offset.to_be_bytes();
                            let data = std::mem::take(&mut buf);
                            let r = self.chunk(
                                cookie,
                                REPLY_FLAG_DONE,
                                REPLY_OFFSET_DATA,
                                &head,
                                &data,
                            );
                            buf = data;
                            r?;
                        }
                        Ok(()) => {
                            let data = std::mem::take(&mut buf);
                            let r = self.simple(cookie, 0, &data);
                            buf = data;
                            r?;
                        }
                        Err(e) => {
                            tracing::warn!("NBD read of {len} bytes at {offset} failed: {e}");
                            self.error(cookie, EIO, &e.to_string())?;
                        }
                    }
                }
                CMD_BLOCK_STATUS => {
                    if !self.structured || !self.alloc_ctx || !in_range || len == 0 {
                        self.error(
                            cookie,
                            EINVAL,
                            "block status needs base:allocation and a range in the export",
                        )?;
                        continue;
                    }
                    // REQ_ONE: exactly one descriptor, no longer than the request.
                    let (most, cap) = if flags & CMD_FLAG_REQ_ONE != 0 {
                        (1, u64::from(len))
                    } else {
                        (1024, u64::from(u32::MAX) & !0xffff)
                    };
                    match reader.allocation(offset, u64::from(len)) {
                        Ok(runs) => {
                            let mut p = ALLOC_ID.to_be_bytes().to_vec();
                            for (l, f) in runs.iter().take(most) {
                                let l = (*l).min(cap) as u32;
                                if l == 0 {
                                    break;
                                }
                                p.extend_from_slice(&l.to_be_bytes());
                                p.extend_from_slice(&f.to_be_bytes());
                            }
                            if p.len() == 4 {
                                self.error(cookie, EIO, "no allocation information")?;
                            } else {
                                self.chunk(cookie, REPLY_FLAG_DONE, REPLY_BLOCK_STATUS, &p, b"")?;
                            }
                        }
                        Err(e) => self.error(cookie, EIO, &e.to_string())?,
                    }
                }
                CMD_DISC => return Ok(()),
                CMD_FLUSH => self.ok(cookie)?,
                CMD_CACHE => {
                    if in_range {
                        self.ok(cookie)?;
                    } else {
                        self.error(cookie, EINVAL, "cache request outside the export")?;
                    }
                }
                CMD_WRITE => {
                    self.drain_write(len)?;
                    self.error(cookie, EPERM, "the export is read-only")?;
                }
                CMD_WRITE_ZEROES | CMD_TRIM => {
                    self.error(cookie, EPERM, "the export is read-only")?
                }
                _ => self.error(cookie, EINVAL, "unknown command")?,
            }
        }
    }
}

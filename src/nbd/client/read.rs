//! Pipelined reads: NBD_CMD_READ requests in flight, their replies reassembled
//! ([`Coverage`]), a deadline per request, and read-ahead over announced ranges.
//!
//! ```text
//!  read(offset, buf) ─┬─ served from the read-ahead queue when it was announced
//!                     └─ otherwise split at the server's maximum block size, ≤ IN_FLIGHT
//!                        requests in flight, data written straight into `buf`
//!  read_ahead(ranges) ── pieces of ≤ 1 MiB requested ahead of the reader, in order,
//!                        ≤ AHEAD_REQUESTS in flight and ≤ AHEAD_BYTES held
//! ```
//!
//! Deadline (`request_deadline`, default 120 s): while requests are in flight, the server
//! must complete one of them within the deadline of the latest of: the oldest one being
//! sent, the previous completion, the caller coming back into `read`. So a request's
//! whole reply is bounded once it is at the head of the server's queue, and a server
//! that trickles bytes keeps no backup running for ever (the socket timeout alone only
//! bounds each single read); yet requests queued behind others on a slow link, or read
//! ahead while the caller was busy elsewhere, are not charged for that wait.
//! Replies may arrive in any order and interleave between requests; each one is routed
//! by cookie. After any error the connection is unusable and says so.

use std::collections::VecDeque;
use std::time::Instant;

use super::reassembly::Coverage;
use super::{MAX_SMALL_PAYLOAD, NbdClient};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::Extent;
use crate::nbd::proto::*;

/// Requests in flight per plain read call.
const IN_FLIGHT: usize = 16;
/// Read-ahead: requests in flight and bytes requested but not yet consumed.
const AHEAD_REQUESTS: usize = 64;
const AHEAD_BYTES: u64 = 32 << 20;
/// Read-ahead piece size (also capped by the server's maximum block size).
const AHEAD_PIECE: u64 = 1 << 20;

/// Where a request's data goes.
#[derive(Debug)]
enum Dst {
    /// Into the caller's buffer of the running `read` call, from this index.
    Caller(usize),
    /// Into its own buffer (read-ahead).
    Own(Vec<u8>),
}

/// A read request in flight.
#[derive(Debug)]
pub(super) struct PendingRead {
    cookie: u64,
    offset: u64,
    len: usize,
    coverage: Coverage,
    sent: Instant,
    dst: Dst,
}

/// A read-ahead piece: requested (cookie) or received.
#[derive(Debug)]
pub(super) struct AheadPiece {
    offset: u64,
    len: u64,
    cookie: u64,
    data: Option<Vec<u8>>,
}

/// Read-ahead state of a connection.
#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    /// Ranges announced and not requested yet, in order.
    todo: VecDeque<(u64, u64)>,
    /// Requested pieces, in order.
    queue: VecDeque<AheadPiece>,
}

impl PendingRead {
    fn dst<'a>(&'a mut self, caller: &'a mut [u8]) -> &'a mut [u8] {
        match &mut self.dst {
            Dst::Own(v) => v,
            Dst::Caller(start) => &mut caller[*start..*start + self.len],
        }
    }
}

impl NbdClient {
    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_usable()?;
        self.check_range(offset, buf.len() as u64)?;
        // Time the caller spent away (hashing, waiting on its own queues) is not the
        // server's: the deadline clock restarts when the caller comes back.
        self.progress = Instant::now();
        let r = self.read_inner(offset, buf);
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    /// Announce the ranges the next `read` calls will ask for, in order (sorted, not
    /// overlapping); the client then keeps requests for them in flight ahead of the
    /// reader. Replaces any earlier announcement. Reads elsewhere still work.
    pub fn read_ahead(&mut self, ranges: &[Extent]) {
        let piece = AHEAD_PIECE.min(u64::from(self.max_block.max(self.min_block)));
        self.ahead.todo.clear();
        for e in ranges {
            let end = e.end().min(self.size);
            let mut pos = e.offset;
            while pos < end {
                let n = piece.min(end - pos);
                self.ahead.todo.push_back((pos, n));
                pos += n;
            }
        }
    }

    /// Set the deadline of every later request (default 120 s).
    pub fn set_request_deadline(&mut self, d: std::time::Duration) {
        self.request_deadline = d;
    }

    pub(super) fn check_usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "NBD connection to {} is unusable after an earlier error ({why}); reconnect",
                    self.name
                ),
            )),
            None => Ok(()),
        }
    }

    /// Forget the read-ahead and wait out every request in flight (before a command
    /// whose reply must come next).
    pub(super) fn drain(&mut self) -> Result<()> {
        self.ahead.todo.clear();
        self.ahead.queue.clear();
        while !self.inflight.is_empty() {
            if let Err(e) = self.receive_one(&mut []) {
                self.broken = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    fn read_inner(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            self.top_up_ahead()?;
            // Drop pieces the reader went past.
            while self
                .ahead
                .queue
                .front()
                .is_some_and(|p| p.offset + p.len <= pos)
            {
                // A piece still in flight is discarded when its reply arrives.
                self.ahead.queue.pop_front();
                self.top_up_ahead()?;
            }
            match self.ahead.queue.front() {
                Some(p) if p.offset <= pos => {
                    let cookie = p.cookie;
                    while self.ahead.queue.front().is_some_and(|p| p.data.is_none()) {
                        self.receive_one(&mut [])?;
                    }
                    let Some(p) = self.ahead.queue.front() else {
                        return Err(self.err("read-ahead queue lost a piece"));
                    };
                    debug_assert_eq!(p.cookie, cookie);
                    let data = p.data.as_deref().unwrap_or_default();
                    let from = (pos - p.offset) as usize;
                    let n = ((p.offset + p.len).min(end) - pos) as usize;
                    let at = (pos - offset) as usize;
                    buf[at..at + n].copy_from_slice(&data[from..from + n]);
                    pos += n as u64;
                    if pos >= p.offset + p.len {
                        self.ahead.queue.pop_front();
                    }
                }
                next => {
                    // Not announced: a plain read up to the next announced piece.
                    let stop = next.map_or(end, |p| p.offset.min(end));
                    let at = (pos - offset) as usize;
                    let n = (stop - pos) as usize;
                    self.read_direct(pos, &mut buf[at..at + n])?;
                    pos = stop;
                }
            }
        }
        Ok(())
    }

    /// Request announced pieces while the read-ahead budget allows.
    fn top_up_ahead(&mut self) -> Result<()> {
        let held: u64 = self.ahead.queue.iter().map(|p| p.len).sum();
        let mut held = held;
        while self.ahead.queue.len() < AHEAD_REQUESTS && held < AHEAD_BYTES {
            let Some((off, n)) = self.ahead.todo.pop_front() else {
                break;
            };
            let cookie = self.send_read(off, n as usize, Dst::Own(vec![0u8; n as usize]))?;
            self.ahead.queue.push_back(AheadPiece {
                offset: off,
                len: n,
                cookie,
                data: None,
            });
            held += n;
        }
        Ok(())
    }

    /// A read not announced: split at the maximum block size, pipelined.
    fn read_direct(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let piece = self.max_block.max(self.min_block) as usize;
        let mut mine: Vec<u64> = Vec::new();
        let mut next = 0usize;
        while next < buf.len() || !mine.is_empty() {
            while next < buf.len() && mine.len() < IN_FLIGHT {
                let len = piece.min(buf.len() - next);
                mine.push(self.send_read(offset + next as u64, len, Dst::Caller(next))?);
                next += len;
            }
            if let Some(done) = self.receive_one(buf)? {
                mine.retain(|&c| c != done);
            }
        }
        Ok(())
    }

    fn send_read(&mut self, offset: u64, len: usize, dst: Dst) -> Result<u64> {
        let cookie = self.next_cookie();
        let req = encode_request(0, CMD_READ, cookie, offset, len as u32);
        self.write_all(&req)?;
        self.inflight.push(PendingRead {
            cookie,
            offset,
            len,
            coverage: Coverage::new(offset, len as u64),
            sent: Instant::now(),
            dst,
        });
        Ok(cookie)
    }

    /// The deadline for the next completion (see the module doc).
    fn arm_deadline(&mut self) {
        self.deadline = self
            .inflight
            .iter()
            .map(|r| r.sent)
            .min()
            .map(|oldest| oldest.max(self.progress) + self.request_deadline);
    }

    /// The error for a request that missed its deadline.
    pub(super) fn deadline_error(&self) -> Error {
        let what = match self.inflight.iter().min_by_key(|r| r.sent) {
            Some(r) => format!("the read of {} bytes at {}", r.len, r.offset),
            None => "a request".to_string(),
        };
        Error::new(
            ErrorKind::Io,
            format!(
                "NBD server {}: {what} was not answered in full within {} s (request deadline); \
                 the server is stalled or too slow",
                self.name,
                self.request_deadline.as_secs_f64()
            ),
        )
    }

    /// Process one reply chunk; returns the cookie of the request it completed, if any.
    fn receive_one(&mut self, caller: &mut [u8]) -> Result<Option<u64>> {
        self.arm_deadline();
        let r = self.receive_one_inner(caller);
        self.deadline = None;
        r
    }

    fn receive_one_inner(&mut self, caller: &mut [u8]) -> Result<Option<u64>> {
        let header = self.read_reply_header()?;
        let cookie = match header {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        };
        let Some(i) = self.inflight.iter().position(|p| p.cookie == cookie) else {
            return Err(self.err(format!("replied to unknown request {cookie}")));
        };
        let (req_off, len) = (self.inflight[i].offset, self.inflight[i].len);
        let done = match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    return Err(self.read_error(req_off, len, error, String::new()));
                }
                let range = self.inflight[i]
                    .coverage
                    .accept(req_off, len as u64)
                    .map_err(|e| self.err(e))?;
                self.read_into(i, caller, range)?;
                true
            }
            ReplyHeader::Structured {
                flags,
                kind,
                length,
                ..
            } => {
                match kind {
                    REPLY_OFFSET_DATA => {
                        if length <= 8 {
                            return Err(self.err("sent a data chunk with no data"));
                        }
                        let off = u64::from_be_bytes(self.read_array::<8>()?);
                        let n = u64::from(length - 8);
                        let range = self.inflight[i]
                            .coverage
                            .accept(off, n)
                            .map_err(|e| self.err(e))?;
                        self.read_into(i, caller, range)?;
                    }
                    REPLY_OFFSET_HOLE => {
                        if length != 12 {
                            return Err(self.err("malformed hole chunk"));
                        }
                        let p = self.read_array::<12>()?;
                        let off =
                            u64::from_be_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
                        let n = u64::from(u32::from_be_bytes([p[8], p[9], p[10], p[11]]));
                        let range = self.inflight[i]
                            .coverage
                            .accept(off, n)
                            .map_err(|e| self.err(format!("hole: {e}")))?;
                        self.inflight[i].dst(caller)[range].fill(0);
                    }
                    REPLY_NONE if length == 0 => {}
                    k if k & 0x8000 != 0 => {
                        if length > MAX_SMALL_PAYLOAD {
                            return Err(self.err("oversized error chunk"));
                        }
                        let p = self.read_u(length as usize)?;
                        let (errno, msg) =
                            parse_error_payload(&p).map_err(|e| self.err(e.context()))?;
                        return Err(self.read_error(req_off, len, errno, msg));
                    }
                    k => {
                        return Err(self.err(format!(
                            "sent an unexpected chunk type {k} ({length} bytes)"
                        )));
                    }
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    self.inflight[i]
                        .coverage
                        .finish()
                        .map_err(|e| self.err(e))?;
                    true
                } else {
                    false
                }
            }
        };
        if !done {
            return Ok(None);
        }
        self.progress = Instant::now();
        let req = self.inflight.swap_remove(i);
        if let Dst::Own(data) = req.dst
            && let Some(p) = self.ahead.queue.iter_mut().find(|p| p.cookie == cookie)
        {
            p.data = Some(data);
        }
        Ok(Some(cookie))
    }

    /// Read the payload of a data piece into its place.
    fn read_into(
        &mut self,
        i: usize,
        caller: &mut [u8],
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let deadline = self.deadline;
        let cancel = self.cancel.clone();
        let (stream, req) = (&mut self.stream, &mut self.inflight[i]);
        let dst = &mut req.dst(caller)[range];
        match super::read_exact_by(
            stream,
            &mut self.cur_timeout,
            deadline,
            cancel.as_deref(),
            dst,
        ) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.stream_error(e)),
        }
    }

    fn read_error(&self, offset: u64, len: usize, errno: u32, msg: String) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "NBD server {} failed the read of {len} bytes at {offset}: {} ({errno}) {msg}",
                self.name,
                errno_name(errno)
            ),
        )
    }
}

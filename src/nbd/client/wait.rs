//! Waiting on the NBD peer's socket: every read and write of the client goes through
//! here. A wait ends at the request's deadline (the socket timeout is shortened to
//! it, so a peer that trickles cannot stretch it), after [`TIMEOUT`] without a byte
//! when there is no deadline, and within [`CANCEL_POLL`] of the task's cancel flag
//! being set. Connecting gives up after [`TIMEOUT`] per address.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::stream::Stream;
use super::{CANCEL_POLL, TIMEOUT};

/// Why a socket read stopped.
pub(super) enum ReadFail {
    Deadline,
    Cancelled,
    Io(std::io::Error),
}

/// The socket timeout to use now: up to the deadline, at most [`TIMEOUT`], and at most
/// [`CANCEL_POLL`] when there is a cancel flag to look at.
fn wait_slice(deadline: Option<Instant>, cancel: Option<&AtomicBool>) -> Duration {
    let t = match deadline {
        None => TIMEOUT,
        Some(d) => d
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), TIMEOUT),
    };
    if cancel.is_some() {
        t.min(CANCEL_POLL)
    } else {
        t
    }
}

/// After a socket timeout: cancelled, past the deadline, or (`None`) wait on. Without
/// a deadline or cancel flag the timeout is [`TIMEOUT`] and ends the wait.
fn after_timeout(
    deadline: Option<Instant>,
    cancel: Option<&AtomicBool>,
    e: std::io::Error,
) -> Option<ReadFail> {
    if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
        return Some(ReadFail::Cancelled);
    }
    match deadline {
        Some(d) if Instant::now() >= d => Some(ReadFail::Deadline),
        Some(_) => None,
        None if cancel.is_some() => None,
        None => Some(ReadFail::Io(e)),
    }
}

/// `read_exact` with a deadline over the whole buffer: the socket timeout is shortened
/// before each read so that a trickling server cannot stretch it (and set back to
/// [`TIMEOUT`] when there is no deadline). Past the deadline, data already buffered is
/// still taken (1 ms timeout), so that a reader that was busy elsewhere is not punished.
pub(super) fn read_exact_by(
    stream: &mut Stream,
    cur: &mut Duration,
    deadline: Option<Instant>,
    cancel: Option<&AtomicBool>,
    mut buf: &mut [u8],
) -> std::result::Result<(), ReadFail> {
    while !buf.is_empty() {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(ReadFail::Cancelled);
        }
        let want = wait_slice(deadline, cancel);
        if want != *cur {
            stream.set_read_timeout(want).map_err(ReadFail::Io)?;
            *cur = want;
        }
        match stream.read(buf) {
            Ok(0) => {
                return Err(ReadFail::Io(std::io::Error::from(
                    std::io::ErrorKind::UnexpectedEof,
                )));
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if let Some(f) = after_timeout(deadline, cancel, e) {
                    return Err(f);
                }
            }
            Err(e) => return Err(ReadFail::Io(e)),
        }
    }
    Ok(())
}

/// `write_all` by the same rules as [`read_exact_by`]: a peer that stops reading is
/// waited for only up to the deadline, and never past a cancel.
pub(super) fn write_all_by(
    stream: &mut Stream,
    deadline: Option<Instant>,
    cancel: Option<&AtomicBool>,
    mut buf: &[u8],
) -> std::result::Result<(), ReadFail> {
    stream
        .set_write_timeout(wait_slice(deadline, cancel))
        .map_err(ReadFail::Io)?;
    while !buf.is_empty() {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(ReadFail::Cancelled);
        }
        match stream.write(buf) {
            Ok(0) => {
                return Err(ReadFail::Io(std::io::Error::from(
                    std::io::ErrorKind::WriteZero,
                )));
            }
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if let Some(f) = after_timeout(deadline, cancel, e) {
                    return Err(f);
                }
                stream
                    .set_write_timeout(wait_slice(deadline, cancel))
                    .map_err(ReadFail::Io)?;
            }
            Err(e) => return Err(ReadFail::Io(e)),
        }
    }
    Ok(())
}

/// Connect to the first address of `host` that answers within [`TIMEOUT`] (a host that
/// drops SYNs is given up on, not waited for for minutes).
pub(super) fn connect_tcp(host: &str, port: u16) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{host} has no address"))))
}

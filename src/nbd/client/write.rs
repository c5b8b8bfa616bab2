//! Write commands of the NBD client (restore onto a disk): WRITE, WRITE_ZEROES, FLUSH.
//! One request at a time; each waits for its reply (simple, or structured with only a
//! final "none" chunk or an error chunk), sending and waiting within one request
//! deadline (a target that trickles its reply or stops reading fails the request).

use super::MAX_SMALL_PAYLOAD;
use super::NbdClient;
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::proto::*;

impl NbdClient {
    /// Write `data` at `offset` (split at the server's maximum block size).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let piece = self.max_block.max(self.min_block) as usize;
        for (i, part) in data.chunks(piece).enumerate() {
            let off = offset + (i * piece) as u64;
            self.command(CMD_WRITE, off, part.len() as u32, part)?;
        }
        Ok(())
    }

    /// Make `[offset, offset + len)` read as zeros without sending them (falls back to
    /// writing zeros when the server lacks NBD_CMD_WRITE_ZEROES).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let piece = u64::from(self.max_block.max(self.min_block));
        let mut done = 0;
        while done < len {
            let n = piece.min(len - done);
            if self.tflags & TFLAG_SEND_WRITE_ZEROES != 0 {
                self.command(CMD_WRITE_ZEROES, offset + done, n as u32, &[])?;
            } else {
                self.command(CMD_WRITE, offset + done, n as u32, &vec![0u8; n as usize])?;
            }
            done += n;
        }
        Ok(())
    }

    /// Ask the server to make written data durable (no-op if it does not offer flush).
    pub fn flush(&mut self) -> Result<()> {
        if self.tflags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.command(CMD_FLUSH, 0, 0, &[])
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("NBD export {} is read-only", self.name),
            ));
        }
        Ok(())
    }

    /// Send one request without a data reply (write, write zeroes, flush) and wait for
    /// its reply: simple, or structured with only a final "none" or an error chunk.
    fn command(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<()> {
        self.check_usable()?;
        self.drain()?;
        self.deadline = Some(std::time::Instant::now() + self.request_deadline);
        let r = self.command_inner(cmd, offset, len, payload);
        self.deadline = None;
        r
    }

    fn command_inner(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<()> {
        let cookie = self.next_cookie();
        self.write_all(&encode_request(0, cmd, cookie, offset, len))?;
        if !payload.is_empty() {
            self.write_all(payload)?;
        }
        let what = match cmd {
            CMD_WRITE => "write",
            CMD_WRITE_ZEROES => "write-zeroes",
            _ => "flush",
        };
        loop {
            let header = self.read_reply_header()?;
            let name = self.name.clone();
            let failed = |errno: u32, msg: String| {
                Error::new(
                    ErrorKind::Io,
                    format!(
                        "NBD server {name} failed the {what} of {len} bytes at {offset}: {} ({errno}) {msg}",
                        errno_name(errno)
                    ),
                )
            };
            match header {
                ReplyHeader::Simple { cookie: c, error } if c == cookie => {
                    return if error == 0 {
                        Ok(())
                    } else {
                        Err(failed(error, String::new()))
                    };
                }
                ReplyHeader::Structured {
                    cookie: c,
                    flags,
                    kind,
                    length,
                } if c == cookie => {
                    if length > MAX_SMALL_PAYLOAD {
                        return Err(self.err("oversized reply to a write"));
                    }
                    let p = self.read_u(length as usize)?;
                    if kind & 0x8000 != 0 {
                        let (errno, msg) =
                            parse_error_payload(&p).map_err(|e| self.err(e.context()))?;
                        return Err(failed(errno, msg));
                    }
                    if kind != REPLY_NONE {
                        return Err(self.err(format!("sent chunk type {kind} for a {what}")));
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
                _ => {
                    return Err(
                        self.err(format!("replied to unknown request (a {what} was pending)"))
                    );
                }
            }
        }
    }
}

//! NBD_CMD_BLOCK_STATUS for one meta context (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`): extents checked against the request and collected in order.

use super::*;

impl NbdClient {
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

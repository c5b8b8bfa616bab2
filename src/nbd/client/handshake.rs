//! Negotiation of the NBD client: fixed newstyle options (NBD_OPT_GO with the export
//! name and block-size request, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT),
//! STARTTLS with its failure explained, and the server's block-size limits checked
//! against the spec and [`super::MIN_MAX_BLOCK`].

use super::*;

impl NbdClient {
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

    pub(super) fn negotiate(
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
    pub(super) fn explain_tls_failure(&mut self, e: Error) -> Error {
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
}

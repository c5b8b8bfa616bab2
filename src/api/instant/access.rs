//! How instant-access exports are reached: the `[instant]` settings
//! ([`crate::config::InstantConfig`]) turned into a listener on the first free port of
//! the range, the NBD-TLS server settings, and what a client is told.
//!
//! What an export's view carries for a client (besides the backup and disk):
//! ```text
//! "uri":     nbds://HOST:PORT/EXPORT   (nbd:// without TLS)
//! "host", "port", "export"             EXPORT: 32 hex digits, 128 bits from the OS RNG
//! "tls":     null | {"fingerprint": SHA-256 of the served leaf (AB:CD:…),
//!                    "certificate": its PEM (self-signed: what the client trusts),
//!                    "self_signed", "client_certificate_required"}
//! "command": a qemu-img command line that copies the disk out; with a self-signed
//!            certificate it first writes it to ./blockvault-pki/ca-cert.pem, the dir=
//!            of QEMU's --object tls-creds-x509,endpoint=client (with `client_ca`, that
//!            CA too: QEMU checks its own client-cert.pem against ca-cert.pem; the
//!            client puts client-cert.pem and client-key.pem there itself)
//! ```
//! HOST is `[instant] host`, else the listen address, else (listen unspecified) the
//! kernel's host name. The certificate is `[server] tls_cert`/`tls_key` when the
//! administrator gave their own, else `<data>/tls/nbd-cert.pem` ([`crate::tls`]).

use std::net::{IpAddr, SocketAddr, TcpListener};

use rand::RngCore;
use serde_json::{Value, json};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::nbd::NbdTlsServer;
use crate::nbd::server::Listener;

/// The dir= a client's `tls-creds-x509` reads in the command lines we give.
pub const CLIENT_PKI_DIR: &str = "blockvault-pki";

/// The served certificate and what a client is told about it.
#[derive(Clone)]
struct Tls {
    server: NbdTlsServer,
    fingerprint: String,
    /// PEM text of the certificate file.
    certificate: String,
    /// What a client's ca-cert.pem holds: `certificate`, and the client CA if any.
    trust: String,
    self_signed: bool,
}

/// Where exports listen and how they are protected.
#[derive(Clone)]
pub struct Access {
    listen: IpAddr,
    ports: Option<(u16, u16)>,
    /// Host put in URIs and commands.
    host: String,
    tls: Option<Tls>,
}

impl Default for Access {
    /// Loopback, an ephemeral port, plain NBD (the `[instant]` defaults).
    fn default() -> Access {
        Access {
            listen: IpAddr::from([127, 0, 0, 1]),
            ports: None,
            host: "127.0.0.1".into(),
            tls: None,
        }
    }
}

/// A fresh unguessable export name: 128 bits from the OS RNG, as 32 hex digits (safe
/// in URIs and shell commands without quoting).
pub fn secret_name() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

impl Access {
    /// From the validated `[instant]` table; with TLS, the certificate is loaded (the
    /// self-signed one made) and the rustls config built now, so a bad file stops the
    /// start rather than the first export.
    pub fn from_config(config: &Config) -> Result<Access> {
        let i = &config.instant;
        let host = match &i.host {
            Some(h) => h.clone(),
            None if !i.listen.is_unspecified() => i.listen.to_string(),
            None => crate::tls::host_name().unwrap_or_else(|| {
                tracing::warn!(
                    "[instant] listen is {} and this machine has no host name: URIs name \
                     localhost; set [instant] host to what clients connect to",
                    i.listen
                );
                "localhost".into()
            }),
        };
        let tls = if i.tls {
            let own = config.tls_cert.clone().zip(config.tls_key.clone());
            let (cert, key, self_signed) = match own {
                Some((c, k)) => (c, k, false),
                None => {
                    let (c, k, made) = crate::tls::nbd_self_signed(
                        &config.data,
                        i.listen,
                        std::slice::from_ref(&host),
                    )?;
                    if made {
                        tracing::info!(cert = %c.display(), "made the instant-access certificate");
                    }
                    (c, k, true)
                }
            };
            let server = NbdTlsServer {
                cert,
                key,
                client_ca: i.client_ca.clone(),
            };
            server.config()?;
            let certificate = std::fs::read_to_string(&server.cert).map_err(|e| {
                Error::io(format!("reading certificate {}", server.cert.display()), e)
            })?;
            if !covers(&server.cert, &host)? {
                tracing::warn!(
                    cert = %server.cert.display(),
                    "the instant-access certificate does not name {host:?}: clients that check \
                     the host name (QEMU does) will refuse it. Set [instant] host to a name the \
                     certificate carries, or (self-signed) remove nbd-cert.pem and nbd-key.pem \
                     to make one that names it"
                );
            }
            let mut trust = certificate.clone();
            if let Some(ca) = &i.client_ca {
                if !trust.ends_with('\n') {
                    trust.push('\n');
                }
                let pem = std::fs::read_to_string(ca).map_err(|e| {
                    Error::io(format!("reading [instant] client_ca {}", ca.display()), e)
                })?;
                trust.push_str(&pem);
            }
            Some(Tls {
                trust,
                fingerprint: crate::tls::cert_fingerprint(&server.cert)?,
                server,
                certificate,
                self_signed,
            })
        } else {
            None
        };
        Ok(Access {
            listen: i.listen,
            ports: i.ports,
            host,
            tls,
        })
    }

    /// The TLS settings exports are served with (None: plain NBD).
    pub fn tls_server(&self) -> Option<NbdTlsServer> {
        self.tls.as_ref().map(|t| t.server.clone())
    }

    /// A listener on the first free port of the range (an ephemeral port without one).
    /// All taken: `Conflict`, naming the range and what to do.
    pub fn bind(&self) -> Result<Listener> {
        let Some((lo, hi)) = self.ports else {
            return Listener::bind(&SocketAddr::new(self.listen, 0).to_string());
        };
        for port in lo..=hi {
            let at = SocketAddr::new(self.listen, port);
            match TcpListener::bind(at) {
                Ok(l) => return Ok(Listener::Tcp(l)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(Error::io(format!("listening on {at}"), e)),
            }
        }
        Err(Error::conflict(format!(
            "every port of the instant-access range {lo}-{hi} on {} is in use: stop an \
             export (DELETE /api/v1/instant/ID) or widen [instant] ports",
            self.listen
        )))
    }

    /// What a client needs to reach export `export` on `port` (see the module doc).
    pub fn describe(&self, port: u16, export: &str) -> Value {
        let host = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => format!("[{a}]"),
            _ => self.host.clone(),
        };
        let scheme = if self.tls.is_some() { "nbds" } else { "nbd" };
        let uri = format!("{scheme}://{host}:{port}/{export}");
        let (tls, command) = match &self.tls {
            None => (
                Value::Null,
                format!("qemu-img convert -p -O qcow2 {uri} copy.qcow2"),
            ),
            Some(t) => {
                let opts = format!(
                    "driver=nbd,host={},port={port},export={export},tls-creds=tls0",
                    self.host
                );
                let convert = format!(
                    "qemu-img convert -p -O qcow2 --object tls-creds-x509,id=tls0,\
                     dir={CLIENT_PKI_DIR},endpoint=client --image-opts {opts} copy.qcow2"
                );
                let command = if t.self_signed {
                    format!("{} && {convert}", write_ca_command(&t.trust))
                } else {
                    convert
                };
                let view = json!({
                    "fingerprint": t.fingerprint,
                    "certificate": t.certificate,
                    "self_signed": t.self_signed,
                    "client_certificate_required": t.server.client_ca.is_some(),
                });
                (view, command)
            }
        };
        json!({
            "uri": uri,
            "host": self.host,
            "port": port,
            "export": export,
            "tls": tls,
            "command": command,
        })
    }
}

/// Whether the leaf certificate in PEM file `cert` is valid for `host` (a DNS name or
/// an IP address in its SANs).
fn covers(cert: &std::path::Path, host: &str) -> Result<bool> {
    let certs = crate::tls::read_certs(cert)?;
    let ee = webpki::EndEntityCert::try_from(&certs[0]).map_err(|e| {
        Error::invalid(format!(
            "{}: not an X.509 certificate ({e})",
            cert.display()
        ))
    })?;
    let Ok(name) = rustls::pki_types::ServerName::try_from(host) else {
        return Ok(false);
    };
    Ok(ee.verify_is_valid_for_subject_name(&name).is_ok())
}

/// What a caller who may not start exports sees of one: no export name, the URI
/// without it (`…/(hidden)`), no command.
pub fn redact(view: &mut Value) {
    if let Some(m) = view.as_object_mut() {
        m.remove("export");
        m.remove("command");
        if let Some(Value::String(uri)) = m.get_mut("uri")
            && let Some(i) = uri.rfind('/')
        {
            uri.truncate(i + 1);
            uri.push_str("(hidden)");
        }
    }
}

/// A shell command that writes PEM `pem` to `blockvault-pki/ca-cert.pem`. PEM text is
/// base64, `=`, `-` and spaces: each line is safe in single quotes.
fn write_ca_command(pem: &str) -> String {
    let lines: Vec<String> = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('\''))
        .map(|l| format!("'{l}'"))
        .collect();
    format!(
        "mkdir -p {CLIENT_PKI_DIR} && printf '%s\\n' {} > {CLIENT_PKI_DIR}/ca-cert.pem",
        lines.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_are_128_random_bits_in_hex() {
        let (a, b) = (secret_name(), secret_name());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_plain_loopback_export_is_described_with_an_nbd_uri() {
        let v = Access::default().describe(10809, "ab");
        assert_eq!(v["uri"], "nbd://127.0.0.1:10809/ab");
        assert!(v["tls"].is_null());
        assert_eq!(
            v["command"],
            "qemu-img convert -p -O qcow2 nbd://127.0.0.1:10809/ab copy.qcow2"
        );
        let v6 = Access {
            host: "::1".into(),
            ..Access::default()
        };
        assert_eq!(v6.describe(1, "e")["uri"], "nbd://[::1]:1/e");
    }

    #[test]
    fn a_redacted_view_keeps_no_trace_of_the_export_name() {
        let mut v = Access::default().describe(10809, "0123abcd");
        redact(&mut v);
        assert_eq!(v["uri"], "nbd://127.0.0.1:10809/(hidden)");
        assert!(!v.to_string().contains("0123abcd"), "{v}");
    }

    #[test]
    fn the_self_signed_certificate_names_the_host_clients_use() {
        let d = tempfile::tempdir().unwrap();
        let ip = IpAddr::from([192, 0, 2, 7]);
        let (cert, _, made) =
            crate::tls::nbd_self_signed(d.path(), ip, &["backup1.example.com".into()]).unwrap();
        assert!(made);
        for host in ["backup1.example.com", "192.0.2.7", "127.0.0.1", "localhost"] {
            assert!(covers(&cert, host).unwrap(), "{host}");
        }
        assert!(!covers(&cert, "other.example.com").unwrap());
        // Kept as it is on the next start (clients pinned it).
        let again = crate::tls::nbd_self_signed(d.path(), ip, &["x.example.com".into()]).unwrap();
        assert!(!again.2);
    }
}

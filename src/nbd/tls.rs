//! NBD over TLS: the x509 settings of a client (`nbds://` URIs) and of `serve-nbd`, turned
//! into rustls configurations.
//!
//! The wire side is the NBD protocol's STARTTLS: after the greeting, the client sends
//! `NBD_OPT_STARTTLS`; once the server acknowledges it, the TLS handshake runs on the same
//! socket and option haggling continues inside TLS (as `qemu-nbd --tls-creds` and
//! nbdkit `--tls=require` serve it):
//!
//! ```text
//! S: NBDMAGIC IHAVEOPT flags        C: client flags
//! C: IHAVEOPT NBD_OPT_STARTTLS 0    S: option reply ACK
//! ── TLS handshake (x509: the server's certificate checked against the CA file and the
//!    host name; optionally a client certificate) ──
//! C/S: STRUCTURED_REPLY, SET_META_CONTEXT, GO … all inside TLS, then transmission
//! ```
//!
//! Never a silent downgrade: a client that was asked for TLS refuses a server that
//! answers STARTTLS with an error, and a client without TLS that meets a server that
//! requires it (`NBD_REP_ERR_TLS_REQD`) says to use `nbds://`. The server side requires
//! STARTTLS before it answers any other option that gives out an export.
//!
//! Host name checked against the server's certificate: `hostname` if set, else the URI's
//! host (a DNS name or an IP address); for a Unix socket (`nbds+unix://`), which has no
//! host, `localhost` unless `hostname` is set.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{Error, Result};

/// Host name verified for a Unix-socket TLS connection when none is given.
pub const UNIX_DEFAULT_HOSTNAME: &str = "localhost";

/// Client side: how to verify the server, and the optional client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTlsClient {
    /// PEM file of the CA certificate(s) that signed the server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain), for servers that require one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Name the server's certificate must carry (default: the URI's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |why: String| {
        Error::config(format!(
            "{what} {}: {why} (expected a PEM file of certificates)",
            path.display()
        ))
    };
    if let Err(e) = std::fs::metadata(path) {
        return Err(Error::io(format!("reading {what} {}", path.display()), e));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(Error::io(format!("reading TLS key {}", path.display()), e));
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::config(format!(
            "TLS key {}: {e} (expected a PEM private key: PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ))
    })
}

fn tls_err(what: String, e: rustls::Error) -> Error {
    Error::config(format!("{what}: {e}"))
}

impl NbdTlsClient {
    /// The rustls configuration: roots from `ca`, the client certificate if any.
    pub fn config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let Some(ca) = &self.ca else {
            return Err(Error::config(
                "an nbds:// URI needs the CA certificate that signed the server's certificate: \
                 give --nbd-tls-ca FILE (PEM)",
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(ca, "NBD TLS CA file")? {
            roots
                .add(c)
                .map_err(|e| tls_err(format!("NBD TLS CA file {}", ca.display()), e))?;
        }
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS setup".into(), e))?
            .with_root_certificates(roots);
        let cfg = match (&self.cert, &self.key) {
            (None, None) => b.with_no_client_auth(),
            (Some(c), Some(k)) => {
                let chain = read_certs(c, "NBD TLS client certificate")?;
                b.with_client_auth_cert(chain, read_key(k)?).map_err(|e| {
                    tls_err(
                        format!(
                            "NBD TLS client certificate {} with key {}",
                            c.display(),
                            k.display()
                        ),
                        e,
                    )
                })?
            }
            _ => {
                return Err(Error::config(
                    "--nbd-tls-cert and --nbd-tls-key go together (a client certificate needs \
                     its key)",
                ));
            }
        };
        Ok(Arc::new(cfg))
    }

    /// The name to verify in the server's certificate for a server at `host` (`None`: a
    /// Unix socket).
    pub fn server_name(&self, host: Option<&str>) -> Result<ServerName<'static>> {
        let name = self
            .hostname
            .as_deref()
            .or(host)
            .unwrap_or(UNIX_DEFAULT_HOSTNAME);
        ServerName::try_from(name.to_string()).map_err(|_| {
            Error::config(format!(
                "{name:?} is not a host name or IP address to verify a TLS certificate against \
                 (set --nbd-tls-hostname)"
            ))
        })
    }
}

/// Server side (`serve-nbd`): our certificate and key, and optionally the CA that client
/// certificates must be signed by (then a client without one is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTlsServer {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl NbdTlsServer {
    pub fn config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let b = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS setup".into(), e))?;
        let b = match &self.client_ca {
            None => b.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca, "client CA file")? {
                    roots
                        .add(c)
                        .map_err(|e| tls_err(format!("client CA file {}", ca.display()), e))?;
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| Error::config(format!("client CA file {}: {e}", ca.display())))?;
                b.with_client_cert_verifier(v)
            }
        };
        let chain = read_certs(&self.cert, "TLS certificate")?;
        let cfg = b
            .with_single_cert(chain, read_key(&self.key)?)
            .map_err(|e| {
                tls_err(
                    format!(
                        "TLS certificate {} with key {}",
                        self.cert.display(),
                        self.key.display()
                    ),
                    e,
                )
            })?;
        Ok(Arc::new(cfg))
    }
}

//! The client side of the admin port's TLS: how an HTTPS client decides that it talks to
//! the right appliance, and a ureq agent that does so.
//!
//! [`Trust`] is one of:
//! - `Fingerprint`: the leaf certificate's SHA-256 must equal the pinned one (names and
//!   dates are not checked: the pin is the identity, as in Proxmox Backup Server's
//!   client); the handshake signature is still verified against that certificate's key;
//! - `Ca`: webpki path validation to the roots in a PEM file, with the host name checked;
//! - `PublicRoots`: the same against the bundled Mozilla roots (webpki-roots).
//!
//! A refusal is a `rustls::Error::General` whose text says what was presented, what was
//! expected and what to do; [`refusal`] finds it in a ureq error.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::{ClientConnection, WebPkiServerVerifier};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme, StreamOwned};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, TcpConnector,
    Transport, TransportAdapter,
};

use super::{fingerprint_der, provider, read_certs};
use crate::error::{Error, Result};

/// How the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum Trust {
    Fingerprint([u8; 32]),
    /// PEM file of trusted root certificates.
    Ca(std::path::PathBuf),
    PublicRoots,
}

/// A rustls client config that verifies servers by `trust`.
pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let verifier = Verifier::new(trust, Arc::clone(&provider))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS client setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A ureq agent with `config` whose HTTPS connections verify the server by `trust`
/// (plain `http://` URLs connect without TLS; callers decide whether to allow them).
pub fn agent(config: ureq::config::Config, trust: &Trust) -> Result<ureq::Agent> {
    let tls = TlsConnector {
        config: client_config(trust)?,
    };
    Ok(ureq::Agent::with_parts(
        config,
        TcpConnector::default().chain(tls),
        ureq::unversioned::resolver::DefaultResolver::default(),
    ))
}

/// The rustls error in a ureq error (the handshake's come wrapped in an I/O error).
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

/// The verifier's refusal in a ureq error, if that is why it failed.
pub fn refusal(e: &ureq::Error) -> Option<&str> {
    match rustls_error(e) {
        Some(rustls::Error::General(msg)) => Some(msg),
        _ => None,
    }
}

/// Whether `e` says the server answered something that is not TLS (a plain-HTTP server).
pub fn not_tls(e: &ureq::Error) -> bool {
    matches!(rustls_error(e), Some(rustls::Error::InvalidMessage(_)))
}

#[derive(Debug)]
struct Verifier {
    pin: Option<[u8; 32]>,
    /// Path validation (CA file or public roots) when nothing is pinned.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// What the roots are, for messages.
    roots: String,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    fn new(trust: &Trust, provider: Arc<CryptoProvider>) -> Result<Verifier> {
        let (pin, roots, name) = match trust {
            Trust::Fingerprint(p) => (Some(*p), None, String::new()),
            Trust::Ca(path) => {
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(read_certs(path)?);
                if added == 0 {
                    return Err(Error::invalid(format!(
                        "{}: no usable CA certificate in it",
                        path.display()
                    )));
                }
                (None, Some(roots), format!("the CA file {}", path.display()))
            }
            Trust::PublicRoots => (
                None,
                Some(RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                }),
                "the public CAs".to_string(),
            ),
        };
        let webpki = match roots {
            Some(r) => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(r), Arc::clone(&provider))
                    .build()
                    .map_err(|e| Error::config(format!("TLS roots of {name}: {e}")))?,
            ),
            None => None,
        };
        Ok(Verifier {
            pin,
            webpki,
            roots: name,
            provider,
        })
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint_der(end_entity);
        if let Some(pin) = &self.pin {
            let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
            if &got == pin {
                return Ok(ServerCertVerified::assertion());
            }
            let want: Vec<String> = pin.iter().map(|b| format!("{b:02X}")).collect();
            return Err(rustls::Error::General(format!(
                "the server's certificate has SHA-256 fingerprint {presented}, but \
                 --fingerprint (or BLOCKVAULT_FINGERPRINT) expects {}: this is not the \
                 appliance you pinned (or its certificate changed); nothing was sent. Check \
                 with `blockvault tls fingerprint` on the appliance",
                want.join(":")
            )));
        }
        let Some(w) = &self.webpki else {
            return Err(rustls::Error::General("no way to verify the server".into()));
        };
        w.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                rustls::Error::General(format!(
                    "the server's certificate (SHA-256 fingerprint {presented}) is not trusted \
                     by {}: {e}. For the appliance's self-signed certificate, pass \
                     --fingerprint (or BLOCKVAULT_FINGERPRINT) with what `blockvault tls \
                     fingerprint` prints on the appliance, or --ca FILE with its \
                     certificate; nothing was sent",
                    self.roots
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// ureq connector: wraps the TCP transport in rustls with our config for `https://`.
#[derive(Debug)]
struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

impl<In: Transport> Connector<In> for TlsConnector {
    type Out = Either<In, TlsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> std::result::Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details
            .uri
            .host()
            .ok_or(ureq::Error::Tls("no host in the URL"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| ureq::Error::Tls("the URL's host is not a valid TLS server name"))?;
        let mut conn = ClientConnection::new(Arc::clone(&self.config), name)?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock)?;
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(TlsTransport {
            buffers,
            stream: StreamOwned { conn, sock },
        })))
    }
}

struct TlsTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTransport").finish()
    }
}

impl Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(
        &mut self,
        amount: usize,
        timeout: NextTimeout,
    ) -> std::result::Result<(), ureq::Error> {
        use std::io::Write;
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> std::result::Result<bool, ureq::Error> {
        use std::io::Read;
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

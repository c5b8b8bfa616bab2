//! TLS of the admin port: the appliance's certificate (made at first start, or the
//! administrator's own), its SHA-256 fingerprint, and the server side's rustls config.
//! The client side (fingerprint pinning, a CA file, the public roots) is [`client`].
//!
//! Files, under the data dir unless `[server] tls_cert`/`tls_key` (or `--tls-cert`/
//! `--tls-key`) name the administrator's own:
//! ```text
//! <data>/tls/cert.pem   self-signed X.509 (ECDSA P-256), PEM; SANs: localhost, 127.0.0.1,
//!                       ::1, the listen IP (unless unspecified), the host name
//! <data>/tls/key.pem    its PKCS#8 private key, PEM, mode 0600 (written to a temp name
//!                       with that mode, fsynced, then renamed: never readable by others)
//! <data>/tls/nbd-cert.pem   instant-access exports over NBD-TLS, when [server] names no
//! <data>/tls/nbd-key.pem    certificate of its own: the same, made at first use, with the
//!                           `[instant]` host/listen among its SANs and marked as a CA
//!                           (QEMU takes it as its `ca-cert.pem`; see [`nbd_self_signed`])
//! ```
//! A certificate is made only when neither file exists; one without the other is an
//! error (never silently replaced: clients pin the fingerprint).
//!
//! The fingerprint is SHA-256 over the leaf certificate's DER, written as 32 uppercase
//! hex pairs separated by colons — the form of `openssl x509 -fingerprint -sha256`
//! (without its `sha256 Fingerprint=` prefix). [`parse_fingerprint`] also takes lowercase
//! and no colons.

pub mod client;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, ErrorKind, Result};

/// The crypto provider used on both sides (ring: what ureq already brings).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `<data>/tls/cert.pem` and `<data>/tls/key.pem`.
pub fn self_signed_paths(data: &Path) -> (PathBuf, PathBuf) {
    let dir = data.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// SHA-256 of `der` as uppercase hex pairs separated by colons.
pub fn fingerprint_der(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    let hex: Vec<String> = d.iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// A fingerprint as given by a person: 64 hex digits, colons optional, any case.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32]> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    match hex::decode_to_slice(&hex, &mut out) {
        Ok(()) => Ok(out),
        Err(_) => Err(Error::config(format!(
            "{s:?} is not a SHA-256 fingerprint: give 32 hex pairs (AB:CD:…), as \
             `blockvault tls fingerprint` prints on the appliance"
        ))),
    }
}

/// Every certificate in PEM file `path` (leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading certificate {}", path.display()), e))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::invalid(format!(
                "{}: not a PEM certificate file ({e}); give a PEM file with \
                 -----BEGIN CERTIFICATE-----",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The fingerprint of the first (leaf) certificate in PEM file `path`.
pub fn cert_fingerprint(path: &Path) -> Result<String> {
    Ok(fingerprint_der(&read_certs(path)?[0]))
}

/// The certificate the appliance serves, ready for the accept loop.
#[derive(Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Of the leaf, see [`fingerprint_der`].
    pub fingerprint: String,
    /// Made now (first start) rather than loaded.
    pub made: bool,
    pub config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert", &self.cert)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The administrator's `own` (cert, key) files, or the data dir's self-signed pair,
/// made now if neither file exists yet (SANs from `listen`).
pub fn server_cert(
    data: &Path,
    listen: SocketAddr,
    own: Option<(&Path, &Path)>,
) -> Result<ServerCert> {
    let (cert, key, made) = match own {
        Some((c, k)) => (c.to_path_buf(), k.to_path_buf(), false),
        None => {
            let (c, k) = self_signed_paths(data);
            let made = match (c.exists(), k.exists()) {
                (true, true) => false,
                (false, false) => {
                    make_self_signed(&c, &k, sans_for(listen.ip(), &[]), false)?;
                    true
                }
                _ => {
                    return Err(Error::config(format!(
                        "{} and {} must both exist or both be absent: restore the missing \
                         one, or remove both to make a new certificate (clients that pinned \
                         the old fingerprint must then be given the new one)",
                        c.display(),
                        k.display()
                    )));
                }
            };
            (c, k, made)
        }
    };
    let certs = read_certs(&cert)?;
    let fingerprint = fingerprint_der(&certs[0]);
    let text = std::fs::read(&key)
        .map_err(|e| Error::io(format!("reading private key {}", key.display()), e))?;
    let private = PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        Error::invalid(format!(
            "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it ({e})",
            key.display()
        ))
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, private))
        .map_err(|e| {
            Error::config(format!(
                "TLS certificate {} with key {}: {e}; give a certificate and the key it was \
                 made with",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(ServerCert {
        cert,
        key,
        fingerprint,
        made,
        config: Arc::new(config),
    })
}

/// The host name (for the certificate's SANs), if the kernel has one.
pub fn host_name() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty() && h != "localhost").then(|| h.to_string())
}

/// The names a self-signed certificate carries: localhost, the loopback addresses, `ip`
/// (unless unspecified), `extra` and the host name.
fn sans_for(ip: IpAddr, extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let mut add = |n: String| {
        if !sans.contains(&n) {
            sans.push(n);
        }
    };
    if !ip.is_unspecified() {
        add(ip.to_string());
    }
    for e in extra {
        add(e.clone());
    }
    if let Some(h) = host_name()
        && h.parse::<IpAddr>().is_err()
    {
        add(h);
    }
    sans
}

/// `<data>/tls/nbd-cert.pem` and `<data>/tls/nbd-key.pem`: the certificate of the
/// instant-access exports when the administrator gave none of their own.
pub fn nbd_self_signed_paths(data: &Path) -> (PathBuf, PathBuf) {
    let dir = data.join("tls");
    (dir.join("nbd-cert.pem"), dir.join("nbd-key.pem"))
}

/// The instant-access exports' self-signed certificate, made now if neither file
/// exists (SANs: see [`sans_for`] with `ip` and `extra`); returns (cert, key, made now).
///
/// Unlike the admin port's, it is marked as a CA (basicConstraints CA:TRUE, pathlen 0,
/// keyCertSign): QEMU's `tls-creds-x509` refuses a `ca-cert.pem` without CA basic
/// constraints, and a client of a self-signed server trusts exactly that certificate.
/// A certificate made earlier is kept as it is (clients pinned it): remove both files
/// to make one with new names.
pub fn nbd_self_signed(
    data: &Path,
    ip: IpAddr,
    extra: &[String],
) -> Result<(PathBuf, PathBuf, bool)> {
    let (c, k) = nbd_self_signed_paths(data);
    match (c.exists(), k.exists()) {
        (true, true) => Ok((c, k, false)),
        (false, false) => {
            make_self_signed(&c, &k, sans_for(ip, extra), true)?;
            Ok((c, k, true))
        }
        _ => Err(Error::config(format!(
            "{} and {} must both exist or both be absent: restore the missing one, or \
             remove both to make a new certificate",
            c.display(),
            k.display()
        ))),
    }
}

/// Make a self-signed certificate for `sans` into `cert` and `key` (0600); `ca`: mark
/// it as a CA too (see [`nbd_self_signed`]).
fn make_self_signed(cert: &Path, key: &Path, sans: Vec<String>, ca: bool) -> Result<()> {
    let fail = |e: rcgen::Error| {
        Error::new(
            ErrorKind::Io,
            format!("making the appliance's TLS certificate: {e}"),
        )
    };
    let mut params = rcgen::CertificateParams::new(sans).map_err(fail)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "blockvault appliance");
    params.distinguished_name = dn;
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let pair = rcgen::KeyPair::generate().map_err(fail)?;
    let made = params.self_signed(&pair).map_err(fail)?;
    let dir = cert.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    // The key first: a crash in between leaves a key without a certificate, which the
    // next start names instead of pairing a new certificate with the wrong key.
    write_new(key, pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert, made.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Write `bytes` to `path` through a temp file created with `mode`, fsynced and renamed.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_first_start_makes_a_certificate_with_a_private_key_and_a_second_keeps_it() {
        let d = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "192.0.2.7:8420".parse().unwrap();
        let a = server_cert(d.path(), listen, None).unwrap();
        assert!(a.made);
        let mode = std::fs::metadata(&a.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key mode {mode:o}");
        let b = server_cert(d.path(), listen, None).unwrap();
        assert!(!b.made);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 32 * 3 - 1);
        assert_eq!(parse_fingerprint(&a.fingerprint).unwrap().len(), 32);
        assert_eq!(
            parse_fingerprint(&a.fingerprint.replace(':', "").to_lowercase()).unwrap(),
            parse_fingerprint(&a.fingerprint).unwrap()
        );
    }

    #[test]
    fn a_key_without_its_certificate_is_named_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let a = server_cert(d.path(), listen, None).unwrap();
        std::fs::remove_file(&a.cert).unwrap();
        let e = server_cert(d.path(), listen, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("both exist"), "{e}");
        assert!(!a.cert.exists());
    }

    #[test]
    fn bad_fingerprints_are_refused() {
        for s in ["", "AB:CD", "zz", &"AB:".repeat(33)] {
            assert_eq!(parse_fingerprint(s).unwrap_err().kind(), ErrorKind::Config);
        }
    }
}

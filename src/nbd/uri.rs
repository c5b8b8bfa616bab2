//! NBD URIs in libnbd's forms: `nbd://host[:port][/export]` and
//! `nbd+unix:///[export]?socket=PATH`, and their TLS forms `nbds://…` and
//! `nbds+unix://…` (STARTTLS required; see `tls`).

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    pub export: String,
    /// `nbds`: TLS is required (STARTTLS), never silently skipped.
    pub tls: bool,
}

fn pct_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::config(format!("bad %-escape in {s:?}")))?;
            out.push(h);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::config(format!("{s:?} is not UTF-8")))
}

impl NbdUri {
    /// Is `s` an NBD URI at all?
    pub fn is_nbd(s: &str) -> bool {
        ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
            .iter()
            .any(|p| s.starts_with(p))
    }

    /// The host to verify a TLS certificate against (`None` for a Unix socket).
    pub fn host(&self) -> Option<&str> {
        match &self.transport {
            Transport::Tcp { host, .. } => Some(host),
            Transport::Unix(_) => None,
        }
    }

    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::config(format!("bad NBD URI {s:?}: {why}"));
        let (tls, s_plain) = match s.strip_prefix("nbds") {
            Some(rest) => (true, format!("nbd{rest}")),
            None => (false, s.to_string()),
        };
        let s_plain = s_plain.as_str();
        if let Some(rest) = s_plain.strip_prefix("nbd+unix://") {
            let (path_part, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            let export = pct_decode(path_part.strip_prefix('/').unwrap_or(path_part))?;
            if !path_part.is_empty() && !path_part.starts_with('/') {
                return Err(bad("nbd+unix URIs take no host"));
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("missing socket="))?;
            Ok(NbdUri {
                transport: Transport::Unix(PathBuf::from(pct_decode(socket)?)),
                export,
                tls,
            })
        } else if let Some(rest) = s_plain.strip_prefix("nbd://") {
            let (hostport, export) = match rest.split_once('/') {
                Some((h, e)) => (h, pct_decode(e)?),
                None => (rest, String::new()),
            };
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
                    (h, p.parse().map_err(|_| bad("bad port"))?)
                }
                _ => (hostport, 10809),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            Ok(NbdUri {
                transport: Transport::Tcp {
                    host: host.to_string(),
                    port,
                },
                export,
                tls,
            })
        } else {
            Err(bad("expected nbd://, nbd+unix://, nbds:// or nbds+unix://"))
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        match &self.transport {
            Transport::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            Transport::Unix(p) => {
                write!(f, "nbd{s}+unix:///{}?socket={}", self.export, p.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libnbd_forms() {
        let u = NbdUri::parse("nbd+unix:///disk0?socket=/run/x.sock").unwrap();
        assert_eq!(u.transport, Transport::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd+unix://?socket=/s").unwrap();
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://127.0.0.1:10810/e%20x").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "e x");
        let u = NbdUri::parse("nbd://host").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "host".into(),
                port: 10809
            }
        );
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("nbd://:1/").is_err());
        assert!(NbdUri::parse("http://x").is_err());
        assert!(!NbdUri::parse("nbd://h/e").unwrap().tls);
    }

    #[test]
    fn parses_tls_forms() {
        let u = NbdUri::parse("nbds://host.example:10811/disk").unwrap();
        assert!(u.tls);
        assert_eq!(u.host(), Some("host.example"));
        assert_eq!(u.export, "disk");
        assert_eq!(u.to_string(), "nbds://host.example:10811/disk");
        let u = NbdUri::parse("nbds+unix:///d?socket=/run/s").unwrap();
        assert!(u.tls);
        assert_eq!(u.host(), None);
        assert_eq!(u.to_string(), "nbds+unix:///d?socket=/run/s");
        assert!(NbdUri::is_nbd("nbds://h/e") && NbdUri::is_nbd("nbds+unix:///?socket=/s"));
        assert!(NbdUri::parse("nbdx://h").is_err());
    }
}

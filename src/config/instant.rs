//! `[instant]`: where the service's instant-access exports (`POST /api/v1/instant`)
//! listen, and how they are protected.
//!
//! ```toml
//! [instant]
//! listen = "0.0.0.0"         # an IP address (no port); default 127.0.0.1
//! ports = "10809-10824"      # the range exports bind, first free port first
//! tls = true                 # default: on unless listen is a loopback address
//! client_ca = "/etc/blockvault/nbd-clients-ca.pem"   # optional: require client certs
//! host = "backup1.example.com"   # optional: the host name put in the URIs
//! ```
//!
//! Rules (checked at config load, each refusal names the key and what to do):
//! - `ports` is `LOW-HIGH` (or one port), 1..=65535, LOW ≤ HIGH. Without it an export
//!   gets an ephemeral port, which is only allowed on loopback: a firewall in front of a
//!   network-facing appliance must know which ports to open.
//! - plain NBD (`tls = false`) is refused on any address that is not loopback (an
//!   unspecified address such as `0.0.0.0` counts as not loopback), as plain HTTP is:
//!   backups would cross the network in clear.
//! - `client_ca` (absolute path) needs TLS.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The validated `[instant]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct InstantConfig {
    /// Address exports bind (no port).
    pub listen: IpAddr,
    /// Inclusive port range; `None`: an ephemeral port (loopback only).
    pub ports: Option<(u16, u16)>,
    /// Serve over NBD-TLS (STARTTLS) with the appliance's certificate.
    pub tls: bool,
    /// PEM CA file that client certificates must be signed by (then required).
    pub client_ca: Option<PathBuf>,
    /// Host name clients use to reach the exports (default: the listen address, or the
    /// kernel's host name when listen is unspecified).
    pub host: Option<String>,
}

impl Default for InstantConfig {
    fn default() -> InstantConfig {
        InstantConfig {
            listen: IpAddr::from([127, 0, 0, 1]),
            ports: None,
            tls: false,
            client_ca: None,
            host: None,
        }
    }
}

/// `[instant]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInstant {
    listen: Option<String>,
    ports: Option<String>,
    tls: Option<bool>,
    client_ca: Option<PathBuf>,
    host: Option<String>,
}

/// `"LOW-HIGH"` or `"PORT"`, ports 1..=65535, LOW ≤ HIGH.
fn parse_ports(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let p = s.trim().parse().ok()?;
            (p, p)
        }
    };
    (a >= 1 && a <= b).then_some((a, b))
}

/// Validate `[instant]` (`origin` names the file in errors).
pub(super) fn validate(raw: RawInstant, origin: &str) -> Result<InstantConfig, String> {
    let d = InstantConfig::default();
    let listen = match raw.listen {
        Some(l) => l.trim().parse::<IpAddr>().map_err(|_| {
            format!(
                "{origin}: [instant] listen must be an IP address without a port (e.g. \
                 \"0.0.0.0\" or \"10.0.0.5\"; the ports go in [instant] ports), got {l:?}"
            )
        })?,
        None => d.listen,
    };
    let ports = match raw.ports {
        Some(p) => Some(parse_ports(&p).ok_or_else(|| {
            format!(
                "{origin}: [instant] ports must be a range LOW-HIGH of ports 1..=65535 with \
                 LOW <= HIGH (e.g. \"10809-10824\"), got {p:?}"
            )
        })?),
        None => None,
    };
    let loopback = listen.is_loopback();
    if !loopback && ports.is_none() {
        return Err(format!(
            "{origin}: [instant] listen = \"{listen}\" is not a loopback address, so it needs \
             a port range (e.g. ports = \"10809-10824\") that the firewall can open"
        ));
    }
    let tls = raw.tls.unwrap_or(!loopback);
    if !tls && !loopback {
        return Err(format!(
            "{origin}: [instant] tls = false (plain NBD) is only allowed on a loopback listen \
             address (127.0.0.1, ::1), not {listen}: backups would cross the network in \
             clear. Drop tls = false to serve NBD-TLS with the appliance's certificate"
        ));
    }
    if let Some(ca) = &raw.client_ca {
        if !ca.is_absolute() {
            return Err(format!(
                "{origin}: [instant] client_ca must be an absolute path, got {}",
                ca.display()
            ));
        }
        if !tls {
            return Err(format!(
                "{origin}: [instant] client_ca needs TLS: set tls = true (client \
                 certificates are checked in the TLS handshake)"
            ));
        }
    }
    if let Some(h) = &raw.host {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c));
        if !ok {
            return Err(format!(
                "{origin}: [instant] host must be a DNS name or an IP address (what clients \
                 connect to), got {h:?}"
            ));
        }
    }
    Ok(InstantConfig {
        listen,
        ports,
        tls,
        client_ca: raw.client_ca,
        host: raw.host,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn load(text: &str) -> Result<InstantConfig, String> {
        Config::from_toml(text, "t.toml").map(|c| c.instant)
    }

    #[test]
    fn the_defaults_are_loopback_ephemeral_and_plain() {
        assert_eq!(load("").unwrap(), InstantConfig::default());
        let c = load("[instant]\nports = \"10809-10824\"\ntls = true\n").unwrap();
        assert_eq!(c.ports, Some((10809, 10824)));
        assert!(c.tls);
        assert_eq!(
            load("[instant]\nports = \"7000\"\n").unwrap().ports,
            Some((7000, 7000))
        );
    }

    #[test]
    fn a_network_listen_gets_tls_by_default_and_needs_a_port_range() {
        let c = load("[instant]\nlisten = \"0.0.0.0\"\nports = \"10809-10810\"\n").unwrap();
        assert!(c.tls, "{c:?}");
        let e = load("[instant]\nlisten = \"10.0.0.5\"\n").unwrap_err();
        assert!(e.contains("needs a port range"), "{e}");
    }

    #[test]
    fn plain_nbd_on_a_non_loopback_address_is_refused_at_load() {
        for listen in ["0.0.0.0", "10.0.0.5", "::"] {
            let e = load(&format!(
                "[instant]\nlisten = \"{listen}\"\nports = \"10809-10824\"\ntls = false\n"
            ))
            .unwrap_err();
            assert!(e.contains("plain NBD") && e.contains("t.toml"), "{e}");
        }
        assert!(
            !load("[instant]\nlisten = \"::1\"\ntls = false\n")
                .unwrap()
                .tls
        );
    }

    #[test]
    fn the_example_config_serves_the_network_over_tls_on_a_range() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/blockvault.toml");
        let c = Config::load(&path).unwrap().instant;
        assert_eq!(c.listen, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.ports, Some((10809, 10824)));
        assert!(c.tls && c.client_ca.is_none() && c.host.is_none(), "{c:?}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, says) in [
            ("listen = \"0.0.0.0:10809\"", "without a port"),
            ("ports = \"10824-10809\"", "LOW <= HIGH"),
            ("ports = \"0-10\"", "ports must be"),
            ("ports = \"a-b\"", "ports must be"),
            ("client_ca = \"ca.pem\"\ntls = true", "absolute"),
            ("client_ca = \"/ca.pem\"", "needs TLS"),
            ("host = \"a b\"", "DNS name"),
            ("listen_on = \"x\"", "unknown field"),
        ] {
            let e = load(&format!("[instant]\n{text}\n")).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}

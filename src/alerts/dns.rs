//! The address check at delivery: a webhook's host is resolved at each attempt, and the
//! attempt connects only to the addresses that were checked (the HTTP client gets a
//! resolver that answers exactly those: no second lookup between check and connect).
//!
//! The rule: an address in the URL itself (`http://127.0.0.1:9000/…`, `http://[::1]/…`)
//! is the administrator's own choice — `[alerts] allowed_hosts` must list it literally —
//! and is used as written. A name must resolve only to public addresses: if any address
//! it resolves to is loopback, private (RFC 1918, and 100.64/10 shared space),
//! link-local, unique-local (fc00::/7), unspecified (0.0.0.0/8, ::), multicast or
//! broadcast, the delivery is refused and not retried — unless `[alerts] allow_private =
//! true`. An IPv4-mapped IPv6 address is judged as its IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// Why an attempt did not get an address.
#[derive(Debug)]
pub(super) enum NoAddress {
    /// The rule refuses it: not retried.
    Refused(String),
    /// The lookup failed or timed out: worth a retry.
    Unresolved(String),
}

/// Why `ip` may not be a webhook's address, if it may not.
pub(super) fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden_v4(v4),
            None => forbidden_v6(v6),
        },
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 0 {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique-local")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// The addresses one attempt at `url` may connect to (see the module doc for the rule).
pub(super) fn addresses(
    url: &str,
    allow_private: bool,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, NoAddress> {
    let uri: Uri = url
        .parse()
        .map_err(|e| NoAddress::Refused(format!("webhook URL {url:?} does not parse: {e}")))?;
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let name = format!("{host}:{port}");
    // getaddrinfo has no deadline of its own: a lookup that outlives the webhook's
    // timeout is abandoned (its thread ends when the resolver answers).
    let spawned = std::thread::Builder::new()
        .name("webhook-dns".into())
        .spawn(move || {
            let _ = tx.send(name.to_socket_addrs().map(Vec::from_iter));
        });
    if let Err(e) = spawned {
        return Err(NoAddress::Unresolved(format!("resolving {host}: {e}")));
    }
    let addrs = match rx.recv_timeout(timeout) {
        Ok(Ok(a)) if !a.is_empty() => a,
        Ok(Ok(_)) => return Err(NoAddress::Unresolved(format!("{host} has no address"))),
        Ok(Err(e)) => return Err(NoAddress::Unresolved(format!("resolving {host}: {e}"))),
        Err(_) => {
            return Err(NoAddress::Unresolved(format!(
                "resolving {host} took more than {timeout:?}"
            )));
        }
    };
    if !allow_private
        && let Some((a, why)) = addrs.iter().find_map(|a| Some((a, forbidden(a.ip())?)))
    {
        return Err(NoAddress::Refused(format!(
            "webhook host {host} resolved to {}, a {why} address: refused (write the address \
             itself in the URL and in [alerts] allowed_hosts, or set [alerts] allow_private = true)",
            a.ip()
        )));
    }
    Ok(addrs)
}

/// A resolver that answers the checked addresses, whatever the URL says.
#[derive(Debug)]
struct Pinned(Vec<SocketAddr>);

impl Resolver for Pinned {
    fn resolve(
        &self,
        _uri: &Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for a in &self.0 {
            if out.try_push(*a).is_err() {
                break;
            }
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

/// A client for one attempt: connects only to `addrs`, gives up after `timeout`,
/// follows no redirect, and hands back any status as an answer.
pub(super) fn pinned_agent(addrs: Vec<SocketAddr>, timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .timeout_connect(Some(timeout))
        .max_redirects(0)
        .http_status_as_error(false)
        .build();
    ureq::Agent::with_parts(config, DefaultConnector::default(), Pinned(addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_private_link_local_unique_local_unspecified_and_multicast_are_forbidden() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(forbidden(a.parse().unwrap()).is_some(), "{a}");
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
            assert_eq!(forbidden(a.parse().unwrap()), None, "{a}");
        }
    }

    #[test]
    fn a_literal_address_is_taken_as_written_and_a_name_to_loopback_is_refused() {
        let t = Duration::from_secs(5);
        let a = addresses("http://127.0.0.1:9/hook", false, t).unwrap();
        assert_eq!(a, vec!["127.0.0.1:9".parse().unwrap()]);
        let a = addresses("https://[::1]/x", false, t).unwrap();
        assert_eq!(a, vec!["[::1]:443".parse().unwrap()]);
        match addresses("http://localhost:9/hook", false, t) {
            Err(NoAddress::Refused(m)) => assert!(m.contains("loopback"), "{m}"),
            other => panic!("{other:?}"),
        }
        let a = addresses("http://localhost:9/hook", true, t).unwrap();
        assert!(
            a.iter().all(|a| a.ip().is_loopback() && a.port() == 9),
            "{a:?}"
        );
    }
}

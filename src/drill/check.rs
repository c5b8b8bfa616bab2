//! The success signal a drill waits for, and the probes that look for it.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Console bytes kept for matching (the most recent ones).
const CONSOLE_WINDOW: usize = 1 << 20;

/// What proves the guest is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Check {
    /// The QEMU guest agent answers `guest-ping`.
    Agent,
    /// The serial console matches this regex (e.g. `login:`).
    Console(String),
    /// A TCP port inside the guest accepts connections.
    Port(u16),
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Agent => f.write_str("agent"),
            Check::Console(r) => write!(f, "console:{r}"),
            Check::Port(p) => write!(f, "port:{p}"),
        }
    }
}

impl std::str::FromStr for Check {
    type Err = Error;
    fn from_str(s: &str) -> Result<Check> {
        if s == "agent" {
            return Ok(Check::Agent);
        }
        if let Some(r) = s.strip_prefix("console:") {
            regex::Regex::new(r).map_err(|e| {
                Error::config(format!("--check console:{r}: not a valid regex: {e}"))
            })?;
            if r.is_empty() {
                return Err(Error::config(
                    "--check console: needs a regex after the colon (e.g. console:login:)",
                ));
            }
            return Ok(Check::Console(r.to_string()));
        }
        if let Some(p) = s.strip_prefix("port:") {
            return match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(Check::Port(n)),
                _ => Err(Error::config(format!(
                    "--check port:{p}: expected a TCP port 1-65535"
                ))),
            };
        }
        Err(Error::config(format!(
            "--check {s:?}: expected agent, console:REGEX or port:N"
        )))
    }
}

impl TryFrom<String> for Check {
    type Error = Error;
    fn try_from(s: String) -> Result<Check> {
        s.parse()
    }
}

impl From<Check> for String {
    fn from(c: Check) -> String {
        c.to_string()
    }
}

/// A running probe for one check.
pub(super) enum Probe {
    Console {
        re: regex::Regex,
        path: PathBuf,
        pos: u64,
        seen: Vec<u8>,
    },
    Agent {
        socket: PathBuf,
    },
    Port {
        addr: SocketAddr,
        guest_port: u16,
        qmp: PathBuf,
        conn: Option<TcpStream>,
    },
}

impl Probe {
    pub(super) fn new(
        check: &Check,
        console: &Path,
        qga: &Path,
        qmp: &Path,
        host_port: u16,
    ) -> Result<Probe> {
        Ok(match check {
            Check::Console(r) => Probe::Console {
                re: regex::Regex::new(r)
                    .map_err(|e| Error::config(format!("console regex {r:?}: {e}")))?,
                path: console.to_path_buf(),
                pos: 0,
                seen: Vec::new(),
            },
            Check::Agent => Probe::Agent {
                socket: qga.to_path_buf(),
            },
            Check::Port(p) => Probe::Port {
                addr: SocketAddr::from(([127, 0, 0, 1], host_port)),
                guest_port: *p,
                qmp: qmp.to_path_buf(),
                conn: None,
            },
        })
    }

    /// Whether the signal is there now. Takes at most a few seconds (agent, port).
    pub(super) fn passed(&mut self, cancel: &AtomicBool) -> bool {
        match self {
            Probe::Console {
                re,
                path,
                pos,
                seen,
            } => {
                let Ok(mut f) = std::fs::File::open(&*path) else {
                    return false;
                };
                use std::io::Seek;
                if f.seek(std::io::SeekFrom::Start(*pos)).is_err() {
                    return false;
                }
                let mut new = Vec::new();
                if f.read_to_end(&mut new).is_err() {
                    return false;
                }
                *pos += new.len() as u64;
                seen.extend_from_slice(&new);
                if seen.len() > CONSOLE_WINDOW {
                    seen.drain(..seen.len() - CONSOLE_WINDOW);
                }
                re.is_match(&String::from_utf8_lossy(seen))
            }
            Probe::Agent { socket } => {
                let Ok(mut qga) = crate::qmp::Qga::connect(socket, Duration::from_secs(3)) else {
                    return false;
                };
                let deadline = Instant::now() + Duration::from_secs(3);
                qga.sync(deadline, Some(cancel)).is_ok()
                    && qga.command("guest-ping", deadline, Some(cancel)).is_ok()
            }
            Probe::Port {
                addr,
                guest_port,
                qmp,
                conn,
            } => {
                // Hold one connection through the forward; slirp accepts it at once and
                // connects on to the guest, closing ours if the guest refuses.
                if let Some(c) = conn.as_mut() {
                    let mut b = [0u8; 64];
                    if matches!(c.read(&mut b), Ok(0)) {
                        *conn = None;
                    }
                }
                if conn.is_none() {
                    *conn = TcpStream::connect_timeout(addr, Duration::from_secs(1))
                        .ok()
                        .filter(|c| c.set_nonblocking(true).is_ok());
                    return false;
                }
                let Ok(mut q) = crate::qmp::Qmp::connect(qmp, Duration::from_secs(5)) else {
                    return false;
                };
                q.execute_value(
                    "human-monitor-command",
                    serde_json::json!({"command-line": "info usernet"}),
                )
                .ok()
                .and_then(|v| v.as_str().map(|t| usernet_established(t, *guest_port)))
                .unwrap_or(false)
            }
        }
    }
}

/// Whether slirp's connection table (`info usernet`) holds an established connection to
/// `port` in the guest: the guest accepted a forwarded connection.
/// ```text
///   Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
///   TCP[ESTABLISHED]   17       127.0.0.1 18080       10.0.2.15  8080     0     0
///   TCP[HOST_FORWARD]  13       127.0.0.1 18080       10.0.2.15  8080     0     0
/// ```
fn usernet_established(table: &str, port: u16) -> bool {
    let port = port.to_string();
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.first() == Some(&"TCP[ESTABLISHED]") && f.get(5) == Some(&port.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse_and_print_back() {
        for s in ["agent", "console:login: ?$", "port:22"] {
            assert_eq!(s.parse::<Check>().unwrap().to_string(), s);
        }
        for bad in ["console:(", "console:", "port:0", "port:x", "ping"] {
            let e = bad.parse::<Check>().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn console_probe_reads_what_was_appended() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        let check: Check = "console:READY-[0-9]+".parse().unwrap();
        let mut p = Probe::new(&check, &log, &d.path().join("q"), &d.path().join("m"), 0).unwrap();
        let no = AtomicBool::new(false);
        assert!(!p.passed(&no), "no file yet");
        std::fs::write(&log, "booting\nREADY-").unwrap();
        assert!(!p.passed(&no));
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"42\n").unwrap();
        assert!(
            p.passed(&no),
            "a marker split across two reads still matches"
        );
    }

    #[test]
    fn only_an_established_connection_to_the_port_counts() {
        let t = "Hub -1 (#net099):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[SYN_SENT]      17       127.0.0.1 18080       10.0.2.15  8080     0     0
  TCP[ESTABLISHED]   14       127.0.0.1 18081       10.0.2.15  8081     0     0
  TCP[HOST_FORWARD]  13       127.0.0.1 18080       10.0.2.15  8080     0     0";
        assert!(
            !usernet_established(t, 8080),
            "SYN_SENT: the guest has not answered"
        );
        assert!(usernet_established(t, 8081));
        assert!(
            !usernet_established(t, 18081),
            "the host port is not the guest's"
        );
        assert!(!usernet_established("", 22));
    }
}

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
    },
}

impl Probe {
    pub(super) fn new(check: &Check, console: &Path, qga: &Path, host_port: u16) -> Result<Probe> {
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
            Check::Port(_) => Probe::Port {
                addr: SocketAddr::from(([127, 0, 0, 1], host_port)),
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
            Probe::Port { addr } => port_open(addr),
        }
    }
}

/// Whether a connection through slirp's forward reaches a listening guest socket: slirp
/// accepts on the host side first and closes at once when the guest refuses.
fn port_open(addr: &SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_secs(1)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_millis(1500)))
        .is_err()
    {
        return false;
    }
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
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
        let mut p = Probe::new(&check, &log, &d.path().join("q"), 0).unwrap();
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
    fn a_refused_port_is_not_open() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert!(!port_open(&addr));
        // A server that accepts and closes at once (what slirp does for a closed guest
        // port) is not open either.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || drop(l.accept()));
        assert!(!port_open(&addr));
        t.join().unwrap();
    }
}

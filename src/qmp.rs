//! A small synchronous client for QMP (the QEMU Machine Protocol) and for the QEMU
//! guest agent (QGA), both JSON messages over a unix socket.
//!
//! QMP, as spoken by a QEMU VM or qemu-storage-daemon (`--chardev socket,... --monitor`):
//! ```text
//!  server: {"QMP": {"version": {...}, "capabilities": [...]}}        greeting
//!  client: {"execute": "qmp_capabilities", "id": 1}
//!  server: {"return": {}, "id": 1}
//!  client: {"execute": "query-block-exports", "id": 2}
//!  server: {"event": "JOB_STATUS_CHANGE", "data": {...}, "timestamp": {...}}   any time
//!  server: {"return": [...], "id": 2}      or {"error": {"class": "...", "desc": "..."}, "id": 2}
//! ```
//! Messages are one JSON object per line (QEMU ends them with `\r\n`). Events that arrive
//! while waiting for a reply are skipped: the capture polls state with `query-*` commands,
//! which cannot miss an event that came before it asked.
//! The guest agent has no greeting and no ids: [`Qga`] resynchronises with `guest-sync`
//! (a random token echoed back) before each command, so a stale reply from an earlier
//! timed-out command is never taken for the answer to the current one.
//!
//! Why our own: the QMP crates on the registry are either async-only or generate the
//! whole QAPI schema; we need a dozen commands, synchronously, with timeouts and a cap
//! on message size (a hostile or confused peer must not make us allocate without bound).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, Result};

/// Largest message accepted from the peer.
const MAX_MESSAGE: u64 = 16 << 20;

/// One JSON object per line over a unix socket, with a cap and a deadline.
struct JsonLines {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// `UnixStream::connect` has no timeout and blocks as long as the listener's backlog is
/// full (QEMU's chardev sockets listen with a backlog of 1 and accept nobody while a
/// client, e.g. libvirt, is attached). Connect on a helper thread and give up after
/// `timeout`; a late connection is closed by that thread (the receiver is gone).
fn connect_within(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::Builder::new()
        .name("unix-connect".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(p));
        })?;
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("not accepted within {:.1}s", timeout.as_secs_f64()),
        ))
    })
}

impl JsonLines {
    fn connect(path: &Path, timeout: Duration) -> Result<JsonLines> {
        let stream = connect_within(path, timeout)
            .map_err(|e| Error::io(format!("connecting to {}", path.display()), e))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| Error::io("setting a socket timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cloning a socket", e))?;
        Ok(JsonLines {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    fn send(&mut self, msg: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(|e| Error::invalid(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| Error::io(format!("writing to {}", self.path.display()), e))
    }

    /// The next message, waiting at most until `deadline` (for the whole message: the
    /// socket timeout is renewed with what is left before every read, so a peer that
    /// trickles bytes cannot stretch it).
    fn recv(&mut self, deadline: Instant) -> Result<Value> {
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out());
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| Error::io("setting a socket timeout", e))?;
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                            self.timed_out()
                        }
                        _ => Error::io(format!("reading from {}", self.path.display()), e),
                    });
                }
            };
            if buf.is_empty() {
                break;
            }
            let (n, end) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if (line.len() + n) as u64 > MAX_MESSAGE {
                return Err(Error::invalid(format!(
                    "{}: message longer than {MAX_MESSAGE} bytes",
                    self.path.display()
                )));
            }
            line.extend_from_slice(&buf[..n]);
            self.reader.consume(n);
            if end {
                break;
            }
        }
        let n = line.len();
        if n == 0 {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{} closed the connection", self.path.display()),
            ));
        }
        if !line.ends_with(b"\n") {
            return Err(Error::invalid(format!(
                "{}: message longer than {MAX_MESSAGE} bytes or cut off",
                self.path.display()
            )));
        }
        serde_json::from_slice(&line).map_err(|e| {
            Error::invalid(format!("{}: a message is not JSON", self.path.display())).with_source(e)
        })
    }

    fn timed_out(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!("{} did not answer in time", self.path.display()),
        )
    }
}

/// A QMP connection (capabilities negotiated).
pub struct Qmp {
    conn: JsonLines,
    next_id: u64,
    timeout: Duration,
    /// QEMU's version as "major.minor.micro".
    pub version: String,
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode. `timeout` bounds
    /// every later command too.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let mut conn = JsonLines::connect(path, timeout)?;
        let deadline = Instant::now() + timeout;
        // QEMU may hand a new client what it had queued for the previous one on the same
        // monitor (an event, a late reply) before the greeting: skip those.
        let greeting = loop {
            let m = conn.recv(deadline)?;
            if ["event", "return", "error"]
                .iter()
                .any(|k| m.get(k).is_some())
            {
                continue;
            }
            break m;
        };
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| {
                let mut seen = greeting.to_string();
                seen.truncate(200);
                Error::invalid(format!(
                    "{} is not a QMP socket (no QMP greeting; it sent {seen})",
                    path.display()
                ))
            })?;
        let part = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let version = format!("{}.{}.{}", part("major"), part("minor"), part("micro"));
        let mut qmp = Qmp {
            conn,
            next_id: 1,
            timeout,
            version,
        };
        qmp.execute_value("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The process id of the QEMU at the other end (SO_PEERCRED), if the kernel says.
    pub fn peer_pid(&self) -> Option<u32> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let cred = getsockopt(&self.conn.writer, PeerCredentials).ok()?;
        u32::try_from(cred.pid()).ok().filter(|p| *p > 0)
    }

    /// Run `command` and deserialize its `return` value.
    pub fn execute<T: DeserializeOwned>(&mut self, command: &str, args: Value) -> Result<T> {
        let v = self.execute_value(command, args)?;
        serde_json::from_value(v).map_err(|e| {
            Error::invalid(format!("QMP {command}: unexpected reply shape")).with_source(e)
        })
    }

    /// Run `command` and return its `return` value as JSON.
    pub fn execute_value(&mut self, command: &str, args: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        self.conn.send(&msg)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let reply = self.conn.recv(deadline).map_err(|e| {
                e.context_prefix(format!("QMP {command} on {}", self.conn.path.display()))
            })?;
            if reply.get("event").is_some() {
                continue;
            }
            match reply.get("id") {
                Some(i) if i.as_u64() == Some(id) => {}
                // QEMU answers a command it could not even parse with an id-less error.
                None if reply.get("error").is_some() => {}
                _ => continue, // a reply to an earlier command that timed out
            }
            if let Some(err) = reply.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("");
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
                let kind = match class {
                    "DeviceNotFound" => ErrorKind::NotFound,
                    _ => ErrorKind::Conflict,
                };
                return Err(Error::new(kind, format!("QMP {command}: {desc}")));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// A QEMU guest agent connection (the host side of its virtio-serial channel).
pub struct Qga {
    conn: JsonLines,
}

impl Qga {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qga> {
        Ok(Qga {
            conn: JsonLines::connect(path, timeout)?,
        })
    }

    /// Resynchronise, then run `command`, waiting at most `timeout` for its reply.
    pub fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let token: u32 = rand::random::<u32>() >> 1;
        self.conn
            .send(&json!({"execute": "guest-sync", "arguments": {"id": token}}))?;
        loop {
            let r = self.conn.recv(deadline)?;
            if r.get("return").and_then(Value::as_u64) == Some(u64::from(token)) {
                break;
            }
        }
        self.conn.send(&json!({"execute": command}))?;
        let r = self.conn.recv(deadline)?;
        if let Some(err) = r.get("error") {
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("guest agent {command}: {desc}"),
            ));
        }
        Ok(r.get("return").cloned().unwrap_or(Value::Null))
    }
}

#[cfg(test)]
mod tests {
    //! Peers that misbehave cannot be made of a real QEMU: these are scripted mock
    //! peers on a unix socket (the real qemu-storage-daemon is in tests/it/server.rs).
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A peer that writes `script` (after reading one line per `\n` in `reads`) and
    /// then stays silent until dropped.
    fn peer(script: Vec<(usize, &'static str)>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let Ok((s, _)) = l.accept() else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for (reads, text) in script {
                for _ in 0..reads {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                }
                for b in text.bytes() {
                    if w.write_all(&[b]).is_err() {
                        return;
                    }
                    if text.starts_with("TRICKLE") {
                        std::thread::sleep(Duration::from_millis(40));
                    }
                }
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        (dir, path)
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \"micro\": 2}}, \"capabilities\": []}}\r\n";

    #[test]
    fn a_silent_peer_times_out_instead_of_hanging() {
        let (_d, path) = peer(vec![]);
        let t = Instant::now();
        let e = Qmp::connect(&path, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(e.to_string().contains("did not answer in time"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_trickling_peer_cannot_stretch_the_deadline() {
        let (_d, path) = peer(vec![(0, "TRICKLE ......................................")]);
        let t = Instant::now();
        assert!(Qmp::connect(&path, Duration::from_millis(300)).is_err());
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn events_and_stale_replies_are_skipped_and_errors_are_errors() {
        let (_d, path) = peer(vec![
            (0, GREETING),
            (1, "{\"return\": {}, \"id\": 1}\r\n"),
            (
                1,
                concat!(
                    "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {}}\r\n",
                    "{\"return\": \"stale\", \"id\": 99}\r\n",
                    "{\"return\": [1, 2], \"id\": 2}\r\n"
                ),
            ),
            (
                1,
                "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"no node x\"}, \"id\": 3}\r\n",
            ),
            (
                1,
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\r\n",
            ),
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version, "10.0.2");
        let v: Vec<u32> = q.execute("query-block-exports", json!({})).unwrap();
        assert_eq!(v, [1, 2]);
        let e = q
            .execute_value("blockdev-del", json!({"node-name": "x"}))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("no node x"), "{e}");
        let e = q.execute_value("query-version", json!({})).unwrap_err();
        assert!(e.to_string().contains("JSON parse error"), "{e}");
    }

    #[test]
    fn what_a_previous_client_left_queued_is_skipped_before_the_greeting() {
        let (_d, path) = peer(vec![
            (
                0,
                concat!(
                    "{\"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {}}\r\n",
                    "{\"return\": {}, \"id\": 7}\r\n",
                ),
            ),
            (0, GREETING),
            (1, "{\"return\": {}, \"id\": 1}\r\n"),
        ]);
        let q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version, "10.0.2");
    }

    #[test]
    fn a_socket_without_a_greeting_is_not_qmp() {
        let (_d, path) = peer(vec![(0, "{\"hello\": 1}\n")]);
        let e = Qmp::connect(&path, Duration::from_secs(2)).err().unwrap();
        assert!(e.to_string().contains("not a QMP socket"), "{e}");
    }
}

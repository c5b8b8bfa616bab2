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
//! The guest agent has no greeting and no ids: [`Qga`] resynchronises with
//! `guest-sync-delimited` before each command, so a stale reply from an earlier
//! timed-out command is never taken for the answer to the current one:
//! ```text
//!  client: 0xFF {"execute": "guest-sync-delimited", "arguments": {"id": 12345}}
//!          (0xFF is never valid JSON: the agent drops any half-parsed input)
//!  agent:  ...late replies of earlier commands...  0xFF {"return": 12345}
//!          (we skip input up to an 0xFF, then take lines until the one with our id)
//! ```
//! The agent runs one command at a time: while a slow `guest-fsfreeze-freeze` runs,
//! nothing else is answered, so every wait on it has a deadline and can be cancelled.
//!
//! Why our own: the QMP crates on the registry are either async-only or generate the
//! whole QAPI schema; we need a dozen commands, synchronously, with timeouts and a cap
//! on message size (a hostile or confused peer must not make us allocate without bound).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, Result};

/// Largest message accepted from the peer.
const MAX_MESSAGE: u64 = 16 << 20;

/// How often a wait that can be cancelled looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// How long a QMP monitor may take to greet a new client (QEMU greets at once unless
/// another client holds the monitor).
const GREETING_WAIT: Duration = Duration::from_secs(10);

/// The guest agent's resynchronisation byte.
const DELIMITER: u8 = 0xFF;

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
pub(crate) fn connect_within(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
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
        JsonLines::from_stream(path, stream, timeout)
    }

    fn from_stream(path: &Path, stream: UnixStream, timeout: Duration) -> Result<JsonLines> {
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
        self.recv_or_cancel(deadline, None)
    }

    /// Fill the read buffer, waiting at most until `deadline`; a raised `cancel` stops
    /// the wait within [`CANCEL_POLL`]. An empty buffer means the peer closed.
    fn fill(&mut self, deadline: Instant, cancel: Option<&AtomicBool>) -> Result<&[u8]> {
        loop {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::cancelled(format!(
                    "stopped waiting for {}: cancelled",
                    self.path.display()
                )));
            }
            let mut left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out());
            }
            if cancel.is_some() {
                left = left.min(CANCEL_POLL);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| Error::io("setting a socket timeout", e))?;
            match self.reader.fill_buf() {
                Ok(_) => break,
                Err(e) => match e.kind() {
                    std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut => continue,
                    _ => {
                        return Err(Error::io(
                            format!("reading from {}", self.path.display()),
                            e,
                        ));
                    }
                },
            }
        }
        Ok(self.reader.buffer())
    }

    /// Skip input up to and including the next `byte`.
    fn skip_to(&mut self, byte: u8, deadline: Instant, cancel: Option<&AtomicBool>) -> Result<()> {
        loop {
            let buf = self.fill(deadline, cancel)?;
            if buf.is_empty() {
                return Err(self.closed());
            }
            match buf.iter().position(|&b| b == byte) {
                Some(i) => {
                    self.reader.consume(i + 1);
                    return Ok(());
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                }
            }
        }
    }

    fn closed(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!("{} closed the connection", self.path.display()),
        )
    }

    fn recv_or_cancel(&mut self, deadline: Instant, cancel: Option<&AtomicBool>) -> Result<Value> {
        let mut line = Vec::new();
        loop {
            let buf = self.fill(deadline, cancel)?;
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
        if line.is_empty() {
            return Err(self.closed());
        }
        if !line.ends_with(b"\n") {
            return Err(Error::invalid(format!(
                "{}: message longer than {MAX_MESSAGE} bytes or cut off",
                self.path.display()
            )));
        }
        // A guest agent's delimiter before a reply is not part of the JSON.
        let start = line.iter().take_while(|&&b| b == DELIMITER).count();
        serde_json::from_slice(&line[start..]).map_err(|e| {
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
    /// A monitor that does not greet within `min(timeout, 10 s)` (or does not accept
    /// the connection at all) is held by another client: the error says so.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let wait = timeout.min(GREETING_WAIT);
        let busy = |what: String| {
            Error::conflict(format!(
                "{}: {what}: another client holds the monitor (a QMP socket serves one \
                 client at a time: libvirt, another tool, or a backup still running). Give \
                 blockvault a monitor of its own (QEMU: -chardev socket,id=bv,path=PATH,\
                 server=on,wait=off -mon chardev=bv,mode=control) or end the other client",
                path.display()
            ))
        };
        let mut conn = match connect_within(path, wait) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(busy(format!(
                    "QEMU did not accept the connection within {:.0}s",
                    wait.as_secs_f64()
                )));
            }
            r => JsonLines::from_stream(
                path,
                r.map_err(|e| Error::io(format!("connecting to {}", path.display()), e))?,
                timeout,
            )?,
        };
        let deadline = Instant::now() + wait;
        // QEMU may hand a new client what it had queued for the previous one on the same
        // monitor (an event, a late reply) before the greeting: skip those.
        let mut seen = false;
        let greeting = loop {
            let m = match conn.recv(deadline) {
                Err(e) if !seen && Qga::is_timeout(&e) => {
                    return Err(busy(format!(
                        "QEMU accepted the connection but sent no QMP greeting within {:.0}s",
                        wait.as_secs_f64()
                    )));
                }
                r => r?,
            };
            seen = true;
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

    /// Resynchronise with `guest-sync-delimited` (see the module doc). Waits at most
    /// until `deadline`; a raised `cancel` stops the wait (error kind `Cancelled`).
    pub fn sync(&mut self, deadline: Instant, cancel: Option<&AtomicBool>) -> Result<()> {
        let token: u32 = rand::random::<u32>() >> 1;
        let msg = json!({"execute": "guest-sync-delimited", "arguments": {"id": token}});
        let mut line = vec![DELIMITER];
        line.extend(serde_json::to_vec(&msg).map_err(|e| Error::invalid(e.to_string()))?);
        line.push(b'\n');
        self.conn
            .writer
            .write_all(&line)
            .map_err(|e| Error::io(format!("writing to {}", self.conn.path.display()), e))?;
        loop {
            self.conn.skip_to(DELIMITER, deadline, cancel)?;
            // A reply that does not parse is a stale one cut by an earlier resync.
            match self.conn.recv_or_cancel(deadline, cancel) {
                Ok(r) if r.get("return").and_then(Value::as_u64) == Some(u64::from(token)) => {
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::InvalidFormat => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Send `command` (right after a [`Qga::sync`]) and wait for its reply.
    pub fn command(
        &mut self,
        command: &str,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<Value> {
        self.conn.send(&json!({"execute": command}))?;
        let r = self.conn.recv_or_cancel(deadline, cancel)?;
        if let Some(err) = r.get("error") {
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("guest agent {command}: {desc}"),
            ));
        }
        Ok(r.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Resynchronise, then run `command`, waiting at most `timeout` for both.
    pub fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        self.sync(deadline, None)?;
        self.command(command, deadline, None)
    }

    /// Whether `e` (from this module) is a deadline that passed, not a broken connection.
    pub fn is_timeout(e: &Error) -> bool {
        e.kind() == ErrorKind::Io && e.to_string().contains("did not answer in time")
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
        assert!(
            e.to_string().contains("another client holds the monitor"),
            "{e}"
        );
        assert_eq!(e.kind(), ErrorKind::Conflict);
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

    /// A SCRIPTED guest agent: answers the first line (a delimited sync) with `before`
    /// then its own reply, and the next line with `"thawed"`; then stays silent.
    fn agent(before: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let Ok((s, _)) = l.accept() else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).unwrap();
            assert_eq!(line[0], 0xFF, "the sync starts with the delimiter");
            let v: Value = serde_json::from_slice(&line[1..]).unwrap();
            assert_eq!(v["execute"], "guest-sync-delimited");
            if before.is_empty() {
                std::thread::sleep(Duration::from_secs(5));
                return;
            }
            w.write_all(before).unwrap();
            let mine = format!("{{\"return\": {}}}\n", v["arguments"]["id"]);
            w.write_all(&[0xFF]).unwrap();
            w.write_all(mine.as_bytes()).unwrap();
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            w.write_all(b"{\"return\": \"thawed\"}\n").unwrap();
            std::thread::sleep(Duration::from_secs(5));
        });
        (dir, path)
    }

    #[test]
    fn a_delimited_sync_skips_late_replies_half_lines_and_stale_syncs() {
        let (_d, path) = agent(b"{\"return\": 2}\r\n{\"ret\xff{\"return\": 7}\n");
        let mut q = Qga::connect(&path, Duration::from_secs(5)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        q.sync(deadline, None).unwrap();
        let v = q.command("guest-fsfreeze-status", deadline, None).unwrap();
        assert_eq!(v, "thawed");
    }

    #[test]
    fn a_cancel_stops_waiting_for_a_busy_agent_at_once() {
        let (_d, path) = agent(b"");
        let mut q = Qga::connect(&path, Duration::from_secs(5)).unwrap();
        let cancel = std::sync::Arc::new(AtomicBool::new(false));
        let c = std::sync::Arc::clone(&cancel);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c.store(true, Ordering::Relaxed);
        });
        let t = Instant::now();
        let e = q
            .sync(Instant::now() + Duration::from_secs(30), Some(&cancel))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cancelled);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn a_socket_without_a_greeting_is_not_qmp() {
        let (_d, path) = peer(vec![(0, "{\"hello\": 1}\n")]);
        let e = Qmp::connect(&path, Duration::from_secs(2)).err().unwrap();
        assert!(e.to_string().contains("not a QMP socket"), "{e}");
    }
}

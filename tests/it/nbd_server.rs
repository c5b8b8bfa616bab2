//! The NBD server (`blockvault::nbd::server`) in-process, spoken to in raw protocol over
//! a Unix socket: replies to odd requests are exact and valid, command flags are
//! honoured or refused, `--listen unix:PATH` never removes what it did not create, and
//! the connection cap and the negotiation deadline hold.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blockvault::Result;
use blockvault::nbd::proto::*;
use blockvault::nbd::server::{ExportInfo, ExportReader, Limits, Listener, serve_with};

use crate::common::*;

const SIZE: u64 = 1 << 20;
const RUN: u64 = 64 << 10;
const NAME: &str = "disk";
const EINVAL: u32 = 22;
const CMD_CACHE: u16 = 5;
const FLAG_REQ_ONE: u16 = 1 << 3;

/// The export: a byte pattern; allocation alternates 64 KiB data and 64 KiB holes, and
/// its last run is whole even past the requested range (as a reader may answer).
struct Mem;

impl ExportReader for Mem {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8;
        }
        Ok(())
    }

    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let end = (offset + len).min(SIZE);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let run_end = ((pos / RUN) + 1) * RUN;
            let flags = if (pos / RUN).is_multiple_of(2) {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            out.push((run_end - pos, flags));
            pos = run_end;
        }
        Ok(out)
    }
}

/// A server on a Unix socket in a temp dir, stopped and joined when dropped.
struct Srv {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Srv {
    fn start(limits: Limits) -> Srv {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let listener = Listener::bind(&format!("unix:{}", sock.display())).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let info = ExportInfo {
                name: NAME.into(),
                size: SIZE,
                preferred_block: 4096,
            };
            let open = Arc::new(|| -> Result<Box<dyn ExportReader>> { Ok(Box::new(Mem)) });
            serve_with(&listener, &info, open, &st, &limits).unwrap();
        });
        Srv {
            _dir: dir,
            sock,
            stop,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        s
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes(b[o..o + 2].try_into().unwrap())
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Read one option reply: (type, data).
fn opt_reply(s: &mut UnixStream, opt: u32) -> (u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(be64(&h, 0), OPT_REPLY_MAGIC);
    assert_eq!(be32(&h, 8), opt);
    let len = be32(&h, 16) as usize;
    (be32(&h, 12), read_n(s, len))
}

/// Read option replies up to the ACK; returns the replies before it.
fn until_ack(s: &mut UnixStream, opt: u32) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let (kind, data) = opt_reply(s, opt);
        if kind == REP_ACK {
            return out;
        }
        assert_eq!(kind & REP_ERR_BIT, 0, "option {opt} refused: {kind:#x}");
        out.push((kind, data));
    }
}

/// Connect and negotiate into transmission: structured replies and `base:allocation`
/// when `structured`, then NBD_OPT_GO.
fn open(srv: &Srv, structured: bool) -> UnixStream {
    let mut s = srv.connect();
    let hello = read_n(&mut s, 18);
    assert_eq!(be64(&hello, 0), NBDMAGIC);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    if structured {
        send_opt(&mut s, OPT_STRUCTURED_REPLY, b"");
        until_ack(&mut s, OPT_STRUCTURED_REPLY);
        let mut m = (NAME.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(NAME.as_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        send_opt(&mut s, OPT_SET_META_CONTEXT, &m);
        let ctx = until_ack(&mut s, OPT_SET_META_CONTEXT);
        assert_eq!(ctx.len(), 1);
        assert_eq!(ctx[0].0, REP_META_CONTEXT);
    }
    let mut g = (NAME.len() as u32).to_be_bytes().to_vec();
    g.extend_from_slice(NAME.as_bytes());
    g.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, OPT_GO, &g);
    until_ack(&mut s, OPT_GO);
    s
}

fn request(s: &mut UnixStream, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
    s.write_all(&encode_request(flags, kind, cookie, offset, len))
        .unwrap();
}

/// One structured chunk: (flags, type, payload), checking the cookie.
fn chunk(s: &mut UnixStream, cookie: u64) -> (u16, u16, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(
        be32(&h, 0),
        STRUCTURED_REPLY_MAGIC,
        "not a structured reply"
    );
    assert_eq!(be64(&h, 8), cookie);
    let len = be32(&h, 16) as usize;
    (be16(&h, 4), be16(&h, 6), read_n(s, len))
}

/// A simple reply's error field, checking the cookie.
fn simple(s: &mut UnixStream, cookie: u64) -> u32 {
    let h = read_n(s, 16);
    assert_eq!(be32(&h, 0), SIMPLE_REPLY_MAGIC, "not a simple reply");
    assert_eq!(be64(&h, 8), cookie);
    be32(&h, 4)
}

/// Expect a final error chunk with `errno`.
fn expect_error(s: &mut UnixStream, cookie: u64, errno: u32) {
    let (flags, kind, p) = chunk(s, cookie);
    assert_eq!(kind, REPLY_ERROR, "expected an error chunk");
    assert_eq!(flags, REPLY_FLAG_DONE);
    assert_eq!(parse_error_payload(&p).unwrap().0, errno);
}

/// A structured read that must succeed in one data chunk: checks the bytes.
fn expect_read(s: &mut UnixStream, cookie: u64, offset: u64, len: u32) {
    request(s, 0, CMD_READ, cookie, offset, len);
    let (flags, kind, p) = chunk(s, cookie);
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_OFFSET_DATA));
    assert_eq!(p.len(), 8 + len as usize);
    assert_eq!(be64(&p, 0), offset);
    let mut want = vec![0u8; len as usize];
    Mem.read(offset, &mut want).unwrap();
    assert_eq!(&p[8..], &want[..]);
}

/// The connection was closed by the server (EOF, or a reset) within the read timeout.
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn a_zero_length_read_gets_a_valid_empty_reply_and_the_stream_stays_in_sync() {
    let srv = Srv::start(Limits::default());
    let mut s = open(&srv, true);
    for (cookie, offset) in [(1, 0), (2, 4096), (3, SIZE)] {
        request(&mut s, 0, CMD_READ, cookie, offset, 0);
        let (flags, kind, p) = chunk(&mut s, cookie);
        assert_eq!(kind, REPLY_NONE, "a zero-length read is a NONE chunk");
        assert_eq!(flags, REPLY_FLAG_DONE);
        assert!(p.is_empty(), "NONE chunk of {} bytes", p.len());
    }
    // Past the end, even with no length: EINVAL.
    request(&mut s, 0, CMD_READ, 4, SIZE + 1, 0);
    expect_error(&mut s, 4, EINVAL);
    expect_read(&mut s, 5, 512, 1000);

    // Simple replies: a success with no payload.
    let mut s = open(&srv, false);
    request(&mut s, 0, CMD_READ, 6, 0, 0);
    assert_eq!(simple(&mut s, 6), 0);
    request(&mut s, 0, CMD_READ, 7, 100, 3);
    assert_eq!(simple(&mut s, 7), 0);
    assert_eq!(read_n(&mut s, 3), vec![100, 101, 102]);
}

#[test]
fn block_status_with_req_one_has_exactly_one_descriptor_within_the_request() {
    let srv = Srv::start(Limits::default());
    let mut s = open(&srv, true);
    // Without the flag: every run, the last one may go past the request.
    request(&mut s, 0, CMD_BLOCK_STATUS, 1, 0, 200 << 10);
    let (flags, kind, p) = chunk(&mut s, 1);
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_BLOCK_STATUS));
    let (_, d) = parse_block_status(&p).unwrap();
    assert_eq!(
        d,
        vec![
            (64 << 10, 0),
            (64 << 10, STATE_HOLE | STATE_ZERO),
            (64 << 10, 0),
            (64 << 10, STATE_HOLE | STATE_ZERO)
        ]
    );
    // With REQ_ONE: one descriptor, never longer than the request.
    for (cookie, offset, len, want) in [
        (2u64, 0u64, 200u32 << 10, (64u32 << 10, 0u32)),
        (3, 64 << 10, 4096, (4096, STATE_HOLE | STATE_ZERO)),
        (4, 1000, 10_000, (10_000, 0)),
        (5, SIZE - 512, 512, (512, STATE_HOLE | STATE_ZERO)),
    ] {
        request(&mut s, FLAG_REQ_ONE, CMD_BLOCK_STATUS, cookie, offset, len);
        let (flags, kind, p) = chunk(&mut s, cookie);
        assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_BLOCK_STATUS));
        assert_eq!(
            p.len(),
            12,
            "REQ_ONE: one descriptor, got {} bytes",
            p.len()
        );
        let (id, d) = parse_block_status(&p).unwrap();
        assert_eq!(id, 1);
        assert_eq!(d, vec![want], "at {offset}+{len}");
    }
}

#[test]
fn unknown_command_flags_and_a_cache_past_the_end_get_einval() {
    let srv = Srv::start(Limits::default());
    let mut s = open(&srv, true);
    // An undefined flag bit, and flags defined but not for the command.
    request(&mut s, 1 << 9, CMD_READ, 1, 0, 512);
    expect_error(&mut s, 1, EINVAL);
    request(&mut s, FLAG_REQ_ONE, CMD_READ, 2, 0, 512);
    expect_error(&mut s, 2, EINVAL);
    request(&mut s, 1 << 7, CMD_FLUSH, 3, 0, 0);
    expect_error(&mut s, 3, EINVAL);
    request(&mut s, 1 << 7, CMD_BLOCK_STATUS, 4, 0, 512);
    expect_error(&mut s, 4, EINVAL);
    // A write with a bad flag: its payload is drained, then EINVAL; still in sync.
    request(&mut s, 1 << 7, CMD_WRITE, 5, 0, 4);
    s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    expect_error(&mut s, 5, EINVAL);
    // FUA is accepted (it means nothing on a read-only export).
    request(&mut s, 1, CMD_FLUSH, 6, 0, 0);
    assert_eq!(chunk(&mut s, 6), (REPLY_FLAG_DONE, REPLY_NONE, vec![]));

    // CACHE: fine within the export, EINVAL past its end (like a read).
    request(&mut s, 0, CMD_CACHE, 7, SIZE - 4096, 4096);
    assert_eq!(chunk(&mut s, 7), (REPLY_FLAG_DONE, REPLY_NONE, vec![]));
    request(&mut s, 0, CMD_CACHE, 8, SIZE - 4096, 8192);
    expect_error(&mut s, 8, EINVAL);
    request(&mut s, 0, CMD_CACHE, 9, u64::MAX - 10, 4096);
    expect_error(&mut s, 9, EINVAL);
    expect_read(&mut s, 10, 0, 4096);

    // Simple replies too.
    let mut s = open(&srv, false);
    request(&mut s, 1 << 9, CMD_READ, 11, 0, 512);
    assert_eq!(simple(&mut s, 11), EINVAL);
    request(&mut s, 0, CMD_CACHE, 12, SIZE, 1);
    assert_eq!(simple(&mut s, 12), EINVAL);
    request(&mut s, 0, CMD_READ, 13, 0, 2);
    assert_eq!(simple(&mut s, 13), 0);
    assert_eq!(read_n(&mut s, 2), vec![0, 1]);
}

fn bind(p: &Path) -> blockvault::Result<Listener> {
    Listener::bind(&format!("unix:{}", p.display()))
}

#[test]
fn listen_refuses_a_path_that_is_not_a_socket_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious.img");
    std::fs::write(&file, b"not a socket").unwrap();
    let e = bind(&file).err().expect("bound over a regular file");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    // A directory, and an absolute path given without `unix:`.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let e = Listener::bind(sub.to_str().unwrap())
        .err()
        .expect("bound over a directory");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert!(sub.is_dir());

    // Through the CLI: the error is clear and the file survives.
    let env = Env::new();
    let out = env.run(&[
        "serve-nbd",
        "no-such-backup",
        "--listen",
        &format!("unix:{}", file.display()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

#[test]
fn listen_refuses_a_live_socket_and_replaces_only_a_stale_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.sock");
    let live = bind(&p).unwrap();
    let e = bind(&p).err().expect("bound over a live server's socket");
    assert!(e.to_string().contains("another server"), "{e}");
    // The live server's socket is still there and still answers.
    UnixStream::connect(&p).expect("the live socket was removed");
    drop(live);
    assert!(!p.exists(), "the server's own socket is removed on exit");

    // A stale socket (nobody listening) is replaced.
    drop(UnixListener::bind(&p).unwrap());
    assert!(p.exists());
    assert!(UnixStream::connect(&p).is_err());
    let l = bind(&p).unwrap();
    UnixStream::connect(&p).expect("the new socket does not answer");
    drop(l);
    assert!(!p.exists());
}

#[test]
fn on_exit_the_server_removes_only_the_socket_it_created() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.sock");
    let l = bind(&p).unwrap();
    // Someone replaced our socket with a file, then with another server's socket.
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, b"theirs").unwrap();
    drop(l);
    assert_eq!(std::fs::read(&p).unwrap(), b"theirs");
    std::fs::remove_file(&p).unwrap();

    let l = bind(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    let other = UnixListener::bind(&p).unwrap();
    drop(l);
    UnixStream::connect(&p).expect("the other server's socket was removed");
    drop(other);
}

#[test]
fn clients_past_the_cap_are_refused_until_a_slot_frees() {
    let srv = Srv::start(Limits {
        max_clients: 2,
        handshake_timeout: Duration::from_secs(30),
        ..Limits::default()
    });
    let mut a = srv.connect();
    read_n(&mut a, 18);
    let mut b = open(&srv, true);
    // A third client is closed without a greeting.
    let mut c = srv.connect();
    assert!(closed_by_server(&mut c), "a client past the cap was served");
    // Those in are served.
    expect_read(&mut b, 1, 0, 4096);
    // One leaves: a new client gets in (once its session thread has ended).
    drop(a);
    let start = Instant::now();
    loop {
        let mut d = srv.connect();
        let mut hello = [0u8; 18];
        if d.read_exact(&mut hello).is_ok() {
            assert_eq!(be64(&hello, 0), NBDMAGIC);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no slot freed after a client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    expect_read(&mut b, 2, 8192, 512);
}

#[test]
fn a_client_silent_or_trickling_in_negotiation_is_dropped_but_idle_transmission_is_not() {
    let srv = Srv::start(Limits {
        max_clients: 4,
        handshake_timeout: Duration::from_millis(400),
        ..Limits::default()
    });
    let t0 = Instant::now();
    // Silent after the greeting.
    let mut silent = srv.connect();
    read_n(&mut silent, 18);
    assert!(closed_by_server(&mut silent), "a silent client was kept");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // Trickling: one byte every 50 ms never finishes an option in time.
    let mut slow = srv.connect();
    read_n(&mut slow, 18);
    let t1 = Instant::now();
    let mut msg = (FLAG_C_FIXED_NEWSTYLE).to_be_bytes().to_vec();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    let mut refused = false;
    for byte in &msg {
        if slow.write_all(&[*byte]).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The deadline passes within the first option header: either the writes failed or
    // the connection is closed by now.
    assert!(
        refused || closed_by_server(&mut slow),
        "a trickling client was kept"
    );
    assert!(t1.elapsed() < Duration::from_secs(4));

    // Past negotiation, an idle client is kept.
    let mut idle = open(&srv, true);
    std::thread::sleep(Duration::from_millis(700));
    expect_read(&mut idle, 1, 0, 4096);
}

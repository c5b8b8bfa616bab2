//! The NBD client against real servers (qemu-nbd, nbdkit) and against a small lying
//! server written here: clear errors, never a panic or a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;

use blockvault::ErrorKind;
use blockvault::nbd::{NbdClient, NbdUri};
use blockvault::source::open_source;

use crate::appliance::{Appliance, token};
use crate::common::*;

#[test]
fn nbd_exports_of_qemu_nbd_and_nbdkit_back_up_and_restore_byte_exact() {
    let fx = fixtures();
    let env = Env::new();
    let sock = env.path("q.sock");
    let srv = Server::qemu_nbd(&fx.join("disk.qcow2"), &sock, &["-f", "qcow2"]);
    let b = env.json(&["backup", &srv.uri(), "--vault", "v", "--id", "q"]);
    // base:allocation keeps unallocated space unread.
    assert!(u(&b, "bytes_read") < 16 << 20, "{b}");
    let out = env.path("q.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&fx.join("disk.qcow2"), &out));
    drop(srv);

    let sock = env.path("k.sock");
    let raw = fx.join("disk.raw");
    let file_arg = format!("file={}", raw.display());
    let srv = Server::start(
        "nbdkit",
        &["-f", "-U", sock.to_str().unwrap(), "file", &file_arg],
        &sock,
    );
    let b = env.json(&["backup", &srv.uri(), "--vault", "v", "--id", "k"]);
    let out = env.path("k.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&raw, &out));
    drop(srv);

    // nbdkit memory/data plugins: a pattern written at a known place.
    let sock = env.path("d.sock");
    let srv = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "data",
            "@1048576 1 2 3 4 5 6 7 8 @9437184 \"hello\"",
            "size=16M",
        ],
        &sock,
    );
    let mut src = open_source(&srv.uri()).unwrap();
    assert_eq!(src.size(), 16 << 20);
    let mut buf = [0u8; 8];
    src.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8]);
    let ext = src.allocated_extents().unwrap();
    assert!(
        ext.iter().map(|e| e.length).sum::<u64>() < 16 << 20,
        "{ext:?}"
    );
}

/// How the fake server misbehaves.
#[derive(Clone, Copy)]
enum Lie {
    BadGreeting,
    HugeOptionReply,
    DataOutsideRequest,
    CloseMidReply,
    WrongCookie,
    ShortRead,
    ZeroLengthStatus,
    /// The first half of the read twice, the second half never.
    DuplicateChunk,
    /// A data chunk whose offset + length wraps past u64::MAX.
    WrappingOffset,
    /// The reply trickles: one byte every 100 ms.
    Trickle,
    /// A writable export whose reply to a write trickles: one byte every 100 ms.
    TrickleWriteReply,
    /// A writable export that takes the first request and then never answers (until
    /// the client hangs up); the flag is set when the request has arrived.
    Stall(&'static std::sync::atomic::AtomicBool),
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Serve one client on `path`, lying as told.
fn fake_server(path: &Path, lie: Lie) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = listener.accept() else {
            return;
        };
        let _ = (|| -> std::io::Result<()> {
            if let Lie::BadGreeting = lie {
                c.write_all(b"HTTP/1.1 200 OK\r\n\r\n")?;
                return Ok(());
            }
            c.write_all(&be64(0x4e42444d41474943))?;
            c.write_all(&be64(0x49484156454F5054))?;
            c.write_all(&3u16.to_be_bytes())?;
            let mut f = [0u8; 4];
            c.read_exact(&mut f)?;
            let reply =
                |c: &mut std::os::unix::net::UnixStream, opt: u32, kind: u32, data: &[u8]| {
                    let mut m = be64(0x3e889045565a9).to_vec();
                    m.extend_from_slice(&be32(opt));
                    m.extend_from_slice(&be32(kind));
                    m.extend_from_slice(&be32(data.len() as u32));
                    m.extend_from_slice(data);
                    c.write_all(&m)
                };
            loop {
                let mut h = [0u8; 16];
                c.read_exact(&mut h)?;
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                c.read_exact(&mut data)?;
                match opt {
                    8 => reply(&mut c, 8, 1, &[])?,
                    10 => {
                        let mut d = be32(1).to_vec();
                        d.extend_from_slice(b"base:allocation");
                        reply(&mut c, 10, 4, &d)?;
                        reply(&mut c, 10, 1, &[])?;
                    }
                    7 => {
                        if let Lie::HugeOptionReply = lie {
                            let mut m = be64(0x3e889045565a9).to_vec();
                            m.extend_from_slice(&be32(7));
                            m.extend_from_slice(&be32(3));
                            m.extend_from_slice(&be32(0xffff_fff0));
                            c.write_all(&m)?;
                            return Ok(());
                        }
                        let mut d = 0u16.to_be_bytes().to_vec();
                        d.extend_from_slice(&be64(1 << 20));
                        // HAS_FLAGS, and READ_ONLY unless the lie is about writes.
                        let tflags: u16 = if let Lie::TrickleWriteReply | Lie::Stall(_) = lie {
                            1
                        } else {
                            3
                        };
                        d.extend_from_slice(&tflags.to_be_bytes());
                        reply(&mut c, 7, 3, &d)?;
                        reply(&mut c, 7, 1, &[])?;
                        break;
                    }
                    _ => reply(&mut c, opt, (1 << 31) | 1, &[])?,
                }
            }
            // Transmission: answer the first request with a lie.
            let mut r = [0u8; 28];
            c.read_exact(&mut r)?;
            let kind = u16::from_be_bytes([r[6], r[7]]);
            let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
            let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
            let length = u32::from_be_bytes(r[24..28].try_into().unwrap());
            let chunk = |flags: u16, ty: u16, ck: u64, payload: &[u8]| {
                let mut m = be32(0x668e33ef).to_vec();
                m.extend_from_slice(&flags.to_be_bytes());
                m.extend_from_slice(&ty.to_be_bytes());
                m.extend_from_slice(&be64(ck));
                m.extend_from_slice(&be32(payload.len() as u32));
                m.extend_from_slice(payload);
                m
            };
            let msg = match lie {
                Lie::DataOutsideRequest => {
                    let mut p = be64(offset + length as u64).to_vec();
                    p.extend_from_slice(&vec![7u8; 512]);
                    chunk(1, 1, cookie, &p)
                }
                Lie::CloseMidReply => {
                    let mut p = be64(offset).to_vec();
                    p.extend_from_slice(&vec![7u8; length as usize]);
                    let mut m = chunk(1, 1, cookie, &p);
                    m.truncate(m.len() / 2);
                    m
                }
                Lie::WrongCookie => chunk(1, 0, cookie + 1000, &[]),
                Lie::ShortRead => {
                    let mut p = be64(offset).to_vec();
                    p.extend_from_slice(&vec![7u8; length as usize / 2]);
                    chunk(1, 1, cookie, &p)
                }
                Lie::ZeroLengthStatus if kind == 7 => {
                    let mut p = be32(1).to_vec();
                    p.extend_from_slice(&be32(0));
                    p.extend_from_slice(&be32(0));
                    chunk(1, 5, cookie, &p)
                }
                Lie::DuplicateChunk => {
                    let mut p = be64(offset).to_vec();
                    p.extend_from_slice(&vec![7u8; length as usize / 2]);
                    let mut m = chunk(0, 1, cookie, &p);
                    m.extend_from_slice(&chunk(1, 1, cookie, &p));
                    m
                }
                Lie::WrappingOffset => {
                    let mut p = be64(u64::MAX - 100).to_vec();
                    p.extend_from_slice(&[7u8; 512]);
                    chunk(1, 1, cookie, &p)
                }
                Lie::Trickle => {
                    let mut m = chunk(1, 1, cookie, &be64(offset));
                    // Announce the whole read, then send it a byte at a time.
                    let n = m.len();
                    m[n - 12..n - 8].copy_from_slice(&be32(length + 8));
                    c.write_all(&m)?;
                    for _ in 0..length.min(600) {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        c.write_all(&[7])?;
                    }
                    Vec::new()
                }
                Lie::Stall(arrived) => {
                    if kind == 1 {
                        let mut payload = vec![0u8; length as usize];
                        c.read_exact(&mut payload)?;
                    }
                    arrived.store(true, std::sync::atomic::Ordering::SeqCst);
                    // Never answer; wait for the client to hang up.
                    while c.read(&mut [0u8; 4096])? > 0 {}
                    return Ok(());
                }
                Lie::TrickleWriteReply => {
                    let mut payload = vec![0u8; length as usize];
                    c.read_exact(&mut payload)?;
                    for b in chunk(1, 0, cookie, &[]) {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        c.write_all(&[b])?;
                    }
                    Vec::new()
                }
                _ => Vec::new(),
            };
            c.write_all(&msg)?;
            // Hold the connection open briefly, then go away.
            std::thread::sleep(std::time::Duration::from_millis(200));
            Ok(())
        })();
    })
}

fn connect(dir: &Path, lie: Lie) -> blockvault::Result<NbdClient> {
    let sock = dir.join(format!("fake-{}.sock", rand_suffix()));
    let h = fake_server(&sock, lie);
    let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    let r = NbdClient::connect(&uri, &["base:allocation".to_string()]);
    drop(h);
    r
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn a_lying_nbd_server_gets_a_clear_error_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let e = connect(dir.path(), Lie::BadGreeting)
        .err()
        .expect("bad greeting accepted");
    assert!(e.to_string().contains("not an NBD server"), "{e}");
    let e = connect(dir.path(), Lie::HugeOptionReply)
        .err()
        .expect("huge reply accepted");
    assert!(e.to_string().contains("option reply"), "{e}");
    for (lie, words) in [
        (Lie::DataOutsideRequest, "outside the request"),
        (Lie::CloseMidReply, "closed the connection"),
        (Lie::WrongCookie, "unknown request"),
        (Lie::ShortRead, "having sent"),
        (Lie::DuplicateChunk, "twice"),
        (Lie::WrappingOffset, "overflows"),
    ] {
        let mut c = connect(dir.path(), lie).unwrap();
        assert_eq!(c.size(), 1 << 20);
        let mut buf = vec![0u8; 65536];
        let e = c.read(0, &mut buf).unwrap_err();
        assert!(e.to_string().contains(words), "{e}");
    }
    let mut c = connect(dir.path(), Lie::ZeroLengthStatus).unwrap();
    let e = c.block_status("base:allocation", 0, 65536).unwrap_err();
    assert!(e.to_string().contains("zero-length"), "{e}");
    assert_eq!(e.kind(), ErrorKind::InvalidFormat);
}

#[test]
fn a_trickling_server_hits_the_request_deadline_not_a_hang() {
    // Scripted peer: a real server cannot be made to trickle one byte at a time. Each
    // byte arrives well within the 30 s socket timeout; only the whole-reply deadline
    // stops it.
    let dir = tempfile::tempdir().unwrap();
    let mut c = connect(dir.path(), Lie::Trickle).unwrap();
    c.set_request_deadline(std::time::Duration::from_secs(2));
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 65536];
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("request deadline"), "{e}");
    assert!(e.to_string().contains("65536 bytes at 0"), "{e}");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // The connection is out of step now and says so.
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
}

#[test]
fn a_write_whose_reply_trickles_hits_the_request_deadline() {
    // Scripted peer (a real server cannot be made to trickle): before, a write waited
    // for its reply with no deadline at all, one 30 s socket timeout per byte.
    let dir = tempfile::tempdir().unwrap();
    let mut c = connect(dir.path(), Lie::TrickleWriteReply).unwrap();
    c.set_request_deadline(std::time::Duration::from_secs(1));
    let started = std::time::Instant::now();
    let e = c.write(0, &[5u8; 4096]).unwrap_err();
    assert!(e.to_string().contains("request deadline"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let e = c.write(0, &[5u8; 4096]).unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
}

#[test]
fn a_cancel_ends_a_wait_on_a_trickling_server_at_once() {
    // Scripted peers, as above. The request deadline is long; only the cancel ends it.
    for lie in [Lie::Trickle, Lie::TrickleWriteReply] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = connect(dir.path(), lie).unwrap();
        c.set_request_deadline(std::time::Duration::from_secs(600));
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        c.set_cancel(Some(cancel.clone()));
        let setter = {
            let cancel = cancel.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(500));
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                std::time::Instant::now()
            })
        };
        let mut buf = vec![0u8; 65536];
        let e = match lie {
            Lie::Trickle => c.read(0, &mut buf).unwrap_err(),
            _ => c.write(0, &[5u8; 4096]).unwrap_err(),
        };
        let ended = std::time::Instant::now();
        let cancelled_at = setter.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
        assert!(e.to_string().contains("cancelled while waiting"), "{e}");
        assert!(
            ended.duration_since(cancelled_at) < std::time::Duration::from_secs(2),
            "the cancel took {:?} to be honoured",
            ended.duration_since(cancelled_at)
        );
    }
}

#[test]
fn a_tiny_maximum_block_size_is_refused_and_a_64k_one_reads_quickly() {
    let env = Env::new();
    // nbdkit refuses to advertise a maximum below 512; the rule is the same for 1.
    for (max, ok) in [(512u32, false), (4096, false), (65536, true)] {
        let sock = env.path(format!("bs{max}.sock").as_str());
        let srv = Server::start(
            "nbdkit",
            &[
                "-f",
                "-U",
                sock.to_str().unwrap(),
                "--filter=blocksize-policy",
                "pattern",
                "size=8M",
                "blocksize-minimum=1",
                &format!("blocksize-preferred={}", max.min(4096)),
                &format!("blocksize-maximum={max}"),
            ],
            &sock,
        );
        let uri = NbdUri::parse(&srv.uri()).unwrap();
        match NbdClient::connect(&uri, &[]) {
            Ok(mut c) => {
                assert!(ok, "maximum block size {max} accepted");
                let started = std::time::Instant::now();
                let mut buf = vec![0u8; 4 << 20];
                c.read(1 << 20, &mut buf).unwrap();
                // nbdkit's pattern plugin: each 8-byte word holds its own offset.
                for (i, w) in buf.chunks(8).enumerate().step_by(4099) {
                    let want = (1u64 << 20) + 8 * i as u64;
                    assert_eq!(w, want.to_be_bytes());
                }
                assert!(started.elapsed() < std::time::Duration::from_secs(10));
            }
            Err(e) => {
                assert!(!ok, "maximum block size {max} refused: {e}");
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                assert!(
                    e.to_string().contains(&format!("at most {max} bytes")),
                    "{e}"
                );
            }
        }
        // Through the CLI: a clear refusal and nothing written.
        let out = env.run(&["backup", &srv.uri(), "--vault", "v", "--id", "bs"]);
        assert_eq!(
            out.status.success(),
            ok,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !ok {
            assert!(String::from_utf8_lossy(&out.stderr).contains("maximum block size"));
            assert!(env.backups().is_empty());
            assert!(pack_files(&env.vault_dir()).is_empty());
        }
    }
}

#[test]
fn a_wrong_export_or_missing_bitmap_is_a_clear_error() {
    let fx = fixtures();
    let env = Env::new();
    let sock = env.path("q.sock");
    let srv = Server::qemu_nbd(
        &fx.join("disk.qcow2"),
        &sock,
        &["-f", "qcow2", "-x", "disk0"],
    );
    let wrong = format!("nbd+unix:///nope?socket={}", sock.display());
    let out = env.run(&["backup", &wrong, "--vault", "v", "--id", "x"]);
    // The NBD client reports the server's refusal of the export as invalid input (6).
    assert!(matches!(out.status.code(), Some(3 | 6)), "{:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let right = format!("nbd+unix:///disk0?socket={}", sock.display());
    let out = env.run(&[
        "backup", &right, "--vault", "v", "--id", "x", "--bitmap", "missing",
    ]);
    assert!(matches!(out.status.code(), Some(3 | 6)), "{:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stderr).contains("qemu:dirty-bitmap:missing"));
    assert!(env.backups().is_empty());
    drop(srv);
}

#[test]
fn a_hole_without_the_zero_flag_is_read_and_its_data_restored() {
    // A real nbdkit whose `base:allocation` says HOLE (not ZERO) over a range of data:
    // by the NBD spec that range may read back non-zero bytes, so it must be backed up.
    let env = Env::new();
    let sock = env.path("hole.sock");
    let srv = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "eval",
            "get_size=echo 1048576",
            r#"pread=head -c $3 /dev/zero | tr "\000" "\007""#,
            "can_extents=exit 0",
            "extents=echo 0 524288 hole; echo 524288 524288 hole,zero",
        ],
        &sock,
    );
    let b = env.json(&["backup", &srv.uri(), "--vault", "v", "--id", "hole"]);
    assert_eq!(u(&b, "bytes_read"), 512 << 10, "{b}");
    let out = env.path("hole.raw");
    env.restore(s(&b, "id"), &out, "raw");
    let restored = std::fs::read(&out).unwrap();
    assert_eq!(restored.len(), 1 << 20);
    assert!(restored[..512 << 10].iter().all(|&b| b == 7));
    assert!(restored[512 << 10..].iter().all(|&b| b == 0));
}

#[test]
fn read_ahead_over_scattered_ranges_returns_the_exact_bytes_in_any_read_pattern() {
    // A real qemu-nbd over random data; reads served from announced ranges, reads that
    // straddle read-ahead pieces, skip announced ranges, or were never announced.
    let env = Env::new();
    let img = env.path("ra.raw");
    let data = random_bytes(8 << 20, 77);
    std::fs::write(&img, &data).unwrap();
    let sock = env.path("ra.sock");
    let srv = Server::qemu_nbd(&img, &sock, &["-f", "raw"]);
    let mut c = NbdClient::connect(&NbdUri::parse(&srv.uri()).unwrap(), &[]).unwrap();
    let ext = |offset: u64, length: u64| blockvault::source::Extent { offset, length };
    let k = 1u64 << 10;
    c.read_ahead(&[
        ext(0, 64 * k),
        ext(128 * k, 64 * k),
        ext(1024 * k, 3 << 20), // three 1 MiB pieces
        ext(6 << 20, 64 * k),
        ext(7 << 20, 64 * k),
    ]);
    let mut check = |off: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        c.read(off, &mut buf).unwrap();
        assert!(
            buf == data[off as usize..(off + len) as usize],
            "bytes differ at {off}+{len}"
        );
    };
    check(0, 64 * k); // exactly the first range
    check(128 * k, 32 * k); // half a range, then the rest
    check(160 * k, 32 * k);
    check(512 * k, 64 * k); // never announced
    check(1024 * k + 512 * k, 1 << 20); // straddles two pieces
    check(7 << 20, 64 * k); // skips the range at 6 MiB
    check(0, 8 << 20); // everything, after the read-ahead ran out
    drop(c);
}

#[test]
fn when_one_disk_of_a_server_fails_the_backup_names_its_error_and_records_nothing() {
    // Two real nbdkit exports read in parallel; every read of the second one fails.
    let env = Env::new();
    let good_sock = env.path("good.sock");
    let good = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            good_sock.to_str().unwrap(),
            "pattern",
            "size=64M",
        ],
        &good_sock,
    );
    let bad_sock = env.path("bad.sock");
    let bad = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            bad_sock.to_str().unwrap(),
            "--filter=error",
            "pattern",
            "size=64M",
            "error-pread=EIO",
            "error-pread-rate=1",
        ],
        &bad_sock,
    );
    let out = env.run(&[
        "backup",
        &format!("good={}", good.uri()),
        &format!("bad={}", bad.uri()),
        "--vault",
        "v",
        "--id",
        "two",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("EIO") && err.contains("bad.sock"), "{err}");
    assert!(!err.to_lowercase().contains("cancel"), "{err}");
    assert!(env.backups().is_empty());
}

#[test]
fn a_reader_away_longer_than_the_deadline_does_not_fail_requests_read_ahead() {
    // The caller is slow here on purpose (the sleep is the behaviour under test): time
    // spent away from the client is not charged to the server's request deadline. (On a
    // local socket the replies are mostly buffered meanwhile, so this guards the rule
    // rather than proving it; the slow-link test below proves queueing is not charged.)
    let env = Env::new();
    let img = env.path("slow.raw");
    let data = random_bytes(16 << 20, 5);
    std::fs::write(&img, &data).unwrap();
    let sock = env.path("slow.sock");
    let srv = Server::qemu_nbd(&img, &sock, &["-f", "raw"]);
    let mut c = NbdClient::connect(&NbdUri::parse(&srv.uri()).unwrap(), &[]).unwrap();
    c.set_request_deadline(std::time::Duration::from_millis(500));
    c.read_ahead(&[blockvault::source::Extent {
        offset: 0,
        length: 16 << 20,
    }]);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..16u64 {
        c.read(i << 20, &mut buf).unwrap();
        assert!(buf == data[(i << 20) as usize..((i + 1) << 20) as usize]);
        if i < 2 {
            std::thread::sleep(std::time::Duration::from_millis(800));
        }
    }
    drop(srv);
}

#[test]
fn requests_queued_behind_others_on_a_slow_server_are_not_charged_for_the_wait() {
    // A real nbdkit that answers one read at a time, each after 300 ms: 8 pieces read
    // ahead take 2.4 s in all, longer than a 1 s deadline, yet each is answered within
    // 300 ms of the previous one, so none has missed it.
    let env = Env::new();
    let sock = env.path("serial.sock");
    let srv = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=noparallel",
            "--filter=delay",
            "pattern",
            "size=8M",
            "delay-read=300ms",
            "serialize=requests",
        ],
        &sock,
    );
    let mut c = NbdClient::connect(&NbdUri::parse(&srv.uri()).unwrap(), &[]).unwrap();
    c.set_request_deadline(std::time::Duration::from_secs(1));
    c.read_ahead(&[blockvault::source::Extent {
        offset: 0,
        length: 8 << 20,
    }]);
    let mut buf = vec![0u8; 8 << 20];
    c.read(0, &mut buf).unwrap();
    for (i, w) in buf.chunks(8).enumerate().step_by(997) {
        assert_eq!(w, (8 * i as u64).to_be_bytes());
    }
}

#[test]
fn an_api_restore_onto_an_nbd_target_that_never_answers_is_cancelled_at_once() {
    // Scripted peer (a real server always answers): it takes the restore's first
    // request and goes silent. The task must let its worker go as soon as it is
    // cancelled, not after the request deadline.
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let img = env.path("d.raw");
    write_raw(&img, 1 << 20, 0, &random_bytes(1 << 20, 41));
    let b = env.backup(&img, "d");
    let sock = env.path("stall.sock");
    let arrived: &'static std::sync::atomic::AtomicBool =
        Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
    let peer = fake_server(&sock, Lie::Stall(arrived));
    let srv = Appliance::start(&env, &[]);
    let to = format!("nbd+unix:///?socket={}", sock.display());
    let t = srv.ok(
        "POST",
        "/restores",
        &admin,
        Some(serde_json::json!({"backup": b["id"], "to": to})),
        202,
    );
    let id = t["task"].as_str().unwrap().to_string();
    let t0 = std::time::Instant::now();
    while !arrived.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "no request came"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let asked = std::time::Instant::now();
    srv.ok("POST", &format!("/tasks/{id}/cancel"), &admin, None, 200);
    let done = srv.wait_task(&admin, &id, std::time::Duration::from_secs(20));
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(3),
        "the cancel took {:?}",
        asked.elapsed()
    );
    // The connection is closed: the scripted peer saw the hang-up and ended.
    let t0 = std::time::Instant::now();
    while !peer.is_finished() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "still connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(srv.stop());
}

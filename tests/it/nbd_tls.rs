//! NBD over TLS against real `qemu-nbd --object tls-creds-x509 --tls-creds` servers with
//! real x509 certificates made by openssl: full and bitmap-incremental backups over
//! `nbds://` byte-exact; a wrong CA, a server without TLS, a TLS-only server asked with
//! `nbd://`, and a missing client certificate are clear errors that store nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::*;

const CHUNK: u64 = 64 << 10;

/// A CA with a server and a client certificate (both naming `localhost` and 127.0.0.1),
/// laid out as qemu's tls-creds-x509 `dir=` wants it: ca-cert.pem, server-cert.pem,
/// server-key.pem, client-cert.pem, client-key.pem.
pub fn make_pki(dir: &Path, ca_name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ca.cnf"),
        format!(
            "[req]\ndistinguished_name=dn\nx509_extensions=v3\nprompt=no\n[dn]\nCN={ca_name}\n\
             [v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\n"
        ),
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend_from_slice(&ec);
    a.extend_from_slice(&[
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "30",
        "-config",
        "ca.cnf",
    ]);
    run(&a);
    for who in ["server", "client"] {
        std::fs::write(
            dir.join(format!("{who}.ext")),
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={who}Auth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
            ),
        )
        .unwrap();
        let (key, csr, cert, ext, subj) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}-cert.pem"),
            format!("{who}.ext"),
            format!("/CN={who}"),
        );
        let mut a = vec!["req"];
        a.extend_from_slice(&ec);
        a.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run(&a);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "30",
            "-extfile",
            &ext,
        ]);
    }
    dir.to_path_buf()
}

/// `qemu-nbd` serving `image` only over TLS with the certificates in `pki`; it requires a
/// client certificate (qemu's default, verify-peer=on).
fn qemu_nbd_tls(image: &Path, sock: &Path, pki: &Path, extra: &[&str]) -> Server {
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        pki.display()
    );
    let mut a = vec!["--object", &obj, "--tls-creds", "tls0"];
    a.extend_from_slice(extra);
    Server::qemu_nbd(image, sock, &a)
}

fn tls_uri(sock: &Path) -> String {
    format!("nbds+unix:///?socket={}", sock.display())
}

/// The client flags for the certificates in `pki`.
fn tls_flags(pki: &Path) -> Vec<String> {
    [
        ("--nbd-tls-ca", "ca-cert.pem"),
        ("--nbd-tls-cert", "client-cert.pem"),
        ("--nbd-tls-key", "client-key.pem"),
    ]
    .iter()
    .flat_map(|(f, n)| [f.to_string(), pki.join(n).display().to_string()])
    .collect()
}

fn backup_args<'a>(uri: &'a str, id: &'a str, flags: &'a [String]) -> Vec<&'a str> {
    let mut a = vec!["backup", uri, "--vault", "v", "--id", id];
    a.extend(flags.iter().map(String::as_str));
    a
}

/// Run a backup that must fail; returns its stderr after checking nothing was stored.
fn refused(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(env.backups().is_empty(), "a refused backup left a backup");
    assert!(
        pack_files(&env.vault_dir()).is_empty(),
        "a refused backup wrote packs"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn full_and_bitmap_incremental_backups_over_nbds_are_byte_exact() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "blockvault test CA");
    let img = env.path("work.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &img).unwrap();
    sh(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b0"],
    );
    let sock = env.path("tls.sock");
    let uri = tls_uri(&sock);
    let mut flags = tls_flags(&pki);
    flags.extend(["--bitmap".to_string(), "b0".to_string()]);
    let full = {
        let _srv = qemu_nbd_tls(&img, &sock, &pki, &["-f", "qcow2", "-B", "b0"]);
        env.json(&backup_args(&uri, "vm1", &flags))
    };
    assert_eq!(s(&full, "kind"), "full");
    assert_eq!(s(&full, "strategy"), "allocation");
    let out0 = env.path("full.raw");
    env.restore(s(&full, "id"), &out0, "raw");
    assert!(images_equal(&fx.join("disk.qcow2"), &out0));

    sh(
        "qemu-img",
        &["bitmap", "--clear", img.to_str().unwrap(), "b0"],
    );
    for cmd in ["write -P 0x31 2M 64k", "write -P 0x32 40M 4k"] {
        sh(
            "qemu-io",
            &["-f", "qcow2", "-c", cmd, img.to_str().unwrap()],
        );
    }
    let inc = {
        let _srv = qemu_nbd_tls(&img, &sock, &pki, &["-f", "qcow2", "-B", "b0"]);
        env.json(&backup_args(&uri, "vm1", &flags))
    };
    assert_eq!(s(&inc, "kind"), "incremental", "{inc}");
    assert_eq!(s(&inc, "strategy"), "bitmap");
    assert_eq!(u(&inc, "bytes_read"), 2 * CHUNK, "{inc}");
    let out = env.path("inc.qcow2");
    env.restore(s(&inc, "id"), &out, "qcow2");
    assert!(images_equal(&img, &out));
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn nbds_over_tcp_verifies_the_ip_address_and_names_the_server_by_hostname_flag() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "tcp CA");
    let port = free_port();
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        pki.display()
    );
    let port_s = port.to_string();
    let img = fx.join("disk.qcow2");
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-r", "-b", "127.0.0.1", "-p", &port_s, "-x", "disk"])
        .args(["--object", &obj, "--tls-creds", "tls0", "-f", "qcow2"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed().as_secs() < 20, "qemu-nbd did not listen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let flags = tls_flags(&pki);
    let uri = format!("nbds://127.0.0.1:{port}/disk");
    let b = env.json(&backup_args(&uri, "tcp", &flags));
    let out = env.path("tcp.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&img, &out));
    // A host name the certificate does not carry is refused.
    let mut bad = flags.clone();
    bad.extend(["--nbd-tls-hostname".into(), "nas.example".into()]);
    let out = env.run(&backup_args(&uri, "tcp2", &bad));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nas.example"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_wrong_ca_is_refused_and_nothing_is_stored() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "the server's CA");
    let other = make_pki(&env.path("other"), "someone else's CA");
    let sock = env.path("tls.sock");
    let _srv = qemu_nbd_tls(&fx.join("disk.qcow2"), &sock, &pki, &["-f", "qcow2"]);
    let flags = tls_flags(&other);
    let err = refused(&env, &backup_args(&tls_uri(&sock), "w", &flags));
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(err.contains("--nbd-tls-ca"), "{err}");
    // No CA at all: told to give one.
    let err = refused(&env, &backup_args(&tls_uri(&sock), "w", &[]));
    assert!(err.contains("--nbd-tls-ca"), "{err}");
}

#[test]
fn a_server_without_tls_is_refused_when_nbds_was_asked() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "CA");
    let sock = env.path("plain.sock");
    let _srv = Server::qemu_nbd(&fx.join("disk.qcow2"), &sock, &["-f", "qcow2"]);
    let flags = tls_flags(&pki);
    let err = refused(&env, &backup_args(&tls_uri(&sock), "p", &flags));
    assert!(err.contains("does not offer TLS"), "{err}");
    // TLS settings with a plain nbd:// URI are refused too, not ignored.
    let plain = format!("nbd+unix:///?socket={}", sock.display());
    let err = refused(&env, &backup_args(&plain, "p", &flags));
    assert!(err.contains("nbds://"), "{err}");
}

#[test]
fn a_tls_only_server_asked_with_nbd_says_to_use_nbds() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "CA");
    let sock = env.path("tls.sock");
    let _srv = qemu_nbd_tls(&fx.join("disk.qcow2"), &sock, &pki, &["-f", "qcow2"]);
    let plain = format!("nbd+unix:///?socket={}", sock.display());
    let err = refused(&env, &["backup", &plain, "--vault", "v", "--id", "t"]);
    assert!(err.contains("requires TLS"), "{err}");
    assert!(err.contains("nbds://"), "{err}");
}

#[test]
fn a_server_that_wants_a_client_certificate_says_so_when_none_is_given() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "CA");
    let sock = env.path("tls.sock");
    let _srv = qemu_nbd_tls(&fx.join("disk.qcow2"), &sock, &pki, &["-f", "qcow2"]);
    let ca = vec![
        "--nbd-tls-ca".to_string(),
        pki.join("ca-cert.pem").display().to_string(),
    ];
    let err = refused(&env, &backup_args(&tls_uri(&sock), "c", &ca));
    assert!(err.contains("--nbd-tls-cert"), "{err}");
}

/// `blockvault serve-nbd` with TLS, killed when dropped; `uri` is the line it printed.
struct ServeNbd {
    child: std::process::Child,
    uri: String,
}

impl Drop for ServeNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_nbd_tls(env: &Env, backup: &str, sock: &Path, pki: &Path) -> ServeNbd {
    use std::io::BufRead;
    let listen = format!("unix:{}", sock.display());
    let (cert, key, ca) = (
        pki.join("server-cert.pem"),
        pki.join("server-key.pem"),
        pki.join("ca-cert.pem"),
    );
    let mut child = env
        .cmd()
        .args(["serve-nbd", backup, "--listen", &listen])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--tls-ca")
        .arg(&ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The URI is printed once the socket listens.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    ServeNbd {
        child,
        uri: line.trim().to_string(),
    }
}

#[test]
fn serve_nbd_with_tls_is_read_byte_exact_by_qemu_img_and_refuses_plain_clients() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "serve CA");
    let img = fx.join("disk.qcow2");
    let b = env.backup(&img, "d");
    let sock = env.path("serve.sock");
    let srv = serve_nbd_tls(&env, s(&b, "id"), &sock, &pki);
    assert!(srv.uri.starts_with("nbds+unix://"), "{}", srv.uri);

    // qemu's own NBD client, over TLS with its client certificate (pki holds
    // ca-cert.pem, client-cert.pem, client-key.pem).
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    let nbd = format!(
        "driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    );
    let file = format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        img.display()
    );
    let out = Command::new("qemu-img")
        .args(["compare", "--object", &obj, "--image-opts", &nbd, &file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare over TLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A plain client gets no export.
    let plain = format!("nbd+unix:///?socket={}", sock.display());
    let out = Command::new("qemu-img")
        .args(["info", &plain])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Our own client over nbds:// reads it back too (a backup of the served backup).
    let env2 = Env::new();
    let flags = tls_flags(&pki);
    let b2 = env2.json(&backup_args(&srv.uri, "again", &flags));
    let out = env2.path("again.raw");
    env2.restore(s(&b2, "id"), &out, "raw");
    assert!(images_equal(&img, &out));
    // Without a client certificate, --tls-ca refuses it.
    let ca = vec![
        "--nbd-tls-ca".to_string(),
        pki.join("ca-cert.pem").display().to_string(),
    ];
    let err = refused(&Env::new(), &backup_args(&srv.uri, "nocert", &ca));
    assert!(err.contains("TLS"), "{err}");
}

/// `restore --to nbds://…` writes the backup onto a TLS-only writable export; without the
/// CA the restore is refused before anything is written.
#[test]
fn a_restore_onto_an_nbds_target_is_byte_exact_and_needs_the_ca() {
    let fx = fixtures();
    let env = Env::new();
    let pki = make_pki(&env.path("pki"), "blockvault test CA");
    let src = fx.join("disk.qcow2");
    let b = env.json(&[
        "backup",
        src.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "vm1",
    ]);
    let target = env.path("target.qcow2");
    let size = u(&b["disks"][0], "size").to_string();
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            target.to_str().unwrap(),
            &size,
        ],
    );
    let blank = std::fs::read(&target).unwrap();
    let sock = env.path("w.sock");
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        pki.display()
    );
    let s_sock = sock.display().to_string();
    let s_target = target.display().to_string();
    let uri = tls_uri(&sock);
    // qemu-nbd serving the target writable, only over TLS.
    let serve_target = || {
        Server::start(
            "qemu-nbd",
            &[
                "-t",
                "-k",
                &s_sock,
                "--object",
                &obj,
                "--tls-creds",
                "tls0",
                "-f",
                "qcow2",
                &s_target,
            ],
            &sock,
        )
    };
    {
        let _srv = serve_target();
        let out = env.run(&["restore", s(&b, "id"), "--to", &uri]);
        assert!(
            !out.status.success(),
            "a restore onto nbds:// without a CA ran"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--nbd-tls-ca"), "{err}");
    }
    assert_eq!(
        std::fs::read(&target).unwrap(),
        blank,
        "the refused restore wrote"
    );
    {
        let _srv = serve_target();
        let mut args = vec!["restore", s(&b, "id"), "--to", &uri];
        let flags = tls_flags(&pki);
        args.extend(flags.iter().map(String::as_str));
        let r = env.json(&args);
        assert!(u(&r, "chunks_written") > 0, "{r}");
    }
    assert!(images_equal(&src, &target));
}

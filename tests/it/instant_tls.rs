//! Instant access as `[instant]` configures it, against a real `blockvault serve`: exports
//! on a port range with NBD-TLS (forced on loopback with `tls = true`, the only address a
//! test can honestly own) read byte-exact by real `qemu-img` with `--object
//! tls-creds-x509`; the answer's command line run as given; a plain client and a wrong
//! export name refused; the range exhausted → a clear 409 and no thread left behind;
//! client certificates required with `client_ca`; plain NBD on a non-loopback listen
//! refused when the config is loaded.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::*;

/// Two consecutive free ports on 127.0.0.1 (checked by binding them, then released).
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let lo = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if lo < 65535
            && TcpListener::bind(("127.0.0.1", lo)).is_ok()
            && TcpListener::bind(("127.0.0.1", lo + 1)).is_ok()
        {
            return lo;
        }
    }
    panic!("no two consecutive free ports on 127.0.0.1");
}

/// Threads of process `pid` whose name starts with `prefix` (export threads are named
/// `instant-ID`).
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

fn said(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// `qemu-img ARGS` with a TLS client object reading `pki` (ca-cert.pem, and a client
/// certificate if there is one).
fn qemu_img_tls(pki: &Path, args: &[&str]) -> Output {
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    Command::new("qemu-img")
        .arg(args[0])
        .args(["--object", &obj])
        .args(&args[1..])
        .output()
        .unwrap()
}

/// `--image-opts` of the export in view `e`, under export name `export`.
fn nbd_opts(e: &Value, export: &str) -> String {
    format!(
        "driver=nbd,host={},port={},export={export},tls-creds=tls0",
        s(e, "host"),
        u(e, "port")
    )
}

/// An appliance with `[instant]` set to `instant`, and a backup of a 24 MiB qcow2 with
/// data in two places; returns (appliance, operator token, source image, backup id).
fn serve_with_backup(env: &Env, instant: &str) -> (Appliance, String, std::path::PathBuf, String) {
    let admin = token(env, "admin", "root");
    let op = token(env, "operator", "ops");
    let img = env.path("web.qcow2");
    let img_s = img.to_str().unwrap();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "24M"]);
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 3M", img_s],
    );
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xa5 20M 64k", img_s],
    );
    let cfg = env.path("instant.toml");
    std::fs::write(&cfg, format!("[instant]\n{instant}")).unwrap();
    let srv = Appliance::start(env, &["--config", cfg.to_str().unwrap()]);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "web", "kind": "disk", "sources": [img_s], "vault": "v"})),
        201,
    );
    let backup = srv.backup_now(&op, "web", Duration::from_secs(60));
    (srv, op, img, backup)
}

#[test]
fn an_export_over_tls_on_a_port_range_reads_byte_exact_and_refuses_plain_clients_and_wrong_names() {
    let env = Env::new();
    let lo = free_port_pair();
    let hi = lo + 1;
    let (srv, op, img, backup) =
        serve_with_backup(&env, &format!("ports = \"{lo}-{hi}\"\ntls = true\n"));
    let img_s = img.to_str().unwrap();

    // The first port of the range is taken by someone else: the export gets the next.
    let squatter = TcpListener::bind(("127.0.0.1", lo)).unwrap();
    let e = srv.ok(
        "POST",
        "/instant",
        &op,
        Some(json!({"backup": backup})),
        201,
    );
    assert_eq!(u(&e, "port"), u64::from(hi), "{e}");
    let export = s(&e, "export").to_string();
    assert!(
        export.len() == 32 && export.chars().all(|c| c.is_ascii_hexdigit()),
        "the export name is not 128 hex bits: {export}"
    );
    assert_eq!(s(&e, "uri"), format!("nbds://127.0.0.1:{hi}/{export}"));
    // The fingerprint is the served certificate's, as openssl computes it.
    let cert = env.data().join("tls/nbd-cert.pem");
    let fp = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp.trim().rsplit('=').next().unwrap();
    assert_eq!(s(&e["tls"], "fingerprint"), fp, "{e}");
    assert_eq!(
        s(&e["tls"], "certificate"),
        std::fs::read_to_string(&cert).unwrap()
    );
    let listed = srv.ok("GET", "/instant", &op, None, 200);
    assert_eq!(listed[0]["uri"], e["uri"], "{listed}");
    assert_eq!(listed[0]["command"], e["command"], "{listed}");

    // Real qemu-img over TLS, trusting the certificate the answer carries: byte-exact.
    let pki = env.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca-cert.pem"), s(&e["tls"], "certificate")).unwrap();
    let file = format!("driver=qcow2,file.driver=file,file.filename={img_s}");
    let out = qemu_img_tls(
        &pki,
        &["compare", "--image-opts", &nbd_opts(&e, &export), &file],
    );
    assert!(
        out.status.success(),
        "qemu-img compare over TLS: {}",
        said(&out)
    );

    // The command line of the answer, pasted into a shell as it is, copies the disk.
    let work = env.path("client");
    std::fs::create_dir_all(&work).unwrap();
    let run = Command::new("sh")
        .args(["-c", s(&e, "command")])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}: {}", s(&e, "command"), said(&run));
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            img_s,
            work.join("copy.qcow2").to_str().unwrap(),
        ],
    );

    // A plain client gets nothing: TLS is required before the export is named.
    let plain = format!("nbd://127.0.0.1:{hi}/{export}");
    let out = Command::new("qemu-img")
        .args(["info", &plain])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plain client read the export");
    assert!(said(&out).contains("TLS"), "{}", said(&out));
    // Over TLS, a wrong export name and the default (empty) one are refused.
    for name in ["0123456789abcdef0123456789abcdef", ""] {
        let out = qemu_img_tls(&pki, &["info", "--image-opts", &nbd_opts(&e, name)]);
        assert!(!out.status.success(), "export {name:?} was served");
        assert!(said(&out).contains("export"), "{name:?}: {}", said(&out));
    }

    // Every port of the range in use: a clear 409 in the one error shape, no thread left.
    let pid = srv.pid();
    assert_eq!(threads_named(pid, "instant-"), 1);
    let (st, v) = srv.call(
        "POST",
        "/instant",
        Some(&op),
        Some(json!({"backup": backup})),
    );
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["error"]["kind"], "conflict", "{v}");
    let msg = s(&v["error"], "message");
    assert!(
        msg.contains(&format!("{lo}-{hi}")) && msg.contains("[instant] ports"),
        "{msg}"
    );
    assert_eq!(threads_named(pid, "instant-"), 1);
    assert_eq!(
        srv.ok("GET", "/instant", &op, None, 200)
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The port freed, the next export takes it, under a name of its own.
    drop(squatter);
    let e2 = srv.ok(
        "POST",
        "/instant",
        &op,
        Some(json!({"backup": backup})),
        201,
    );
    assert_eq!(u(&e2, "port"), u64::from(lo), "{e2}");
    assert_ne!(s(&e2, "export"), export);
    assert_eq!(threads_named(pid, "instant-"), 2);
    for x in [&e, &e2] {
        srv.ok(
            "DELETE",
            &format!("/instant/{}", s(x, "id")),
            &op,
            None,
            200,
        );
    }
    assert_eq!(threads_named(pid, "instant-"), 0);
    assert!(srv.stop(), "serve did not exit cleanly");
}

#[test]
fn with_client_ca_an_export_wants_a_client_certificate_signed_by_it() {
    let env = Env::new();
    let clients = crate::nbd_tls::make_pki(&env.path("clients"), "clients CA");
    let (srv, op, img, backup) = serve_with_backup(
        &env,
        &format!(
            "tls = true\nclient_ca = \"{}\"\n",
            clients.join("ca-cert.pem").display()
        ),
    );
    let e = srv.ok(
        "POST",
        "/instant",
        &op,
        Some(json!({"backup": backup})),
        201,
    );
    assert_eq!(e["tls"]["client_certificate_required"], true, "{e}");
    let export = s(&e, "export").to_string();
    // Trusting the appliance but without a client certificate: refused.
    let pki = env.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca-cert.pem"), s(&e["tls"], "certificate")).unwrap();
    let out = qemu_img_tls(&pki, &["info", "--image-opts", &nbd_opts(&e, &export)]);
    assert!(!out.status.success(), "served without a client certificate");
    // With one signed by the client CA: the answer's command, run in a dir that holds
    // blockvault-pki/client-cert.pem and client-key.pem, copies the disk byte-exact.
    let work = env.path("client");
    let dir = work.join("blockvault-pki");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(clients.join(f), dir.join(f)).unwrap();
    }
    let run = Command::new("sh")
        .args(["-c", s(&e, "command")])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}: {}", s(&e, "command"), said(&run));
    let copy = work.join("copy.qcow2");
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            img.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    );
    // And qemu-img compare over the same credentials.
    let file = format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        img.display()
    );
    let out = qemu_img_tls(
        &dir,
        &["compare", "--image-opts", &nbd_opts(&e, &export), &file],
    );
    assert!(
        out.status.success(),
        "qemu-img compare with a client certificate: {}",
        said(&out)
    );
    assert!(srv.stop(), "serve did not exit cleanly");
}

#[test]
fn plain_nbd_on_a_non_loopback_listen_is_refused_when_the_config_is_loaded() {
    let env = Env::new();
    let cfg = env.path("plain.toml");
    std::fs::write(
        &cfg,
        "[instant]\nlisten = \"0.0.0.0\"\nports = \"10809-10824\"\ntls = false\n",
    )
    .unwrap();
    let out = env
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started: {}", said(&out));
    let err = said(&out);
    assert!(
        err.contains("plain NBD")
            && err.contains("[instant] tls = false")
            && err.contains("plain.toml"),
        "{err}"
    );
    // Nothing was made: no certificate, no catalog beyond what the vault creation wrote.
    assert!(
        !env.data().join("tls").exists(),
        "serve wrote its certificate"
    );
}

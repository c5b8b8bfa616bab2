//! TLS on the admin port (issue 14 item 3), against a real `blockvault serve` and real
//! TLS clients (the CLI's rustls, curl, openssl).

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::appliance::{Appliance, token};
use crate::common::Env;

/// `blockvault --server URL --token T [extra] vault list` from a client without a data dir.
fn vault_list(url: &str, tok: &str, extra: &[&str]) -> Output {
    Env::bare()
        .cmd()
        .args(["--server", url, "--token", tok])
        .args(extra)
        .args(["vault", "list"])
        .env_remove("BLOCKVAULT_FINGERPRINT")
        .env_remove("BLOCKVAULT_CA")
        .output()
        .expect("running blockvault")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `openssl x509 -noout -fingerprint -sha256` of `cert`, without its prefix.
fn openssl_fingerprint(cert: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .split_once('=')
        .expect("openssl's Fingerprint= line")
        .1
        .to_string()
}

/// Requests to `path` recorded in the audit log.
fn audited(srv: &Appliance, admin: &str, path: &str) -> usize {
    let log = srv.ok("GET", "/audit", admin, None, 200);
    log.as_array()
        .unwrap()
        .iter()
        .filter(|e| e.to_string().contains(path))
        .count()
}

#[test]
fn serve_makes_a_self_signed_certificate_whose_fingerprint_the_cli_pins_and_openssl_agrees() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let printed = srv.fingerprint.clone().unwrap();
    let cert = env.data().join("tls/cert.pem");
    let key = env.data().join("tls/key.pem");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "key.pem mode {mode:o}");
    // `tls fingerprint` on the data dir and on the file: the openssl form, uppercase.
    let by_data = env.ok(&["tls", "fingerprint"]);
    let by_file = env.ok(&["tls", "fingerprint", "--cert", cert.to_str().unwrap()]);
    let by_data = String::from_utf8_lossy(&by_data.stdout).trim().to_string();
    assert_eq!(by_data, String::from_utf8_lossy(&by_file.stdout).trim());
    assert_eq!(by_data, openssl_fingerprint(&cert));
    assert_eq!(by_data, printed);
    assert_eq!(by_data, by_data.to_uppercase());
    // The SANs name loopback and localhost, so curl verifies it with --cacert.
    let curl = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&cert)
        .args(["-H", &format!("Authorization: Bearer {admin}")])
        .arg(format!("{}/api/v1/health", srv.url))
        .output()
        .unwrap();
    assert!(curl.status.success(), "{curl:?}");
    let health: Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(health["status"], "ok");
    // The CLI with the pinned fingerprint (any case, colons optional), or with the
    // certificate as its CA.
    let lower = printed.replace(':', "").to_lowercase();
    for extra in [
        vec!["--fingerprint", printed.as_str()],
        vec!["--fingerprint", lower.as_str()],
        vec!["--ca", cert.to_str().unwrap()],
    ] {
        let out = vault_list(&srv.url, &admin, &extra);
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
    }
    // A second start keeps the certificate: pinned clients keep working.
    assert!(srv.stop());
    let again = Appliance::start(&env, &[]);
    assert_eq!(again.fingerprint.as_deref(), Some(printed.as_str()));
}

#[test]
fn a_wrong_fingerprint_is_refused_naming_both_and_the_appliance_sees_no_request() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let real = srv.fingerprint.clone().unwrap();
    let wrong = format!("00{}", &real[2..]);
    let out = vault_list(&srv.url, &admin, &["--fingerprint", &wrong]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert!(err.contains(&real) && err.contains(&wrong), "{err}");
    assert!(err.contains("nothing was sent"), "{err}");
    // The token never reached a handler: no GET /vaults in the audit log.
    assert_eq!(audited(&srv, &admin, "/vaults"), 0);
    // The same through the environment variable; then the right one works and is audited.
    let out = Env::bare()
        .cmd()
        .args(["--server", &srv.url, "--token", &admin, "vault", "list"])
        .env("BLOCKVAULT_FINGERPRINT", &wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert_eq!(audited(&srv, &admin, "/vaults"), 0);
    let out = vault_list(&srv.url, &admin, &["--fingerprint", &real]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(audited(&srv, &admin, "/vaults"), 1);
}

#[test]
fn a_self_signed_certificate_without_fingerprint_or_ca_is_refused_with_what_to_do() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let out = vault_list(&srv.url, &admin, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert!(
        err.contains("not trusted")
            && err.contains("--fingerprint")
            && err.contains("--ca")
            && err.contains(srv.fingerprint.as_deref().unwrap()),
        "{err}"
    );
    // A CA file that did not sign it is refused too.
    let other = Env::new();
    let other_srv = Appliance::start(&other, &[]);
    let other_cert = other.data().join("tls/cert.pem");
    let out = vault_list(&srv.url, &admin, &["--ca", other_cert.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert!(stderr(&out).contains("not trusted"), "{}", stderr(&out));
    assert_eq!(audited(&srv, &admin, "/vaults"), 0);
    drop(other_srv);
}

#[test]
fn plain_http_to_the_https_port_and_https_to_a_plain_http_port_are_each_named() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let plain_url = srv.url.replacen("https://", "http://", 1);
    let out = vault_list(&plain_url, &admin, &[]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("this port speaks HTTPS"), "{err}");
    assert_eq!(audited(&srv, &admin, "/vaults"), 0);
    drop(srv);

    let plain_env = Env::new();
    let admin = token(&plain_env, "admin", "root");
    let plain = Appliance::start(&plain_env, &["--plain-http"]);
    assert!(plain.url.starts_with("http://127.0.0.1:"), "{}", plain.url);
    assert!(!plain_env.data().join("tls").exists());
    let tls_url = plain.url.replacen("http://", "https://", 1);
    let out = vault_list(
        &tls_url,
        &admin,
        &["--fingerprint", &"AB:".repeat(32)[..95]],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert!(err.contains("does not speak TLS"), "{err}");
    // Plain HTTP on loopback, as asked, works.
    let out = vault_list(&plain.url, &admin, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn plain_http_on_a_non_loopback_address_is_refused_and_nothing_is_written() {
    let env = Env::bare();
    for (args, what) in [
        (
            vec!["--plain-http", "--listen", "0.0.0.0:0"],
            "--plain-http",
        ),
        (vec!["--listen", "0.0.0.0:0"], "config"),
    ] {
        let mut cmd = env.cmd();
        cmd.arg("serve").args(&args);
        if what == "config" {
            let cfg = env.path("bv.toml");
            std::fs::write(&cfg, "[server]\nplain_http = true\n").unwrap();
            cmd.arg("--config").arg(&cfg);
        }
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains("loopback"), "{what}: {err}");
        assert!(out.stdout.is_empty(), "{what}: it must not say it listens");
        assert!(!env.data().exists(), "{what}: the data dir was touched");
    }
}

#[test]
fn a_token_never_goes_in_clear_to_a_non_loopback_address() {
    // `.invalid` never resolves: had the refusal failed, nothing would leave the machine.
    for url in [
        "http://appliance.invalid:8420",
        "http://user@appliance.invalid",
    ] {
        let out = vault_list(url, "secret-token", &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert!(err.contains("in clear"), "{url}: {err}");
        assert!(!err.contains("secret-token"), "{url}: {err}");
    }
}

#[test]
fn the_administrators_own_certificate_and_key_are_served() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    // The administrator's own CA, and a certificate for the appliance signed by it.
    let (ca, ca_key) = (env.path("ca.crt"), env.path("ca.key"));
    let (cert, key, csr) = (
        env.path("own.crt"),
        env.path("own.key"),
        env.path("own.csr"),
    );
    let ext = env.path("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let p = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=admin CA"],
        ]
        .concat()
        .into_iter()
        .chain(["-keyout", &p(&ca_key), "-out", &p(&ca)])
        .collect::<Vec<_>>(),
    );
    openssl(
        &[&["req"][..], &ec, &["-subj", "/CN=appliance"]]
            .concat()
            .into_iter()
            .chain(["-keyout", &p(&key), "-out", &p(&csr)])
            .collect::<Vec<_>>(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    let srv = Appliance::start(
        &env,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(srv.fingerprint.clone().unwrap(), openssl_fingerprint(&cert));
    assert!(
        !env.data().join("tls").exists(),
        "no self-signed certificate made"
    );
    let out = vault_list(&srv.url, &admin, &["--ca", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A key that is not the certificate's is refused at start.
    let other = env.path("other.key");
    let st = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&other)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    drop(srv);
    let out = env
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("own.crt"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

#[test]
fn an_idle_connection_to_the_https_port_is_closed_after_the_header_timeout() {
    let env = Env::new();
    let cfg = env.path("bv.toml");
    std::fs::write(&cfg, "[server]\nheader_timeout_seconds = 2\n").unwrap();
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap()]);
    let addr = srv.url.strip_prefix("https://").unwrap().to_string();
    let t0 = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    let closed = t0.elapsed();
    assert_eq!(
        n, 0,
        "the server sent bytes to a connection that asked nothing"
    );
    assert!(
        closed >= Duration::from_millis(1500) && closed < Duration::from_secs(20),
        "closed after {closed:?}, not after the 2 s header timeout"
    );
}

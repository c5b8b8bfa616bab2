//! Instant access through the API (`/api/v1/instant`): a real `blockvault serve` serves
//! a backup's disk over NBD; `qemu-img compare` reads it against the source image, a
//! write through `qemu-io` is refused and nothing in the vault changes, stopping closes
//! the port, and the service's shutdown stops every export.

use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::*;

/// The TCP address in an `nbd://HOST:PORT/EXPORT` URI.
fn addr_of(uri: &str) -> String {
    uri.strip_prefix("nbd://")
        .or_else(|| uri.strip_prefix("nbds://"))
        .and_then(|r| r.split_once('/'))
        .map(|(a, _)| a)
        .unwrap_or_else(|| panic!("not an nbd(s)://HOST:PORT/EXPORT URI: {uri}"))
        .to_string()
}

/// Every file under the vault with its bytes: what the vault holds.
fn vault_state(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            // The lookup cache and the lock/pin files are not the backup.
            if p.ends_with("cache") || p.ends_with("locks") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn an_instant_access_export_started_through_the_api_reads_byte_exact_and_stop_closes_its_port() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    let aud = token(&env, "auditor", "eyes");
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
    let srv = Appliance::start(&env, &[]);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "web", "kind": "disk", "sources": [img_s], "vault": "v"})),
        201,
    );
    let backup = srv.backup_now(&op, "web", Duration::from_secs(60));

    // An auditor may list but not start; an unknown backup or disk is a clear 404.
    let (st, v) = srv.call(
        "POST",
        "/instant",
        Some(&aud),
        Some(json!({"backup": backup})),
    );
    assert_eq!(st, 403, "{v}");
    let (st, v) = srv.call(
        "POST",
        "/instant",
        Some(&op),
        Some(json!({"backup": "nope"})),
    );
    assert_eq!(st, 404, "{v}");
    let (st, v) = srv.call(
        "POST",
        "/instant",
        Some(&op),
        Some(json!({"backup": backup, "disk": "nope"})),
    );
    assert_eq!(st, 404, "{v}");
    assert!(v.to_string().contains("no disk"), "{v}");
    assert_eq!(srv.ok("GET", "/instant", &aud, None, 200), json!([]));

    let before = vault_state(&env.vault_dir());
    let e = srv.ok(
        "POST",
        "/instant",
        &op,
        Some(json!({"backup": backup})),
        201,
    );
    assert_eq!(e["state"], "running", "{e}");
    assert_eq!(e["backup"], backup.as_str(), "{e}");
    assert_eq!(e["size"], 24u64 << 20, "{e}");
    let uri = s(&e, "uri").to_string();
    let id = s(&e, "id").to_string();
    let listed = srv.ok("GET", "/instant", &op, None, 200);
    let listed: &Vec<Value> = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["uri"], uri.as_str());
    // An auditor sees the export but not its name: the name opens the backup.
    let export = s(&e, "export").to_string();
    let seen = srv.ok("GET", "/instant", &aud, None, 200);
    assert_eq!(seen[0]["id"], id.as_str(), "{seen}");
    assert!(
        !seen.to_string().contains(&export),
        "an auditor got the name: {seen}"
    );
    assert!(seen[0]["command"].is_null(), "{seen}");

    // Byte-exact against the source, read over NBD by qemu-img.
    sh(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", img_s, &uri],
    );
    // A write is refused, and nothing in the vault changed.
    let w = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 64k", &uri])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success() || said.contains("failed") || said.contains("read-only"),
        "a write through the export was not refused: {said}"
    );
    sh(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", img_s, &uri],
    );

    // Stop: the answer comes once the port is closed.
    let addr = addr_of(&uri);
    assert!(TcpStream::connect(&addr).is_ok());
    let (st, v) = srv.call("DELETE", &format!("/instant/{id}"), Some(&aud), None);
    assert_eq!(st, 403, "{v}");
    let stopped = srv.ok("DELETE", &format!("/instant/{id}"), &op, None, 200);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "{addr} still accepts connections after the stop"
    );
    assert_eq!(srv.ok("GET", "/instant", &aud, None, 200), json!([]));
    let (st, v) = srv.call("DELETE", &format!("/instant/{id}"), Some(&op), None);
    assert_eq!(st, 404, "{v}");
    assert!(
        before == vault_state(&env.vault_dir()),
        "the vault changed while its backup was served"
    );

    // The service's shutdown stops every export.
    let e = srv.ok(
        "POST",
        "/instant",
        &op,
        Some(json!({"backup": backup})),
        201,
    );
    let addr = addr_of(s(&e, "uri"));
    assert!(TcpStream::connect(&addr).is_ok());
    assert!(srv.stop(), "serve did not exit cleanly");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "{addr} still accepts connections after the service stopped"
    );
}

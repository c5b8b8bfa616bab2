//! Least privilege for API callers (issue 16 items 4 and 5), against a real
//! `blockvault serve` over HTTPS with its default `[paths]` (`<data>/images` for
//! sources, `<data>/restored` for restores; no NBD hosts, sockets or libvirt domains).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, images_equal, random_bytes, write_raw};

/// Access time of `p` in nanoseconds (set into the past first by [`age`]).
fn atime(p: &Path) -> i64 {
    let m = std::fs::symlink_metadata(p).unwrap();
    m.atime() * 1_000_000_000 + m.atime_nsec()
}

/// Put the access time of `p` before its modification time, so that any read of it
/// moves the access time even on a `relatime` mount.
fn age(p: &Path) {
    let st = std::process::Command::new("touch")
        .args(["-a", "-d", "2001-01-01"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Every file below `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn hostile_paths_sockets_and_hosts_are_refused_and_nothing_is_read_or_written() {
    let env = Env::new();
    let data = env.data();
    let images = data.join("images");
    let restored = data.join("restored");
    std::fs::create_dir_all(&images).unwrap();
    // A disk the administrator placed where API callers may read it, backed up once.
    let disk = images.join("ok.raw");
    write_raw(&disk, 4 << 20, 1 << 20, &random_bytes(256 << 10, 7));
    let b = env.backup(&disk, "ok");
    let backup = b["id"].as_str().unwrap().to_string();
    // Host files an API caller must never get at.
    let secret = env.path("secret.raw");
    write_raw(&secret, 1 << 20, 0, b"the host's secret");
    let catalog = data.join("catalog.sqlite");
    std::os::unix::fs::symlink(&secret, images.join("link-out.raw")).unwrap();
    std::fs::create_dir_all(&restored).unwrap();
    let theirs = restored.join("exists.raw");
    std::fs::write(&theirs, b"somebody's file").unwrap();
    std::os::unix::fs::symlink(&secret, restored.join("link-out.raw")).unwrap();

    let srv = Appliance::start_confined(&env, &[]);
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    // (The catalog is the service's own file: it reads it all the time.)
    for p in [&secret, &theirs] {
        age(p);
    }
    let before: Vec<(PathBuf, i64)> = [&secret, &theirs]
        .iter()
        .map(|p| (p.to_path_buf(), atime(p)))
        .collect();
    let secret_bytes = std::fs::read(&secret).unwrap();
    let tasks_before = srv.ok("GET", "/tasks", &admin, None, 200);
    age(&secret);
    let before_secret = atime(&secret);

    let s = |p: &Path| p.display().to_string();
    let res = |src: String| json!({"name": "r", "kind": "disk", "sources": [src], "vault": "v"});
    let restore = |to: String| json!({"backup": backup, "to": to});
    // (who, method, path, body, status, words of the error)
    let table: Vec<(&str, &str, &str, Value, u16, &str)> = vec![
        (
            "admin",
            "POST",
            "/resources",
            res("/proc/self/environ".into()),
            403,
            "outside",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res(s(&catalog)),
            403,
            "outside",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res(s(&secret)),
            403,
            "outside",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res(format!("raw:{}", s(&secret))),
            403,
            "outside",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res(format!("{}/../catalog.sqlite", s(&images))),
            403,
            "..",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res(s(&images.join("link-out.raw"))),
            403,
            "outside",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res("ok.raw".into()),
            400,
            "absolute",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res("nbd://127.0.0.1:9/x".into()),
            403,
            "nbd_hosts",
        ),
        (
            "admin",
            "POST",
            "/resources",
            res(format!("nbd+unix:///x?socket={}", s(&env.path("s.sock")))),
            403,
            "outside",
        ),
        (
            "admin",
            "POST",
            "/resources",
            json!({"name": "r", "kind": "server", "sources": [format!("qmp:{}", s(&env.path("q.sock")))], "vault": "v"}),
            403,
            "qmp_sockets",
        ),
        (
            "admin",
            "POST",
            "/resources",
            json!({"name": "r", "kind": "server", "sources": ["libvirt:web"], "vault": "v"}),
            403,
            "libvirt_domains",
        ),
        (
            "admin",
            "POST",
            "/resources",
            json!({"name": "r", "kind": "server", "sources": [s(&disk)], "vault": "v", "qga": s(&env.path("qga.sock"))}),
            403,
            "qmp_sockets",
        ),
        (
            "admin",
            "POST",
            "/resources",
            json!({"name": "r", "kind": "server", "sources": [s(&disk)], "vault": "v", "freeze": "rm -rf /"}),
            400,
            "config file",
        ),
        (
            "admin",
            "POST",
            "/resources",
            json!({"name": "..", "kind": "disk", "sources": [s(&disk)], "vault": "v"}),
            400,
            "not valid",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore(s(&env.path("out.raw"))),
            403,
            "outside",
        ),
        (
            "op",
            "POST",
            "/restores",
            json!({"backup": backup, "to": s(&theirs), "overwrite": true}),
            403,
            "only an admin",
        ),
        (
            "admin",
            "POST",
            "/restores",
            json!({"backup": backup, "to": s(&restored.join("link-out.raw")), "overwrite": true}),
            403,
            "symbolic link",
        ),
        (
            "admin",
            "POST",
            "/restores",
            json!({"backup": backup, "to": s(&secret), "overwrite": true}),
            403,
            "outside",
        ),
        (
            "admin",
            "POST",
            "/restores",
            json!({"backup": backup, "to": "nbds://127.0.0.1:1/x",
                   "nbd_tls": {"ca": s(&data.join("tls").join("key.pem"))}}),
            403,
            "nbd_tls",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore("/proc/self/environ".into()),
            403,
            "outside",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore(s(&catalog)),
            403,
            "outside",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore(format!("{}/../escape.raw", s(&restored))),
            403,
            "..",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore(s(&restored.join("link-out.raw"))),
            403,
            "symbolic link",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore(s(&theirs)),
            409,
            "never overwrites",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore("new.raw".into()),
            400,
            "absolute",
        ),
        (
            "op",
            "POST",
            "/restores",
            restore("nbd://127.0.0.1:9/x".into()),
            403,
            "nbd_hosts",
        ),
        (
            "admin",
            "POST",
            "/vaults",
            json!({"name": ".."}),
            400,
            "not valid",
        ),
        (
            "admin",
            "POST",
            "/vaults",
            json!({"name": "."}),
            400,
            "not valid",
        ),
        (
            "admin",
            "POST",
            "/vaults",
            json!({"name": ""}),
            400,
            "not valid",
        ),
        (
            "admin",
            "POST",
            "/vaults",
            json!({"name": "w", "path": ""}),
            400,
            "absolute",
        ),
        (
            "admin",
            "POST",
            "/vaults",
            json!({"name": "w", "path": "rel"}),
            400,
            "absolute",
        ),
        (
            "admin",
            "POST",
            "/tokens",
            json!({"name": "", "role": "auditor"}),
            400,
            "not valid",
        ),
        (
            "admin",
            "POST",
            "/tokens",
            json!({"name": "a\u{0}b", "role": "auditor"}),
            400,
            "not valid",
        ),
        (
            "admin",
            "POST",
            "/tokens",
            json!({"name": "x".repeat(100_000), "role": "auditor"}),
            400,
            "not valid",
        ),
        (
            "admin",
            "POST",
            "/policies",
            json!({"name": ".hidden", "schedule": "0 1 * * *"}),
            400,
            "not valid",
        ),
    ];
    for (who, method, path, body, status, words) in &table {
        let t = if *who == "admin" { &admin } else { &op };
        let (got, v) = srv.call(method, path, Some(t), Some(body.clone()));
        let shown: String = body.to_string().chars().take(200).collect();
        assert_eq!(got, *status, "{method} {path} {shown}: {v}");
        let err = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            err.contains(words),
            "{method} {path} {shown}: {err:?} lacks {words:?}"
        );
    }

    // Nothing was read: no access time moved, the secret is intact.
    for (p, at) in &before {
        if p != &secret {
            assert_eq!(atime(p), *at, "{} was read", p.display());
        }
    }
    assert_eq!(atime(&secret), before_secret, "the secret was read");
    assert_eq!(std::fs::read(&secret).unwrap(), secret_bytes);
    // Nothing was written: no resource, no task, no new file anywhere, no vault w.
    assert_eq!(srv.ok("GET", "/resources", &admin, None, 200), json!([]));
    assert_eq!(srv.ok("GET", "/tasks", &admin, None, 200), tasks_before);
    assert_eq!(std::fs::read(&theirs).unwrap(), b"somebody's file");
    assert!(!env.path("out.raw").exists() && !data.join("escape.raw").exists());
    assert!(!data.join("vaults").join("w").exists() && !data.join("rel").exists());
    let tokens = srv.ok("GET", "/tokens", &admin, None, 200);
    assert_eq!(tokens.as_array().unwrap().len(), 2, "{tokens}");

    // What is allowed still works: a resource under <data>/images, a restore into
    // <data>/restored, byte for byte.
    srv.ok("POST", "/resources", &admin, Some(res(s(&disk))), 201);
    let to = restored.join("back.raw");
    let t = srv.ok("POST", "/restores", &op, Some(restore(s(&to))), 202);
    let t = srv.wait_task(&op, t["task"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(t["state"], "succeeded", "{t}");
    assert!(images_equal(&disk, &to));
    assert_eq!(
        files_under(&restored).len(),
        3,
        "only the restored image was added"
    );
    // An admin may replace an existing file under restore_to, and only when asked.
    let again = json!({"backup": backup, "to": s(&theirs)});
    srv.ok("POST", "/restores", &admin, Some(again), 409);
    assert_eq!(std::fs::read(&theirs).unwrap(), b"somebody's file");
    let over = json!({"backup": backup, "to": s(&theirs), "overwrite": true});
    let t = srv.ok("POST", "/restores", &admin, Some(over), 202);
    let t = srv.wait_task(&admin, t["task"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(t["state"], "succeeded", "{t}");
    assert!(images_equal(&disk, &theirs));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&theirs).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(files_under(&restored).len(), 3, "replaced, nothing added");
}

#[test]
fn methods_outside_the_route_table_are_denied_and_head_takes_gets_role() {
    let env = Env::new();
    let srv = Appliance::start(&env, &[]);
    let admin = token(&env, "admin", "root");
    let aud = token(&env, "auditor", "watcher");
    // Before: HEAD /tokens with an auditor token ran the admin-only handler (200).
    let (s, _, _) = srv.raw("HEAD", "/tokens", Some(&aud), "");
    assert_eq!(s, 403, "HEAD /tokens as auditor");
    let (s, _, _) = srv.raw("HEAD", "/tokens", Some(&admin), "");
    assert_eq!(s, 200, "HEAD /tokens as admin");
    let (s, _, _) = srv.raw("HEAD", "/vaults", Some(&aud), "");
    assert_eq!(s, 200, "HEAD /vaults as auditor");
    for (m, p, want) in [
        ("PUT", "/tokens", 405),
        ("OPTIONS", "/tokens", 405),
        ("PUT", "/vaults/v", 405),
        ("TRACE", "/backups", 405),
        ("POST", "/audit", 405),
        ("GET", "/nothing-here", 404),
    ] {
        let (s, _, body) = srv.raw(m, p, Some(&admin), if m == "POST" { "{}" } else { "" });
        assert_eq!(s, want, "{m} {p}: {body}");
        assert!(body.contains("error"), "{m} {p}: {body}");
    }
    // The vault still there and no token was made by any of it.
    assert_eq!(
        srv.ok("GET", "/tokens", &admin, None, 200)
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn a_new_tokens_secret_is_never_cached_and_failed_logins_are_limited_per_peer() {
    let env = Env::new();
    let srv = Appliance::start(&env, &[]);
    let admin = token(&env, "admin", "root");
    let (s, h, body) = srv.raw(
        "POST",
        "/tokens",
        Some(&admin),
        r#"{"name": "ci", "role": "operator"}"#,
    );
    assert_eq!(s, 201, "{body}");
    assert!(body.contains("secret"));
    assert_eq!(
        h.get("cache-control").and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    // A guesser: after 60 failures within a minute the peer is answered 429, and the
    // audit log holds at most one row per failure up to the limit plus one for the 429s.
    let mut limited = 0;
    for i in 0..150 {
        let (s, h, _) = srv.raw("GET", "/vaults", Some(&format!("bv_guess{i}")), "");
        assert!(s == 401 || s == 429, "{s}");
        if s == 429 {
            limited += 1;
            assert!(h.get("retry-after").is_some());
        }
    }
    assert_eq!(limited, 90, "failures past the 60th are limited");
    // The limit holds for this peer even with a valid token until the minute is over.
    let (s, _, _) = srv.raw("GET", "/vaults", Some(&admin), "");
    assert_eq!(s, 429);
    // Audited: the first 60 failures and one 429, not 150 rows. The 429's row is
    // queued after the 401s', so once it is written they all are.
    let catalog = env.data().join("catalog.sqlite");
    let count = |status: u16| -> u64 {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
                 print(c.execute(\"SELECT count(*) FROM audit WHERE token='-' AND status=?\", \
                 (int(sys.argv[2]),)).fetchone()[0])",
            ])
            .arg(&catalog)
            .arg(status.to_string())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while count(429) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no audit row for the 429s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(401), 60);
    assert_eq!(count(429), 1);
}

/// Run `sql` on the catalog of `env` (python3's sqlite3, beside the running service).
fn catalog_sql(env: &Env, sql: &str) {
    let st = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()",
        ])
        .arg(env.data().join("catalog.sqlite"))
        .arg(sql)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_token_past_its_expiry_is_refused_and_its_last_use_is_listed() {
    let env = Env::new();
    let srv = Appliance::start(&env, &[]);
    let admin = token(&env, "admin", "root");
    let (s, v) = srv.call(
        "POST",
        "/tokens",
        Some(&admin),
        Some(json!({"name": "old", "role": "auditor", "expires": "2001-01-01T00:00:00Z"})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in the future"),
        "{v}"
    );
    let t = srv.ok(
        "POST",
        "/tokens",
        &admin,
        Some(json!({"name": "ci", "role": "auditor", "expires": "2999-01-01T00:00:00Z"})),
        201,
    );
    let secret = t["secret"].as_str().unwrap().to_string();
    srv.ok("GET", "/vaults", &secret, None, 200);
    let list = srv.ok("GET", "/tokens", &admin, None, 200);
    let ci = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap()
        .clone();
    assert_eq!(ci["expires"], "2999-01-01T00:00:00Z");
    assert!(ci["last_used"].is_string(), "{ci}");
    assert!(ci.get("secret").is_none() && ci.get("hash").is_none());
    // The date passes (moved in the catalog): the same secret is now refused.
    catalog_sql(
        &env,
        "UPDATE tokens SET expires = '2001-01-01T00:00:00Z' WHERE name = 'ci'",
    );
    let (s, _) = srv.call("GET", "/vaults", Some(&secret), None);
    assert_eq!(s, 401);
}

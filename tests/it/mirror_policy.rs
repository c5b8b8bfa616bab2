//! Mirror targets named in the config (issue 17): `[remote.NAME]` used by `replicate
//! --to-remote NAME`, by `POST /replications {"to_remote"}` and by replication policies
//! on their schedule, between two real `serve` processes on 127.0.0.1. The mirror
//! restores byte-exact after the source vault is gone; a rerun sends nothing; an unknown
//! name, a URL in the body, retention with a mirror and a world-readable token file are
//! refused with nothing written.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::*;
use crate::mirror::{Receiver, restore_all_from_mirror};

/// The source's config naming the receiver's vault `m` as remote `b`, with the
/// replication token in a 0600 file.
fn source_config(src: &Env, r: &Receiver, url: &str, fp: &str) -> (PathBuf, PathBuf) {
    let tok = src.path("site-b.token");
    std::fs::write(&tok, format!("{}\n", r.rep)).unwrap();
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = src.path("source.toml");
    std::fs::write(
        &cfg,
        format!(
            "[remote.b]\nurl = \"{url}/m\"\ntoken_file = \"{tok}\"\nfingerprint = \"{fp}\"\n\n\
             [remote.notmirror]\nurl = \"{url}/plain\"\ntoken_file = \"{tok}\"\nfingerprint = \"{fp}\"\n\n\
             [remote.slow]\nurl = \"{url}/m\"\ntoken_file = \"{tok}\"\nfingerprint = \"{fp}\"\nbwlimit = \"1M\"\n",
            tok = tok.display()
        ),
    )
    .unwrap();
    (cfg, tok)
}

/// The next task of the replication policy (by the scheduler) not in `seen`, once ended.
fn next_policy_run(srv: &Appliance, admin: &str, seen: &[String]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ts = srv.ok("GET", "/tasks", admin, None, 200);
        if let Some(t) = ts.as_array().unwrap().iter().find(|t| {
            t["kind"] == "replicate"
                && t["by"] == "scheduler"
                && !seen.contains(&s(t, "id").to_string())
        }) {
            return srv.wait_task(admin, s(t, "id"), Duration::from_secs(120));
        }
        assert!(
            Instant::now() < deadline,
            "the replication policy never ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_idle(srv: &Appliance, admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ["running", "queued"].iter().any(|st| {
        !srv.ok("GET", &format!("/tasks?state={st}"), admin, None, 200)
            .as_array()
            .unwrap()
            .is_empty()
    }) {
        assert!(Instant::now() < deadline, "tasks still running");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn packs_bytes(dir: &Path) -> u64 {
    pack_files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_policy_to_a_named_remote_runs_on_schedule_reruns_send_nothing_and_the_mirror_restores_alone() {
    let src = Env::new();
    let img = src.path("disk.raw");
    let size = 16u64 << 20;
    write_raw(&img, size, 0, &random_bytes(6 << 20, 21));
    let v1 = src.path("v1.raw");
    std::fs::copy(&img, &v1).unwrap();
    src.json(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
        "--name",
        "full",
    ]);
    let r = Receiver::new();
    let (mut serve, url, fp) = r.serve("127.0.0.1:0");
    let (cfg, tok) = source_config(&src, &r, &url, &fp);
    let mirror = r.vault_dir("m");

    // A token file every user may read is refused before anything is sent.
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = src
        .cmd()
        .args([
            "replicate",
            "--all",
            "--from",
            "v",
            "--to-remote",
            "b",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(&r.rep), "the token was printed: {err}");
    assert!(pack_files(&mirror).is_empty());
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();

    let admin = token(&src, "admin", "root");
    let srv = Appliance::start(&src, &["--config", cfg.to_str().unwrap()]);

    // Only a configured name is accepted; a URL or token in the body is an unknown field;
    // retention on a mirror is the mirror appliance's own.
    for (body, needle) in [
        (json!({"from": "v", "to_remote": "nope"}), "known: b"),
        (
            json!({"from": "v", "to_remote": "b", "url": format!("{url}/m")}),
            "unknown field",
        ),
        (
            json!({"from": "v", "to_remote": "b", "token": r.rep}),
            "unknown field",
        ),
        (
            json!({"from": "v", "to": "v", "to_remote": "b"}),
            "exactly one target",
        ),
    ] {
        let v = srv.ok("POST", "/replications", &admin, Some(body.clone()), 400);
        assert!(v.to_string().contains(needle), "{body}: {v}");
        assert!(!v.to_string().contains(&r.rep), "{v}");
    }
    let v = srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(
            json!({"name": "x", "kind": "replicate", "schedule": "0 3 * * *",
                    "from": "v", "to_remote": "b", "retention": {"keep_last": 2}}),
        ),
        400,
    );
    assert!(v.to_string().contains("retention"), "{v}");
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(
            json!({"name": "x", "kind": "replicate", "schedule": "0 3 * * *",
                    "from": "v", "to_remote": "nope"}),
        ),
        400,
    );
    assert!(pack_files(&mirror).is_empty(), "a refused request wrote");
    // A push the mirror appliance refuses (its vault `plain` is no mirror vault) fails
    // the task and raises task_failed.
    let t = srv.ok(
        "POST",
        "/replications",
        &admin,
        Some(json!({"from": "v", "to_remote": "notmirror"})),
        202,
    );
    let failed = srv.wait_task(&admin, s(&t, "task"), Duration::from_secs(60));
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert!(s(&failed, "error").contains("mirror_vaults"), "{failed:#}");
    assert!(pack_files(&r.vault_dir("plain")).is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !srv
        .ok("GET", "/alerts", &admin, None, 200)
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["kind"] == "task_failed" && s(a, "message").contains("mirror_vaults"))
    {
        assert!(Instant::now() < deadline, "no task_failed alert");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A push is a task with byte progress that can be cancelled: no manifest lands.
    let t = srv.ok(
        "POST",
        "/replications",
        &admin,
        Some(json!({"from": "v", "to_remote": "slow"})),
        202,
    );
    let id = s(&t, "task").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task = srv.ok("GET", &format!("/tasks/{id}"), &admin, None, 200);
        if u(&task, "bytes_total") > 0 {
            assert_eq!(task["target"], "remote slow", "{task:#}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {task:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.ok("POST", &format!("/tasks/{id}/cancel"), &admin, None, 200);
    let cancelled = srv.wait_task(&admin, &id, Duration::from_secs(60));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled:#}");
    let on_mirror = r.env.json(&["backups", "list", "--vault", "m"]);
    assert!(on_mirror.as_array().unwrap().is_empty(), "{on_mirror}");

    // The policy runs on its schedule and pushes the backup; the next run sends nothing.
    let p = srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(
            json!({"name": "offsite", "kind": "replicate", "schedule": "*/2 * * * * *",
                    "from": "v", "to_remote": "b"}),
        ),
        201,
    );
    assert_eq!(p["to_remote"], "b", "{p}");
    let first = next_policy_run(&srv, &admin, &[]);
    assert_eq!(first["state"], "succeeded", "{first:#}");
    assert_eq!(first["target"], "remote b", "{first:#}");
    let res = &first["result"];
    assert_eq!(u(res, "backups_sent"), 1, "{first:#}");
    // (What the cancelled push had landed is not sent again.)
    assert_eq!(u(&first, "bytes_done"), u(res, "bytes_sent"), "{first:#}");
    assert!(u(res, "wire_bytes") >= u(res, "bytes_sent"), "{first:#}");
    let landed = packs_bytes(&mirror);
    assert!(landed >= 6 << 20, "{landed}");
    let second = next_policy_run(&srv, &admin, &[s(&first, "id").to_string()]);
    assert_eq!(second["state"], "succeeded", "{second:#}");
    assert_eq!(u(&second["result"], "backups_sent"), 0, "{second:#}");
    assert_eq!(u(&second["result"], "bytes_sent"), 0, "{second:#}");
    assert_eq!(u(&second["result"], "wire_bytes"), 0, "{second:#}");
    assert_eq!(u(&second, "bytes_done"), 0, "{second:#}");
    assert_eq!(packs_bytes(&mirror), landed);
    srv.ok(
        "PATCH",
        "/policies/offsite",
        &admin,
        Some(json!({"enabled": false})),
        200,
    );
    wait_idle(&srv, &admin);
    // The CLI in remote mode names the remote too; nothing is left to send.
    let out = Env::bare()
        .cmd()
        .args(["--server", &srv.url, "--token", &admin, "--json"])
        .envs(crate::appliance::trust_env(&srv.url))
        .args(["replicate", "--all", "--from", "v", "--to-remote", "b"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&v, "backups_sent"), 0, "{v}");
    assert_eq!(u(&v, "wire_bytes"), 0, "{v}");
    drop(srv);

    // The CLI pushes an incremental to the same named remote: about its stored size.
    write_raw(&img, size, 2 << 20, &random_bytes(1 << 20, 22));
    let v2 = src.path("v2.raw");
    std::fs::copy(&img, &v2).unwrap();
    let inc = src.json(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
        "--name",
        "inc",
    ]);
    let out = src
        .cmd()
        .args([
            "--json",
            "replicate",
            "--all",
            "--from",
            "v",
            "--to-remote",
            "b",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&rep, "backups_sent"), 1, "{rep}");
    assert!(
        u(&rep, "bytes_sent") as f64 <= 1.2 * u(&inc, "bytes_stored") as f64 + 65536.0,
        "{rep} vs {inc}"
    );

    // The first site is lost: the mirror alone restores both byte-exact.
    std::fs::remove_dir_all(src.vault_dir()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(serve.wait().unwrap().success());
    restore_all_from_mirror(&r, &[("full", &v1), ("inc", &v2)]);
}

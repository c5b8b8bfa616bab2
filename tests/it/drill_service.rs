//! Recovery drills in the appliance: drill policies on schedule over every server
//! resource, the resource and backup views (`last_drill`, `verified_boot`), the
//! `drill_failed` alert, drills on demand as tasks (API and `--server` CLI) and cancel —
//! with the boot-sector guests of `drill.rs` and real qemu-system-x86_64.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::drill::{Drill, boot_sector, disk, png_size, processes_mentioning};

/// A server resource `name` of two image files: a boot disk (whose boot sector is wiped
/// when `broken`) and a data disk.
fn server_images(env: &Env, name: &str, broken: bool) -> Vec<String> {
    let boot = env.path(&format!("{name}-boot.img"));
    let sector = if broken {
        vec![0u8; 512]
    } else {
        boot_sector("server boot disk up\r\n")
    };
    disk(&boot, &sector, 4 << 20);
    let data = env.path(&format!("{name}-data.img"));
    disk(&data, b"SECOND-DISK-OK\r\n\0", 2 << 20);
    vec![
        format!("boot={}", boot.display()),
        format!("data={}", data.display()),
    ]
}

#[test]
fn a_drill_policy_proves_each_server_bootable_on_schedule_and_alerts_on_a_failed_one() {
    use crate::appliance::{Appliance, token};
    use serde_json::json;
    let t = Drill::new();
    let admin = token(&t.env, "admin", "root");
    let op = token(&t.env, "operator", "ops");
    let srv = Appliance::start(&t.env, &[]);
    let mut latest = std::collections::HashMap::new();
    for (name, broken) in [("good-srv", false), ("broken-srv", true)] {
        let sources = server_images(&t.env, name, broken);
        srv.ok(
            "POST",
            "/resources",
            &admin,
            Some(json!({"name": name, "kind": "server", "sources": sources, "vault": "v"})),
            201,
        );
        let task = srv.ok(
            "POST",
            "/backups",
            &op,
            Some(json!({"resource": name})),
            202,
        );
        let done = srv.wait_task(&op, s(&task, "task"), Duration::from_secs(60));
        assert_eq!(done["state"], "succeeded", "{done}");
        latest.insert(name, s(&done["result"], "backup").to_string());
    }
    // A field of another kind is refused; a bad check too.
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(json!({"name": "x", "kind": "drill", "schedule": "0 3 * * SUN", "vaults": ["v"]})),
        400,
    );
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(json!({"name": "x", "kind": "drill", "schedule": "0 3 * * SUN", "check": "nope"})),
        400,
    );
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(json!({"name": "x", "kind": "backup", "schedule": "0 3 * * SUN", "check": "agent"})),
        400,
    );
    // Every server (no resources named), every 2 seconds until the first run is seen.
    srv.ok("POST", "/policies", &admin, Some(json!({"name": "drills", "kind": "drill", "schedule": "*/2 * * * * *", "check": "console:SECOND-DISK-OK", "timeout_seconds": 120})), 201);
    let deadline = Instant::now() + Duration::from_secs(60);
    let drills = loop {
        let ts: Vec<Value> = srv
            .ok("GET", "/tasks", &admin, None, 200)
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"] == "drill" && t["by"] == "scheduler")
            .cloned()
            .collect();
        if ["good-srv", "broken-srv"]
            .iter()
            .all(|r| ts.iter().any(|t| t["target"] == *r))
        {
            break ts;
        }
        assert!(Instant::now() < deadline, "the drill policy never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    srv.ok(
        "PATCH",
        "/policies/drills",
        &admin,
        Some(json!({"enabled": false})),
        200,
    );
    for r in ["good-srv", "broken-srv"] {
        let first = drills.iter().rfind(|t| t["target"] == r).unwrap();
        let done = srv.wait_task(&admin, s(first, "id"), Duration::from_secs(200));
        if r == "good-srv" {
            assert_eq!(done["state"], "succeeded", "{done:#}");
            assert_eq!(done["result"]["ok"], true);
            assert_eq!(done["result"]["backup"], latest[r].as_str());
        } else {
            assert_eq!(done["state"], "failed", "{done:#}");
            assert_eq!(done["error_kind"], "invalid_format", "{done:#}");
            assert!(s(&done, "error").contains("no bootable disk"), "{done:#}");
        }
    }
    // Wait for any later scheduled runs queued before the policy was disabled.
    let deadline = Instant::now() + Duration::from_secs(300);
    while ["running", "queued"].iter().any(|st| {
        !srv.ok("GET", &format!("/tasks?state={st}"), &admin, None, 200)
            .as_array()
            .unwrap()
            .is_empty()
    }) {
        assert!(Instant::now() < deadline, "drills still running");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Which servers were proven bootable: the resource and backup views.
    let good = srv.ok("GET", "/resources/good-srv", &admin, None, 200);
    assert_eq!(good["last_drill"]["ok"], true, "{good:#}");
    assert_eq!(good["last_drill"]["check"], "console:SECOND-DISK-OK");
    png_size(Path::new(s(&good["last_drill"], "screenshot")));
    let broken = srv.ok("GET", "/resources/broken-srv", &admin, None, 200);
    assert_eq!(broken["last_drill"]["ok"], false, "{broken:#}");
    assert!(
        Path::new(s(&broken["last_drill"], "dir"))
            .join("console.log")
            .is_file()
    );
    let listed = srv.ok("GET", "/resources", &admin, None, 200);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "good-srv" && r["last_drill"]["ok"] == true)
    );
    let b = srv.ok(
        "GET",
        &format!("/backups/{}", latest["good-srv"]),
        &admin,
        None,
        200,
    );
    assert_eq!(b["verified_boot"]["ok"], true, "{b:#}");
    let alerts = srv.ok("GET", "/alerts", &admin, None, 200);
    assert!(
        alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "drill_failed" && a["subject"] == "broken-srv"),
        "{alerts:#}"
    );
    assert!(
        !alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "drill_failed" && a["subject"] == "good-srv"),
        "{alerts:#}"
    );

    // A drill on demand, as a task; then one cancelled while its VM runs.
    let task = srv.ok(
        "POST",
        &format!("/backups/{}/drill", latest["good-srv"]),
        &op,
        Some(
            json!({"check": "console:server boot disk up", "accel": "tcg", "timeout_seconds": 60}),
        ),
        202,
    );
    let done = srv.wait_task(&op, s(&task, "task"), Duration::from_secs(120));
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(done["result"]["accel"], "tcg");
    srv.ok(
        "POST",
        "/backups/latest/drill?disk=good-srv",
        &op,
        Some(json!({"check": "bogus"})),
        400,
    );
    // The CLI with --server runs the drill as a task on the appliance.
    let remote = |args: &[&str]| {
        t.env
            .cmd()
            .args(["--server", &srv.url, "--token", &op, "--json", "drill"])
            .args(args)
            .envs(crate::appliance::trust_env(&srv.url))
            .output()
            .unwrap()
    };
    let out = remote(&[
        "latest",
        "--disk",
        "good-srv",
        "--check",
        "console:SECOND-DISK-OK",
        "--accel",
        "tcg",
        "--timeout",
        "60",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["ok"], &v["backup"]),
        (&json!(true), &json!(latest["good-srv"]))
    );
    let out = remote(&[
        &latest["broken-srv"],
        "--check",
        "console:SECOND-DISK-OK",
        "--accel",
        "tcg",
        "--timeout",
        "60",
    ]);
    assert!(!out.status.success(), "a failed drill fails the command");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no bootable disk"), "{said}");
    let task = srv.ok(
        "POST",
        "/backups/latest/drill?disk=good-srv",
        &op,
        Some(json!({"check": "console:NEVER", "accel": "tcg", "timeout_seconds": 600})),
        202,
    );
    let needle = t.env.dir.path().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !processes_mentioning(&needle)
        .iter()
        .any(|p| p.contains("qemu-system"))
    {
        assert!(Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    srv.ok(
        "POST",
        &format!("/tasks/{}/cancel", s(&task, "task")),
        &op,
        None,
        200,
    );
    let done = srv.wait_task(&op, s(&task, "task"), Duration::from_secs(60));
    assert_eq!(done["state"], "cancelled", "{done:#}");
    let left: Vec<String> = processes_mentioning(&needle)
        .into_iter()
        .filter(|p| p.contains("qemu-system"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(srv.stop());
}

//! Replication between vaults of one appliance (`blockvault replicate`): replicas restore
//! byte-exact from the target alone, reruns send nothing, incrementals send about their
//! stored size, incompatible targets are refused before anything is written, a killed
//! replication resumes, and a vault on Garage is a target like any other.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::garage::Garage;

fn qio(fmt: &str, img: &Path, cmd: &str) {
    sh("qemu-io", &["-f", fmt, "-c", cmd, img.to_str().unwrap()]);
}

/// Files under `dir` (recursively), e.g. a vault's packs and manifests.
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

fn replicate(env: &Env, what: &[&str], from: &str, to: &str) -> Value {
    let mut a = vec!["replicate"];
    a.extend_from_slice(what);
    a.extend_from_slice(&["--from", from, "--to", to]);
    env.json(&a)
}

/// A full backup of the fixture, then a bitmap incremental over qemu-nbd; returns the
/// image, the source image of the full backup, and both backups' JSON.
fn full_then_bitmap_incremental(env: &Env) -> (PathBuf, PathBuf, Value, Value) {
    let fx = fixtures();
    let img = env.path("work.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &img).unwrap();
    sh(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b0"],
    );
    let sock = env.path("nbd.sock");
    let nbd_backup = || {
        let srv = Server::qemu_nbd(&img, &sock, &["-f", "qcow2", "-B", "b0"]);
        env.json(&[
            "backup",
            &srv.uri(),
            "--vault",
            "v",
            "--id",
            "vm1",
            "--bitmap",
            "b0",
        ])
    };
    let full = nbd_backup();
    sh(
        "qemu-img",
        &["bitmap", "--clear", img.to_str().unwrap(), "b0"],
    );
    qio("qcow2", &img, "write -P 0x31 2M 64k");
    qio("qcow2", &img, "write -P 0x32 40M 192k");
    let inc = nbd_backup();
    assert_eq!(s(&inc, "strategy"), "bitmap", "{inc}");
    (img, fx.join("disk.qcow2"), full, inc)
}

#[test]
fn replicas_restore_byte_exact_from_the_target_alone_and_a_rerun_sends_nothing() {
    let env = Env::new();
    env.ok(&["vault", "create", "v2"]);
    let fx = fixtures();
    let img = env.path("work.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &img).unwrap();
    let full = env.backup(&img, "vm1");
    qio("qcow2", &img, "write -P 0x41 5M 64k");
    let cmp = env.backup(&img, "vm1");
    assert_eq!(s(&cmp, "strategy"), "compare", "{cmp}");

    let r = replicate(&env, &["--all"], "v", "v2");
    assert_eq!(u(&r, "backups_sent"), 2, "{r}");
    assert!(u(&r, "blobs_sent") > 0, "{r}");
    // The target's catalog knows the replicas at once.
    let listed = env.json(&["backups", "list", "--vault", "v2"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let ids: Vec<String> = r["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| s(b, "replica_id").to_string())
        .collect();
    for b in r["backups"].as_array().unwrap() {
        assert_ne!(s(b, "replica_id"), s(b, "source_id"));
    }

    // A second run transfers nothing.
    let again = replicate(&env, &["--all"], "v", "v2");
    assert_eq!(u(&again, "blobs_sent"), 0, "{again}");
    assert_eq!(u(&again, "bytes_sent"), 0, "{again}");
    assert_eq!(u(&again, "backups_sent"), 0, "{again}");

    // The source vault is gone: every replica restores from the target alone.
    std::fs::remove_dir_all(env.vault_dir()).unwrap();
    let out0 = env.path("r0.raw");
    env.restore(&ids[0], &out0, "raw");
    assert!(images_equal(&fx.join("disk.qcow2"), &out0));
    let out1 = env.path("r1.qcow2");
    env.restore(&ids[1], &out1, "qcow2");
    assert!(images_equal(&img, &out1));
    let v = env.json(&["verify", "--vault", "v2"]);
    assert!(v["corrupt_blobs"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    let _ = full;
}

#[test]
fn a_bitmap_incremental_replicates_about_its_stored_size() {
    let env = Env::new();
    env.ok(&["vault", "create", "v2"]);
    let (img, base, full, inc) = full_then_bitmap_incremental(&env);
    let first = replicate(&env, &[s(&full, "id")], "v", "v2");
    assert_eq!(u(&first, "backups_sent"), 1, "{first}");
    let second = replicate(&env, &["--resource", "vm1"], "v", "v2");
    // The full one is there already; the incremental sends its new chunks and pages.
    assert_eq!(u(&second, "backups_sent"), 1, "{second}");
    let stored = u(&inc, "bytes_stored");
    let sent = u(&second, "bytes_sent");
    assert!(stored > 0, "{inc}");
    assert!(
        sent as f64 <= 1.2 * stored as f64,
        "incremental sent {sent} bytes for {stored} stored: {second}"
    );
    std::fs::remove_dir_all(env.vault_dir()).unwrap();
    let ids: Vec<String> = env
        .json(&["backups", "list", "--vault", "v2"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| s(b, "id").to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let out0 = env.path("r0.raw");
    env.restore(&ids[0], &out0, "raw");
    assert!(images_equal(&base, &out0));
    let out1 = env.path("r1.raw");
    env.restore(&ids[1], &out1, "raw");
    assert!(images_equal(&img, &out1));
}

#[test]
fn an_encrypted_vault_replicates_into_its_replica_and_other_keys_or_chunk_sizes_are_refused() {
    let env = Env::bare();
    let key = env.path("v.key");
    let k = key.to_str().unwrap();
    env.ok(&["vault", "create", "v", "--encrypt", "--keyfile", k]);
    let fx = fixtures();
    let img = fx.join("disk.qcow2");
    let b = env.json(&[
        "--keyfile",
        k,
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "vm1",
    ]);
    env.ok(&["--keyfile", k, "vault", "create", "v2", "--replica-of", "v"]);
    let info = env.json(&["vault", "info", "v2"]);
    assert_eq!(info["encrypted"], true, "{info}");
    let r = env.json(&[
        "--keyfile",
        k,
        "replicate",
        s(&b, "id"),
        "--from",
        "v",
        "--to",
        "v2",
    ]);
    assert_eq!(u(&r, "backups_sent"), 1, "{r}");
    let replica = s(&r["backups"][0], "replica_id").to_string();

    // Targets whose blobs could not be the source's: refused, nothing written.
    let other = env.path("other.key");
    env.ok(&[
        "vault",
        "create",
        "v3",
        "--encrypt",
        "--keyfile",
        other.to_str().unwrap(),
    ]);
    env.ok(&["vault", "create", "v4", "--chunk-size", "128K"]);
    env.ok(&["vault", "create", "v5"]);
    for (to, says) in [
        ("v3", "another vault key"),
        ("v4", "chunk"),
        ("v5", "is encrypted and the target is not"),
    ] {
        let dir = env.data().join("vaults").join(to);
        let before =
            files_under(&dir.join("packs")).len() + files_under(&dir.join("backups")).len();
        let out = env.run(&[
            "--keyfile",
            k,
            "replicate",
            s(&b, "id"),
            "--from",
            "v",
            "--to",
            to,
        ]);
        assert_eq!(out.status.code(), Some(2), "replicate to {to}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "replicate to {to}: {err}");
        let after = files_under(&dir.join("packs")).len() + files_under(&dir.join("backups")).len();
        assert_eq!(before, after, "a refused replication wrote into {to}");
    }

    // The replica restores with the key alone, the source gone.
    std::fs::remove_dir_all(env.data().join("vaults/v")).unwrap();
    let out = env.path("r.raw");
    let restored = env.run(&["restore", &replica, "--to", out.to_str().unwrap()]);
    assert_eq!(restored.status.code(), Some(10), "restore without the key");
    env.ok(&[
        "--keyfile",
        k,
        "restore",
        &replica,
        "--to",
        out.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert!(images_equal(&img, &out));
}

#[test]
fn a_replication_killed_midway_completes_on_rerun_and_the_target_verifies_clean() {
    let env = Env::new();
    env.ok(&["vault", "create", "v2"]);
    let img = env.path("big.raw");
    write_raw(&img, 160 << 20, 0, &random_bytes(160 << 20, 7));
    let b = env.backup(&img, "big");
    let target = env.data().join("vaults/v2");
    let packs = |dir: &Path| {
        files_under(&dir.join("packs"))
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "pack"))
            .count()
    };
    let mut child = env
        .cmd()
        .args(["replicate", s(&b, "id"), "--from", "v", "--to", "v2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while packs(&target) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no pack landed in the target"
        );
        assert!(child.try_wait().unwrap().is_none(), "replicate ended early");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        files_under(&target.join("backups")).is_empty(),
        "a killed replication left a manifest"
    );
    let landed = packs(&target);
    assert!(landed > 0);

    let r = replicate(&env, &[s(&b, "id")], "v", "v2");
    assert_eq!(u(&r, "backups_sent"), 1, "{r}");
    // What landed before the kill is not sent again.
    assert!(u(&r, "blobs_skipped") > 0, "{r}");
    let v = env.json(&["verify", "--vault", "v2"]);
    assert!(v["corrupt_blobs"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    let replica = s(&r["backups"][0], "replica_id").to_string();

    // An incremental that changed one 64 MiB index page of three: only that page's
    // chunks are asked about, and about its stored bytes are sent.
    write_raw(&img, 160 << 20, 5 << 20, &random_bytes(64 << 10, 8));
    let inc = env.backup(&img, "big");
    assert_eq!(s(&inc, "parent"), s(&b, "id"), "{inc}");
    let r2 = replicate(&env, &[s(&inc, "id")], "v", "v2");
    let asked = u(&r2, "blobs_sent") + u(&r2, "blobs_skipped");
    assert!(asked <= 1024 + 2, "asked about {asked} blobs: {r2}");
    assert!(
        u(&r2, "bytes_sent") as f64 <= 1.2 * u(&inc, "bytes_stored") as f64,
        "{r2} {inc}"
    );
    let inc_replica = s(&r2["backups"][0], "replica_id").to_string();

    std::fs::remove_dir_all(env.vault_dir()).unwrap();
    let out = env.path("r.raw");
    env.restore(&inc_replica, &out, "raw");
    assert!(images_equal(&img, &out));
    let _ = replica;
}

#[test]
fn a_local_vault_replicates_to_garage_and_restores_from_the_bucket_alone() {
    let g = Garage::start();
    let env = Env::new();
    g.create_vault(&env, "g", "replica");
    let (img, base, full, inc) = full_then_bitmap_incremental(&env);
    let r = replicate(&env, &["--all"], "v", "g");
    assert_eq!(u(&r, "backups_sent"), 2, "{r}");
    assert_eq!(g.objects("replica", "backups").len(), 2);
    let again = replicate(&env, &["--all"], "v", "g");
    assert_eq!(u(&again, "blobs_sent"), 0, "{again}");
    let ids: Vec<String> = r["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| s(b, "replica_id").to_string())
        .collect();
    std::fs::remove_dir_all(env.vault_dir()).unwrap();
    // A fresh appliance attaches the bucket and restores both.
    let fresh = Env::bare();
    g.attach_vault(&fresh, "g", "replica");
    let out0 = fresh.path("r0.raw");
    fresh.restore(&ids[0], &out0, "raw");
    assert!(images_equal(&base, &out0));
    let out1 = fresh.path("r1.raw");
    fresh.restore(&ids[1], &out1, "raw");
    assert!(images_equal(&img, &out1));
    let _ = (full, inc);
}

#[test]
fn a_replication_policy_runs_from_serve_on_schedule_with_the_targets_own_retention() {
    use crate::appliance::{Appliance, token};
    use serde_json::json;
    let env = Env::new();
    env.ok(&["vault", "create", "v2"]);
    env.ok(&["vault", "create", "wide", "--chunk-size", "128K"]);
    let img = env.path("d.raw");
    let mut autos = Vec::new();
    for (i, name) in [
        "autobk_20261101-000000",
        "autobk_20261102-000000",
        "autobk_20261103-000000",
    ]
    .iter()
    .enumerate()
    {
        write_raw(
            &img,
            8 << 20,
            i as u64 * (1 << 20),
            &random_bytes(1 << 20, 100 + i as u64),
        );
        let b = env.json(&[
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "vm1",
            "--name",
            name,
        ]);
        autos.push(s(&b, "id").to_string());
    }
    let manual = env.backup(&img, "vm1");
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    let srv = Appliance::start(&env, &[]);
    // Fields of other kinds, or a missing target, are refused.
    for bad in [
        json!({"name": "x", "kind": "replicate", "schedule": "0 3 * * *", "from": "v"}),
        json!({"name": "x", "kind": "replicate", "schedule": "0 3 * * *", "from": "v", "to": "v"}),
        json!({"name": "x", "kind": "replicate", "schedule": "0 3 * * *", "from": "v", "to": "v2", "vaults": ["v"]}),
        json!({"name": "x", "kind": "backup", "schedule": "0 3 * * *", "from": "v", "to": "v2"}),
    ] {
        srv.ok("POST", "/policies", &admin, Some(bad), 400);
    }
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(
            json!({"name": "offsite", "kind": "replicate", "schedule": "*/2 * * * * *",
                    "from": "v", "to": "v2", "resources": ["vm1"], "retention": {"keep_last": 2}}),
        ),
        201,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let ts = srv.ok("GET", "/tasks", &admin, None, 200);
        if let Some(t) = ts
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == "replicate" && t["by"] == "scheduler")
        {
            break t.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the replication policy never ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Preview is a backup policy's; a replication policy says so instead of guessing.
    srv.ok("POST", "/policies/offsite/preview", &admin, None, 400);
    srv.ok(
        "PATCH",
        "/policies/offsite",
        &admin,
        Some(json!({"enabled": false})),
        200,
    );
    let done = srv.wait_task(&admin, s(&first, "id"), Duration::from_secs(120));
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(done["target"], "v2");
    // The target keeps the newest two policy backups and the one-off one, not the oldest.
    let deadline = Instant::now() + Duration::from_secs(120);
    while ["running", "queued"].iter().any(|st| {
        !srv.ok("GET", &format!("/tasks?state={st}"), &admin, None, 200)
            .as_array()
            .unwrap()
            .is_empty()
    }) {
        assert!(Instant::now() < deadline, "replications still running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let on_target = srv.ok("GET", "/backups?vault=v2", &admin, None, 200);
    let mut names: Vec<String> = on_target
        .as_array()
        .unwrap()
        .iter()
        .map(|b| s(b, "name").to_string())
        .collect();
    names.sort();
    let mut want = vec![
        "autobk_20261102-000000".to_string(),
        "autobk_20261103-000000".to_string(),
        s(&manual, "name").to_string(),
    ];
    want.sort();
    assert_eq!(names, want, "{on_target:#}");

    // A one-off replication is a task too; into a vault of another chunk size it fails
    // and raises the failure alert.
    let t = srv.ok(
        "POST",
        "/replications",
        &op,
        Some(json!({"from": "v", "to": "wide", "backup": autos[0]})),
        202,
    );
    let failed = srv.wait_task(&op, s(&t, "task"), Duration::from_secs(60));
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert!(s(&failed, "error").contains("chunk size"), "{failed:#}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = srv.ok("GET", "/alerts", &admin, None, 200);
        if alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "task_failed" && s(a, "message").contains("chunk size"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no task_failed alert: {alerts:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    srv.ok(
        "POST",
        "/replications",
        &op,
        Some(json!({"from": "v", "to": "v2", "bogus": 1})),
        400,
    );
    let t = srv.ok(
        "POST",
        "/replications",
        &op,
        Some(json!({"from": "v", "to": "v2", "backup": autos[0]})),
        202,
    );
    let ok = srv.wait_task(&op, s(&t, "task"), Duration::from_secs(60));
    assert_eq!(ok["state"], "succeeded", "{ok:#}");
    assert_eq!(ok["result"]["backups_sent"], 1, "{ok:#}");

    // The CLI with --server runs it as a task on the appliance.
    env.ok(&["vault", "create", "v3"]);
    let out = env
        .cmd()
        .args(["--server", &srv.url, "--token", &op, "--json"])
        .args([
            "replicate",
            "--resource",
            "vm1",
            "--from",
            "v",
            "--to",
            "v3",
        ])
        .envs(crate::appliance::trust_env(&srv.url))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backups_sent"], 4, "{v:#}");
}

#[test]
fn a_blob_rotten_at_the_source_stops_the_replication_before_its_manifest() {
    let env = Env::new();
    env.ok(&["vault", "create", "v2"]);
    let img = env.path("d.raw");
    write_raw(&img, 4 << 20, 0, &random_bytes(4 << 20, 11));
    let b = env.backup(&img, "d");
    let pack = pack_files(&env.vault_dir()).remove(0);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 0x40; // inside the first blob's payload
    std::fs::write(&pack, bytes).unwrap();
    let out = env.run(&["replicate", s(&b, "id"), "--from", "v", "--to", "v2"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let target = env.data().join("vaults/v2");
    assert!(files_under(&target.join("backups")).is_empty());
    assert!(
        env.json(&["backups", "list", "--vault", "v2"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

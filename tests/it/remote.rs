//! The command line against a running appliance (`--server URL --token T`): the same
//! commands, carried out by the appliance, with nothing touched on the client's side.

use std::process::Output;

use serde_json::Value;

use crate::appliance::{Appliance, token};
use crate::common::{Env, fixtures, images_equal, sh, u};

/// `blockvault --server URL --token T --json ARGS` from a client with its own (empty)
/// data dir.
fn remote(client: &Env, url: &str, tok: &str, args: &[&str]) -> Output {
    client
        .cmd()
        .args(["--server", url, "--token", tok, "--json"])
        .envs(crate::appliance::trust_env(url))
        .args(args)
        .output()
        .expect("running blockvault")
}

fn remote_json(client: &Env, url: &str, tok: &str, args: &[&str]) -> Value {
    let out = remote(client, url, tok, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn the_cli_backs_up_lists_and_restores_through_a_running_appliance() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    let aud = token(&env, "auditor", "watcher");
    let srv = Appliance::start(&env, &[]);
    let client = Env::bare();
    let disk = env.path("web01.qcow2");
    std::fs::copy(fixtures().join("disk.qcow2"), &disk).unwrap();
    let d = disk.to_str().unwrap();

    let vaults = remote_json(&client, &srv.url, &aud, &["vault", "list"]);
    assert_eq!(vaults[0]["name"], "v", "{vaults}");

    // The first backup creates the resource (an admin's right); the operator's second
    // one is deduplicated against it.
    let args = ["backup", d, "--vault", "v", "--id", "web01"];
    let out = remote(&client, &srv.url, &op, &args);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an admin token"));
    let first = remote_json(&client, &srv.url, &admin, &args);
    assert_eq!(first["resource"], "web01");
    assert!(u(&first, "bytes_new") > 0, "{first}");
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 7 1M 64k", d]);
    let second = remote_json(&client, &srv.url, &op, &args);
    assert_eq!(second["disks"][0]["chunks_new"], 1, "{second}");
    let res = srv.ok("GET", "/resources/web01", &aud, None, 200);
    assert_eq!(res["kind"], "disk");

    let list = remote_json(
        &client,
        &srv.url,
        &aud,
        &["backups", "list", "--disk", "web01"],
    );
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    let to = env.path("restored.qcow2");
    let id = second["id"].as_str().unwrap();
    let to_s = to.to_str().unwrap();
    let restore_args = ["restore", id, "--to", to_s, "--format", "qcow2"];
    let r = remote_json(&client, &srv.url, &op, &restore_args);
    assert_eq!(r["mode"], "image", "{r}");
    assert!(
        images_equal(&disk, &to),
        "the restore differs from the source"
    );

    let tasks = remote_json(&client, &srv.url, &aud, &["tasks", "list"]);
    let kinds: Vec<_> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["by"] == "ops" && t["state"] == "succeeded")
        .map(|t| t["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["restore", "backup"], "{tasks}");

    // A server of two image files: one backup, every disk back into a directory.
    let sys = format!("system={d}");
    let data = format!("data={}", fixtures().join("disk.raw").display());
    let b = remote_json(
        &client,
        &srv.url,
        &admin,
        &["backup", &sys, &data, "--vault", "v", "--id", "db01"],
    );
    assert_eq!(b["resource_kind"], "server", "{b}");
    let dir = env.path("db01");
    let bid = b["id"].as_str().unwrap();
    let r = remote_json(
        &client,
        &srv.url,
        &op,
        &["restore", bid, "--to", dir.to_str().unwrap()],
    );
    assert_eq!(r["mode"], "directory", "{r}");
    assert!(images_equal(&disk, &dir.join("system.raw")));
    assert!(images_equal(
        &fixtures().join("disk.raw"),
        &dir.join("data.raw")
    ));

    // Refusals carry the appliance's reason; the client never opened a data dir.
    let out = remote(&client, &srv.url, "not-a-token", &["backups", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("(401)"));
    let out = remote(&client, &srv.url, &aud, &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("(403)"));
    let out = remote(&client, &srv.url, &op, &["gc", "--vault", "v"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(403)"));
    let out = remote(&client, &srv.url, &admin, &["vault", "rescan", "v"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not through the API"));
    assert!(
        !client.data().exists(),
        "remote mode touched the client's data dir"
    );
    assert_eq!(
        srv.ok("GET", "/backups", &aud, None, 200)
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(srv.stop());
}

//! Resources in the service take the live-capture settings the CLI has: a freeze/thaw
//! hook set named from the config file (never a command from an API caller) and a guest
//! agent — against a real `blockvault serve`.

use serde_json::json;

use crate::appliance::{Appliance, token};
use crate::common::{Env, random_bytes, s, write_raw};
use crate::maintenance::{LIMIT, remote, task_of};

#[test]
fn a_resource_runs_the_config_files_hook_set_and_the_api_cannot_give_a_command() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let marker = env.path("marker");
    let pwned = env.path("pwned");
    let cfg = env.path("bv.toml");
    let m = marker.display();
    std::fs::write(
        &cfg,
        format!("[scheduler]\ngc_after_prune = false\n[hooks.app]\nfreeze = \"echo frozen >> {m}\"\nthaw = \"echo thawed >> {m}\"\ntimeout_seconds = 10\n"),
    )
    .unwrap();
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap()]);
    let (sys, data) = (env.path("sys.raw"), env.path("data.raw"));
    write_raw(&sys, 4 << 20, 0, &random_bytes(1 << 20, 8));
    write_raw(&data, 4 << 20, 1 << 20, &random_bytes(1 << 20, 9));
    let sources = json!([
        format!("sys={}", sys.display()),
        format!("data={}", data.display())
    ]);

    // Commands through the API are refused, whatever the route; nothing is stored or run.
    let touch = format!("touch {}", pwned.display());
    for (method, path, body) in [
        (
            "POST",
            "/resources",
            json!({"name": "evil", "kind": "server", "sources": sources, "vault": "v", "freeze": touch}),
        ),
        (
            "POST",
            "/resources",
            json!({"name": "evil", "kind": "server", "sources": sources, "vault": "v", "thaw": touch}),
        ),
        (
            "POST",
            "/resources",
            json!({"name": "evil", "kind": "server", "sources": sources, "vault": "v", "hooks": "nope"}),
        ),
        (
            "POST",
            "/resources",
            json!({"name": "evil", "kind": "disk", "sources": [sys], "vault": "v", "hooks": "app"}),
        ),
    ] {
        let (st, v) = srv.call(method, path, Some(&admin), Some(body.clone()));
        assert_eq!(st, 400, "{body}: {v}");
        let msg = v.to_string();
        assert!(
            msg.contains("config file") || msg.contains("servers"),
            "{msg}"
        );
    }
    srv.ok("GET", "/resources/evil", &admin, None, 404);
    // The CLI does not send a command either: it points at hook sets.
    let (sys_s, data_s) = (
        format!("sys={}", sys.display()),
        format!("data={}", data.display()),
    );
    let args = [
        "backup", &sys_s, &data_s, "--vault", "v", "--id", "evil", "--freeze", &touch,
    ];
    let out = remote(&srv.url, &admin, &args);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hook set"),
        "{out:?}"
    );

    let r = srv.ok("POST", "/resources", &admin, Some(json!({"name": "srv", "kind": "server", "sources": sources, "vault": "v", "hooks": "app"})), 201);
    assert_eq!(r["hooks"], "app");
    assert!(r.get("freeze").is_none() && r.get("thaw").is_none(), "{r}");
    let (st, v) = srv.call(
        "PATCH",
        "/resources/srv",
        Some(&admin),
        Some(json!({"freeze": touch})),
    );
    assert_eq!(st, 400, "{v}");
    assert!(!marker.exists(), "nothing ran before a backup");

    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "srv"})),
        202,
    );
    let done = srv.wait_task(&admin, &task_of(&t), LIMIT);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "frozen\nthawed\n"
    );
    assert!(!pwned.exists(), "a command from an API caller ran");
    let b = srv.ok(
        "GET",
        &format!("/backups/{}", s(&done["result"], "backup")),
        &admin,
        None,
        200,
    );
    assert_eq!(b["disks"].as_array().unwrap().len(), 2, "{b}");

    // A policy backup runs the hooks too; the config file's gc_after_prune = false is
    // the default of a policy that does not say.
    let p = json!({"name": "p", "schedule": "0 1 * * *", "resources": ["srv"], "retention": {"keep_last": 1}});
    srv.ok("POST", "/policies", &admin, Some(p), 201);
    let mut pruned = 0;
    for _ in 0..2 {
        let ran = srv.ok("POST", "/policies/p/run", &admin, None, 202);
        let done = srv.wait_task(&admin, ran["tasks"][0].as_str().unwrap(), LIMIT);
        assert_eq!(done["state"], "succeeded", "{done}");
        if done["result"]["pruned"].as_array().unwrap().is_empty() {
            continue;
        }
        pruned += 1;
        let log = done["log"].to_string();
        assert!(
            log.contains("retention pruned") && !log.contains("gc freed"),
            "{log}"
        );
    }
    assert_eq!(pruned, 1, "the second policy run prunes the first");
    let marker_text = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(marker_text, "frozen\nthawed\n".repeat(3));
    assert!(srv.stop());
}

#[test]
fn a_server_resource_with_a_guest_agent_freezes_and_thaws_it_around_the_instant() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let (sys, data) = (env.path("sys.raw"), env.path("data.raw"));
    write_raw(&sys, 4 << 20, 0, &random_bytes(1 << 20, 10));
    write_raw(&data, 4 << 20, 0, &random_bytes(1 << 20, 11));
    let qga = env.path("qga.sock");
    // The SCRIPTED guest agent of the live tests (no VM with a real qemu-ga runs here).
    let (seen, _agent) =
        crate::guest_agent::scripted_guest_agent(&qga, crate::guest_agent::AgentScript::default());
    let sources = json!([
        format!("sys={}", sys.display()),
        format!("data={}", data.display())
    ]);
    let r = json!({"name": "vm", "kind": "server", "sources": sources, "vault": "v", "qga": qga});
    assert_eq!(
        srv.ok("POST", "/resources", &admin, Some(r), 201)["qga"],
        json!(qga)
    );
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "vm"})),
        202,
    );
    let done = srv.wait_task(&admin, &task_of(&t), LIMIT);
    assert_eq!(done["state"], "succeeded", "{done}");
    let cmds: Vec<String> = seen
        .lock()
        .unwrap()
        .commands
        .iter()
        .filter(|c| c.starts_with("guest-fsfreeze"))
        .cloned()
        .collect();
    assert_eq!(
        cmds.first().map(String::as_str),
        Some("guest-fsfreeze-freeze")
    );
    assert!(cmds.iter().any(|c| c == "guest-fsfreeze-thaw"), "{cmds:?}");
    assert!(
        seen.lock().unwrap().frozen_since.is_none(),
        "the guest ends thawed"
    );
    assert!(srv.stop());
}

#[test]
fn a_service_live_backup_puts_its_fleecing_files_in_the_configured_scratch_dir() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let scratch = env.path("scratch");
    let cfg = env.path("bv.toml");
    std::fs::write(
        &cfg,
        format!("[live]\nscratch_dir = \"{}\"\n", scratch.display()),
    )
    .unwrap();
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap()]);
    let a = crate::server::random_image(&env, "a", 4, 12);
    let qsd = crate::qsd::Qsd::start_without_nbd(env.dir.path(), &[("a", &a)]);
    let r = json!({"name": "vm", "kind": "server", "vault": "v",
        "sources": [format!("qmp:{}", qsd.qmp.display())], "nodes": qsd.nodes});
    srv.ok("POST", "/resources", &admin, Some(r), 201);
    let backup = |want: &str| {
        let t = srv.ok(
            "POST",
            "/backups",
            &admin,
            Some(json!({"resource": "vm"})),
            202,
        );
        let done = srv.wait_task(&admin, &task_of(&t), LIMIT);
        assert_eq!(done["state"], want, "{done}");
        done
    };
    // The scratch dir does not exist: QEMU is told to create the fleecing image there
    // (not in the temp dir), fails, and the error names it; nothing is left in QEMU.
    let failed = backup("failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains(&scratch.display().to_string()),
        "{failed}"
    );
    assert!(qsd.leftovers().is_empty(), "{:?}", qsd.leftovers());
    std::fs::create_dir(&scratch).unwrap();
    let ok = backup("succeeded");
    assert_eq!(
        ok["bytes_done"], 3_932_160,
        "the disk's data was read: {ok}"
    );
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "the fleecing image and socket are removed"
    );
    assert!(srv.stop());
}

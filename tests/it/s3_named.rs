//! `[s3.NAME]` in the config file (issue 17): a vault created on a real Garage with
//! `--s3-config NAME` and no `AWS_*` in the environment takes endpoint, region and
//! credentials from the config; the vault remembers the name (no secret in its state),
//! the CLI and the service both use it, and the secret is never in argv nor in the logs.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::appliance::{agent_for, parse_ready, token};
use crate::common::*;
use crate::garage::Garage;

#[test]
fn a_vault_created_with_a_named_s3_config_works_without_aws_env_and_never_shows_the_secret() {
    let g = Garage::start();
    let env = Env::bare();
    let id_file = env.path("g.id");
    let secret_file = env.path("g.secret");
    std::fs::write(&id_file, format!("{}\n", g.key_id)).unwrap();
    std::fs::write(&secret_file, format!("{}\n", g.secret)).unwrap();
    for f in [&id_file, &secret_file] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let cfg = env.path("blockvault.toml");
    std::fs::write(
        &cfg,
        format!(
            "[s3.g]\nendpoint = \"{}\"\nregion = \"garage\"\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            g.endpoint,
            id_file.display(),
            secret_file.display()
        ),
    )
    .unwrap();
    let log = env.path("cli.log");
    let run = |args: &[&str]| {
        let out = env
            .cmd()
            .args(args)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("BLOCKVAULT_CONFIG", &cfg)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        let mut all = std::fs::read(&log).unwrap_or_default();
        all.extend_from_slice(&out.stderr);
        all.extend_from_slice(&out.stdout);
        std::fs::write(&log, all).unwrap();
        assert!(!args.iter().any(|a| a.contains(&g.secret)));
        out
    };
    let url = format!("s3://{}/named", g.bucket);

    // A world-readable secret file is refused; nothing is created in the bucket.
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["vault", "create", "s3v", "--s3", &url, "--s3-config", "g"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        use blockvault::vault::store::ChunkStore;
        assert!(g.store("named").len("vault.toml").is_err());
    }
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // An unknown name is refused.
    let out = run(&[
        "vault",
        "create",
        "s3v",
        "--s3",
        &url,
        "--s3-config",
        "nope",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("[s3.nope]"));

    let out = run(&["vault", "create", "s3v", "--s3", &url, "--s3-config", "g"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The state remembers the name, not the key.
    let state = env.data().join("vaults").join("s3v");
    assert!(state.join("s3-config.toml").is_file());
    assert!(!state.join("s3-credentials.toml").exists());
    for f in std::fs::read_dir(&state).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            let text = std::fs::read(&p).unwrap();
            assert!(
                !String::from_utf8_lossy(&text).contains(&g.secret),
                "{}",
                p.display()
            );
        }
    }

    // Backup and restore through it, byte-exact, still without AWS_*.
    let img = env.path("disk.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(3 << 20, 31));
    let out = run(&[
        "--json",
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "s3v",
        "--id",
        "d",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!g.objects("named", "packs").is_empty());
    let restored = env.path("restored.raw");
    let out = run(&[
        "restore",
        s(&b, "id"),
        "--to",
        restored.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(images_equal(&img, &restored));

    // The service opens the vault with the named credentials too (a verify task), and
    // neither its argv nor its log holds the secret.
    let admin = token(&env, "admin", "root");
    let serve_log = env.path("serve.log");
    let mut child = env
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&serve_log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let serve = Serve(child);
    let (url, fp) = parse_ready(&line);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", serve.0.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&g.secret));
    let agent = agent_for(fp.as_deref());
    let api = |method: &str, path: &str, body: &str| -> (u16, serde_json::Value) {
        let rb = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{url}/api/v1{path}"))
            .header("Authorization", format!("Bearer {admin}"))
            .header("content-type", "application/json");
        let mut r = agent
            .run(rb.body(body.as_bytes().to_vec()).unwrap())
            .unwrap();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    };
    let (st, t) = api("POST", "/vaults/s3v/verify", "{}");
    assert_eq!(st, 202, "{t}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let (_, task) = api("GET", &format!("/tasks/{}", s(&t, "task")), "");
        if ["succeeded", "failed", "cancelled"].contains(&task["state"].as_str().unwrap_or("")) {
            break task;
        }
        assert!(Instant::now() < deadline, "verify still running: {task}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let (st, v) = api("GET", "/vaults/s3v", "");
    assert_eq!(st, 200, "{v}");
    assert!(!v.to_string().contains(&g.secret), "{v}");
    drop(serve);
    let serve_text = std::fs::read_to_string(&serve_log).unwrap();
    assert!(
        serve_text.contains("DEBUG"),
        "serve logged nothing at debug"
    );
    assert!(
        !serve_text.contains(&g.secret),
        "the secret is in serve's log"
    );
    let logs = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(
        !logs.contains(&g.secret),
        "the secret is in the CLI's output"
    );
}

/// A running `serve`, killed when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

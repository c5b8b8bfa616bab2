//! The web console's server side and `/metrics`, against a real `blockvault serve`
//! (plain HTTP on 127.0.0.1) with a real vault and qcow2 images. The console's
//! browser tests are `console/tests/console.mjs` (node + chromium).

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, sh};

fn get(url: &str, token: Option<&str>) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut rb = agent.get(url);
    if let Some(t) = token {
        rb = rb.header("Authorization", &format!("Bearer {t}"));
    }
    let mut r = rb.call().unwrap();
    let ty = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        r.status().as_u16(),
        ty,
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// `text` parsed by the Prometheus project's Python parser (`prometheus_client`):
/// {"family": [[labels, value], ...]}.
fn parse_prometheus(text: &str) -> Value {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;
    let mut c = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition (pip install prometheus_client): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(m: &Value, name: &str, label: &str, value: &str) -> f64 {
    m[name]
        .as_array()
        .unwrap_or_else(|| panic!("no {name} in {m}"))
        .iter()
        .find(|s| s[0][label] == value)
        .unwrap_or_else(|| panic!("no {name}{{{label}={value}}} in {m}"))[1]
        .as_f64()
        .unwrap()
}

#[test]
fn the_console_is_served_at_the_root_without_a_token_and_the_api_still_needs_one() {
    let env = Env::new();
    let srv = Appliance::start(&env, &["--plain-http"]);
    let (s, ty, html) = get(&format!("{}/", srv.url), None);
    assert_eq!(s, 200);
    assert!(ty.starts_with("text/html"), "{ty}");
    assert!(html.contains("/app.js") && !html.contains("http"), "{html}");
    let (s, ty, js) = get(&format!("{}/app.js", srv.url), None);
    assert_eq!((s, ty.starts_with("text/javascript")), (200, true));
    assert_eq!(
        js.as_bytes(),
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/console/dist/app.js")).unwrap(),
        "the binary serves the committed bundle"
    );
    assert_eq!(get(&format!("{}/app.css", srv.url), None).0, 200);
    // The data stays behind the token.
    assert_eq!(get(&format!("{}/api/v1/backups", srv.url), None).0, 401);
    assert_eq!(get(&format!("{}/metrics", srv.url), None).0, 401);
    assert_eq!(get(&format!("{}/metrics", srv.url), Some("nope")).0, 401);
    let aud = token(&env, "auditor", "watcher");
    let me = srv.ok("GET", "/whoami", &aud, None, 200);
    assert_eq!(me, json!({"name": "watcher", "role": "auditor"}));
}

#[test]
fn next_runs_of_a_cron_expression_are_listed_and_a_bad_one_is_refused() {
    let env = Env::new();
    let srv = Appliance::start(&env, &["--plain-http"]);
    let aud = token(&env, "auditor", "watcher");
    let v = srv.ok(
        "GET",
        "/schedules/next?cron=15%203%20*%20*%20mon",
        &aud,
        None,
        200,
    );
    let next: Vec<&str> = v["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(next.len(), 5);
    for w in next.windows(2) {
        let (a, b) = (
            time::OffsetDateTime::parse(w[0], &time::format_description::well_known::Rfc3339)
                .unwrap(),
            time::OffsetDateTime::parse(w[1], &time::format_description::well_known::Rfc3339)
                .unwrap(),
        );
        assert_eq!(b - a, time::Duration::days(7), "{next:?}");
        assert_eq!(a.weekday(), time::Weekday::Monday);
        assert_eq!((a.hour(), a.minute()), (3, 15));
    }
    let (s, v) = srv.call(
        "GET",
        "/schedules/next?cron=61%20*%20*%20*%20*",
        Some(&aud),
        None,
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cron expression"),
        "{v}"
    );
    let (s, _) = srv.call(
        "GET",
        "/schedules/next?cron=*%20*%20*%20*%20*&count=500",
        Some(&aud),
        None,
    );
    assert_eq!(s, 400);
}

#[test]
fn metrics_parse_as_prometheus_text_and_match_the_api() {
    let env = Env::new();
    let srv = Appliance::start(&env, &["--plain-http"]);
    let admin = token(&env, "admin", "root");
    let aud = token(&env, "auditor", "watcher");
    let img = env.path("web.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x3c 1M 2M",
            img.to_str().unwrap(),
        ],
    );
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "web", "kind": "disk", "sources": [img], "vault": "v"})),
        201,
    );
    srv.ok(
        "PATCH",
        "/vaults/v",
        &admin,
        Some(json!({"capacity": 1u64 << 30})),
        200,
    );
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(json!({"name": "nightly", "schedule": "0 3 * * *", "resources": ["web"]})),
        201,
    );
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "web"})),
        202,
    );
    let t = srv.wait_task(&admin, t["task"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(t["state"], "succeeded", "{t}");
    // Vault figures are refreshed in the background after a backup: wait for them.
    let t0 = std::time::Instant::now();
    let vault = loop {
        let v = srv.ok("GET", "/vaults/v", &aud, None, 200);
        if v["backups"] == 1 {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "vault figures: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let b = &srv.ok("GET", "/backups", &aud, None, 200)[0];

    let (s, ty, text) = get(&format!("{}/metrics", srv.url), Some(&aud));
    assert_eq!(s, 200, "{text}");
    assert!(ty.starts_with("text/plain; version=0.0.4"), "{ty}");
    let m = parse_prometheus(&text);
    let created = time::OffsetDateTime::parse(
        b["created"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let r = |n: &str| sample(&m, n, "resource", "web");
    assert_eq!(
        r("blockvault_resource_last_success_timestamp_seconds"),
        created.unix_timestamp() as f64
    );
    assert_eq!(
        r("blockvault_resource_last_backup_duration_seconds"),
        b["seconds"].as_f64().unwrap()
    );
    assert_eq!(
        r("blockvault_resource_last_backup_read_bytes"),
        b["bytes_read"].as_f64().unwrap()
    );
    assert_eq!(
        r("blockvault_resource_last_backup_read_bytes"),
        (2 << 20) as f64
    );
    assert_eq!(
        r("blockvault_resource_last_backup_stored_bytes"),
        b["bytes_stored"].as_f64().unwrap()
    );
    let v = |n: &str| sample(&m, n, "vault", "v");
    assert_eq!(
        v("blockvault_vault_logical_bytes"),
        vault["logical_bytes"].as_f64().unwrap()
    );
    assert_eq!(
        v("blockvault_vault_stored_bytes"),
        vault["stored_bytes"].as_f64().unwrap()
    );
    assert!(v("blockvault_vault_stored_bytes") > 0.0);
    assert_eq!(v("blockvault_vault_capacity_bytes"), (1u64 << 30) as f64);
    assert_eq!(v("blockvault_vault_backups"), 1.0);
    let tasks = |st: &str| sample(&m, "blockvault_tasks", "state", st);
    assert_eq!(tasks("succeeded"), 1.0);
    assert_eq!(tasks("failed") + tasks("running") + tasks("queued"), 0.0);
    // The policy never ran: it starts with its next slot, so nothing is late.
    assert_eq!(
        sample(&m, "blockvault_scheduler_lag_seconds", "policy", "nightly"),
        0.0
    );
}

//! Unknown names are refused on every route (issue 15, the contract): the test walks
//! the appliance's own OpenAPI document, sends every route that takes a JSON body a
//! valid body plus one field it does not know, and every route a query parameter it
//! does not take, and checks each is refused in the one error shape naming the name —
//! and that nothing changed: no vault, resource, policy, token, backup, export or task
//! appeared, went or changed, no backup was protected or locked, no restore was written.

use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, random_bytes, s, write_raw};

/// Bodies that carry another format than the API's requests: a backup manifest or a
/// vault's `[encryption]` key material (the vault's own versioned formats) pushed to a
/// mirror vault.
const NOT_API_BODIES: &[&str] = &[
    "POST /api/v1/vaults/{name}/replica/manifest/present",
    "PUT /api/v1/vaults/{name}/replica/manifest",
    "PUT /api/v1/vaults/{name}/replica/manifest/sealed",
    "PUT /api/v1/vaults/{name}/replica/encryption",
];

/// What a test can see of the appliance's state (everything but the audit log, which
/// records the refusals themselves).
fn state(srv: &Appliance, admin: &str, backup: &str) -> Value {
    let get = |p: &str| srv.ok("GET", p, admin, None, 200);
    let tasks: Vec<Value> = get("/tasks")
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!([t["id"], t["state"]]))
        .collect();
    let detail = get(&format!("/backups/{backup}"));
    json!({
        "vaults": get("/vaults").as_array().unwrap().iter()
            .map(|v| json!([v["name"], v["capacity"]])).collect::<Vec<_>>(),
        "resources": get("/resources"),
        "policies": get("/policies"),
        "tokens": get("/tokens").as_array().unwrap().iter()
            .map(|t| t["name"].clone()).collect::<Vec<_>>(),
        "backups": get("/backups"),
        "lock": [detail["protected"], detail["locked_until"]],
        "instant": get("/instant").as_array().unwrap().iter()
            .map(|e| json!([e["id"], e["state"]])).collect::<Vec<_>>(),
        "tasks": tasks,
    })
}

/// A valid body for route `key` ("METHOD /api/v1/PATH" of the document).
fn valid_body(key: &str, backup: &str, restore_to: &str, image: &str) -> Option<Value> {
    Some(match key {
        "POST /api/v1/vaults" => json!({"name": "w2"}),
        "PATCH /api/v1/vaults/{name}" => json!({"capacity": 1u64 << 40}),
        "POST /api/v1/vaults/{name}/verify" => json!({"sample": 100}),
        "POST /api/v1/vaults/{name}/gc" => json!({"repack_below": 50}),
        "POST /api/v1/resources" => {
            json!({"name": "db", "kind": "disk", "sources": [image], "vault": "v"})
        }
        "PATCH /api/v1/resources/{name}" => json!({"sources": [image]}),
        "POST /api/v1/backups" => json!({"resource": "web"}),
        "POST /api/v1/backups/{id}/protect" => json!({"protected": true}),
        "POST /api/v1/backups/{id}/lock" => json!({"until": "2099-01-01"}),
        "POST /api/v1/backups/{id}/drill" => json!({"accel": "tcg", "timeout_seconds": 30}),
        "POST /api/v1/restores" => json!({"backup": backup, "to": restore_to}),
        "POST /api/v1/replications" => json!({"from": "v", "to": "w"}),
        "POST /api/v1/policies" => {
            json!({"name": "weekly", "schedule": "0 4 * * SUN", "resources": ["web"]})
        }
        "PATCH /api/v1/policies/{name}" => json!({"schedule": "0 5 * * *"}),
        "POST /api/v1/tokens" => json!({"name": "newcomer", "role": "auditor"}),
        "POST /api/v1/instant" => json!({"backup": backup}),
        "POST /api/v1/vaults/{name}/replica/missing" => json!({"digests": []}),
        _ => return None,
    })
}

/// `path` of the document with its parameters filled in.
fn concrete(path: &str, backup: &str, task: &str, export: &str) -> String {
    let p = path.strip_prefix("/api/v1").unwrap_or(path);
    let p = if p.starts_with("/resources/") {
        p.replace("{name}", "web")
    } else if p.starts_with("/policies/") {
        p.replace("{name}", "nightly")
    } else if p.starts_with("/tokens/") {
        p.replace("{name}", "eve")
    } else {
        p.replace("{name}", "v")
    };
    let id = if p.starts_with("/tasks/") {
        task
    } else if p.starts_with("/instant/") {
        export
    } else {
        backup
    };
    p.replace("{id}", id)
}

/// `text` is `400 {"error": {"kind": "bad_request", "message"}}` naming `name`.
fn refused_naming(what: &str, status: u16, text: &str, name: &str) {
    assert_eq!(status, 400, "{what}: {text}");
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
    assert_eq!(v["error"]["kind"], "bad_request", "{what}: {v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(name),
        "{what}: the message does not name {name}: {msg}"
    );
}

#[test]
fn every_route_refuses_an_unknown_body_field_or_query_parameter_and_changes_nothing() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    token(&env, "auditor", "eve");
    let srv = Appliance::start(&env, &[]);
    let img = env.path("web.raw");
    write_raw(&img, 4 << 20, 1 << 20, &random_bytes(256 << 10, 3));
    let image = img.display().to_string();
    srv.ok("POST", "/vaults", &admin, Some(json!({"name": "w"})), 201);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "web", "kind": "disk", "sources": [image], "vault": "v"})),
        201,
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
    let task = srv.wait_task(&admin, s(&t, "task"), Duration::from_secs(120));
    assert_eq!(task["state"], "succeeded", "{task}");
    let backup = s(&task["result"], "backup").to_string();
    let task = s(&task, "id").to_string();
    let export = srv.ok(
        "POST",
        "/instant",
        &admin,
        Some(json!({"backup": backup})),
        201,
    );
    let export = s(&export, "id").to_string();
    let restore_to = env.path("restored.raw");
    let to = restore_to.display().to_string();

    let before = state(&srv, &admin, &backup);
    let doc = srv.ok("GET", "/openapi.json", &admin, None, 200);
    let (mut bodies, mut queries) = (0, 0);
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            let key = format!("{method} {path}");
            let at = concrete(path, &backup, &task, &export);
            let json_body = op["requestBody"]["content"]
                .get("application/json")
                .is_some();
            let body = valid_body(&key, &backup, &to, &image);
            if json_body && !NOT_API_BODIES.contains(&key.as_str()) {
                let mut b = body.clone().unwrap_or_else(|| {
                    panic!("{key} takes a JSON body: give the test a valid one (valid_body)")
                });
                b["colour"] = json!("red");
                let (st, _, text) = srv.raw(&method, &at, Some(&admin), &b.to_string());
                refused_naming(&format!("{key} with {b}"), st, &text, "colour");
                bodies += 1;
            }
            let text = body.map_or(String::new(), |b| b.to_string());
            let (st, _, answer) =
                srv.raw(&method, &format!("{at}?colour=red"), Some(&admin), &text);
            refused_naming(&format!("{key}?colour=red"), st, &answer, "colour");
            queries += 1;
        }
    }
    assert!(bodies >= 17, "only {bodies} body routes walked");
    assert!(queries >= 50, "only {queries} routes walked");
    // A parameter a route does take still works, and a misspelt one is named.
    let (st, _, text) = srv.raw("GET", "/backups?resorce=web", Some(&admin), "");
    refused_naming("GET /backups?resorce=web", st, &text, "resorce");
    let listed = srv.ok("GET", "/backups?resource=web&limit=1", &admin, None, 200);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let after = state(&srv, &admin, &backup);
    assert_eq!(before, after, "a refused request changed something");
    assert!(!restore_to.exists(), "a refused restore wrote {to}");
}

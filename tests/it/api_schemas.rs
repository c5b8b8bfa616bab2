//! Real answers match the OpenAPI document (issue 15, the contract): a small real
//! scenario against a real `serve` — vaults, a resource, a policy, a backup, a restore
//! (compared byte for byte), a drill in a throwaway VM, an instant-access export,
//! tokens, verify, GC, replication, the audit log — where every JSON answer is
//! validated (`jsonschema`, JSON Schema 2020-12 as OpenAPI 3.1 uses it) against the
//! schema the appliance's own document gives for that route and status, every `$ref`
//! resolved against its components. `/metrics` is Prometheus text (see `console.rs`).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, s};
use crate::drill::{boot_sector, disk};

/// Routes the scenario does not call: the mirror-vault routes (another appliance's
/// push, tested in `mirror.rs`) and the answers that are bytes, not JSON.
const NOT_CALLED: &[&str] = &[
    "GET /api/v1/vaults/{name}/replica/info",
    "POST /api/v1/vaults/{name}/replica/missing",
    "PUT /api/v1/vaults/{name}/replica/blobs",
    "POST /api/v1/vaults/{name}/replica/manifest/present",
    "PUT /api/v1/vaults/{name}/replica/manifest",
    "PUT /api/v1/vaults/{name}/replica/manifest/sealed",
    "PUT /api/v1/vaults/{name}/replica/encryption",
    "GET /api/v1/backups/{id}/files/content",
    "GET /api/v1/backups/{id}/drill/screenshot",
];

/// The served document, and which routes have been checked against it.
struct Checked<'a> {
    srv: &'a Appliance,
    token: String,
    doc: Value,
    seen: std::cell::RefCell<BTreeSet<String>>,
    /// Answers off their schema (all are listed at the end).
    off: std::cell::RefCell<Vec<String>>,
}

impl Checked<'_> {
    /// `method template` (a path of the document, `{x}` filled from `args` in order)
    /// with `body`; the answer must be JSON valid against the document's schema for its
    /// status. Returns (status, answer).
    fn call(
        &self,
        method: &str,
        template: &str,
        args: &[&str],
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut path = template.to_string();
        for a in args {
            let (i, j) = (path.find('{').unwrap(), path.find('}').unwrap());
            path.replace_range(i..=j, a);
        }
        let query = path
            .find('?')
            .map(|i| path.split_off(i))
            .unwrap_or_default();
        let template = template.split('?').next().unwrap();
        let (status, v) = self
            .srv
            .call(method, &format!("{path}{query}"), Some(&self.token), body);
        let key = format!("{method} /api/v1{template}");
        let op = &self.doc["paths"][format!("/api/v1{template}")][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{key} is not in the document");
        let answer = &op["responses"][status.to_string()];
        assert!(
            answer.is_object(),
            "{key}: the document gives no {status} answer: {v}"
        );
        let mut schema = answer["content"]["application/json"]["schema"].clone();
        assert!(
            schema.is_object(),
            "{key} {status}: no JSON schema in the document"
        );
        schema["components"] = self.doc["components"].clone();
        schema["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| {
            panic!("{key} {status}: the document's schema does not compile: {e}")
        });
        let errors: Vec<String> = validator
            .iter_errors(&v)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if !errors.is_empty() {
            self.off.borrow_mut().push(format!(
                "{key} answered {status} off its schema:\n  {}\nanswer: {v:#}",
                errors.join("\n  ")
            ));
        }
        self.seen.borrow_mut().insert(key);
        (status, v)
    }

    fn ok(
        &self,
        method: &str,
        template: &str,
        args: &[&str],
        body: Option<Value>,
        want: u16,
    ) -> Value {
        let (status, v) = self.call(method, template, args, body);
        assert_eq!(status, want, "{method} {template} {args:?}: {v}");
        v
    }

    /// Wait for task `id` (checking every answer); it must succeed.
    fn wait(&self, id: &str) -> Value {
        let t0 = std::time::Instant::now();
        loop {
            let t = self.ok("GET", "/tasks/{id}", &[id], None, 200);
            match t["state"].as_str().unwrap() {
                "succeeded" => return t,
                "failed" | "cancelled" => panic!("task {id}: {t:#}"),
                _ => {}
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "task {id}: {t}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn every_answer_of_a_real_scenario_matches_the_openapi_schema_of_its_route_and_status() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let doc = srv.ok("GET", "/openapi.json", &admin, None, 200);
    let c = Checked {
        srv: &srv,
        token: admin.clone(),
        doc,
        seen: Default::default(),
        off: Default::default(),
    };
    let img = env.path("web.img");
    disk(&img, &boot_sector("schema drill up\r\n"), 4 << 20);
    let image = img.display().to_string();

    c.ok("GET", "/health", &[], None, 200);
    c.ok("GET", "/whoami", &[], None, 200);
    c.ok("GET", "/openapi.json", &[], None, 200);
    c.ok(
        "GET",
        "/schedules/next?cron=0%203%20*%20*%20*",
        &[],
        None,
        200,
    );
    c.ok("POST", "/vaults", &[], Some(json!({"name": "w"})), 201);
    c.ok(
        "POST",
        "/vaults",
        &[],
        Some(json!({"name": "gone", "chunk_size": "128K"})),
        201,
    );
    c.ok("GET", "/vaults", &[], None, 200);
    c.ok(
        "PATCH",
        "/vaults/{name}",
        &["v"],
        Some(json!({"capacity": 1u64 << 30})),
        200,
    );
    c.ok("GET", "/vaults/{name}", &["v"], None, 200);
    c.ok("DELETE", "/vaults/{name}", &["gone"], None, 200);
    let res = json!({"name": "web", "kind": "disk", "sources": [image], "vault": "v"});
    c.ok("POST", "/resources", &[], Some(res), 201);
    let other = json!({"name": "db", "kind": "disk", "sources": [image], "vault": "w"});
    c.ok("POST", "/resources", &[], Some(other), 201);
    c.ok(
        "PATCH",
        "/resources/{name}",
        &["db"],
        Some(json!({"vault": "v"})),
        200,
    );
    c.ok("GET", "/resources", &[], None, 200);
    c.ok("GET", "/resources/{name}", &["web"], None, 200);
    c.ok("DELETE", "/resources/{name}", &["db"], None, 200);
    let pol = json!({"name": "nightly", "schedule": "0 3 * * *", "resources": ["web"],
        "retention": {"keep_last": 5}});
    c.ok("POST", "/policies", &[], Some(pol), 201);
    let pol =
        json!({"name": "weekly", "schedule": "0 4 * * SUN", "kind": "verify", "vaults": ["v"]});
    c.ok("POST", "/policies", &[], Some(pol), 201);
    c.ok(
        "PATCH",
        "/policies/{name}",
        &["weekly"],
        Some(json!({"sample": 50})),
        200,
    );
    c.ok("GET", "/policies", &[], None, 200);
    c.ok("GET", "/policies/{name}", &["nightly"], None, 200);
    c.ok("DELETE", "/policies/{name}", &["weekly"], None, 200);

    let t = c.ok(
        "POST",
        "/backups",
        &[],
        Some(json!({"resource": "web"})),
        202,
    );
    let done = c.wait(s(&t, "task"));
    let backup = s(&done["result"], "backup").to_string();
    c.ok("GET", "/backups", &[], None, 200);
    c.ok("GET", "/backups/{id}", &[&backup], None, 200);
    c.ok("GET", "/backups/{id}?disk=web", &["latest"], None, 200);
    c.call("GET", "/backups/{id}/files", &[&backup], None);
    c.ok("POST", "/policies/{name}/preview", &["nightly"], None, 200);

    let to = env.path("restored.raw");
    let r = json!({"backup": backup, "to": to.display().to_string()});
    let t = c.ok("POST", "/restores", &[], Some(r), 202);
    c.wait(s(&t, "task"));
    assert_eq!(
        std::fs::read(&to).unwrap(),
        std::fs::read(&img).unwrap(),
        "restored image"
    );
    std::fs::remove_file(&to).unwrap();

    let drill = json!({"check": "console:schema drill up", "accel": "tcg", "timeout_seconds": 120});
    let t = c.ok("POST", "/backups/{id}/drill", &[&backup], Some(drill), 202);
    c.wait(s(&t, "task"));
    let listed = c.ok("GET", "/backups", &[], None, 200);
    assert_eq!(listed[0]["verified_boot"]["ok"], true, "{listed:#}");
    c.ok("GET", "/backups/{id}", &[&backup], None, 200);

    let e = c.ok(
        "POST",
        "/instant",
        &[],
        Some(json!({"backup": backup})),
        201,
    );
    c.ok("GET", "/instant", &[], None, 200);
    c.ok("DELETE", "/instant/{id}", &[s(&e, "id")], None, 200);

    let t = c.ok(
        "POST",
        "/replications",
        &[],
        Some(json!({"from": "v", "to": "w"})),
        202,
    );
    c.wait(s(&t, "task"));
    let t = c.ok(
        "POST",
        "/vaults/{name}/verify",
        &["v"],
        Some(json!({})),
        202,
    );
    c.wait(s(&t, "task"));
    let t = c.ok("POST", "/vaults/{name}/gc", &["w"], None, 202);
    let gc = s(&t, "task").to_string();
    c.wait(&gc);
    c.ok("POST", "/tasks/{id}/cancel", &[&gc], None, 200);
    let run = c.ok("POST", "/policies/{name}/run", &["nightly"], None, 202);
    for t in run["tasks"].as_array().unwrap() {
        c.wait(t.as_str().unwrap());
    }
    c.ok("GET", "/tasks", &[], None, 200);
    c.ok("GET", "/tasks?state=succeeded", &[], None, 200);
    let copies = c.ok("GET", "/backups?vault=w", &[], None, 200);
    let copy = s(&copies[0], "id").to_string();
    c.ok(
        "POST",
        "/backups/{id}/protect",
        &[&copy],
        Some(json!({"protected": false})),
        200,
    );
    c.ok(
        "POST",
        "/backups/{id}/lock",
        &[&copy],
        Some(json!({"until": "2099-01-01"})),
        200,
    );
    let ids = c.ok("GET", "/backups?vault=v", &[], None, 200);
    let last = s(&ids[0], "id").to_string();
    c.ok("DELETE", "/backups/{id}", &[&last], None, 200);

    c.ok(
        "POST",
        "/tokens",
        &[],
        Some(json!({"name": "eve", "role": "auditor"})),
        201,
    );
    c.ok("GET", "/tokens", &[], None, 200);
    c.ok("DELETE", "/tokens/{name}", &["eve"], None, 200);
    c.ok("GET", "/audit", &[], None, 200);
    c.ok("GET", "/alerts", &[], None, 200);
    c.ok("GET", "/alerts/deliveries", &[], None, 200);
    c.ok("GET", "/webhooks", &[], None, 200);
    // Errors match the error body of their status too.
    c.ok("GET", "/vaults/{name}", &["nope"], None, 404);
    c.ok("POST", "/vaults", &[], Some(json!({"name": "v"})), 409);
    c.ok(
        "POST",
        "/backups",
        &[],
        Some(json!({"resource": "web", "x": 1})),
        400,
    );

    let off = c.off.borrow();
    assert!(off.is_empty(), "{}", off.join("\n\n"));
    let seen = c.seen.borrow();
    let missed: Vec<String> = c.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(p, _)| p.starts_with("/api/v1"))
        .flat_map(|(p, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| format!("{} {p}", m.to_ascii_uppercase()))
        })
        .filter(|k| !seen.contains(k) && !NOT_CALLED.contains(&k.as_str()))
        .collect();
    assert!(
        missed.is_empty(),
        "routes the scenario never checked: {missed:#?}"
    );
}

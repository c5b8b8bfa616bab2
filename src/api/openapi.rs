//! The OpenAPI 3.1 document, generated from the route table.

use axum::Json;
use serde_json::{Map, Value, json};

use super::{ANONYMOUS, ROUTES};

/// The document as JSON.
pub fn build() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let path = format!("/api/v1{}", r.path);
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut responses = Map::new();
        let ok = match (r.method, r.path) {
            ("POST", "/backups" | "/restores" | "/replications" | "/backups/{id}/drill")
            | ("POST", "/policies/{name}/run") => "202",
            ("POST", "/vaults" | "/resources" | "/policies" | "/tokens") => "201",
            _ => "200",
        };
        let media = if r.path.ends_with("/files/content") {
            "application/octet-stream"
        } else {
            "application/json"
        };
        responses.insert(
            ok.into(),
            json!({"description": "success", "content": {media: {}}}),
        );
        let anonymous = r.method == "GET" && ANONYMOUS.contains(&r.path);
        for (code, what) in [
            ("401", "no or unknown token"),
            ("403", "the token's role may not"),
        ] {
            if anonymous && code == "401" {
                responses.insert(code.into(), json!({"description": "unknown token"}));
                continue;
            }
            responses.insert(code.into(), json!({"description": what}));
        }
        let mut op = json!({
            "summary": r.summary,
            "x-required-role": r.role.as_str(),
            "security": [{"bearer": []}],
            "responses": responses,
        });
        if anonymous {
            // Without a token: `{"status": "ok"}` only; the role applies to the full answer.
            op["security"] = json!([{}, {"bearer": []}]);
            op["x-anonymous"] = json!(true);
        }
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if matches!(r.method, "POST" | "PATCH") {
            op["requestBody"] = json!({"content": {"application/json": {}}});
        }
        let entry = paths.entry(path).or_insert_with(|| json!({}));
        entry[r.method.to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "blockvault appliance API", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    })
}

pub async fn document() -> Json<Value> {
    Json(build())
}

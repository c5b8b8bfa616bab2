//! The OpenAPI 3.1 document, generated from the route table ([`super::ROUTES`]) and,
//! for each route, its shapes in [`SHAPES`] (keyed by method and path, so a new route
//! adds one line here beside its line in the table): request body, query parameters
//! and success answer, each a Rust type whose schema `utoipa` derives (`ToSchema`).
//! The component schemas are collected from the types the table names, so the document
//! cannot name a schema it does not hold; a test checks every route has its shapes.
//!
//! Every operation carries `x-blockvault-role` (the least role), the bearer security
//! scheme, and the error body `{"error": {"kind", "message"}}` for 4xx/5xx. List routes
//! document `limit`/`offset` and the `X-Total-Count` header. `GET /metrics` (outside
//! `/api/v1`, Prometheus text) is listed too.

use std::collections::BTreeMap;

use axum::Json;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, schema::Schema};

use super::schema::*;
use super::{ANONYMOUS, ROUTES};
use crate::app::{RestoreRequest, VaultInfo};
use crate::catalog::{AlertRecord, AuditRecord, DeliveryRecord, TokenInfo};
use crate::service::{DrillRequest, GcRequest, Policy, ReplicateRequest, Resource, VerifyRequest};
use crate::task::TaskInfo;

/// A schema by name with every schema it refers to.
type Named = (String, Vec<(String, RefOr<Schema>)>);

fn t<T: ToSchema>() -> Named {
    let mut all = vec![(T::name().into_owned(), T::schema())];
    T::schemas(&mut all);
    (T::name().into_owned(), all)
}

/// A resource as `GET /resources` and `GET /resources/{name}` show it: [`Resource`]
/// with `last_drill` (its latest drill's verdict, or null). Built from `Resource`'s own
/// schema, so the two cannot drift apart.
fn resource_view() -> Named {
    let (_, mut all) = t::<Resource>();
    let mut v =
        serde_json::to_value(<Resource as utoipa::PartialSchema>::schema()).unwrap_or(Value::Null);
    v["properties"]["last_drill"] = json!({
        "type": ["object", "null"],
        "description": "The verdict of the latest drill of one of its backups, or null.",
    });
    let view =
        serde_json::from_value(v).unwrap_or_else(|_| <Resource as utoipa::PartialSchema>::schema());
    all.push(("ResourceView".into(), view));
    ("ResourceView".into(), all)
}

/// A success answer.
#[derive(Clone, Copy)]
pub enum Answer {
    /// One `T` as JSON.
    One(fn() -> Named),
    /// A JSON array of `T`, paginated (`limit`/`offset`, `X-Total-Count`).
    List(fn() -> Named),
    /// A JSON object from names (resources) to `T`.
    Map(fn() -> Named),
    /// Raw bytes (`application/octet-stream`).
    Bytes,
}

/// What one route takes and gives.
pub struct Shape {
    pub method: &'static str,
    pub path: &'static str,
    /// JSON body; `body_required` false: it may be left out.
    pub body: Option<fn() -> Named>,
    pub body_required: bool,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    pub status: u16,
    pub answer: Answer,
}

const fn s(method: &'static str, path: &'static str, status: u16, answer: Answer) -> Shape {
    Shape {
        method,
        path,
        body: None,
        body_required: true,
        query: &[],
        status,
        answer,
    }
}

const fn b(mut sh: Shape, body: fn() -> Named) -> Shape {
    sh.body = Some(body);
    sh
}

const fn opt(mut sh: Shape) -> Shape {
    sh.body_required = false;
    sh
}

const fn q(mut sh: Shape, query: &'static [(&'static str, &'static str)]) -> Shape {
    sh.query = query;
    sh
}

use Answer::{Bytes, List, Map as ByName, One};

const DISK: (&str, &str) = (
    "disk",
    "with `latest` as id: the resource or disk whose latest backup",
);
const FILE_Q: &[(&str, &str)] = &[
    DISK,
    ("partition", "partition number (default: the whole disk)"),
    ("path", "a path in the file system"),
];

/// Every route's shapes, keyed by method and path (the same as in [`ROUTES`]).
pub const SHAPES: &[Shape] = &[
    s("GET", "/health", 200, One(t::<Health>)),
    s("GET", "/openapi.json", 200, One(t::<OpenApiDocument>)),
    s("GET", "/whoami", 200, One(t::<WhoAmI>)),
    q(
        s("GET", "/schedules/next", 200, One(t::<NextRuns>)),
        &[
            ("cron", "the cron expression (5 or 6 fields)"),
            ("count", "how many (1-20, default 5)"),
        ],
    ),
    s("GET", "/vaults", 200, List(t::<VaultInfo>)),
    b(
        s("POST", "/vaults", 201, One(t::<VaultInfo>)),
        t::<NewVault>,
    ),
    s("GET", "/vaults/{name}", 200, One(t::<VaultInfo>)),
    b(
        s("PATCH", "/vaults/{name}", 200, One(t::<VaultInfo>)),
        t::<PatchVault>,
    ),
    s("DELETE", "/vaults/{name}", 200, One(t::<Forgotten>)),
    opt(b(
        s("POST", "/vaults/{name}/verify", 202, One(t::<TaskAccepted>)),
        t::<VerifyRequest>,
    )),
    opt(b(
        s("POST", "/vaults/{name}/gc", 202, One(t::<TaskAccepted>)),
        t::<GcRequest>,
    )),
    s("GET", "/resources", 200, List(resource_view)),
    b(
        s("POST", "/resources", 201, One(t::<Resource>)),
        t::<Resource>,
    ),
    s("GET", "/resources/{name}", 200, One(resource_view)),
    b(
        s("PATCH", "/resources/{name}", 200, One(t::<Resource>)),
        t::<ResourcePatch>,
    ),
    s("DELETE", "/resources/{name}", 200, One(t::<Deleted>)),
    b(
        s("POST", "/backups", 202, One(t::<TaskAccepted>)),
        t::<NewBackup>,
    ),
    q(
        s("GET", "/backups", 200, List(t::<BackupView>)),
        &[
            ("vault", "only backups in this vault"),
            ("resource", "only backups of this resource"),
        ],
    ),
    q(
        s("GET", "/backups/{id}", 200, One(t::<BackupView>)),
        &[DISK],
    ),
    s("DELETE", "/backups/{id}", 200, One(t::<DeletedBackup>)),
    opt(b(
        s("POST", "/backups/{id}/protect", 200, One(t::<Protected>)),
        t::<ProtectBody>,
    )),
    b(
        s("POST", "/backups/{id}/lock", 200, One(t::<Locked>)),
        t::<LockBody>,
    ),
    q(
        opt(b(
            s("POST", "/backups/{id}/drill", 202, One(t::<TaskAccepted>)),
            t::<DrillRequest>,
        )),
        &[DISK],
    ),
    q(
        s("GET", "/backups/{id}/files", 200, One(t::<FileListing>)),
        FILE_Q,
    ),
    q(s("GET", "/backups/{id}/files/content", 200, Bytes), FILE_Q),
    b(
        s("POST", "/restores", 202, One(t::<TaskAccepted>)),
        t::<RestoreRequest>,
    ),
    b(
        s("POST", "/replications", 202, One(t::<TaskAccepted>)),
        t::<ReplicateRequest>,
    ),
    s("GET", "/policies", 200, List(t::<Policy>)),
    b(s("POST", "/policies", 201, One(t::<Policy>)), t::<Policy>),
    s("GET", "/policies/{name}", 200, One(t::<Policy>)),
    b(
        s("PATCH", "/policies/{name}", 200, One(t::<Policy>)),
        t::<PolicyPatch>,
    ),
    s("DELETE", "/policies/{name}", 200, One(t::<Deleted>)),
    s(
        "POST",
        "/policies/{name}/preview",
        200,
        ByName(t::<RetentionPreview>),
    ),
    s("POST", "/policies/{name}/run", 202, One(t::<TasksAccepted>)),
    q(
        s("GET", "/tasks", 200, List(t::<TaskInfo>)),
        &[("state", "queued, running, succeeded, failed or cancelled")],
    ),
    s("GET", "/tasks/{id}", 200, One(t::<TaskInfo>)),
    s("POST", "/tasks/{id}/cancel", 200, One(t::<TaskInfo>)),
    s("GET", "/audit", 200, List(t::<AuditRecord>)),
    s("GET", "/alerts", 200, List(t::<AlertRecord>)),
    s("GET", "/alerts/deliveries", 200, List(t::<DeliveryRecord>)),
    s("GET", "/tokens", 200, List(t::<TokenInfo>)),
    b(
        s("POST", "/tokens", 201, One(t::<CreatedToken>)),
        t::<NewToken>,
    ),
    s("DELETE", "/tokens/{name}", 200, One(t::<Deleted>)),
    s("GET", "/backups/{id}/drill/screenshot", 200, Bytes),
    b(
        s("POST", "/instant", 201, One(t::<LooseObject>)),
        t::<LooseObject>,
    ),
    s("GET", "/instant", 200, One(t::<LooseList>)),
    s("DELETE", "/instant/{id}", 200, One(t::<LooseObject>)),
    s(
        "GET",
        "/vaults/{name}/replica/info",
        200,
        One(t::<LooseObject>),
    ),
    b(
        s(
            "POST",
            "/vaults/{name}/replica/missing",
            200,
            One(t::<LooseObject>),
        ),
        t::<LooseObject>,
    ),
    // The body is the binary blob framing of `replicate::wire`, not JSON.
    s(
        "PUT",
        "/vaults/{name}/replica/blobs",
        200,
        One(t::<LooseObject>),
    ),
    b(
        s(
            "POST",
            "/vaults/{name}/replica/manifest/present",
            200,
            One(t::<LooseObject>),
        ),
        t::<LooseObject>,
    ),
    b(
        s(
            "PUT",
            "/vaults/{name}/replica/manifest",
            200,
            One(t::<LooseObject>),
        ),
        t::<LooseObject>,
    ),
    b(
        s(
            "PUT",
            "/vaults/{name}/replica/manifest/sealed",
            200,
            One(t::<LooseObject>),
        ),
        t::<LooseObject>,
    ),
    b(
        s(
            "PUT",
            "/vaults/{name}/replica/encryption",
            200,
            One(t::<LooseObject>),
        ),
        t::<LooseObject>,
    ),
    s("GET", "/webhooks", 200, One(t::<LooseList>)),
];

/// The shapes of route `method path`.
pub fn shape_of(method: &str, path: &str) -> Option<&'static Shape> {
    SHAPES.iter().find(|s| s.method == method && s.path == path)
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn error_response(what: &str) -> Value {
    json!({"description": what, "content": {"application/json": {"schema": schema_ref("ErrorBody")}}})
}

/// The document as JSON.
pub fn build() -> Value {
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    let mut use_schema = |named: fn() -> Named| -> String {
        let (name, all) = named();
        for (n, sch) in all {
            schemas
                .entry(n)
                .or_insert_with(|| serde_json::to_value(sch).unwrap_or(Value::Null));
        }
        name
    };
    use_schema(t::<ErrorBody>);
    let mut paths = Map::new();
    for r in ROUTES {
        let path = format!("/api/v1{}", r.path);
        let shape = shape_of(r.method, r.path);
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut responses = Map::new();
        let (status, answer) = shape.map_or((200, Answer::Bytes), |s| (s.status, s.answer));
        let content = match answer {
            Answer::One(n) => {
                json!({"application/json": {"schema": schema_ref(&use_schema(n))}})
            }
            Answer::List(n) => {
                json!({"application/json": {"schema": {"type": "array", "items": schema_ref(&use_schema(n))}}})
            }
            Answer::Map(n) => {
                json!({"application/json": {"schema": {"type": "object", "additionalProperties": schema_ref(&use_schema(n))}}})
            }
            Answer::Bytes => {
                json!({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})
            }
        };
        let mut ok = json!({"description": "success", "content": content});
        if let Answer::List(_) = answer {
            ok["headers"] = json!({"X-Total-Count": {
                "description": "how many items match, over all pages",
                "schema": {"type": "integer", "minimum": 0},
            }});
            params.push(json!({"name": "limit", "in": "query", "required": false,
                "description": "at most this many items", "schema": {"type": "integer", "minimum": 1}}));
            params.push(json!({"name": "offset", "in": "query", "required": false,
                "description": "skip this many items first", "schema": {"type": "integer", "minimum": 0}}));
        }
        responses.insert(status.to_string(), ok);
        let anonymous = r.method == "GET" && ANONYMOUS.contains(&r.path);
        for (code, what) in [
            ("400", "bad input (what is wrong and where)"),
            ("401", "no or unknown token"),
            ("403", "the token's role may not"),
            ("404", "no such object"),
            ("409", "conflicts with the object's state"),
            ("500", "the appliance failed"),
        ] {
            let what = if anonymous && code == "401" {
                "unknown token"
            } else {
                what
            };
            responses.insert(code.into(), error_response(what));
        }
        let mut op = json!({
            "operationId": format!("{} {}", r.method, r.path),
            "summary": r.summary,
            "x-blockvault-role": r.role.as_str(),
            "security": [{"bearer": []}],
            "responses": responses,
        });
        if anonymous {
            // Without a token: `{"status": "ok"}` only; the role applies to the full answer.
            op["security"] = json!([{}, {"bearer": []}]);
            op["x-anonymous"] = json!(true);
        }
        for (name, what) in shape.map_or(&[][..], |s| s.query) {
            params.push(json!({"name": name, "in": "query", "required": false,
                "description": what, "schema": {"type": "string"}}));
        }
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(body) = shape.and_then(|s| s.body.map(|b| (b, s.body_required))) {
            let (named, required) = body;
            op["requestBody"] = json!({
                "required": required,
                "content": {"application/json": {"schema": schema_ref(&use_schema(named))}},
            });
        }
        let entry = paths.entry(path).or_insert_with(|| json!({}));
        entry[r.method.to_ascii_lowercase()] = op;
    }
    let mut metrics = json!({"get": {
        "operationId": "GET /metrics",
        "summary": "Prometheus metrics (text exposition format)",
        "x-blockvault-role": crate::catalog::Role::Auditor.as_str(),
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "success", "content": {"text/plain": {"schema": {"type": "string"}}}},
        },
    }});
    for (code, what) in [
        ("401", "no or unknown token"),
        ("500", "the appliance failed"),
    ] {
        metrics["get"]["responses"][code] = error_response(what);
    }
    paths.insert("/metrics".into(), metrics);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "blockvault appliance API", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": paths,
    })
}

pub async fn document() -> Json<Value> {
    Json(build())
}

#[cfg(test)]
mod tests;

//! `GET /webhooks` (auditor): the webhook targets of the service's configuration, as the
//! console's Alerts targets view shows them — scheme, host, events and whether
//! deliveries are signed. Never the secret, and never the URL's path or query (a path
//! often carries a token, e.g. chat services' incoming-webhook URLs).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::Shared;

/// A webhook target as shown: no secret, no path.
fn view(w: &crate::config::Webhook) -> Value {
    let scheme = w.url.split("://").next().unwrap_or("");
    json!({
        "scheme": scheme,
        "host": crate::config::url_host(&w.url),
        "events": if w.events.is_empty() { json!("all") } else { json!(w.events) },
        "signed": w.secret.is_some(),
        "timeout_seconds": w.timeout_seconds,
    })
}

/// `GET /webhooks` → the configured targets, in configuration order.
pub async fn list(State(st): State<Shared>) -> Json<Value> {
    Json(Value::Array(st.webhooks.iter().map(view).collect()))
}

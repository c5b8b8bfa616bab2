//! `GET /webhooks` (auditor): the webhook targets of the service's configuration, as the
//! console's Alerts targets view shows them — scheme, host, events and whether
//! deliveries are signed — and `GET /alerts/deliveries`, the recent deliveries from the
//! outbox. Never the secret, and never the URL's path or query (a path often carries a
//! token, e.g. chat services' incoming-webhook URLs).

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

/// `GET /alerts/deliveries?limit=&offset=`: the newest 1,000 webhook deliveries (newest
/// first) with state, attempts, next try and last error — never the body, the secret or
/// the URL's path (`catalog::DeliveryRecord`).
pub async fn deliveries(
    State(st): State<Shared>,
    uri: axum::http::Uri,
    axum::extract::Query(q): axum::extract::Query<super::handlers::page::PageQuery>,
) -> Result<axum::response::Response, super::ApiError> {
    let page = super::handlers::page::page_of(q)?;
    st.run(move |_, app| Ok(page.answer(&uri, &app.catalog().deliveries(1000)?)))
        .await
}

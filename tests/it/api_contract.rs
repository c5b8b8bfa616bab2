//! The API contract (issue 15 part 4): every error is one JSON shape
//! `{"error": {"kind", "message"}}`, whatever refused the request (router, auth, rate
//! limiter, extractor, handler); unknown query parameters and body fields are refused;
//! lists are paginated with `limit`/`offset`, `X-Total-Count` and `Link`.

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::Env;

/// `body` is the one error shape with `kind` and a non-empty message; returns the message.
fn error_of(status: u16, headers: &ureq::http::HeaderMap, body: &str, what: &str) -> String {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: content-type {ct:?}: {body}"
    );
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {v}"));
    assert_eq!(e.len(), 2, "{what}: only kind and message: {v}");
    let kind = e["kind"].as_str().unwrap_or_else(|| panic!("{what}: {v}"));
    assert!(
        blockvault::api::KINDS.contains(&(kind, status)),
        "{what}: kind {kind:?} with status {status} is not in the documented list"
    );
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{what}: empty message: {v}");
    msg.to_string()
}

#[test]
fn every_refusal_is_one_json_error_shape_with_its_kind_and_nothing_is_written() {
    let env = Env::bare();
    let admin = token(&env, "admin", "root");
    let aud = token(&env, "auditor", "eve");
    let srv = Appliance::start(&env, &[]);
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(2 << 20));
    // (who, method, path, content type, body, status, kind, words in the message)
    type Row<'a> = (
        Option<&'a str>,
        &'a str,
        &'a str,
        &'a str,
        String,
        u16,
        &'a str,
        &'a str,
    );
    let table: Vec<Row> = vec![
        (
            Some(&admin),
            "GET",
            "/api/v1/nothing-here",
            "application/json",
            String::new(),
            404,
            "not_found",
            "no route",
        ),
        (
            Some(&admin),
            "GET",
            "/api/v1/vaults/nope",
            "application/json",
            String::new(),
            404,
            "not_found",
            "nope",
        ),
        (
            Some(&admin),
            "GET",
            "/no-such-asset.js",
            "application/json",
            String::new(),
            404,
            "not_found",
            "no route",
        ),
        (
            Some(&admin),
            "PUT",
            "/api/v1/tokens",
            "application/json",
            "{}".into(),
            405,
            "method_not_allowed",
            "PUT",
        ),
        (
            Some(&admin),
            "POST",
            "/api/v1/audit",
            "application/json",
            "{}".into(),
            405,
            "method_not_allowed",
            "POST",
        ),
        (
            None,
            "GET",
            "/api/v1/vaults",
            "application/json",
            String::new(),
            401,
            "unauthorized",
            "token",
        ),
        (
            Some("not-a-token"),
            "GET",
            "/api/v1/vaults",
            "application/json",
            String::new(),
            401,
            "unauthorized",
            "token",
        ),
        (
            Some(&aud),
            "POST",
            "/api/v1/vaults",
            "application/json",
            r#"{"name":"a"}"#.into(),
            403,
            "forbidden",
            "admin",
        ),
        (
            Some(&aud),
            "GET",
            "/api/v1/tokens",
            "application/json",
            String::new(),
            403,
            "forbidden",
            "admin",
        ),
        (
            Some(&admin),
            "POST",
            "/api/v1/vaults",
            "application/json",
            big,
            413,
            "payload_too_large",
            "length limit",
        ),
        (
            Some(&admin),
            "POST",
            "/api/v1/vaults",
            "application/json",
            "{\"name\":".into(),
            400,
            "bad_request",
            "JSON",
        ),
        (
            Some(&admin),
            "POST",
            "/api/v1/tokens",
            "application/json",
            "[1,2]".into(),
            400,
            "bad_request",
            "",
        ),
        (
            Some(&admin),
            "POST",
            "/api/v1/vaults",
            "text/plain",
            r#"{"name":"a"}"#.into(),
            415,
            "unsupported_media_type",
            "Content-Type",
        ),
        (
            Some(&admin),
            "POST",
            "/api/v1/vaults",
            "application/json",
            r#"{"name":"a","colour":"red"}"#.into(),
            400,
            "bad_request",
            "colour",
        ),
        (
            Some(&admin),
            "POST",
            "/api/v1/vaults",
            "application/json",
            r#"{"name":"../a"}"#.into(),
            400,
            "config",
            "a",
        ),
        (
            Some(&admin),
            "GET",
            "/api/v1/backups?colour=red",
            "application/json",
            String::new(),
            400,
            "bad_request",
            "colour",
        ),
        (
            Some(&admin),
            "GET",
            "/api/v1/tasks?limit=5&sort=up",
            "application/json",
            String::new(),
            400,
            "bad_request",
            "sort",
        ),
        (
            Some(&admin),
            "GET",
            "/api/v1/vaults?limit=0",
            "application/json",
            String::new(),
            400,
            "bad_request",
            "limit",
        ),
        (
            Some(&admin),
            "GET",
            "/api/v1/backups?limit=1001",
            "application/json",
            String::new(),
            400,
            "bad_request",
            "limit",
        ),
    ];
    for (who, method, path, ct, body, status, kind, words) in &table {
        let what = format!("{method} {path} ({ct}, {} bytes)", body.len());
        let (got, headers, text) = srv.raw_typed(method, path, *who, ct, body);
        assert_eq!(got, *status, "{what}: {text}");
        let msg = error_of(got, &headers, &text, &what);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["kind"], *kind, "{what}: {v}");
        assert!(msg.contains(words), "{what}: {msg:?} lacks {words:?}");
    }
    // A handler's refusal keeps the library's kind: a second vault of one name.
    let (s, _) = srv.call("POST", "/vaults", Some(&admin), Some(json!({"name": "v"})));
    assert_eq!(s, 201);
    let (got, headers, text) = srv.raw("POST", "/vaults", Some(&admin), r#"{"name":"v"}"#);
    assert_eq!(got, 409, "{text}");
    error_of(got, &headers, &text, "second vault v");
    assert!(text.contains("\"kind\":\"conflict\""), "{text}");
    // Nothing of it was written: one vault (v), the two tokens made offline.
    let vaults = srv.ok("GET", "/vaults", &admin, None, 200);
    let names: Vec<&str> = vaults
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["v"]);
    let tokens = srv.ok("GET", "/tokens", &admin, None, 200);
    assert_eq!(tokens.as_array().unwrap().len(), 2, "{tokens}");
}

#[test]
fn the_rate_limiter_answers_in_the_one_error_shape() {
    let env = Env::bare();
    let srv = Appliance::start(&env, &[]);
    let mut last = (0, ureq::http::HeaderMap::new(), String::new());
    for _ in 0..80 {
        last = srv.raw("GET", "/vaults", Some("wrong"), "");
        if last.0 == 429 {
            break;
        }
        assert_eq!(last.0, 401, "{}", last.2);
    }
    let (status, headers, text) = last;
    assert_eq!(status, 429, "{text}");
    assert!(headers.get("retry-after").is_some());
    error_of(status, &headers, &text, "rate limited");
    assert!(text.contains("\"kind\":\"rate_limited\""), "{text}");
}

#[test]
fn the_cli_reads_the_appliance_errors_kind_and_exits_as_a_local_run_would() {
    let env = Env::bare();
    let admin = token(&env, "admin", "root");
    let aud = token(&env, "auditor", "eve");
    let srv = Appliance::start(&env, &[]);
    let client = Env::bare();
    let remote = |tok: &str, args: &[&str]| {
        client
            .cmd()
            .args(["--server", &srv.url, "--token", tok, "--json"])
            .envs(crate::appliance::trust_env(&srv.url))
            .args(args)
            .output()
            .unwrap()
    };
    let out = remote(&admin, &["vault", "create", "v"]);
    assert!(out.status.success(), "{out:?}");
    for (tok, args, kind, code, words) in [
        (
            &admin,
            vec!["backups", "show", "nope"],
            "not_found",
            3,
            "nope",
        ),
        (
            &admin,
            vec!["vault", "info", "nope"],
            "not_found",
            3,
            "nope",
        ),
        (&admin, vec!["vault", "create", "v"], "conflict", 4, "v"),
        (&aud, vec!["vault", "create", "w"], "denied", 9, "admin"),
    ] {
        let out = remote(tok, &args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out:?}"));
        assert_eq!(v["error"]["kind"], kind, "{v}");
        assert_eq!(v["error"]["exit_code"], code, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        // The appliance's own message, not the JSON text of its body.
        assert!(
            msg.contains(words) && !msg.contains("{\""),
            "{args:?}: {msg}"
        );
    }
    let vaults = srv.ok("GET", "/vaults", &admin, None, 200);
    assert_eq!(vaults.as_array().unwrap().len(), 1, "{vaults}");
}

#[test]
fn backups_are_listed_a_page_at_a_time_with_the_total_and_a_link_to_the_next_page() {
    let env = Env::new();
    let disk = env.path("disk.raw");
    crate::common::write_raw(&disk, 1 << 20, 0, &crate::common::random_bytes(65536, 7));
    for i in 0..5u8 {
        env.backup(&disk, "web01");
        crate::common::write_raw(&disk, 1 << 20, 65536, &[i; 512]);
    }
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let all = srv.ok("GET", "/backups", &admin, None, 200);
    let all: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(all.len(), 5);
    let mut seen = Vec::new();
    let mut next = Some("/api/v1/backups?vault=v&limit=2".to_string());
    while let Some(path) = next.take() {
        let (status, headers, text) =
            srv.raw_typed("GET", &path, Some(&admin), "application/json", "");
        assert_eq!(status, 200, "{path}: {text}");
        assert_eq!(headers["x-total-count"], "5", "{path}");
        let page: Vec<Value> = serde_json::from_str(&text).unwrap();
        assert!(
            page.len() <= 2 && !page.is_empty(),
            "{path}: {}",
            page.len()
        );
        seen.extend(page.iter().map(|b| b["id"].as_str().unwrap().to_string()));
        next = headers.get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with("; rel=\"next\""), "{l}");
            l[1..l.find('>').unwrap()].to_string()
        });
    }
    assert_eq!(seen, all, "the pages in order make the whole list once");
    let (_, headers, text) = srv.raw("GET", "/backups?limit=2&offset=4", Some(&admin), "");
    assert!(headers.get("link").is_none(), "last page: {text}");
    let (_, headers, text) = srv.raw("GET", "/backups?offset=9&limit=2", Some(&admin), "");
    assert_eq!(text, "[]");
    assert_eq!(headers["x-total-count"], "5");
}

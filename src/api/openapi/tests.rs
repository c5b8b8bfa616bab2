//! The document is valid OpenAPI, lists every route with its shapes, and every `$ref`
//! resolves.

use super::*;

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    if let Some(s) = x.as_str() {
                        out.push(s);
                    }
                } else {
                    refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// The `openapiv3` parser knows OpenAPI 3.0 only: rewrite 3.1's null types (`"type":
/// [T, "null"]`, `oneOf: [{"type": "null"}, X]`) into 3.0's `nullable` so it can check
/// the rest of the document. Only for the parser: the served document stays 3.1.
fn as_3_0(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(ts)) = m.get("type").cloned() {
                let rest: Vec<Value> = ts.iter().filter(|t| *t != "null").cloned().collect();
                if rest.len() < ts.len() {
                    m.insert("nullable".into(), json!(true));
                }
                if let [one] = rest.as_slice() {
                    m.insert("type".into(), one.clone());
                }
            }
            if let Some(Value::Array(alts)) = m.get("oneOf").cloned() {
                let rest: Vec<Value> = alts
                    .iter()
                    .filter(|a| a.get("type") != Some(&json!("null")))
                    .cloned()
                    .collect();
                if rest.len() < alts.len() {
                    m.remove("oneOf");
                    m.insert("allOf".into(), Value::Array(rest));
                    m.insert("nullable".into(), json!(true));
                }
            }
            m.values_mut().for_each(as_3_0);
        }
        Value::Array(a) => a.iter_mut().for_each(as_3_0),
        _ => {}
    }
}

#[test]
fn every_route_has_its_shapes_and_no_shape_lacks_a_route() {
    for r in ROUTES {
        assert!(
            shape_of(r.method, r.path).is_some(),
            "{} {} has no line in openapi::SHAPES",
            r.method,
            r.path
        );
    }
    for s in SHAPES {
        assert!(
            ROUTES
                .iter()
                .any(|r| r.method == s.method && r.path == s.path),
            "SHAPES lists {} {} which the route table lacks",
            s.method,
            s.path
        );
    }
}

#[test]
fn document_parses_as_openapi_and_every_ref_resolves() {
    let doc = build();
    let mut v3_0 = doc.clone();
    as_3_0(&mut v3_0);
    let text = serde_json::to_string(&v3_0).unwrap();
    let api: openapiv3::OpenAPI =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not an OpenAPI 3 document: {e}"));
    assert!(api.openapi.starts_with("3."), "{}", api.openapi);
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut rs = Vec::new();
    refs(&doc, &mut rs);
    assert!(rs.len() > 40, "only {} refs", rs.len());
    for r in rs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(schemas.contains_key(name), "$ref {r} does not resolve");
    }
    for r in ROUTES {
        let path = format!("/api/v1{}", r.path);
        let item = api
            .paths
            .paths
            .get(&path)
            .and_then(|p| p.as_item())
            .unwrap_or_else(|| panic!("{path} missing"));
        let op = match r.method {
            "GET" => item.get.as_ref(),
            "POST" => item.post.as_ref(),
            "PATCH" => item.patch.as_ref(),
            "DELETE" => item.delete.as_ref(),
            "PUT" => item.put.as_ref(),
            m => panic!("method {m}"),
        }
        .unwrap_or_else(|| panic!("{} {path} missing", r.method));
        assert_eq!(
            op.extensions.get("x-blockvault-role"),
            Some(&json!(r.role.as_str())),
            "{} {path}",
            r.method
        );
        let ok = op
            .responses
            .responses
            .iter()
            .find(|(c, _)| matches!(c, openapiv3::StatusCode::Code(c) if *c < 300))
            .and_then(|(_, r)| r.as_item())
            .unwrap_or_else(|| panic!("{} {path}: no success answer", r.method));
        let media = ok
            .content
            .values()
            .next()
            .unwrap_or_else(|| panic!("{} {path}: success answer without content", r.method));
        assert!(media.schema.is_some(), "{} {path}: no schema", r.method);
        for code in [400, 401, 403, 404, 500] {
            assert!(
                op.responses
                    .responses
                    .contains_key(&openapiv3::StatusCode::Code(code)),
                "{} {path}: no {code}",
                r.method
            );
        }
        let shape = shape_of(r.method, r.path).unwrap();
        if shape.body.is_some() {
            let body = op
                .request_body
                .as_ref()
                .and_then(|b| b.as_item())
                .unwrap_or_else(|| panic!("{} {path}: no request body", r.method));
            assert!(
                body.content["application/json"].schema.is_some(),
                "{} {path}: request body without schema",
                r.method
            );
        }
        if let Answer::List(_) = shape.answer {
            assert!(ok.headers.contains_key("X-Total-Count"), "{path}");
            let names: Vec<String> = op
                .parameters
                .iter()
                .filter_map(|p| p.as_item())
                .map(|p| p.parameter_data_ref().name.clone())
                .collect();
            assert!(names.iter().any(|n| n == "limit"), "{path}: {names:?}");
            assert!(names.iter().any(|n| n == "offset"), "{path}: {names:?}");
        }
    }
    let metrics = api.paths.paths["/metrics"].as_item().unwrap();
    let m = metrics.get.as_ref().unwrap();
    assert_eq!(
        m.extensions.get("x-blockvault-role"),
        Some(&json!("auditor"))
    );
    let ok = m.responses.responses[&openapiv3::StatusCode::Code(200)]
        .as_item()
        .unwrap();
    assert!(ok.content.contains_key("text/plain"));
    assert!(
        api.components
            .as_ref()
            .unwrap()
            .security_schemes
            .contains_key("bearer")
    );
}

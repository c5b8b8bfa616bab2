//! The alerter against scripted receivers on 127.0.0.1 (scripted: they answer the
//! statuses a test needs, in turn).

use super::*;
use crate::config::WebhookSecret;
use std::net::TcpListener;

/// A receiver that accepts and never answers: the outbox holds at most its cap, the
/// oldest pending deliveries are dropped and counted, and no thread is started per
/// alert.
#[test]
fn a_silent_receiver_fills_the_outbox_and_the_overflow_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", silent.local_addr().unwrap());
    let hook = Webhook {
        url,
        events: Vec::new(),
        timeout_seconds: 60,
        secret: None,
    };
    let a = Alerter::start(
        dir.path(),
        vec![hook],
        AlertLimits {
            queue: 5,
            workers: 1,
            outbox: 20,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..50 {
        a.raise(AlertKind::TaskFailed, &format!("t{i}"), "boom")
            .unwrap();
    }
    let s = a.stats();
    assert_eq!(s.dropped, 30, "{s:?}");
    assert_eq!(s.delivered, 0, "{s:?}");
    let cat = Catalog::open(dir.path()).unwrap();
    let rows = cat.deliveries(1000).unwrap();
    assert_eq!(rows.len(), 20, "the outbox holds its cap");
    // The newest 20 are kept.
    assert!(
        rows.iter()
            .all(|r| r.state == crate::catalog::DeliveryState::Pending)
    );
    // Every alert is still recorded in the catalog.
    assert_eq!(cat.alerts(1000).unwrap().len(), 50);
}

/// A receiver that answers the given statuses in turn (then 200) and records the
/// headers and body of every request.
type Received = Arc<std::sync::Mutex<Vec<(std::collections::HashMap<String, String>, String)>>>;

fn scripted_receiver(statuses: Vec<u16>) -> (String, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    std::thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut headers = std::collections::HashMap::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let len = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            g.lock()
                .unwrap()
                .push((headers, String::from_utf8_lossy(&body).into_owned()));
            let status = statuses.next().unwrap_or(200);
            let _ = conn.write_all(
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (url, got)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn deliveries_are_signed_and_retried_with_growing_waits_until_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (url, got) = scripted_receiver(vec![500, 503]);
    let secret = "0123456789abcdef-secret";
    let hook = Webhook {
        url,
        events: Vec::new(),
        timeout_seconds: 5,
        secret: Some(WebhookSecret(secret.into())),
    };
    let retry = vec![Duration::from_millis(200), Duration::from_millis(800)];
    let a = Alerter::start(
        dir.path(),
        vec![hook],
        AlertLimits {
            queue: 10,
            workers: 1,
            retry,
            ..Default::default()
        },
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    a.raise(AlertKind::TaskFailed, "r1", "it broke").unwrap();
    wait_for("three attempts", || got.lock().unwrap().len() >= 3);
    wait_for("the delivery", || a.stats().delivered == 1);
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 3, "no attempt after the 200");
    let ids: Vec<_> = got
        .iter()
        .map(|(h, _)| h["x-blockvault-delivery"].clone())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0] && i.len() == 32), "{ids:?}");
    for (h, body) in got.iter() {
        let ts: u64 = h["x-blockvault-timestamp"].parse().unwrap();
        assert_eq!(h["x-blockvault-signature"], signature(secret, ts, body));
        assert_ne!(
            h["x-blockvault-signature"],
            signature("another secret!!", ts, body)
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["kind"], "task_failed");
    }
    // Waits of about 0.2 s then 0.8 s (±10 %) before the retries.
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    let s = a.stats();
    assert_eq!((s.failed, s.given_up, s.dropped), (2, 0, 0), "{s:?}");
}

#[test]
fn a_4xx_is_not_retried_and_retries_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let (url404, got404) = scripted_receiver(vec![404]);
    let (url500, got500) = scripted_receiver(vec![500, 500, 500, 500]);
    let hooks = [url404, url500].map(|url| Webhook {
        url,
        events: Vec::new(),
        timeout_seconds: 5,
        secret: None,
    });
    let retry = vec![Duration::from_millis(50), Duration::from_millis(50)];
    let a = Alerter::start(
        dir.path(),
        hooks.to_vec(),
        AlertLimits {
            queue: 10,
            workers: 2,
            retry,
            ..Default::default()
        },
    )
    .unwrap();
    a.raise(AlertKind::VaultFull, "v", "full").unwrap();
    wait_for("both given up", || a.stats().given_up == 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(got404.lock().unwrap().len(), 1, "a 404 is not retried");
    assert_eq!(got500.lock().unwrap().len(), 3, "one try and two retries");
    assert!(
        !got500.lock().unwrap()[0]
            .0
            .contains_key("x-blockvault-signature")
    );
    assert_eq!(a.stats().delivered, 0);
}

#[test]
fn backup_succeeded_goes_only_to_a_webhook_that_lists_it_with_its_details() {
    let dir = tempfile::tempdir().unwrap();
    let (every, got_every) = scripted_receiver(vec![]);
    let (listed, got_listed) = scripted_receiver(vec![]);
    let hooks = vec![
        Webhook {
            url: every,
            events: Vec::new(),
            timeout_seconds: 5,
            secret: None,
        },
        Webhook {
            url: listed,
            events: vec![AlertKind::BackupSucceeded],
            timeout_seconds: 5,
            secret: None,
        },
    ];
    let a = Alerter::start(dir.path(), hooks, AlertLimits::default()).unwrap();
    let details = AlertDetails {
        resource: Some("web1".into()),
        vault: Some("v".into()),
        backup: Some("b-id".into()),
        backup_name: Some("autobk_1".into()),
        task: Some("t-1".into()),
        ..Default::default()
    };
    a.raise_with(AlertKind::BackupSucceeded, "web1", "ok", &details)
        .unwrap();
    // A failure after it: the "every kind" webhook gets this one only.
    a.raise(AlertKind::TaskFailed, "backup web1", "boom")
        .unwrap();
    wait_for("the success delivery", || {
        got_listed.lock().unwrap().len() == 1
    });
    wait_for("the failure delivery", || {
        got_every.lock().unwrap().len() == 1
    });
    wait_for("both delivered", || a.stats().delivered == 2);
    let v: serde_json::Value = serde_json::from_str(&got_listed.lock().unwrap()[0].1).unwrap();
    assert_eq!(v["kind"], "backup_succeeded");
    assert_eq!(v["subject"], "web1");
    assert_eq!(v["details"]["backup"], "b-id");
    assert_eq!(v["details"]["vault"], "v");
    assert_eq!(v["details"]["task"], "t-1");
    assert!(v["time"].is_string() && v["time"] == v["at"], "{v}");
    let v: serde_json::Value = serde_json::from_str(&got_every.lock().unwrap()[0].1).unwrap();
    assert_eq!(v["kind"], "task_failed", "{v}");
    // Both are in the catalog with their details.
    let rec = Catalog::open(dir.path()).unwrap().alerts(10).unwrap();
    assert_eq!(rec.len(), 2);
    assert_eq!(rec[1].details["resource"], "web1");
}

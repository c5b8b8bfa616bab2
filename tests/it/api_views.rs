//! `GET /backups` shows a backup's changeable state at once: the list renders each
//! backup's view once and keeps it, so a drill, a protect or a delete that changed a
//! backup after it was listed must show in the next listing, not in a stale copy.

use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, s};
use crate::drill::{boot_sector, disk};

fn listed<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|b| b["id"] == id)
}

#[test]
fn the_backup_list_shows_a_drill_a_protect_and_a_delete_at_once() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let img = env.path("web.img");
    disk(&img, &boot_sector("views drill up\r\n"), 4 << 20);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "web", "kind": "disk", "sources": [img], "vault": "v"})),
        201,
    );
    let mut ids = Vec::new();
    for _ in 0..2 {
        let t = srv.ok(
            "POST",
            "/backups",
            &admin,
            Some(json!({"resource": "web"})),
            202,
        );
        let done = srv.wait_task(&admin, s(&t, "task"), Duration::from_secs(60));
        assert_eq!(done["state"], "succeeded", "{done}");
        ids.push(s(&done["result"], "backup").to_string());
    }
    let (a, b) = (&ids[0], &ids[1]);
    // Listed once: both views are rendered and kept.
    let before = srv.ok("GET", "/backups", &admin, None, 200);
    assert_eq!(listed(&before, a).unwrap()["verified_boot"], Value::Null);
    assert_eq!(listed(&before, a).unwrap()["protected"], false);

    let drill = json!({"check": "console:views drill up", "accel": "tcg", "timeout_seconds": 120});
    let t = srv.ok(
        "POST",
        &format!("/backups/{a}/drill"),
        &admin,
        Some(drill),
        202,
    );
    let done = srv.wait_task(&admin, s(&t, "task"), Duration::from_secs(180));
    assert_eq!(done["state"], "succeeded", "{done}");
    let after = srv.ok("GET", "/backups", &admin, None, 200);
    let va = listed(&after, a).unwrap();
    assert_eq!(
        va["verified_boot"]["ok"], true,
        "the drill is not in the list: {va:#}"
    );
    assert_eq!(
        va["verified_boot"],
        srv.ok("GET", &format!("/backups/{a}"), &admin, None, 200)["verified_boot"],
        "list and detail disagree"
    );
    assert_eq!(listed(&after, b).unwrap()["verified_boot"], Value::Null);

    srv.ok(
        "POST",
        &format!("/backups/{b}/protect"),
        &admin,
        Some(json!({})),
        200,
    );
    let after = srv.ok("GET", "/backups", &admin, None, 200);
    assert_eq!(listed(&after, b).unwrap()["protected"], true);
    // The drill's verdict stays with the protected view.
    assert_eq!(listed(&after, a).unwrap()["verified_boot"]["ok"], true);
    srv.ok(
        "POST",
        &format!("/backups/{b}/protect"),
        &admin,
        Some(json!({"protected": false})),
        200,
    );
    let after = srv.ok("GET", "/backups", &admin, None, 200);
    assert_eq!(listed(&after, b).unwrap()["protected"], false);

    srv.ok("DELETE", &format!("/backups/{a}"), &admin, None, 200);
    let (status, headers, text) = srv.raw("GET", "/backups", Some(&admin), "");
    assert_eq!(status, 200, "{text}");
    let after: Value = serde_json::from_str(&text).unwrap();
    assert!(
        listed(&after, a).is_none(),
        "a deleted backup is still listed"
    );
    assert_eq!(headers["x-total-count"], "1");
}

//! `blockvault bitmaps list|retire qmp:SOCK` against a real qemu-storage-daemon: the
//! bitmaps two chains use are shown in use and kept, a stale `blockvault-…` one is
//! removed, and the chains' next incrementals still read only the dirty chunks.

use serde_json::{Value, json};

use crate::common::{Env, random_bytes, sh, u};
use crate::qsd::Qsd;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

fn image(env: &Env, name: &str) -> std::path::PathBuf {
    let q = env.path(&format!("{name}.qcow2"));
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "16M"],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 0 2M",
            q.to_str().unwrap(),
        ],
    );
    q
}

/// A live backup of node `node` as server `srv-<node>`.
fn backup(env: &Env, qsd: &Qsd, node: &str) -> Value {
    let qmp = format!("qmp:{}", qsd.qmp.display());
    let nbd = qsd.nbd.display().to_string();
    let id = format!("srv-{node}");
    env.json(&[
        "backup",
        &qmp,
        "--vault",
        "v",
        "--id",
        &id,
        "--nodes",
        node,
        "--nbd-server",
        &nbd,
    ])
}

fn list(env: &Env, qsd: &Qsd) -> Vec<Value> {
    let qmp = format!("qmp:{}", qsd.qmp.display());
    env.json(&["bitmaps", "list", &qmp])
        .as_array()
        .unwrap()
        .clone()
}

fn checkpoint(m: &Value) -> String {
    m["disks"][0]["checkpoint"]["bitmap"]
        .as_str()
        .unwrap_or_else(|| panic!("no checkpoint in {m}"))
        .to_string()
}

#[test]
fn retire_removes_exactly_the_stale_bitmap_and_the_chains_stay_incremental() {
    let env = Env::new();
    let (a, b) = (image(&env, "a"), image(&env, "b"));
    let qsd = Qsd::start(env.dir.path(), &[("a", &a), ("b", &b)]);
    let qmp = format!("qmp:{}", qsd.qmp.display());
    // Two chains, one per disk, each with its bitmap.
    let (ma, mb) = (backup(&env, &qsd, "a"), backup(&env, &qsd, "b"));
    let (ca, cb) = (checkpoint(&ma), checkpoint(&mb));
    // A stale bitmap named like ours (a run of another vault that is gone).
    let stale = "blockvault-0badf00d-20260101-000000";
    qsd.exec(
        "block-dirty-bitmap-add",
        json!({"node": "a", "name": stale, "persistent": true}),
    );
    // A bitmap that is not ours: never touched.
    qsd.exec(
        "block-dirty-bitmap-add",
        json!({"node": "b", "name": "user-bm"}),
    );
    qsd.client("a").write(0, &[1u8; 4096]).unwrap();

    let l = list(&env, &qsd);
    let row = |name: &str| {
        l.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {l:?}"))
            .clone()
    };
    assert_eq!(l.len(), 4, "{l:?}");
    for (name, node, in_use) in [
        (ca.as_str(), "a", true),
        (cb.as_str(), "b", true),
        (stale, "a", false),
        ("user-bm", "b", false),
    ] {
        let r = row(name);
        assert_eq!(r["node"], node, "{r}");
        assert_eq!(r["in_use"], in_use, "{r}");
        assert_eq!(r["granularity"], CHUNK, "{r}");
    }
    assert_eq!(row(&ca)["checkpoint_of"], json!(["srv-a/a"]));
    assert_eq!(row(&ca)["persistent"], true);
    assert_eq!(row("user-bm")["persistent"], false);
    // The 4 KiB written to a after the stale bitmap was added: one 64 KiB granule.
    assert_eq!(u(&row(stale), "dirty_bytes"), CHUNK);
    assert_eq!(u(&row(&cb), "dirty_bytes"), 0);

    // A checkpoint is refused by name without --force, and nothing is removed.
    let out = env.run(&["bitmaps", "retire", &qmp, &ca]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checkpoint of the latest backup of srv-a/a"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(list(&env, &qsd).len(), 4);

    let r = env.json(&["bitmaps", "retire", &qmp, "--orphans"]);
    assert_eq!(r["removed"], json!([{"node": "a", "name": stale}]), "{r}");
    assert_eq!(qsd.bitmaps("a"), vec![ca.clone()]);
    let mut on_b = qsd.bitmaps("b");
    on_b.sort();
    assert_eq!(on_b, vec![cb.clone(), "user-bm".to_string()]);

    // The chains go on: the next incremental of a reads only the dirty chunks.
    qsd.client("a")
        .write(5 * MIB, &random_bytes(CHUNK as usize, 9))
        .unwrap();
    let m = backup(&env, &qsd, "a");
    let d = &m["disks"][0];
    assert_eq!(d["kind"], "incremental", "{d}");
    assert_eq!(d["strategy"], "bitmap", "{d}");
    assert_eq!(u(d, "chunks_read"), 2, "{d}");
    assert_eq!(u(d, "bytes_read"), 2 * CHUNK, "{d}");
}

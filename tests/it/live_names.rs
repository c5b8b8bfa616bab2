//! Live disks are named stably and every chain keeps its bitmap: against a real VM
//! started as libvirt starts one (`-blockdev` + `-device virtio-blk-pci,id=vdiskN`) and a
//! real qemu-storage-daemon.

use serde_json::{Value, json};

use crate::common::{Env, sh, u};
use crate::qsd::Qsd;
use crate::vm::{Vm, VmDisk};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

fn image(env: &Env, name: &str, fill: u8) -> std::path::PathBuf {
    let q = env.path(&format!("{name}.qcow2"));
    let p = q.to_str().unwrap();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
    let w = format!("write -P {fill} 0 2M");
    sh("qemu-io", &["-f", "qcow2", "-c", &w, p]);
    q
}

fn disk<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {m}"))
}

fn names(m: &Value) -> Vec<String> {
    m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

fn vm_backup(env: &Env, vm: &Vm, extra: &[&str]) -> Value {
    let qmp = format!("qmp:{}", vm.qmp.display());
    let mut args = vec!["backup", &qmp, "--vault", "v", "--id", "vm1"];
    args.extend_from_slice(extra);
    env.json(&args)
}

#[test]
fn a_libvirt_style_vm_s_disks_are_named_by_device_id_the_same_with_or_without_nodes() {
    let env = Env::new();
    let (a, b) = (image(&env, "a", 0x11), image(&env, "b", 0x22));
    let mut vm = Vm::start(
        env.dir.path(),
        1,
        128,
        &[
            VmDisk {
                image: &a,
                bus: "virtio",
            },
            VmDisk {
                image: &b,
                bus: "virtio",
            },
        ],
    );
    let m1 = vm_backup(&env, &vm, &[]);
    assert_eq!(names(&m1), ["vdisk0", "vdisk1"]);
    assert_eq!(disk(&m1, "vdisk0")["kind"], "full");

    // Same names on the next run: the chain goes on, reading one changed chunk.
    vm.write("vdisk0", 5 * MIB, CHUNK, 0x5a);
    let m2 = vm_backup(&env, &vm, &[]);
    assert_eq!(names(&m2), ["vdisk0", "vdisk1"]);
    for (name, read) in [("vdisk0", CHUNK), ("vdisk1", 0)] {
        let d = disk(&m2, name);
        assert_eq!(d["kind"], "incremental", "{d}");
        assert_eq!(d["strategy"], "bitmap", "{d}");
        assert_eq!(u(d, "bytes_read"), read, "{d}");
    }

    // --nodes naming one disk by its node, the other by its device id: same disks,
    // same names, same chain.
    vm.write("vdisk1", 9 * MIB, CHUNK, 0x6b);
    let m3 = vm_backup(&env, &vm, &["--nodes", "libvirt-1-format,vdisk1"]);
    assert_eq!(names(&m3), ["vdisk0", "vdisk1"]);
    for (name, read) in [("vdisk0", 0), ("vdisk1", CHUNK)] {
        let d = disk(&m3, name);
        assert_eq!(d["strategy"], "bitmap", "{d}");
        assert_eq!(u(d, "bytes_read"), read, "{d}");
    }

    // Back to default names: the --nodes run's bitmaps are this chain's checkpoints,
    // nothing deleted them, and each disk holds exactly one bitmap of ours.
    vm.write("vdisk0", 12 * MIB, CHUNK, 0x7c);
    let m4 = vm_backup(&env, &vm, &[]);
    for (name, read) in [("vdisk0", CHUNK), ("vdisk1", 0)] {
        let d = disk(&m4, name);
        assert_eq!(d["kind"], "incremental", "{d}");
        assert_eq!(d["strategy"], "bitmap", "{d}");
        assert_eq!(u(d, "bytes_read"), read, "{d}");
        assert!(d.get("note").is_none(), "{d}");
    }
    for (node, name) in [
        ("libvirt-1-format", "vdisk0"),
        ("libvirt-2-format", "vdisk1"),
    ] {
        let cp = disk(&m4, name)["checkpoint"]["bitmap"].as_str().unwrap();
        assert_eq!(vm.our_bitmaps(node), vec![cp.to_string()], "{node}");
    }

    // What was backed up last is what the disks hold now (QEMU flushes them on quit).
    vm.quit();
    let dir = env.path("r4");
    let id = m4["id"].as_str().unwrap();
    env.json(&["restore", id, "--to", dir.to_str().unwrap()]);
    for (name, img) in [("vdisk0", &a), ("vdisk1", &b)] {
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-q", "-U"])
            .arg(dir.join(format!("{name}.raw")))
            .arg(img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} differs");
    }
}

fn qsd_backup(env: &Env, qsd: &Qsd, vault: &str) -> Value {
    let qmp = format!("qmp:{}", qsd.qmp.display());
    let nbd = qsd.nbd.display().to_string();
    env.json(&[
        "backup",
        &qmp,
        "--vault",
        vault,
        "--id",
        "srv",
        "--nbd-server",
        &nbd,
    ])
}

#[test]
fn two_chains_on_one_daemon_alternate_and_each_stays_incremental_with_one_bitmap_per_disk() {
    let env = Env::new();
    env.ok(&["vault", "create", "w"]);
    let (a, b) = (image(&env, "a", 0x11), image(&env, "b", 0x22));
    let qsd = Qsd::start(env.dir.path(), &[("a", &a), ("b", &b)]);
    let qmp = format!("qmp:{}", qsd.qmp.display());
    // The same server name in two vaults: two chains.
    let (v1, w1) = (qsd_backup(&env, &qsd, "v"), qsd_backup(&env, &qsd, "w"));
    assert_eq!(disk(&v1, "a")["kind"], "full");
    assert_eq!(disk(&w1, "a")["kind"], "full");
    // A qemu-storage-daemon is no VM: no hardware recorded.
    assert!(v1["capture"].get("hardware").is_none(), "{v1}");
    let mut last = (v1, w1);
    // Each round writes one new chunk to a; v's backup sees it, w's sees it too, and
    // every backup reads exactly what changed since its own chain's previous one.
    for round in 0..2u64 {
        qsd.client("a")
            .write((3 + round) * MIB, &[round as u8 + 1; CHUNK as usize])
            .unwrap();
        let v = qsd_backup(&env, &qsd, "v");
        qsd.client("a")
            .write((8 + round) * MIB, &[round as u8 + 1; CHUNK as usize])
            .unwrap();
        let w = qsd_backup(&env, &qsd, "w");
        for (m, chunks) in [(&v, 2 - u64::from(round == 0)), (&w, 2)] {
            let d = disk(m, "a");
            assert_eq!(d["kind"], "incremental", "round {round}: {d}");
            assert_eq!(d["strategy"], "bitmap", "round {round}: {d}");
            assert_eq!(u(d, "bytes_read"), chunks * CHUNK, "round {round}: {d}");
            assert_eq!(u(disk(m, "b"), "bytes_read"), 0, "round {round}");
        }
        last = (v, w);
    }
    // After three backups per chain: exactly one bitmap of ours per disk per chain.
    let cp = |m: &Value, n: &str| {
        disk(m, n)["checkpoint"]["bitmap"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for n in ["a", "b"] {
        let mut want = vec![cp(&last.0, n), cp(&last.1, n)];
        want.sort();
        let mut have = qsd.bitmaps(n);
        have.sort();
        assert_eq!(have, want, "node {n}");
    }

    // `bitmaps list` says whose each one is; a bitmap no chain uses is an orphan.
    let orphan = "blockvault-0badf00d-20260101-000000";
    qsd.exec(
        "block-dirty-bitmap-add",
        json!({"node": "a", "name": orphan, "persistent": true}),
    );
    qsd.exec(
        "block-dirty-bitmap-add",
        json!({"node": "b", "name": "user-bm"}),
    );
    let list = env.json(&["bitmaps", "list", &qmp]);
    let row = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))
            .clone()
    };
    for (m, chain) in [(&last.0, "v/srv"), (&last.1, "w/srv")] {
        let r = row(&cp(m, "a"));
        assert_eq!(r["state"], "in-use", "{r}");
        assert_eq!(r["chain"], chain, "{r}");
        assert_eq!(r["checkpoint_of"], json!(["srv/a"]), "{r}");
    }
    assert_eq!(row(orphan)["state"], "orphan");
    assert_eq!(row(orphan)["chain"], Value::Null);
    assert_eq!(row("user-bm")["state"], "not-ours");

    // retire needs --orphans or names; --orphans removes the orphan only.
    let out = env.run(&["bitmaps", "retire", &qmp]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--orphans"));
    let r = env.json(&["bitmaps", "retire", &qmp, "--orphans"]);
    assert_eq!(r["removed"], json!([{"node": "a", "name": orphan}]), "{r}");
    assert_eq!(qsd.bitmaps("a").len(), 2);
    assert_eq!(qsd.bitmaps("b").len(), 3);
    let v = qsd_backup(&env, &qsd, "v");
    assert_eq!(disk(&v, "a")["strategy"], "bitmap");
    assert_eq!(u(disk(&v, "a"), "bytes_read"), CHUNK);
}

#[test]
fn a_run_that_died_after_its_instant_costs_the_chain_nothing() {
    let env = Env::new();
    let a = image(&env, "a", 0x11);
    let qsd = Qsd::start(env.dir.path(), &[("a", &a)]);
    let m1 = qsd_backup(&env, &qsd, "v");
    let old = disk(&m1, "a")["checkpoint"]["bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    qsd.client("a")
        .write(3 * MIB, &[1; CHUNK as usize])
        .unwrap();
    // What a run SIGKILLed after its point in time leaves in the bitmaps: its own
    // bitmap recording, the checkpoint disabled (the sweep of leftovers keeps bitmaps).
    let (prefix, _) = old.rsplit_once('-').unwrap();
    let dead = format!("{prefix}-dead");
    qsd.exec(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "a", "name": dead, "persistent": true}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "a", "name": old}},
        ]}),
    );
    qsd.client("a")
        .write(7 * MIB, &[2; CHUNK as usize])
        .unwrap();

    let m2 = qsd_backup(&env, &qsd, "v");
    let d = disk(&m2, "a");
    assert_eq!(d["kind"], "incremental", "{d}");
    assert_eq!(d["strategy"], "bitmap", "{d}");
    // The change before the dead run's instant and the one after: nothing else.
    assert_eq!(u(d, "bytes_read"), 2 * CHUNK, "{d}");
    let cp = d["checkpoint"]["bitmap"].as_str().unwrap();
    assert_eq!(qsd.bitmaps("a"), vec![cp.to_string()]);
    let dir = env.path("r2");
    env.json(&[
        "restore",
        m2["id"].as_str().unwrap(),
        "--to",
        dir.to_str().unwrap(),
    ]);
    assert!(crate::common::images_equal(
        &dir.join("a.raw"),
        std::path::Path::new(&qsd.uri("a"))
    ));
}

/// The `<Item>` of the OVF whose element name is `name`.
fn item<'a>(ovf: &'a str, name: &str) -> &'a str {
    let at = ovf
        .find(&format!("<rasd:ElementName>{name}</rasd:ElementName>"))
        .unwrap_or_else(|| panic!("no item {name} in {ovf}"));
    let start = ovf[..at].rfind("<Item>").unwrap();
    let end = at + ovf[at..].find("</Item>").unwrap();
    &ovf[start..end]
}

#[test]
fn a_live_vm_s_vcpus_memory_and_disk_buses_go_into_the_manifest_and_the_ova() {
    let env = Env::new();
    let (a, b, c) = (
        image(&env, "a", 0x11),
        image(&env, "b", 0x22),
        image(&env, "c", 0x33),
    );
    let vm = Vm::start(
        env.dir.path(),
        2,
        512,
        &[
            VmDisk {
                image: &a,
                bus: "virtio",
            },
            VmDisk {
                image: &b,
                bus: "scsi",
            },
            VmDisk {
                image: &c,
                bus: "ide",
            },
        ],
    );
    let m = vm_backup(&env, &vm, &[]);
    let hw = &m["capture"]["hardware"];
    assert_eq!(hw["vcpus"], 2, "{hw}");
    assert_eq!(u(hw, "memory_bytes"), 512 * MIB, "{hw}");
    assert!(hw["machine"].as_str().unwrap().starts_with("pc-"), "{hw}");
    let buses: Vec<(&str, &str)> = hw["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["bus"].as_str().unwrap()))
        .collect();
    assert_eq!(
        buses,
        [("vdisk0", "virtio"), ("vdisk1", "scsi"), ("vdisk2", "ide")]
    );

    let out = env.path("out");
    let id = m["id"].as_str().unwrap();
    env.json(&[
        "restore",
        id,
        "--to",
        out.to_str().unwrap(),
        "--image",
        "ova",
    ]);
    let x = env.path("unpacked");
    std::fs::create_dir(&x).unwrap();
    let ova = out.join("vm1.ova");
    sh(
        "tar",
        &["-xf", ova.to_str().unwrap(), "-C", x.to_str().unwrap()],
    );
    let ovf = std::fs::read_to_string(x.join("vm1.ovf")).unwrap();
    assert!(item(&ovf, "2 virtual CPU(s)").contains("<rasd:VirtualQuantity>2<"));
    assert!(item(&ovf, "512MB of memory").contains("<rasd:VirtualQuantity>512<"));
    assert!(ovf.contains("VMware has no virtio"), "{ovf}");
    // virtio → paravirtual SCSI, scsi → LSI Logic, ide → IDE; each disk on its own.
    let pv = item(&ovf, "SCSI Controller 0");
    assert!(pv.contains("<rasd:ResourceSubType>VirtualSCSI<"), "{pv}");
    let lsi = item(&ovf, "SCSI Controller 1");
    assert!(lsi.contains("<rasd:ResourceSubType>lsilogic<"), "{lsi}");
    assert!(item(&ovf, "IDE Controller 0").contains("<rasd:ResourceType>5<"));
    let id_of = |it: &str| {
        let s = it.split("<rasd:InstanceID>").nth(1).unwrap();
        s[..s.find('<').unwrap()].to_string()
    };
    for (disk, ctrl) in [
        ("vdisk0", "SCSI Controller 0"),
        ("vdisk1", "SCSI Controller 1"),
        ("vdisk2", "IDE Controller 0"),
    ] {
        let parent = format!("<rasd:Parent>{}<", id_of(item(&ovf, ctrl)));
        assert!(item(&ovf, disk).contains(&parent), "{disk}: {ovf}");
    }
}

#[test]
fn a_chain_named_by_an_older_build_hands_over_to_the_stable_name_and_leaves_no_bitmap() {
    let env = Env::new();
    let a = image(&env, "a", 0x11);
    let vm = Vm::start(
        env.dir.path(),
        1,
        128,
        &[VmDisk {
            image: &a,
            bus: "virtio",
        }],
    );
    let m1 = vm_backup(&env, &vm, &[]);
    let legacy_bitmap = disk(&m1, "vdisk0")["checkpoint"]["bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    // What an older build wrote: the disk named by its qdev path, no checkpoint node.
    let legacy = "/machine/peripheral/vdisk0/virtio-backend";
    let backups = env.vault_dir().join("backups");
    let file = walk_json(&backups);
    let mut old: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let d = &mut old["disks"][0];
    d["name"] = json!(legacy);
    d["disk_id"] = json!(format!("vm1/{legacy}"));
    d["checkpoint"].as_object_mut().unwrap().remove("node");
    std::fs::write(&file, serde_json::to_vec(&old).unwrap()).unwrap();

    vm.write("vdisk0", 5 * MIB, CHUNK, 0x5a);
    let m2 = vm_backup(&env, &vm, &[]);
    let d = disk(&m2, "vdisk0");
    assert_eq!(d["kind"], "full", "{d}");
    let note = d["note"].as_str().unwrap();
    assert!(
        note.contains(legacy) && note.contains(&legacy_bitmap),
        "{note}"
    );
    // The older chain's bitmap is retired: one bitmap of ours, the new checkpoint.
    let cp = d["checkpoint"]["bitmap"].as_str().unwrap();
    assert_eq!(vm.our_bitmaps("libvirt-1-format"), vec![cp.to_string()]);

    vm.write("vdisk0", 9 * MIB, CHUNK, 0x6b);
    let m3 = vm_backup(&env, &vm, &[]);
    let d = disk(&m3, "vdisk0");
    assert_eq!(d["strategy"], "bitmap", "{d}");
    assert_eq!(u(d, "bytes_read"), CHUNK, "{d}");
}

/// The one manifest file under `dir`.
fn walk_json(dir: &std::path::Path) -> std::path::PathBuf {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            found.push(walk_json(&p));
        } else if p.extension().is_some_and(|x| x == "json") {
            found.push(p);
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    found.pop().unwrap()
}

#[test]
fn a_uefi_vm_s_firmware_flashes_are_no_disks_and_its_ova_boots_efi() {
    let env = Env::new();
    let a = image(&env, "a", 0x11);
    let vm = Vm::start_uefi(
        env.dir.path(),
        &[VmDisk {
            image: &a,
            bus: "virtio",
        }],
    );
    let m = vm_backup(&env, &vm, &[]);
    assert_eq!(names(&m), ["vdisk0"]);
    assert_eq!(m["capture"]["hardware"]["firmware"], "uefi", "{m}");
    let out = env.path("out");
    let id = m["id"].as_str().unwrap();
    env.json(&[
        "restore",
        id,
        "--to",
        out.to_str().unwrap(),
        "--image",
        "ova",
    ]);
    let x = env.path("unpacked");
    std::fs::create_dir(&x).unwrap();
    let ova = out.join("vm1.ova");
    sh(
        "tar",
        &["-xf", ova.to_str().unwrap(), "-C", x.to_str().unwrap()],
    );
    let ovf = std::fs::read_to_string(x.join("vm1.ovf")).unwrap();
    assert!(
        ovf.contains(r#"<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>"#),
        "{ovf}"
    );
}

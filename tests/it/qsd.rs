//! A real qemu-storage-daemon for the live-capture tests: qcow2 disks as nodes `d<name>`,
//! writable NBD exports of them on a unix socket, and a QMP monitor.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockvault::nbd::{NbdClient, NbdUri};
use blockvault::qmp::Qmp;
use serde_json::{Value, json};

pub struct Qsd {
    child: Child,
    /// The monitor blockvault uses.
    pub qmp: PathBuf,
    /// The monitor the test uses.
    test_qmp: PathBuf,
    pub nbd: PathBuf,
    /// Node names of the disks, in order.
    pub nodes: Vec<String>,
}

impl Qsd {
    /// Start qemu-storage-daemon in `dir` with one qcow2 disk per `(name, image)`.
    pub fn start(dir: &Path, disks: &[(&str, &Path)]) -> Qsd {
        Qsd::start_with(dir, disks, true)
    }

    /// The same without an NBD server of its own (blockvault then starts one).
    pub fn start_without_nbd(dir: &Path, disks: &[(&str, &Path)]) -> Qsd {
        Qsd::start_with(dir, disks, false)
    }

    fn start_with(dir: &Path, disks: &[(&str, &Path)], nbd_server: bool) -> Qsd {
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let test_qmp = dir.join("qmp-test.sock");
        let mut args: Vec<String> = Vec::new();
        let mut nodes = Vec::new();
        for (name, image) in disks {
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name=f{name},filename={}",
                image.display()
            ));
            args.push("--blockdev".into());
            args.push(format!("driver=qcow2,node-name={name},file=f{name}"));
            nodes.push(name.to_string());
        }
        if nbd_server {
            args.push("--nbd-server".into());
            args.push(format!("addr.type=unix,addr.path={}", nbd.display()));
            for name in &nodes {
                args.push("--export".into());
                args.push(format!(
                    "type=nbd,id=e{name},node-name={name},name={name},writable=on"
                ));
            }
        }
        args.push("--chardev".into());
        args.push(format!(
            "socket,path={},server=on,wait=off,id=m0",
            qmp.display()
        ));
        args.push("--monitor".into());
        args.push("chardev=m0".into());
        // A second monitor for the test itself: a QMP socket serves one client at a time.
        args.push("--chardev".into());
        args.push(format!(
            "socket,path={},server=on,wait=off,id=m1",
            test_qmp.display()
        ));
        args.push("--monitor".into());
        args.push("chardev=m1".into());
        let child = Command::new("qemu-storage-daemon")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-storage-daemon");
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&test_qmp).is_err()
            || (nbd_server && std::os::unix::net::UnixStream::connect(&nbd).is_err())
        {
            assert!(start.elapsed().as_secs() < 20, "qsd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd {
            child,
            qmp,
            test_qmp,
            nbd,
            nodes,
        }
    }

    pub fn connect(&self) -> Qmp {
        Qmp::connect(&self.test_qmp, Duration::from_secs(20)).expect("QMP connect")
    }

    pub fn exec(&self, cmd: &str, args: Value) -> Value {
        self.connect()
            .execute_value(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }

    /// A writable NBD connection to disk `name`.
    pub fn client(&self, name: &str) -> NbdClient {
        NbdClient::connect(&NbdUri::parse(&self.uri(name)).unwrap(), &[]).expect("NBD connect")
    }

    /// Everything in the daemon that the disks themselves do not explain: exports other
    /// than `e<disk>`, nodes other than the disks and their files, block jobs.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in self
            .exec("query-block-exports", json!({}))
            .as_array()
            .unwrap()
        {
            let id = e["id"].as_str().unwrap();
            if !self.nodes.iter().any(|n| id == format!("e{n}")) {
                out.push(format!("export {id}"));
            }
        }
        for n in self
            .exec("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .unwrap()
        {
            let name = n["node-name"].as_str().unwrap();
            if !self
                .nodes
                .iter()
                .any(|d| name == d || name == format!("f{d}"))
            {
                out.push(format!("node {name}"));
            }
        }
        for j in self.exec("query-block-jobs", json!({})).as_array().unwrap() {
            out.push(format!("job {}", j["device"]));
        }
        out
    }

    /// Names of the dirty bitmaps on node `node`.
    pub fn bitmaps(&self, node: &str) -> Vec<String> {
        self.exec("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"] == node)
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["name"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

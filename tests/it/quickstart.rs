//! The README's first command, `bash appliance/quickstart.sh --no-serve`, on a fresh
//! `git clone` of this repository: no fixtures, no data dir, nothing built in the clone.

use std::path::Path;
use std::process::Command;

#[test]
fn the_quick_start_runs_on_a_fresh_clone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::Builder::new()
        .prefix("bv-clone-")
        .tempdir()
        .expect("tempdir");
    let clone = tmp.path().join("blockvault");
    let st = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(root)
        .arg(&clone)
        .status()
        .expect("git clone");
    assert!(st.success(), "git clone failed");
    // The clone has only what is committed; its fixtures and data dir do not exist.
    assert!(!clone.join("target").exists());
    // Reuse the test build's compiled dependencies (hard links, so nothing is copied);
    // the clone's own sources still build from scratch.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let own_target = tmp.path().join("target");
    std::fs::create_dir_all(&own_target).expect("target dir");
    let st = Command::new("cp")
        .arg("-al")
        .arg(target.join("debug"))
        .arg(own_target.join("debug"))
        .status()
        .expect("cp -al");
    assert!(st.success(), "linking the build directory failed");
    let out = Command::new("bash")
        .arg("appliance/quickstart.sh")
        .arg("--no-serve")
        .current_dir(&clone)
        .env("CARGO_TARGET_DIR", &own_target)
        .env("QUICKSTART_PROFILE", "dev")
        .output()
        .expect("running the quick start");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quick start failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("equals the source"),
        "the restored image was not compared equal:\n{stdout}"
    );
    assert!(clone.join("blockvault-data/vaults/default").is_dir());
}

//! The service files in deploy/, checked by the tools that consume them: systemd's
//! own verifier, sysusers and tmpfiles run into a scratch root, and Python's plistlib
//! for the launchd agent (macOS's `plutil -lint` is not here).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::Command;

use modeld_e2e::{Assets, binary};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(deploy("systemd/modeld.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/modeld "));
    // The verifier checks that ExecStart names an executable: this build's agent.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("modeld.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/modeld",
            &format!("ExecStart={}", binary("modeld").display()),
        ),
    )
    .unwrap();
    let said = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
    assert!(said.trim().is_empty(), "the verifier had remarks: {said}");
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_directories_the_unit_needs() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let mut root_arg = std::ffi::OsString::from("--root=");
    root_arg.push(root.path());
    run(Command::new("systemd-sysusers")
        .arg(&root_arg)
        .arg(deploy("systemd/modeld.sysusers.conf")));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("modeld:"))
        .unwrap_or_else(|| panic!("no modeld user: {passwd}"));
    let fields: Vec<&str> = entry.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert_eq!(fields[5], "/var/lib/modeld");
    assert!(fields[6].ends_with("nologin"), "{entry}");

    run(Command::new("systemd-tmpfiles")
        .arg(&root_arg)
        .arg("--create")
        .arg(deploy("systemd/modeld.tmpfiles.conf")));
    let data = std::fs::metadata(root.path().join("var/lib/modeld")).unwrap();
    assert!(data.is_dir());
    assert_eq!(
        data.uid(),
        uid,
        "the data directory belongs to the agent's user"
    );
    assert_eq!(data.mode() & 0o777, 0o750);
    assert!(root.path().join("etc/modeld").is_dir());

    // The unit runs as that user and writes only there.
    let unit = std::fs::read_to_string(deploy("systemd/modeld.service")).unwrap();
    assert!(unit.contains("User=modeld") && unit.contains("ReadWritePaths=/var/lib/modeld"));
}

#[test]
fn the_launchd_plist_loads_and_logs_under_the_users_library() {
    let assets = Assets::get();
    let script = r#"
import json, plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f)
print(json.dumps(p))
"#;
    let out = run(Command::new(&assets.python)
        .args(["-c", script])
        .arg(deploy("launchd/dev.modeld.agent.plist")));
    let plist: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(plist["Label"], "dev.modeld.agent");
    assert_eq!(plist["ProgramArguments"][0], "/usr/local/bin/modeld");
    for key in ["StandardErrorPath", "StandardOutPath"] {
        let path = plist[key].as_str().unwrap();
        assert!(
            path.starts_with("__HOME__/Library/Logs/modeld/"),
            "{key} is under the user's Library, not /tmp: {path}"
        );
    }
    assert_eq!(plist["KeepAlive"]["SuccessfulExit"], false);
}

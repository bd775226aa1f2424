//! The systemd unit (deploy/systemd) started by a real systemd, its hardening in force.
//! systemd is not PID 1 on the test machines, so the test boots one as PID 1 in a podman
//! container: a plain Debian root filesystem with systemd (tests/systemd/make-rootfs,
//! mmdebstrap, cached) holding this build's packaged agent (scripts/package) in
//! /opt/modeld, linked from /usr/local/bin where the unit's ExecStart runs it. Inside,
//! the README's install steps: the unit, the sysusers and tmpfiles files (run by
//! systemd-sysusers and systemd-tmpfiles), the example configuration where ExecStart
//! reads it, `systemctl enable --now modeld`. Then: the agent answers on the
//! configuration's address; it runs as the modeld user with no_new_privs and no
//! capabilities, sees / read-only and can write only /var/lib/modeld (still 0750) and a
//! /tmp of its own; a model found in the configuration's models directory and one pushed
//! into the store load in engine processes confined as outside systemd (Landlock, where
//! the kernel has it) and generate the same tokens; a killed agent is restarted
//! (Restart=on-failure) with its store intact; `systemctl stop` ends it cleanly
//! (inactive, not failed) and the journal holds its log.
//!
//! Skipped, saying so, only where podman is not installed (scripts/setup installs it
//! with runc and mmdebstrap).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use modeld_e2e::{Assets, SMOLLM2_SHA256, binary};

/// The built-in catalog's model: the test GGUF is the same file, pushed.
const MODEL: &str = "smollm2-135m-instruct";

/// The test GGUF inside the container: in the example configuration's models directory,
/// which the agent scans when it starts.
const SCANNED_GGUF: &str = "/srv/models/smollm2.gguf";

/// How the container is run, and why each flag. `--runtime runc` and the ulimits: as in
/// container.rs (crun refuses this VM's hybrid cgroup hierarchy; root lacks
/// CAP_SYS_RESOURCE to take podman's default limits). `--systemd=always`: podman
/// prepares what systemd as PID 1 needs (tmpfs on /run and /tmp, a writable name=systemd
/// cgroup, SIGRTMIN+3 to stop it). `--cap-add SYS_ADMIN`: ProtectSystem=, ProtectHome=,
/// PrivateTmp= and ReadWritePaths= need a mount namespace of the service's own; without
/// the capability systemd cannot unshare one ("Failed to unshare the mount namespace:
/// Operation not permitted"), takes itself to be in a container and starts the service
/// without them, saying so only at debug level ("Failed to set up namespace, assuming
/// containerized execution and ignoring"): the test checks that they took effect.
/// `--cap-add SYS_PTRACE`: nsenter into the agent's mount namespace (the agent is
/// another user's process) to try writes there. `--network none`: a loopback of its own,
/// where the agent listens on its configured 127.0.0.1:7700 whatever the host has there.
const RUN_FLAGS: &[&str] = &[
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=8192:8192",
    "--ulimit",
    "nproc=8192:8192",
    "--systemd=always",
    "--cap-add",
    "SYS_ADMIN",
    "--cap-add",
    "SYS_PTRACE",
    "--network",
    "none",
];

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Tries to create a file in each directory from inside the agent's mount namespace (as
/// root, so only a read-only mount stops it), then looks for the one made in /tmp in the
/// machine's own /tmp. One line per directory: `DIR: written` or `DIR: ERROR`.
const WRITE_PROBE: &str = r#"pid=$(systemctl show --property=MainPID --value modeld)
for d in / /etc/modeld /usr/local/bin /opt/modeld /home /root /srv /var/lib /var/lib/modeld /tmp; do
    if err=$(nsenter --target "$pid" --mount -- touch "$d/.unit-probe" 2>&1); then
        echo "$d: written"
    else
        echo "$d: $err"
    fi
done
if test -e /tmp/.unit-probe; then echo "/tmp is shared with the machine"; fi
nsenter --target "$pid" --mount -- rm -f /var/lib/modeld/.unit-probe /tmp/.unit-probe"#;

/// The pids of the agent's engine processes (`modeld engine-host`).
const ENGINE_PIDS: &str = r#"for p in /proc/[0-9]*; do
    set -- $(tr '\0' ' ' 2>/dev/null <"$p/cmdline")
    if [ "${2:-}" = engine-host ]; then echo "${p#/proc/}"; fi
done"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("run podman")
}

/// Runs podman; panics with its output unless it succeeds. Returns stdout.
fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The container systemd runs in, removed (and its root filesystem with it) when the
/// test ends, also when it fails.
struct Machine {
    name: String,
    dir: tempfile::TempDir,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", self.name.as_str()]);
    }
}

impl Machine {
    fn sh(&self, script: &str) -> Output {
        podman(&["exec", self.name.as_str(), "sh", "-c", script])
    }

    /// Runs a shell script in the machine; panics with its output and the unit's
    /// journal unless it succeeds. Returns stdout.
    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "{script}: {}\njournal of modeld.service:\n{}",
            text(&out),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the unit logged (systemd's lines and the agent's).
    fn journal(&self) -> String {
        text(&self.sh("journalctl --no-pager --output=cat --unit=modeld"))
    }

    /// `modelctl --addr URL ARGS` in the machine (the packaged one, on PATH).
    fn modelctl(&self, url: &str, args: &[&str]) -> String {
        let mut all = vec!["exec", self.name.as_str(), "modelctl", "--addr", url];
        all.extend_from_slice(args);
        let out = podman(&all);
        assert!(
            out.status.success(),
            "modelctl {}: {}\njournal of modeld.service:\n{}",
            args.join(" "),
            text(&out),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Properties of modeld.service (`systemctl show`).
    fn unit(&self, names: &[&str]) -> HashMap<String, String> {
        let shown = self.sh_ok(&format!(
            "systemctl show --property={} modeld",
            names.join(",")
        ));
        shown
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn proc_file(&self, pid: &str, file: &str) -> String {
        self.sh_ok(&format!("cat /proc/{pid}/{file}"))
    }

    fn engine_pids(&self) -> Vec<String> {
        self.sh_ok(ENGINE_PIDS).lines().map(str::to_owned).collect()
    }

    /// Waits until systemd has booted the machine.
    fn wait_booted(&self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            // Refused until systemd listens; then waits for the boot to finish.
            let out = self.sh("timeout 60 systemctl is-system-running --wait");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if state == "running" {
                return;
            }
            if state == "degraded" {
                eprintln!(
                    "systemd booted degraded:\n{}",
                    self.sh_ok("systemctl --failed --no-pager")
                );
                return;
            }
            let running = podman_ok(&[
                "inspect",
                "--format",
                "{{.State.Running}}",
                self.name.as_str(),
            ]);
            assert_eq!(
                running.trim(),
                "true",
                "systemd exited: {}",
                text(&podman(&["logs", self.name.as_str()]))
            );
            assert!(
                Instant::now() < deadline,
                "systemd did not finish booting ({state}): {}",
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent answers on `url`, the unit active or starting; panics with
    /// the journal if the unit fails or the agent never answers. Returns `node info`.
    fn wait_serving(&self, url: &str) -> Value {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = podman(&[
                "exec",
                self.name.as_str(),
                "modelctl",
                "--addr",
                url,
                "-o",
                "json",
                "node",
                "info",
            ]);
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).unwrap();
            }
            let state = self.unit(&["ActiveState"]).remove("ActiveState").unwrap();
            assert!(
                state == "active" || state == "activating",
                "modeld.service is {state}; journal:\n{}",
                self.journal()
            );
            assert!(
                Instant::now() < deadline,
                "the agent never answered on {url} ({}); journal:\n{}",
                text(&out),
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A field of /proc/PID/status: `NoNewPrivs`, `CapEff`, the first of `Uid`...
fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// The mount at `target` in a /proc/PID/mountinfo (the topmost, when several are
/// stacked there): its root within its filesystem, and its options.
fn mount<'a>(mountinfo: &'a str, target: &str) -> (&'a str, Vec<&'a str>) {
    mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 5 && f[4] == target)
        .map(|f| (f[3], f[5].split(',').collect::<Vec<_>>()))
        .next_back()
        .unwrap_or_else(|| panic!("nothing mounted at {target}: {mountinfo}"))
}

/// Checks what systemd made of a process of the unit: it runs as the agent's user,
/// with no_new_privs, no capabilities and the unit's mount namespace.
fn assert_confined(status: &str, mountinfo: &str, uid: &str) {
    assert_eq!(status_field(status, "Uid"), uid, "{status}");
    assert_eq!(status_field(status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(
        status_field(status, "CapEff"),
        "0000000000000000",
        "{status}"
    );
    // ProtectSystem=strict: / read-only; ReadWritePaths= (and StateDirectory=): the data
    // directory writable; PrivateTmp=: a /tmp of the unit's own.
    assert!(mount(mountinfo, "/").1.contains(&"ro"), "{mountinfo}");
    assert!(
        mount(mountinfo, "/var/lib/modeld").1.contains(&"rw"),
        "{mountinfo}"
    );
    let (tmp, _) = mount(mountinfo, "/tmp");
    assert!(
        tmp.starts_with("/systemd-private-") && tmp.contains("-modeld.service-"),
        "{mountinfo}"
    );
}

/// Whether this kernel has Landlock: landlock_create_ruleset(NULL, 0,
/// LANDLOCK_CREATE_RULESET_VERSION) (syscall 444 on every architecture) returns its ABI
/// version. Asked here, outside any sandbox, through Python's ctypes.
fn kernel_has_landlock(python: &std::path::Path) -> bool {
    let out = Command::new(python)
        .args([
            "-c",
            "import ctypes; print(ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1))",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<i64>()
        .unwrap()
        > 0
}

/// A proto3 JSON integer: a number, or a string for 64-bit fields.
fn int(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// Greedy generation through `modelctl -o json generate`: the token ids.
fn generate(machine: &Machine, url: &str, model: &str) -> Vec<u64> {
    let out = machine.modelctl(
        url,
        &[
            "-o",
            "json",
            "generate",
            model,
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "The capital of France is",
        ],
    );
    let mut ids = Vec::new();
    let mut summary = None;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).unwrap();
        if let Some(token) = event.get("token") {
            // proto3 JSON leaves out zeros: no tokenId is token 0.
            ids.push(token.get("tokenId").map_or(0, int));
        } else if let Some(s) = event.get("summary") {
            summary = Some(s.clone());
        }
    }
    let summary = summary.unwrap_or_else(|| panic!("no summary in: {out}"));
    assert!(!ids.is_empty(), "{model} generated nothing: {out}");
    assert_eq!(
        int(&summary["usage"]["generatedTokens"]),
        ids.len() as u64,
        "{out}"
    );
    ids
}

/// The pushed model is stored, complete, in the agent's data directory.
fn assert_stored(machine: &Machine, url: &str) {
    let storage: Value =
        serde_json::from_str(&machine.modelctl(url, &["-o", "json", "storage"])).unwrap();
    let stored = storage["stored"]
        .as_array()
        .and_then(|s| s.iter().find(|m| m["modelId"] == MODEL))
        .unwrap_or_else(|| panic!("{MODEL} is not stored: {storage}"));
    assert_eq!(stored["complete"], true, "{storage}");
    assert_eq!(stored["blobs"][0]["sha256"], SMOLLM2_SHA256, "{storage}");
}

#[test]
fn the_unit_runs_the_agent_under_systemd_with_its_hardening_and_stops_cleanly() {
    let have_podman = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_podman {
        eprintln!(
            "SKIPPED: podman is not installed (scripts/setup installs it with runc and \
             mmdebstrap): the systemd unit is not started under systemd"
        );
        return;
    }
    let assets = Assets::get();
    let repo = repo();
    let begun = Instant::now();

    // Where the unit runs the agent from and reads its configuration, and where that
    // configuration has it listen.
    let unit = std::fs::read_to_string(repo.join("deploy/systemd/modeld.service")).unwrap();
    let exec: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart")
        .split_whitespace()
        .collect();
    assert_eq!(exec[0], "/usr/local/bin/modeld", "{unit}");
    let config = exec
        .iter()
        .position(|a| *a == "--config")
        .map(|i| exec[i + 1])
        .unwrap_or_else(|| panic!("ExecStart names no configuration file: {unit}"));
    let example = std::fs::read_to_string(repo.join("deploy/config/modeld.toml")).unwrap();
    let listen = example
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .expect("the example configuration sets listen")
        .trim_matches('"');
    let url = format!("http://{listen}");

    // The machine's root filesystem: Debian with systemd (cached), the packaged agent
    // in /opt/modeld with its commands linked from /usr/local/bin, and deploy/'s files
    // in /root/modeld, where the install steps are run from.
    let out = Command::new(repo.join("tests/systemd/make-rootfs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "make-rootfs: {}", text(&out));
    let tarball = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let machine = Machine {
        name: format!("modeld-e2e-systemd-{unique}"),
        dir: tempfile::tempdir().unwrap(),
    };
    let root = machine.dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-xf")
        .arg(&tarball));
    let built = binary("modeld").parent().unwrap().to_path_buf();
    run(Command::new(repo.join("scripts/package"))
        .arg("--from")
        .arg(&built)
        .arg(root.join("opt/modeld")));
    for command in ["modeld", "modelctl"] {
        std::os::unix::fs::symlink(
            format!("/opt/modeld/{command}"),
            root.join("usr/local/bin").join(command),
        )
        .unwrap();
    }
    for file in [
        "systemd/modeld.service",
        "systemd/modeld.sysusers.conf",
        "systemd/modeld.tmpfiles.conf",
        "config/modeld.toml",
    ] {
        let to = root.join("root/modeld/deploy").join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo.join("deploy").join(file), &to).unwrap();
    }
    eprintln!("root filesystem ready in {:.1?}", begun.elapsed());

    // systemd as PID 1.
    let started = Instant::now();
    let rootfs = root.display().to_string();
    let gguf = format!("{}:{SCANNED_GGUF}:ro", assets.gguf.display());
    let mut args = vec!["run", "--detach", "--name", machine.name.as_str()];
    args.extend_from_slice(RUN_FLAGS);
    args.extend_from_slice(&[
        "--volume",
        gguf.as_str(),
        "--rootfs",
        rootfs.as_str(),
        "/usr/lib/systemd/systemd",
    ]);
    podman_ok(&args);
    machine.wait_booted();
    eprintln!("systemd booted in {:.1?}", started.elapsed());

    // The README's install steps, the configuration where ExecStart reads it.
    let started = Instant::now();
    machine.sh_ok(&format!(
        "set -e; cd /root/modeld
        install -m 0644 deploy/systemd/modeld.service /etc/systemd/system/
        install -m 0644 deploy/systemd/modeld.sysusers.conf /usr/lib/sysusers.d/modeld.conf
        install -m 0644 deploy/systemd/modeld.tmpfiles.conf /usr/lib/tmpfiles.d/modeld.conf
        systemd-sysusers && systemd-tmpfiles --create
        install -m 0644 deploy/config/modeld.toml {config}
        systemctl daemon-reload
        systemctl enable --now modeld"
    ));
    let info = machine.wait_serving(&url);
    eprintln!("the unit serving in {:.1?}", started.elapsed());
    assert!(
        info["nodeId"].as_str().is_some_and(|id| !id.is_empty()),
        "{info}"
    );
    let props = machine.unit(&["ActiveState", "SubState", "UnitFileState", "MainPID"]);
    assert_eq!(props["ActiveState"], "active", "{props:?}");
    assert_eq!(props["SubState"], "running", "{props:?}");
    assert_eq!(props["UnitFileState"], "enabled", "{props:?}");
    let pid = props["MainPID"].clone();

    // The user sysusers made, the directories tmpfiles made: the data directory kept
    // its mode once the unit's StateDirectory= had its way with it.
    let passwd = machine.sh_ok("getent passwd modeld");
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields.len(), 7, "{passwd}");
    let uid = fields[2];
    assert_eq!(fields[5], "/var/lib/modeld", "{passwd}");
    assert!(fields[6].ends_with("nologin"), "{passwd}");
    let dirs = machine.sh_ok("stat -c '%n %U %G %a' /etc/modeld /var/lib/modeld");
    assert!(dirs.contains("/etc/modeld root root 755"), "{dirs}");
    assert!(dirs.contains("/var/lib/modeld modeld modeld 750"), "{dirs}");

    // The agent as systemd runs it, and where it can write: only its data directory
    // and its own /tmp (a root process in its mount namespace can write nowhere else).
    assert_confined(
        &machine.proc_file(&pid, "status"),
        &machine.proc_file(&pid, "mountinfo"),
        uid,
    );
    let probe = machine.sh_ok(WRITE_PROBE);
    assert!(!probe.contains("/tmp is shared"), "PrivateTmp: {probe}");
    for line in probe.lines() {
        let (dir, result) = line.split_once(": ").unwrap();
        if dir == "/var/lib/modeld" || dir == "/tmp" {
            assert_eq!(result, "written", "{probe}");
        } else {
            assert!(result.contains("Read-only file system"), "{probe}");
        }
    }

    // Models, in engine processes under the unit: the one the agent found in the
    // configuration's models directory (read in place), then the same file pushed into
    // its store. Both generate, the same tokens.
    let started = Instant::now();
    let models: Value =
        serde_json::from_str(&machine.modelctl(&url, &["-o", "json", "models", "list"])).unwrap();
    let scanned = models["models"]
        .as_array()
        .and_then(|all| all.iter().find(|m| m["localPath"] == SCANNED_GGUF))
        .and_then(|m| m["spec"]["id"].as_str())
        .unwrap_or_else(|| panic!("{SCANNED_GGUF} was not found by the scan: {models}"))
        .to_owned();
    let loaded = machine.modelctl(&url, &["load", scanned.as_str()]);
    assert!(loaded.contains("is ready"), "{loaded}");
    let tokens = generate(&machine, &url, &scanned);
    let pushed = machine.modelctl(&url, &["push", MODEL, SCANNED_GGUF]);
    assert!(pushed.contains("stored"), "{pushed}");
    let loaded = machine.modelctl(&url, &["load", MODEL]);
    assert!(loaded.contains("is ready"), "{loaded}");
    assert_eq!(generate(&machine, &url, MODEL), tokens);
    assert_stored(&machine, &url);
    eprintln!("loaded and generated in {:.1?}", started.elapsed());

    let engines = machine.engine_pids();
    assert_eq!(
        engines.len(),
        2,
        "one engine process per model: {engines:?}"
    );
    for engine in &engines {
        assert_confined(
            &machine.proc_file(engine, "status"),
            &machine.proc_file(engine, "mountinfo"),
            uid,
        );
        let cgroup = machine.proc_file(engine, "cgroup");
        assert!(
            cgroup.contains("/system.slice/modeld.service"),
            "the engine is in the unit's cgroup: {cgroup}"
        );
    }
    // The engines confine themselves as well under the unit as outside it: nothing in
    // it (a SystemCallFilter= without the landlock_* calls, say) takes Landlock away.
    let log = machine.journal();
    assert!(log.contains("engine process confined"), "{log}");
    if kernel_has_landlock(&assets.python) {
        assert!(log.contains("filesystem: landlock, read-only to"), "{log}");
    } else {
        eprintln!("this kernel has no Landlock: the engines' own confinement is not checked");
    }

    // Killed, the agent is restarted (Restart=on-failure) on its data directory: the
    // model is still stored and loads without a push.
    let started = Instant::now();
    machine.sh_ok("systemctl kill --signal=SIGKILL modeld");
    let deadline = Instant::now() + START_TIMEOUT;
    while machine.unit(&["NRestarts"])["NRestarts"] != "1" {
        assert!(
            Instant::now() < deadline,
            "modeld was not restarted; journal:\n{}",
            machine.journal()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    machine.wait_serving(&url);
    eprintln!("restarted in {:.1?}", started.elapsed());
    assert_stored(&machine, &url);
    let loaded = machine.modelctl(&url, &["load", MODEL]);
    assert!(loaded.contains("is ready"), "{loaded}");
    assert_eq!(generate(&machine, &url, MODEL), tokens);
    let props = machine.unit(&["ActiveState", "MainPID"]);
    assert_eq!(props["ActiveState"], "active", "{props:?}");
    assert_ne!(props["MainPID"], pid, "a new agent");

    // Stopped, it drains and flushes and exits 0: inactive, not failed.
    let started = Instant::now();
    machine.sh_ok("systemctl stop modeld");
    eprintln!("stopped in {:.1?}", started.elapsed());
    let props = machine.unit(&["ActiveState", "Result", "ExecMainStatus", "NRestarts"]);
    assert_eq!(props["ActiveState"], "inactive", "{props:?}");
    assert_eq!(props["Result"], "success", "{props:?}");
    assert_eq!(props["ExecMainStatus"], "0", "{props:?}");
    assert_eq!(props["NRestarts"], "1", "{props:?}");
    assert!(machine.engine_pids().is_empty(), "engine processes remain");

    // The journal has the agent's own log, through both runs.
    let log = machine.journal();
    for line in [
        format!("modeld listening addr={listen}"),
        "models directories scanned models=1".to_owned(),
        "Main process exited, code=killed, status=9/KILL".to_owned(),
        "restart counter is at 1".to_owned(),
        "SIGTERM received".to_owned(),
        "store flushed; bye".to_owned(),
    ] {
        assert!(log.contains(&line), "{line:?} not in the journal:\n{log}");
    }
    eprintln!("the whole test took {:.1?}", begun.elapsed());
}

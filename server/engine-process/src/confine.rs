//! What an engine process gives up before it opens a model: the code that parses
//! untrusted files (a GGUF, an ONNX graph) runs with as little as it needs.
//!
//! On Linux:
//! - `no_new_privs`, so nothing it executes gains privileges;
//! - Landlock: the filesystem becomes read-only and limited to the model, the
//!   runtime's own libraries and a few system paths; TCP bind and connect are
//!   denied where the kernel supports it (ABI 4, Linux 6.7);
//! - `RLIMIT_DATA` from the memory the agent admitted, so a runaway model fails its
//!   own allocations and dies alone. (`RLIMIT_AS` would also count the mapped
//!   weights and the address space the runtimes reserve, and break loads that fit.)
//!
//! Landlock applies to the calling thread and threads it starts later, so this runs
//! on the engine process's only thread, before any runtime starts a pool.

use std::path::{Path, PathBuf};

/// Paths every engine process may read: what the dynamic loader, the CPU topology
/// probes (XNNPACK's cpuinfo parses `/proc/cpuinfo`) and `/proc/self` need. None of
/// them holds anything of the agent's.
pub const SYSTEM_READABLE: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/proc/self",
    "/proc/cpuinfo",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
    "/dev/null",
    "/dev/urandom",
];

/// What one engine process may touch.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// Files and directories it may read (and map, and load libraries from).
    pub readable: Vec<PathBuf>,
    /// Directories it may also write beneath (its scratch directory).
    pub writable: Vec<PathBuf>,
    /// Private memory it may allocate; 0 = no limit.
    pub memory_limit_bytes: u64,
}

/// What was applied, in words, for the agent's log and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub filesystem: String,
    pub network: String,
    pub no_new_privs: bool,
    pub memory_limit_bytes: Option<u64>,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "filesystem: {}; network: {}; no_new_privs: {}; memory limit: {}",
            self.filesystem,
            self.network,
            if self.no_new_privs { "set" } else { "not set" },
            match self.memory_limit_bytes {
                Some(b) => format!("{} MiB of private memory", b >> 20),
                None => "none".into(),
            }
        )
    }
}

impl Confinement {
    /// For a model at `model` run by a runtime that also reads `runtime_paths`.
    pub fn for_model(model: &Path, runtime_paths: &[PathBuf], memory_limit_bytes: u64) -> Self {
        let mut readable = vec![model.to_path_buf()];
        readable.extend(runtime_paths.iter().cloned());
        readable.extend(SYSTEM_READABLE.iter().map(PathBuf::from));
        Confinement {
            readable,
            writable: Vec::new(),
            memory_limit_bytes,
        }
    }

    /// Applies it to this process, for good. Best effort where the kernel lacks a
    /// feature (said in the result); an error only when a call the kernel supports
    /// fails.
    pub fn apply(&self) -> std::io::Result<Applied> {
        imp::apply(self)
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        path_beneath_rules,
    };

    use super::{Applied, Confinement};

    pub fn apply(c: &Confinement) -> std::io::Result<Applied> {
        let memory_limit_bytes = if c.memory_limit_bytes > 0 {
            rlimit::Resource::DATA.set(c.memory_limit_bytes, c.memory_limit_bytes)?;
            Some(c.memory_limit_bytes)
        } else {
            None
        };
        // The newest ABI this crate knows; older kernels get what they support.
        let abi = ABI::V5;
        let status = Ruleset::default()
            .handle_access(AccessFs::from_all(abi))
            .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
            .and_then(|r| r.create())
            .and_then(|r| {
                r.add_rules(path_beneath_rules(
                    c.readable.iter().filter(|p| p.exists()),
                    AccessFs::from_read(abi),
                ))
            })
            .and_then(|r| {
                r.add_rules(path_beneath_rules(
                    c.writable.iter().filter(|p| p.is_dir()),
                    AccessFs::from_all(abi),
                ))
            })
            .and_then(|r| r.restrict_self())
            .map_err(std::io::Error::other)?;
        let (filesystem, network) = match status.ruleset {
            RulesetStatus::FullyEnforced => (
                format!(
                    "landlock, read-only to {} paths{}",
                    c.readable.len(),
                    writable(c)
                ),
                "landlock denies TCP bind and connect".to_owned(),
            ),
            RulesetStatus::PartiallyEnforced => (
                format!(
                    "landlock (partly: this kernel lacks some rights), read-only to {} paths{}",
                    c.readable.len(),
                    writable(c)
                ),
                "landlock where the kernel supports it (Linux 6.7+)".to_owned(),
            ),
            RulesetStatus::NotEnforced => (
                "unrestricted (this kernel has no Landlock)".to_owned(),
                "unrestricted".to_owned(),
            ),
        };
        Ok(Applied {
            filesystem,
            network,
            no_new_privs: status.no_new_privs,
            memory_limit_bytes,
        })
    }

    fn writable(c: &Confinement) -> String {
        c.writable
            .iter()
            .map(|p| format!(", writable beneath {}", p.display()))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::{Applied, Confinement};

    pub fn apply(c: &Confinement) -> std::io::Result<Applied> {
        let _ = c;
        Ok(Applied {
            filesystem: "unrestricted on this platform".into(),
            network: "unrestricted on this platform".into(),
            no_new_privs: false,
            memory_limit_bytes: None,
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    //! The confinement is applied for real in a child process (this test binary run
    //! again), since it cannot be undone in the process that applies it.

    use std::io::Read as _;
    use std::process::Command;

    use super::*;

    const CHILD: &str = "MODELD_CONFINE_TEST_CHILD";

    /// Runs in the re-executed test binary only: confines itself to `allowed`, then
    /// reports what it can still do, one line per attempt.
    #[test]
    fn confined_child() {
        let Ok(spec) = std::env::var(CHILD) else {
            return;
        };
        let mut parts = spec.split('\n');
        let allowed = PathBuf::from(parts.next().unwrap_or_default());
        let outside = PathBuf::from(parts.next().unwrap_or_default());
        let port: u16 = parts.next().unwrap_or_default().parse().unwrap_or(0);
        let applied = Confinement::for_model(&allowed, &[], 0).apply().unwrap();
        let read = |p: &Path| match std::fs::File::open(p) {
            Ok(mut f) => {
                let mut s = String::new();
                f.read_to_string(&mut s)
                    .map(|_| "ok".to_owned())
                    .unwrap_or_else(|e| e.to_string())
            }
            Err(e) => format!("{:?}", e.kind()),
        };
        println!("APPLIED {applied}");
        println!("NNP {}", applied.no_new_privs);
        println!("MODEL {}", read(&allowed));
        println!("OUTSIDE {}", read(&outside));
        println!(
            "WRITE {}",
            match std::fs::write(allowed.with_extension("new"), b"x") {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("{:?}", e.kind()),
            }
        );
        println!(
            "CONNECT {}",
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("{:?}", e.kind()),
            }
        );
    }

    #[test]
    fn a_confined_process_reads_its_model_and_nothing_else_and_cannot_connect() {
        if std::env::var(CHILD).is_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, b"weights").unwrap();
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), b"the agent's secret").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();

        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "confine::tests::confined_child", "--nocapture"])
            .env(
                CHILD,
                format!("{}\n{}\n{port}", model.display(), secret.path().display()),
            )
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} ")))
                .unwrap_or_else(|| panic!("no {key} line in:\n{stdout}"))
                .to_owned()
        };
        assert_eq!(line("MODEL"), "ok", "the model stays readable");
        assert_eq!(line("NNP"), "true");
        if line("APPLIED").contains("no Landlock") {
            eprintln!("SKIPPED the Landlock checks: {}", line("APPLIED"));
            return;
        }
        assert_eq!(line("OUTSIDE"), "PermissionDenied", "{}", line("APPLIED"));
        assert_eq!(line("WRITE"), "PermissionDenied", "{}", line("APPLIED"));
        let applied = line("APPLIED");
        if applied.contains("denies TCP") {
            assert_eq!(line("CONNECT"), "PermissionDenied", "{applied}");
        } else {
            eprintln!("SKIPPED the network check: {applied}");
        }
    }
}

//! The memory limit of the control group the agent runs in (a container's, a
//! systemd unit's `MemoryMax=`), cgroup v2 or v1. A pod limited to 1 GiB on a 64 GiB
//! host must budget from the 1 GiB, or the kernel kills it.

use std::path::{Path, PathBuf};

/// A v1 "unlimited" is a huge page-aligned number, not a keyword.
const UNLIMITED_FROM: u64 = 1 << 60;

/// The tightest memory limit on this process's cgroup and its ancestors; `None`
/// where there is none (or no cgroup filesystem to ask, as on macOS).
pub fn memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    memory_limit_in(&cgroups, &mountinfo, Path::new("/"))
}

/// One mount of a cgroup hierarchy: where it is, and which cgroup is its root.
struct Mount {
    root: String,
    point: PathBuf,
}

/// Finds the v2 mount (`cgroup2`), or the v1 mount carrying the memory controller.
fn mount(mountinfo: &str, v2: bool) -> Option<Mount> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        let mut tail = right.split(' ');
        let fstype = tail.next()?;
        let _source = tail.next();
        let options = tail.next().unwrap_or("");
        let wanted = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && options.split(',').any(|o| o == "memory")
        };
        if !wanted {
            return None;
        }
        Some(Mount {
            root: (*fields.get(3)?).to_owned(),
            point: PathBuf::from(*fields.get(4)?),
        })
    })
}

/// The limit for the cgroups in `cgroups` (the text of /proc/self/cgroup), read
/// through `mountinfo`, with every path under `root` (a fake root in tests).
pub fn memory_limit_in(cgroups: &str, mountinfo: &str, root: &Path) -> Option<u64> {
    let mut tightest: Option<u64> = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (v2, file) = if controllers.is_empty() {
            (true, "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (false, "memory.limit_in_bytes")
        } else {
            continue;
        };
        let Some(mount) = mount(mountinfo, v2) else {
            continue;
        };
        // Inside a cgroup namespace the path is relative to the mount's root.
        let relative = path
            .strip_prefix(mount.root.as_str())
            .unwrap_or(path)
            .trim_start_matches('/');
        let base = root.join(mount.point.strip_prefix("/").unwrap_or(&mount.point));
        // A parent's limit binds its children too: the tightest on the way up counts.
        let mut dir = base.join(relative);
        loop {
            if let Some(limit) = read_limit(&dir.join(file)) {
                tightest = Some(tightest.map_or(limit, |t| t.min(limit)));
            }
            if dir == base || !dir.pop() || !dir.starts_with(&base) {
                break;
            }
        }
    }
    tightest
}

fn read_limit(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let value = text.trim();
    if value == "max" {
        return None;
    }
    value.parse().ok().filter(|v| *v < UNLIMITED_FROM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, path: &str, text: &str) {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    const V2_MOUNT: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
    const V1_MOUNT: &str = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                            35 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";

    #[test]
    fn a_v2_limit_is_read_and_the_tightest_ancestor_wins() {
        let dir = tempfile::tempdir().unwrap();
        put(
            dir.path(),
            "sys/fs/cgroup/kubepods/memory.max",
            "2147483648\n",
        );
        put(
            dir.path(),
            "sys/fs/cgroup/kubepods/pod1/memory.max",
            "1073741824\n",
        );
        put(
            dir.path(),
            "sys/fs/cgroup/kubepods/pod1/ctr/memory.max",
            "max\n",
        );
        let limit = memory_limit_in("0::/kubepods/pod1/ctr\n", V2_MOUNT, dir.path());
        assert_eq!(limit, Some(1 << 30));
    }

    #[test]
    fn a_v1_limit_is_read_and_unlimited_is_none() {
        let dir = tempfile::tempdir().unwrap();
        put(
            dir.path(),
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
            "536870912\n",
        );
        let cgroups = "4:memory:/docker/abc\n1:cpu:/docker/abc\n";
        assert_eq!(
            memory_limit_in(cgroups, V1_MOUNT, dir.path()),
            Some(512 << 20)
        );
        put(
            dir.path(),
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(memory_limit_in(cgroups, V1_MOUNT, dir.path()), None);
    }

    #[test]
    fn a_namespaced_path_is_taken_relative_to_the_mount_root() {
        let dir = tempfile::tempdir().unwrap();
        put(dir.path(), "sys/fs/cgroup/memory.max", "268435456\n");
        let mountinfo = "30 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            memory_limit_in("0::/kubepods/pod1\n", mountinfo, dir.path()),
            Some(256 << 20)
        );
    }

    #[test]
    fn no_cgroup_filesystem_means_no_limit() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(memory_limit_in("0::/\n", "", dir.path()), None);
        assert_eq!(memory_limit_in("", V2_MOUNT, dir.path()), None);
    }
}

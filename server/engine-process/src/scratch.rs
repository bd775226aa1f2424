//! The one directory an engine process may write, for runtimes that keep a cache of
//! packed weights on disk (LiteRT-LM): private to the process (mode 0700) and named by
//! its pid. The agent removes it once the process has ended, however it ended: the
//! process itself could not, since Landlock grants it only what lies beneath.

use std::path::{Path, PathBuf};

/// Where the engine process `pid` writes: in the temporary directory the agent and its
/// engine processes share (`TMPDIR`, inherited).
pub fn dir_for(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("modeld-engine-{pid}"))
}

/// Creates this process's scratch directory afresh (anything a dead process of the same
/// pid left is removed first) and returns it.
pub fn create_for_this_process() -> std::io::Result<PathBuf> {
    let dir = dir_for(std::process::id());
    remove(&dir);
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(&dir)?;
    Ok(dir)
}

/// Removes what the engine process `pid` left, if anything, once it has ended.
pub fn remove_left_by(pid: u32) {
    remove(&dir_for(pid));
}

fn remove(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::debug!(dir = %dir.display(), "scratch directory removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a scratch directory")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_private_and_removed_for_its_pid() {
        let path = create_for_this_process().unwrap();
        std::fs::write(path.join("cache"), b"packed").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        remove_left_by(std::process::id());
        assert!(!path.exists());
    }
}

//! The one directory an engine process may write, for runtimes that keep a cache of
//! packed weights on disk (LiteRT-LM): private to the process (mode 0700), named by
//! its pid so the agent can remove what a killed process left, and removed when the
//! model is unloaded.

use std::path::{Path, PathBuf};

/// Where the engine process `pid` writes: in the temporary directory the agent and its
/// engine processes share (`TMPDIR`, inherited).
pub fn dir_for(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("modeld-engine-{pid}"))
}

/// This process's scratch directory, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates it afresh: anything a dead process of the same pid left is removed first.
    pub fn create() -> std::io::Result<ScratchDir> {
        let dir = dir_for(std::process::id());
        remove(&dir);
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir)?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

/// Removes what the engine process `pid` left, if anything: after it ended, whatever
/// way it ended.
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
    fn the_directory_is_private_and_gone_after_drop() {
        let scratch = ScratchDir::create().unwrap();
        let path = scratch.path().to_path_buf();
        std::fs::write(path.join("cache"), b"packed").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        drop(scratch);
        assert!(!path.exists());
    }
}
